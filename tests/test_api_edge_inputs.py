"""Edge inputs the admin API once answered with a 500, or with a body its openapi.json does not
describe: found by generating requests from the document (tests/test_fuzz_api.py) and by the edge
values around what those requests reached."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin
from pydantic import ValidationError

from appliance.api.services import SERVICES
from appliance.domain.specs import MAX_REPLICAS, EndpointSpec

pytestmark = pytest.mark.usefixtures("slow_callback_guard")
U64_MAX = (1 << 64) - 1  # past SQLite's INTEGER, still an integer to a JSON parser
RULE = {"metric_source": "gateway", "metric_name": "queue_length", "comparator": "GREATER_THAN", "threshold": 5, "step_size": 1}


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"server": {"max_body_bytes": "64kb"}}))


async def raw(admin: Admin, method: str, path: str, text: str) -> tuple[int, Any]:
    """A body as written, for numbers json.dumps would not write (1e400) or would write differently."""
    return await admin.call(method, path, data=text.encode(), headers={"Content-Type": "application/json"})


async def endpoint(admin: Admin, folder: Path) -> None:
    status, body = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "seed", "model_folder": str(folder), "replicas": 0})
    assert status == 201, body


async def test_a_non_ascii_client_id_is_an_unknown_client(admin: Admin) -> None:
    status, _ = await admin.call("POST", "/api/v1/service-accounts", json_body={"name": "svc", "role": "user"})
    assert status == 201  # an account to compare with: the comparison refused non-ASCII text with a TypeError
    resp = await admin.client.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": "clïent", "client_secret": "s"})
    assert resp.status == 401 and (await resp.json())["error"] == "invalid_client"


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"grant_type=client_credentials&client_id=\xff\xfe&client_secret=s", "application/x-www-form-urlencoded", 400),  # not UTF-8
    (b"grant_type=client_credentials", "application/x-www-form-urlencoded; charset=no-such-charset", 400),
    (b"grant_type=client_credentials&pad=" + b"a" * (128 << 10), "application/x-www-form-urlencoded", 413),
], ids=["not-utf-8", "unknown-charset", "too-large"])
async def test_a_token_form_that_cannot_be_read_is_an_rfc_6749_error(admin: Admin, body: bytes, content_type: str, status: int) -> None:
    resp = await admin.client.post("/oauth/token", data=body, headers={"Content-Type": content_type})
    assert resp.status == status and (await resp.json())["error"] == "invalid_request"


@pytest.mark.parametrize("body", [
    json.dumps({**RULE, "threshold": "nan"}),  # stored as NULL: the insert failed
    json.dumps(RULE)[:-1] + ', "cooldown_seconds": 1e400}',  # infinity: shown back as null, which the schema does not allow
])
async def test_a_rule_with_a_non_finite_number_is_refused(admin: Admin, seed_folder: Path, body: str) -> None:
    await endpoint(admin, seed_folder)
    status, err = await raw(admin, "POST", "/api/v1/endpoints/seed/autoscaling-rules", body)
    assert status == 422 and err["error"]["code"] == "validation_error", err


async def test_an_endpoint_with_a_non_finite_number_is_refused(admin: Admin, seed_folder: Path) -> None:
    await endpoint(admin, seed_folder)
    status, err = await raw(admin, "PATCH", "/api/v1/endpoints/seed", '{"queue_timeout_seconds": 1e400}')
    assert status == 422 and err["error"]["param"] == "queue_timeout_seconds", err


async def test_rows_stored_with_infinity_before_it_was_refused_are_still_shown(admin: Admin, seed_folder: Path) -> None:
    await endpoint(admin, seed_folder)
    status, rule = await admin.call("POST", "/api/v1/endpoints/seed/autoscaling-rules", json_body=RULE)
    assert status == 201, rule
    store = admin.client.app[SERVICES].store
    await store.run(lambda db: db.execute("update autoscaling_rules set cooldown_seconds = ? where id = ?", [math.inf, rule["id"]]))

    def infinite_timeout(db: Any) -> None:  # as json.dumps wrote it
        config = json.loads(db.execute("select config from endpoints where name = 'seed'").fetchone()[0])
        db.execute("update endpoints set config = ? where name = 'seed'", [json.dumps({**config, "queue_timeout_seconds": math.inf})])

    await store.run(infinite_timeout)
    assert (await admin.call("GET", "/api/v1/endpoints/seed/autoscaling-rules"))[0] == 200
    assert (await admin.call("GET", "/api/v1/endpoints/seed"))[0] == 200


async def test_replica_counts_stop_at_max_replicas(admin: Admin, seed_folder: Path) -> None:
    """100000 replicas opened a log file each until the process ran out of file descriptors."""
    with pytest.raises(ValidationError, match="replicas"):
        EndpointSpec.model_validate({"name": "many", "model_folder": str(seed_folder), "replicas": MAX_REPLICAS + 1})
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "wide", "model_folder": str(seed_folder), "replicas": 0, "max_replicas": 10**6})
    assert status == 422 and err["error"]["param"] == "max_replicas", err


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/keys", {"name": "k", "rpm_limit": U64_MAX}),
    ("/api/v1/endpoints/seed/autoscaling-rules", {**RULE, "step_size": U64_MAX}),
    ("/api/v1/endpoints/seed/autoscaling-rules", {**RULE, "max_replicas": U64_MAX}),
])
async def test_integers_past_sqlites_range_are_refused(admin: Admin, seed_folder: Path, path: str, body: dict[str, Any]) -> None:
    await endpoint(admin, seed_folder)
    status, err = await admin.call("POST", path, json_body=body)
    assert status == 422 and err["error"]["code"] == "validation_error", err


@pytest.mark.parametrize(("field", "value"), [
    ("resources", {"mem": "9" * 400 + "gb"}),  # a size too long for a float
    ("health_check", {"path": "/health", "max_retries": 10**400}),  # interval × (max_retries + 1) overflowed
])
async def test_an_endpoint_number_too_large_for_a_float_is_refused(admin: Admin, seed_folder: Path, field: str, value: dict[str, Any]) -> None:
    spec = {"name": "huge", "model_folder": str(seed_folder), "replicas": 0, field: value}
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body=spec)
    assert status == 422 and err["error"]["param"].startswith(field), err


@pytest.mark.parametrize("fields", [
    '{"name": "k", "expires_in": "99999999999999999999d"}',
    '{"name": "k", "expires_in": 1' + "0" * 400 + "}",  # too large for a float
    '{"name": "k", "expires_at": "9999-12-31T23:59:59-14:00"}',  # year 10000 in UTC
])
async def test_a_key_expiry_past_year_9999_is_refused(admin: Admin, fields: str) -> None:
    status, err = await raw(admin, "POST", "/api/v1/keys", fields)
    assert status == 422 and err["error"]["code"] in ("invalid_expiry", "invalid_duration"), err


@pytest.mark.parametrize("query", ["since=99999999999999999999d", "since=0001-01-01T00:00:00%2B14:00", "until=9999-12-31T23:59:59-14:00"])
async def test_usage_over_instants_beyond_the_calendar_is_the_usage_up_to_its_edge(admin: Admin, query: str) -> None:
    status, body = await admin.call("GET", f"/api/v1/usage?{query}")
    assert status == 200 and body["object"] == "list", body


@pytest.mark.parametrize("field", ["model_folder", "definition_file", "binary"])
async def test_a_model_folder_that_cannot_be_read_is_a_422(admin: Admin, seed_folder: Path, field: str) -> None:
    spec: dict[str, Any] = {"name": "unread", "model_folder": str(seed_folder), "replicas": 0}
    if field == "model_folder":
        spec["model_folder"] = "/" + "a" * 5000  # longer than a file name may be
    elif field == "definition_file":
        spec["definition_file"] = "a" * 5000
    else:
        (seed_folder / "weights.bin").write_bytes(b"\xff\xfe\x00binary")
        spec["definition_file"] = "weights.bin"
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body=spec)
    assert status == 422 and err["error"]["code"] == "invalid_model_folder", err


@pytest.mark.parametrize(("raw", "says"), [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"name": "x", "model_folder": "\\ud800"}', "unpaired surrogate"),
    (b'{"name": "x", "replicas": NaN}', "NaN is not a JSON value"),
])
def test_bodies_that_are_not_json_text_are_a_400(raw: bytes, says: str) -> None:
    from appliance.api.http import parse_json
    from appliance.errors import ApplianceError

    with pytest.raises(ApplianceError) as err:
        parse_json(raw)
    assert err.value.status == 400 and err.value.code == "invalid_json" and says in err.value.message
