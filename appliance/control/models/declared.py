"""[[models.declared]]: models registered from the config file at start and on reload, and forgotten
when they leave it (unless an endpoint still serves them), as declared endpoints are managed."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from appliance.control.models.registry import Registry
from appliance.domain.models import ModelSpec, ModelState
from appliance.errors import ApplianceError
from appliance.store import Store

log = logging.getLogger(__name__)
# What a model's files come from: changing any of them makes it another model, under another name.
SOURCE_FIELDS = ("source", "revision", "endpoint_url", "region", "credentials")
_TO_WARM = (ModelState.REGISTERED.value, ModelState.EVICTED.value, ModelState.FAILED.value)


async def _problem(store: Store, problems: list[str], name: str, exc: ApplianceError) -> None:
    problems.append(f"models.declared.{name}: {exc.message}")
    log.error("declared model not applied: %s: %s", name, exc.message)
    await store.events.add("config.error", exc.message, details={"code": exc.code, "model": name})


async def apply_declared(registry: Registry, store: Store, entries: Sequence[ModelSpec]) -> list[str]:
    """Register the declared models that are new, take over API ones of the same name, and warm those that
    say so and are not on disk (a FAILED one is tried again). Returns the problems met."""
    problems: list[str] = []
    for spec in entries:
        stated = spec.model_dump(mode="json", exclude_unset=True)
        try:
            row = await store.models.get(spec.name)
            if row is None:
                row = await registry.register(spec.model_copy(update={"warm": False}), origin="config")
            else:
                changed = [k for k in SOURCE_FIELDS if row["spec"].get(k) != stated.get(k)]
                if changed:
                    raise ApplianceError(
                        f"model {spec.name}: {', '.join(changed)} cannot change on a registered model; declare it under a new name "
                        "(or remove it, reload, and declare it again)", status=409, code="immutable_field",
                    )
                if row["spec"] != stated or row["origin"] != "config":
                    row = await store.models.update(spec.name, {"spec": stated, "origin": "config"}, "model.updated", f"model {spec.name} updated from the config file")
            if spec.warm and row["state"] in _TO_WARM:
                await registry.warm_or_fail(spec.name)
        except ApplianceError as exc:
            await _problem(store, problems, spec.name, exc)
    return problems


async def prune_declared(registry: Registry, store: Store, entries: Sequence[ModelSpec]) -> list[str]:
    """Delete the models that came from the config file and are no longer in it; one an endpoint serves stays."""
    problems: list[str] = []
    declared = {s.name for s in entries}
    for row in await store.models.list():
        if row["origin"] == "config" and row["name"] not in declared:
            try:
                await registry.delete(row["name"])
            except ApplianceError as exc:
                await _problem(store, problems, row["name"], exc)
    return problems
