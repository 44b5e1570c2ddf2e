"""State survives restarts; the config file's [[endpoints]] are applied at every start."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin

from appliance.store import open_database
from appliance.store.migrations import migrations


async def test_endpoints_and_key_survive_an_app_restart(start_app: Any, make_config: Any, model_folder: Path) -> None:
    config = make_config()
    first: Admin = await start_app(config)
    status, created = await first.call("POST", "/api/v1/endpoints", json_body={"name": "keep", "model_folder": str(model_folder), "replicas": 2, "max_replicas": 3})
    assert status == 201
    key = config.admin_key_path.read_text()
    await first.client.close()

    second: Admin = await start_app(config)
    assert config.admin_key_path.read_text() == key  # no new key on a second start
    status, again = await second.call("GET", "/api/v1/endpoints/keep")
    assert status == 200
    assert {k: again[k] for k in ("replicas", "max_replicas", "created_at", "generation")} == {
        k: created[k] for k in ("replicas", "max_replicas", "created_at", "generation")
    }
    _, events = await second.call("GET", "/api/v1/events?kind=server")
    assert [e["kind"] for e in events["data"]] == ["server.started", "server.stopped", "server.started"]


async def test_declared_endpoints_are_created_updated_and_removed(start_app: Any, make_config: Any, model_folder: Path, seed_folder: Path) -> None:
    declared = {"name": "decl", "model_folder": str(model_folder), "runtime": "vllm"}
    first: Admin = await start_app(make_config({"endpoints": [declared, {"name": "seed", "model_folder": str(seed_folder)}]}))
    await first.call("POST", "/api/v1/endpoints", json_body={"name": "mine", "model_folder": str(model_folder)})
    _, ep = await first.call("GET", "/api/v1/endpoints/decl")
    assert ep["source"] == "config" and ep["generation"] == 1
    await first.client.close()

    # Same file again: nothing changes.
    second: Admin = await start_app(make_config({"endpoints": [declared, {"name": "seed", "model_folder": str(seed_folder)}]}))
    _, ep = await second.call("GET", "/api/v1/endpoints/decl")
    assert ep["generation"] == 1
    await second.client.close()

    # Changed and removed: updated, deleted; the API-made endpoint is untouched.
    third: Admin = await start_app(make_config({"endpoints": [{**declared, "replicas": 2, "max_replicas": 2}]}))
    _, listing = await third.call("GET", "/api/v1/endpoints")
    assert sorted(e["name"] for e in listing["data"]) == ["decl", "mine"]
    _, ep = await third.call("GET", "/api/v1/endpoints/decl")
    assert ep["replicas"] == 2 and ep["generation"] == 1  # scaling alone needs no new workers
    _, events = await third.call("GET", "/api/v1/endpoints/seed/events")
    assert events["data"][0]["kind"] == "endpoint.deleted" and "removed from the config file" in events["data"][0]["message"]


async def test_a_broken_declared_endpoint_does_not_stop_the_others(start_app: Any, make_config: Any, model_folder: Path) -> None:
    admin: Admin = await start_app(
        make_config({"endpoints": [{"name": "gone", "model_folder": "/no/such/dir"}, {"name": "fine", "model_folder": str(model_folder)}]})
    )
    _, listing = await admin.call("GET", "/api/v1/endpoints")
    assert [e["name"] for e in listing["data"]] == ["fine"]
    _, events = await admin.call("GET", "/api/v1/endpoints/gone/events")
    assert events["data"][0]["kind"] == "config.error" and "/no/such/dir does not exist" in events["data"][0]["message"]
    _, started = await admin.call("GET", "/api/v1/events?kind=server.started")
    assert started["data"][0]["details"]["declared_problems"] == ["endpoints.gone: model_folder: /no/such/dir does not exist"]


def test_migrations_are_versioned_idempotent_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    db = open_database(path)
    applied = [m.name for m in migrations.applied(db)]
    assert applied == ["m001_initial", "m002_access", "m003_autoscaling", "m004_endpoint_version", "m005_models"]
    assert {"endpoints", "replicas", "events", "api_keys", "service_accounts", "usage"} <= set(db.table_names())
    db.close()
    db = open_database(path)  # second start: nothing re-applied, nothing lost
    assert [m.name for m in migrations.applied(db)] == applied and migrations.pending(db) == []
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_corrupt_database_fails_with_a_clear_error(tmp_path: Path) -> None:
    from appliance.errors import ApplianceError

    path = tmp_path / "bad.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ApplianceError, match="state database .*bad.db"):
        open_database(path)
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(path).execute("select * from sqlite_master").fetchall()


def test_an_older_database_upgrades_and_keeps_its_keys(tmp_path: Path) -> None:
    import sqlite_utils

    from appliance.security.auth import hash_key

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    migrations.apply(old, stop_before="m002_access")
    old["api_keys"].insert({"id": "key_1", "name": "old", "prefix": "ak-abcdef", "hash": hash_key("ak-old"), "scopes": '["admin"]',
                            "created_at": "2026-01-01T00:00:00.000Z"})
    old.close()
    db = open_database(path)
    row = db["api_keys"].get("key_1")
    assert row["kind"] == "key" and row["rpm_limit"] is None and row["hash"] == hash_key("ak-old")
    db.close()
