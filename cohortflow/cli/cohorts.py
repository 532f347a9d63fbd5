"""Cohort commands: apply, list, show, evaluate (and launch), members, launch progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cohortflow.cli.common import (
    DataDir,
    err,
    identity_of,
    out,
    print_line,
    ready,
    run,
    settings_for,
)
from cohortflow.errors import Invalid, Unavailable
from cohortflow.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client

    from cohortflow.cohorts.service import CohortService

cohort_app = typer.Typer(
    help="Cohorts: rules over features, events and scores; evaluation launches campaigns.",
    no_args_is_help=True,
)
T = TypeVar("T")
CohortArg = Annotated[str, typer.Argument(help="The cohort id.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _with_service(
    settings: Settings,
    action: Callable[[CohortService, Client | None], Awaitable[T]],
    *,
    temporal: bool = False,
) -> T:
    """Run ``action`` with a cohort service; Temporal only for commands that signal/launch."""
    from cohortflow.cohorts.service import CohortService
    from cohortflow.storage.db import Database
    from cohortflow.temporal_client import connect

    async def main() -> T:
        await ready(settings)
        db = Database(settings.resolved_database_url)
        client = None
        if temporal:
            try:
                client = await connect(settings, tracing=False)
            except RuntimeError:
                err.print(
                    "temporal unreachable: exits not signalled, entries not launched, "
                    "schedules left to the next worker start"
                )
        try:
            return await action(CohortService(db, settings, client), client)
        finally:
            await db.dispose()

    return run(main)


@cohort_app.command("apply")
def apply(
    file: Annotated[Path, typer.Argument(help="A cohort definition, YAML or JSON.", exists=True)],
    data_dir: DataDir = None,
) -> None:
    """Validate and store a cohort definition (a changed one gets a new version), and make
    or update its evaluation schedule: a full evaluation every `evaluate_every` (default
    PT1H), the first at once; customers with new events are re-evaluated within seconds."""
    import yaml

    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise Invalid(f"{file}: not YAML or JSON: {exc}", field="file") from exc
    settings = settings_for(data_dir=data_dir)

    async def action(service: CohortService, _: Client | None) -> Any:
        from cohortflow.auth import policy

        who = await identity_of(settings, service.db)
        policy.require(who, policy.ADMIN, "define cohorts")
        return await service.apply(document, who.name)

    definition, version, changed = _with_service(settings, action, temporal=True)
    state = "stored" if changed else "unchanged"
    print_line(f"cohort {definition.cohort_id} v{version} {state}")


@cohort_app.command("list")
def list_cohorts(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Every cohort with its version, member count and last evaluation."""
    from cohortflow.storage import cohorts

    settings = settings_for(data_dir=data_dir)

    async def action(service: CohortService, _: Client | None) -> list[dict[str, Any]]:
        async with service.db.transaction() as session:
            rows = await cohorts.list_cohorts(session)
        return [
            {
                "cohort_id": c.cohort_id,
                "version": c.version,
                "members": members,
                "evaluated_at": c.evaluated_at.isoformat() if c.evaluated_at else None,
            }
            for c, members in rows
        ]

    rows = _with_service(settings, action)
    if as_json:
        print_line(json.dumps(rows))
        return
    table = Table("cohort", "version", "members", "evaluated at")
    for row in rows:
        table.add_row(
            row["cohort_id"], str(row["version"]), str(row["members"]), row["evaluated_at"] or "-"
        )
    out.print(table)


@cohort_app.command("show")
def show(cohort_id: CohortArg, data_dir: DataDir = None) -> None:
    """The cohort's definition, as JSON."""
    settings = settings_for(data_dir=data_dir)
    definition = _with_service(settings, lambda service, _: service.definition(cohort_id))
    print_line(json.dumps(definition.model_dump(mode="json", by_alias=True), indent=2))


@cohort_app.command("members")
def members(
    cohort_id: CohortArg,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many.")] = 100,
    after: Annotated[str, typer.Option(help="Start after this customer key.")] = "",
    data_dir: DataDir = None,
) -> None:
    """Current members (customer keys) and since when, in key order."""
    from cohortflow.storage import cohorts

    settings = settings_for(data_dir=data_dir)

    async def action(service: CohortService, _: Client | None) -> list[tuple[str, str]]:
        await service.definition(cohort_id)
        async with service.db.transaction() as session:
            page = await cohorts.members_page(session, cohort_id, after=after, limit=limit)
        return [(m.customer_key, m.entered_at.isoformat()) for m in page]

    for key, since in _with_service(settings, action):
        print_line(f"{key}\t{since}")


@cohort_app.command("evaluate")
def evaluate(
    cohort_id: CohortArg,
    launch: Annotated[
        bool, typer.Option("--launch/--no-launch", help="Start campaigns for entries.")
    ] = True,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the launches with a progress bar.")
    ] = True,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Evaluate the cohort: store who entered and who left, signal exits to running
    campaigns and launch the entering customers' campaigns. Twice in a row adds nothing."""
    settings = settings_for(data_dir=data_dir)

    async def action(service: CohortService, client: Client | None) -> dict[str, Any]:
        report = await service.evaluate(cohort_id, launch=launch)
        diff = report.evaluation.diff
        summary: dict[str, Any] = {
            "cohort_id": cohort_id,
            "evaluation_id": report.evaluation.evaluation_id,
            "members": diff.members,
            "entered": len(diff.entered),
            "exited": len(diff.exited),
            "exits_signalled": report.exits_signalled,
            "temporal": report.temporal,
            "launches": [
                {"campaign_id": s.campaign_id, "workflow_id": s.workflow_id, "total": s.total}
                for s in report.launches
            ],
        }
        if wait and client is not None and report.launches:
            summary["launched"] = await _follow(
                client, [s.workflow_id for s in report.launches], quiet=as_json
            )
        return summary

    summary = _with_service(settings, action, temporal=True)
    if as_json:
        print_line(json.dumps(summary))
        return
    print_line(
        f"{cohort_id}: {summary['members']} members, {summary['entered']} entered, "
        f"{summary['exited']} exited, {summary['exits_signalled']} campaign(s) told of exits"
    )
    for launch_ in summary["launches"]:
        print_line(f"launch {launch_['workflow_id']}: {launch_['total']} entries")


