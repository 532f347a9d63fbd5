"""Campaign commands: specs and their versions (schema, validate, apply, list, show, diff),
dry runs and outcomes (preview, report), and pause, resume or cancel of running workflows."""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from cohortflow.cli.common import (
    DataDir,
    Reason,
    control,
    err,
    identity_of,
    out,
    print_line,
    run,
    settings_for,
)
from cohortflow.errors import Invalid, NotFound, Unavailable

if TYPE_CHECKING:
    # Only types: controls, storage, scoring and the workflow pull in Temporal, SQLAlchemy
    # and XGBoost, so each command imports what it needs when it runs.
    from sqlalchemy.ext.asyncio import AsyncSession

    from cohortflow.campaigns.controls import CampaignAction
    from cohortflow.campaigns.preview import PreviewResult
    from cohortflow.settings import Settings
    from cohortflow.spec import CampaignSpec
    from cohortflow.storage.db import Database

campaign_app = typer.Typer(
    help=(
        "Campaigns: specs and versions (schema, validate, apply, list, show, diff), "
        "preview, report, and pause, resume, cancel."
    ),
    no_args_is_help=True,
)


def _campaign(campaign_id: str, action: CampaignAction, reason: str, data_dir: Path | None) -> None:
    outcome = control(
        data_dir,
        lambda c, who: c.change_campaign(campaign_id, action, identity=who, reason=reason),
    )
    out.print(f"{outcome.campaign_id} {outcome.status}; {outcome.workflows} running workflow(s)")


CampaignArg = Annotated[str, typer.Argument(help="The campaign id.")]


@campaign_app.command("pause")
def campaign_pause(campaign_id: CampaignArg, reason: Reason = "", data_dir: DataDir = None) -> None:
    """Hold every outbound action of the campaign's running workflows."""
    _campaign(campaign_id, "pause", reason, data_dir)


