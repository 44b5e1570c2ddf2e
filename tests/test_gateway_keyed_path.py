"""The keyed request's own costs (limits, usage, records) are paid once per request, with nothing dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin
from test_access import bearer, new_key
from test_gateway import healthy, stats
from test_supervisor import WORKERS, fake_folder

from appliance.api.inference import usage as usage_module
from appliance.api.inference.proxy import Outcome, UsageEventFilter
from appliance.domain.limits import Limits, RateLimiter


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS}))


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


async def test_a_keyed_stream_reaches_the_worker_as_sent_with_the_usage_event_asked_for(admin: Admin, tmp_path: Path) -> None:
    (rep,) = await healthy(admin, "kp", fake_folder(tmp_path, "kp"))
    key = await new_key(admin, name="limited", rpm_limit=1000, tpm_limit=100000)
    # Raw UTF-8, a number written as 1.10, no spaces: a parse and re-encode would change all three.
    raw = '{"model":"kp","messages":[{"role":"user","content":"héllo"}],"max_tokens":3,"temperature":1.10,"stream":true}\n'
    resp = await admin.client.post("/v1/chat/completions", data=raw.encode(), headers={**bearer(key["key"]), "Content-Type": "application/json"})
    assert resp.status == 200
    events = [e for e in (await resp.text()).split("\n\n") if e.startswith("data: {")]
    assert events and not any('"usage": {' in e or '"usage":{' in e for e in events)  # the usage event stays with the gateway
    sent = (await stats(rep["port"]))["last_body"]
    assert sent.startswith(raw.rstrip()[:-1]) and json.loads(sent)["stream_options"] == {"include_usage": True}
    status, usage = await admin.call("GET", f"/api/v1/usage?key={key['id']}&since=1h")
    assert status == 200 and usage["data"][0]["completion_tokens"] == 3 and usage["data"][0]["requests"] == 1


@pytest.mark.parametrize("event", [b'data: {"choices": [{"index": 0}], "usage": null}\n\n', b'data: {"choices": [], "usage":null}\n\n',
                                   b'data: {"usage" :  null, "choices": []}\r\n\r\n'])
def test_a_keyed_streams_usage_null_chunks_pass_without_being_decoded(event: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines that write `"usage": null` on every chunk once usage is asked for: each passes as it came, undecoded."""
    decoded: list[bytes] = []
    real_loads = usage_module.json.loads

    def counting(data: Any, *args: Any, **kwargs: Any) -> Any:
        decoded.append(data)
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(usage_module.json, "loads", counting)
    outcome = Outcome()
    events = UsageEventFilter(outcome)
    assert events.feed(event[:10]) + events.feed(event[10:]) == event and decoded == []
    last = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}\n\n'
    assert events.feed(last) == b"" and outcome.completion_tokens == 5  # the real usage event is still read and dropped
