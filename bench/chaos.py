"""Crash chaos: campaigns through approvals, durable waits and CRM writes while their workers
are SIGKILLed at random moments and the Temporal server is killed and restarted once; then
every promise is checked from the outside.

The stack runs as deployments run it, each part in its own process on one machine: the
embedded dev server (SQLite file), two `cohortflow worker` processes, `cohortflow api`, and
the sandbox CRM in strict HubSpot mode (enrolments are not idempotent there, so a repeated
one is counted, never hidden). Half the campaigns are sensitive and wait for an approval,
which an approver decides over the HTTP API with its own token (one in five rejected); every
campaign scores, labels its contact, waits 2 s durably and enrols it in a sequence.
Launches trickle in while a chaos task kills a worker every 1-3 s: one kill in three waits
for a CRM request to be in flight, one for an approval decision to be in flight. Halfway,
the dev server itself is SIGKILLed and, 5 s later, started again on its database file.

Checked afterwards (:mod:`bench._chaos_checks`): each campaign ended as its spec and data say
(approved or plain: completed; rejected: rejected; no fallback), the CRM holds one
enrolment per completed campaign and none twice, the audit trail holds exactly the
approvals decided and CRM writes completed that the histories show, and `cohortflow audit
verify` passes.

    python -m bench.chaos [--campaigns 300] [--kills 12] [--seed 7]

Ends with one JSON line: bench, ratio (campaigns that ended as their spec and data say, over
all: the baseline is what the spec says, computed in the same run), target (1.0), campaigns,
terminal, duplicates, missing_audit, audit_ok, kills, server_restarts, unexpected_fallbacks
and the rest of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.service import RPCError

from bench._chaos_checks import Outcome, check
from bench.campaign_throughput import SPEC, prepared, sandbox_crm, seeded, serving
from cohortflow.campaigns.launcher import Entry, Launcher
from cohortflow.observability import configure_logging
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import free_port
from cohortflow.runtime.process import spawn, stop
from cohortflow.runtime.supervisor import child_env, cohortflow_command
from cohortflow.settings import Settings
from cohortflow.spec import CampaignSpec
from cohortflow.storage.db import Database
from cohortflow.temporal_client import connect, wait_for_pollers
from workflows.campaign.contract import campaign_workflow_id

APPROVAL_CAMPAIGN, PLAIN_CAMPAIGN = "chaos_approval", "chaos_plain"
CRM_TOKEN = "pat-chaos"
WORKERS = 2
SECONDS_PER_KILL = 2.0  # launches trickle in over about the time the kills take
SERVER_DOWN_SECONDS = 5.0  # long enough for workers, the API and launches to notice
TARGET = 1.0  # every campaign ends as its spec and data say, chaos or not

_TAIL: list[dict[str, Any]] = [
    SPEC["steps"][2],  # label the contact
    {"id": "pause", "type": "wait", "duration": "PT2S"},
    {"id": "enrol", "type": "crm", "action": "enroll_sequence", "sequence_id": "chaos"},
    {"id": "done", "type": "exit"},
]
_SCORE = {"id": "score", "type": "score", "models": ["churn"]}
PLAIN: dict[str, Any] = {**SPEC, "campaign_id": PLAIN_CAMPAIGN, "steps": [_SCORE, *_TAIL]}
APPROVAL: dict[str, Any] = {
    **SPEC,
    "campaign_id": APPROVAL_CAMPAIGN,
    "sensitive": True,
    "steps": [_SCORE, {"id": "approve", "type": "approval", "reason": "chaos"}, *_TAIL],
}


def rejected(customer_key: str) -> bool:
    """Whether the approver rejects this customer's request: one in five, by key."""
    return hashlib.sha256(customer_key.encode()).digest()[0] % 5 == 0


@dataclass
class Stack:
    """The processes of one chaos run, which the chaos kills and starts again."""

    settings: Settings
    server: DevServer
    crm_url: str
    api_url: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_workers: int = 0

    def start_worker(self, slot: int) -> None:
        """A new `cohortflow worker` process in ``slot`` (appended when the slot is new)."""
        self.started_workers += 1
        log = self.settings.data_dir / f"worker-{self.started_workers}.log"
        proc = spawn(cohortflow_command("worker"), env=child_env(self.settings), log_path=log)
        if slot < len(self.workers):
            self.workers[slot] = proc
        else:
            self.workers.append(proc)


@dataclass
class Activity:
    """What is in flight, as the chaos task reads it before choosing when to kill."""

    decisions_in_flight: int = 0
    crm_requests: int = 0
    crm_changed_at: float = 0.0

    def crm_busy(self) -> bool:
        """A CRM request was answered within the last half second."""
        return time.monotonic() - self.crm_changed_at < 0.5

    def ready_for(self, aim: str) -> bool:
        """Whether now is the moment a kill aimed at ``aim`` waits for."""
        if aim == "crm":
            return self.crm_busy()
        return aim != "decision" or self.decisions_in_flight > 0


