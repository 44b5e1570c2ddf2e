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


@migrations(name="m002_access")
def m002_access(db: Database) -> None:
    keys = db["api_keys"]
    keys.add_column("kind", str, not_null_default="key")  # key | endpoint_token
    keys.add_column("rpm_limit", int)
    keys.add_column("tpm_limit", int)
    keys.add_column("max_parallel_requests", int)
    db["service_accounts"].create(
        {
            "id": str,
            "name": str,
            "role": str,  # viewer | user | admin
            "client_id": str,
            "secret_hash": str,  # sha256 of the client secret; the secret itself is never stored
            "created_at": str,
            "disabled_at": str,
            "last_token_at": str,
            "metadata": str,
        },
        pk="id",
        not_null=["name", "role", "client_id", "secret_hash", "created_at"],
    )
    db["service_accounts"].create_index(["client_id"], unique=True)
    db["usage"].create(
        {
            "hour": str,  # '2026-11-23T11' (UTC)
            "key_id": str,  # '' for anonymous calls to public endpoints
            "endpoint": str,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "errors": int,
        },
        pk=("hour", "key_id", "endpoint"),
        not_null=["requests", "prompt_tokens", "completion_tokens", "errors"],
    )
    db["usage"].create_index(["key_id", "hour"])
    db["usage"].create_index(["endpoint", "hour"])


@migrations(name="m003_autoscaling")
def m003_autoscaling(db: Database) -> None:
    # Set by the autoscaler (and wake/idle); null means the configured `replicas`. A user's change to
    # `replicas` clears it.
    db["endpoints"].add_column("desired_replicas", int)
    db["autoscaling_rules"].create(
        {
            "id": str,
            "endpoint": str,
            "metric_source": str,  # gpu | kernel | inference | gateway
            "metric_name": str,
            "comparator": str,
            "threshold": float,
            "step_size": int,
            "min_replicas": int,  # null: the endpoint's min_replicas
            "max_replicas": int,  # null: the endpoint's max_replicas
            "cooldown_seconds": float,
            "window_seconds": float,
            "enabled": int,
            "created_at": str,
            "updated_at": str,
            "last_triggered_at": str,
        },
        pk="id",
        not_null=["endpoint", "metric_source", "metric_name", "comparator", "threshold", "step_size", "cooldown_seconds",
                  "window_seconds", "enabled", "created_at", "updated_at"],
    )
    db["autoscaling_rules"].create_index(["endpoint"])


@migrations(name="m004_endpoint_version")
def m004_endpoint_version(db: Database) -> None:
    # Bumped by every change to an endpoint's spec: an update made from a stale read is retried on the
    # current row instead of overwriting a change made in between.
    db["endpoints"].add_column("version", int, not_null_default=0)


@migrations(name="m005_models")
def m005_models(db: Database) -> None:
    # The model registry: where each model comes from, its file manifest, and its local copy's state.
    db["models"].create(
        {
            "name": str,
            "revision": str,
            "source": str,  # an absolute path or s3://bucket/prefix/
            "endpoint_url": str,  # S3 only
            "region": str,
            "credentials": str,  # the name of a [models.credentials.<name>] entry, never a secret
            "origin": str,  # "api" or "config" (declared in the config file)
            "spec": str,  # JSON: what the user stated
            "local_path": str,  # state_dir/models/<name>/<revision>
            "size": int,
            "files": int,
            "manifest": str,  # JSON list of {path, size, sha256}
            "state": str,  # REGISTERED | WARMING | READY | FAILED | EVICTED
            "progress": str,  # JSON: bytes and files done, rate, ETA of the last warm
            "last_error": str,
            "last_used_at": str,
            "ready_at": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="name",
        not_null=["revision", "source", "origin", "spec", "local_path", "size", "files", "manifest", "state", "created_at", "updated_at"],
        defaults={"last_error": "", "progress": "{}"},
    )
