"""Pure parts of access control: sliding-window limits, durations, and the usage-event filter."""

from __future__ import annotations

import json

import pytest

from appliance.api.inference.proxy import Outcome, UsageEventFilter
from appliance.domain.limits import Limits, RateLimiter
from appliance.domain.timefmt import parse_deadline, parse_duration, parse_instant
from appliance.errors import ApplianceError


def test_rpm_is_a_sliding_window_not_a_fixed_one() -> None:
    rl = RateLimiter()
    limits = Limits(rpm=2)
    assert rl.admit("k", limits, 0.0)[0] is None
    rl.finish("k", 0, 0.0)
    assert rl.admit("k", limits, 59.0)[0] is None
    rl.finish("k", 0, 59.0)
    refusal, headers = rl.admit("k", limits, 59.5)
    assert refusal is not None and refusal.limit == "rpm" and refusal.retry_after == pytest.approx(0.5)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert rl.admit("k", limits, 60.0)[0] is None  # the request at 0.0 left the window
    assert rl.admit("k", limits, 60.5)[0] is not None  # the one at 59.0 still counts: never 3 in any minute


def test_tpm_counts_tokens_when_answers_end_and_frees_them_after_a_minute() -> None:
    rl = RateLimiter()
    limits = Limits(tpm=100)
    for t, tokens in ((0.0, 60), (10.0, 50)):
        assert rl.admit("k", limits, t)[0] is None
        rl.finish("k", tokens, t + 1)
    refusal, _ = rl.admit("k", limits, 20.0)
    assert refusal is not None and refusal.limit == "tpm" and refusal.retry_after == pytest.approx(41.0)  # 60 tokens age out at 61
    assert rl.admit("k", limits, 61.0)[0] is None  # 50 left in the window
    assert rl.admit("other", limits, 20.0)[0] is None  # per key


def test_parallel_limit_and_headers_only_for_set_limits() -> None:
    rl = RateLimiter()
    limits = Limits(parallel=1)
    refusal, headers = rl.admit("k", limits, 0.0)
    assert refusal is None and headers == {}
    assert rl.admit("k", limits, 0.1)[0].limit == "parallel"  # type: ignore[union-attr]
    rl.finish("k", 5, 0.2)
    assert rl.admit("k", limits, 0.3)[0] is None
    assert not Limits().any and Limits(tpm=1).any


def test_durations_and_instants() -> None:
    assert parse_duration("30d", param="x") == 30 * 86400 and parse_duration("90", param="x") == 90 and parse_duration(1.5, param="x") == 1.5
    assert parse_duration("2w", param="x") == 14 * 86400 and parse_duration("15m", param="x") == 900
    assert parse_instant("2027-01-01", param="x") == 1798761600.0
    assert parse_instant("2027-01-01T01:00:00+01:00", param="x") == 1798761600.0
    assert parse_deadline("1h", 1000.0, param="x") == 4600.0
    for bad in ("0s", "-1d", "soon", True):
        with pytest.raises(ApplianceError):
            parse_duration(bad, param="x")  # type: ignore[arg-type]
    with pytest.raises(ApplianceError, match="not an ISO 8601"):
        parse_instant("next tuesday", param="x")


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_usage_event_filter_drops_only_the_usage_event_whatever_the_chunking(size: int) -> None:
    stream = (
        _event({"choices": [{"delta": {"content": "a"}}], "usage": None})
        + _event({"choices": [{"delta": {"content": "b"}}], "usage": None})
        + _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
        + b"data: [DONE]\n\n"
    )
    outcome = Outcome()
    f = UsageEventFilter(outcome)
    out = b"".join(f.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + f.flush()
    assert out == stream.replace(_event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}), b"")
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 2)


def test_usage_event_filter_keeps_crlf_framing_and_strips_usage_from_events_that_also_carry_choices() -> None:
    stream = b'data: {"choices":[{"text":"x"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\ndata: [DONE]\r\n\r\n'
    outcome = Outcome()
    f = UsageEventFilter(outcome)
    assert f.feed(stream) + f.flush() == b'data: {"choices": [{"text": "x"}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (1, 1)
