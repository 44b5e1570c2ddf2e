"""Backend.AI model folders in the shapes real ones use, each run by a real worker process:
shell string commands, relative scripts, no health check, lax numbers, null and list-bodied
pre-start actions, `ref`, `{ports[0]}`, a subdirectory model_path, root-level
service-definition tables with a runtime override, and the runtime variants."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Admin, async_wait_for
from test_supervisor import FAKE, WORKERS, create, replicas, wait_status

pytestmark = pytest.mark.process
PY = sys.executable
QUICK = {"interval": 0.2, "max_retries": 2, "max_wait_time": 1.0, "initial_delay": 20}


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> Admin:
    return await start_app(make_config({"workers": WORKERS}))


def folder(root: Path, name: str, service: dict[str, Any], *, models: list[dict[str, Any]] | None = None, model_path: str = "/models",
           file: str = "model-definition.yaml", raw: str | None = None) -> Path:
    where = root / name
    where.mkdir(parents=True)
    text = raw if raw is not None else yaml.safe_dump({"models": models or [{"name": name, "model_path": model_path, "service": service}]})
    (where / file).write_text(text)
    return where


async def whoami(admin: Admin, name: str) -> dict[str, Any]:
    resp = await admin.client.get(f"/endpoints/{name}/whoami", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_a_string_command_runs_in_the_shell_with_pipes_and_cd_and_sees_backend_ai_variables(admin: Admin, tmp_path: Path) -> None:
    command = (
        "echo \"model=$BACKEND_MODEL_NAME path=$BACKEND_MODEL_PATH\" | tee /home/work/started.txt && cd /models/sub && "
        f"exec {PY} {FAKE} --port 8000"
    )
    f = folder(tmp_path, "shelled", {"start_command": command, "port": 8000, "health_check": {"path": "/health", **QUICK}})
    (f / "sub").mkdir()
    await create(admin, "shelled", f)
    await wait_status(admin, "shelled", "HEALTHY")
    (rep,) = await replicas(admin, "shelled")
    assert rep["command"][:2] == ["/bin/bash", "-c"] and "/home/work" not in rep["command"][2] and "--port 8000" not in rep["command"][2]
    assert (Path(rep["work_dir"]) / "started.txt").read_text() == f"model=shelled path={f}\n"  # /home/work is the work dir
    me = await whoami(admin, "shelled")
    assert me["cwd"] == str(f / "sub")  # the shell's `cd /models/sub`, mapped into the folder


async def test_a_relative_script_runs_from_a_subdirectory_model_path_with_lax_numbers_and_null_actions(admin: Admin, tmp_path: Path) -> None:
    raw = f"""models:
  - name: relative
    model_path: /models/weights
    service:
      pre_start_actions: null
      start_command: [{PY}, serve.py, --port, "{{ports[0]}}"]
      port: "8000"
      health_check:
        path: /health
        interval: "0.2"
        max_retries: "2"
        max_wait_time: "1"
        initial_delay: null
