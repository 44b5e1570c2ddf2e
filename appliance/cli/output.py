"""How commands print a result: JSON under --json (for scripts), text otherwise (for people)."""

from __future__ import annotations

import argparse
import json
import sys
import time
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


class Spinner:
    """A one-line spinner with elapsed seconds on stderr, only on a terminal (logs and pipes get none)."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._frame = 0
        self._started = time.monotonic()

    def tick(self, text: str) -> None:
        if self.enabled:
            self._frame = (self._frame + 1) % len(self.FRAMES)
            print(f"\r{self.FRAMES[self._frame]} {text} ({time.monotonic() - self._started:.0f} s)", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
