"""Autoscaling rules: one row per rule, owned by its endpoint (deleted with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError

from appliance.domain.scaling import declared_rule_prefix
from appliance.errors import ApplianceError
from appliance.store.repos import _insert_event

if TYPE_CHECKING:
    from appliance.store import Store

Row = dict[str, Any]


def _decode(row: Row) -> Row:
    return {**row, "enabled": bool(row["enabled"])}


def _endpoint_exists(db: Database, name: str) -> None:
    if not db["endpoints"].count_where("name = ?", [name]):
        raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found", param="name")


def _get(db: Database, endpoint: str, rule_id: str) -> Row:
    try:
        row = dict(db["autoscaling_rules"].get(rule_id))
    except NotFoundError:
        row = {}
    if row.get("endpoint") != endpoint:
        raise ApplianceError(f"endpoint {endpoint!r} has no autoscaling rule {rule_id!r}", status=404, code="rule_not_found", param="id")
    return _decode(row)


class RulesRepo:
    """Rules are listed in creation order (rowid breaks a tie within a millisecond): the order
    Backend.AI's first-rule-wins policy goes by, as its unordered query yields insertion order."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def insert(self, row: Row, message: str) -> Row:
        now = self._store.now()

        def tx(db: Database) -> Row:
            with db.atomic():
                _endpoint_exists(db, row["endpoint"])
                db["autoscaling_rules"].insert({**row, "enabled": int(row["enabled"]), "created_at": now, "updated_at": now})
                _insert_event(db, now, "autoscaling_rule.created", message, row["endpoint"], {"rule": row["id"]})
                return _get(db, row["endpoint"], row["id"])

        return await self._store.run(tx)

    async def get(self, endpoint: str, rule_id: str) -> Row:
        return await self._store.run(lambda db: _get(db, endpoint, rule_id))

    async def list(self, endpoint: str | None = None) -> list[Row]:
        def q(db: Database) -> list[Row]:
            if endpoint is None:
                return [_decode(r) for r in db.query("select * from autoscaling_rules order by endpoint, created_at, rowid")]
            _endpoint_exists(db, endpoint)
            return [_decode(r) for r in db.query("select * from autoscaling_rules where endpoint = ? order by created_at, rowid", [endpoint])]

        return await self._store.run(q)

    async def update(self, endpoint: str, rule_id: str, fields: Row, message: str) -> Row:
        now = self._store.now()

        def tx(db: Database) -> Row:
            with db.atomic():
                _get(db, endpoint, rule_id)
                values = {**fields, "updated_at": now}
                if "enabled" in values:
                    values["enabled"] = int(values["enabled"])
                db["autoscaling_rules"].update(rule_id, values)
                _insert_event(db, now, "autoscaling_rule.updated", message, endpoint, {"rule": rule_id, "changed": sorted(fields)})
                return _get(db, endpoint, rule_id)

        return await self._store.run(tx)

    async def reconcile_declared(self, endpoint: str, rows: list[Row]) -> tuple[int, int, int]:
        """Make the endpoint's declared rules (ids asr-cfg-…) exactly `rows`, in their order; rules created
        through the API are left alone. Returns (created, updated, deleted)."""
        now = self._store.now()
        prefix = declared_rule_prefix(endpoint)

        def tx(db: Database) -> tuple[int, int, int]:
            created = updated = deleted = 0
            with db.atomic():
                current = {r["id"]: _decode(r) for r in db.query("select * from autoscaling_rules where endpoint = ?", [endpoint])
                           if r["id"].startswith(prefix)}
                wanted = {row["id"] for row in rows}
                for rule_id in sorted(set(current) - wanted):
                    db["autoscaling_rules"].delete(rule_id)
                    _insert_event(db, now, "autoscaling_rule.deleted", f"endpoint {endpoint}: rule {rule_id} removed from the config file", endpoint,
                                  {"rule": rule_id})
                    deleted += 1
                for row in rows:  # inserted in file order: rules made together are evaluated in that order (rowid)
                    old = current.get(row["id"])
                    if old is None:
                        db["autoscaling_rules"].insert({**row, "enabled": int(row["enabled"]), "created_at": now, "updated_at": now})
                        _insert_event(db, now, "autoscaling_rule.created", f"endpoint {endpoint}: rule {row['id']} created from the config file",
                                      endpoint, {"rule": row["id"]})
                        created += 1
                    elif any(old[k] != v for k, v in row.items()):
                        changed = sorted(k for k, v in row.items() if old[k] != v)
                        db["autoscaling_rules"].update(row["id"], {**row, "enabled": int(row["enabled"]), "updated_at": now})
                        _insert_event(db, now, "autoscaling_rule.updated", f"endpoint {endpoint}: rule {row['id']} updated from the config file",
                                      endpoint, {"rule": row["id"], "changed": changed})
                        updated += 1
            return created, updated, deleted

        return await self._store.run(tx)

    async def delete(self, endpoint: str, rule_id: str, message: str) -> None:
        now = self._store.now()

        def tx(db: Database) -> None:
            with db.atomic():
                _get(db, endpoint, rule_id)
                db["autoscaling_rules"].delete(rule_id)
                _insert_event(db, now, "autoscaling_rule.deleted", message, endpoint, {"rule": rule_id})

        await self._store.run(tx)
