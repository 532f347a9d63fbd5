"""``cohortflow up``: run the parts as children, watch them, stop them in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
import structlog
from pydantic import SecretStr

from cohortflow.runtime import process
from cohortflow.runtime.devserver import DevServer
from cohortflow.settings import Settings

Probe = Callable[[], bool]
log = structlog.get_logger(__name__)


def cohortflow_command(subcommand: str, *args: str) -> list[str]:
    """``python -m cohortflow <subcommand> ...`` with the running interpreter."""
    return [sys.executable, "-m", "cohortflow", subcommand, *args]


def child_env(settings: Settings) -> dict[str, str]:
    """Our environment plus every set field of ``settings`` as ``COHORTFLOW_*``.

    Children read their configuration from the environment, so this hands them what the
    parent resolved, command-line overrides included.
    """
    env = dict(os.environ)
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        # Lists are read back from the environment as JSON.
        text = json.dumps(value) if isinstance(value, list) else str(value)
        env[f"COHORTFLOW_{field.upper()}"] = text
    return env


def http_ok(url: str) -> Probe:
    """Healthy once ``GET url`` answers 2xx."""

    def probe() -> bool:
        try:
            return httpx.get(url, timeout=1.0).is_success
        except httpx.HTTPError:
            return False

    return probe


def alive_for(seconds: float) -> Probe:
    """Healthy once the child has stayed up ``seconds`` (for children with nothing to ask)."""
    started: float | None = None

    def probe() -> bool:
        nonlocal started
        if started is None:
            started = time.monotonic()
        return time.monotonic() - started >= seconds

    return probe


@dataclass(frozen=True)
class Child:
    """One supervised process: a name for its log file, its command, its health probe."""

    name: str
    args: list[str]
    healthy: Probe


class ChildFailed(RuntimeError):
    """A child exited on its own or never became healthy."""


@dataclass(frozen=True)
class RestartPolicy:
    """How a child that dies after it started is restarted: after ``first_backoff`` seconds,
    doubling to ``max_backoff``; more than ``max_restarts`` within ``window`` seconds means
    it keeps dying, and the stack stops."""

    first_backoff: float = 1.0
    max_backoff: float = 30.0
    max_restarts: int = 5
    window: float = 300.0


class Supervisor:
    """Starts children one by one, restarts one that dies (with backoff), stops them
    last-started-first."""

    def __init__(
        self,
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        devserver: DevServer | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        restart: RestartPolicy | None = None,
    ) -> None:
        """Children log to ``log_dir/<name>.log``; ``devserver`` is stopped after them."""
        self.log_dir = log_dir
        self.env = env
        self.devserver = devserver
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.restart = restart or RestartPolicy()
        self.running: list[tuple[Child, subprocess.Popen[bytes]]] = []
        # When each child was restarted (monotonic), for the backoff and the give-up rule.
        self.restarts: dict[str, list[float]] = {}
        self._stop_requested = threading.Event()

    @property
    def stopping(self) -> bool:
        """True once SIGINT or SIGTERM asked us to stop."""
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        """End :meth:`start` and :meth:`wait` (from any thread); :meth:`stop` still runs."""
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        """Make SIGINT and SIGTERM end :meth:`start` and :meth:`wait`; a second one aborts.

        Call from the main thread. The caller then runs :meth:`stop` (in a ``finally``).
        """

        def handle(signum: int, _frame: FrameType | None) -> None:
            if self._stop_requested.is_set():
                # An impatient second Ctrl-C: children still get SIGTERM through PDEATHSIG.
                raise KeyboardInterrupt
            self.request_stop()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)

    def start(self, children: list[Child]) -> None:
        """Start each child and wait until it is healthy before the next one.

        Raises :class:`ChildFailed`, with the tail of its log, when a child exits or is not
        healthy within ``startup_timeout``. Returns early when a stop is requested.
        """
        for child in children:
            if self.stopping:
                return
            self.running.append((child, self._launch(child)))

    def _launch(self, child: Child) -> subprocess.Popen[bytes]:
        """Spawn ``child`` and wait until it is healthy (or a stop is requested)."""
        log_path = self.log_dir / f"{child.name}.log"
        proc = process.spawn(child.args, env=self.env, log_path=log_path)
        deadline = time.monotonic() + self.startup_timeout
        while not child.healthy():
            self._check_alive(child, proc)
            if time.monotonic() > deadline:
                process.stop(proc, self.stop_timeout)
                raise ChildFailed(
                    f"{child.name} was not healthy after {self.startup_timeout:g}s; "
                    f"{log_path} ends with:\n{process.tail(log_path)}"
                )
            if self._stop_requested.wait(0.2):
                return proc
        self._check_alive(child, proc)
        return proc

    def wait(self) -> None:
        """Block until a stop is requested, restarting a child that exits (see
        :class:`RestartPolicy`); raise :class:`ChildFailed` for one that keeps dying."""
        while not self._stop_requested.wait(0.5):
            for index, (child, proc) in enumerate(self.running):
                if proc.poll() is not None and not self.stopping:
                    self.running[index] = (child, self._restarted(child, proc.returncode))

    def _restarted(self, child: Child, code: int) -> subprocess.Popen[bytes]:
        """Restart ``child``, which exited with ``code``, after its backoff."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(child.name, []) if now - t < self.restart.window]
        log_path = self.log_dir / f"{child.name}.log"
        if len(recent) >= self.restart.max_restarts:
            raise ChildFailed(
                f"{child.name} keeps dying: exited with code {code} after {len(recent)} restarts"
                f" in {self.restart.window:g}s; {log_path} ends with:\n{process.tail(log_path)}"
            )
        backoff = min(self.restart.first_backoff * 2 ** len(recent), self.restart.max_backoff)
        self.restarts[child.name] = [*recent, now]
        total = sum(len(v) for v in self.restarts.values())
        log.warning(
            "child restarted", child=child.name, exit_code=code, backoff_s=backoff,
            restarts_recent=len(recent) + 1, restarts_total=total,
        )  # fmt: skip
        self._stop_requested.wait(backoff)
        return self._launch(child)

    def stop(self) -> None:
        """Stop every child, last started first, then the dev server."""
        while self.running:
            _, proc = self.running.pop()
            process.stop(proc, self.stop_timeout)
        if self.devserver is not None:
            self.devserver.stop(self.stop_timeout)

    def _check_alive(self, child: Child, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            log_path = self.log_dir / f"{child.name}.log"
            raise ChildFailed(
                f"{child.name} exited with code {proc.returncode}; "
                f"{log_path} ends with:\n{process.tail(log_path)}"
            )
