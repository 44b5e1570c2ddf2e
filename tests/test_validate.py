"""POST /api/v1/endpoints/validate: a temporary replica outside routing, its log and states streamed,
a verdict at the end, and nothing left behind — whatever the outcome, and when the caller leaves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for
from inprocess import InProcessLauncher
from test_supervisor import WORKERS, fake_folder

from appliance.api.services import SERVICES


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS}))


async def events(admin: Admin, body: dict[str, Any], query: str = "") -> list[tuple[str, dict[str, Any]]]:
    resp = await admin.client.post(f"/api/v1/endpoints/validate{query}", json=body, headers=admin.headers)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream", await resp.text()
    out = []
    for block in (await resp.text()).strip().split("\n\n"):
        kind, data = block.split("\n", 1)
        out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def _supervisor(admin: Admin) -> Any:
    return admin.client.app[SERVICES].supervisor


async def _nothing_left(admin: Admin, launcher: InProcessLauncher) -> None:
    supervisor = _supervisor(admin)
    await async_wait_for(lambda: not supervisor._detached and not launcher.running() and not supervisor.held(), timeout=10,
                         what="the validation's replica to be gone")


async def test_a_good_spec_turns_healthy_and_leaves_nothing(admin: Admin, launcher: InProcessLauncher, tmp_path: Path) -> None:
    steps = await events(admin, {"name": "candidate", "model_folder": str(fake_folder(tmp_path, "candidate"))})
    states = [d["state"] for k, d in steps if k == "state"]
    assert states[:3] == ["PROVISIONING", "STARTING", "HEALTHY"], steps
    assert any(k == "log" and "starting:" in d["line"] for k, d in steps)  # the replica's log, as it was written
    kind, verdict = steps[-1]
    assert kind == "verdict" and verdict["ok"] is True and verdict["reason"].startswith("healthy after")
    await _nothing_left(admin, launcher)
    assert (await admin.call("GET", "/api/v1/endpoints/candidate"))[0] == 404  # a dry run creates nothing
    assert "validate-candidate" not in _supervisor(admin).table.endpoints  # and is never routed


async def test_a_broken_folder_fails_with_its_reason_and_last_lines(admin: Admin, launcher: InProcessLauncher, tmp_path: Path) -> None:
    steps = await events(admin, {"name": "broken", "model_folder": str(fake_folder(tmp_path, "broken", "--refuse-to-start"))})
    kind, verdict = steps[-1]
    assert kind == "verdict" and verdict["ok"] is False, steps
    assert "exited" in verdict["reason"] and verdict["last_lines"], verdict
    assert [d["state"] for k, d in steps if k == "state"][-1] == "FAILED"
    await _nothing_left(admin, launcher)


async def test_a_replica_that_never_turns_healthy_times_out(admin: Admin, launcher: InProcessLauncher, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "slow", "--startup-delay", "30")
    steps = await events(admin, {"name": "slow", "model_folder": str(folder)}, "?timeout=1")
    assert steps[-1][0] == "verdict" and steps[-1][1]["ok"] is False and steps[-1][1]["reason"] == "not healthy after 1 s"
    await _nothing_left(admin, launcher)


async def test_a_caller_that_disconnects_leaves_no_replica(admin: Admin, launcher: InProcessLauncher, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "leaver", "--startup-delay", "30")
    resp = await admin.client.post("/api/v1/endpoints/validate", json={"name": "leaver", "model_folder": str(folder)}, headers=admin.headers)
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"event: state")
    await async_wait_for(lambda: launcher.running(), timeout=10, what="the validation's worker to start")
    resp.close()  # the caller goes away mid-validation
    await _nothing_left(admin, launcher)


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"name": "ghost", "model_folder": "/no/such/folder"}, 422, "invalid_model_folder"),
    ({"name": "Bad Name!", "model_folder": "/tmp"}, 422, "validation_error"),
    ({"model_folder": "/tmp"}, 422, "validation_error"),
])
async def test_a_spec_that_does_not_resolve_is_a_plain_error(admin: Admin, body: dict[str, Any], status: int, code: str) -> None:
    got, error = await admin.call("POST", "/api/v1/endpoints/validate", json_body=body)
    assert got == status and error["error"]["code"] == code, error


@pytest.mark.process
def test_cli_validate_prints_the_stream_and_exits_with_the_verdict(server_factory: Any, tmp_path: Path) -> None:
    from conftest import run_cli
    from test_supervisor import server_config

    config = server_config(tmp_path, "")
    server_factory(config).start()
    good = run_cli("endpoint", "validate", "good", "--model-folder", str(fake_folder(tmp_path, "good")), config=config)
    assert good.returncode == 0, good.stderr
    assert "HEALTHY" in good.stdout and "| " in good.stdout and "valid: healthy after" in good.stdout
    bad = run_cli("endpoint", "validate", "bad", "--model-folder", str(fake_folder(tmp_path, "bad", "--refuse-to-start")), config=config)
    assert bad.returncode == 1 and "FAILED: worker exited" in bad.stderr, (bad.stdout, bad.stderr)
    as_json = run_cli("endpoint", "validate", "good", "--model-folder", str(tmp_path / "models" / "good"), "--json", config=config)
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events[-1]["event"] == "verdict" and events[-1]["ok"] is True
    listed = run_cli("endpoint", "list", "--json", config=config, check=True)
    assert json.loads(listed.stdout)["data"] == []  # nothing was created
