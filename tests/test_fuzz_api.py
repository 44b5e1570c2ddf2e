"""The admin API against its own openapi.json: schemathesis generates requests for every operation
(valid ones and invalid ones) from the document, sends them to a real `appliance serve`, and every
answer must be documented: no 5xx, a listed status code, the listed content type and a body that
matches its schema. Seeded and derandomized, so a failure comes back the same on the next run.

The document is built in-process at import (pytest needs the operations at collection, before any
server runs); the server fixture checks that the served /api/v1/openapi.json is that same document."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import ServerProcess, wait_for
from hypothesis import strategies as st
from test_supervisor import PORTS, WORKERS, fake_folder

from appliance.api.app import all_routes
from appliance.api.openapi import build_openapi
from appliance.domain.specs import RUNTIMES

pytestmark = pytest.mark.process

ENDPOINT = "fuzzed"  # declared in the config file, served by the fake worker: endpoint routes have a real target
DOOMED = "doomed"  # what the DELETE operations target instead, so that the objects the others reach stay
MAX_EXAMPLES = 200  # per operation in the fuzzing phase; the coverage phase adds its own boundary cases
ENGINES = set(RUNTIMES) - {"custom", "cmd"}
DOCUMENT = build_openapi(all_routes())
# Operations that take the admin key: those whose security names the bearer scheme (for /metrics, optionally).
AUTHENTICATED = {(method.upper(), path) for path, ops in DOCUMENT["paths"].items() for method, op in ops.items() if {"bearer": []} in op["security"]}
# Framing headers a generated case must not set: aiohttp's parser refuses a malformed one before any route,
# in plain text of its own, which is the HTTP server's answer and not the API's.
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade"}
# Objects of every kind the {id} and {replica} parameters name: `kept` ones for the operations that
# read or change them, `doomed` ones for those that delete them. Filled in by the `api` fixture.
POOL: dict[str, dict[str, str]] = {"kept": {}, "doomed": {}}

schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict({
        "seed": 20261124,
        "request-timeout": 20,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        # The document declares no links for stateful testing; these three phases reach every operation.
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "checks": {
            "enabled": False,
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
        },
    }),
)


class Api:
    def __init__(self, server: ServerProcess, key: str) -> None:
        self.server = server
        self.key = key

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.server.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())


def _seed(api: Api, folder: Path) -> None:
    api.call("POST", "/api/v1/endpoints", {"name": DOOMED, "model_folder": str(folder), "replicas": 0})
    rule = {"metric_source": "gateway", "metric_name": "queue_length", "comparator": "GREATER_THAN", "threshold": 5.0, "step_size": 1}
    for kind, ids in POOL.items():
        ids["keys"] = api.call("POST", "/api/v1/keys", {"name": f"{kind} key", "scopes": ["inference"]})["id"]
        ids["service-accounts"] = api.call("POST", "/api/v1/service-accounts", {"name": f"{kind} account", "role": "user"})["id"]
        ids["tokens"] = api.call("POST", f"/api/v1/endpoints/{ENDPOINT}/tokens", {"duration": "1d"})["id"]
        ids["autoscaling-rules"] = api.call("POST", f"/api/v1/endpoints/{ENDPOINT}/autoscaling-rules", rule)["id"]

    def healthy() -> list[dict[str, Any]]:
        return [r for r in api.call("GET", f"/api/v1/endpoints/{ENDPOINT}/replicas")["data"] if r["state"] == "HEALTHY"]

    POOL["kept"]["replicas"] = wait_for(healthy, timeout=30, what="the fuzzed endpoint's replica")[0]["id"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One `appliance serve` for every operation's test (server_factory's are one per test)."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    folder = fake_folder(tmp_path, ENDPOINT)
    # Four worker ports: however many replicas the fuzzed counts ask for, at most four processes start.
    workers = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**WORKERS, "port_range": [PORTS[0], PORTS[0] + 3]}.items())
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n[workers]\n{workers}\n[[endpoints]]\nname = "{ENDPOINT}"\nmodel_folder = "{folder}"\n')
    server = ServerProcess(config, tmp_path / "state")
    try:
        server.start()
        with urllib.request.urlopen(server.url + "/api/v1/openapi.json", timeout=10) as resp:
            assert json.loads(resp.read()) == json.loads(json.dumps(DOCUMENT)), "the fuzzed document is not the one the server serves"
        api = Api(server, (tmp_path / "state" / "admin.key").read_text().strip())
        _seed(api, folder)
        yield api
    finally:
        code = server.stop() if server.proc is not None else None
    log = server.output()
    assert code == 0, log
    # An exception the answers did not show (a background task, a runner) is a fault all the same.
    assert "Traceback" not in log, log


def _collection(path: str) -> str | None:
    """The kind of object an operation's {id} names: the path segment before it."""
    parts = path.split("/")
    return parts[parts.index("{id}") - 1] if "{id}" in parts else None


