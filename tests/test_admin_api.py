"""The admin API over real HTTP on 127.0.0.1 (aiohttp test server, port 0)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin

pytestmark = pytest.mark.usefixtures("slow_callback_guard")


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"server": {"max_body_bytes": 4096}}))


@pytest.fixture
def model_folder(model_folder: Path) -> Path:
    """conftest's folder with weights beside its config.json: what the vllm runtime is refused without."""
    (model_folder / "model.safetensors").write_bytes(b"")
    return model_folder


def spec(folder: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "llama", "model_folder": str(folder), "runtime": "vllm", **extra}


async def test_health_and_readiness(admin: Admin) -> None:
    resp = await admin.client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"
    resp = await admin.client.get("/readyz")
    assert resp.status == 200


async def test_admin_key_is_bootstrapped_with_mode_0600(admin: Admin) -> None:
    path = admin.config.admin_key_path
    assert path.stat().st_mode & 0o777 == 0o600
    key = path.read_text().strip()
    assert key.startswith("ak-") and len(key) >= 3 + 43
    db_bytes = b"".join(p.read_bytes() for p in path.parent.glob("appliance.db*"))
    assert key.encode() not in db_bytes  # only the hash is stored


async def test_admin_routes_need_the_admin_key(admin: Admin) -> None:
    resp = await admin.client.get("/api/v1/endpoints")
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "missing_api_key" and body["error"]["type"] == "authentication_error"
    assert body["error"]["source"] == "appliance"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer ak-wrong", "Basic Zm9vOmJhcg==", "Bearer", ""):
        resp = await admin.client.get("/api/v1/endpoints", headers={"Authorization": header})
        assert resp.status == 401, header
    resp = await admin.client.get("/api/v1/endpoints", headers={"Authorization": admin.headers["Authorization"].replace("Bearer", "BackendAI")})
    assert resp.status == 200  # Backend.AI's header form is accepted too
    resp = await admin.client.get("/api/v1/openapi.json")
    assert resp.status == 200  # the schema is public


async def test_endpoint_crud(admin: Admin, model_folder: Path) -> None:
    status, ep = await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, replicas=2, max_replicas=4, resources={"gpu_share": 0.5, "mem": "8gb"}))
    assert status == 201, ep
    assert ep["name"] == "llama" and ep["status"] == "PENDING" and ep["source"] == "api" and ep["generation"] == 1
    assert (ep["replicas"], ep["min_replicas"], ep["max_replicas"]) == (2, 2, 4)
    assert ep["resources"] == {
        "gpus": 0, "gpu_share": 0.5, "cpu": None, "mem": 8 << 30, "gpu_name": None, "gpu_min_free_mem": None, "placement": "spread"
    }
    assert ep["public"] is False and ep["served_model_name"] == "llama"
    assert ep["created_at"].endswith("Z")

    status, listing = await admin.call("GET", "/api/v1/endpoints")
    assert status == 200 and listing["object"] == "list" and [e["name"] for e in listing["data"]] == ["llama"]

    status, one = await admin.call("GET", "/api/v1/endpoints/llama")
    volatile = {"status", "status_message", "replica_counts"}  # the supervisor is already at work
    assert status == 200 and {k: v for k, v in one.items() if k not in volatile} == {k: v for k, v in ep.items() if k not in volatile}

    status, updated = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"replicas": 3, "public": True, "environ": {"A": "1"}})
    assert status == 200, updated
    assert updated["replicas"] == 3 and updated["public"] is True and updated["environ"] == {"A": "1"}
    assert updated["generation"] == 2 and updated["created_at"] == ep["created_at"]  # environ changed: new workers
    status, scaled = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"replicas": 4, "description": "x"})
    assert status == 200 and scaled["generation"] == 2  # scaling and labels restart nothing

    status, reset = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"resources": None, "public": None})
    assert status == 200 and reset["resources"]["gpu_share"] is None and reset["public"] is False
    assert "resources" not in reset["spec"]

    status, gone = await admin.call("DELETE", "/api/v1/endpoints/llama")
    assert status == 200 and gone == {"id": "llama", "object": "endpoint", "deleted": True}
    status, err = await admin.call("GET", "/api/v1/endpoints/llama")
    assert status == 404 and err["error"]["code"] == "endpoint_not_found"

    status, events = await admin.call("GET", "/api/v1/endpoints/llama/events?limit=1000")
    assert status == 200
    events["data"] = [e for e in events["data"] if e["kind"] in ("endpoint.created", "endpoint.updated", "endpoint.deleted")]
    assert [e["kind"] for e in events["data"]] == ["endpoint.deleted", "endpoint.updated", "endpoint.updated", "endpoint.updated", "endpoint.created"]
    assert events["data"][1]["details"] == {"patch": {"public": None, "resources": None}}
    assert events["data"][3]["details"] == {"patch": {"public": True, "replicas": 3, "environ": {"A": "1"}}}


