"""The embedded Temporal dev server: a persistent SQLite file, the Web UI, our search attributes."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from cohortflow.runtime import process
from cohortflow.runtime.binaries import temporal_cli
from cohortflow.runtime.ports import ensure_free, free_port
from cohortflow.settings import Settings
from cohortflow.temporal_client import search_attribute_types, wait_for_server

# WAL roughly doubles the dev server's workflow throughput (docs/architecture.md, "What a
# campaign costs").
SQLITE_PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL")


class DevServerError(RuntimeError):
    """The dev server exited or did not come up in time."""


class DevServer:
    """Runs ``temporal server start-dev`` as a child that dies with us."""

    def __init__(self, settings: Settings, *, startup_timeout: float = 60.0) -> None:
        """Prepare, without starting, a dev server configured from ``settings``."""
        self.settings = settings
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        # Chosen here: left to itself the server takes its gRPC port + 1000 for its HTTP API,
        # which another process handed a free port may already hold.
        self.http_port = free_port()

    @property
    def address(self) -> str:
        """host:port of the gRPC frontend."""
        return f"{self.settings.temporal_host}:{self.settings.temporal_port}"

    @property
    def ui_url(self) -> str:
        """Base URL of the Temporal Web UI."""
        return f"http://{self.settings.temporal_host}:{self.settings.temporal_ui_port}"

    @property
    def log_path(self) -> Path:
        """Where the server's output goes."""
        return self.settings.data_dir / "logs" / "temporal.log"

    def args(self) -> list[str]:
        """The full command line."""
        s = self.settings
        args = [
            str(temporal_cli()),
            "server",
            "start-dev",
            "--db-filename",
            str(s.temporal_db_path),
            "--ip",
            s.temporal_host,
            "--port",
            str(s.temporal_port),
            "--ui-port",
            str(s.temporal_ui_port),
            "--ui-codec-endpoint",
            s.ui_codec_endpoint,
            "--http-port",
            str(self.http_port),
            "--namespace",
            s.temporal_namespace,
            "--log-level",
            "warn",
        ]
        for pragma in SQLITE_PRAGMAS:
            args += ["--sqlite-pragma", pragma]
        for name, type_name in search_attribute_types().items():
            args += ["--search-attribute", f"{name}={type_name}"]
        return args

    async def start(self) -> None:
        """Start the server and return once a client can use the namespace.

        Raises :class:`~cohortflow.runtime.ports.PortInUse` before starting anything when a
        port is taken, and :class:`DevServerError` when the server exits or stays unreachable.
        Call it from the main thread (see :func:`cohortflow.runtime.process.spawn`).
        """
        if self.proc is not None:
            raise DevServerError("the dev server is already started")
        s = self.settings
        ensure_free(s.temporal_host, s.temporal_port, "COHORTFLOW_TEMPORAL_PORT")
        ensure_free(s.temporal_host, s.temporal_ui_port, "COHORTFLOW_TEMPORAL_UI_PORT")
        s.temporal_db_path.parent.mkdir(parents=True, exist_ok=True)
        proc = self.proc = process.spawn(self.args(), log_path=self.log_path)
        ready = asyncio.create_task(
            wait_for_server(self.address, s.temporal_namespace, self.startup_timeout)
        )
        try:
            while not ready.done():
                if proc.poll() is not None:
                    raise DevServerError(
                        f"the Temporal dev server exited with code {proc.returncode}; "
                        f"{self.log_path} ends with:\n{process.tail(self.log_path)}"
                    )
                await asyncio.wait({ready}, timeout=0.2)
            ready.result()
        except TimeoutError as exc:
            self.stop()
            raise DevServerError(f"{exc}; see {self.log_path}") from exc
        except BaseException:
            self.stop()
            raise
        finally:
            ready.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); safe to call twice."""
        if self.proc is not None:
            process.stop(self.proc, timeout)
            self.proc = None
