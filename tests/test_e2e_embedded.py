"""Issue 3's "How it will be checked", as one test of the real commands on free ports.

`cohortflow demo --no-serve --json` on a fresh data dir; then `cohortflow up` on it: its
counts match `temporal workflow count`, an approval from the CLI completes its campaign with
one CRM record, `kill -9` of `up` mid-wait leaves no process and a new `up` finishes the
campaign, the audit chain verifies, and SIGINT leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from temporalio.client import Client

from cohortflow.runtime.binaries import temporal_cli
from cohortflow.runtime.ports import ensure_free, free_port
from workflows.messages import SUMMARY_STATES, CampaignState, CampaignStatus

pytestmark = [pytest.mark.e2e, pytest.mark.devserver, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = "demo_winback"
WAIT_SECONDS = 4


def env() -> dict[str, str]:
    """Our environment without any COHORTFLOW_ setting: only options configure the run."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COHORTFLOW_")}
    return {**clean, "PYTHONPATH": str(REPO), "COLUMNS": "250"}


def cohortflow(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohortflow", *map(str, args)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
    )


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rpartition(")")[2].split()[1]
                )
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return {p for p in found if alive(p)}


def processes_naming(data_dir: Path) -> list[int]:
    """Live processes whose command line or environment names the data dir."""
    needle = str(data_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            named = needle in (entry / "cmdline").read_bytes()
            named = named or needle in (entry / "environ").read_bytes()
            if named and alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


class Up:
    """A `cohortflow up` child process and its log."""

    def __init__(self, data_dir: Path, ports: list[str], log: Path) -> None:
        self.log_path = log
        self._log: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cohortflow", "up", "--data-dir", str(data_dir), *ports],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env(),
        )

    def wait_ready(self, api_url: str) -> set[int]:
        """Wait for "ready" and a healthy API; returns the pids of the stack's processes."""

        def ready() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            if "ready; Ctrl-C" not in self.log_path.read_text():
                return False
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{api_url}/healthz", timeout=2).is_success
            return False

        wait_until(ready, 90, "cohortflow up to be ready")
        children = descendants(self.proc.pid)
        assert len(children) >= 4, children  # dev server, CRM sandbox, API, worker
        return children

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def up(data_dir: Path, ports: list[str], log: Path) -> Iterator[Up]:
    process = Up(data_dir, ports, log)
    try:
        yield process
    finally:
        leftovers = descendants(process.proc.pid) if process.proc.poll() is None else set()
        process.close()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def temporal_count(address: str, query: str) -> int:
    done = subprocess.run(
        [str(temporal_cli()), "workflow", "count", "--query", query, "--address", address],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    match = re.search(r"Total:\s*(\d+)", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


def status_of(address: str, workflow_id: str) -> CampaignStatus:
    async def query() -> CampaignStatus:
        client = await Client.connect(address)
        status: CampaignStatus = await client.get_workflow_handle(workflow_id).query(
            "status", result_type=CampaignStatus
        )
        return status

    return asyncio.run(query())


def reaches(address: str, workflow_id: str, state: CampaignState) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(Exception):
            return status_of(address, workflow_id).state == state
        return False

    return check


def test_demo_up_approve_kill_restart_verify_and_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    temporal_port, ui_port, api_port, crm_port = (free_port() for _ in range(4))
    ports = [
        *("--temporal-port", str(temporal_port), "--ui-port", str(ui_port)),
        *("--api-port", str(api_port), "--crm-port", str(crm_port)),
    ]
    address = f"127.0.0.1:{temporal_port}"
    api, crm = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{crm_port}"

    # -- the demo, start to finish, printing its summary as one JSON object
    started = time.monotonic()
    demo = cohortflow(
        "demo", "--no-serve", "--json", "--customers", "40",
        "--wait-seconds", str(WAIT_SECONDS), "--data-dir", data, *ports,
        timeout=240,
    )  # fmt: skip
    demo_seconds = time.monotonic() - started
    assert demo.returncode == 0, demo.stderr[-3000:]
    [line] = demo.stdout.splitlines()
    summary: dict[str, Any] = json.loads(line)
    states = [s.value for s in SUMMARY_STATES]
    assert sum(summary[s] for s in states) == summary["entered"] > 0
    assert summary["awaiting_approval"] > 0
    assert summary["completed"] > 0
    assert summary["waiting"] == 0
    assert (summary["temporal_address"], summary["namespace"]) == (address, "default")
    assert summary["launched_new"] == summary["entered"]
    assert processes_naming(data) == []
    print(f"demo: {demo_seconds:.1f}s wall, {summary['campaigns_per_second']} campaigns/s")

    # -- `up` on the same data dir: the same campaigns, counted by the temporal CLI
    with up(data, ports, tmp_path / "up1.log") as first:
        first_pids = first.wait_ready(api)
        base = f'CampaignId = "{CAMPAIGN}"'
        assert temporal_count(address, base) == summary["entered"]
        for state in states:
            query = f'{base} AND CampaignState = "{state}"'
            assert temporal_count(address, query) == summary[state], state

        # -- approve one from the CLI, given only the data dir
        listed = cohortflow("approvals", "list", "--json", "--data-dir", data)
        assert listed.returncode == 0, listed.stderr
        pending = [json.loads(row) for row in listed.stdout.splitlines()]
        assert len(pending) == summary["awaiting_approval"]
        approval, workflow_id = pending[0]["approval_id"], pending[0]["workflow_id"]
        key = pending[0]["customer_key"]
        approved = cohortflow(
            "approve", approval, "--operator", "alice", "--reason", "offer within budget",
            "--data-dir", data,
        )  # fmt: skip
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.strip() == f"{approval} approved"

        # -- kill -9 of `up` while that campaign waits: nothing may survive it
        wait_until(reaches(address, workflow_id, CampaignState.WAITING), 30, "the durable wait")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        wait_until(lambda: not any(map(alive, first_pids)), 30, "the children to die")
        assert processes_naming(data) == []
    ensure_free("127.0.0.1", temporal_port, "the dev server's port")  # it went with `up`

    # -- a new `up` brings the campaign back and it completes; its CRM record exists once
    with up(data, ports, tmp_path / "up2.log") as second:
        second_pids = second.wait_ready(api)
        wait_until(reaches(address, workflow_id, CampaignState.COMPLETED), 60, "completion")
        contact = httpx.get(f"{crm}/crm/v3/objects/contacts/{key}")
        assert contact.status_code == 200, contact.text
        assert contact.json()["properties"]["cohort_label"] == "demo_lapsing"
        assert contact.json()["sequences"] == ["winback_email"]
        for step in ("label", "enrol"):
            requests = httpx.get(
                f"{crm}/_sandbox/requests", params={"idempotency_key": f"{workflow_id}:{step}"}
            )
            assert requests.json()["count"] == 1, (step, requests.json())
        completed = f'{base} AND CampaignState = "completed"'
        assert temporal_count(address, completed) == summary["completed"] + 1

        verified = cohortflow("audit", "verify", "--data-dir", data)
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.startswith("audit chain ok:")

        # -- SIGINT stops everything
        second.proc.send_signal(signal.SIGINT)
        assert second.proc.wait(60) in (0, 130)
        assert not any(map(alive, second_pids)), [p for p in second_pids if alive(p)]
        assert processes_naming(data) == []
        assert "stopped" in second.log_path.read_text()
