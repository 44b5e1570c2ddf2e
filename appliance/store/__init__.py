"""The state database: one SQLite file in WAL mode, owned by one thread.

Every statement runs on a single dedicated thread, so no read or write ever blocks
the event loop and SQLite never sees two writers. Repositories are thin async
wrappers over plain functions that receive the sqlite-utils Database.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from appliance.errors import ApplianceError
from appliance.store.access_repos import AccountsRepo, KeysRepo, UsageRepo
from appliance.store.codec import dumps, iso, parse_iso
from appliance.store.migrations import migrations
from appliance.store.repos import EndpointsRepo, EventsRepo, ReplicasRepo
from appliance.store.scaling_repos import RulesRepo

__all__ = ["Clock", "Store", "dumps", "iso", "open_database", "parse_iso"]

T = TypeVar("T")
Clock = Callable[[], float]


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
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the store thread."""
        if self._db is None:
            raise ApplianceError("the state database is not open", status=503, code="not_ready")
        return await self._submit(fn, self._db, *args)

    def now(self) -> str:
        return iso(self.clock())
