"""Concurrent keyed streams from a real vLLM replica reach the client as they are generated, and the
gateway's event loop keeps answering while the engine fills the cores.

An engine that saturates the CPU used to starve the appliance's loop (the engine's session weighed as
much as the appliance's): chunks piled up and every stream arrived in one lump at its end, with
/healthz answers hundreds of milliseconds late. Workers now run at `workers.nice` below the appliance.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin
from test_access import new_key
from test_supervisor import WORKERS, create, wait_status

from appliance.demo_model import write_demo_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
READY = 400  # seconds: a replica is ready in about a minute on 2 idle cores
WORKERS_NICE = 10  # the default; 0 (the same priority as the appliance) makes the streams lump
STREAMS = 8
TOKENS = 96
BURSTS = 3
LUMP_GAP = 0.0002  # seconds: a median inter-chunk gap below this means the chunks came together
# How late a /healthz answer may come during the bursts (beyond the 10 ms pause between polls). On a 2-core
# box with the engine filling both cores and other work running (load 4-5), the code with workers at nice 10
# answered at most 6-24 ms late (three runs); with workers.nice = 0 (as before) streams lumped and answers came up to 2 s late.
HEALTHZ_MAX = 0.1
PAUSE = 0.01  # seconds between /healthz polls


@pytest.fixture
async def admin(start_app: Any, make_config: Any) -> AsyncIterator[Admin]:
    # The appliance runs in pytest's own process here, whose heap holds what every earlier test of the
    # session left: a full collection of it can pause the loop for most of a second, which the
    # appliance's own process never carries. Frozen, the collector leaves those objects alone.
    gc.collect()
    gc.freeze()
    try:
        yield await start_app(make_config({"workers": {**WORKERS, "nice": WORKERS_NICE}}))
    finally:
        gc.unfreeze()


async def _stream(admin: Admin, headers: dict[str, str]) -> dict[str, float]:
    """One streamed completion: when each chunk of the body reached the client."""
    body = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0, "stream": True}
    t = time.perf_counter()
    times: list[float] = []
    resp = await admin.client.post("/v1/completions", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    async for _ in resp.content.iter_any():
        times.append(time.perf_counter() - t)
    assert times, "an empty stream"
    gaps = [b - a for a, b in zip(times, times[1:])] or [0.0]
    return {"ttft": times[0], "total": times[-1], "gap": statistics.median(gaps), "chunks": len(times)}


async def _poll(admin: Admin, stop: asyncio.Event, waits: list[float]) -> None:
    """/healthz one at a time, 10 ms apart: how long past those 10 ms each answer came after the last one.
    The client shares the appliance's event loop, so a loop that stalls delays the pause and the answer alike."""
    last = time.perf_counter()
    while not stop.is_set():
        resp = await admin.client.get("/healthz")
        await resp.read()
        assert resp.status == 200
        now = time.perf_counter()
        waits.append(now - last - (PAUSE if waits else 0.0))
        last = now
        await asyncio.sleep(PAUSE)


async def test_concurrent_keyed_streams_are_not_lumped_and_healthz_answers_during_them(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "tiny", write_demo_model(tmp_path / "tiny"), runtime="vllm", environ=VLLM_ENV, public=False)
    await wait_status(admin, "tiny", "HEALTHY", timeout=READY)
    key = await new_key(admin, name="streams", rpm_limit=10**6, tpm_limit=10**9)
    headers = {"Authorization": f"Bearer {key['key']}"}
    await asyncio.gather(*(_stream(admin, headers) for _ in range(2)))  # warm the engine's first-request paths
    bursts = []
    for _ in range(BURSTS):
        stop = asyncio.Event()
        waits: list[float] = []
        poller = asyncio.create_task(_poll(admin, stop, waits))
        try:
            streams = await asyncio.gather(*(_stream(admin, headers) for _ in range(STREAMS)))
        finally:
            stop.set()
            await poller
        bursts.append((streams, waits))
    seen = "\n".join(
        f"burst {i}: /healthz late by up to {max(waits) * 1000:.0f} ms ({len(waits)} answers); "
        + ", ".join(f"TTFT {s['ttft'] * 1000:.0f}/{s['total'] * 1000:.0f} ms gap {s['gap'] * 1000:.2f}" for s in streams)
        for i, (streams, waits) in enumerate(bursts)
    )
    print(seen)
    for streams, waits in bursts:
        assert all(s["gap"] > LUMP_GAP and s["ttft"] < s["total"] / 2 for s in streams), f"a stream arrived in one lump:\n{seen}"
        assert max(waits) < HEALTHZ_MAX, f"/healthz answered too late:\n{seen}"
    status, usage = await admin.call("GET", f"/api/v1/usage?key={key['id']}&since=1h")
    assert status == 200 and usage["data"][0]["completion_tokens"] == TOKENS * (STREAMS * BURSTS + 2)  # every stream counted
