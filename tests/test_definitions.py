from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import SEED_DEFINITION, SEED_SERVICE_DEFINITION

from appliance.control import endpoints
from appliance.control.endpoints import resolve
from appliance.control.models.folders import find_definition_file, load_model_definition
from appliance.domain.definitions import parse_model_definition, parse_service_definition
from appliance.domain.runtimes import Placement, WorkerSpec, build_worker_spec
from appliance.domain.specs import EndpointSpec, HealthCheck
from appliance.domain.templates import render, render_all
from appliance.errors import ApplianceError


def with_weights(folder: Path) -> Path:
    """What an engine runtime needs to find in a model folder (config.json and weights), added to a test's folder."""
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def definition_problems(text: str) -> list[str]:
    with pytest.raises(ApplianceError) as info:
        parse_model_definition(text, path=Path("/m/model-definition.yaml"))
    assert info.value.code == "invalid_definition"
    return info.value.problems


def test_seed_model_definition_parses_unchanged() -> None:
    d = parse_model_definition(SEED_DEFINITION, path=Path("model-definition.yaml"))
    m = d.model
    assert (m.name, m.model_path) == ("simple-http-server", "/models")
    assert m.service is not None
    assert m.service.start_command == ["python", "-m", "http.server", "--directory", "/home/work", "8000"]
    assert m.service.port == 8000
    assert m.service.check == HealthCheck(
        path="/", interval=10.0, max_retries=10, max_wait_time=15.0, expected_status_code=200, initial_delay=60.0
    )


def test_health_check_defaults_are_backend_ai_defaults() -> None:
    d = parse_model_definition(
        "models:\n  - name: m\n    model_path: /models\n    service:\n      start_command: serve --port 9000\n      port: 9000\n"
        "      health_check:\n        path: /v1/health\n",
        path=Path("d.yaml"),
    )
    assert d.model.service is not None
    assert d.model.service.start_command == "serve --port 9000"
    assert d.model.service.check == HealthCheck(
        path="/v1/health", interval=10.0, max_retries=10, max_wait_time=15.0, expected_status_code=200, initial_delay=60.0
    )


def test_pre_start_actions_parse_and_are_checked() -> None:
    d = parse_model_definition(
        """models:
  - name: m
    model_path: /models
    service:
      pre_start_actions:
        - action: write_file
          args: {filename: conf.json, body: "{}", mode: "600", append: false}
        - action: write_tempfile
          args: {body: "print(1)"}
        - action: run_command
          args: {command: [python, -c, "print(2)"]}
        - action: mkdir
          args: {path: cache}
        - action: log
          args: {message: hello, debug: true}
      start_command: [python, -m, http.server, 8000]
      port: 8000
""",
        path=Path("d.yaml"),
    )
    service = d.model.service
    assert service is not None
    assert [a.action for a in service.actions] == ["write_file", "write_tempfile", "run_command", "mkdir", "log"]
    assert service.start_command == ["python", "-m", "http.server", "8000"]  # unquoted 8000 became a string


def test_broken_definitions_name_file_field_and_line() -> None:
    found = definition_problems(
        """models:
  - name: x
    service:
      start_command: []
      health_check:
        interval: -1
      pre_start_actions:
        - action: run_command
          args: {command: "ls"}
        - action: explode
"""
    )
    assert found == [
        "/m/model-definition.yaml: line 2: models[0].model_path: required",
        "/m/model-definition.yaml: line 8: models[0].service.pre_start_actions[0]: run_command needs args.command as a non-empty list of strings",
        "/m/model-definition.yaml: line 10: models[0].service.pre_start_actions[1].action: must be one of 'write_file', 'write_tempfile', "
        "'run_command', 'mkdir' or 'log' (got 'explode')",
        "/m/model-definition.yaml: line 4: models[0].service.start_command: must not be empty",
        "/m/model-definition.yaml: line 4: models[0].service.port: required",
        "/m/model-definition.yaml: line 6: models[0].service.health_check.interval: must be ≥ 0",
    ]


