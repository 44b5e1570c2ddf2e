"""The one Config object: TOML in, typed and immutable out, every problem named by key path."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from appliance.domain.models import ModelSpec, S3Credentials
from appliance.domain.scaling import RuleSpec
from appliance.domain.specs import ByteSize, EndpointSpec, Model, check_name
from appliance.errors import ApplianceError, validation_problems

CONFIG_ENV = "APPLIANCE_CONFIG"  # the only environment variable: where the config file is
DEFAULT_CONFIG_PATH = Path("/etc/appliance/config.toml")


class ServerConfig(Model):
    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port (written to state_dir/server.json)")
    state_dir: Path = Field(Path("/var/lib/appliance"), description="database, admin key, replica work dirs")
    max_body_bytes: ByteSize = Field(16 << 20, ge=1024, description="largest request body accepted")
    idle_timeout_seconds: float = Field(
        60.0, gt=0, description="a connection without a request in progress (idle, or still sending its headers) is closed after this"
    )
    body_timeout_seconds: float = Field(60.0, gt=0, description="a request body that sends nothing for this long is answered 408")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    tls_cert: Path | None = Field(None, description="PEM certificate (chain): serve HTTPS; `appliance tls init` writes a self-signed one")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    shutdown_timeout_seconds: float = Field(
        60.0, ge=0, description="on stop, requests in flight get this long to finish before the workers drain and stop"
    )

    @field_validator("state_dir", "tls_cert", "tls_key", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return Path(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


class WorkersConfig(Model):
    port_range: tuple[int, int] = Field((20000, 20999), description="[first, last] ports handed to worker replicas")
    log_dir: Path | None = Field(None, description="replica logs; default state_dir/logs")
    stop_grace_seconds: float = Field(30.0, ge=0, description="SIGTERM, then SIGKILL after this long")
    user: str | None = Field(
        "auto",
        description='run workers as this account (needs the appliance to run as root); "auto": appliance-worker when that account exists, '
        'else a uid and gid of their own with no account (61184-65519), when the appliance is root; "root": workers run as root, on purpose; '
        "null: the appliance's own user (refused when that is root)",
    )
    isolation: Literal["auto", "cgroup", "process-group"] = Field(
        "auto", description="how a replica's processes are held and ended: a cgroup v2 each (needs a delegated cgroup), process groups, or auto"
    )
    nice: int = Field(
        10, ge=0, le=19,
        description="workers (their session's scheduling group, or their cgroups) run this much below the appliance's CPU priority, "
        "so an engine that fills the cores never starves the front door; 0: the same priority",
    )
    log_max_bytes: ByteSize = Field(50 << 20, ge=4096, description="a replica log rotates at this size")
    log_backups: int = Field(3, ge=0, description="rotated replica logs kept")
    restart_backoff_seconds: float = Field(1.0, gt=0, description="first delay before restarting a failed replica; doubles each time")
    restart_backoff_max_seconds: float = Field(300.0, gt=0, description="cap of the restart delay")
    restart_backoff_reset_seconds: float = Field(60.0, ge=0, description="healthy this long: the failure count starts over")
    max_consecutive_failures: int = Field(5, ge=1, description="failed starts/crashes in a row before the endpoint goes to ERROR")

    @field_validator("port_range", mode="before")
    @classmethod
    def _range(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("port_range")
    @classmethod
    def _range_order(cls, v: tuple[int, int]) -> tuple[int, int]:
        first, last = v
        if not (1024 <= first <= last <= 65535):
            raise ValueError(f"must be [first, last] with 1024 ≤ first ≤ last ≤ 65535 (got {list(v)})")
        return v

    @field_validator("log_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        return Path(v) if isinstance(v, str) else v


class GatewayConfig(Model):
    connect_timeout_seconds: float = Field(5.0, gt=0, description="connecting to a replica")
    idle_read_timeout_seconds: float = Field(600.0, gt=0, description="longest silence from a replica mid-answer; no total timeout")
    max_connections: int = Field(0, ge=0, description="pooled connections to replicas in all; 0 = no limit")
    access_log: bool = Field(False, description="log every request (costs throughput)")
    request_records: int = Field(10000, ge=0, description="recent requests kept in memory for metrics and autoscaling")


class AutoscalingConfig(Model):
    interval_seconds: float = Field(5.0, gt=0, description="how often rules are evaluated and metrics gathered")
    scrape_timeout_seconds: float = Field(2.0, gt=0, description="longest wait for one replica's /metrics (inference rules)")
    history_seconds: float = Field(3600.0, gt=0, description="metric samples kept per endpoint: the longest window a rule may use")


class AuthConfig(Model):
    access_token_ttl_seconds: int = Field(3600, ge=60, le=30 * 86400, description="lifetime of OAuth2 access tokens")
    usage_flush_seconds: float = Field(10.0, gt=0, description="how often usage totals and last-used times are written")
    auth_failure_events_per_minute: int = Field(30, ge=0, description="auth failures recorded one by one; the rest are counted")
    reload_seconds: float = Field(30.0, gt=0, description="re-read keys and accounts (changes made offline) this often")


class GpusConfig(Model):
    devices: Literal["all", "none"] | list[int | str] = Field(
        "all", description='"all", "none", or a list of GPU indices / UUIDs the appliance may use'
    )
    memory_reserve: ByteSize = Field(
        1 << 30, description="memory of each GPU never claimed by replicas (the display, other programs): a GPU's budget is its total less this"
    )
    claim_overhead: ByteSize = Field(
        2 << 30, description="added to a replica's estimate (weights + KV cache) for its claim: CUDA context, activations, CUDA graphs"
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, list):
            for item in v:
                if isinstance(item, int) and item < 0:
                    raise ValueError(f"GPU index must be ≥ 0 (got {item})")
                if isinstance(item, str) and not item.startswith(("GPU-", "MIG-")):
                    raise ValueError(f"a GPU is an index or a UUID starting with GPU- or MIG- (got {item!r})")
            if len(set(map(str, v))) != len(v):
                raise ValueError("must not list a GPU twice")
        return v


class RetentionConfig(Model):
    events_max_age_days: float = Field(90.0, gt=0, description="events older than this are deleted")
    events_max_count: int = Field(200_000, ge=1000, description="at most this many events are kept, the newest")
    usage_max_age_days: float = Field(400.0, gt=0, description="hourly usage rows older than this are deleted")
    replica_logs_max_bytes: ByteSize = Field(
        1 << 30, description="per endpoint: logs of finished replicas beyond this total are deleted, oldest first"
    )
    interval_seconds: float = Field(600.0, gt=0, description="how often the retention job runs")


class DeclaredEndpoint(EndpointSpec):
    """An [[endpoints]] entry: an endpoint spec, plus the autoscaling rules declared with it."""

    autoscaling_rules: list[RuleSpec] = Field(
        default_factory=list, description="[[endpoints.autoscaling_rules]]: managed like declared endpoints (created, updated, deleted with the file)"
    )

    def spec(self) -> EndpointSpec:
        """The endpoint alone, with only the fields the file gave (what the store keeps)."""
        return EndpointSpec.model_validate(self.model_dump(exclude={"autoscaling_rules"}, exclude_unset=True))


class LoggingConfig(Model):
    format: Literal["plain", "json"] = Field("plain", description='"json": one JSON object per line (journald, Loki), with request ids and event fields')


class MetricsConfig(Model):
    public: bool = Field(False, description="GET /metrics without a key (otherwise a key with the read scope)")


class ModelsConfig(Model):
    """[models]: the model registry's settings, credentials for S3 sources, and declared models."""

    cache_max_bytes: ByteSize | None = Field(
        None, description="cap of the local model cache (state_dir/models): READY models no endpoint uses are evicted, least recently used first; none: no cap"
    )
    min_free_bytes: ByteSize = Field(1 << 30, description="a warm is refused unless this much disk stays free after it")
    parallel: int = Field(8, ge=1, le=64, description="files copied at once by one warm")
    credentials: dict[str, S3Credentials] = Field(
        default_factory=dict, description="[models.credentials.<name>]: S3 credentials a model names; never logged or returned by the API"
    )
    declared: list[ModelSpec] = Field(
        default_factory=list, description="[[models.declared]]: models registered at start and on reload, removed with the file (unless an endpoint uses them)"
    )

    @field_validator("credentials")
    @classmethod
    def _credential_names(cls, v: dict[str, S3Credentials]) -> dict[str, S3Credentials]:
        for name in v:
            check_name(name)
        return v

    @model_validator(mode="after")
    def _declared(self) -> ModelsConfig:
        seen: set[str] = set()
        for i, m in enumerate(self.declared):
            if m.name in seen:
                raise ValueError(f"declared[{i}]: model {m.name!r} is declared twice")
            seen.add(m.name)
            if m.credentials is not None and m.credentials not in self.credentials:
                raise ValueError(f"declared[{i}].credentials: no [models.credentials.{m.credentials}] in the config")
        return self