async def test_events_paging_and_filters(admin: Admin, model_folder: Path) -> None:
    await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, replicas=0))
    for n in range(1, 5):
        await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"max_replicas": n})
    status, page = await admin.call("GET", "/api/v1/endpoints/llama/events?kind=endpoint.updated&limit=2")
    assert status == 200 and len(page["data"]) == 2 and page["has_more"] is True
    assert [e["details"]["patch"]["max_replicas"] for e in page["data"]] == [4, 3]
    status, rest = await admin.call("GET", f"/api/v1/endpoints/llama/events?kind=endpoint.updated&limit=100&before={page['data'][-1]['id']}")
    assert [e["details"]["patch"]["max_replicas"] for e in rest["data"]] == [2, 1] and rest["has_more"] is False
    status, created = await admin.call("GET", "/api/v1/events?kind=endpoint.created")
    assert [e["endpoint"] for e in created["data"]] == ["llama"]
    status, everything = await admin.call("GET", "/api/v1/events?kind=endpoint&endpoint=llama")
    assert {e["kind"] for e in everything["data"]} >= {"endpoint.created", "endpoint.updated"}
    assert all(e["kind"].startswith("endpoint.") for e in everything["data"])
    status, err = await admin.call("GET", "/api/v1/events?limit=abc")
    assert status == 400 and err["error"]["param"] == "limit"
    status, err = await admin.call("GET", "/api/v1/endpoints/never/events")
    assert status == 404


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        ({"name": "bad name", "model_folder": "{folder}"}, 422, "validation_error", "name: must be 1–50 characters"),
        ({"name": "x" * 51, "model_folder": "{folder}"}, 422, "validation_error", "name: must be 1–50 characters"),
        ({"model_folder": "{folder}"}, 422, "validation_error", "name: required"),
        ({"name": "a", "model_folder": "/no/such/folder"}, 422, "invalid_model_folder", "model_folder: /no/such/folder does not exist"),
        ({"name": "a", "model_folder": "{folder}", "replicas": 3, "max_replicas": 2}, 422, "validation_error", "max_replicas: must be ≥ replicas (3)"),
        ({"name": "a", "model_folder": "{folder}", "replicas": -1}, 422, "validation_error", "replicas: must be ≥ 0"),
        ({"name": "a", "model_folder": "{folder}", "runtime": "docker"}, 422, "validation_error", "runtime: must be one of"),
        ({"name": "a", "model_folder": "{folder}", "runtime": "custom"}, 422, "definition_required", "custom runtime needs a model definition"),
        ({"name": "a", "model_folder": "{folder}", "runtime": "sglang"}, 422, "runtime_not_installed", "needs the Python package 'sglang'"),
        ({"name": "a", "model_folder": "{folder}", "replicas": "2"}, 422, "validation_error", "replicas: must be an integer (got a string)"),
        ({"name": "a", "model_folder": "{folder}", "gpus": 1}, 422, "validation_error", "gpus: unknown key"),
        ({"name": "a", "model_folder": "{folder}", "environ": {"1BAD": "x"}}, 422, "validation_error", "'1BAD' is not a valid environment variable name"),
    ],
)
async def test_create_rejects_bad_input(admin: Admin, model_folder: Path, body: dict[str, Any], status: int, code: str, message: str) -> None:
    body = {k: (str(model_folder) if v == "{folder}" else v) for k, v in body.items()}
    got, err = await admin.call("POST", "/api/v1/endpoints", json_body=body)
    assert got == status, err
    assert err["error"]["code"] == code
    assert message in err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    _, listing = await admin.call("GET", "/api/v1/endpoints")
    assert listing["data"] == []  # nothing half-created