def test_definition_syntax_and_shape_errors() -> None:
    (msg,) = definition_problems("models:\n  - name: [\n")
    assert msg.startswith("/m/model-definition.yaml: line 3, column 1: not valid YAML")
    assert definition_problems("") == ["/m/model-definition.yaml: models: required"]
    assert definition_problems("models: []\n") == ["/m/model-definition.yaml: line 1: models: must have at least 1 item(s)"]
    (msg,) = definition_problems("models:\n  - name: m\n    model_path: /m\n    service:\n      start_command: x\n      port: 70000\n")
    assert msg == "/m/model-definition.yaml: line 6: models[0].service.port: must be ≤ 65535"
    (msg,) = definition_problems("models:\n  - name: m\n    model_path: /m\n    servce: {}\n")
    assert msg == "/m/model-definition.yaml: line 4: models[0].servce: unknown key"


def test_definition_file_name_is_configurable(tmp_path: Path) -> None:
    assert find_definition_file(tmp_path, None) is None
    (tmp_path / "model-definition.yaml").write_text(SEED_DEFINITION)
    assert find_definition_file(tmp_path, None) == tmp_path / "model-definition.yaml"
    (tmp_path / "model-definition.yml").write_text(SEED_DEFINITION)
    assert find_definition_file(tmp_path, None) == tmp_path / "model-definition.yaml"  # .yaml first, as Backend.AI
    (tmp_path / "serve.yaml").write_text(SEED_DEFINITION)
    assert load_model_definition(find_definition_file(tmp_path, "serve.yaml")).model.name == "simple-http-server"  # type: ignore[arg-type]
    with pytest.raises(ApplianceError, match="'other.yaml' not found"):
        find_definition_file(tmp_path, "other.yaml")


def test_seed_service_definition_parses() -> None:
    sd = parse_service_definition(SEED_SERVICE_DEFINITION, path=Path("service-definition.toml"))
    section = sd.for_runtime("vllm")
    assert section is not None
    assert section.environment.image == "example.com/model-server:latest"
    assert section.environment.architecture == "x86_64"
    assert (section.resource_slots.cpu, section.resource_slots.mem, section.resource_slots.cuda_shares) == (1.0, 8 << 30, 0.5)
    assert section.environ == {"MODEL_NAME": "example-model-name"}


def test_broken_service_definitions() -> None:
    with pytest.raises(ApplianceError) as info:
        parse_service_definition('[vllm.resource_slots]\n"cuda.shares" = "half"\nmem = "lots"\n', path=Path("/m/service-definition.toml"))
    assert info.value.problems == [
        "/m/service-definition.toml: vllm.resource_slots.mem: must be a size such as 8gb or 512mb (got 'lots')",
        '/m/service-definition.toml: vllm.resource_slots."cuda.shares": must be a number (got \'half\')',
    ]
    with pytest.raises(ApplianceError, match=r"service-definition.toml: not valid TOML: .*line 1"):
        parse_service_definition("[vllm\n", path=Path("service-definition.toml"))
    with pytest.raises(ApplianceError, match=r"gpus: must be a table"):
        parse_service_definition('gpus = 1\n', path=Path("service-definition.toml"))
    with pytest.raises(ApplianceError, match=r"\[vlm\]: neither a runtime"):
        parse_service_definition('[vlm.environ]\nA = "1"\n', path=Path("service-definition.toml"))


