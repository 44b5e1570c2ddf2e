"""Backend.AI files read from a model folder (blocking: call off the event loop). The parsing
and validation are pure, in domain.definitions."""

from __future__ import annotations

from pathlib import Path

from appliance.domain.definitions import DEFINITION_NAMES, SERVICE_DEFINITION_NAME, ModelDefinition, ServiceDefinition, parse_model_definition, parse_service_definition
from appliance.errors import ApplianceError


def find_definition_file(folder: Path, name: str | None) -> Path | None:
    """The model definition in `folder`: the named one (must exist) or a default name."""
    if name:
        candidate = folder / name
        if not candidate.is_file():
            raise ApplianceError(
                f"model definition file {name!r} not found in {folder}",
                status=422,
                code="definition_not_found",
                param="definition_file",
            )
        return candidate
    return next((folder / n for n in DEFINITION_NAMES if (folder / n).is_file()), None)


def load_model_definition(path: Path) -> ModelDefinition:
    return parse_model_definition(path.read_text(encoding="utf-8"), path=path)


def load_service_definition(folder: Path) -> ServiceDefinition | None:
    path = folder / SERVICE_DEFINITION_NAME
    if not path.is_file():
        return None
    return parse_service_definition(path.read_text(encoding="utf-8"), path=path)

