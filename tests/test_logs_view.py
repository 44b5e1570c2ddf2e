"""The replica log view: the worker's own access lines of passing health probes are left out unless
asked for (the file keeps them), and runtimes probe at Backend.AI's default 10 s interval."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin
from test_gateway import healthy
from test_supervisor import WORKERS, fake_folder

from appliance.api.services import SERVICES
from appliance.cli import endpoint as endpoint_cli
from appliance.domain.health import probe_access_line
from appliance.domain.runtimes import TCP_CHECK, VARIANTS, default_health_check
from appliance.domain.specs import HealthCheck

UVICORN = 'INFO:     127.0.0.1:51234 - "GET /health HTTP/1.1" 200 OK'
VLLM = '(APIServer pid=4242) INFO:     127.0.0.1:40000 - "GET /health HTTP/1.1" 200 OK'
CLF = '127.0.0.1 - - [06/Dec/2026 10:00:00] "GET /health HTTP/1.1" 200 -'
LLAMA = "srv  log_server_r: request: GET /health 127.0.0.1 200"
PROBES = [UVICORN, VLLM, CLF, LLAMA]
KEPT = [
    'INFO:     127.0.0.1:51234 - "GET /health HTTP/1.1" 503 Service Unavailable',  # a failing probe stays in sight
    'INFO:     127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
    'INFO:     127.0.0.1:51234 - "GET /healthz HTTP/1.1" 200 OK',
    "Loading safetensors checkpoint shards: 100% Completed | 2/2",
]


def test_runtimes_probe_every_ten_seconds() -> None:
    for runtime, variant in VARIANTS.items():
        if variant.health is not None:
            assert variant.health.interval == 10.0, runtime
    assert TCP_CHECK.interval == 10.0
    assert default_health_check("transformers", None).interval == default_health_check("cmd", None).interval == 10.0
    assert HealthCheck(path="/health").interval == 10.0  # Backend.AI's default, for a check given without one


def test_probe_access_lines_are_recognised_for_the_configured_path() -> None:
    hide = probe_access_line(HealthCheck(path="/health"))
    assert hide is not None
    assert all(hide(line) for line in PROBES)
    assert not any(hide(line) for line in KEPT)
    other = probe_access_line(HealthCheck(path="/v1/health/ready", expected_status_code=204))
    assert other is not None and other('"GET /v1/health/ready HTTP/1.1" 204 No Content') and not other(UVICORN)
    assert probe_access_line(HealthCheck(path=None)) is None  # a TCP check leaves no line


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS}))


async def _text(admin: Admin, url: str) -> list[str]:
    resp = await admin.client.get(url, headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return (await resp.text()).splitlines()


async def test_the_log_view_hides_probe_lines_unless_asked(admin: Admin, tmp_path: Path) -> None:
    (rep,) = await healthy(admin, "quiet", fake_folder(tmp_path, "quiet"))
    replica = admin.client.app[SERVICES].supervisor.replica("quiet", rep["id"])
    assert replica is not None
    written = [line for pair in zip(PROBES, KEPT, strict=True) for line in pair] + ["the last line"]
    await asyncio.to_thread(lambda: [replica.log.write(line) for line in written])
    url = f"/api/v1/endpoints/quiet/replicas/{rep['id']}/logs"

    shown = await _text(admin, f"{url}?tail=1000")
    assert not set(PROBES) & set(shown) and all(line in shown for line in KEPT) and shown[-1] == "the last line"
    assert await _text(admin, f"{url}?tail=5") == [*KEPT, "the last line"]  # the tail counts the lines shown
    everything = await _text(admin, f"{url}?tail=1000&probes=1")
    assert everything[-len(written):] == written
    assert set(PROBES) <= set(replica.log.path.read_text().splitlines())  # the file keeps them

    # followed: probe lines that come later are left out too, and shown with probes=1
    for probes, expect in ((0, ["between", "end"]), (1, [UVICORN, "between", UVICORN, "end"])):
        async with admin.client.get(f"{url}?tail=0&follow=1&probes={probes}", headers=admin.headers) as resp:
            assert resp.status == 200
            await asyncio.to_thread(lambda: [replica.log.write(line) for line in (UVICORN, "between", UVICORN, "end")])
            got: list[str] = []
            while not got or got[-1] != "end":
                raw = await asyncio.wait_for(resp.content.readline(), 10)
                assert raw, f"the stream ended early: {got}"
                got.append(raw.decode().rstrip("\n"))
            assert [line for line in got if not line.startswith(("[appliance", "1"))] == expect, got


def test_cli_logs_asks_for_probes_only_with_the_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    asked: list[dict[str, Any]] = []

    class Client:
        def request(self, method: str, path: str) -> dict[str, Any]:
            return {"data": [{"id": "r1"}]}

        def lines(self, path: str, query: dict[str, Any]) -> list[str]:
            asked.append(query)
            return ["a line"]

    monkeypatch.setattr(endpoint_cli, "admin_client", lambda args: Client())
    for flag in (False, True):
        args = argparse.Namespace(name="e", replica=None, tail=100, follow=False, probes=flag)
        assert endpoint_cli.cmd_endpoint_logs(args) == 0
    assert [q.get("probes") for q in asked] == [None, 1]
    assert capsys.readouterr().out == "a line\na line\n"
