"""Endpoints on registered models: where such an endpoint's folder is, and the gate a replica passes
before it may take a GPU. While the model warms, the replica waits in PROVISIONING holding nothing;
a FAILED model fails the endpoint with the model's own error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.domain.models import DEFINITIONS_DIR, FileEntry, ModelFolder, ModelState, percent, top_level
from appliance.domain.placement import Unplaceable
from appliance.domain.specs import EndpointConfig
from appliance.store import Store

POLL_SECONDS = 0.25  # how often a waiting replica looks at its model's state


def definitions_dir(local_path: str) -> Path:
    return Path(local_path).parent / DEFINITIONS_DIR


def folder_of(row: dict[str, Any]) -> ModelFolder:
    """A model row as endpoint resolution sees it."""
    entries = [FileEntry.of(e) for e in row["manifest"]]
    return ModelFolder(path=row["local_path"], definitions=str(definitions_dir(row["local_path"])), names=top_level(entries))


def _waiting(row: dict[str, Any]) -> str:
    progress = row.get("progress") or {}
    done, total = progress.get("bytes_done", 0), row.get("size", 0)
    state = row["state"]
    more = f" ({percent(done, total):g}%)" if state == ModelState.WARMING.value else ""
    return f"waiting for model {row['name']}: {state.lower()}{more}"


async def wait_for_model(store: Store, config: EndpointConfig, note: Callable[[str], None]) -> None:
    """Return once the endpoint's model is READY on local disk (at once for a plain folder). Raises
    Unplaceable(permanent) when the model FAILED, is gone, or was registered again at another path."""
    if config.model is None:
        return
    said = ""
    while True:
        row = await store.models.get(config.model)
        if row is None:
            raise Unplaceable(f"model {config.model!r} is not registered any more", permanent=True)
        if row["state"] == ModelState.FAILED.value:
            raise Unplaceable(f"model {config.model} failed: {row['last_error'] or 'no reason recorded'}", permanent=True)
        if row["local_path"] != config.model_folder:
            raise Unplaceable(f"model {config.model} is now served from {row['local_path']}: update the endpoint", permanent=True)
        if row["state"] == ModelState.READY.value and await asyncio.to_thread(Path(config.model_folder).is_dir):
            await store.models.touch(config.model)
            return
        text = _waiting(row)
        if text.split(" (")[0] != said.split(" (")[0]:  # a line per state, not per percent
            note(text)
        said = text
        await asyncio.sleep(POLL_SECONDS)
