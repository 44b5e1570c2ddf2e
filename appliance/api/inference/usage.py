"""Token counts read from a worker's answers: a JSON body's `usage`, or the SSE event that carries it
in a stream (a usage-only last event as vLLM and OpenAI send it, or the last content event as
`transformers serve` sends it)."""

from __future__ import annotations

import json
import re
from typing import Any, Protocol


class Counts(Protocol):
    prompt_tokens: int | None
    completion_tokens: int | None


_DECODER = json.JSONDecoder()
_EVENT_END = re.compile(rb"\r?\n\r?\n")
# A usage object, not the `"usage": null` that some engines (and OpenAI's API) write on every chunk once usage is asked for.
_REAL_USAGE = re.compile(rb'"usage"\s*:(?!\s*null)')  # the look-ahead skips the spaces itself: `\s*(?!null)` backtracks past them


def usage_from(data: Any, outcome: Counts) -> bool:
    """The counts of a decoded answer or event into `outcome`; True when it had a usage object."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return False
    outcome.prompt_tokens = usage.get("prompt_tokens", outcome.prompt_tokens)
    outcome.completion_tokens = usage.get("completion_tokens", outcome.completion_tokens)
    return True


def usage_from_body(body: bytes, outcome: Counts) -> None:
    """Decode only the `usage` object of a JSON answer, not the whole (possibly long) completion."""
    at = body.rfind(b'"usage"')
    colon = body.find(b":", at) if at >= 0 else -1
    if colon < 0:
        return
    try:
        usage, _ = _DECODER.raw_decode(body[colon + 1 :].decode("utf-8", errors="replace").lstrip())
    except ValueError:
        return
    usage_from({"usage": usage}, outcome)


def usage_from_sse(tail: bytes, outcome: Counts) -> None:
    """The last event that carries `usage`, whether its `choices` are empty or not."""
    for event in reversed(_EVENT_END.split(tail)):
        for line in event.splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    data = json.loads(line[5:])
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("usage") and usage_from(data, outcome):
                    return


class UsageEventFilter:
    """Passes an SSE stream through whole events, less the usage that the gateway asked for on the
    client's behalf: its counts go to `outcome`; an event that carries nothing else (`"choices": []`)
    is dropped, and from one that carries choices too the `usage` object is taken out."""

    def __init__(self, outcome: Counts) -> None:
        self._outcome = outcome
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        if (data.endswith(b"\n\n") or data.endswith(b"\r\n\r\n")) and _REAL_USAGE.search(data) is None:
            self._partial = b""
            return data  # whole events, none with usage: the common case, passed without framing
        out = []
        start = 0
        for match in _EVENT_END.finditer(data):
            event = data[start : match.end()]
            start = match.end()
            if _REAL_USAGE.search(event) is not None:
                event = self._without_usage(event)
            out.append(event)
        self._partial = data[start:]
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest

    def _without_usage(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            try:
                body = json.loads(line[5:])
            except ValueError:
                return event
            if not usage_from(body, self._outcome):
                return event
            if not body.get("choices"):
                return b""  # a usage-only event
            del body["usage"]
            lines[i] = b"data: " + json.dumps(body).encode() + (b"\r" if line.endswith(b"\r") else b"")
            return b"\n".join(lines)
        return event