"""
    f = folder(tmp_path, "relative", {}, raw=raw)
    (f / "weights").mkdir()
    (f / "weights" / "serve.py").write_text(f"import runpy, sys\nsys.argv = [{str(FAKE)!r}] + sys.argv[1:]\nrunpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    await create(admin, "relative", f)
    ep = await wait_status(admin, "relative", "HEALTHY")
    assert ep["health_check"]["interval"] == 0.2 and ep["health_check"]["initial_delay"] == 60.0  # null: the default
    (rep,) = await replicas(admin, "relative")
    assert rep["command"] == [PY, "serve.py", "--port", str(rep["port"])]
    me = await whoami(admin, "relative")
    assert me["cwd"] == str(f / "weights") and me["env"]["BACKEND_MODEL_PATH"] == str(f / "weights")


async def test_without_a_health_check_a_replica_is_healthy_once_its_port_accepts_connections(admin: Admin, tmp_path: Path) -> None:
    f = folder(tmp_path, "unprobed", {"start_command": [PY, str(FAKE), "--port", "8000", "--startup-delay", "1.5"], "port": 8000})
    ep = await create(admin, "unprobed", f)
    assert ep["health_check"]["path"] is None
    seen: list[str] = []

    async def listening() -> bool:  # never HEALTHY while the worker is not listening yet
        (rep,) = await replicas(admin, "unprobed")
        up = rep["log_path"] and Path(rep["log_path"]).exists() and "listening on" in Path(rep["log_path"]).read_text()
        seen.append(rep["state"])
        assert up or rep["state"] != "HEALTHY", "HEALTHY before the port was open"
        return bool(up)

    await async_wait_for(listening, what="the worker to listen")
    assert "STARTING" in seen
    await wait_status(admin, "unprobed", "HEALTHY")
    (rep,) = await replicas(admin, "unprobed")
    assert "accepts connections" in rep["last_probe_result"]
    assert "health 200" not in Path(rep["log_path"]).read_text()  # no HTTP probe


async def test_pre_start_actions_run_as_backend_ai_runs_them(admin: Admin, tmp_path: Path) -> None:
    actions = [
        {"action": "mkdir", "args": {"path": "conf"}},
        {"action": "write_file", "args": {"filename": "conf/app.cfg", "body": ["port={ports[0]}", 'json={"a": 1}'], "mode": "600"}},
        {"action": "write_tempfile", "args": {"body": ["print(", "1)"]}, "ref": "script"},
        {"action": "run_command", "args": {"command": [PY, "-c", "import sys; print('hello', end=''); sys.exit(3)"]}, "ref": "greet"},
        {"action": "log", "args": {"message": "greeting is {greet[out]}"}},
    ]
    service = {"pre_start_actions": actions, "start_command": [PY, str(FAKE), "--port", "8000", "--model", "{greet[out]}-${{ script }}"],
               "port": 8000, "health_check": {"path": "/health", **QUICK}}
    await create(admin, "prestart", folder(tmp_path, "prestart", service))
    await wait_status(admin, "prestart", "HEALTHY")  # run_command's exit code 3 did not stop the start
    (rep,) = await replicas(admin, "prestart")
    work = Path(rep["work_dir"])
    cfg = work / "conf" / "app.cfg"
    assert cfg.read_text() == f'port={rep["port"]}\njson={{"a": 1}}\n'  # one line each, JSON left as written
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    served = rep["command"][-1]
    assert served.startswith("hello-") and Path(served[len("hello-"):]).read_text() == "print(1)"  # tempfile lines are not newline-ended
    log = Path(rep["log_path"]).read_text()
    assert "exited with code 3 (Backend.AI goes on regardless)" in log and "greeting is hello" in log


async def test_an_undefined_template_variable_fails_the_start_and_says_which(admin: Admin, tmp_path: Path) -> None:
    service = {"start_command": [PY, str(FAKE), "--port", "{ports[0]}", "--model", "{modle_name}"], "port": 8000, "health_check": {"path": "/health", **QUICK}}
    await create(admin, "typo", folder(tmp_path, "typo", service))
    ep = await wait_status(admin, "typo", "ERROR")
    assert "start command: undefined template variable 'modle_name' in '{modle_name}'" in ep["status_message"]


async def test_a_health_check_that_redirects_is_followed(admin: Admin, tmp_path: Path) -> None:
    service = {"start_command": [PY, str(FAKE), "--port", "8000"], "port": 8000, "health_check": {"path": "/moved", **QUICK}}
    await create(admin, "moved", folder(tmp_path, "moved", service))
    await wait_status(admin, "moved", "HEALTHY")
    (rep,) = await replicas(admin, "moved")
    assert "GET /moved: HTTP 200" in rep["last_probe_result"]


async def test_root_service_definition_tables_are_the_base_and_the_runtime_section_overrides_them(admin: Admin, tmp_path: Path) -> None:
    f = folder(tmp_path, "layered", {"start_command": [PY, str(FAKE), "--port", "8000"], "port": 8000, "health_check": {"path": "/health", **QUICK}})
    (f / "service-definition.toml").write_text(
        '[environment]\nimage = "registry/x:1"\narchitecture = "x86_64"\n'
        '[resource_slots]\ncpu = 2\nmem = "1g"\n"rocm.device" = 1\n'
        '[environ]\nROOT_VAR = "root"\nVARIANT_VAR = "root"\nFAKE_API = "root"\n'
        '[custom.resource_slots]\ncpu = 1\n'
        '[custom.environ]\nVARIANT_VAR = "custom"\n'
    )
    ep = await create(admin, "layered", f, environ={"FAKE_API": "api"})
    config = ep
    assert config["resources"]["cpu"] == 1.0 and config["resources"]["mem"] == 1 << 30  # cpu from [custom], mem from the root
    assert config["unenforced_slots"] == {"rocm.device": 1}
    assert config["environment"]["image"] == "registry/x:1"
    await wait_status(admin, "layered", "HEALTHY")
    env = (await whoami(admin, "layered"))["env"]
    assert (env["ROOT_VAR"], env["VARIANT_VAR"], env["FAKE_API"]) == ("root", "custom", "api")


async def test_the_first_model_with_a_service_is_served_and_the_others_are_listed(admin: Admin, tmp_path: Path) -> None:
    service = {"start_command": [PY, str(FAKE), "--port", "8000"], "port": 8000, "health_check": {"path": "/health", **QUICK}}
    models = [{"name": "card", "model_path": "/models"}, {"name": "main", "model_path": "/models", "service": service},
              {"name": "side", "model_path": "/models", "service": {**service, "port": 8001}}]
    ep = await create(admin, "multi", folder(tmp_path, "multi", {}, models=models))
    assert ep["served_model_name"] == "main" and ep["unused_models"] == ["side"]
    await wait_status(admin, "multi", "HEALTHY")
    assert (await whoami(admin, "multi"))["env"]["BACKEND_MODEL_NAME"] == "card"  # Backend.AI: the first entry's name


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"start_command": ["x"], "port": 2000}, "invalid_definition", "ports 2000 and 2001 are reserved"),
    ({"start_command": ["x"], "port": 8000, "health_check": {"path": "/h", "max_retries": 0}}, "invalid_definition", "max_retries: must be ≥ 1"),
    ({"start_command": ["x"], "port": 8000, "pre_start_actions": [{"action": "write_file", "args": {"filename": "f", "body": ["x"], "mode": "rw"}}]},
     "invalid_definition", "args.mode must be an octal string"),
])
async def test_definitions_backend_ai_refuses_are_refused(admin: Admin, tmp_path: Path, body: dict[str, Any], code: str, needle: str) -> None:
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "bad", "model_folder": str(folder(tmp_path, "bad", body))})
    assert status == 422 and err["error"]["code"] == code and needle in err["error"]["message"], err


async def test_a_model_path_outside_the_mounts_is_refused_at_start(admin: Admin, tmp_path: Path) -> None:
    service = {"start_command": [PY, str(FAKE), "--port", "8000"], "port": 8000, "health_check": {"path": "/health", **QUICK}}
    await create(admin, "elsewhere", folder(tmp_path, "elsewhere", service, model_path="/opt/model"))
    ep = await wait_status(admin, "elsewhere", "ERROR")
    assert "model_path '/opt/model' is outside /models" in ep["status_message"]


def _fake_engine(bin_dir: Path, name: str, health: str) -> None:
    """An engine's executable on PATH that runs the fake worker on the --port it is given."""
    script = bin_dir / name
    script.write_text(
        f"#!{PY}\nimport os, sys\nargs = sys.argv[1:]\nport = args[args.index('--port') + 1] if '--port' in args else os.environ['PORT']\n"
        f"os.execv({PY!r}, [{PY!r}, {str(FAKE)!r}, '--port', port, '--health-path', {health!r}])\n"
    )
    script.chmod(0o755)