class ResidencyConfig(Model):
    host_memory_budget: ByteSize | None = Field(
        None, description="host memory the replicas may claim together (resources.mem, else the model's estimate): past it, idle on-demand "
        "endpoints are evicted, least recently used first; unset: host memory is not counted",
    )
    min_resident_seconds: float = Field(30.0, ge=0, description="an endpoint loaded less than this long ago is not evicted (no thrashing)")


class GrpcConfig(Model):
    port: int | None = Field(None, ge=0, le=65535, description="the gRPC listener (KServe v2 / Triton clients); unset: none; 0 picks a free port (written to server.json)")
    host: str | None = Field(None, description="address the gRPC listener binds; default server.host")
    max_message_bytes: ByteSize = Field(
        64 << 20, ge=1 << 20, le=1 << 30, description="largest gRPC message either way (held whole in memory while relayed); past it RESOURCE_EXHAUSTED",
    )
    stream_idle_seconds: float = Field(
        300.0, gt=0, description="a stream with no message either way for this long is ended with DEADLINE_EXCEEDED (a stopped worker may never end it)",
    )


class BackendConfig(Model):
    kind: Literal["local", "ray"] = Field("local", description="where replicas run: local (processes of this box) or ray (a Ray Serve cluster)")
    address: str = Field("http://127.0.0.1:8265", description="ray: the Ray dashboard, whose Serve REST API deploys the replicas (as serve deploy --address)")
    proxy: str = Field("http://127.0.0.1:8000", description="ray: Serve's HTTP proxy, where the gateway sends each replica's requests; keep it private")
    route: Literal["proxy", "direct"] = Field(
        "proxy", description="ray: the gateway calls each replica through Serve's proxy, or its worker directly (workers then listen on their "
        "node's address: a private cluster network only)",
    )

    @field_validator("address", "proxy")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, not {v!r}")
        return v.rstrip("/")


