"""The embedded stack behind ``cohortflow up`` and ``cohortflow demo``.

Dev server (persistent SQLite, Web UI) first, then the sandbox CRM, the HTTP API and the
worker as children that die with us; SIGINT or SIGTERM stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from rich.console import Console

from cohortflow.demo.options import DemoOptions
from cohortflow.demo.run import DemoSummary, print_summary, run_demo_job
from cohortflow.pseudonymisation import Pseudonymiser
from cohortflow.runtime.devserver import DevServer
from cohortflow.runtime.ports import ensure_free
from cohortflow.runtime.supervisor import (
    Child,
    Supervisor,
    alive_for,
    child_env,
    cohortflow_command,
    http_ok,
)
from cohortflow.settings import Settings
from cohortflow.storage.db import migrate
from cohortflow.temporal_client import connect, ensure_search_attributes, wait_for_pollers

T = TypeVar("T")
Announce = Callable[[str], None]


class Stopped(Exception):
    """SIGINT or SIGTERM arrived while a step was running."""


@dataclass(frozen=True)
class Urls:
    """Where each part of the stack answers."""

    temporal: str
    temporal_ui: str
    api: str
    crm: str


def urls(settings: Settings) -> Urls:
    """The URLs of the embedded stack for ``settings``."""
    return Urls(
        temporal=settings.resolved_temporal_address,
        temporal_ui=f"http://{settings.temporal_host}:{settings.temporal_ui_port}",
        api=f"http://{settings.api_host}:{settings.api_port}",
        crm=settings.resolved_crm_url,
    )


def _children(settings: Settings) -> list[Child]:
    u = urls(settings)
    return [
        Child("crm-sandbox", cohortflow_command("crm-sandbox"), http_ok(f"{u.crm}/healthz")),
        Child("api", cohortflow_command("api"), http_ok(f"{u.api}/healthz")),
        Child("worker", cohortflow_command("worker"), alive_for(2.0)),
    ]


class EmbeddedStack:
    """Starts and stops the stack; the caller runs its own work in between."""

    def __init__(self, settings: Settings) -> None:
        # Before anything is created: the stack runs a worker and the API.
        settings.check_production()
        self.settings = settings
        self.devserver = DevServer(settings) if settings.embedded_temporal else None
        self.supervisor = Supervisor(
            settings.data_dir / "logs", env=child_env(settings), devserver=self.devserver
        )

    def check_ports(self) -> None:
        """Raise :class:`PortInUse` naming the first taken port we would listen on."""
        s = self.settings
        if self.devserver is not None:
            ensure_free(s.temporal_host, s.temporal_port, "COHORTFLOW_TEMPORAL_PORT")
            ensure_free(s.temporal_host, s.temporal_ui_port, "COHORTFLOW_TEMPORAL_UI_PORT")
        ensure_free(s.api_host, s.api_port, "COHORTFLOW_API_PORT")
        if s.crm_url is None:
            ensure_free(s.crm_sandbox_host, s.crm_sandbox_port, "COHORTFLOW_CRM_SANDBOX_PORT")

    def start(self, announce: Announce) -> Urls:
        """Check ports, prepare the data dir and database, start every part, print URLs."""
        s = self.settings
        # Every port before anything is created: a taken one leaves no half-made data dir.
        self.check_ports()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        Pseudonymiser.from_settings(s)  # generates the key file (0600) on first run
        self.supervisor.install_signal_handlers()
        asyncio.run(migrate(s.resolved_database_url))
        if self.devserver is not None:
            announce(f"starting Temporal dev server ({s.temporal_db_path})")
            asyncio.run(self.devserver.start())
        asyncio.run(self._prepare_namespace())
        self._write_stack_file()
        announce("starting sandbox CRM, HTTP API and worker")
        self.supervisor.start(_children(s))
        if self.supervisor.stopping:
            raise Stopped
        u = urls(s)
        announce(f"Temporal        {u.temporal} (namespace {s.temporal_namespace})")
        announce(f"Temporal Web UI {u.temporal_ui}")
        announce(f"HTTP API        {u.api}  (health: {u.api}/healthz, docs: {u.api}/docs)")
        announce(f"Sandbox CRM     {u.crm}")
        announce(f"Data            {s.data_dir.resolve()}  (logs in {s.data_dir / 'logs'})")
        return u

    def _write_stack_file(self) -> None:
        """Record where this stack answers, for operator commands given only --data-dir."""
        s = self.settings
        u = urls(s)
        stack = {
            "temporal_host": s.temporal_host,
            "temporal_port": s.temporal_port,
            "temporal_namespace": s.temporal_namespace,
            "temporal_ui": u.temporal_ui,
            "api": u.api,
            "crm": u.crm,
        }
        path = s.stack_file
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(stack, indent=2) + "\n")
        temporary.replace(path)

    async def _prepare_namespace(self) -> None:
        client = await connect(self.settings, tracing=False)
        await ensure_search_attributes(client, self.settings.temporal_namespace)

    def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` on an event loop, cancelling it if SIGINT or SIGTERM arrives."""

        async def guarded() -> T:
            task = asyncio.ensure_future(work())
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                if self.supervisor.stopping and not task.done():
                    task.cancel()
                    raise Stopped
            return task.result()

        return asyncio.run(guarded())

    def wait(self) -> None:
        """Serve until SIGINT or SIGTERM (or a child dies)."""
        self.supervisor.wait()

    def stop(self) -> None:
        """Stop every child, then the dev server."""
        self.supervisor.stop()


def serve_forever(settings: Settings, announce: Announce) -> None:
    """``cohortflow up``: start everything, serve until Ctrl-C, stop everything."""
    stack = EmbeddedStack(settings)
    stack.check_ports()  # a taken port is the only line printed
    try:
        stack.start(announce)
        announce("ready; Ctrl-C stops everything")
        stack.wait()
    except Stopped:
        pass
    finally:
        stack.stop()
        announce("stopped")


def run_demo(
    settings: Settings,
    options: DemoOptions,
    *,
    serve: bool,
    as_json: bool,
    out: Console,
    err: Console,
) -> None:
    """``cohortflow demo``: the stack, then the demo job on it, then the summary."""
    stack = EmbeddedStack(settings)
    try:
        stack.start(lambda line: err.print(line, soft_wrap=True))
        summary = stack.run(lambda: _demo(settings, options, err))
        if as_json:
            out.print(json.dumps(summary.as_json()), markup=False, highlight=False, soft_wrap=True)
        else:
            print_summary(summary, out)
        if serve:
            err.print("serving; Ctrl-C stops everything")
            stack.wait()
    except Stopped:
        pass
    finally:
        stack.stop()


async def _demo(settings: Settings, options: DemoOptions, err: Console) -> DemoSummary:
    client = await connect(settings)
    # Launching before a worker polls works, but the progress would look stuck.
    await wait_for_pollers(client, settings.task_queue)
    u = urls(settings)
    return await run_demo_job(settings, client, (u.api, u.temporal_ui), options, err)
