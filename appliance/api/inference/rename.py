"""The `model` a worker writes in its answers, replaced by the name the client asked for, in whole
bodies and in streams whose chunks may cut a field in two."""

from __future__ import annotations

import functools
import json
import re

# Longest `@revision` kept in a plain stream's held-back tail (transformers serve writes `@main`).
_SUFFIX_MAX = 256


class Rename:
    """Workers may add to the name they were given (`transformers serve` answers with `<path>@main`)."""

    __slots__ = ("pattern", "probe", "replacement", "window")

    def __init__(self, served: str, asked: str) -> None:
        old = json.dumps(served).encode()
        self.probe = old[1:-1]  # the name without its quotes: one substring test for the common chunk
        self.pattern = re.compile(rb'("model":\s*)' + re.escape(old[:-1]) + rb'(?:@[^"\\]*)?"')
        self.replacement = rb"\g<1>" + json.dumps(asked).encode().replace(b"\\", b"\\\\")
        # the most bytes of one match that a chunk can end in (the whitespace after the colon aside)
        self.window = len(b'"model": ') + len(old) + _SUFFIX_MAX

    def __call__(self, data: bytes) -> bytes:
        if self.probe not in data:
            return data
        return self.pattern.sub(self.replacement, data)


@functools.lru_cache(maxsize=256)
def rename(served: str, asked: str) -> Rename:
    """One compiled Rename per (served, asked) pair: requests of an endpoint reuse it."""
    return Rename(served, asked)


class RenameStream:
    """Renames across chunk boundaries by holding back the end of a chunk a match may straddle. In
    SSE that is whatever follows the chunk's last newline: an event is dispatched only at its blank
    line, so a client never waits on what is held. In any other body it is the last `window` bytes
    from a `"model"` key on."""

    __slots__ = ("held", "rename", "sse")

    def __init__(self, rename: Rename, sse: bool) -> None:
        self.rename = rename
        self.sse = sse
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.held + chunk if self.held else chunk
        if self.sse:
            cut = data.rfind(b"\n") + 1
        else:
            start = max(0, len(data) - self.rename.window)
            at = data.find(b'"', start)  # the earliest key a match could start at
            while at != -1 and not b'"model"'.startswith(data[at : at + 7]):
                at = data.find(b'"', at + 1)
            cut = len(data) if at == -1 else at
        self.held = data[cut:]
        return self.rename(data[:cut]) if cut else b""

    def flush(self, last: bytes = b"") -> bytes:
        """What is held, with the stream's `last` bytes, renamed: the stream ends here."""
        rest, self.held = self.held + last, b""
        return self.rename(rest) if rest else b""
