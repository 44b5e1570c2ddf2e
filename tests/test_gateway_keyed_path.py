"""The keyed request's own costs (limits, usage, records) are paid once per request, with nothing dropped."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.domain.limits import Limits, RateLimiter


@pytest.fixture
def header_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the x-ratelimit-* headers were built."""
    calls: list[int] = []
    original = RateLimiter.headers

    def counted(*args: Any) -> dict[str, str]:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(RateLimiter, "headers", staticmethod(counted))
    return calls


def test_an_admitted_request_builds_its_rate_limit_headers_once(header_builds: list[int]) -> None:
    limiter = RateLimiter()
    limits = Limits(rpm=10, tpm=1000)
    refusal, headers = limiter.admit("k", limits, 100.0)
    assert refusal is None and len(header_builds) == 1
    assert headers["x-ratelimit-remaining-requests"] == "9" and headers["x-ratelimit-reset-requests"] == "60.000s"
    assert headers["x-ratelimit-remaining-tokens"] == "1000"
    limiter.finish("k", 600, 101.0)
    refusal, headers = limiter.admit("k", limits, 102.0)
    assert refusal is None and len(header_builds) == 2
    assert headers["x-ratelimit-remaining-requests"] == "8" and headers["x-ratelimit-remaining-tokens"] == "400"
    assert headers["x-ratelimit-reset-tokens"] == "59.000s"


def test_a_refused_request_builds_its_headers_once_and_is_not_counted(header_builds: list[int]) -> None:
    limiter = RateLimiter()
    limits = Limits(rpm=1)
    assert limiter.admit("k", limits, 0.0)[0] is None
    refusal, headers = limiter.admit("k", limits, 30.0)
    assert refusal is not None and refusal.limit == "rpm" and refusal.retry_after == 30.0
    assert len(header_builds) == 2 and headers is refusal.headers
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-reset-requests"] == "30.000s"
    assert limiter.admit("k", limits, 60.0)[0] is None  # the refused request took no place in the window
