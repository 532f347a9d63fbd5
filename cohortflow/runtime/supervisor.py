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
from pydantic import SecretStr

from cohortflow.runtime import process
from cohortflow.runtime.devserver import DevServer
from cohortflow.settings import Settings

Probe = Callable[[], bool]


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


class Supervisor:
    """Starts children one by one, waits on them, stops them last-started-first."""

    def __init__(
        self,
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        devserver: DevServer | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """Children log to ``log_dir/<name>.log``; ``devserver`` is stopped after them."""
        self.log_dir = log_dir
        self.env = env
        self.devserver = devserver
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.running: list[tuple[Child, subprocess.Popen[bytes]]] = []
        self._stop_requested = threading.Event()

    @property
    def stopping(self) -> bool:
        """True once SIGINT or SIGTERM asked us to stop."""
        return self._stop_requested.is_set()

    def install_signal_handlers(self) -> None:
        """Make SIGINT and SIGTERM end :meth:`start` and :meth:`wait`; a second one aborts.

        Call from the main thread. The caller then runs :meth:`stop` (in a ``finally``).
        """

        def handle(signum: int, _frame: FrameType | None) -> None:
            if self._stop_requested.is_set():
                # An impatient second Ctrl-C: children still get SIGTERM through PDEATHSIG.
                raise KeyboardInterrupt
            self._stop_requested.set()

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
            log_path = self.log_dir / f"{child.name}.log"
            proc = process.spawn(child.args, env=self.env, log_path=log_path)
            self.running.append((child, proc))
            deadline = time.monotonic() + self.startup_timeout
            while not child.healthy():
                self._check_alive(child, proc)
                if time.monotonic() > deadline:
                    raise ChildFailed(
                        f"{child.name} was not healthy after {self.startup_timeout:g}s; "
                        f"{log_path} ends with:\n{process.tail(log_path)}"
                    )
                if self._stop_requested.wait(0.2):
                    return
            self._check_alive(child, proc)

    def wait(self) -> None:
        """Block until a stop is requested; raise :class:`ChildFailed` if a child exits first."""
        while not self._stop_requested.wait(0.5):
            for child, proc in self.running:
                self._check_alive(child, proc)

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
