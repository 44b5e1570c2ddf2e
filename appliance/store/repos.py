"""One repository per table. Each public method runs on the store thread; a change and
its audit event are written in one transaction."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from appliance.domain.specs import resting_replicas, worker_fingerprint
from appliance.errors import ApplianceError
from appliance.store.codec import dumps

if TYPE_CHECKING:
    from appliance.store import Store

EndpointRow = dict[str, Any]


def _decode_endpoint(row: dict[str, Any]) -> EndpointRow:
    return {**row, "spec": json.loads(row["spec"]), "config": json.loads(row["config"])}


class _Written(threading.local):
    """The events a store-thread call has inserted so far: logged once its transaction commits."""

    events: list[tuple[str, str, str | None, dict[str, Any] | None]] | None = None


WRITTEN = _Written()


def _insert_event(db: Database, time: str, kind: str, message: str, endpoint: str | None, details: dict[str, Any] | None) -> None:
    db["events"].insert({"time": time, "endpoint": endpoint, "kind": kind, "message": message, "details": dumps(details or {})})
    if WRITTEN.events is not None:
        WRITTEN.events.append((kind, message, endpoint, details))


def _names_of(row: EndpointRow) -> set[str]:
    return {row["name"], *row["config"].get("aliases", [])}


def _check_names_free(db: Database, name: str, aliases: list[str]) -> None:
    """Names and aliases share one namespace: a client's `model` must pick one endpoint."""
    wanted = {name, *aliases}
    for row in db.query("select name, config from endpoints where name != ?", [name]):
        taken = wanted & _names_of(_decode_endpoint({**row, "spec": "{}"}))
        if taken:
            clash = sorted(taken)[0]
            raise ApplianceError(
                f"{clash!r} is already the name or an alias of endpoint {row['name']!r}",
                status=409,
                code="name_conflict",
                param="aliases" if clash != name else "name",
            )


class EndpointsRepo:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, name: str) -> EndpointRow | None:
        def q(db: Database) -> EndpointRow | None:
            try:
                return _decode_endpoint(db["endpoints"].get(name))
            except NotFoundError:
                return None

        return await self._store.run(q)

    async def list(self) -> list[EndpointRow]:
        return await self._store.run(lambda db: [_decode_endpoint(r) for r in db.query("select * from endpoints order by name")])

    async def create(self, row: EndpointRow, message: str, details: dict[str, Any] | None = None) -> EndpointRow:
        now = self._store.now()

        def tx(db: Database) -> EndpointRow:
            with db.atomic():
                if db["endpoints"].count_where("name = ?", [row["name"]]):
                    raise ApplianceError(f"endpoint {row['name']!r} already exists", status=409, code="endpoint_exists", param="name")
                _check_names_free(db, row["name"], row["config"]["aliases"])
                record = {
                    **row,
                    "spec": dumps(row["spec"]),
                    "config": dumps(row["config"]),
                    "generation": 1,
                    "created_at": now,
                    "updated_at": now,
                }
                db["endpoints"].insert(record)
                _insert_event(db, now, "endpoint.created", message, row["name"], details)
                return _decode_endpoint(db["endpoints"].get(row["name"]))

        return await self._store.run(tx)

    async def update(
        self, name: str, changes: EndpointRow, message: str, details: dict[str, Any] | None = None, *, version: int | None = None
    ) -> EndpointRow | None:
        """Apply `changes` (spec/config/source/status…). A new config bumps the generation. With `version`
        (the one the caller read), nothing is written and None is returned if the row changed since."""
        now = self._store.now()

        def tx(db: Database) -> EndpointRow | None:
            with db.atomic():
                try:
                    current = _decode_endpoint(db["endpoints"].get(name))
                except NotFoundError:
                    raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found") from None
                if version is not None and current.get("version", 0) != version:
                    return None
                fields = dict(changes)
                fields["version"] = current.get("version", 0) + 1
                if "config" in fields:
                    _check_names_free(db, name, fields["config"]["aliases"])
                    if worker_fingerprint(fields["config"]) != worker_fingerprint(current["config"]):
                        fields["generation"] = current["generation"] + 1  # new workers needed: replicas roll
                    if fields["config"]["replicas"] != current["config"]["replicas"]:
                        fields["desired_replicas"] = None  # the user's count replaces the autoscaler's
                    fields["config"] = dumps(fields["config"])
                if "spec" in fields:
                    fields["spec"] = dumps(fields["spec"])
                db["endpoints"].update(name, {**fields, "updated_at": now})
                _insert_event(db, now, "endpoint.updated", message, name, details)
                return _decode_endpoint(db["endpoints"].get(name))

        return await self._store.run(tx)

    async def delete(self, name: str, message: str, details: dict[str, Any] | None = None) -> None:
        now = self._store.now()

        def tx(db: Database) -> None:
            with db.atomic():
                if not db["endpoints"].count_where("name = ?", [name]):
                    raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found")
                db["endpoints"].delete(name)
                db["autoscaling_rules"].delete_where("endpoint = ?", [name])
                db.execute(  # its tokens must not open a later endpoint of the same name
                    "update api_keys set revoked_at = ? where kind = 'endpoint_token' and revoked_at is null "
                    "and exists (select 1 from json_each(api_keys.endpoints) where value = ?)",
                    [now, name],
                )
                _insert_event(db, now, "endpoint.deleted", message, name, details)

        await self._store.run(tx)


    async def set_desired(
        self, name: str, replicas: int, kind: str, message: str, details: dict[str, Any], rules: list[str], *,
        expected: int | None = None, expected_version: int | None = None,
    ) -> bool:
        """The autoscaler's count, its event and the firing rules' last_triggered_at, in one transaction.
        False if the endpoint is gone, if `expected` is given and the desired count is no longer it, or if
        `expected_version` is given and the row changed since (an operator changed the endpoint while the
        autoscaler was deciding, `replicas` to the same count included: the operator wins). The version
        is left as it is: it counts changes of the endpoint's spec, not of the autoscaler's count."""
        now = self._store.now()

        def tx(db: Database) -> bool:
            with db.atomic():
                row = next(iter(db.query("select desired_replicas, config, version from endpoints where name = ?", [name])), None)
                if row is None:
                    return False
                current = row["desired_replicas"] if row["desired_replicas"] is not None else resting_replicas(json.loads(row["config"]))
                if expected is not None and current != expected:
                    return False
                if expected_version is not None and (row["version"] or 0) != expected_version:
                    return False
                db.execute("update endpoints set desired_replicas = ? where name = ?", [replicas, name])
                for rule in rules:
                    db.execute("update autoscaling_rules set last_triggered_at = ? where id = ?", [now, rule])
                _insert_event(db, now, kind, message, name, details)
                return True

        return await self._store.run(tx)

    async def set_status(self, name: str, status: str, message: str) -> None:
        """Derived status from the supervisor; an event only when the status itself changes."""
        now = self._store.now()

        def tx(db: Database) -> None:
            with db.atomic():
                row = next(iter(db.query("select status from endpoints where name = ?", [name])), None)
                if row is None:
                    return
                db.execute("update endpoints set status = ?, status_message = ? where name = ?", [status, message, name])
                if row["status"] != status:
                    _insert_event(db, now, "endpoint.status", f"endpoint {name}: {row['status']} → {status}: {message}", name, {"from": row["status"], "to": status})

        await self._store.write_or_hold(tx)


