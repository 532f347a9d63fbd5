"""A private PostgreSQL cluster, for benches and tests that take the database away on purpose.

Never the shared server on :5432 other tests use: ``initdb`` into a directory of our own,
served on a free port, stopped with ``pg_ctl stop -m fast`` (sessions cut mid-transaction, as
in a crash or a failover) and started again on the same data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cohortflow.runtime.ports import free_port

# initdb and postgres refuse to run as root; as root we run them as this account.
SERVICE_ACCOUNT = "postgres"


def _as_owner(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVICE_ACCOUNT, "--", *args]
    return args


class PrivatePostgres:
    """One cluster in its own directory on a free port; ``url`` is its ``postgres`` database."""

    def __init__(self) -> None:
        # A directory of its own rather than the caller's: a root-owned 0700 parent would
        # keep the service account out.
        self.root = Path(tempfile.mkdtemp(prefix="cohortflow-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVICE_ACCOUNT)
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(_as_owner(list(args)), check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        """Create the cluster (trust authentication, local connections only)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1"
        log = str(self.root / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        """Stop the server at once: open sessions are cut, their transactions rolled back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        """Whether the server is up (``pg_ctl status``)."""
        done = subprocess.run(
            _as_owner(["pg_ctl", "-D", str(self.data), "status"]), capture_output=True
        )
        return done.returncode == 0


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A fresh running cluster for the block; stopped and deleted after it."""
    cluster = PrivatePostgres()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