@dataclass
class Tally:
    """What the chaos did and what the approver saw."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    server_restarts: int = 0
    server_down_s: float = 0.0
    decisions: int = 0
    decision_retries: int = 0
    decision_statuses: dict[str, int] = field(default_factory=dict)
    launch_retries: int = 0


async def watch_crm(crm_url: str, activity: Activity, done: asyncio.Event) -> None:
    """Keep ``activity``'s view of the CRM's request count fresh until ``done``."""
    async with httpx.AsyncClient(base_url=crm_url, timeout=5) as http:
        while not done.is_set():
            with contextlib.suppress(httpx.HTTPError):
                total = int((await http.get("/_sandbox/stats")).json()["total"])
                if total != activity.crm_requests:
                    activity.crm_requests, activity.crm_changed_at = total, time.monotonic()
            await asyncio.sleep(0.1)


async def chaos(
    stack: Stack, kills: int, rng: random.Random, activity: Activity, tally: Tally
) -> None:
    """SIGKILL a worker ``kills`` times at random moments, a third of them while a CRM request
    is in flight and a third while a decision is; halfway, kill and restart the server."""
    for k in range(kills):
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        aim = ("crm", "decision", "any")[k % 3]
        for _ in range(750):  # up to 15 s for the moment aimed at
            if activity.ready_for(aim):
                break
            await asyncio.sleep(0.02)
        slot = rng.randrange(len(stack.workers))
        victim = stack.workers[slot]
        tally.kills.append(
            {
                "aim": aim,
                "crm_busy": activity.crm_busy(),
                "decisions_in_flight": activity.decisions_in_flight,
            }
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        stack.start_worker(slot)
        if k == kills // 2:
            await restart_server(stack, tally)


async def restart_server(stack: Stack, tally: Tally) -> None:
    """SIGKILL the dev server, as a crash would, and start it again on the same file."""
    proc = stack.server.proc
    assert proc is not None
    began = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stack.server.proc = None
    await asyncio.sleep(SERVER_DOWN_SECONDS)
    await stack.server.start()
    tally.server_restarts += 1
    tally.server_down_s = round(time.monotonic() - began, 1)


async def launch_all(
    client: Client, db: Database, settings: Settings, entries: list[tuple[CampaignSpec, int, str]],
    seconds: float, tally: Tally,
) -> None:  # fmt: skip
    """Launch every entry, spread over ``seconds``; a launch the server refuses while it is
    down is repeated (the launcher dedupes on the workflow id)."""
    launcher = Launcher(client, db, settings)
    gap = seconds / max(len(entries), 1)
    for spec, version, key in entries:
        while True:
            try:
                await launcher.launch(spec, version, Entry(key, "chaos"))
                break
            except RPCError:  # the server is down: wait for it
                tally.launch_retries += 1
                await asyncio.sleep(0.5)
        await asyncio.sleep(gap)


async def approve_over_api(
    api_url: str, token: str, expected: int, activity: Activity, tally: Tally
) -> None:
    """Decide every approval request as the approver, over the API, until ``expected`` have
    been decided: each repeated on 503 or a lost connection until it answers."""
    started: set[str] = set()
    tasks: list[asyncio.Task[None]] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60) as http:
        while tally.decisions < expected:
            with contextlib.suppress(httpx.HTTPError):
                listed = await http.get("/v1/approvals", params={"campaign_id": APPROVAL_CAMPAIGN})
                for row in listed.json() if listed.status_code == 200 else []:
                    if row["approval_id"] not in started:
                        started.add(row["approval_id"])
                        tasks.append(asyncio.create_task(decide(http, row, activity, tally)))
            await asyncio.sleep(0.3)
            for task in tasks:
                if task.done():
                    task.result()  # a decision that failed for good ends the run
        await asyncio.gather(*tasks)


async def decide(
    http: httpx.AsyncClient, row: dict[str, Any], activity: Activity, tally: Tally
) -> None:
    """One decision, repeated until the API answers it; a 409 or other 4xx is a failure."""
    body = {
        "decision": "reject" if rejected(row["customer_key"]) else "approve",
        "reason": "chaos",
    }
    while True:
        activity.decisions_in_flight += 1
        try:
            answer = await http.post(f"/v1/approvals/{row['approval_id']}/decision", json=body)
        except httpx.HTTPError:
            answer = None
        finally:
            activity.decisions_in_flight -= 1
        status = "lost" if answer is None else str(answer.status_code)
        tally.decision_statuses[status] = tally.decision_statuses.get(status, 0) + 1
        if answer is not None and answer.status_code == 200:
            tally.decisions += 1
            return
        if answer is not None and answer.status_code != 503:
            raise RuntimeError(f"decision {row['approval_id']}: {answer.status_code} {answer.text}")
        tally.decision_retries += 1
        await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def running_stack(root: Path) -> AsyncIterator[Stack]:
    """The dev server, the sandbox CRM (strict HubSpot mode), the API and the workers."""
    settings = await prepared(root)
    server = DevServer(settings)
    await server.start()
    crm = {"crm_sandbox_mode": "hubspot", "crm_token": CRM_TOKEN}
    with sandbox_crm(root, **crm) as crm_url:
        settings = settings.model_copy(
            update={
                "crm_kind": "hubspot",
                "crm_url": crm_url,
                "crm_token": SecretStr(CRM_TOKEN),
                "crm_user_id": "1",
                "crm_sender_email": "chaos@example.com",
                "api_port": free_port(),
            }
        )
        stack = Stack(settings, server, crm_url, f"http://127.0.0.1:{settings.api_port}")
        with serving("api", settings, stack.api_url, root / "api.log"):
            try:
                for slot in range(WORKERS):
                    stack.start_worker(slot)
                yield stack
            finally:
                for proc in stack.workers:
                    stop(proc)
                server.stop()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """A `cohortflow` command against the run's data dir and database."""
    return subprocess.run(
        cohortflow_command(*args),
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def run(campaigns: int, kills: int, seed: int, root: Path) -> dict[str, Any]:
    """One chaos run under ``root``; the figures."""
    rng = random.Random(seed)
    tally, activity, done = Tally(), Activity(), asyncio.Event()
    async with running_stack(root) as stack:
        settings = stack.settings
        db = Database(settings.resolved_database_url)
        client = await connect(settings, tracing=False)
        await wait_for_pollers(client, settings.task_queue, WORKERS, limit_seconds=120)
        made = cli(settings, "token", "create", "--name", "chaos-approver", "--role", "approver")
        assert made.returncode == 0, made.stderr
        plain_n = campaigns // 2
        entries = await _entries(db, campaigns, plain_n, rng)
        started = time.monotonic()
        crm_watch = asyncio.create_task(watch_crm(stack.crm_url, activity, done))
        await asyncio.gather(
            launch_all(client, db, settings, entries, kills * SECONDS_PER_KILL, tally),
            chaos(stack, kills, rng, activity, tally),
            approve_over_api(
                stack.api_url, made.stdout.strip(), campaigns - plain_n, activity, tally
            ),
        )
        workflow_ids = [
            campaign_workflow_id(spec.campaign_id, key, "1") for spec, _, key in entries
        ]
        expected = {
            campaign_workflow_id(spec.campaign_id, key, "1"): Outcome.of(
                spec.campaign_id == APPROVAL_CAMPAIGN, rejected(key)
            )
            for spec, _, key in entries
        }
        figures = await check(client, db, stack.crm_url, expected)
        elapsed = time.monotonic() - started
        done.set()
        await crm_watch
        verified = cli(settings, "audit", "verify")
        await db.dispose()
    assert len(workflow_ids) == campaigns
    return {
        "bench": "chaos",
        "ratio": round(figures["terminal"] / figures["campaigns"], 3),
        "target": TARGET,
        **figures,
        "audit_ok": verified.returncode == 0,
        "audit_verify": verified.stdout.strip() or verified.stderr.strip()[-300:],
        "kills": len(tally.kills),
        "kills_during_crm_requests": sum(k["crm_busy"] for k in tally.kills),
        "kills_during_decisions": sum(k["decisions_in_flight"] > 0 for k in tally.kills),
        "server_restarts": tally.server_restarts,
        "server_down_s": tally.server_down_s,
        "decisions": tally.decisions,
        "decision_answers": tally.decision_statuses,
        "launch_retries": tally.launch_retries,
        "seconds": round(elapsed, 1),
        "seed": seed,
    }


async def _entries(
    db: Database, campaigns: int, plain_n: int, rng: random.Random
) -> list[tuple[CampaignSpec, int, str]]:
    """The campaigns' entries (spec, version, customer key), plain and approval mixed."""
    entries = []
    for document, n in ((PLAIN, plain_n), (APPROVAL, campaigns - plain_n)):
        spec, version, keys = await seeded(db, document, n)
        entries += [(spec, version, key) for key in keys]
    rng.shuffle(entries)
    return entries


async def main(campaigns: int, kills: int, seed: int) -> dict[str, Any]:
    """A chaos run in a fresh directory."""
    with tempfile.TemporaryDirectory() as tmp:
        return await run(campaigns, kills, seed, Path(tmp))


if __name__ == "__main__":
    configure_logging("console", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=300)
    parser.add_argument("--kills", type=int, default=12, help="worker SIGKILLs")
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    args = parser.parse_args()
    figures = asyncio.run(main(args.campaigns, args.kills, args.seed))
    print(
        f"{figures['campaigns']} campaigns, {figures['kills']} worker kills, "
        f"{figures['server_restarts']} server restart: {figures['terminal']} ended as their "
        f"spec says, {figures['unexpected_fallbacks']} unexpected fallbacks, "
        f"{figures['duplicates']} duplicate CRM effects, {figures['missing_audit']} audit rows "
        f"missing, audit verify {'ok' if figures['audit_ok'] else 'FAILED'}"
    )
    print(json.dumps(figures))
