"""What a user says about an endpoint: the validated models shared by config, API and CLI.

An EndpointSpec holds only what the user stated. Defaults that come from the model
folder (service-definition.toml, model-definition.yaml) are applied later, by
``endpoints.resolve``, so an update can tell explicit fields from inherited ones.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

from appliance.domain.timefmt import parse_keep_alive
from appliance.errors import ApplianceError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,50}$")
DEFAULT_KEEP_ALIVE = 300.0  # seconds, as Ollama's default
NAME_RULE = "must be 1–50 characters of A–Z, a–z, 0–9, '_' or '-'"
# Backend.AI's runtime variants a box can run, and `transformers` (the appliance's own).
RUNTIMES = ("custom", "vllm", "sglang", "nim", "huggingface-tgi", "modular-max", "llama-cpp", "cmd", "transformers")
Runtime = Literal["custom", "vllm", "sglang", "nim", "huggingface-tgi", "modular-max", "llama-cpp", "cmd", "transformers"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
INT64_MAX = (1 << 63) - 1  # SQLite's largest INTEGER: a stored number beyond it cannot be written
# Replicas one endpoint may ask for: each is a process tree with its own port, log and work directory
# on this one box, and a larger count would only exhaust file descriptors before it exhausted GPUs.
MAX_REPLICAS = 256


def parse_bytes(value: Any) -> int:
    """'8gb', '512M', '1.5GiB' or an integer → bytes (binary units, as Backend.AI reads them)."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 8gb or 512mb")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]  # inf for a number too long for a float
    else:
        raise ValueError(f"must be a size such as 8gb or 512mb (got {value!r})")
    if size < 0:
        raise ValueError("must not be negative")
    if size > INT64_MAX:
        raise ValueError(f"must be at most {INT64_MAX} bytes (got {value!r})")
    return int(size)


def check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{NAME_RULE} (got {value!r})")
    return value


def _scalar_to_str(value: Any) -> Any:
    # TOML/YAML users write PORT = 8000; environment values are strings in the end.
    if isinstance(value, dict):
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) if isinstance(v, (int, float, bool)) else v for k, v in value.items()}
    return value


Name = Annotated[str, BeforeValidator(lambda v: check_name(v) if isinstance(v, str) else v)]
ByteSize = Annotated[int, BeforeValidator(parse_bytes)]
Environ = Annotated[dict[str, str], BeforeValidator(_scalar_to_str)]


class Model(BaseModel):
    """Base for every validated structure: strict types, unknown keys rejected, immutable. Numbers are
    finite: JSON has no infinity or NaN, so such a value could never be shown back as it was given."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class HealthCheck(Model):
    """Backend.AI health_check block; defaults are Backend.AI's."""

    path: str | None = Field(description="HTTP path probed with GET (redirects followed), e.g. /health; null: healthy once the port accepts TCP connections")
    interval: float = Field(10.0, ge=0, description="seconds between probes")
    max_retries: int = Field(10, ge=1, le=INT64_MAX, description="consecutive failures tolerated; the next one marks the replica UNHEALTHY")
    max_wait_time: float = Field(15.0, gt=0, description="total timeout of one probe, seconds")
    expected_status_code: int = Field(200, ge=100, le=599)
    initial_delay: float = Field(60.0, ge=0, description="seconds after spawn during which failures do not count")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"must start with '/' (got {v!r})")
        return v


class Resources(Model):
    gpus: int = Field(0, ge=0, description="whole GPUs per replica, exclusive")
    gpu_share: float | None = Field(None, gt=0, lt=1, description="fraction of one GPU per replica (Backend.AI cuda.shares)")
    cpu: float | None = Field(None, gt=0, description="CPU cores per replica")
    mem: ByteSize | None = Field(None, description="memory per replica: bytes or a size such as '8gb'")
    gpu_name: str | None = Field(None, min_length=1, description="only GPUs whose name matches this pattern, e.g. 'H100*'")
    gpu_min_free_mem: ByteSize | None = Field(None, description="only GPUs with at least this much free memory")
    # exclude_if: shown where stated, so resources from before claims read as they did
    gpu_memory: ByteSize | None = Field(
        None, gt=0, exclude_if=lambda v: v is None, description="GPU memory one replica claims, e.g. '10gb' (split evenly over whole GPUs); default: the estimate "
        "from the model folder plus [gpus] claim_overhead, else gpu_share × the GPU's budget. Alone, it asks for one GPU shared by memory",
    )
    placement: Literal["spread", "binpack"] = Field("spread", description="spread: least-loaded GPU first; binpack: fill a GPU before the next")

    @model_validator(mode="after")
    def _gpu_exclusive(self) -> Resources:
        if self.gpus and self.gpu_share is not None:
            raise ValueError("give either gpus (whole GPUs) or gpu_share (a fraction of one GPU), not both")
        return self