async def test_malformed_bodies(admin: Admin) -> None:
    for raw in (b"{bad", b"", b"\xff\xfe", b"[1, 2]"):
        status, err = await admin.call("POST", "/api/v1/endpoints", data=raw, headers={"Content-Type": "application/json"})
        assert status == 400, raw
        assert err["error"]["code"] == "invalid_json" and err["error"]["type"] == "invalid_request_error"


async def test_oversized_body_is_413(admin: Admin) -> None:
    status, err = await admin.call("POST", "/api/v1/endpoints", data=b'{"name": "' + b"x" * 5000 + b'"}', headers={"Content-Type": "application/json"})
    assert status == 413
    assert err["error"]["code"] == "body_too_large" and "4096" in err["error"]["message"]


async def test_conflicts(admin: Admin, model_folder: Path) -> None:
    assert (await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, aliases=["llama3"])))[0] == 201
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder))
    assert status == 409 and err["error"]["code"] == "endpoint_exists" and err["error"]["type"] == "conflict_error"
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, name="llama3"))
    assert status == 409 and err["error"]["code"] == "name_conflict"
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, name="other", aliases=["llama"]))
    assert status == 409 and "already the name or an alias of endpoint 'llama'" in err["error"]["message"]


async def test_update_errors(admin: Admin, model_folder: Path) -> None:
    await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, max_replicas=2))
    status, err = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"replicas": 5})
    assert status == 422 and err["error"]["message"] == "max_replicas: must be ≥ replicas (5)"
    status, err = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"name": "renamed"})
    assert status == 422 and err["error"]["code"] == "immutable_field"
    status, err = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"bogus": 1})
    assert status == 422 and err["error"]["message"] == "bogus: unknown key"
    status, err = await admin.call("PATCH", "/api/v1/endpoints/nope", json_body={"replicas": 1})
    assert status == 404
    status, err = await admin.call("PATCH", "/api/v1/endpoints/bad%20name", json_body={"replicas": 1})
    assert status == 400 and err["error"]["code"] == "invalid_name"
    _, ep = await admin.call("GET", "/api/v1/endpoints/llama")
    assert ep["generation"] == 1  # failed updates changed nothing


async def test_unknown_routes_and_methods(admin: Admin) -> None:
    status, err = await admin.call("GET", "/api/v1/nothing")
    assert status == 404 and err["error"]["code"] == "not_found"
    resp = await admin.client.put("/api/v1/endpoints", headers=admin.headers)
    body = await resp.json()
    assert resp.status == 405 and body["error"]["code"] == "method_not_allowed" and "GET" in resp.headers["Allow"]


