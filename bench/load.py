"""Steady load: events through the API process while campaigns wait for them, optionally with
the app database taken away mid-run.

A `cohortflow api` process takes `--rate` events a second for `--seconds` over HTTP (Segment's
`/v1/batch`, an ingest token as the write key, `--batch` events a request). Meanwhile
`--campaigns` campaigns launched at the start wait for their customers' purchases (the
events signal them through the outbox relay) and for timers, run by `cohortflow worker`
processes against the sandbox CRM in HubSpot mode, where enrolments are not idempotent, so a
repeated write shows. A tenth of the customers are in a campaign; one event in 20 is a
purchase.

    python -m bench.load                              # 50 events/s for 10 minutes, SQLite
    python -m bench.load --seconds 120 --db-outage 30 # a private PostgreSQL stopped mid-run

`--db-outage S` (or `--database postgres`) runs the app database on a private PostgreSQL
cluster; the outage stops it for S seconds around the moment the campaigns' first waits end,
so CRM writes and their ledger are due while it is away. A 503 with Retry-After is then the
answer we expect: the sender waits as told and sends the same events again.

Reported: errors (any other non-2xx), p50/p99 latency of the answered requests, RSS of the
API and worker processes when the load starts, half-way and at the end, events stored against
events sent, the outbox's backlog and lag when the load stops, how the campaigns ended,
activities retried, CRM effects against our ledger (with the duplicates the CRM counted), and
`cohortflow audit verify`. The ratio is events answered 2xx per second over `--rate`: the
sender keeps to the schedule with at most 64 requests in flight, so an API that falls behind
shows as a ratio under 1. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy import func, select
from temporalio.client import Client, WorkflowExecutionStatus

from bench._private_postgres import PrivatePostgres, private_postgres
from bench.campaign_throughput import embedded, sandbox_crm
from cohortflow.auth.tokens import TokenService
from cohortflow.campaigns.launcher import Entry, Launcher
from cohortflow.observability import configure_logging
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.ports import free_port
from cohortflow.runtime.process import spawn, stop, tail
from cohortflow.runtime.supervisor import child_env, cohortflow_command
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage import campaigns, consent, customers
from cohortflow.storage.db import Database
from cohortflow.storage.tables import CrmEffect, Event
from cohortflow.temporal_client import connect, wait_for_pollers
from workflows.campaign.contract import SA

TARGET = 0.98  # events answered 2xx per second over the rate asked for
IN_FLIGHT = 64
CRM_TOKEN = "pat-bench"
CAMPAIGN_SHARE = 10  # one customer in this many is in a campaign
PURCHASE_SHARE = 0.05


def load_spec(campaign_id: str, wait_seconds: int) -> dict[str, Any]:
    """Label the contact, wait for a purchase (thank-you enrolment) or the timeout (a list
    add, then one more wait), as the onboarding drip does with shorter waits."""
    wait = f"PT{wait_seconds}S"
    return {
        "campaign_id": campaign_id,
        "name": "Load bench campaign",
        "owner": "bench",
        "entry_cohort": "load",
        "safe_default_segment": "nurture_default",
        "exit_on_cohort_exit": False,
        "steps": [
            {"id": "label", "type": "crm", "action": "set_properties",
             "properties": {"cohort_label": "{cohort}"}},
            {"id": "first", "type": "wait", "event": "purchase", "timeout": wait,
             "on_event": "thank", "on_timeout": "nudge"},
            {"id": "nudge", "type": "crm", "action": "add_to_list", "list_id": "4711"},
            {"id": "last", "type": "wait", "event": "purchase", "timeout": wait,
             "on_event": "thank", "on_timeout": "lapsed"},
            {"id": "lapsed", "type": "exit", "outcome": "completed"},
            {"id": "thank", "type": "crm", "action": "enroll_sequence", "sequence_id": "thanks"},
            {"id": "done", "type": "exit"},
        ],
    }  # fmt: skip


@dataclass
class Tally:
    """What the sender saw: latencies of answered requests, and everything else."""

    latencies: list[float] = field(default_factory=list)
    answered: int = 0  # events in 2xx answers
    duplicates: int = 0  # of those, already stored (a retry after a cut commit)
    errors: Counter[str] = field(default_factory=Counter)
    unavailable: list[float] = field(default_factory=list)  # when 503 + Retry-After came


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def rss_mb(pid: int) -> float:
    """A process's resident set (``VmRSS`` in /proc/<pid>/status), in MB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