@schema.hook
def flatmap_path_parameters(ctx: schemathesis.HookContext, params: dict[str, Any] | None) -> st.SearchStrategy[dict[str, Any] | None]:
    # Generated names and ids nearly always meet a 404: half the cases name the seeded objects instead.
    if not params or ctx.operation is None:
        return st.just(params)
    method, path = ctx.operation.method.upper(), ctx.operation.path
    kind = "doomed" if method == "DELETE" else "kept"
    known = dict(params)
    if "name" in params:
        known["name"] = DOOMED if method == "DELETE" and _collection(path) is None else ENDPOINT
    if "id" in params:
        known["id"] = POOL[kind].get(_collection(path) or "", params["id"])
    if "replica" in params:
        known["replica"] = POOL["kept"]["replicas"]
    return st.sampled_from([params, known])


@schema.hook
def map_query(ctx: schemathesis.HookContext, query: dict[str, Any] | None) -> dict[str, Any] | None:
    # A followed log streams for as long as its replica lives: an answer that never ends is what it is for.
    if query and ctx.operation is not None and ctx.operation.path.endswith("/logs"):
        query.pop("follow", None)
    return query


@schema.hook
def map_headers(ctx: schemathesis.HookContext, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: v for k, v in headers.items() if k.lower() not in FRAMING} if headers else headers


@schema.hook
def map_body(ctx: schemathesis.HookContext, body: Any) -> Any:
    # An engine runtime (vllm, transformers, …) imports torch at every restart of a replica the fake
    # folder cannot serve: minutes of CPU on a small box, and nothing the API answers depends on it.
    if isinstance(body, dict) and isinstance(body.get("runtime"), str) and body["runtime"] in ENGINES and ctx.operation is not None and ctx.operation.path.startswith("/api/v1/endpoints"):
        return {**body, "runtime": "custom"}
    return body


# Requests aiohttp's parser refuses before any route: a client's error, which the log tells in a line
# naming the peer, never with a traceback. The last one follows a good request on a kept-alive connection
# (aiohttp logs a bad method at debug level only on a connection's first request).
MALFORMED = (
    b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
    b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /\x7f\x00 HTTP/1.1\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 HTTP/1.1\r\n\r\n",
)


def _send_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_malformed_http_is_one_log_line_naming_the_peer(api: Api) -> None:
    before = len(api.server.output())
    for data in MALFORMED:
        answer = _send_raw(api.server.url, data)
        assert answer.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")), (data[:60], answer[:200])
        assert answer[9:10] != b"5", (data[:60], answer[:200])  # the client's error, not the server's

    def logged() -> str | None:
        out = api.server.output()[before:]
        return out if out.count("Error handling request") + out.count("bad HTTP request from") >= 2 else None

    log = wait_for(logged, timeout=10, what="the malformed requests in the server log")
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "bad HTTP request from 127.0.0.1: 4" in line]
    assert len(lines) >= 2 and all(" INFO aiohttp.server: " in line for line in lines), log


@schema.parametrize()
def test_every_answer_is_documented(case: schemathesis.Case, api: Api) -> None:
    auth = (case.operation.method.upper(), case.operation.path) in AUTHENTICATED
    case.call_and_validate(base_url=api.server.url, headers={"Authorization": f"Bearer {api.key}"} if auth else None)