def test_service_definition_supplies_defaults_and_explicit_fields_win(seed_folder: Path) -> None:
    with_weights(seed_folder)
    config, _ = resolve(EndpointSpec(name="e", model_folder=str(seed_folder), runtime="vllm"))
    assert config.resources.cpu == 1.0 and config.resources.mem == 8 << 30 and config.resources.gpu_share == 0.5
    assert config.environ == {"MODEL_NAME": "example-model-name"}
    assert config.environment is not None and config.environment.image == "example.com/model-server:latest"
    assert set(config.inherited) == {"resources.cpu", "resources.mem", "resources.gpu_share", "environ.MODEL_NAME"}

    spec = EndpointSpec.model_validate(
        {"name": "e", "model_folder": str(seed_folder), "runtime": "vllm", "resources": {"gpus": 1, "cpu": 8}, "environ": {"MODEL_NAME": "mine", "X": "1"}}
    )
    config, _ = resolve(spec)
    assert (config.resources.gpus, config.resources.gpu_share, config.resources.cpu, config.resources.mem) == (1, None, 8.0, 8 << 30)
    assert config.environ == {"MODEL_NAME": "mine", "X": "1"}
    assert config.inherited == ["resources.mem"]


def test_runtime_defaults_from_folder(seed_folder: Path, model_folder: Path) -> None:
    with_weights(model_folder)
    custom, definition = resolve(EndpointSpec(name="s", model_folder=str(seed_folder)))
    assert custom.runtime == "custom" and custom.definition_file == "model-definition.yaml"
    assert custom.served_model_name == "simple-http-server"
    assert custom.health_check.path == "/" and custom.health_check.initial_delay == 60.0
    assert custom.resources.gpu_share is None  # the seed's section is [vllm.*], not [custom.*]
    plain, _ = resolve(EndpointSpec(name="p", model_folder=str(model_folder)))
    assert plain.runtime == "vllm" and plain.health_check.path == "/health"
    with pytest.raises(ApplianceError, match="custom runtime needs a model definition"):
        resolve(EndpointSpec(name="p", model_folder=str(model_folder), runtime="custom"))
    with pytest.raises(ApplianceError, match="does not exist"):
        resolve(EndpointSpec(name="p", model_folder=str(model_folder / "nope")))
    with pytest.raises(ApplianceError, match="is not a directory"):
        resolve(EndpointSpec(name="p", model_folder=str(model_folder / "config.json")))
    with pytest.raises(ApplianceError, match="must be an absolute path"):
        resolve(EndpointSpec(name="p", model_folder="relative/path"))


def argv(spec: WorkerSpec) -> tuple[str, ...]:
    return tuple(render_all(spec.argv, spec.variables, where="start command"))


def test_custom_runtime_maps_container_paths_and_port(seed_folder: Path) -> None:
    config, definition = resolve(EndpointSpec(name="s", model_folder=str(seed_folder)))
    spec = build_worker_spec(config, definition, Placement(port=20007, replica_id="s-1", work_dir="/var/lib/appliance/work/s-1"))
    assert argv(spec) == ("python", "-m", "http.server", "--directory", "/var/lib/appliance/work/s-1", "20007")
    assert spec.cwd == str(seed_folder)  # model_path /models: the folder
    assert spec.env["BACKEND_MODEL_NAME"] == "simple-http-server" and spec.env["BACKEND_MODEL_PATH"] == str(seed_folder)
    assert spec.port == 20007 and spec.env["PORT"] == "20007"
    assert spec.health_check.path == "/" and not spec.openai_compatible


def test_custom_runtime_string_command_model_path_and_placeholders(tmp_path: Path) -> None:
    command = "server --weights /models/w.bin --listen=0.0.0.0:8000 --id {replica_id} --json '{\"a\": 1}'"
    definition_text = {"models": [{"name": "m", "model_path": "/models", "service": {"start_command": command, "port": 8000, "health_check": {"path": "/ping"}}}]}
    (tmp_path / "model-definition.yml").write_text(yaml.safe_dump(definition_text))
    config, definition = resolve(EndpointSpec(name="m", model_folder=str(tmp_path), environ={"OUT": "{work_dir}/out"}))
    spec = build_worker_spec(config, definition, Placement(port=21000, replica_id="m-3", work_dir="/w"))
    # a string runs through the shell: paths and the port are mapped inside it, JSON is left as written
    assert argv(spec) == ("/bin/bash", "-c", f"server --weights {tmp_path}/w.bin --listen=0.0.0.0:21000 --id m-3 --json '{{\"a\": 1}}'")
    assert render(spec.env["OUT"], spec.variables, where="environ.OUT") == "/w/out"


