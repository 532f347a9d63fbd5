"""SQLite writers taking turns before they begin.

Without turns, writers queue in SQLite's busy handler, which sleeps (up to 100 ms a time)
and retries: the write lock sits unused between writers while they sleep, and a burst of
writers pays for it in seconds. With them, the writer whose turn it is begins at once when
the previous one commits. A process's writers take turns on an asyncio lock (one per event
loop: a ``Database`` may outlive a test's loop); the one holding it then takes the turn
across processes, an exclusive ``flock`` on a file beside the database, which the kernel
hands on as soon as it is let go. SQLite's lock still guards the data: whatever does not
take the turn (another tool, a migration) meets the busy handler as before.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError


class _LoopTurn:
    """One event loop's turn, and the task holding it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.holder: asyncio.Task[Any] | None = None


class WriteTurns:
    """The turns to write to one SQLite file."""

    def __init__(self, database: Path) -> None:
        """Turns for ``database``; the turn file is ``<database>-write-turn``."""
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopTurn]
        self._loops = weakref.WeakKeyDictionary()
        self._path: Path | None = database.with_name(f"{database.name}-write-turn")
        self._fd: int | None = None  # opened lazily

    @asynccontextmanager
    async def take(self, wait_seconds: float) -> AsyncIterator[None]:
        """Hold the turn for the block, waiting at most ``wait_seconds`` for it (then the
        ``OperationalError`` "database is locked" SQLite would raise).

        A transaction opened inside one the task already holds (nested: it waits for the
        outer one's lock in SQLite, as before) skips the turn rather than wait on itself.
        """
        loop = asyncio.get_running_loop()
        turn = self._loops.get(loop)
        if turn is None:
            turn = self._loops[loop] = _LoopTurn()
        task = asyncio.current_task()
        if task is not None and turn.holder is task:
            yield
            return
        deadline = loop.time() + wait_seconds
        try:
            async with asyncio.timeout_at(deadline):
                await turn.lock.acquire()
        except TimeoutError as exc:
            raise _locked("waiting for this process's write turn") from exc
        turn.holder = task
        try:
            async with self._file_turn(deadline):
                yield
        finally:
            turn.holder = None
            turn.lock.release()

    def close(self) -> None:
        """Close the turn file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @asynccontextmanager
    async def _file_turn(self, deadline: float) -> AsyncIterator[None]:
        """The turn across processes: an exclusive ``flock`` of the turn file, taken at
        once if free, else waited for on a thread (the kernel wakes it when the holder
        lets go, where SQLite's busy handler would poll)."""
        fd = self._open()
        if fd is not None and not await self._take_file_turn(fd, deadline):
            fd = None
        try:
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    async def _take_file_turn(self, fd: int, deadline: float) -> bool:
        """Take the turn file's ``flock``; False where the file system has none (SQLite's
        busy handler queues the writers then, as before)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError:
            return False
        waiting = asyncio.get_running_loop().run_in_executor(None, fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(waiting)
        except BaseException as exc:
            # The thread waits on; when it gets the turn it gives it back. (Meanwhile this
            # process's next writer may share its claim, a flock being the open file's:
            # that writer then meets SQLite's busy handler, as before.)
            waiting.add_done_callback(lambda done: self._give_back(fd, done))
            if isinstance(exc, TimeoutError):
                raise _locked("waiting for the write turn of another process") from exc
            raise
        return True

    def _open(self) -> int | None:
        if self._fd is None and self._path is not None:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # say, a read-only directory: no turn across processes
                self._path = None
        return self._fd

    def _give_back(self, fd: int, waited: asyncio.Future[None]) -> None:
        """Give back a turn a thread took after its writer stopped waiting for it."""
        if fd == self._fd and not waited.cancelled() and waited.exception() is None:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _locked(why: str) -> OperationalError:
    """What SQLite's busy handler raises when it gives up, saying ``why``."""
    return OperationalError(
        "BEGIN IMMEDIATE", None, sqlite3.OperationalError(f"database is locked ({why})")
    )
