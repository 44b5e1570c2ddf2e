"""Backend.AI model folders: model-definition.yaml and service-definition.toml.

Parsing follows the Backend.AI documentation field for field. Errors name the file,
the field and, for YAML, the line the field (or its parent) sits on.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.domain.specs import RUNTIMES, ByteSize, Environ, HealthCheck, Model
from appliance.errors import ApplianceError, validation_items, validation_problems

# Backend.AI looks for .yaml first, then .yml.
DEFINITION_NAMES = ("model-definition.yaml", "model-definition.yml")
SERVICE_DEFINITION_NAME = "service-definition.toml"
# Backend.AI's kernel runner listens on these inside every container; a service may not take them.
RESERVED_PORTS = (2000, 2001)
DEFAULT_SHELL = "/bin/bash"

# Arguments each pre-start action needs (Backend.AI kernel/service_actions.py).
_REQUIRED_ARGS: dict[str, tuple[str, ...]] = {
    "write_file": ("filename", "body"),
    "write_tempfile": ("body",),
    "run_command": ("command",),
    "mkdir": ("path",),
    "log": ("message",),
}


class Lax(BaseModel):
    """Backend.AI parses these files leniently (trafaret ToInt/ToFloat, pydantic lax): `port: "8000"`
    and `interval: "10"` are numbers. Unknown keys are still refused, so a typo is not ignored."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True, populate_by_name=True)


def _stringify_list(value: Any) -> Any:
    # `- 8000` unquoted in YAML is an int; a command line is strings.
    if isinstance(value, list):
        return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    return value


def _no_nulls(value: Any) -> Any:
    # `interval: null` means "the default", as in Backend.AI.
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


Command = Annotated[str | list[str], BeforeValidator(_stringify_list)]


class PreStartAction(Lax):
    action: Literal["write_file", "write_tempfile", "run_command", "mkdir", "log"]
    args: dict[str, Any] = Field(default_factory=dict)
    ref: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="store the action's result as this template variable")

    @model_validator(mode="after")
    def _args(self) -> PreStartAction:
        missing = [a for a in _REQUIRED_ARGS[self.action] if a not in self.args]
        if missing:
            raise ValueError(f"{self.action} needs args.{', args.'.join(missing)}")
        if self.action == "run_command":
            cmd = self.args["command"]
            if not (isinstance(cmd, list) and cmd and all(isinstance(c, (str, int, float)) for c in cmd)):
                raise ValueError("run_command needs args.command as a non-empty list of strings")
        if self.action in ("write_file", "write_tempfile") and not isinstance(self.args["body"], (list, str)):
            raise ValueError(f"{self.action} needs args.body as a list of lines")
        if "mode" in self.args:
            mode = self.args["mode"]
            try:
                int(str(mode), 8)
            except ValueError:
                raise ValueError(f"args.mode must be an octal string such as \"644\" (got {mode!r})") from None
        return self


class DefinitionHealthCheck(Lax):
    """health_check as Backend.AI reads it: 26.3's fields, and HEAD's `enable` and default path."""

    enable: bool | None = Field(None, description="HEAD: a block written in the file is enabled unless it says enable: false")
    path: str = "/health"
    interval: float = Field(10.0, ge=0)
    max_retries: int = Field(10, ge=1)
    max_wait_time: float = Field(15.0, gt=0)
    expected_status_code: int = Field(200, ge=100, le=599)
    initial_delay: float = Field(60.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _defaults_for_nulls(cls, data: Any) -> Any:
        if data == {}:
            return {"enable": False}  # HEAD: an empty block opts out
        return _no_nulls(data)

    def to_check(self) -> HealthCheck | None:
        """The probe this block asks for; None when it is disabled."""
        if self.enable is False:
            return None
        return HealthCheck.model_validate(self.model_dump(exclude={"enable"}), strict=False)


class ServiceSection(Lax):
    pre_start_actions: list[PreStartAction] | None = None
    start_command: Command | None = Field(None, description="a list runs as is; a string runs as [shell, -c, command]")
    command: Command | None = Field(None, description="HEAD's name for start_command; wins when both are given")
    shell: str | None = Field(DEFAULT_SHELL, description="runs a string command; null or empty: the string is split instead (HEAD)")
    port: int = Field(ge=1, le=65535)
    # The appliance's extension (Backend.AI has none): the server also speaks gRPC on this port. The replica
    # gets a second port for it, mapped into the command as `port` is, and GRPC_PORT.
    grpc_port: int | None = Field(None, ge=1, le=65535)
    health_check: DefinitionHealthCheck | None = None

    @model_validator(mode="before")
    @classmethod
    def _kebab(cls, data: Any) -> Any:
        # HEAD accepts start-command as well
        if isinstance(data, dict) and "start-command" in data:
            data = {**data}
            data.setdefault("start_command", data.pop("start-command"))
        return data

    @field_validator("start_command", "command")
    @classmethod
    def _non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and ((isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v)):
            raise ValueError("must not be empty")
        return v

    @field_validator("port", "grpc_port")
    @classmethod
    def _not_reserved(cls, v: int | None) -> int | None:
        if v in RESERVED_PORTS:
            raise ValueError(f"ports {RESERVED_PORTS[0]} and {RESERVED_PORTS[1]} are reserved by Backend.AI's kernel runner; use another port")
        return v

    @model_validator(mode="after")
    def _has_command(self) -> ServiceSection:
        if self.argv_or_script is None:
            raise ValueError("start_command is required (this box has no container image whose command could stand in)")
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(f"grpc_port must differ from port ({self.port}): each gets a port of its own")
        return self

    @property
    def argv_or_script(self) -> str | list[str] | None:
        return self.command if self.command is not None else self.start_command

    @property
    def actions(self) -> list[PreStartAction]:
        return list(self.pre_start_actions or [])

    @property
    def check(self) -> HealthCheck | None:
        """The HTTP probe the definition asks for; None: none (healthy once the port accepts connections)."""
        return self.health_check.to_check() if self.health_check is not None else None


class ModelEntry(Lax):
    name: str = Field(min_length=1)
    model_path: str = Field(min_length=1)
    service: ServiceSection | None = None
    metadata: dict[str, Any] | None = None  # Backend.AI model-store card; recorded, not used


class ModelDefinition(Lax):
    models: list[ModelEntry] = Field(min_length=1)

    @property
    def model(self) -> ModelEntry:
        """The entry an endpoint serves: the first one with a service (Backend.AI starts each entry's
        service in one container; here one endpoint is one server, and the others are listed as unused)."""
        return next((m for m in self.models if m.service is not None), self.models[0])

    @property
    def unused(self) -> list[str]:
        return [m.name for m in self.models if m is not self.model and m.service is not None]


def _float_or_str(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"must be a number (got {value!r})") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


Number = Annotated[float, BeforeValidator(_float_or_str)]


class RuntimeEnvironment(Model):
    image: str | None = None  # no containers here: recorded and shown only
    architecture: str | None = None


# Resource slots the appliance acts on; any other slot is kept and reported as not enforced.
KNOWN_SLOTS = ("cpu", "mem", "cuda.shares", "cuda.device")


class ResourceSlots(Model):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True, populate_by_name=True)

    cpu: Number | None = Field(None, gt=0)
    mem: ByteSize | None = None
    cuda_shares: Number | None = Field(None, alias="cuda.shares", gt=0)
    cuda_device: int | None = Field(None, alias="cuda.device", ge=0)

    @property
    def others(self) -> dict[str, Any]:
        """Slots the appliance does not act on (e.g. rocm.device, tpu.device): shown, not enforced."""
        return dict(self.model_extra or {})