def test_engine_runtimes_build_their_commands(model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "_check_installed", lambda runtime: None)  # commands are built whatever is installed here
    with_weights(model_folder)
    place = Placement(port=20001, replica_id="e-1", work_dir="/w", gpu_share=0.5)
    vllm, _ = resolve(EndpointSpec(name="e", model_folder=str(model_folder), runtime="vllm", extra_args=["--max-model-len", "4096"]))
    assert argv(build_worker_spec(vllm, None, place)) == (
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder), "--host", "127.0.0.1", "--port", "20001",
        "--served-model-name", "e",
        "--gpu-memory-utilization", "0.450", "--max-model-len", "4096",
    )
    tf, _ = resolve(EndpointSpec(name="t", model_folder=str(model_folder), runtime="transformers", continuous_batching=True))
    spec = build_worker_spec(tf, None, Placement(port=20002, replica_id="t-1", work_dir="/w"))
    assert argv(spec) == ("transformers", "serve", str(model_folder), "--host", "127.0.0.1", "--port", "20002", "--continuous-batching")
    assert spec.served_model_name == str(model_folder) and spec.health_check.path == "/health"
    sg, _ = resolve(EndpointSpec(name="g", model_folder=str(model_folder), runtime="sglang", served_model_name="org/model"))
    assert argv(build_worker_spec(sg, None, place)) == (
        "python", "-m", "sglang.launch_server", "--model-path", str(model_folder), "--host", "127.0.0.1", "--port", "20001",
        "--served-model-name", "org/model", "--mem-fraction-static", "0.450",
    )


def test_templates_fill_backend_ai_expressions_and_leave_other_braces_alone() -> None:
    values = {"port": 1, "name": "n", "ports": [20001], "runtime_path": "/py", "out": {"out": "x\n"}}
    assert render('{port}-{name}-{"json": 2}-${VAR}-${{ ports[0] }}-{ports[0]}-{runtime_path}-{out[out]!r}', values, where="w") == (
        '1-n-{"json": 2}-${VAR}-20001-20001-/py-\'x\\n\''
    )
    with pytest.raises(ApplianceError, match=r"start command: undefined template variable 'nope' in '\{nope\}' \(defined: name, out, port"):
        render("--x {nope}", values, where="start command")
    with pytest.raises(ApplianceError, match=r"cannot fill '\{ports\[3\]\}'"):
        render("{ports[3]}", values, where="w")


def test_an_engine_that_is_not_installed_is_refused_with_the_install_command(model_folder: Path) -> None:
    import importlib.util

    assert importlib.util.find_spec("sglang") is None  # not installed on this box: the real condition
    with pytest.raises(ApplianceError) as info:
        resolve(EndpointSpec(name="g", model_folder=str(model_folder), runtime="sglang"))
    err = info.value
    assert err.status == 422 and err.code == "runtime_not_installed" and err.param == "runtime"
    assert "'sglang'" in err.message and "pip install" in err.message


def test_runtime_variants_use_backend_ai_ports_and_health_paths() -> None:
    from appliance.domain.runtimes import VARIANTS, default_health_check

    table = {name: (v.port, default_health_check(name, None).path) for name, v in VARIANTS.items() if name != "custom"}
    assert table == {
        "vllm": (8000, "/health"), "sglang": (9001, "/health"), "nim": (8000, "/v1/health/ready"), "huggingface-tgi": (3000, "/info"),
        "modular-max": (8000, "/health"), "llama-cpp": (8080, "/health"), "cmd": (8000, None), "transformers": (None, "/health"),
    }


