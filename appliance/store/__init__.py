"""The state database: one SQLite file in WAL mode, owned by one thread.

Every statement runs on a single dedicated thread, so no read or write ever blocks
the event loop and SQLite never sees two writers. Repositories are thin async
wrappers over plain functions that receive the sqlite-utils Database.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import shutil
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from appliance.errors import ApplianceError
from appliance.store.access_repos import AccountsRepo, KeysRepo, UsageRepo
from appliance.store.codec import dumps, iso, parse_iso
from appliance.store.migrations import migrations
from appliance.store.models_repo import ModelsRepo
from appliance.store.repos import WRITTEN, EndpointsRepo, EventsRepo, ReplicasRepo, _insert_event
from appliance.store.scaling_repos import RulesRepo

__all__ = ["Clock", "Store", "dumps", "iso", "open_database", "parse_iso"]

T = TypeVar("T")
Clock = Callable[[], float]
log = logging.getLogger(__name__)
HELD_MAX = 10_000  # control-loop writes kept in memory while the disk is full; the oldest go first beyond it


def storage_failure(exc: sqlite3.Error, path: Path) -> ApplianceError | None:
    """The error to show for a write the disk refused (full, or failing), None for any other database error."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        return ApplianceError(
            f"the state database could not be written: the disk holding {path.parent} is full ({free >> 20} MiB free); "
            "nothing was changed: free some space and retry",
            status=507, code="disk_full", type="server_error",
        )
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        return ApplianceError(f"the state database could not be written: {exc} ({path}); nothing was changed",
                              status=503, code="storage_error", type="server_error")
    return None


def open_database(path: Path) -> Database:
    """Open (creating if needed) and migrate. Usable from any one thread, e.g. offline CLI commands."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)  # keys and usage live here: only the appliance's user reads it
    path.chmod(0o600)  # SQLite gives its -wal and -shm files the database's mode
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        db = Database(conn)
        db.enable_wal()
        db.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a crash loses at most the last commit
        db.execute("PRAGMA foreign_keys = ON")
        migrations.apply(db)
    except sqlite3.DatabaseError as exc:
        raise ApplianceError(f"state database {path}: {exc}", status=500, code="database_error") from None
    return db


EVENTS_LOG = logging.getLogger("appliance.events")
_EVENT_LEVELS = {"auth.failure": logging.WARNING, "auth.failure.suppressed": logging.WARNING, "config.error": logging.ERROR,
                 "replica.failed": logging.WARNING, "replica.unhealthy": logging.WARNING, "store.disk_full": logging.ERROR}


def _logging_events(fn: Callable[..., T], *args: Any) -> T:
    """fn on the store thread; the events it inserted are logged once it returned (its transaction
    committed), and never when it raised (nothing was written)."""
    WRITTEN.events = []
    try:
        result = fn(*args)
        written = WRITTEN.events
    finally:
        WRITTEN.events = None
    for kind, message, endpoint, details in written:
        level = _EVENT_LEVELS.get(kind, logging.INFO)
        if level == logging.INFO and kind.startswith("endpoint.status") and details and details.get("to") == "ERROR":
            level = logging.WARNING
        EVENTS_LOG.log(level, "%s %s", kind, message, extra={"kind": kind, "endpoint": endpoint, "details": details or None})
    return result


class Store:
    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="appliance-store")
        self._db: Database | None = None
        self.endpoints = EndpointsRepo(self)
        self.events = EventsRepo(self)
        self.keys = KeysRepo(self)
        self.accounts = AccountsRepo(self)
        self.usage = UsageRepo(self)
        self.rules = RulesRepo(self)
        self.replicas = ReplicasRepo(self)
        self.models = ModelsRepo(self)
        # Writes of the control loops (events, replica records, statuses) that the disk refused, in order:
        # supervision goes on, and they are written once space returns.
        self._held: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._held_dropped = 0
        self.full_since: float | None = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    async def open(self) -> None:
        self._db = await self._submit(open_database, self.path)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._submit(db.close)
        self._executor.shutdown(wait=True)

    async def _submit(self, fn: Callable[..., T], *args: Any) -> T:
        # in the caller's context: an event logged there carries the request id of the API call that made it
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._executor, ctx.run, _logging_events, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the store thread."""
        if self._db is None:
            raise ApplianceError("the state database is not open", status=503, code="not_ready")
        try:
            return await self._submit(fn, self._db, *args)
        except sqlite3.Error as exc:
            failure = storage_failure(exc, self.path)
            if failure is None:
                raise
            if self.full_since is None:
                self.full_since = self.clock()
                log.error("%s; control-loop writes are held in memory until space returns", failure.message)
                # Held first, so it is written first: when it is written, there is space again.
                self._held.appendleft((_insert_event, (iso(self.full_since), "store.disk_full", failure.message, None, {"code": failure.code})))
            raise failure from None

    async def write_or_hold(self, fn: Callable[..., Any], *args: Any) -> None:
        """A write the control loops make (an event, a replica record): when the disk refuses it, it is
        held in memory behind any earlier held writes, in order, and the caller goes on."""
        if self._held and not await self.write_held():
            self._hold(fn, args)
            return
        try:
            await self.run(fn, *args)
        except ApplianceError as exc:
            if exc.code not in ("disk_full", "storage_error"):
                raise
            self._hold(fn, args)

    def _hold(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if len(self._held) >= HELD_MAX:
            self._held.popleft()
            self._held_dropped += 1
        self._held.append((fn, args))

    async def write_held(self) -> bool:
        """Write the held writes, oldest first (a scheduled job, and before any new control write);
        True once none is left. The first of them is the disk_full event: once it is written, the
        recovery is recorded with how long writes were held."""
        while self._held:
            fn, args = self._held[0]
            try:
                await self.run(fn, *args)
            except ApplianceError as exc:
                if exc.code in ("disk_full", "storage_error"):
                    return False
                log.error("a held write failed and is dropped: %s", exc)
            self._held.popleft()
        if self.full_since is not None:
            since, self.full_since = self.full_since, None
            dropped, self._held_dropped = self._held_dropped, 0
            held_for = self.clock() - since
            message = f"the state database is writable again after {held_for:.0f} s; held writes were written"
            if dropped:
                message += f" except the oldest {dropped} (more than {HELD_MAX} were held)"
            log.warning("%s", message)
            await self.write_or_hold(_insert_event, iso(self.clock()), "store.disk_recovered", message, None, {"seconds": round(held_for, 1), "dropped": dropped})
        return True

    @property
    def held(self) -> int:
        return len(self._held)

    def now(self) -> str:
        return iso(self.clock())
