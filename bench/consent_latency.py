"""Consent and events reach campaigns at once: from the API call to the campaign's status.

Campaigns run by a `cohortflow worker` process against the sandbox CRM wait on a long timer
(half of them) or on an operator's approval (the other half, a sensitive spec); each
customer's e-mail marketing consent is then revoked through `POST /v1/consent` of a
`cohortflow api` process (an admin token). The API owes the `consent_changed` signal in the
change's transaction and delivers it right after the commit; the outbox relay delivers what
is left. Per revocation: the time from the API call until the campaign's `status` query
answers `consent_blocked`, in two phases: one revocation at a time, then `--burst` (200) with
32 in flight; `--revocations` (1,000) in all. The same for customer events: campaigns
waiting for a purchase, each purchase posted to `POST /v1/batch` (an ingest token as the
write key), until the status shows the campaign completed by it; `--events` (400), of which
`--burst` with 32 in flight.

A campaign closes in the workflow task that sets its new state, which is when its `status`
query first answers it: each measurement waits for the close (a long poll, which costs the
server nothing while it waits). Each campaign's `status` is asked once its phase is over (a
closed campaign's query replays its history on a worker, which would slow the campaigns still
being measured), and its state counted.

    python -m bench.consent_latency [--revocations 1000] [--events 400] [--burst 200]
    python -m bench.consent_latency --database postgres   # a private PostgreSQL cluster

Ends with one JSON line: ratio = 1,000 ms over the worst phase's p99 (target 1.0: every
phase's p99 under a second), that phase's p50_ms and p99_ms, and each phase's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from bench._costs import cpu_seconds, percentile, server_pid
from bench._private_postgres import private_postgres
from bench.campaign_throughput import embedded, sandbox_crm
from bench.load import Stack, bench_database, launch, seed_customers, stack_for
from cohortflow.auth.tokens import TokenService
from cohortflow.campaigns import visibility
from cohortflow.campaigns.visibility import CampaignHandle
from cohortflow.observability import configure_logging
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.ports import free_port
from workflows.campaign.contract import SA, CampaignState, campaign_workflow_id
from workflows.campaign.workflow import CampaignWorkflow

TARGET_P99_MS = 1_000.0  # from the API call to the new state, at the 99th percentile
IN_FLIGHT = 32
LONG = "PT2H"  # a wait nothing in the bench outlives


def timer_spec(campaign_id: str) -> dict[str, Any]:
    """A long timer before an enrolment: revoking e-mail consent ends the wait."""
    return {
        "campaign_id": campaign_id, "name": "Consent bench: timer", "owner": "bench",
        "entry_cohort": "bench", "safe_default_segment": "nurture_default",
        "steps": [
            {"id": "pause", "type": "wait", "duration": LONG},
            {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "b"},
            {"id": "done", "type": "exit"},
        ],
    }  # fmt: skip


def approval_spec(campaign_id: str) -> dict[str, Any]:
    """A sensitive enrolment waiting for an operator: a revocation withdraws the request."""
    return {
        "campaign_id": campaign_id, "name": "Consent bench: approval", "owner": "bench",
        "entry_cohort": "bench", "safe_default_segment": "nurture_default",
        "sensitive": True, "approval": {"timeout": LONG},
        "steps": [
            {"id": "approve", "type": "approval", "reason": "bench"},
            {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "b"},
            {"id": "done", "type": "exit"},
        ],
    }  # fmt: skip


def event_spec(campaign_id: str) -> dict[str, Any]:
    """A wait for a purchase, which completes the campaign."""
    return {
        "campaign_id": campaign_id, "name": "Consent bench: event", "owner": "bench",
        "entry_cohort": "bench", "safe_default_segment": "nurture_default",
        "steps": [
            {"id": "first", "type": "wait", "event": "purchase", "timeout": LONG,
             "on_event": "done", "on_timeout": "lapsed"},
            {"id": "done", "type": "exit"},
            {"id": "lapsed", "type": "exit", "outcome": "exited"},
        ],
    }  # fmt: skip


@dataclass(frozen=True)
class Target:
    """A waiting campaign to reach: its customer's source id, its workflow, what it waits on."""

    source_id: str
    workflow_id: str
    wait: str  # timer, approval or event


