"""Backend.AI model folders: model-definition.yaml and service-definition.toml.

Parsing follows the Backend.AI documentation field for field. Errors name the file,
the field and, for YAML, the line the field (or its parent) sits on.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.domain.specs import ByteSize, Environ, HealthCheck, Model
from appliance.errors import ApplianceError, validation_items, validation_problems

DEFINITION_NAMES = ("model-definition.yml", "model-definition.yaml")
SERVICE_DEFINITION_NAME = "service-definition.toml"

# Arguments each pre-start action needs (Backend.AI "Prestart Actions").
_REQUIRED_ARGS: dict[str, tuple[str, ...]] = {
    "write_file": ("filename", "body"),
    "write_tempfile": ("body",),
    "run_command": ("command",),
    "mkdir": ("path",),
    "log": ("message",),
}


def _stringify_list(value: Any) -> Any:
    # `- 8000` unquoted in YAML is an int; a command line is strings.
    if isinstance(value, list):
        return [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
    return value


Command = Annotated[str | list[str], BeforeValidator(_stringify_list)]


class PreStartAction(Model):
    action: Literal["write_file", "write_tempfile", "run_command", "mkdir", "log"]
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _args(self) -> "PreStartAction":
        missing = [a for a in _REQUIRED_ARGS[self.action] if a not in self.args]
        if missing:
            raise ValueError(f"{self.action} needs args.{', args.'.join(missing)}")
        if self.action == "run_command":
            cmd = self.args["command"]
            if not (isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd)):
                raise ValueError("run_command needs args.command as a non-empty list of strings")
        if "mode" in self.args and not isinstance(self.args["mode"], (int, str)):
            raise ValueError("args.mode must be an octal such as 644")
        return self


class ServiceSection(Model):
    pre_start_actions: list[PreStartAction] = Field(default_factory=list)
    start_command: Command
    port: int = Field(ge=1, le=65535)
    health_check: HealthCheck | None = None

    @field_validator("start_command")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("must not be empty")
        return v


class ModelEntry(Model):
    name: str = Field(min_length=1)
    model_path: str = Field(min_length=1)
    service: ServiceSection | None = None
    metadata: dict[str, Any] | None = None  # Backend.AI model-store card; recorded, not used


class ModelDefinition(Model):
    models: list[ModelEntry] = Field(min_length=1)

    @property
    def model(self) -> ModelEntry:
        """The entry an endpoint serves: the first, as Backend.AI does."""
        return self.models[0]


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


class ResourceSlots(Model):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    cpu: Number | None = Field(None, gt=0)
    mem: ByteSize | None = None
    cuda_shares: Number | None = Field(None, alias="cuda.shares", gt=0)
    cuda_device: int | None = Field(None, alias="cuda.device", ge=0)


class RuntimeSection(Model):
    environment: RuntimeEnvironment = Field(default_factory=RuntimeEnvironment)
    resource_slots: ResourceSlots = Field(default_factory=ResourceSlots)
    environ: Environ = Field(default_factory=dict)


class ServiceDefinition(Model):
    runtimes: dict[str, RuntimeSection] = Field(default_factory=dict)

    def for_runtime(self, runtime: str) -> RuntimeSection | None:
        return self.runtimes.get(runtime)


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
        return ModelDefinition.model_validate(data if data is not None else {})
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
    bad = [k for k, v in data.items() if not isinstance(v, dict)]
    if bad:
        raise _definition_error(path, [f"{k}: must be a [{k}.*] table (runtime sections only)" for k in bad])
    try:
        return ServiceDefinition.model_validate({"runtimes": data})
    except ValidationError as exc:
        problems = [p.removeprefix("runtimes.") for p in validation_problems(exc)]
        raise _definition_error(path, problems) from None