async def test_openapi_describes_every_route_and_schema(admin: Admin) -> None:
    from appliance.api.app import all_routes

    resp = await admin.client.get("/api/v1/openapi.json")
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    for route in all_routes():
        assert route.method.lower() in doc["paths"][route.path], route.path
    schemas = doc["components"]["schemas"]
    assert {"EndpointSpec", "EndpointPatch", "EndpointView", "ErrorResponse", "HealthCheck", "Resources"} <= set(schemas)
    create = doc["paths"]["/api/v1/endpoints"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/EndpointSpec"}
    assert "201" in create["responses"] and create["security"] == [{"bearer": []}]
    assert schemas["EndpointSpec"]["additionalProperties"] is False
    assert set(schemas["EndpointSpec"]["required"]) == {"name"}  # and one of model_folder or model


async def test_openapi_lists_every_status_an_operation_answers_with_its_body(admin: Admin) -> None:
    """No catch-all `default`: a client, or a request generator checking conformance, can tell a listed
    answer from a fault. Answers that are not OpenAI-shaped errors say what they are."""
    doc = await (await admin.client.get("/api/v1/openapi.json")).json()
    assert not [(path, method) for path, ops in doc["paths"].items() for method, op in ops.items() if "default" in op["responses"]]
    endpoint = doc["paths"]["/api/v1/endpoints/{name}"]
    assert set(endpoint["get"]["responses"]) == {"200", "400", "401", "403", "404", "503"}
    assert {"409", "413", "422"} <= set(endpoint["patch"]["responses"])
    assert endpoint["get"]["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "request_id" in doc["components"]["schemas"]["ErrorBody"]["properties"]  # every error body carries it
    readyz = doc["paths"]["/readyz"]["get"]["responses"]
    assert readyz["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Health")  # its own body, not an error
    logs = doc["paths"]["/api/v1/endpoints/{name}/replicas/{replica}/logs"]["get"]["responses"]["200"]
    assert set(logs["content"]) == {"text/plain"}
    token = doc["paths"]["/oauth/token"]["post"]
    assert token["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]["$ref"].endswith("/TokenRequest")
    assert all(r["content"]["application/json"]["schema"]["$ref"].endswith("/OAuthErrorBody") for code, r in token["responses"].items() if code != "200")
    metrics = doc["paths"]["/metrics"]["get"]
    assert set(metrics["responses"]["200"]["content"]) == {"text/plain"} and {"401", "403"} <= set(metrics["responses"])
    assert metrics["security"] == [{"bearer": []}, {}]  # a key unless [metrics] public


async def test_custom_folder_endpoint_shows_definition_and_defaults(admin: Admin, seed_folder: Path) -> None:
    status, ep = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "seed", "model_folder": str(seed_folder)})
    assert status == 201, ep
    assert ep["runtime"] == "custom" and ep["definition_file"] == "model-definition.yaml"
    assert ep["health_check"]["initial_delay"] == 60.0
    for name in ("config.json", "model.safetensors"):  # vllm serves the folder itself: it needs a model in it
        (seed_folder / name).write_text("{}")
    status, ep = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "seedvllm", "model_folder": str(seed_folder), "runtime": "vllm"})
    assert ep["environment"] == {"image": "example.com/model-server:latest", "architecture": "x86_64"}
    assert ep["resources"]["gpu_share"] == 0.5 and "resources.gpu_share" in ep["inherited"]
    (seed_folder / "model-definition.yaml").write_text("models: [\n")
    status, err = await admin.call("PATCH", "/api/v1/endpoints/seed", json_body={"replicas": 1})
    assert status == 422 and err["error"]["code"] == "invalid_definition" and "model-definition.yaml: line" in err["error"]["message"]


async def test_an_integer_query_beyond_sqlites_range_is_a_400_not_a_500(admin: Admin) -> None:
    status, err = await admin.call("GET", "/api/v1/events?before=13096496928256468430356480")
    assert status == 400 and err["error"]["code"] == "invalid_query" and err["error"]["param"] == "before"
    assert "between 1 and 9223372036854775807" in err["error"]["message"]


async def test_concurrent_patches_all_land_field_by_field(admin: Admin, model_folder: Path) -> None:
    status, _ = await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, replicas=0))
    assert status == 201
    patches = [{"description": "d"}, {"public": True}, {"queue_size": 7}, {"prefix_length": 99}, {"max_concurrency": 3},
               {"aliases": ["l2"]}, {"queue_timeout_seconds": 5.0}, {"drain_timeout_seconds": 9.0}]
    results = await asyncio.gather(*(admin.call("PATCH", "/api/v1/endpoints/llama", json_body=p) for p in patches))
    assert [s for s, _ in results] == [200] * len(patches)
    _, ep = await admin.call("GET", "/api/v1/endpoints/llama")
    for p in patches:
        for k, v in p.items():
            assert ep[k] == v, (k, ep[k])