async def _follow(client: Client, workflow_ids: list[str], *, quiet: bool) -> dict[str, int]:
    """Show each launch's progress until all are done; returns launched counts by id."""
    from workflows.launch import LaunchCampaignsWorkflow, LaunchProgress

    launched: dict[str, int] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet,
    ) as progress:
        tasks = {wid: progress.add_task(wid, total=None) for wid in workflow_ids}
        pending = set(workflow_ids)
        while pending:
            for wid in sorted(pending):
                handle = client.get_workflow_handle_for(LaunchCampaignsWorkflow.run, wid)
                state: LaunchProgress | None = await handle.query(LaunchCampaignsWorkflow.progress)
                if state is None:
                    continue
                progress.update(tasks[wid], total=state.total, completed=state.processed)
                launched[wid] = state.launched
                if state.done:
                    pending.discard(wid)
            if pending:
                await asyncio.sleep(0.5)
    return launched


@cohort_app.command("progress")
def launch_progress(
    workflow_id: Annotated[str, typer.Argument(help="A launch workflow id (launch:...).")],
    data_dir: DataDir = None,
) -> None:
    """Where a bulk launch is: processed, launched and refused entries, and its cursor."""
    from temporalio.service import RPCError

    from cohortflow.temporal_client import connect
    from workflows.launch import LaunchCampaignsWorkflow

    settings = settings_for(data_dir=data_dir)

    async def main() -> str:
        try:
            client = await connect(settings, tracing=False)
        except RuntimeError as exc:
            raise Unavailable(f"temporal unreachable: {exc}") from exc
        handle = client.get_workflow_handle_for(LaunchCampaignsWorkflow.run, workflow_id)
        try:
            state = await handle.query(LaunchCampaignsWorkflow.progress)
        except RPCError as exc:
            raise Unavailable(f"{workflow_id}: {exc}") from exc
        if state is None:
            return f"{workflow_id}: starting"
        return (
            f"{workflow_id}: {'done' if state.done else 'running'}, {state.processed} of "
            f"{state.total} entries, {state.launched} launched, {state.refused} refused"
        )

    print_line(run(main))


def _schedule_action(
    settings: Settings, cohort_id: str, act: Callable[[Client], Awaitable[T]]
) -> T:
    """Run ``act`` against Temporal for a stored cohort; one clear line when it cannot."""
    from temporalio.service import RPCError, RPCStatusCode

    async def action(service: CohortService, client: Client | None) -> T:
        await service.definition(cohort_id)  # NotFound names the cohort
        if client is None:
            raise Unavailable("temporal unreachable: the schedule lives there")
        try:
            return await act(client)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise Unavailable(
                    f"cohort {cohort_id} has no schedule yet: a worker makes it at start"
                ) from exc
            raise Unavailable(f"temporal: {exc}") from exc

    return _with_service(settings, action, temporal=True)


@cohort_app.command("schedule")
def schedule(cohort_id: CohortArg, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """The cohort's evaluation schedule: interval, paused or not (and why), next run."""
    from cohortflow.cohorts import schedules

    settings = settings_for(data_dir=data_dir)
    state = _schedule_action(settings, cohort_id, lambda c: schedules.status(c, cohort_id))
    every = state.every.total_seconds() if state.every else None
    summary = {
        "schedule_id": state.schedule_id,
        "paused": state.paused,
        "note": state.note,
        "every_seconds": every,
        "next_run": state.next_run.isoformat() if state.next_run else None,
        "runs": state.runs,
    }
    if as_json:
        print_line(json.dumps(summary))
        return
    running = "paused" if state.paused else f"next run {summary['next_run']}"
    print_line(f"{state.schedule_id}: every {every:.0f} s, {running}; {state.runs} runs")
    if state.note:
        print_line(f"note: {state.note}")


def _pause(cohort_id: str, reason: str, data_dir: Path | None, *, paused: bool) -> None:
    from cohortflow.cohorts import schedules

    settings = settings_for(data_dir=data_dir)
    _schedule_action(
        settings, cohort_id, lambda c: schedules.set_paused(c, cohort_id, paused, reason)
    )
    print_line(f"cohort {cohort_id} evaluations {'paused' if paused else 'resumed'}")


Reason = Annotated[str, typer.Option("--reason", help="Why (shown on the schedule).")]


@cohort_app.command("pause")
def pause(cohort_id: CohortArg, reason: Reason, data_dir: DataDir = None) -> None:
    """Stop the cohort's scheduled evaluations (new events still refresh its members)."""
    _pause(cohort_id, reason, data_dir, paused=True)


@cohort_app.command("resume")
def resume(cohort_id: CohortArg, reason: Reason, data_dir: DataDir = None) -> None:
    """Run the cohort's scheduled evaluations again."""
    _pause(cohort_id, reason, data_dir, paused=False)