class ReplicasRepo:
    """The supervisor's record of its workers: what a restarted appliance must clean up."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def save(self, row: dict[str, Any], kind: str, message: str, details: dict[str, Any]) -> None:
        now = self._store.now()

        def tx(db: Database) -> None:
            with db.atomic():
                if row["state"] == "TERMINATED":
                    db["replicas"].delete_where("id = ?", [row["id"]])
                else:
                    db["replicas"].upsert({**row, "gpus": dumps(row["gpus"]), "updated_at": now}, pk="id")
                _insert_event(db, now, kind, message, row["endpoint"], {**details, "state": row["state"]})

        await self._store.write_or_hold(tx)

    async def all(self) -> list[dict[str, Any]]:
        return await self._store.run(lambda db: list(db.query("select * from replicas")))

    async def clear(self) -> None:
        await self._store.run(lambda db: db.execute("delete from replicas"))


class EventsRepo:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def add(self, kind: str, message: str, *, endpoint: str | None = None, details: dict[str, Any] | None = None) -> None:
        now = self._store.now()
        await self._store.write_or_hold(_insert_event, now, kind, message, endpoint, details)

    async def prune(self, older_than: str, keep: int) -> int:
        """Delete events older than `older_than` (an iso time) and all but the newest `keep`; returns how many."""

        def tx(db: Database) -> int:
            with db.atomic():
                n = db.execute("delete from events where time < ?", [older_than]).rowcount
                cut = db.execute("select id from events order by id desc limit 1 offset ?", [keep]).fetchone()
                if cut is not None:
                    n += db.execute("delete from events where id <= ?", [cut[0]]).rowcount
            return n

        return await self._store.run(tx)

    async def list(
        self, *, endpoint: str | None = None, kind: str | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; `before` (an event id) pages further back."""
        where, params = [], []
        if endpoint is not None:
            where.append("endpoint = ?")
            params.append(endpoint)
        if kind is not None:
            where.append("(kind = ? or kind like ?)")
            params += [kind, kind + ".%"]
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = "select * from events" + (" where " + " and ".join(where) if where else "") + " order by id desc limit ?"

        def q(db: Database) -> list[dict[str, Any]]:
            return [{**r, "details": json.loads(r["details"] or "{}")} for r in db.query(sql, [*params, limit])]

        return await self._store.run(q)