def test_service_definition_slots_beyond_one_gpu_and_unknown_slots(tmp_path: Path) -> None:
    with_weights(tmp_path)
    (tmp_path / "service-definition.toml").write_text('[resource_slots]\n"cuda.shares" = 2\n[vllm.resource_slots]\n"tpu.device" = 1\n')
    endpoints_mod = endpoints
    config, _ = resolve(EndpointSpec(name="two", model_folder=str(tmp_path), runtime="transformers"))
    assert config.resources.gpus == 2 and config.unenforced_slots == {}
    (tmp_path / "service-definition.toml").write_text('[transformers.resource_slots]\n"cuda.shares" = 1.5\n"tpu.device" = 1\n')
    config, _ = resolve(EndpointSpec(name="frac", model_folder=str(tmp_path), runtime="transformers"))
    assert config.resources.gpus == 2 and config.unenforced_slots == {"tpu.device": 1}  # 1.5 GPUs are held as 2 whole ones
    assert endpoints_mod is endpoints


def test_head_forms_are_accepted_beside_26_3_ones() -> None:
    d = parse_model_definition(
        "models:\n  - name: m\n    model_path: /models\n    service:\n      command: serve --port 9000\n      start_command: [old]\n"
        "      shell: null\n      port: 9000\n      health_check: {}\n"
        "  - name: n\n    model_path: /models\n    service:\n      start-command: [x]\n      port: 9001\n      health_check:\n        enable: false\n"
        "        path: /h\n  - name: o\n    model_path: /models\n    service:\n      start_command: [y]\n      port: 9002\n      health_check:\n"
        "        interval: 3\n",
        path=Path("d.yaml"),
    )
    first, second, third = (m.service for m in d.models)
    assert first is not None and first.argv_or_script == "serve --port 9000" and first.shell is None  # `command` wins; no shell: split
    assert first.check is None and second is not None and second.check is None  # {} and enable: false opt out (HEAD)
    assert second.argv_or_script == ["x"]
    assert third is not None and third.check == HealthCheck(path="/health", interval=3.0)  # HEAD: path defaults to /health
    flat = parse_service_definition('image = "reg/x:1"\narchitecture = "aarch64"\n[resource_opts]\nshmem = "1g"\n[environ]\nA = "1"\n', path=Path("s.toml"))
    section = flat.for_runtime("vllm")
    assert section is not None and section.environment.image == "reg/x:1" and section.environment.architecture == "aarch64"
    assert section.environ == {"A": "1"}


def test_a_grpc_port_is_a_second_port_mapped_into_the_command_and_given_as_grpc_port(tmp_path: Path) -> None:
    command = ["server", "--http", "8000", "--grpc=0.0.0.0:8001", "--ports", "{ports[0]},{ports[1]}", "--g", "{grpc_port}"]
    service = {"start_command": command, "port": 8000, "grpc_port": 8001}
    (tmp_path / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "m", "model_path": "/models", "service": service}]}))
    config, definition = resolve(EndpointSpec(name="m", model_folder=str(tmp_path)))
    spec = build_worker_spec(config, definition, Placement(port=21000, grpc_port=21001, replica_id="m-1", work_dir="/w"))
    assert argv(spec) == ("server", "--http", "21000", "--grpc=0.0.0.0:21001", "--ports", "21000,21001", "--g", "21001")
    assert spec.env["PORT"] == "21000" and spec.env["GRPC_PORT"] == "21001" and spec.grpc_port == 21001
    # One pass: a replica's HTTP port that is the definition's gRPC number is not mapped a second time.
    shifted = build_worker_spec(config, definition, Placement(port=8001, grpc_port=8002, replica_id="m-2", work_dir="/w"))
    assert argv(shifted)[:4] == ("server", "--http", "8001", "--grpc=0.0.0.0:8002")
    for bad, why in (({"grpc_port": 8000}, "must differ from port"), ({"grpc_port": 2001}, "reserved"), ({"grpc_port": 0}, "grpc_port: must be ≥ 1")):
        problems = definition_problems(yaml.safe_dump({"models": [{"name": "m", "model_path": "/models", "service": {**service, **bad}}]}))
        assert any(why in str(p) for p in problems), problems