@dataclass
class Phase:
    """One phase's measurements, in milliseconds."""

    name: str
    in_flight: int
    latencies: list[tuple[str, float]] = field(default_factory=list)  # (wait, ms)
    answers: list[float] = field(default_factory=list)  # the API call's own time
    told_at_once: int = 0  # answers that had signalled the campaign themselves
    states: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per process, per measurement

    def ms(self, wait: str | None = None) -> list[float]:
        """The latencies, of campaigns waiting on ``wait`` if given."""
        return [ms for kind, ms in self.latencies if wait is None or kind == wait]

    def figures(self) -> dict[str, Any]:
        """The phase's figures for the JSON line."""
        waits = sorted({kind for kind, _ in self.latencies})
        return {
            "n": len(self.latencies),
            "in_flight": self.in_flight,
            **quantiles(self.ms()),
            "api_p50_ms": round(percentile(self.answers, 0.5), 1),
            "api_p99_ms": round(percentile(self.answers, 0.99), 1),
            "told_at_once": self.told_at_once,
            "states": dict(self.states),
            "seconds": round(self.seconds, 1),
            "cpu_ms_each": self.cpu_ms,
            "by_wait": {w: quantiles(self.ms(w)) for w in waits} if len(waits) > 1 else {},
        }


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``values``, rounded."""
    return {
        "p50_ms": round(percentile(values, 0.5), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(max(values), 1),
    }


# How a phase tells a campaign's customer's news to the API; the campaigns it says it told.
Send = Callable[[httpx.AsyncClient, Target], Awaitable[int]]


async def revoke(http: httpx.AsyncClient, target: Target) -> int:
    """Revoke the customer's e-mail marketing consent; campaigns the answer says it told."""
    body = {"customer_id": target.source_id, "channel": "email", "purpose": "marketing",
            "granted": False, "source": "bench"}  # fmt: skip
    answer = (await http.post("/v1/consent", json=body)).raise_for_status()
    return int(answer.json()["signalled_campaigns"])


async def purchase(http: httpx.AsyncClient, target: Target) -> int:
    """Post the customer's purchase, as a Segment source would; signals the answer sent."""
    event = {"type": "track", "event": "purchase", "userId": target.source_id,
             "messageId": f"{target.source_id}-buy", "timestamp": datetime.now(UTC).isoformat(),
             "properties": {"amount": 25.0}}  # fmt: skip
    answer = (await http.post("/v1/batch", json={"batch": [event]})).raise_for_status()
    return int(answer.json()["signalled"])


async def run_phase(
    phase: Phase,
    targets: Sequence[Target],
    client: Client,
    http: httpx.AsyncClient,
    send: Send,
    pids: dict[str, int],
) -> Phase:
    """Send to every target, ``phase.in_flight`` at a time, and time each until the
    campaign shows its new state; then ask each campaign's ``status`` which state that is."""
    gate = asyncio.Semaphore(phase.in_flight)
    handles: list[CampaignHandle] = []
    for target in targets:
        handles.append(client.get_workflow_handle_for(CampaignWorkflow.run, target.workflow_id))

    async def one(target: Target, handle: CampaignHandle) -> None:
        async with gate:
            began = time.perf_counter()
            told = await send(http, target)
            answered = time.perf_counter()
            # The campaign closes in the workflow task that sets its new state: from then on,
            # and not before, ``status`` answers it.
            await handle.result()
            done = time.perf_counter()
        phase.latencies.append((target.wait, (done - began) * 1000))
        phase.answers.append((answered - began) * 1000)
        phase.told_at_once += told > 0

    async def state(handle: CampaignHandle) -> None:
        async with gate:
            status = await handle.query(CampaignWorkflow.status)
        phase.states[status.state.value] += 1

    cpu = Cpu(pids)
    began = time.perf_counter()
    await asyncio.gather(*(one(t, h) for t, h in zip(targets, handles, strict=True)))
    phase.seconds = time.perf_counter() - began
    phase.cpu_ms = cpu.ms_each(len(targets))
    # Asked after the phase: a closed campaign's query replays its history on a worker,
    # work that would otherwise slow the campaigns still being measured.
    await asyncio.gather(*(state(h) for h in handles))
    return phase