class Sender:
    """Posts the events on schedule, at most ``IN_FLIGHT`` requests at once."""

    def __init__(self, url: str, token: str, run: str, users: list[str], seed: int) -> None:
        self.url, self.token, self.run, self.users = url, token, run, users
        self.random = random.Random(seed)
        self.tally = Tally()
        self.sent = 0

    def _event(self, index: int) -> dict[str, Any]:
        user = self.random.choice(self.users)
        event: dict[str, Any] = {
            "type": "track",
            "event": "page_view",
            "messageId": f"{self.run}-{index:08d}",
            "userId": user,
            "timestamp": datetime.now(UTC).isoformat(),
            "properties": {"path": "/offers"},
        }
        if self.random.random() < PURCHASE_SHARE:
            event |= {"event": "purchase", "properties": {"amount": 25.0}}
        return event

    async def _post(self, http: httpx.AsyncClient, batch: list[dict[str, Any]], wait: bool) -> None:
        """Post until answered 2xx; a 503 with Retry-After is waited out when ``wait``."""
        while True:
            started = time.perf_counter()
            body = {"batch": batch, "sentAt": datetime.now(UTC).isoformat()}
            try:
                answer = await http.post("/v1/batch", json=body)
            except httpx.HTTPError as exc:
                self.tally.errors[type(exc).__name__] += 1
                return
            if answer.is_success:
                self.tally.latencies.append(time.perf_counter() - started)
                self.tally.answered += len(batch)
                self.tally.duplicates += int(answer.json()["duplicates"])
                return
            if wait and answer.status_code == 503 and "Retry-After" in answer.headers:
                self.tally.unavailable.append(time.monotonic())
                await asyncio.sleep(float(answer.headers["Retry-After"]))
                continue
            self.tally.errors[f"HTTP {answer.status_code}"] += 1
            return

    async def drive(self, rate: float, seconds: float, batch: int, wait_out_503: bool) -> float:
        """Send ``rate * seconds`` events in batches of ``batch`` on schedule; seconds taken
        from the first request to the last answer."""
        requests = round(rate * seconds / batch)
        gate = asyncio.Semaphore(IN_FLIGHT)
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends, so a request
        # never goes out on a connection the server is closing (a ReadError, not an answer).
        limits = httpx.Limits(
            max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT, keepalive_expiry=2.0
        )
        async with httpx.AsyncClient(
            base_url=self.url, auth=(self.token, ""), timeout=60, limits=limits
        ) as http:
            tasks: set[asyncio.Task[None]] = set()
            started = time.perf_counter()
            for n in range(requests):
                delay = started + n * batch / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await gate.acquire()  # the API is behind: the schedule slips, the ratio shows
                events = [self._event(self.sent + i) for i in range(batch)]
                self.sent += batch
                task = asyncio.create_task(self._post(http, events, wait_out_503))
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: gate.release())
                tasks.add(task)
            await asyncio.gather(*tasks)
            return time.perf_counter() - started


class Memory:
    """RSS of each process when the load starts, half-way, at the end, and at its peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.marks: dict[str, dict[str, float]] = {name: {} for name in pids}

    def mark(self, label: str) -> None:
        """Read every process's RSS now as ``label``."""
        for name, pid in self.pids.items():
            value = rss_mb(pid)
            self.marks[name][label] = round(value, 1)
            self.marks[name]["peak"] = max(self.marks[name].get("peak", 0.0), round(value, 1))

    async def watch(self, seconds: float, every: float = 5.0) -> None:
        """Mark ``start`` now, ``half`` half-way and the peak every ``every`` seconds."""
        self.mark("start")
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < seconds:
            await asyncio.sleep(min(every, seconds - elapsed))
            if "half" not in self.marks[next(iter(self.pids))] and elapsed >= seconds / 2:
                self.mark("half")
            else:
                self.mark("peak-sample")

    def figures(self) -> dict[str, dict[str, float]]:
        """Per process: start, half, end, peak and growth (end minus start) in MB."""
        out = {}
        for name, marks in self.marks.items():
            kept = {k: v for k, v in marks.items() if k != "peak-sample"}
            kept["growth"] = round(marks.get("end", 0.0) - marks.get("start", 0.0), 1)
            out[name] = kept
        return out