class EndpointSpec(Model):
    """An endpoint as a user declares it (config file, API body or CLI flags)."""

    name: Name = Field(description="1–50 characters of [A-Za-z0-9_-]; also the model name clients send")
    model_folder: str | None = Field(None, min_length=1, description="absolute path of the model folder on this box (or give `model`)")
    model: Name | None = Field(None, description="a registered model (/api/v1/models) to serve instead of a folder path; replicas wait until it is READY")
    runtime: Runtime | None = Field(
        None, description=f"{' | '.join(RUNTIMES)}; default: custom when the folder has a model definition, else vllm"
    )
    command: list[str] | None = Field(
        None, min_length=1, description="runtimes nim and cmd: the server's command (on Backend.AI, the container image's own command)"
    )
    definition_file: str | None = Field(None, min_length=1, description="model definition file in the folder; default model-definition.yml, then .yaml")
    served_model_name: str | None = Field(None, min_length=1, description="name the worker expects in `model`; default per runtime")
    aliases: list[Name] = Field(default_factory=list, description="other model names routed to this endpoint")
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="desired replicas")
    min_replicas: int | None = Field(None, ge=0, le=MAX_REPLICAS, description="lower bound of autoscaling rules that state none; default: replicas")
    max_replicas: int | None = Field(None, ge=0, le=MAX_REPLICAS, description="upper bound of autoscaling rules that state none; default: replicas")
    resources: Resources | None = Field(None, description="per replica; default from service-definition.toml")
    environ: Environ = Field(default_factory=dict, description="environment for the worker; merged over service-definition.toml's")
    secret_environ: Environ = Field(
        default_factory=dict, description="worker environment encrypted at rest (Fernet) and masked as ******** in every response and log"
    )
    extra_args: list[str] = Field(default_factory=list, description="appended to the runtime's start command")
    continuous_batching: bool = Field(False, description="transformers runtime: pass --continuous-batching")
    health_check: HealthCheck | None = Field(None, description="overrides the definition's or runtime's health check")
    deep_probe: bool = Field(False, description="after the health GET passes, also require a 1-token completion (OpenAI runtimes)")
    unhealthy_replace_after: float | None = Field(
        None, gt=0, description="seconds UNHEALTHY before the replica is replaced; default one failure window (interval × (max_retries+1))"
    )
    public: bool = Field(False, description="gateway routes open without a key")
    description: str = Field("", max_length=500)
    routing: Literal["least_outstanding", "session_affinity", "prefix"] = Field(
        "least_outstanding", description="how a request picks a replica"
    )
    prefix_length: int = Field(256, ge=1, description="prefix routing: characters of the prompt/messages hashed")
    prefix_overload_factor: float = Field(2.0, ge=1, description="prefix routing: leave the cached replica when it has this many times the least load")
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight per replica; more wait in the queue")
    queue_size: int = Field(100, ge=0, description="requests waiting per endpoint; beyond it 429")
    queue_timeout_seconds: float = Field(30.0, gt=0, description="longest wait in the queue, or for a starting replica")
    max_surge: int = Field(1, ge=0, description="rolling update: new replicas started above the desired count at a time; 0 drains an old one first")
    drain_timeout_seconds: float = Field(
        120.0, ge=0, description="a replica leaving (scale-in, update, shutdown) gets this long to finish its requests"
    )
    idle_timeout_seconds: float | None = Field(
        None, gt=0, description="scale to zero after this long without a request (needs min_replicas = 0); a request wakes it"
    )
    wake_timeout_seconds: float = Field(600.0, gt=0, description="longest a request waits for a scaled-to-zero endpoint to start")
    on_demand: bool = Field(
        False, description="not loaded until its first request; unloaded after keep_alive idle, or evicted (least recently used first) when another needs its memory"
    )
    keep_alive: str | float | None = Field(
        None, description="how long a loaded endpoint stays after its last request: 5m, 1h, 300 (seconds), 0 (unload once idle), -1 (no idle unload); "
        "default 5m for on_demand endpoints; the same as idle_timeout_seconds, Ollama's way",
    )
    pin: bool = Field(False, description="never evicted to make room for another endpoint; loaded first at start, even when on_demand")
    priority: int = Field(0, description="start order at boot: higher first (pinned endpoints before all)")
    sleep: bool = Field(
        True, description="evicted replicas sleep instead of stopping where the engine can (vLLM on a shared GPU: --enable-sleep-mode; "
        "weights wait in host RAM, a request wakes them in seconds); where a sleep fails or frees no GPU memory, eviction stops them",
    )
    autoscaling_policy: Literal["appliance", "backend.ai"] = Field(
        "appliance",
        description="how autoscaling rules combine: appliance (scale-out wins, largest step, clamp, cooldown per direction) "
        "or backend.ai (first rule that fires wins, out-of-bounds steps skipped, cooldown per rule)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> EndpointSpec:
        if (self.model_folder is None) == (self.model is None):
            raise ValueError("give exactly one of model_folder (a path) and model (a registered model)")
        return self

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: str | float | None) -> str | float | None:
        if v is not None:
            try:
                parse_keep_alive(v, param="keep_alive")
            except ApplianceError as exc:
                raise ValueError(exc.message.removeprefix("keep_alive: ")) from None
        return v

    @model_validator(mode="after")
    def _idle_needs_zero(self) -> EndpointSpec:
        low = self.low_replicas
        if self.keep_alive is not None and self.idle_timeout_seconds is not None:
            raise ValueError("give keep_alive or idle_timeout_seconds, not both: they are the same setting")
        which = "keep_alive" if self.keep_alive is not None else "idle_timeout_seconds"
        if (self.idle_timeout_seconds is not None or self.keep_alive is not None) and low != 0:
            raise ValueError(f"{which} scales to zero, so it needs min_replicas = 0 (min_replicas is {low})")
        if self.on_demand and low != 0:
            raise ValueError(f"on_demand endpoints are unloaded when idle, so they need min_replicas = 0 (min_replicas is {low})")
        return self

    @property
    def low_replicas(self) -> int:
        """min_replicas with its default: replicas, or 0 for an on-demand endpoint."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 0 if self.on_demand else self.replicas

    def idle_seconds(self) -> float | None:
        """The idle unload: idle_timeout_seconds, or keep_alive (5m for on-demand endpoints that state neither);
        never for a pinned endpoint."""
        if self.pin:
            return None
        if self.idle_timeout_seconds is not None:
            return self.idle_timeout_seconds
        if self.keep_alive is not None:
            return parse_keep_alive(self.keep_alive, param="keep_alive")
        return DEFAULT_KEEP_ALIVE if self.on_demand else None

    @field_validator("min_replicas")
    @classmethod
    def _min(cls, v: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("replicas")
        if v is not None and isinstance(replicas, int) and v > replicas:
            raise ValueError(f"must be ≤ replicas ({replicas})")
        return v

    @field_validator("max_replicas")
    @classmethod
    def _max(cls, v: int | None, info: ValidationInfo) -> int | None:
        replicas, low = info.data.get("replicas"), info.data.get("min_replicas")
        if v is not None and isinstance(replicas, int) and v < replicas:
            raise ValueError(f"must be ≥ replicas ({replicas})")
        if v is not None and isinstance(low, int) and v < low:
            raise ValueError(f"must be ≥ min_replicas ({low})")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("name") in v:
            raise ValueError("must not repeat the endpoint's own name")
        if len(set(v)) != len(v):
            raise ValueError("must not contain duplicates")
        return v

    @field_validator("environ", "secret_environ")
    @classmethod
    def _environ(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return v

    @field_validator("secret_environ")
    @classmethod
    def _secret_apart(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        both = sorted(set(v) & set(info.data.get("environ") or {}))
        if both:
            raise ValueError(f"{', '.join(both)} also set in environ: a variable is either secret or not")
        return v


def _patch_model() -> type[Model]:
    # Every field of EndpointSpec, all optional: one definition, two shapes. A name is
    # accepted only to say clearly that it cannot change.
    fields: dict[str, Any] = {
        name: (info.annotation | None, Field(None, description=info.description))
        for name, info in EndpointSpec.model_fields.items()
    }
    return create_model("EndpointPatch", __base__=Model, __doc__="Fields to change; null resets a field to its default.", **fields)


EndpointPatch = _patch_model()


# Fields whose change needs no new worker process: scaling, access and labels.
NO_RESTART_FIELDS = frozenset(
    {
        "replicas", "min_replicas", "max_replicas", "public", "description", "aliases", "routing", "prefix_length",
        "prefix_overload_factor", "max_concurrency", "queue_size", "queue_timeout_seconds", "max_surge", "drain_timeout_seconds",
        "idle_timeout_seconds", "wake_timeout_seconds", "autoscaling_policy", "on_demand", "keep_alive", "pin", "priority",
    }
)


def resting_replicas(config: dict[str, Any]) -> int:
    """Replicas an endpoint has when nothing (autoscaling, a wake, an eviction) set a count: none for an
    on-demand endpoint that is not pinned, which waits for its first request."""
    return 0 if config.get("on_demand") and not config.get("pin") else int(config["replicas"])


def worker_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The part of an endpoint's config that its worker processes are built from."""
    return {k: v for k, v in config.items() if k not in NO_RESTART_FIELDS}


