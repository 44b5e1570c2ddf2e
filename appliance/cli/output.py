"""How commands print a result: JSON under --json (for scripts), text otherwise (for people)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], object]) -> int:
    """Print `data` as JSON under --json, else hand it to `human`; returns the exit status, 0."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)
    return 0


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Left-aligned columns two spaces apart, each as wide as its widest cell; no trailing blanks."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