class Config(Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    gpus: GpusConfig = Field(default_factory=GpusConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    residency: ResidencyConfig = Field(default_factory=ResidencyConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    endpoints: list[DeclaredEndpoint] = Field(default_factory=list, description="declared endpoints, created or updated at start")
    source: Path | None = Field(None, exclude=True, description="the file this came from (not a key)")

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: dict[str, int] = {}
        for i, ep in enumerate(self.endpoints):
            for name in (ep.name, *ep.aliases):
                if name in seen and seen[name] != i:
                    raise ValueError(f"endpoints[{i}]: name or alias {name!r} is already used by endpoints[{seen[name]}]")
                seen[name] = i
        return self

    @property
    def log_dir(self) -> Path:
        return self.workers.log_dir or self.server.state_dir / "logs"

    @property
    def db_path(self) -> Path:
        return self.server.state_dir / "appliance.db"

    @property
    def admin_key_path(self) -> Path:
        return self.server.state_dir / "admin.key"

    @property
    def secret_key_path(self) -> Path:
        return self.server.state_dir / "secret.key"

    @property
    def jwt_key_path(self) -> Path:
        return self.server.state_dir / "jwt.key"

    @property
    def server_file(self) -> Path:
        """Where a running server says where it listens (port 0 picks one); the CLI reads it."""
        return self.server.state_dir / "server.json"


def _absolutise(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file, not to the cwd of systemd."""

    def fix(table: Any, key: str) -> None:
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = absolute(table[key], base)

    for key in ("state_dir", "tls_cert", "tls_key"):
        fix(raw.get("server"), key)
    fix(raw.get("workers"), "log_dir")
    for ep in raw.get("endpoints", []) if isinstance(raw.get("endpoints"), list) else []:
        fix(ep, "model_folder")
    declared = raw["models"].get("declared") if isinstance(raw.get("models"), dict) else None
    for m in declared if isinstance(declared, list) else []:
        if isinstance(m, dict) and isinstance(m.get("source"), str) and "://" not in m["source"]:
            fix(m, "source")


def parse_config(raw: dict[str, Any], *, base: Path, source: Path | None = None) -> Config:
    _absolutise(raw, base)
    try:
        if "source" in raw:
            raise ApplianceError("source: unknown key", code="invalid_config", problems=["source: unknown key"])
        return Config.model_validate(raw).model_copy(update={"source": source})
    except ValidationError as exc:
        problems = validation_problems(exc)
        where = f"{source}: " if source else ""
        raise ApplianceError(
            f"{where}{len(problems)} problem(s) in config: " + "; ".join(problems),
            code="invalid_config",
            problems=problems,
        ) from None


def read_toml(path: Path, *, what: str, code: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing file or a syntax error is an ApplianceError with `code`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ApplianceError(f"{what} {path} does not exist", code="file_not_found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ApplianceError(f"{path}: not valid TOML: {exc}", code=code, problems=[f"{path}: {exc}"]) from None


def absolute(value: str, base: Path) -> str:
    """`value` as an absolute path; a relative one is taken relative to `base` (the file it came from)."""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_config(path: Path | str) -> Config:
    path = Path(path)
    raw = read_toml(path, what="config file", code="invalid_config")
    return parse_config(raw, base=path.resolve().parent, source=path)


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
