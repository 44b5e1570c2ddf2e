"""The models table: registered models, their manifests and the state of their local copies. A change
and its event (model.registered, model.warming, model.ready, …) are written in one transaction."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from appliance.errors import ApplianceError
from appliance.store.codec import dumps
from appliance.store.repos import _insert_event

if TYPE_CHECKING:
    from appliance.store import Store

ModelRow = dict[str, Any]
_JSON = ("spec", "manifest", "progress")


def _decode(row: dict[str, Any]) -> ModelRow:
    return {**row, **{k: json.loads(row[k] or ("[]" if k == "manifest" else "{}")) for k in _JSON}}


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: dumps(v) if k in _JSON else v for k, v in fields.items()}


def _users(db: Database, name: str) -> list[str]:
    """Endpoints that serve the model (their stated spec names it)."""
    return [r["name"] for r in db.query("select name from endpoints where json_extract(spec, '$.model') = ? order by name", [name])]


def _not_found(name: str) -> ApplianceError:
    return ApplianceError(f"model {name!r} not found", status=404, code="model_not_found", param="name")


class ModelsRepo:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, name: str) -> ModelRow | None:
        def q(db: Database) -> ModelRow | None:
            try:
                return _decode(db["models"].get(name))
            except NotFoundError:
                return None

        return await self._store.run(q)

    async def list(self) -> list[ModelRow]:
        return await self._store.run(lambda db: [_decode(r) for r in db.query("select * from models order by name")])

    async def create(self, row: ModelRow, message: str, details: dict[str, Any] | None = None) -> ModelRow:
        now = self._store.now()

        def tx(db: Database) -> ModelRow:
            with db.atomic():
                if db["models"].count_where("name = ?", [row["name"]]):
                    raise ApplianceError(f"model {row['name']!r} already exists", status=409, code="model_exists", param="name")
                db["models"].insert(_encode({**row, "created_at": now, "updated_at": now}))
                _insert_event(db, now, "model.registered", message, None, {"model": row["name"], **(details or {})})
                return _decode(db["models"].get(row["name"]))

        return await self._store.run(tx)

    async def update(self, name: str, changes: dict[str, Any], kind: str | None = None, message: str = "", details: dict[str, Any] | None = None) -> ModelRow:
        """Apply `changes`; with `kind`, record that event in the same transaction."""
        now = self._store.now()

        def tx(db: Database) -> ModelRow:
            with db.atomic():
                if not db["models"].count_where("name = ?", [name]):
                    raise _not_found(name)
                db["models"].update(name, _encode({**changes, "updated_at": now}))
                if kind is not None:
                    _insert_event(db, now, kind, message, None, {"model": name, **(details or {})})
                return _decode(db["models"].get(name))

        return await self._store.run(tx)

    async def save_progress(self, name: str, progress: dict[str, Any], manifest: list[dict[str, Any]] | None = None) -> None:
        """A warm's progress (and the sha256s it learnt), held in memory like other control writes when the disk is full."""
        fields: dict[str, Any] = {"progress": progress} if manifest is None else {"progress": progress, "manifest": manifest}

        def tx(db: Database) -> None:
            if db["models"].count_where("name = ?", [name]):  # deleted meanwhile: nothing to note
                db["models"].update(name, _encode(fields))

        await self._store.write_or_hold(tx)

    async def delete(self, name: str, message: str) -> None:
        """Delete the row; refused (409) while an endpoint serves the model, checked in the same transaction."""
        now = self._store.now()

        def tx(db: Database) -> None:
            with db.atomic():
                if not db["models"].count_where("name = ?", [name]):
                    raise _not_found(name)
                users = _users(db, name)
                if users:
                    raise ApplianceError(
                        f"model {name!r} is used by endpoint(s) {', '.join(users)}: delete them or point them elsewhere first",
                        status=409, code="model_in_use", param="name",
                    )
                db["models"].delete(name)
                _insert_event(db, now, "model.deleted", message, None, {"model": name})

        await self._store.run(tx)

    async def users(self, name: str) -> list[str]:
        return await self._store.run(_users, name)

    async def in_use(self) -> dict[str, list[str]]:
        """The endpoints that serve each model some endpoint serves."""
        sql = "select json_extract(spec, '$.model') as m, name from endpoints where json_extract(spec, '$.model') is not null order by name"

        def q(db: Database) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for r in db.query(sql):
                out.setdefault(r["m"], []).append(r["name"])
            return out

        return await self._store.run(q)

    async def touch(self, name: str) -> None:
        """A replica is about to start from the model: it is the most recently used (eviction goes by this)."""
        now = self._store.now()
        await self._store.write_or_hold(lambda db: db.execute("update models set last_used_at = ? where name = ?", [now, name]))
