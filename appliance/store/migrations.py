"""Versioned schema of the state database (sqlite-utils migrations: applied in order, once each)."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("appliance")


@migrations(name="m001_initial")
def m001_initial(db: Database) -> None:
    db["endpoints"].create(
        {
            "name": str,
            "spec": str,  # JSON: only what the user stated
            "config": str,  # JSON: with the model folder's defaults applied
            "source": str,  # "api" or "config" (declared in the config file)
            "status": str,
            "status_message": str,
            "generation": int,  # bumped when a change needs new workers; replicas of older generations roll
            "created_at": str,
            "updated_at": str,
        },
        pk="name",
        not_null=["spec", "config", "source", "status", "generation", "created_at", "updated_at"],
        defaults={"status_message": "", "generation": 1},
    )
    db["replicas"].create(
        {
            "id": str,
            "endpoint": str,
            "generation": int,
            "state": str,
            "pid": int,
            "pid_started_at": float,  # process start time, so a reused pid is never mistaken for ours
            "port": int,
            "gpus": str,  # JSON list of GPU UUIDs
            "gpu_share": float,
            "work_dir": str,
            "log_path": str,
            "restarts": int,
            "last_error": str,
            "started_at": str,
            "updated_at": str,
        },
        pk="id",
        not_null=["endpoint", "state", "updated_at"],
        defaults={"restarts": 0},
    )
    db["replicas"].create_index(["endpoint"])
    db["events"].create(
        {
            "id": int,
            "time": str,
            "endpoint": str,
            "kind": str,
            "message": str,
            "details": str,  # JSON object
        },
        pk="id",
        not_null=["time", "kind", "message"],
    )
    db["events"].create_index(["endpoint", "id"])
    db["events"].create_index(["kind", "id"])
    db["api_keys"].create(
        {
            "id": str,
            "name": str,
            "prefix": str,  # first characters of the key, shown in listings
            "hash": str,  # sha256 of the whole key; the key itself is never stored
            "scopes": str,  # JSON list
            "endpoints": str,  # JSON list, or null for all
            "created_at": str,
            "expires_at": str,
            "revoked_at": str,
            "last_used_at": str,
            "metadata": str,
        },
        pk="id",
        not_null=["name", "prefix", "hash", "scopes", "created_at"],
    )
    db["api_keys"].create_index(["hash"], unique=True)
