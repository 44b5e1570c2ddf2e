"""What a model folder's weights and shape are, for the memory estimate: only the header of each
safetensors file is read (8-byte length + JSON), never the tensors. Blocking: call it off the loop."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.domain.memory import estimate
from appliance.domain.specs import MemoryEstimate

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 << 20  # the format's own limit on a header


def read_header(path: Path) -> dict[str, Any]:
    """One safetensors file's header: {tensor name: {dtype, shape, data_offsets}, "__metadata__": …}."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise ValueError(f"{path.name}: a header of {length} bytes is more than safetensors allows")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: those its index names, else every *.safetensors."""
    index = folder / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def estimate_folder(folder: str | Path, extra_args: Sequence[str] = ()) -> MemoryEstimate | None:
    """The memory estimate of the model in `folder`; None when it has no safetensors weights or they
    cannot be read (the claim then falls back to the replica's share)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    try:
        headers = [read_header(p) for p in weight_files(root)]
        config_path = root / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        log.warning("no memory estimate for %s: %s", root, exc)
        return None
    return estimate(headers, config if isinstance(config, dict) else None, extra_args)