@pytest.mark.parametrize(("runtime", "exe", "health", "argv_head"), [
    ("huggingface-tgi", "text-generation-launcher", "/info", ["--model-id", "{folder}", "--hostname", "127.0.0.1", "--port"]),
    ("modular-max", "max", "/health", ["serve", "--model", "{folder}", "--host", "127.0.0.1", "--port"]),
    ("llama-cpp", "llama-server", "/health", ["-m", "{folder}/a.gguf", "--host", "127.0.0.1", "--port"]),
])
async def test_engine_variants_start_their_server_with_backend_ai_health_paths(
    admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runtime: str, exe: str, health: str, argv_head: list[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "v", "model_folder": str(tmp_path), "runtime": runtime})
    assert status == 422 and err["error"]["code"] in ("runtime_not_installed", "model_file_required"), err  # nothing installed yet
    _fake_engine(bin_dir, exe, health)
    model = tmp_path / "model"
    model.mkdir()
    (model / "b.gguf").write_text("")
    (model / "a.gguf").write_text("")
    ep = await create(admin, "v", model, runtime=runtime, health_check={"path": health, **QUICK})
    assert ep["health_check"]["path"] == health
    await wait_status(admin, "v", "HEALTHY")
    (rep,) = await replicas(admin, "v")
    assert Path(rep["command"][0]).name == exe
    assert rep["command"][1:1 + len(argv_head)] == [a.replace("{folder}", str(model)) for a in argv_head]
    assert "health 200" in Path(rep["log_path"]).read_text()  # probed on the variant's path


