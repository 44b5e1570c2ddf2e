"""Keys, endpoint tokens, service accounts and usage: the tables behind who may call and how much."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from appliance.errors import ApplianceError
from appliance.store.codec import iso
from appliance.store.repos import _insert_event

if TYPE_CHECKING:
    from appliance.store import Store

Row = dict[str, Any]


class KeysRepo:
    """API keys and endpoint tokens (one table: one lookup on the hot path)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def insert(self, row: Row, message: str, endpoint: str | None = None) -> Row:
        now = self._store.now()

        def tx(db: Database) -> Row:
            with db.atomic():
                db["api_keys"].insert({**row, "created_at": now})
                _insert_event(db, now, "key.created", message, endpoint, {"key_id": row["id"], "name": row["name"], "kind": row.get("kind", "key")})
                return dict(db["api_keys"].get(row["id"]))

        return await self._store.run(tx)

    async def get(self, key_id: str) -> Row:
        def q(db: Database) -> Row:
            try:
                return dict(db["api_keys"].get(key_id))
            except NotFoundError:
                raise ApplianceError(f"key {key_id!r} not found", status=404, code="key_not_found", param="id") from None

        return await self._store.run(q)

    async def list(self, *, kind: str | None = None, endpoint: str | None = None) -> list[Row]:
        where, params = [], []
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if endpoint is not None:
            where.append("exists (select 1 from json_each(api_keys.endpoints) where value = ?)")
            params.append(endpoint)
        sql = "select * from api_keys" + (" where " + " and ".join(where) if where else "") + " order by created_at, id"
        return await self._store.run(lambda db: list(db.query(sql, params)))

    async def update(self, key_id: str, fields: Row, kind: str, message: str) -> Row:
        now = self._store.now()

        def tx(db: Database) -> Row:
            with db.atomic():
                try:
                    db["api_keys"].get(key_id)
                except NotFoundError:
                    raise ApplianceError(f"key {key_id!r} not found", status=404, code="key_not_found", param="id") from None
                db["api_keys"].update(key_id, fields)
                _insert_event(db, now, kind, message, None, {"key_id": key_id, "fields": sorted(fields)})
                return dict(db["api_keys"].get(key_id))

        return await self._store.run(tx)

    async def touch(self, last_used: dict[str, float]) -> None:
        rows = [(iso(t), key_id) for key_id, t in last_used.items()]
        await self._store.run(lambda db: db.conn.executemany("update api_keys set last_used_at = ? where id = ?", rows))

    async def active_with_scope(self, scope: str) -> list[Row]:
        now = self._store.now()
        sql = (
            "select * from api_keys where revoked_at is null and (expires_at is null or expires_at > ?) "
            "and exists (select 1 from json_each(api_keys.scopes) where value = ?)"
        )
        return await self._store.run(lambda db: list(db.query(sql, [now, scope])))


class AccountsRepo:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def insert(self, row: Row, message: str) -> Row:
        now = self._store.now()

        def tx(db: Database) -> Row:
            with db.atomic():
                if db["service_accounts"].count_where("name = ?", [row["name"]]):
                    raise ApplianceError(f"service account {row['name']!r} already exists", status=409, code="account_exists", param="name")
                db["service_accounts"].insert({**row, "created_at": now})
                _insert_event(db, now, "account.created", message, None, {"account_id": row["id"], "role": row["role"]})
                return dict(db["service_accounts"].get(row["id"]))

        return await self._store.run(tx)

    def _get(self, db: Database, account_id: str) -> Row:
        try:
            return dict(db["service_accounts"].get(account_id))
        except NotFoundError:
            raise ApplianceError(f"service account {account_id!r} not found", status=404, code="account_not_found", param="id") from None

    async def get(self, account_id: str) -> Row:
        return await self._store.run(self._get, account_id)

    async def list(self) -> list[Row]:
        return await self._store.run(lambda db: list(db.query("select * from service_accounts order by created_at, id")))

    async def update(self, account_id: str, fields: Row, message: str) -> Row:
        now = self._store.now()

        def tx(db: Database) -> Row:
            with db.atomic():
                self._get(db, account_id)
                if fields:
                    db["service_accounts"].update(account_id, fields)
                _insert_event(db, now, "account.updated", message, None, {"account_id": account_id, "fields": sorted(fields)})
                return self._get(db, account_id)

        return await self._store.run(tx)

    async def delete(self, account_id: str, message: str) -> None:
        now = self._store.now()

        def tx(db: Database) -> None:
            with db.atomic():
                self._get(db, account_id)
                db["service_accounts"].delete(account_id)
                _insert_event(db, now, "account.deleted", message, None, {"account_id": account_id})

        await self._store.run(tx)

    async def touch(self, account_id: str) -> None:
        now = self._store.now()
        await self._store.run(lambda db: db.execute("update service_accounts set last_token_at = ? where id = ?", [now, account_id]))


class UsageRepo:
    """Hourly totals per key and endpoint; written in batches by the flush job."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def prune(self, before_hour: str) -> int:
        """Delete the hours before `before_hour` ('2026-11-23T11'); returns how many rows."""
        return await self._store.run(lambda db: db.execute("delete from usage where hour < ?", [before_hour]).rowcount)

    async def add(self, rows: list[tuple[str, str, str, int, int, int, int]], events: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        """Add (hour, key_id, endpoint, requests, prompt, completion, errors) to the totals; write `events` alongside."""

        def tx(db: Database) -> None:
            with db.atomic():
                db.conn.executemany(
                    "insert into usage (hour, key_id, endpoint, requests, prompt_tokens, completion_tokens, errors) values (?, ?, ?, ?, ?, ?, ?) "
                    "on conflict (hour, key_id, endpoint) do update set requests = requests + excluded.requests, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, completion_tokens = completion_tokens + excluded.completion_tokens, "
                    "errors = errors + excluded.errors",
                    rows,
                )
                for time, kind, message, details in events:
                    _insert_event(db, time, kind, message, None, details)

        await self._store.run(tx)

    async def query(self, *, key_id: str | None, endpoint: str | None, since: str | None, until: str | None) -> list[Row]:
        where, params = [], []
        for column, op, value in (("key_id", "=", key_id), ("endpoint", "=", endpoint), ("hour", ">=", since), ("hour", "<", until)):
            if value is not None:
                where.append(f"{column} {op} ?")
                params.append(value)
        sql = "select * from usage" + (" where " + " and ".join(where) if where else "") + " order by hour, key_id, endpoint"
        return await self._store.run(lambda db: list(db.query(sql, params)))