@campaign_app.command("resume")
def campaign_resume(
    campaign_id: CampaignArg, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Let paused campaigns act again."""
    _campaign(campaign_id, "resume", reason, data_dir)


@campaign_app.command("cancel")
def campaign_cancel(
    campaign_id: CampaignArg, reason: Reason = "", data_dir: DataDir = None
) -> None:
    """Cancel the campaign: running workflows exit, no new outbound action is made."""
    _campaign(campaign_id, "cancel", reason, data_dir)


# ---------------------------------------------------------------------- specs and versions

SpecFile = Annotated[Path, typer.Argument(help="A campaign spec, YAML or JSON.")]


def _load(path: Path) -> CampaignSpec:
    """The validated spec, or every problem on stderr (one per line) and exit code 2."""
    from cohortflow.spec import SpecError, load_spec_file

    try:
        return load_spec_file(path)
    except SpecError as exc:
        for problem in exc.problems:
            err.print(problem, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[Database]:
    """The configured database; refuses one that was never migrated and creates nothing."""
    from cohortflow.storage.db import Database, current_revision

    if await current_revision(settings.resolved_database_url) is None:
        raise Unavailable(
            "the database has no cohortflow schema: run `cohortflow up` or "
            "`cohortflow db upgrade` first, with the same --data-dir or COHORTFLOW_DATABASE_URL"
        )
    db = Database(settings.resolved_database_url)
    try:
        yield db
    finally:
        await db.dispose()


async def _stored(
    db: Database, campaign_id: str, version: int | None
) -> tuple[int, dict[str, Any]]:
    from cohortflow.storage import campaigns

    async with db.transaction() as session:
        campaign = await campaigns.get_campaign(session, campaign_id)
        if campaign is None:
            raise NotFound(f"no campaign {campaign_id!r}", field="campaign_id")
        number = campaign.latest_version if version is None else version
        document = await campaigns.get_spec(session, campaign_id, number)
    if document is None:
        raise NotFound(f"campaign {campaign_id} has no version {number}", field="version")
    return number, document


def _yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


@campaign_app.command("schema")
def campaign_schema() -> None:
    """Print the JSON Schema of a campaign spec."""
    from cohortflow.spec import json_schema

    print_line(json.dumps(json_schema(), indent=2))


@campaign_app.command("validate")
def campaign_validate(path: SpecFile) -> None:
    """Check a spec without storing it: every problem, one per line, exit code 2."""
    spec = _load(path)
    print_line(f"{path}: valid campaign {spec.campaign_id} with {len(spec.steps)} steps")


@campaign_app.command("apply")
def campaign_apply(
    path: SpecFile,
    data_dir: DataDir = None,
) -> None:
    """Store the spec as the campaign's next version, unless it equals the latest one.

    Running campaigns finish on the version they started with; new entries take this one.
    Needs the admin role. Who applies it (this command's identity: COHORTFLOW_TOKEN's name,
    else COHORTFLOW_LOCAL_IDENTITY or the system user) is kept with the version and may not
    approve for it, nor may the spec's ``author``.
    """
    from cohortflow.auth import policy
    from cohortflow.campaigns.versions import applied

    spec = _load(path)
    settings = settings_for(data_dir=data_dir)

    async def apply() -> tuple[int, bool]:
        async with _database(settings) as db:
            who = await identity_of(settings, db)
            policy.require(who, policy.ADMIN, "apply campaigns")
            async with db.transaction() as session:
                return await applied(session, spec, who.name)

    version, created = run(apply)
    if created:
        print_line(f"{spec.campaign_id}: stored version {version}")
    else:
        print_line(f"{spec.campaign_id}: unchanged, still version {version}")


@campaign_app.command("list")
def campaign_list(data_dir: DataDir = None) -> None:
    """Every campaign with its status and latest version."""
    from cohortflow.storage import campaigns

    async def listing() -> list[tuple[str, str, int]]:
        async with _database(settings_for(data_dir=data_dir)) as db, db.transaction() as session:
            rows = await campaigns.list_campaigns(session)
            return [(c.campaign_id, c.status, c.latest_version) for c in rows]

    for campaign_id, status, version in run(listing):
        print_line(f"{campaign_id:<32} {status:<10} v{version}")


@campaign_app.command("show")
def campaign_show(
    campaign_id: CampaignArg,
    version: Annotated[int | None, typer.Option(help="A version (default: latest).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Print one stored version of a spec as YAML."""

    async def show() -> tuple[int, dict[str, Any]]:
        async with _database(settings_for(data_dir=data_dir)) as db:
            return await _stored(db, campaign_id, version)

    number, document = run(show)
    print_line(f"# {campaign_id} version {number}\n{_yaml(document)}")


@campaign_app.command("diff")
def campaign_diff(
    campaign_id: CampaignArg,
    old: Annotated[int, typer.Argument(help="The older version.")],
    new: Annotated[int, typer.Argument(help="The newer version.")],
    data_dir: DataDir = None,
) -> None:
    """A unified diff between two stored versions of a spec."""

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        async with _database(settings_for(data_dir=data_dir)) as db:
            return (await _stored(db, campaign_id, old))[1], (await _stored(db, campaign_id, new))[
                1
            ]

    before, after = run(both)
    lines = difflib.unified_diff(
        _yaml(before).splitlines(),
        _yaml(after).splitlines(),
        f"{campaign_id} v{old}",
        f"{campaign_id} v{new}",
        lineterm="",
    )
    print_line("\n".join(lines) or f"versions {old} and {new} are the same")


# ---------------------------------------------------------------------- preview and report


@campaign_app.command("preview")
def campaign_preview(
    spec_ref: Annotated[str, typer.Argument(help="A spec file, or a stored campaign id.")],
    customer: Annotated[str | None, typer.Option(help="A customer key (c_...).")] = None,
    cohort: Annotated[str | None, typer.Option(help="Every current member of a cohort.")] = None,
    event: Annotated[
        list[str] | None, typer.Option(help="Assume this event arrives during waits.")
    ] = None,
    reject: Annotated[bool, typer.Option(help="Assume approvals are rejected.")] = False,
    data_dir: DataDir = None,
) -> None:
    """The path a customer (or a whole cohort) would take now: scores, branches, consent,
    caps, quiet hours and the CRM writes it would make. Reads only; writes nothing."""
    from datetime import UTC, datetime

    from cohortflow.campaigns.preview import gather_context, summarise, walk
    from cohortflow.spec import parse_spec
    from scoring.registry import ModelRegistry
    from scoring.scorer import Scorer

    if (customer is None) == (cohort is None):
        raise Invalid("give exactly one of --customer or --cohort", field="customer")
    settings = settings_for(data_dir=data_dir)
    path = Path(spec_ref)
    from_file = path.exists()

    async def preview() -> tuple[list[PreviewResult], list[str]]:
        async with _database(settings) as db:
            if from_file:
                definition = _load(path).to_definition(0)
            else:
                number, document = await _stored(db, spec_ref, None)
                definition = parse_spec(document).to_definition(number)
            scorer = Scorer(ModelRegistry(settings.resolved_models_dir))
            async with db.transaction() as session:
                keys = [customer] if customer else await _cohort_members(session, str(cohort))
                results, notes = [], []
                for key in sorted(keys):
                    context, missing = await gather_context(
                        session,
                        scorer,
                        definition,
                        key,
                        datetime.now(UTC),
                        events=frozenset(event or ()),
                        approve=not reject,
                    )
                    results.append(await walk(definition, context))
                    notes += [n for n in missing if n not in notes]
            return results, notes

    results, notes = run(preview)
    if customer is not None:
        result = results[0]
        print_line(f"customer {result.customer_key}, arm {result.variant}")
        for step in result.steps:
            print_line(f"  {step.step_id:<16} {step.type:<9} {step.detail}")
        print_line(f"ends: {result.outcome} ({result.reason})")
    else:
        paths, outcomes, writes = summarise(results)
        print_line(f"cohort {cohort}: {len(results)} customers")
        for line, count in paths.most_common():
            print_line(f"  {count:>6}  {line}")
        print_line("outcomes: " + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
        for write, count in writes.most_common():
            print_line(f"  {count:>6}  would {write}")
    for note in notes:
        print_line(f"note: {note}")


async def _cohort_members(session: AsyncSession, cohort_id: str) -> list[str]:
    """The cohort's current members."""
    from cohortflow.storage.cohorts import member_keys

    keys = sorted(await member_keys(session, cohort_id))
    if not keys:
        raise NotFound(f"cohort {cohort_id!r} has no members", field="cohort")
    return keys


@campaign_app.command("report")
def campaign_report(campaign_id: CampaignArg, data_dir: DataDir = None) -> None:
    """Entered, completed and conversions by holdout arm, and the uplift with a 95% CI."""
    from cohortflow.campaigns.report import build_report, render

    async def report() -> list[str]:
        async with _database(settings_for(data_dir=data_dir)) as db:
            _number, document = await _stored(db, campaign_id, None)
            async with db.transaction() as session:
                built = await build_report(session, campaign_id, document)
            return render(built)

    for line in run(report):
        print_line(line)
