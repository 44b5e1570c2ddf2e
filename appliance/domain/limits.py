"""Per-key limits: requests per minute, tokens per minute and requests in parallel.

Sliding 60-second windows (never more than the limit in any minute, unlike a fixed window
that allows twice the limit across a minute boundary). Tokens are known only when an
answer ends, so a key over its token budget is refused its next request, not cut off
mid-answer. Pure bookkeeping: the caller passes `now`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.parallel is not None


@dataclass(slots=True)
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    parallel: int = 0

    def expire(self, now: float) -> None:
        edge = now - WINDOW
        while self.requests and self.requests[0] <= edge:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= edge:
            self.token_sum -= self.tokens.popleft()[1]


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: str  # "rpm" | "tpm" | "parallel"
    message: str
    retry_after: float
    headers: dict[str, str]


def _reset(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}s"


class RateLimiter:
    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}

    def admit(self, key_id: str, limits: Limits, now: float) -> tuple[Refusal | None, dict[str, str]]:
        """Count one request if every limit allows it. Returns (refusal, x-ratelimit headers)."""
        w = self._windows.get(key_id)
        if w is None:
            w = self._windows[key_id] = _Window()
        w.expire(now)
        refusal = self._refusal(w, limits, now)
        if refusal is not None:
            return refusal, refusal.headers
        w.requests.append(now)
        w.parallel += 1
        return None, self.headers(w, limits, now)  # built once per request: the admitted path is the hot one

    def _refusal(self, w: _Window, limits: Limits, now: float) -> Refusal | None:
        if limits.parallel is not None and w.parallel >= limits.parallel:
            message = f"this key already has {w.parallel} requests in flight (max_parallel_requests {limits.parallel})"
            return Refusal("parallel", message, 1.0, self.headers(w, limits, now))
        if limits.rpm is not None and len(w.requests) >= limits.rpm:
            wait = w.requests[0] + WINDOW - now
            return Refusal("rpm", f"rate limit reached: {limits.rpm} requests per minute for this key", wait, self.headers(w, limits, now))
        if limits.tpm is not None and w.token_sum >= limits.tpm:
            wait = self._tokens_free_at(w, limits.tpm) - now
            message = f"rate limit reached: {limits.tpm} tokens per minute for this key ({w.token_sum} used)"
            return Refusal("tpm", message, wait, self.headers(w, limits, now))
        return None

    def finish(self, key_id: str, tokens: int, now: float) -> None:
        w = self._windows.get(key_id)
        if w is None:
            return
        w.parallel = max(0, w.parallel - 1)
        if tokens > 0:
            w.tokens.append((now, tokens))
            w.token_sum += tokens

    def forget(self, key_id: str) -> None:
        self._windows.pop(key_id, None)

    @staticmethod
    def _tokens_free_at(w: _Window, tpm: int) -> float:
        """When enough of the window's tokens have aged out to be under `tpm` again."""
        left = w.token_sum
        for t, n in w.tokens:
            left -= n
            if left < tpm:
                return t + WINDOW
        return w.tokens[-1][0] + WINDOW if w.tokens else 0.0

    @staticmethod
    def headers(w: _Window, limits: Limits, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the limits the key has."""
        out: dict[str, str] = {}
        if limits.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(limits.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - len(w.requests)))
            out["x-ratelimit-reset-requests"] = _reset(w.requests[0] + WINDOW - now if w.requests else 0.0)
        if limits.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(limits.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - w.token_sum))
            out["x-ratelimit-reset-tokens"] = _reset(w.tokens[0][0] + WINDOW - now if w.tokens else 0.0)
        return out


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
