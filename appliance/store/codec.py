"""Encodings shared by the store and its readers: timestamps and JSON columns."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def iso(ts: float) -> str:
    """Epoch seconds → '2026-11-23T11:02:19.123Z' (fixed width, so text order is time order)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