@dataclass
class Outage:
    """When the database went away and came back, seconds after the load started."""

    at: float
    seconds: float
    down: float = 0.0
    up: float = 0.0

    async def run(self, cluster: PrivatePostgres, started: float) -> None:
        """Stop ``cluster`` at ``at`` seconds for ``seconds``, then start it again."""
        await asyncio.sleep(self.at)
        await asyncio.to_thread(cluster.stop)
        self.down = time.monotonic() - started
        await asyncio.sleep(self.seconds)
        await asyncio.to_thread(cluster.start)
        self.up = time.monotonic() - started


@dataclass
class Stack:
    """The processes under load and what the bench needs to reach them."""

    settings: Settings
    db: Database
    client: Client
    api_url: str
    processes: dict[str, subprocess.Popen[bytes]]


@contextlib.contextmanager
def processes(settings: Settings, workers: int) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """`cohortflow api` and ``workers`` `cohortflow worker` processes, stopped after."""
    root, env = settings.data_dir, child_env(settings)
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        started["api"] = spawn(cohortflow_command("api"), env=env, log_path=root / "api.log")
        for i in range(workers):
            command = cohortflow_command("worker")
            started[f"worker-{i}"] = spawn(command, env=env, log_path=root / f"worker-{i}.log")
        yield started
    finally:
        for proc in reversed(started.values()):
            stop(proc)


async def wait_healthy(stack: Stack, limit: float = 90.0) -> None:
    """Until the API answers /healthz and every worker polls its queue."""
    deadline = time.monotonic() + limit
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=5) as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/healthz")).is_success:
                    break
            if stack.processes["api"].poll() is not None or time.monotonic() > deadline:
                log = tail(stack.settings.data_dir / "api.log")
                raise RuntimeError(f"the API did not start:\n{log}")
            await asyncio.sleep(0.2)
    workers = len(stack.processes) - 1
    await wait_for_pollers(stack.client, stack.settings.task_queue, workers, limit_seconds=limit)


