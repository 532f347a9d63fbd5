"""Child processes that go down with us, even when we are killed with SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: loading a library in the forked child could deadlock on a lock
    # another thread of ours held at fork time.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl; the signal would then never come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def spawn(
    args: list[str], *, env: Mapping[str, str] | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own process group, stdout and stderr appended to ``log_path``.

    The child gets SIGTERM when the spawning *thread* exits (Linux ``PR_SET_PDEATHSIG``), so
    call this from the main thread or from one that lives as long as the process. Its own
    process group keeps terminal Ctrl-C away from it: the caller stops it in order with
    :func:`stop`. ``env`` replaces the environment, as in :class:`subprocess.Popen`.
    """
    with contextlib.ExitStack() as stack:
        out: int | IO[bytes] = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(log_path.open("ab"))
        return subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, wait up to ``timeout`` seconds, then SIGKILL it."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
    # Grandchildren that outlived the group leader's orderly exit go too.
    _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Gone already; macOS answers EPERM rather than ESRCH for a group of zombies.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a child's log, for error messages ('' if there is none)."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            data = log.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
