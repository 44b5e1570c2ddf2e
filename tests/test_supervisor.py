"""Supervision with real worker processes on loopback: health timing, crashes, backoff, ERROR
and retry, pre-start actions, port conflicts, scale, logs, no GPU."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from conftest import SEED_DEFINITION, Admin, async_wait_for

from appliance.api.services import SERVICES
from appliance.control.host.process import group_members
from appliance.store import parse_iso

pytestmark = pytest.mark.process

FAKE = Path(__file__).resolve().parent / "fake_worker.py"
# A worker port range of its own per test run (below the kernel's ephemeral ports), so two runs on one
# machine do not hand the same ports to their workers.
PORTS = (10000 + (os.getpid() % 22) * 1000, 10000 + (os.getpid() % 22) * 1000 + 999)
FAST = {"path": "/health", "interval": 0.2, "max_retries": 2, "max_wait_time": 1.0, "initial_delay": 0.5}
WORKERS = {
    "restart_backoff_seconds": 0.2,
    "restart_backoff_max_seconds": 2.0,
    "restart_backoff_reset_seconds": 30.0,
    "max_consecutive_failures": 3,
    "stop_grace_seconds": 3.0,
    "port_range": list(PORTS),
}


def fake_folder(root: Path, name: str, *knobs: str, health: dict[str, Any] | None = None, pre_start: list[dict[str, Any]] | None = None) -> Path:
    folder = root / "models" / name
    folder.mkdir(parents=True)
    service: dict[str, Any] = {
        "start_command": ["python", str(FAKE), "--port", "8000", *knobs],
        "port": 8000,
        "health_check": {**FAST, **(health or {})},
    }
    if pre_start:
        service["pre_start_actions"] = pre_start
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": name, "model_path": "/models", "service": service}]}))
    return folder


def server_config(tmp_path: Path, endpoints: str) -> Path:
    """A config file for `appliance serve` with fast supervision settings and the given [[endpoints]]."""
    import json

    workers = "\n".join(f"{k} = {json.dumps(v)}" for k, v in WORKERS.items())
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n[workers]\n{workers}\n{endpoints}')
    return config


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": WORKERS}))


async def create(admin: Admin, name: str, folder: Path, **extra: Any) -> dict[str, Any]:
    status, body = await admin.call("POST", "/api/v1/endpoints", json_body={"name": name, "model_folder": str(folder), **extra})
    assert status == 201, body
    return body


async def endpoint(admin: Admin, name: str) -> dict[str, Any]:
    return (await admin.call("GET", f"/api/v1/endpoints/{name}"))[1]


async def replicas(admin: Admin, name: str) -> list[dict[str, Any]]:
    return (await admin.call("GET", f"/api/v1/endpoints/{name}/replicas"))[1]["data"]


async def wait_status(admin: Admin, name: str, status: str, timeout: float = 20.0) -> dict[str, Any]:
    seen: list[Any] = [None]

    async def check() -> dict[str, Any] | None:
        ep = seen[0] = await endpoint(admin, name)
        return ep if ep["status"] == status else None

    try:
        return await async_wait_for(check, timeout=timeout, what=f"endpoint {name} to be {status}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen[0] and (seen[0]['status'], seen[0]['status_message'])}; replicas: {await replicas(admin, name)}") from None


async def events(admin: Admin, name: str) -> list[dict[str, Any]]:
    return list(reversed((await admin.call("GET", f"/api/v1/endpoints/{name}/events?limit=1000"))[1]["data"]))


def event_time(evs: list[dict[str, Any]], kind: str, nth: int = 0) -> float:
    return parse_iso([e for e in evs if e["kind"] == kind][nth]["time"])


async def logs(admin: Admin, name: str, rid: str, tail: int = 1000) -> list[str]:
    resp = await admin.client.get(f"/api/v1/endpoints/{name}/replicas/{rid}/logs?tail={tail}", headers=admin.headers)
    assert resp.status == 200
    return (await resp.text()).splitlines()


async def test_seed_http_server_folder_reaches_healthy(admin: Admin, seed_folder: Path, tmp_path: Path) -> None:
    assert (seed_folder / "model-definition.yaml").read_text() == SEED_DEFINITION
    await create(admin, "seed", seed_folder, health_check={**FAST, "path": "/"})  # small intervals; the folder itself is unchanged
    ep = await wait_status(admin, "seed", "HEALTHY")
    assert ep["replica_counts"] == {"HEALTHY": 1} and ep["status_message"] == "1/1 healthy"
    (rep,) = await replicas(admin, "seed")
    assert rep["command"][1:] == ["-m", "http.server", "--directory", rep["work_dir"], str(rep["port"])]
    assert rep["pid"] and rep["state"] == "HEALTHY" and rep["last_probe_result"] == "GET /: HTTP 200"
    assert PORTS[0] <= rep["port"] <= PORTS[1] and rep["gpus"] == []
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{rep['port']}/") as resp:
        assert resp.status == 200  # the seed server lists the replica's work dir


async def test_never_answering_replica_is_unhealthy_at_the_formula_time(admin: Admin, tmp_path: Path) -> None:
    timing = {**FAST, "interval": 0.4, "initial_delay": 0.8}
    folder = fake_folder(tmp_path, "mute", "--startup-delay", "3600", health=timing)
    await create(admin, "mute", folder)
    await wait_status(admin, "mute", "UNHEALTHY")
    evs = await events(admin, "mute")
    took = event_time(evs, "replica.unhealthy") - event_time(evs, "replica.starting")
    expected = timing["initial_delay"] + timing["interval"] * (timing["max_retries"] + 1)  # 0.8 + 0.4 × 3 = 2.0 s
    assert abs(took - expected) <= timing["interval"], took
    (rep,) = await replicas(admin, "mute")
    assert rep["consecutive_failures"] >= 3 and "connection failed" in rep["last_probe_result"]


async def test_healthy_replica_that_stops_answering_is_unhealthy_after_one_window(admin: Admin, tmp_path: Path) -> None:
    timing = {**FAST, "interval": 0.4, "initial_delay": 60.0}
    folder = fake_folder(tmp_path, "fading", "--fail-health-after", "4", health=timing)
    await create(admin, "fading", folder, unhealthy_replace_after=60.0)
    await wait_status(admin, "fading", "UNHEALTHY")
    evs = await events(admin, "fading")
    (rep,) = await replicas(admin, "fading")
    last_pass = max(float(line.split()[0]) for line in await logs(admin, "fading", rep["id"]) if line.endswith("health 200"))
    took = event_time(evs, "replica.unhealthy") - last_pass
    expected = timing["interval"] * (timing["max_retries"] + 1)  # 1.2 s: initial_delay no longer applies
    assert abs(took - expected) <= timing["interval"], took


async def test_unhealthy_replica_leaves_routing_and_is_replaced(admin: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "flaky", "--fail-health-after", "3")
    await create(admin, "flaky", folder, unhealthy_replace_after=0.4)
    await wait_status(admin, "flaky", "HEALTHY")

    async def replaced() -> bool:
        reps = await replicas(admin, "flaky")
        return bool(reps) and reps[0]["restarts"] >= 1

    await async_wait_for(replaced, timeout=20, what="the unhealthy replica to be replaced")
    kinds = [e["kind"] for e in await events(admin, "flaky")]
    i = kinds.index("replica.unhealthy")
    assert kinds[i:].index("replica.terminating") < kinds[i:].index("replica.failed")
    (rep,) = await replicas(admin, "flaky")
    assert "unhealthy" in rep["last_error"]


async def test_crash_restart_backoff_error_and_retry(admin: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "crashy", "--crash-after", "0.3")
    await create(admin, "crashy", folder)
    ep = await wait_status(admin, "crashy", "ERROR", timeout=30)
    assert "failed 3 times in a row" in ep["status_message"] and "crashing now" in ep["status_message"]  # the last log lines
    evs = await events(admin, "crashy")
    failed = [parse_iso(e["time"]) for e in evs if e["kind"] == "replica.failed"]
    starts = [parse_iso(e["time"]) for e in evs if e["kind"] == "replica.starting"]
    assert len(failed) == 3 and len(starts) == 3
    gaps = [starts[i + 1] - failed[i] for i in range(2)]
    # Lower bounds only: a busy box delays a start by any amount, so gaps need not grow in order
    # (backoff_delay's doubling itself is pinned in test_rollout).
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # 0.2 s, then doubled
    (rep,) = await replicas(admin, "crashy")
    assert rep["state"] == "FAILED" and rep["restarts"] == 3 and rep["pid"] is None

    # Crashes are noticed at once (process exit), not at the next probe.
    lines = await logs(admin, "crashy", rep["id"])
    crash_times = [float(line.split()[0]) for line in lines if line.endswith("crashing now")]
    assert all(min(abs(f - c) for f in failed) < 1.0 for c in crash_times)

    status, body = await admin.call("POST", "/api/v1/endpoints/crashy/retry")
    assert status == 200 and body["status"] != "ERROR"

    async def restarted() -> bool:
        reps = await replicas(admin, "crashy")
        return reps[0]["restarts"] > 3

    await async_wait_for(restarted, timeout=20, what="a restart after retry")
    kinds = [e["kind"] for e in await events(admin, "crashy")]
    assert "endpoint.retry" in kinds


async def test_refused_start_reports_the_reason_and_last_lines(admin: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "refuser", "--refuse-to-start")
    await create(admin, "refuser", folder)
    ep = await wait_status(admin, "refuser", "ERROR", timeout=30)
    assert "worker exited with code 3 before becoming healthy" in ep["status_message"]
    assert "model weights are corrupt" in ep["status_message"]


async def test_missing_command_fails_clearly(admin: Admin, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "nocmd"
    folder.mkdir(parents=True)
    (folder / "model-definition.yaml").write_text(
        "models:\n  - name: n\n    model_path: /models\n    service:\n      start_command: [no-such-server-binary]\n      port: 8000\n"
        "      health_check: {path: /health}\n"
    )
    await create(admin, "nocmd", folder)
    ep = await wait_status(admin, "nocmd", "ERROR", timeout=30)
    assert "command not found: 'no-such-server-binary'" in ep["status_message"]


async def test_pre_start_actions_run_in_order(admin: Admin, tmp_path: Path) -> None:
    pre = [
        {"action": "mkdir", "args": {"path": "cache/deep"}},
        {"action": "write_file", "args": {"filename": "conf/settings.txt", "body": "port={port}\n", "mode": "600"}},
        {"action": "write_file", "args": {"filename": "conf/settings.txt", "body": "more\n", "append": True}},
        {"action": "write_tempfile", "args": {"body": "import pathlib; pathlib.Path('ran.txt').write_text('yes')\nprint('hello from tempfile')"}},
        {"action": "run_command", "args": {"command": ["python", "{tempfile}"]}},
        {"action": "log", "args": {"message": "ready to start {name}", "debug": True}},
    ]
    folder = fake_folder(tmp_path, "prep", pre_start=pre)
    await create(admin, "prep", folder)
    await wait_status(admin, "prep", "HEALTHY")
    (rep,) = await replicas(admin, "prep")
    work = Path(rep["work_dir"])
    assert (work / "cache" / "deep").is_dir()
    settings = work / "conf" / "settings.txt"
    # every write_file sets its mode, 644 unless given, as Backend.AI's does: the append made it 644 again
    assert settings.read_text() == f"port={rep['port']}\nmore\n" and settings.stat().st_mode & 0o777 == 0o644
    assert (work / "ran.txt").read_text() == "yes"
    text = "\n".join(await logs(admin, "prep", rep["id"]))
    assert "hello from tempfile" in text and "[debug] ready to start prep" in text
    assert text.index("hello from tempfile") < text.index("starting: ")


async def test_a_failing_pre_start_command_is_logged_and_the_start_goes_on_as_on_backend_ai(admin: Admin, tmp_path: Path) -> None:
    pre = [{"action": "run_command", "args": {"command": ["python", "-c", "import sys; print('migration failed'); sys.exit(7)"]}}]
    await create(admin, "badprep", fake_folder(tmp_path, "badprep", pre_start=pre))
    await wait_status(admin, "badprep", "HEALTHY", timeout=30)
    (rep,) = await replicas(admin, "badprep")
    text = "\n".join(await logs(admin, "badprep", rep["id"]))
    assert "migration failed" in text and "pre-start action 0 (run_command): python exited with code 7 (Backend.AI goes on regardless)" in text
    missing = [{"action": "run_command", "args": {"command": ["no-such-program-here"]}}]
    await create(admin, "noprog", fake_folder(tmp_path, "noprog", pre_start=missing))
    ep = await wait_status(admin, "noprog", "ERROR", timeout=30)  # a command that cannot start at all fails the start
    assert "pre-start action 0 (run_command): command not found: 'no-such-program-here'" in ep["status_message"]


async def test_deleting_an_endpoint_ends_a_hanging_pre_start_command_and_its_tree(admin: Admin, tmp_path: Path) -> None:
    marker = tmp_path / "prep.pid"
    hang = f"import os,subprocess,sys,time\nsubprocess.Popen([sys.executable,'-c','import time\\ntime.sleep(600)'])\nopen({str(marker)!r},'w').write(str(os.getpid()))\ntime.sleep(600)"
    pre = [{"action": "run_command", "args": {"command": ["python", "-c", hang]}}]
    await create(admin, "hung", fake_folder(tmp_path, "hung", pre_start=pre))
    await async_wait_for(lambda: marker.exists() and marker.read_text(), timeout=30, what="the pre-start command to run")
    pgid = int(marker.read_text())
    assert len(group_members(pgid)) == 2  # the command and the child it started
    started = asyncio.get_running_loop().time()
    status, _ = await admin.call("DELETE", "/api/v1/endpoints/hung")
    assert status == 200
    grace = WORKERS["stop_grace_seconds"]
    await async_wait_for(lambda: not group_members(pgid), timeout=grace + 10, what="the pre-start command's tree to end")
    assert asyncio.get_running_loop().time() - started < grace + 10
    await async_wait_for(lambda: _no_replicas(admin, "hung"), timeout=10, what="the replica to finish")


async def _no_replicas(admin: Admin, name: str) -> bool:
    return not admin.client.app[SERVICES].supervisor.replicas(name) or all(
        r.state.value == "TERMINATED" for r in admin.client.app[SERVICES].supervisor.replicas(name)
    )


async def test_port_conflict_respawns_on_another_port_without_counting_a_failure(admin: Admin, tmp_path: Path) -> None:
    marker = tmp_path / "conflict-marker"
    await create(admin, "ports", fake_folder(tmp_path, "ports", "--port-conflict-once", str(marker)))
    await wait_status(admin, "ports", "HEALTHY")
    (rep,) = await replicas(admin, "ports")
    assert marker.exists() and rep["restarts"] == 0
    notes = [e["message"] for e in await events(admin, "ports")]
    assert any("in use by another program; respawning on another port" in m for m in notes)
    ports = [e["details"] for e in await events(admin, "ports") if e["kind"] == "replica.starting"]
    assert len(ports) == 2


async def test_ports_in_use_are_skipped(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        admin = await start_app(make_config({"workers": {**WORKERS, "port_range": [taken, taken + 20]}}))
        await create(admin, "skip", fake_folder(tmp_path, "skip"))
        await wait_status(admin, "skip", "HEALTHY")
        (rep,) = await replicas(admin, "skip")
        assert rep["port"] != taken


async def test_scale_up_down_and_delete_stop_processes(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "scale", fake_folder(tmp_path, "scale"), replicas=2, max_replicas=3)
    await wait_status(admin, "scale", "HEALTHY")
    reps = await replicas(admin, "scale")
    assert len({r["port"] for r in reps}) == 2
    pids = {r["pid"] for r in reps}
    await admin.call("PATCH", "/api/v1/endpoints/scale", json_body={"replicas": 1, "min_replicas": 1})

    async def one_left() -> bool:
        reps = await replicas(admin, "scale")
        return sum(r["state"] != "TERMINATED" for r in reps) == 1 and (await endpoint(admin, "scale"))["status"] == "HEALTHY"

    await async_wait_for(one_left, timeout=20, what="scale down to 1")
    live = [r for r in await replicas(admin, "scale") if r["state"] != "TERMINATED"]
    assert sum(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids) == 1
    await admin.call("DELETE", "/api/v1/endpoints/scale")

    async def all_gone() -> bool:
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)

    await async_wait_for(all_gone, timeout=20, what="workers to stop after delete")
    assert live


async def test_config_change_rolls_replicas(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "roll", fake_folder(tmp_path, "roll"), environ={"FAKE_VERSION": "1"})
    await wait_status(admin, "roll", "HEALTHY")
    (old,) = await replicas(admin, "roll")
    await admin.call("PATCH", "/api/v1/endpoints/roll", json_body={"environ": {"FAKE_VERSION": "2"}})

    async def rolled() -> dict[str, Any] | None:
        live = [r for r in await replicas(admin, "roll") if r["state"] == "HEALTHY"]
        return live[0] if len(live) == 1 and live[0]["id"] != old["id"] and live[0]["generation"] == 2 else None

    new = await async_wait_for(rolled, timeout=20, what="the new generation to replace the old")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{new['port']}/whoami") as resp:
        who = await resp.json()
    assert {k: v for k, v in who["env"].items() if k.startswith("FAKE_")} == {"FAKE_VERSION": "2"} and who["cuda_visible_devices"] == "" and who["cuda_device_order"] == "PCI_BUS_ID"
    assert who["cwd"] == str(tmp_path / "models" / "roll") and who["pgid"] == who["pid"]  # own process group; runs in model_path, as on Backend.AI


async def test_deep_probe_catches_dead_generation(admin: Admin, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "zombie", "--dead-generation")
    await create(admin, "shallow", folder)
    await create(admin, "deep", folder, deep_probe=True, runtime="custom")
    await wait_status(admin, "shallow", "HEALTHY")
    await wait_status(admin, "deep", "UNHEALTHY")
    (rep,) = await replicas(admin, "deep")
    assert "deep probe" in rep["last_probe_result"] and "HTTP 500" in rep["last_probe_result"]


async def test_logs_tail_and_follow(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "talky", fake_folder(tmp_path, "talky"))
    await wait_status(admin, "talky", "HEALTHY")
    (rep,) = await replicas(admin, "talky")
    lines = await logs(admin, "talky", rep["id"], tail=3)
    assert len(lines) == 3
    resp = await admin.client.get(f"/api/v1/endpoints/talky/replicas/{rep['id']}/logs?tail=0&follow=1", headers=admin.headers)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    first = await asyncio.wait_for(resp.content.readline(), timeout=5)
    assert first.decode().rstrip().endswith("health 200")  # a new probe, streamed as it happened
    resp.close()
    status, err = await admin.call("GET", "/api/v1/endpoints/talky/replicas/nope/logs")
    assert status == 404 and err["error"]["code"] == "replica_not_found"


async def test_endpoint_that_needs_a_gpu_without_nvml_is_error_not_a_crash(admin: Admin, tmp_path: Path, model_folder: Path) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
        pytest.skip("this machine has NVML")
    except Exception:
        pass
    await create(admin, "needsgpu", fake_folder(tmp_path, "needsgpu"), resources={"gpus": 1})
    await create(admin, "cpu", fake_folder(tmp_path, "cpu"))
    ep = await wait_status(admin, "needsgpu", "ERROR")
    assert ep["status_message"].startswith("no GPU available: ")
    await wait_status(admin, "cpu", "HEALTHY")
    status, gpus = await admin.call("GET", "/api/v1/gpus")
    assert status == 200 and gpus["available"] is False and gpus["reason"].startswith("no GPU available") and gpus["data"] == []


async def test_appliance_shutdown_stops_every_worker(start_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_app(make_config({"workers": WORKERS}))
    await create(admin, "bye", fake_folder(tmp_path, "bye"), replicas=2, max_replicas=2)
    await wait_status(admin, "bye", "HEALTHY")
    pids = [r["pid"] for r in await replicas(admin, "bye")]
    await admin.client.close()  # runs the app's cleanup: supervisor.stop()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_kill_9_then_restart_leaves_no_orphan_and_restores_replicas(server_factory: Any, tmp_path: Path) -> None:
    import json
    import urllib.request

    folder = fake_folder(tmp_path, "durable", "--spawn-child")
    state = tmp_path / "state"
    config = server_config(tmp_path, f'[[endpoints]]\nname = "durable"\nmodel_folder = "{folder}"\nreplicas = 2\n')

    def api(server: Any, path: str) -> Any:
        key = (state / "admin.key").read_text().strip()
        req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def healthy_pids(server: Any) -> set[int] | None:
        reps = api(server, "/api/v1/endpoints/durable/replicas")["data"]
        live = [r for r in reps if r["state"] == "HEALTHY"]
        return {r["pid"] for r in live} if len(live) == 2 else None

    from conftest import wait_for

    first = server_factory(config).start()
    pids = wait_for(lambda: healthy_pids(first), timeout=30, what="2 healthy replicas")
    children = set()
    for pid in pids:
        children |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    assert len(children) == 2  # each worker left a helper process in its group
    first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.proc.wait()  # type: ignore[union-attr]
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=10, what="workers to die with the appliance")
    assert any(_alive(c) for c in children)  # the helpers outlived it: orphans for the next start to clean

    second = server_factory(config).start()
    new_pids = wait_for(lambda: healthy_pids(second), timeout=30, what="2 healthy replicas after restart")
    assert not new_pids & pids
    assert not any(_alive(c) for c in children | pids), "an orphan survived the restart"
    kinds = [e["kind"] for e in api(second, "/api/v1/events?kind=replica.orphan_stopped")["data"]]
    assert len(kinds) == 2
    assert second.stop() == 0
    assert not any(_alive(p) for p in new_pids)  # a clean stop stops its workers


def test_cli_replicas_logs_retry_and_gpus(server_factory: Any, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from conftest import run_cli, wait_for

    ok = fake_folder(tmp_path, "okay")
    bad = fake_folder(tmp_path, "broken", "--refuse-to-start")
    config = server_config(tmp_path, f'[[endpoints]]\nname = "okay"\nmodel_folder = "{ok}"\n[[endpoints]]\nname = "broken"\nmodel_folder = "{bad}"\n')
    server_factory(config).start()

    def cli_json(*args: str) -> Any:
        result = run_cli(*args, "--json", config=config)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    wait_for(lambda: cli_json("endpoint", "show", "okay")["status"] == "HEALTHY", timeout=30, what="okay HEALTHY")
    wait_for(lambda: cli_json("endpoint", "show", "broken")["status"] == "ERROR", timeout=30, what="broken ERROR")
    table = run_cli("endpoint", "replicas", "okay", config=config)
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["REPLICA", "STATE", "PID", "PORT"] and row.split()[1] == "HEALTHY"
    logs = run_cli("endpoint", "logs", "broken", "--tail", "50", config=config)
    assert logs.returncode == 0 and "model weights are corrupt" in logs.stdout

    follow = subprocess.Popen([sys.executable, "-m", "appliance", "endpoint", "logs", "okay", "-f", "--tail", "0", "--config", str(config)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        line = follow.stdout.readline()  # the next health probe, live
        assert line.rstrip().endswith("health 200")
    finally:
        follow.terminate()
        follow.wait(timeout=10)

    before = cli_json("endpoint", "replicas", "broken")["data"][0]["restarts"]
    retried = run_cli("endpoint", "retry", "broken", config=config)
    assert retried.returncode == 0 and "error cleared, retrying" in retried.stdout
    wait_for(lambda: cli_json("endpoint", "replicas", "broken")["data"][0]["restarts"] > before, timeout=30, what="a restart after retry")
    gpus = run_cli("gpu", "list", config=config)
    assert gpus.returncode == 0 and gpus.stdout.strip()


async def test_finished_replica_logs_end_and_its_work_dir_is_removed(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "brief", fake_folder(tmp_path, "brief"))
    await wait_status(admin, "brief", "HEALTHY")
    (rep,) = await replicas(admin, "brief")
    assert Path(rep["work_dir"]).is_dir()
    await admin.call("PATCH", "/api/v1/endpoints/brief", json_body={"replicas": 0, "min_replicas": 0})
    await wait_status(admin, "brief", "SCALED_TO_ZERO")

    async def removed() -> bool:
        return not Path(rep["work_dir"]).exists()

    await async_wait_for(removed, timeout=10, what="the work dir to be removed")
    (done,) = await replicas(admin, "brief")
    assert done["state"] == "TERMINATED" and Path(done["log_path"]).exists()
    resp = await admin.client.get(f"/api/v1/endpoints/brief/replicas/{rep['id']}/logs?tail=5&follow=1", headers=admin.headers)
    text = await asyncio.wait_for(resp.text(), timeout=5)  # ends on its own: the replica is gone
    assert "stopped (exit code" in text


async def test_unpreparable_work_dir_is_a_counted_failure_ending_in_error(admin: Admin, tmp_path: Path) -> None:
    blocker = admin.config.server.state_dir / "replicas"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the replicas directory must go")  # mkdir fails, even for root
    await create(admin, "nowhere", fake_folder(tmp_path, "nowhere"))
    ep = await wait_status(admin, "nowhere", "ERROR", timeout=30)
    assert "could not prepare the replica" in ep["status_message"] and "failed 3 times in a row" in ep["status_message"]
    (rep,) = await replicas(admin, "nowhere")
    assert rep["restarts"] == 3 and rep["pid"] is None