class RuntimeSection(Model):
    environment: RuntimeEnvironment = Field(default_factory=RuntimeEnvironment)
    resource_slots: ResourceSlots = Field(default_factory=ResourceSlots)
    environ: Environ = Field(default_factory=dict)


# Top-level tables of service-definition.toml that are not runtime sections (Backend.AI 26.3).
ROOT_TABLES = ("environment", "resource_slots", "environ")


class ServiceDefinition(Model):
    base: dict[str, Any] = Field(default_factory=dict)  # the root-level tables
    runtimes: dict[str, dict[str, Any]] = Field(default_factory=dict)  # [<variant>.*] sections, raw

    def for_runtime(self, runtime: str) -> RuntimeSection | None:
        """Root-level tables overridden field by field by the runtime's section, as Backend.AI 26.3 merges them."""
        section = self.runtimes.get(runtime)
        if section is None and not self.base:
            return None
        merged: dict[str, Any] = {k: dict(v) for k, v in self.base.items()}
        for key, value in (section or {}).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        return RuntimeSection.model_validate(merged)


# --- locating errors -------------------------------------------------------------------


def _yaml_line(root: yaml.Node | None, loc: list[str | int]) -> int | None:
    """Line (1-based) of the deepest YAML node on the path `loc`."""
    node = root
    if node is None:
        return None
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        if nxt is None:
            break
        node = nxt
    return node.start_mark.line + 1


def _definition_error(path: Path, problems: list[str]) -> ApplianceError:
    return ApplianceError(
        f"{path}: " + "; ".join(problems),
        status=422,
        code="invalid_definition",
        problems=[f"{path}: {p}" for p in problems],
    )


def parse_model_definition(text: str, *, path: Path) -> ModelDefinition:
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise _definition_error(path, [f"{where}not valid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise _definition_error(path, [f"not valid YAML: {exc}"]) from None
    try:
        return ModelDefinition.model_validate(data if data is not None else {}, strict=False)
    except ValidationError as exc:
        problems = []
        for loc, text_problem in validation_items(exc):
            line = _yaml_line(root, loc)
            problems.append(f"line {line}: {text_problem}" if line else text_problem)
        raise _definition_error(path, problems) from None


def parse_service_definition(text: str, *, path: Path) -> ServiceDefinition:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _definition_error(path, [f"not valid TOML: {exc}"]) from None
    # Backend.AI HEAD's flat form: image and architecture at the top, resource_opts beside resource_slots
    flat = {k: data.pop(k) for k in ("image", "architecture") if isinstance(data.get(k), str)}
    data.pop("resource_opts", None)  # container options (e.g. shared memory): nothing to apply without containers
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise _definition_error(path, [f"{k}: must be a table ([{k}] or [<runtime>.{k}])" for k in bad])
    base = {k: v for k, v in data.items() if k in ROOT_TABLES}
    if flat:
        base["environment"] = {**flat, **base.get("environment", {})}
    runtimes = {k: v for k, v in data.items() if k not in ROOT_TABLES}
    unknown = [k for k in runtimes if k not in RUNTIMES]
    if unknown:
        raise _definition_error(path, [f"[{k}]: neither a runtime ({', '.join(RUNTIMES)}) nor one of {', '.join(ROOT_TABLES)}" for k in unknown])
    problems = []
    for name, section in [("", base), *runtimes.items()]:
        try:
            RuntimeSection.model_validate(section)
        except ValidationError as exc:
            problems += [f"{name + '.' if name else ''}{p}" for p in validation_problems(exc)]
    if problems:
        raise _definition_error(path, problems)
    return ServiceDefinition(base=base, runtimes=runtimes)