class Environment(Model):
    """service-definition.toml [{runtime}.environment]: recorded and shown, never run (no containers)."""

    image: str | None = None
    architecture: str | None = None


class MemoryEstimate(Model):
    """What the model folder says a replica needs in GPU memory, before the overhead ([gpus] claim_overhead)."""

    weights: int = Field(description="bytes of the tensors in the folder's safetensors files")
    kv_cache: int = Field(description="bytes of one sequence's KV cache at max_model_len (2 × layers × kv heads × head_dim × dtype bytes × length)")
    max_model_len: int | None = Field(description="the context the KV cache is counted at: --max-model-len in extra_args, else config.json's max_position_embeddings")


class EndpointConfig(Model):
    """An endpoint with every default applied: what the supervisor and gateway act on."""

    name: str
    model_folder: str
    model: str | None = Field(None, description="the registered model served from model_folder, if any")
    runtime: Runtime
    definition_file: str | None = Field(description="model definition file found in the folder, if any")
    served_model_name: str
    aliases: list[str]
    replicas: int
    min_replicas: int
    max_replicas: int
    resources: Resources
    environ: dict[str, str]
    secret_environ: dict[str, str] = Field(default_factory=dict, description="sealed values (fernet:…); shown masked")
    extra_args: list[str]
    continuous_batching: bool
    health_check: HealthCheck
    command: list[str] = Field(default_factory=list, description="nim and cmd: the server's command")
    model_file: str | None = Field(None, description="llama-cpp: the .gguf file served (the first in the folder by name)")
    grpc_port: int | None = Field(None, description="the gRPC port its model definition declares (service.grpc_port): each replica gets a second port for it")
    unenforced_slots: dict[str, Any] = Field(default_factory=dict, description="service-definition.toml resource slots the appliance does not act on")
    unused_models: list[str] = Field(default_factory=list, description="model-definition entries with a service that this endpoint does not start")
    deep_probe: bool = False
    unhealthy_replace_after: float
    public: bool
    description: str
    routing: str = "least_outstanding"
    prefix_length: int = 256
    prefix_overload_factor: float = 2.0
    max_concurrency: int | None = None
    queue_size: int = 100
    queue_timeout_seconds: float = 30.0
    max_surge: int = 1
    drain_timeout_seconds: float = 120.0
    idle_timeout_seconds: float | None = None
    wake_timeout_seconds: float = 600.0
    on_demand: bool = False
    pin: bool = False
    priority: int = 0
    sleep: bool = True
    autoscaling_policy: str = "appliance"
    environment: Environment | None = None
    inherited: list[str] = Field(default_factory=list, description="fields whose value came from the model folder's files")
    memory_estimate: MemoryEstimate | None = Field(None, description="GPU memory estimated from the folder's safetensors headers and config.json; null: no weights there")

    @property
    def wakes(self) -> bool:
        """A request loads it when it has no replica (on demand, or scaled to zero when idle)."""
        return self.on_demand or self.idle_timeout_seconds is not None

    @property
    def evictable(self) -> bool:
        """Its replicas may be stopped to make room for another endpoint: it wakes again on a request."""
        return self.wakes and not self.pin and self.min_replicas == 0