class Cpu:
    """CPU the stack's processes (API, workers, dev server) use from now on."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def ms_each(self, n: int) -> dict[str, float]:
        """Milliseconds of CPU each process used since, per one of ``n`` measurements."""
        return {
            name: round((cpu_seconds(pid) - self.before[name]) * 1000 / n, 1)
            for name, pid in self.pids.items()
        }


async def waiting_campaigns(
    stack: Stack, run: str, documents: dict[str, dict[str, Any]], n: int
) -> list[Target]:
    """``n`` campaigns launched and resting, spread over ``documents`` by the wait each
    spec makes, in turns (so every phase meets each kind); their targets."""
    keys = Pseudonymiser.from_settings(stack.settings)
    targets: dict[int, Target] = {}
    resting_states = []
    for first, (wait, document) in enumerate(documents.items()):
        turns = range(first, n, len(documents))
        sources = [f"{run}-{wait}-{turn:05d}" for turn in turns]
        spec, version, chosen = await seed_customers(stack.db, keys, document, sources)
        await launch(stack, spec, version, chosen)
        for turn, source, key in zip(turns, sources, chosen, strict=True):
            workflow_id = campaign_workflow_id(spec.campaign_id, key, "1")
            targets[turn] = Target(source, workflow_id, wait)
        state = CampaignState.AWAITING_APPROVAL if wait == "approval" else CampaignState.WAITING
        resting_states.append((spec.campaign_id, state, len(chosen)))
    for campaign_id, state, count in resting_states:
        await resting(stack.client, campaign_id, state, count)
    return [targets[turn] for turn in sorted(targets)]


async def resting(
    client: Client, campaign_id: str, state: CampaignState, n: int, limit: float = 900.0
) -> None:
    """Until ``n`` running campaigns of ``campaign_id`` show ``state`` in visibility."""
    query = visibility.running(
        visibility.equals(SA.CAMPAIGN_ID, campaign_id), visibility.equals(SA.CAMPAIGN_STATE, state)
    )
    deadline = time.monotonic() + limit
    while (await client.count_workflows(query)).count < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{campaign_id}: fewer than {n} campaigns reached {state}")
        await asyncio.sleep(1.0)


@dataclass(frozen=True)
class Options:
    """The sizes: revocations and events in all, and how many of each go in the burst."""

    revocations: int = 1_000
    events: int = 400
    burst: int = 200
    workers: int = 1
    postgres: bool = False


async def measured(stack: Stack, options: Options) -> dict[str, Any]:
    """Launch the campaigns, let them rest, then measure the four phases."""
    run = f"cl{uuid.uuid4().hex[:6]}"
    revoked = await waiting_campaigns(
        stack, run, {"timer": timer_spec(f"{run}_t"), "approval": approval_spec(f"{run}_a")},
        options.revocations,
    )  # fmt: skip
    bought = await waiting_campaigns(stack, run, {"event": event_spec(f"{run}_e")}, options.events)
    tokens = TokenService(stack.db)
    admin = await tokens.create("bench-dpo", ["admin"], lifetime=timedelta(hours=4), by="bench")
    ingest = await tokens.create("bench-src", ["ingest"], lifetime=timedelta(hours=4), by="bench")
    load = LoadAverage()
    sampling = asyncio.create_task(load.sample())
    limits = httpx.Limits(max_connections=IN_FLIGHT, keepalive_expiry=2.0)
    async with (
        httpx.AsyncClient(
            base_url=stack.api_url, timeout=60, limits=limits,
            headers={"Authorization": f"Bearer {admin.secret}"},
        ) as as_admin,
        httpx.AsyncClient(
            base_url=stack.api_url, timeout=60, limits=limits, auth=(ingest.secret, "")
        ) as as_source,
    ):  # fmt: skip
        pids = {name: proc.pid for name, proc in stack.processes.items()}
        pids["server"] = server_pid(stack.settings)
        phases = []
        for name, targets, http, send in (
            ("revoke", revoked, as_admin, revoke),
            ("event", bought, as_source, purchase),
        ):
            alone, burst = targets[: -options.burst], targets[-options.burst :]
            for label, part, in_flight in (("sequential", alone, 1), ("burst", burst, IN_FLIGHT)):
                phase = Phase(f"{name}_{label}", in_flight)
                phases.append(await run_phase(phase, part, stack.client, http, send, pids))
    sampling.cancel()
    return figures(phases, options, load)


class LoadAverage:
    """The machine's 1-minute load average while the phases run: first, highest, last."""

    def __init__(self) -> None:
        self.samples = [os.getloadavg()[0]]

    async def sample(self, every: float = 5.0) -> None:
        """Add a sample every ``every`` seconds until cancelled."""
        while True:
            await asyncio.sleep(every)
            self.samples.append(os.getloadavg()[0])

    def figures(self) -> dict[str, float]:
        """First, highest and last sample."""
        first, high, last = self.samples[0], max(self.samples), os.getloadavg()[0]
        return {"first": round(first, 2), "max": round(max(high, last), 2), "last": round(last, 2)}