async def test_variants_without_a_command_of_their_own_take_command_and_their_health_path(admin: Admin, tmp_path: Path) -> None:
    status, err = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "n", "model_folder": str(tmp_path), "runtime": "nim"})
    assert status == 422 and err["error"]["code"] == "command_required"
    command = [PY, str(FAKE), "--port", "8000", "--health-path", "/v1/health/ready"]
    ep = await create(admin, "n", tmp_path, runtime="nim", command=command, health_check={"path": "/v1/health/ready", **QUICK})
    await wait_status(admin, "n", "HEALTHY")
    (rep,) = await replicas(admin, "n")
    assert rep["command"][3] == str(rep["port"])  # Backend.AI's port 8000 became the replica's
    env = (await whoami(admin, "n"))["env"]
    assert env["NIM_SERVER_PORT"] == str(rep["port"]) and env["NIM_SERVED_MODEL_NAME"] == "n"
    assert ep["runtime"] == "nim"
    ep = await create(admin, "c", tmp_path, runtime="cmd", command=[PY, str(FAKE), "--port", "8000"])
    assert ep["health_check"]["path"] is None  # no health check: healthy once the port accepts connections
    await wait_status(admin, "c", "HEALTHY")


@pytest.mark.parametrize("target", ["../../admin.key", "/etc/appliance-escape", "/home/work/../../secret.key"])
async def test_pre_start_files_stay_inside_the_work_dir(admin: Admin, tmp_path: Path, target: str) -> None:
    actions = [{"action": "mkdir", "args": {"path": "/home/work/fine"}}, {"action": "write_file", "args": {"filename": target, "body": ["x"]}}]
    service = {"pre_start_actions": actions, "start_command": [PY, str(FAKE), "--port", "8000"], "port": 8000, "health_check": {"path": "/health", **QUICK}}
    await create(admin, "escape", folder(tmp_path, "escape", service))
    ep = await wait_status(admin, "escape", "ERROR")
    assert f"pre-start action 1 (write_file): {target!r} is outside the replica's work directory" in ep["status_message"]
    assert not Path("/etc/appliance-escape").exists() and not (tmp_path / "state" / "secret.key").exists()


async def test_secret_looking_arguments_are_masked_in_the_api_and_the_log(admin: Admin, tmp_path: Path) -> None:
    from appliance.security.vault import mask_argv

    assert mask_argv(["x", "--api-key", "sk-1", "--hf-token=hf_2", "--max-model-len", "4096", "-p", "8", "--db-password", "p"]) == [
        "x", "--api-key", "********", "--hf-token=********", "--max-model-len", "4096", "-p", "8", "--db-password", "********"]
    boot = f"import runpy, sys; sys.argv = [{str(FAKE)!r}, '--port', sys.argv[1]]; runpy.run_path({str(FAKE)!r}, run_name='__main__')"
    ep = await create(admin, "masked", tmp_path, runtime="cmd", command=[PY, "-c", boot, "8000"], extra_args=["--api-key", "sk-live-123", "--hf-token=hf_abc"])
    assert ep["extra_args"] == ["--api-key", "********", "--hf-token=********"] and ep["spec"]["extra_args"][1] == "********"
    await wait_status(admin, "masked", "HEALTHY")
    (rep,) = await replicas(admin, "masked")
    assert rep["command"][-3:] == ["--api-key", "********", "--hf-token=********"]
    log = Path(rep["log_path"]).read_text()
    assert "starting: " in log and "sk-live-123" not in log and "hf_abc" not in log
