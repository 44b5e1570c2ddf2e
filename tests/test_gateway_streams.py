"""Streams through the gateway: token counts from whichever event carries the usage (the last content
chunk, as `transformers serve` sends it, or a usage-only one), the usage block kept from a client that
did not ask for it, and a client that leaves mid-stream recorded as such, not as a worker's failure."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import Admin, async_wait_for
from inprocess import InProcessLauncher
from test_access import bearer, new_key
from test_gateway import healthy, sdk
from test_metrics import samples, scrape
from test_supervisor import WORKERS, fake_folder

from appliance.api.app import make_app
from appliance.api.inference.proxy import Outcome, UsageEventFilter
from appliance.config import Config

pytestmark = pytest.mark.usefixtures("slow_callback_guard")
CHAT = {"messages": [{"role": "user", "content": "x"}], "stream": True}


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS, "gateway": {}}))


def data_events(text: str) -> list[Any]:
    return [json.loads(e[5:]) for e in text.split("\n\n") if e.startswith("data:") and e != "data: [DONE]"]


async def records(admin: Admin, endpoint: str) -> list[dict[str, Any]]:
    status, body = await admin.call("GET", f"/api/v1/requests?endpoint={endpoint}")
    assert status == 200
    return list(body["data"])


async def test_a_keyed_stream_with_usage_on_its_last_chunk_is_counted_and_the_client_never_sees_it(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "tf", fake_folder(tmp_path, "tf", "--usage-on-last-chunk"))
    key = await new_key(admin, tpm_limit=10)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "tf", "max_tokens": 8, **CHAT}, headers=bearer(key["key"]))
    events = data_events(await resp.text())
    assert resp.status == 200 and len(events) == 8 and all(e["choices"] for e in events)
    assert not [e for e in events if "usage" in e], "a usage block the client did not ask for"
    (rec,) = await records(admin, "tf")
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (3, 8)
    got = samples((await scrape(admin))[2])
    assert got[("appliance_completion_tokens_total", (("endpoint", "tf"),))] == 8
    assert got[("appliance_prompt_tokens_total", (("endpoint", "tf"),))] == 3
    status, usage = await admin.call("GET", f"/api/v1/usage?key={key['id']}")
    assert status == 200 and (usage["totals"]["prompt_tokens"], usage["totals"]["completion_tokens"]) == (3, 8)
    # 3 + 8 = 11 tokens against a limit of 10: the next call of the key waits for the window
    resp = await admin.client.post("/v1/chat/completions", json={"model": "tf", "max_tokens": 1, **CHAT}, headers=bearer(key["key"]))
    body = await resp.json()
    assert resp.status == 429 and "tokens per minute" in body["error"]["message"]


async def test_a_client_that_asks_for_usage_gets_it_where_the_worker_put_it(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "tf", fake_folder(tmp_path, "tf", "--usage-on-last-chunk"))
    client = sdk(admin)
    stream = await client.chat.completions.create(model="tf", messages=CHAT["messages"], max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert len(chunks) == 5 and chunks[-1].choices and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    (rec,) = await records(admin, "tf")
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (3, 5)


def _event(body: dict[str, Any], end: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + end


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n"])
@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_the_usage_the_gateway_asked_for_is_taken_out_of_the_content_event_that_carries_it(size: int, end: bytes) -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    first = _event({"choices": [{"delta": {"content": "a"}}]}, end)
    last = {"choices": [{"delta": {"content": 'b "usage": 1'}, "finish_reason": "length"}]}
    stream = first + _event({**last, "usage": usage}, end) + b"data: [DONE]" + end
    outcome = Outcome()
    f = UsageEventFilter(outcome)
    out = b"".join(f.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + f.flush()
    assert out == first + b"data: " + json.dumps(last).encode() + end + b"data: [DONE]" + end
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (7, 2)


class _Uncancelled(TestServer):
    """A test server whose handlers run on after their client left (aiohttp's own always cancels them)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **{**kwargs, "handler_cancellation": False})


@pytest.fixture
async def uncancelled(aiohttp_client: Any, launcher: InProcessLauncher, make_config: Any) -> Callable[[], Any]:
    """The app on a server that lets a handler run on after its client left (handler_cancellation off):
    the gateway then finds out by writing to the departed client."""

    async def start() -> Admin:
        config: Config = make_config({"workers": WORKERS, "gateway": {}})
        client = await aiohttp_client(_Uncancelled(make_app(config, launcher=launcher)))

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await async_wait_for(ready, timeout=10, what="/readyz")
        return Admin(client, config)

    return start


@pytest.mark.parametrize("cancelling", [True, False], ids=["handler-cancelled", "write-fails"])
async def test_a_client_that_leaves_mid_stream_is_recorded_as_client_closed(
    cancelling: bool, start_inprocess_app: Any, make_config: Any, uncancelled: Callable[[], Any], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    admin = await (start_inprocess_app(make_config({"workers": WORKERS, "gateway": {}})) if cancelling else uncancelled())
    await healthy(admin, "gone", fake_folder(tmp_path, "gone", "--tokens-per-second", "50"), public=True)
    with caplog.at_level(logging.ERROR):
        resp = await admin.client.post("/v1/chat/completions", json={"model": "gone", "max_tokens": 200, **CHAT})
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # the client goes away mid-stream

        async def recorded() -> list[dict[str, Any]]:
            return await records(admin, "gone")

        (rec,) = await async_wait_for(recorded, timeout=10, what="the request's record")
    assert rec["error_source"] == "client_closed", rec
    failed = [r.getMessage() for r in caplog.records if r.name.startswith("appliance.api") and r.levelno >= logging.ERROR]
    assert not failed, failed  # no second write to the departed client, no "unhandled error"