def figures(phases: list[Phase], options: Options, load: LoadAverage) -> dict[str, Any]:
    """The JSON line: the worst phase's p50 and p99 against the target, and every phase."""
    worst = max(phases, key=lambda p: percentile(p.ms(), 0.99))
    p99 = percentile(worst.ms(), 0.99)
    expected = {"revoke": CampaignState.CONSENT_BLOCKED, "event": CampaignState.COMPLETED}
    unexpected = sum(
        count
        for p in phases
        for state, count in p.states.items()
        if state != expected[p.name.split("_")[0]]
    )
    return {
        "bench": "consent_latency",
        "ratio": round(TARGET_P99_MS / p99, 3),
        "target": 1.0,
        "p50_ms": round(percentile(worst.ms(), 0.5), 1),
        "p99_ms": round(p99, 1),
        "target_p99_ms": TARGET_P99_MS,
        "worst_phase": worst.name,
        "revocations": options.revocations,
        "events": options.events,
        "burst": options.burst,
        "unexpected_states": unexpected,
        "phases": {p.name: p.figures() for p in phases},
        "load_average": load.figures(),
    }


async def main(options: Options) -> dict[str, Any]:
    """One run in a fresh directory: dev server, sandbox CRM, API and worker processes."""
    with contextlib.ExitStack() as scope:
        root = Path(scope.enter_context(tempfile.TemporaryDirectory()))
        if options.postgres:
            scope.enter_context(bench_database(scope.enter_context(private_postgres()).url))
        crm_url = scope.enter_context(sandbox_crm(root / "crm"))
        suffix = uuid.uuid4().hex[:6]
        overrides: dict[str, Any] = {
            "api_port": free_port(),
            # Two tokens send everything: the bench measures delivery, not rate limits.
            "api_rate_per_second": 1_000_000.0,
            "api_rate_burst": 1_000_000,
            "crm_url": crm_url,
            "task_queue": f"consent-{suffix}",
            "crm_task_queue": f"consent-crm-{suffix}",
        }
        async with (
            embedded(root, **overrides) as settings,
            stack_for(settings, options.workers) as stack,
        ):
            result = await measured(stack, options)
    return result | {"database": "postgres" if options.postgres else "sqlite"}


def _report(figures: dict[str, Any]) -> str:
    lines = []
    for name, phase in figures["phases"].items():
        lines.append(
            f"{name:<18} {phase['n']:>5} at {phase['in_flight']:>2} in flight: "
            f"p50 {phase['p50_ms']} ms, p99 {phase['p99_ms']} ms, max {phase['max_ms']} ms "
            f"(API answer p50 {phase['api_p50_ms']} ms, p99 {phase['api_p99_ms']} ms; "
            f"{phase['told_at_once']} told by the request itself) {phase['states']}"
        )
        for wait, by in phase["by_wait"].items():
            lines.append(f"{'':<20}{wait}: p50 {by['p50_ms']} ms, p99 {by['p99_ms']} ms")
        lines.append(f"{'':<20}CPU ms each: {phase['cpu_ms_each']}")
    lines.append(
        f"worst phase {figures['worst_phase']}: p99 {figures['p99_ms']} ms "
        f"(target {figures['target_p99_ms']:g} ms), unexpected states "
        f"{figures['unexpected_states']}, load average {figures['load_average']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revocations", type=int, default=1_000, help="consent revocations")
    parser.add_argument("--events", type=int, default=400, help="purchases ending a wait")
    parser.add_argument(
        "--burst", type=int, default=200, help=f"of each, sent with {IN_FLIGHT} in flight"
    )
    parser.add_argument("--workers", type=int, default=1, help="`cohortflow worker` processes")
    parser.add_argument(
        "--database", choices=["sqlite", "postgres"], default="sqlite",
        help="the app database; postgres: a private cluster",
    )  # fmt: skip
    args = parser.parse_args()
    if not 0 < args.burst < min(args.revocations, args.events):
        parser.error("--burst must be above 0 and below --revocations and --events")
    options = Options(
        args.revocations, args.events, args.burst, args.workers, args.database == "postgres"
    )
    result = asyncio.run(main(options))
    print(_report(result))
    print(json.dumps(result))