async def test_an_autoscaler_decision_made_from_a_stale_count_does_not_overwrite_the_operators(admin: Admin, model_folder: Path) -> None:
    from appliance.api.services import SERVICES

    await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, replicas=0, max_replicas=5))
    store = admin.client.app[SERVICES].store
    assert await store.endpoints.set_desired("llama", 2, "autoscale.scale_out", "m", {}, [], expected=0)  # as read: applied
    await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"replicas": 4})  # the operator, meanwhile
    assert not await store.endpoints.set_desired("llama", 3, "autoscale.scale_out", "m", {}, [], expected=2)  # read before the PATCH
    _, ep = await admin.call("GET", "/api/v1/endpoints/llama")
    assert ep["desired_replicas"] == 4


async def test_lists_come_in_pages(admin: Admin, model_folder: Path) -> None:
    for name in ("c", "a", "b"):
        assert (await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, name=name, replicas=0)))[0] == 201
    _, first = await admin.call("GET", "/api/v1/endpoints?limit=2")
    assert [e["name"] for e in first["data"]] == ["a", "b"] and first["has_more"] is True
    _, rest = await admin.call("GET", "/api/v1/endpoints?limit=2&after=b")
    assert [e["name"] for e in rest["data"]] == ["c"] and rest["has_more"] is False
    status, err = await admin.call("GET", "/api/v1/endpoints?limit=0")
    assert status == 400 and err["error"]["param"] == "limit"
    _, keys = await admin.call("GET", "/api/v1/keys?limit=1")
    assert len(keys["data"]) == 1 and keys["has_more"] is False  # only the bootstrap admin key
    made = [(await admin.call("POST", "/api/v1/endpoints/a/tokens", json_body={"duration": "1d"}))[1]["id"] for _ in range(3)]
    _, tokens = await admin.call("GET", "/api/v1/endpoints/a/tokens?limit=2")
    assert [t["id"] for t in tokens["data"]] == sorted(made)[:2] and tokens["has_more"] is True
    _, tokens = await admin.call("GET", f"/api/v1/endpoints/a/tokens?limit=2&after={sorted(made)[1]}")
    assert [t["id"] for t in tokens["data"]] == sorted(made)[2:] and tokens["has_more"] is False


async def test_an_operator_patch_made_while_the_autoscaler_scrapes_wins_even_when_it_sets_the_same_count(
    start_app: Any, make_config: Any, model_folder: Path
) -> None:
    from appliance.api.app import AUTOSCALER
    from appliance.api.services import SERVICES

    admin = await start_app(make_config({"autoscaling": {"interval_seconds": 3600}}))  # evaluated here, by hand
    await admin.call("POST", "/api/v1/endpoints", json_body=spec(model_folder, replicas=0, min_replicas=0, max_replicas=5))
    status, rule = await admin.call("POST", "/api/v1/endpoints/llama/autoscaling-rules", json_body={
        "metric_source": "gateway", "metric_name": "queue_length", "comparator": "GREATER_THAN", "threshold": 1, "step_size": 1, "window_seconds": 1,
    })
    assert status == 201, rule
    autoscaler = admin.client.app[AUTOSCALER]
    scraping, release = asyncio.Event(), asyncio.Event()

    async def held_gather(endpoint: str, needed: set[Any], now: float) -> dict[Any, float]:
        scraping.set()
        await release.wait()
        return {key: 50.0 for key in needed}  # far over the threshold: the rule fires

    autoscaler._metrics.gather = held_gather  # type: ignore[method-assign]
    evaluation = asyncio.ensure_future(autoscaler.evaluate())
    await asyncio.wait_for(scraping.wait(), timeout=10)
    status, _ = await admin.call("PATCH", "/api/v1/endpoints/llama", json_body={"replicas": 0})  # the operator says 0, as it was
    assert status == 200
    release.set()
    await asyncio.wait_for(evaluation, timeout=10)
    _, ep = await admin.call("GET", "/api/v1/endpoints/llama")
    assert ep["desired_replicas"] == 0
    kinds = [e["kind"] for e in await admin.client.app[SERVICES].store.events.list(endpoint="llama")]
    assert "autoscale.scale_out" not in kinds