async def seed(
    db: Database, keys: Pseudonymiser, document: dict[str, Any], users: list[str]
) -> tuple[CampaignSpec, int, list[str]]:
    """The campaign's spec, and its customers (the first tenth of ``users``) stored with
    e-mail marketing consent; the spec, its version and the campaign customers' keys."""
    return await seed_customers(db, keys, document, users[: len(users) // CAMPAIGN_SHARE])


async def seed_customers(
    db: Database, keys: Pseudonymiser, document: dict[str, Any], sources: list[str]
) -> tuple[CampaignSpec, int, list[str]]:
    """The campaign's spec applied, and a customer of each source id in ``sources`` stored
    with e-mail marketing consent; the spec, its version and the customers' keys."""
    spec = CampaignSpec.model_validate(document)
    chosen = [keys.customer_key(u) for u in sources]
    async with db.transaction() as session:
        version, _ = await campaigns.save_spec_version(
            session, spec.campaign_id, spec.model_dump(mode="json"), created_by="bench"
        )
        await customers.upsert_customers(
            session,
            [customers.CustomerRecord(k, u, None) for k, u in zip(chosen, sources, strict=True)],
        )
        await consent.bulk_set_consent(
            session, [(k, "email", "marketing", True) for k in chosen], source="bench"
        )
    return spec, version, chosen


async def launch(stack: Stack, spec: CampaignSpec, version: int, keys: list[str]) -> None:
    """Launch the campaign for every key, as a cohort's entries would be."""
    launcher = Launcher(stack.client, stack.db, stack.settings)
    gate = asyncio.Semaphore(32)

    async def one(key: str) -> None:
        async with gate:
            await launcher.launch(spec, version, Entry(key, spec.entry_cohort))

    await asyncio.gather(*(one(k) for k in keys))


async def outbox(api_url: str) -> tuple[int, float]:
    """Signals the outbox owes and the age of the oldest, from the API's /metrics."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        text = (await http.get("/metrics")).raise_for_status().text
    values = dict(re.findall(r"^(cohortflow_signal\w+) (\S+)$", text, re.MULTILINE))
    return int(float(values["cohortflow_signals_owed"])), float(
        values["cohortflow_signal_outbox_lag_seconds"]
    )


async def drained(api_url: str, limit: float) -> float | None:
    """Seconds until the outbox owes nothing (None if it still does after ``limit``)."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if (await outbox(api_url))[0] == 0:
            return round(time.monotonic() - began, 1)
        await asyncio.sleep(1)
    return None


async def settled(client: Client, campaign_id: str, limit: float) -> dict[str, Any]:
    """Wait up to ``limit`` seconds for every campaign to close; how they ended and how many
    of their activities needed more than one attempt."""
    query = f'CampaignId = "{campaign_id}"'
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (await client.count_workflows(f"{query} AND ExecutionStatus = 'Running'")).count == 0:
            break
        await asyncio.sleep(2)
    states: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    retried = 0
    async for execution in client.list_workflows(query):
        attributes = execution.typed_search_attributes
        running = execution.status == WorkflowExecutionStatus.RUNNING
        states["running" if running else attributes.get(SA.CAMPAIGN_STATE) or "?"] += 1
        if reason := attributes.get(SA.FALLBACK_REASON):
            fallbacks[reason] += 1
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        async for event in handle.fetch_history_events():
            if event.HasField("activity_task_started_event_attributes"):
                retried += event.activity_task_started_event_attributes.attempt > 1
    return {"states": dict(states), "fallbacks": dict(fallbacks), "retried": retried}


async def crm_figures(stack: Stack) -> dict[str, Any]:
    """Our ledger of confirmed CRM effects by action, and what the CRM itself holds."""
    async with stack.db.read_transaction() as session:
        rows = await session.execute(
            select(CrmEffect.action, func.count()).group_by(CrmEffect.action)
        )
        ledger = {action: count for action, count in rows}
    async with httpx.AsyncClient(timeout=60) as http:
        effects = (await http.get(f"{stack.settings.crm_url}/_sandbox/effects")).json()
    return {
        "ledger": ledger,
        "crm_enrolments": sum(e["count"] for e in effects["enrollments"]),
        "crm_list_adds": sum(m["adds"] for m in effects["list_memberships"]),
        "duplicate_enrolments": effects["duplicate_enrollments"],
        "duplicate_list_adds": effects["duplicate_list_adds"],
    }


async def stored(db: Database, run: str) -> int:
    """Events of this run in the store."""
    async with db.read_transaction() as session:
        count = await session.scalar(
            select(func.count()).select_from(Event).where(Event.message_id.like(f"{run}-%"))
        )
    return int(count or 0)


def audit_verify(settings: Settings) -> tuple[bool, str]:
    """`cohortflow audit verify` against the run's database: passed, and what it said."""
    done = subprocess.run(
        cohortflow_command("audit", "verify"),
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode == 0, (done.stdout or done.stderr).strip().splitlines()[-1]


@dataclass(frozen=True)
class Options:
    """One run: the load, the campaigns, and the database (and its outage, in seconds)."""

    rate: float = 50.0
    seconds: float = 600.0
    batch: int = 1
    campaigns: int = 200
    workers: int = 1
    db_outage: float = 0.0
    postgres: bool = False
    seed: int = 0


async def under_load(
    stack: Stack, options: Options, cluster: PrivatePostgres | None
) -> dict[str, Any]:
    """Launch the campaigns, send the load (taking the database away if asked), let the
    campaigns finish; the figures."""
    run = f"load_{uuid.uuid4().hex[:8]}"
    users = [f"{run}-user-{i:05d}" for i in range(options.campaigns * CAMPAIGN_SHARE)]
    # The first waits end a little before half-way, the second ones near the end.
    wait = max(5, round(options.seconds * 0.45))
    keys = Pseudonymiser.from_settings(stack.settings)
    spec, version, chosen = await seed(stack.db, keys, load_spec(run, wait), users)
    issued = await TokenService(stack.db).create(
        "bench-load", ["ingest"], lifetime=timedelta(hours=12), by="bench"
    )
    await launch(stack, spec, version, chosen)
    sender = Sender(stack.api_url, issued.secret, run, users, options.seed)
    memory = Memory({name: proc.pid for name, proc in stack.processes.items()})
    started = time.monotonic()
    outage = Outage(max(5.0, wait - options.db_outage / 2), options.db_outage)
    jobs = [asyncio.create_task(memory.watch(options.seconds))]
    if cluster is not None and options.db_outage:
        jobs.append(asyncio.create_task(outage.run(cluster, started)))
    elapsed = await sender.drive(
        options.rate, options.seconds, options.batch, bool(options.db_outage)
    )
    await asyncio.gather(*jobs)
    memory.mark("end")
    owed, lag = await outbox(stack.api_url)
    figures: dict[str, Any] = {
        "outbox_owed_at_end": owed,
        "outbox_lag_s_at_end": round(lag, 2),
        "outbox_drained_s": await drained(stack.api_url, 120),
        **load_figures(sender, elapsed, options),
        **memory_figures(memory),
    }
    ended = await settled(stack.client, spec.campaign_id, limit=2 * wait + 240)
    ok, said = await asyncio.to_thread(audit_verify, stack.settings)
    figures |= {
        "events_stored": await stored(stack.db, run),
        "campaigns": options.campaigns,
        "campaign_states": ended["states"],
        "fallbacks": sum(ended["fallbacks"].values()),
        "fallback_reasons": ended["fallbacks"],
        "activities_retried": ended["retried"],
        **await crm_figures(stack),
        "audit_ok": ok,
        "audit": said,
        "processes_alive": all(proc.poll() is None for proc in stack.processes.values()),
    }
    if cluster is not None and options.db_outage:
        figures["db_outage"] = outage_figures(outage, sender.tally, started)
    return figures


def load_figures(sender: Sender, elapsed: float, options: Options) -> dict[str, Any]:
    """What the sender saw: rate achieved, errors, latencies."""
    tally = sender.tally
    achieved = tally.answered / elapsed
    return {
        "bench": "load",
        "ratio": round(achieved / options.rate, 3),
        "target": TARGET,
        "rate": options.rate,
        "seconds": options.seconds,
        "batch": options.batch,
        "achieved_events_per_s": round(achieved, 2),
        "events_sent": sender.sent,
        "events_answered": tally.answered,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "unavailable_503": len(tally.unavailable),
        "duplicates_answered": tally.duplicates,
        "p50_ms": round(percentile(tally.latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(tally.latencies, 0.99) * 1000, 1),
        "max_ms": round(max(tally.latencies, default=0.0) * 1000, 1),
    }


def memory_figures(memory: Memory) -> dict[str, Any]:
    """RSS per process, and the API's and the largest worker growth."""
    rss = memory.figures()
    workers = [v["growth"] for k, v in rss.items() if k != "api"]
    return {
        "rss_mb": rss,
        "api_rss_growth_mb": rss["api"]["growth"],
        "worker_rss_growth_mb": max(workers, default=0.0),
    }


def outage_figures(outage: Outage, tally: Tally, started: float) -> dict[str, Any]:
    """When the database was away, and when the API answered 503 (seconds into the load)."""
    seen = [round(t - started, 1) for t in tally.unavailable]
    return {
        "seconds": outage.seconds,
        "down_at_s": round(outage.down, 1),
        "up_at_s": round(outage.up, 1),
        "first_503_s": min(seen, default=None),
        "last_503_s": max(seen, default=None),
    }


@contextlib.contextmanager
def bench_database(url: str | None) -> Iterator[None]:
    """``BENCH_DATABASE_URL`` (how `embedded` is told where the app database is) set to
    ``url`` for the block, when given."""
    if url is None:
        yield
        return
    before = os.environ.get("BENCH_DATABASE_URL")
    os.environ["BENCH_DATABASE_URL"] = url
    try:
        yield
    finally:
        if before is None:
            del os.environ["BENCH_DATABASE_URL"]
        else:
            os.environ["BENCH_DATABASE_URL"] = before


@contextlib.asynccontextmanager
async def stack_for(settings: Settings, workers: int) -> AsyncIterator[Stack]:
    """The API and worker processes on ``settings``, healthy, with a client and database."""
    # Made here first, so the processes read this key file rather than race to create one.
    Pseudonymiser.from_settings(settings)
    db = Database(settings.resolved_database_url)
    client = await connect(settings, tracing=False)
    try:
        with processes(settings, workers) as procs:
            stack = Stack(settings, db, client, f"http://127.0.0.1:{settings.api_port}", procs)
            await wait_healthy(stack)
            yield stack
    finally:
        await db.dispose()


async def main(options: Options) -> dict[str, Any]:
    """One run in a fresh directory; the figures."""
    postgres = options.postgres or options.db_outage > 0
    with contextlib.ExitStack() as scope:
        root = Path(scope.enter_context(tempfile.TemporaryDirectory()))
        cluster = scope.enter_context(private_postgres()) if postgres else None
        scope.enter_context(bench_database(cluster.url if cluster else None))
        crm = {"crm_sandbox_mode": "hubspot", "crm_token": CRM_TOKEN}
        crm_url = scope.enter_context(sandbox_crm(root / "crm", **crm))
        suffix = uuid.uuid4().hex[:6]
        overrides: dict[str, Any] = {
            "api_port": free_port(),
            # One token sends everything: the bench measures the API, not its per-token limit.
            "api_rate_per_second": 1_000_000.0,
            "api_rate_burst": 1_000_000,
            "crm_kind": "hubspot",
            "crm_url": crm_url,
            "crm_token": SecretStr(CRM_TOKEN),
            "crm_user_id": "1",
            "crm_sender_email": "bench@example.com",
            "crm_rate_limit": 1_000_000,
            "task_queue": f"load-{suffix}",
            "crm_task_queue": f"load-crm-{suffix}",
        }
        async with (
            embedded(root, **overrides) as settings,
            stack_for(settings, options.workers) as stack,
        ):
            figures = await under_load(stack, options, cluster)
    figures["database"] = "postgres" if postgres else "sqlite"
    return figures


def _report(figures: dict[str, Any]) -> str:
    lines = [
        f"{figures['events_answered']} of {figures['events_sent']} events answered 2xx in "
        f"{figures['seconds']:g} s ({figures['achieved_events_per_s']}/s of {figures['rate']:g}"
        f"/s asked), {figures['errors']} errors {figures['error_kinds']}, "
        f"{figures['unavailable_503']} answered 503 + Retry-After",
        f"latency p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
        f"max {figures['max_ms']} ms",
        f"events stored {figures['events_stored']}; outbox at the end: "
        f"{figures['outbox_owed_at_end']} owed, lag {figures['outbox_lag_s_at_end']} s, "
        f"drained after {figures['outbox_drained_s']} s",
        *(f"RSS {name} (MB): {marks}" for name, marks in figures["rss_mb"].items()),
        f"campaigns {figures['campaign_states']}, fallbacks {figures['fallbacks']}, "
        f"activities retried {figures['activities_retried']}",
        f"CRM ledger {figures['ledger']}; CRM enrolments {figures['crm_enrolments']}, list "
        f"adds {figures['crm_list_adds']}, duplicates {figures['duplicate_enrolments']} + "
        f"{figures['duplicate_list_adds']}",
        f"audit verify: {figures['audit']}",
    ]
    if "db_outage" in figures:
        lines.append(f"database outage: {figures['db_outage']}")
    return "\n".join(lines)


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="events a second")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the load lasts")
    parser.add_argument("--batch", type=int, default=1, help="events a request")
    parser.add_argument("--campaigns", type=int, default=200, help="campaigns launched at start")
    parser.add_argument("--workers", type=int, default=1, help="`cohortflow worker` processes")
    parser.add_argument(
        "--db-outage", type=float, default=0.0, help="stop PostgreSQL this many seconds mid-run"
    )
    parser.add_argument(
        "--database", choices=["sqlite", "postgres"], default="sqlite",
        help="postgres: a private cluster (implied by --db-outage)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = Options(
        rate=args.rate, seconds=args.seconds, batch=args.batch, campaigns=args.campaigns,
        workers=args.workers, db_outage=args.db_outage, postgres=args.database == "postgres",
        seed=args.seed,
    )  # fmt: skip
    result = asyncio.run(main(options))
    print(_report(result))
    print(json.dumps(result))
