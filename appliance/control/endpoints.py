"""Endpoints: resolve what a user stated against the model folder, and keep the store in step.

`resolve` is where Backend.AI's rule lives: service-definition.toml supplies defaults,
explicit fields win. The service writes through the store (one transaction per change,
with its audit event) and never touches processes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance.config import DeclaredEndpoint
from appliance.control.models.folders import check_model_files, find_definition_file, load_model_definition, load_service_definition
from appliance.control.models.gate import folder_of
from appliance.control.models.weights import estimate_folder
from appliance.control.host.process import resolve_executable
from appliance.domain.definitions import ModelDefinition, RuntimeSection
from appliance.domain.memory import fmt_bytes
from appliance.domain.models import ModelFolder
from appliance.domain.runtimes import NEEDS_COMMAND, VARIANTS, default_health_check, default_served_model_name, grpc_port_of
from appliance.domain.scaling import declared_rule_rows
from appliance.domain.specs import EndpointConfig, EndpointSpec, Environment, Resources
from appliance.domain.states import EndpointStatus
from appliance.errors import ApplianceError, validation_error
from appliance.security.vault import Vault, masked, restore_masked
from appliance.store import Store
from appliance.store.repos import EndpointRow

log = logging.getLogger(__name__)
_UPDATE_TRIES = 20


def _folder(spec: EndpointSpec, model: ModelFolder | None = None) -> Path:
    if model is not None:  # a registered model: its local copy once READY, until then the definition files read at registration
        return Path(model.path) if Path(model.path).is_dir() else Path(model.definitions)
    if spec.model_folder is None:
        raise ApplianceError(f"model {spec.model!r} is not registered", status=422, code="model_not_found", param="model")
    folder = Path(spec.model_folder)
    problem = None
    if not folder.is_absolute():
        problem = f"must be an absolute path (got {spec.model_folder!r})"
    elif not folder.exists():
        problem = f"{folder} does not exist"
    elif not folder.is_dir():
        problem = f"{folder} is not a directory"
    if problem:
        raise ApplianceError(f"model_folder: {problem}", status=422, code="invalid_model_folder", param="model_folder")
    return folder


def _resources(spec: EndpointSpec, section: RuntimeSection | None, inherited: list[str]) -> Resources:
    stated = spec.resources or Resources()
    if section is None:
        return stated
    slots, given = section.resource_slots, stated.model_fields_set
    values: dict[str, Any] = stated.model_dump(include=given)
    if "cpu" not in given and slots.cpu is not None:
        values["cpu"] = slots.cpu
        inherited.append("resources.cpu")
    if "mem" not in given and slots.mem is not None:
        values["mem"] = slots.mem
        inherited.append("resources.mem")
    if not given & {"gpus", "gpu_share"}:
        share = slots.cuda_shares
        if share is not None and share < 1:
            values["gpu_share"] = share
            inherited.append("resources.gpu_share")
        elif share is not None or slots.cuda_device is not None:
            # cuda.shares above 1 spans several GPUs; a fraction of several (1.5) is held as whole GPUs here (2)
            whole = slots.cuda_device if slots.cuda_device is not None else math.ceil(share or 0)
            values["gpus"] = int(whole)
            inherited.append("resources.gpus")
    return Resources.model_validate(values)


def _check_installed(runtime: str) -> None:
    """An engine runtime whose package or program is missing is refused at once, not left to crash-loop."""
    needs = VARIANTS[runtime].needs
    if needs is None:
        return
    kind, _, what = needs[0].partition(":")
    found = importlib.util.find_spec(what) is not None if kind == "module" else _on_path(what)
    if not found:
        noun = "Python package" if kind == "module" else "program"
        raise ApplianceError(
            f"runtime {runtime!r} needs the {noun} {what!r}, which is not installed next to the appliance: {needs[1]}",
            status=422,
            code="runtime_not_installed",
            param="runtime",
        )


def _on_path(name: str) -> bool:
    try:
        resolve_executable(name)
        return True
    except ApplianceError:
        return False


def _model_file(runtime: str, folder: Path, names: tuple[str, ...] | None = None) -> str | None:
    if runtime != "llama-cpp":
        return None
    ggufs = sorted(n for n in names if n.endswith(".gguf")) if names is not None else sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise ApplianceError(f"runtime 'llama-cpp' serves a .gguf file, and {folder} has none", status=422, code="model_file_required", param="model_folder")
    return ggufs[0]


def _command(spec: EndpointSpec, runtime: str) -> list[str]:
    if runtime not in NEEDS_COMMAND:
        if spec.command:
            raise ApplianceError(f"command is for runtimes {' and '.join(NEEDS_COMMAND)}; runtime {runtime!r} has its own", status=422, code="invalid_field", param="command")
        return []
    if not spec.command:
        raise ApplianceError(
            f"runtime {runtime!r} runs a container image's own command on Backend.AI; here give the server's command as `command`",
            status=422, code="command_required", param="command",
        )
    resolve_executable(spec.command[0])  # 422 command_not_found now, not a crash loop later
    return list(spec.command)


def resolve(spec: EndpointSpec, model: ModelFolder | None = None) -> tuple[EndpointConfig, ModelDefinition | None]:
    """Apply the model folder's defaults (`model`: the registered model `spec.model` names). Reads small
    files: call it off the event loop."""
    try:
        return _resolve(spec, model)
    except OSError as exc:  # a name too long, no permission, an I/O error: the user's to fix, like a missing folder
        problem = f"cannot read {exc.filename or spec.model_folder or spec.model}: {exc.strerror or exc}"
    except UnicodeDecodeError as exc:
        problem = f"a definition file in {spec.model_folder or spec.model} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    raise ApplianceError(f"model_folder: {problem}", status=422, code="invalid_model_folder", param="model_folder")


def _resolve(spec: EndpointSpec, model: ModelFolder | None = None) -> tuple[EndpointConfig, ModelDefinition | None]:
    folder = _folder(spec, model)
    served_from = model.path if model else str(folder)
    def_path = find_definition_file(folder, spec.definition_file)
    definition = load_model_definition(def_path) if def_path else None
    runtime = spec.runtime or ("custom" if definition else "vllm")
    if runtime == "custom" and definition is None:
        raise ApplianceError(
            f"the custom runtime needs a model definition in {folder} (model-definition.yml or .yaml, or set definition_file)",
            status=422,
            code="definition_required",
            param="definition_file",
        )
    _check_installed(runtime)
    check_model_files(runtime, served_from, model.names if model else (p.name for p in folder.iterdir()), spec.extra_args)
    service = load_service_definition(folder)
    section = service.for_runtime(runtime) if service else None
    inherited: list[str] = []
    resources = _resources(spec, section, inherited)
    environ = dict(section.environ) if section else {}
    inherited += [f"environ.{k}" for k in environ if k not in spec.environ]
    environ.update(spec.environ)
    command = _command(spec, runtime)
    model_file = _model_file(runtime, folder, model.names if model else None)
    health = spec.health_check or default_health_check(runtime, definition)
    memory = estimate_folder(served_from, spec.extra_args)
    if memory is not None and resources.gpu_memory is not None and resources.gpu_memory < memory.weights:
        raise ApplianceError(
            f"resources.gpu_memory: {fmt_bytes(resources.gpu_memory)} is less than the model's weights alone ({fmt_bytes(memory.weights)} "
            f"in {served_from})", status=422, code="invalid_field", param="resources.gpu_memory",
        )
    config = EndpointConfig(
        name=spec.name,
        model_folder=served_from,
        model=spec.model,
        runtime=runtime,
        definition_file=def_path.name if def_path else None,
        served_model_name=spec.served_model_name or default_served_model_name(runtime, spec.name, served_from, definition),
        aliases=list(spec.aliases),
        replicas=spec.replicas,
        min_replicas=spec.low_replicas,
        max_replicas=spec.replicas if spec.max_replicas is None else spec.max_replicas,
        resources=resources,
        environ=environ,
        secret_environ=dict(spec.secret_environ),
        extra_args=list(spec.extra_args),
        continuous_batching=spec.continuous_batching,
        health_check=health,
        command=command,
        model_file=model_file,
        grpc_port=grpc_port_of(runtime, definition),
        unenforced_slots=section.resource_slots.others if section else {},
        unused_models=definition.unused if definition and runtime == "custom" else [],
        deep_probe=spec.deep_probe,
        unhealthy_replace_after=spec.unhealthy_replace_after or health.interval * (health.max_retries + 1),
        public=spec.public,
        description=spec.description,
        routing=spec.routing,
        prefix_length=spec.prefix_length,
        prefix_overload_factor=spec.prefix_overload_factor,
        max_concurrency=spec.max_concurrency,
        queue_size=spec.queue_size,
        queue_timeout_seconds=spec.queue_timeout_seconds,
        max_surge=spec.max_surge,
        drain_timeout_seconds=spec.drain_timeout_seconds,
        idle_timeout_seconds=spec.idle_seconds(),
        on_demand=spec.on_demand,
        pin=spec.pin,
        priority=spec.priority,
        sleep=spec.sleep,
        wake_timeout_seconds=spec.wake_timeout_seconds,
        autoscaling_policy=spec.autoscaling_policy,
        environment=Environment(**section.environment.model_dump()) if section else None,
        inherited=inherited,
        memory_estimate=memory,
    )
    return config, definition


def stated(spec: EndpointSpec) -> dict[str, Any]:
    """Only the fields the user gave, as JSON: what an update merges into."""
    return spec.model_dump(mode="json", exclude_unset=True)


def merge_patch(current: dict[str, Any], patch: dict[str, Any], name: str) -> EndpointSpec:
    """JSON-merge a patch into the stated spec; null removes a field (back to its default)."""
    if "name" in patch and patch["name"] != name:
        raise ApplianceError("name cannot be changed; create a new endpoint instead", status=422, code="immutable_field", param="name")
    merged = {**current}
    for given, other in (("model", "model_folder"), ("model_folder", "model")):
        if patch.get(given) is not None and other not in patch:
            merged.pop(other, None)  # a folder path and a registered model replace each other
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    merged["name"] = name
    try:
        return EndpointSpec.model_validate(merged)
    except ValidationError as exc:
        raise validation_error(exc, what="endpoint") from None


class EndpointService:
    def __init__(
        self,
        store: Store,
        on_change: Callable[[], Awaitable[None]] | None = None,
        *,
        vault: Vault,
        on_delete: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._notify = on_change  # the supervisor reconciles before the API answers: what it returns is live
        self._vault = vault
        self._on_delete = on_delete  # the deleted endpoint's tokens were revoked: drop them from the key cache

    def _sealed(self, spec: EndpointSpec, current: EndpointRow | None) -> EndpointSpec:
        """Secrets encrypted before anything is stored (unchanged ones keep their ciphertext: no restart); masked values sent back are the stored ones."""
        spec = spec.model_copy(update=restore_masked(spec.model_dump(include={"environ", "extra_args", "command"}), current))
        if not spec.secret_environ:
            return spec
        old = (current or {}).get("spec", {}).get("secret_environ", {})
        return spec.model_copy(update={"secret_environ": self._vault.seal_all(spec.secret_environ, old, param="secret_environ")})

    async def _on_change(self) -> None:
        if self._notify is not None:
            await self._notify()

    async def candidate(self, spec: EndpointSpec) -> EndpointConfig:
        """What `create` would run for `spec`, stored nowhere (a validation): checked, resolved, secrets sealed."""
        return await self._resolve(self._sealed(spec, None))

    async def _resolve(self, spec: EndpointSpec) -> EndpointConfig:
        model = None
        if spec.model is not None:
            row = await self._store.models.get(spec.model)
            if row is None:
                raise ApplianceError(f"model {spec.model!r} is not registered (see /api/v1/models)", status=422, code="model_not_found", param="model")
            model = folder_of(row)
        config, _ = await asyncio.to_thread(resolve, spec, model)
        return config

    async def get(self, name: str) -> EndpointRow:
        row = await self._store.endpoints.get(name)
        if row is None:
            raise ApplianceError(f"endpoint {name!r} not found", status=404, code="endpoint_not_found", param="name")
        return row

    async def list(self) -> list[EndpointRow]:
        return await self._store.endpoints.list()

    async def create(self, spec: EndpointSpec, *, source: str = "api") -> EndpointRow:
        spec = self._sealed(spec, None)
        config = await self._resolve(spec)
        row = {
            "name": spec.name,
            "spec": stated(spec),
            "config": config.model_dump(mode="json"),
            "source": source,
            "status": EndpointStatus.PENDING.value,
            "status_message": "waiting for replicas",
        }
        created = await self._store.endpoints.create(row, f"endpoint {spec.name} created ({source})", {"spec": masked(row["spec"])})
        await self._on_change()
        return created

    async def update(self, name: str, patch: dict[str, Any]) -> EndpointRow:
        # Read, merge, write only if nothing changed in between (the row's version); otherwise merge
        # into the newer row: two concurrent PATCHes both land, field by field.
        for _ in range(_UPDATE_TRIES):
            current = await self.get(name)
            spec = self._sealed(merge_patch(current["spec"], patch, name), current)
            # Saying `replicas` (even the same number) replaces the autoscaler's count.
            extra = {"desired_replicas": None} if "replicas" in patch else {}
            updated = await self._replace(
                current, spec, current["source"], f"endpoint {name} updated", {"patch": masked(patch)}, extra=extra, version=current.get("version", 0)
            )
            if updated is not None:
                return updated
        raise ApplianceError(f"endpoint {name!r} kept changing while this change was applied; send it again", status=409, code="conflict")

    async def _replace(
        self, current: EndpointRow, spec: EndpointSpec, source: str, message: str, details: dict[str, Any], config: EndpointConfig | None = None,
        extra: dict[str, Any] | None = None, version: int | None = None,
    ) -> EndpointRow | None:
        config = config or await self._resolve(spec)
        changes = {"spec": stated(spec), "config": config.model_dump(mode="json"), "source": source, **(extra or {})}
        updated = await self._store.endpoints.update(current["name"], changes, message, details, version=version)
        if updated is not None:
            await self._on_change()
        return updated

    async def delete(self, name: str, message: str = "deleted") -> None:
        await self._store.endpoints.delete(name, f"endpoint {name} {message}")
        if self._on_delete is not None:
            await self._on_delete()
        await self._on_change()

    async def apply_declared(self, specs: Sequence[EndpointSpec | DeclaredEndpoint]) -> list[str]:
        """Make the store match the config file's [[endpoints]]; returns the problems met.

        Declared endpoints are created or updated; endpoints that came from the config file
        and are no longer in it are deleted. An API-created endpoint the file names is taken
        over by the file (and so deleted once the file drops it); others are left alone.
        """
        problems: list[str] = []
        declared = {s.name for s in specs}
        for entry in specs:
            spec = entry.spec() if isinstance(entry, DeclaredEndpoint) else entry
            try:
                current = await self._store.endpoints.get(spec.name)
                if current is None:
                    await self.create(spec, source="config")
                else:
                    await self._apply_declared_one(spec, current)
            except ApplianceError as exc:
                problems.append(f"endpoints.{spec.name}: {exc.message}")
                await self._store.events.add("config.error", exc.message, endpoint=spec.name, details={"code": exc.code})
                continue
            try:
                rules = entry.autoscaling_rules if isinstance(entry, DeclaredEndpoint) else []
                rows = declared_rule_rows(spec.name, rules)
                await self._store.rules.reconcile_declared(spec.name, rows)
            except ApplianceError as exc:
                problems.append(f"endpoints.{spec.name}: {exc.message}")
                await self._store.events.add("config.error", exc.message, endpoint=spec.name, details={"code": exc.code})
        for row in await self._store.endpoints.list():
            if row["source"] == "config" and row["name"] not in declared:  # its rules go with it
                await self.delete(row["name"], "removed from the config file")
        for p in problems:
            log.error("declared endpoint not applied: %s", p)
        return problems


    async def _apply_declared_one(self, spec: EndpointSpec, current: EndpointRow) -> None:
        spec = self._sealed(spec, current)
        config = await self._resolve(spec)  # resolved once: the folder's files may have changed since
        if current["spec"] != stated(spec) or current["source"] != "config":
            await self._replace(current, spec, "config", f"endpoint {spec.name} updated from the config file", {"spec": masked(stated(spec))}, config)
        elif config.model_dump(mode="json") != current["config"]:
            await self._replace(current, spec, "config", f"endpoint {spec.name} picked up changes in its model folder", {}, config)
