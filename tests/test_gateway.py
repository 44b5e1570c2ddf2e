"""The gateway with the official openai SDK and raw HTTP: routing, streaming, errors, balancing,
cancellation and failures, against fake workers run in-process (tests/inprocess.py) on loopback ports.
A fake worker's completion id is fake-<port>: it tells replicas apart and leads to its worker."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import Admin, async_wait_for
from inprocess import InProcessLauncher, InProcessWorker
from test_supervisor import FAKE, WORKERS, create, fake_folder, replicas, wait_status
from yarl import URL

# The gateway in-process: any callback of its that holds the event loop over 100 ms fails the test.
pytestmark = pytest.mark.usefixtures("slow_callback_guard")


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS, "server": {"max_body_bytes": 1 << 20}}))


def sdk(admin: Admin, key: str | None = None) -> openai.AsyncOpenAI:
    key = key if key is not None else admin.headers["Authorization"].split()[1]
    return openai.AsyncOpenAI(base_url=str(admin.client.make_url("/v1")), api_key=key, max_retries=0)


async def healthy(admin: Admin, name: str, folder: Path, **extra: Any) -> list[dict[str, Any]]:
    await create(admin, name, folder, **extra)
    await wait_status(admin, name, "HEALTHY")
    return await replicas(admin, name)


async def stats(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/stats") as resp:
        return await resp.json()


async def test_openai_sdk_models_chat_stream_completions_embeddings(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "chat", fake_folder(tmp_path, "chat"), aliases=["chat-latest"])
    client = sdk(admin)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["chat"]
    reply = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3" and reply.usage and reply.usage.completion_tokens == 4
    assert reply.model == "chat"  # the worker saw its served name (the definition's "chat") after rewriting
    stream = await client.chat.completions.create(model="chat-latest", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in pieces) == "tok0 tok1 tok2 tok3 tok4 "
    done = await client.completions.create(model="chat", prompt="once upon", max_tokens=2)
    assert done.choices[0].text == "tok0 tok1"
    emb = await client.embeddings.create(model="chat", input=["a", "bcd"])
    assert [d.embedding[0] for d in emb.data] == [1.0, 3.0]
    status, records = await admin.call("GET", "/api/v1/requests?endpoint=chat")
    assert status == 200 and len(records["data"]) == 4
    first = records["data"][-1]
    assert first["status"] == 200 and first["completion_tokens"] == 4 and first["prompt_tokens"] == 3 and first["replica"]
    assert first["ttfb"] is not None and first["latency"] >= first["ttfb"]
    # A body rewritten for the worker (here: an alias) keeps every number as sent, huge integers included.
    raw = '{"model": "chat-latest", "messages": [], "max_tokens": 1, "seed": 1180591620717411303424, "temperature": 0.5}'
    resp = await admin.client.post("/v1/chat/completions", data=raw, headers={**admin.headers, "Content-Type": "application/json"})
    assert resp.status == 200
    (rep,) = await replicas(admin, "chat")
    sent = (await stats(rep["port"]))["last_body"]
    assert '"seed": 1180591620717411303424' in sent and '"model": "chat"' in sent and '"temperature": 0.5' in sent


async def test_sdk_errors(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "private", fake_folder(tmp_path, "private"))
    with pytest.raises(openai.AuthenticationError):
        await sdk(admin, key="ak-wrong").chat.completions.create(model="private", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as info:
        await sdk(admin).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and "did you mean" not in info.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk(admin).chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    assert bad.value.code == "missing_model"


async def test_queue_overflow_is_429_with_retry_after(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "busy", fake_folder(tmp_path, "busy", "--latency", "1.0"), max_concurrency=1, queue_size=1, queue_timeout_seconds=5)
    client = sdk(admin)
    calls = [asyncio.create_task(client.chat.completions.create(model="busy", messages=[{"role": "user", "content": "x"}], max_tokens=1)) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(limited) == 1 and sum(not isinstance(r, Exception) for r in results) == 2  # one in flight, one queued
    assert limited[0].response.headers["Retry-After"] == "1" and limited[0].code == "queue_full"


async def test_raw_http_errors(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "raw", fake_folder(tmp_path, "raw"), public=True)
    c = admin.client
    for body, code in ((b"{nope", "invalid_json"), (b"[]", "invalid_json"), (b'{"messages": []}', "missing_model")):
        resp = await c.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        err = await resp.json()
        assert resp.status == 400 and err["error"]["code"] == code and err["error"]["source"] == "appliance"
    resp = await c.post("/v1/chat/completions", data=b'{"model": "raw", "x": "' + b"a" * (2 << 20) + b'"}')
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"
    resp = await c.get("/v1/chat/completions")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_public_and_private_access(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "open", fake_folder(tmp_path, "open"), public=True)
    await healthy(admin, "closed", fake_folder(tmp_path, "closed"))
    c = admin.client
    listed = await (await c.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["open"]  # without a key: public ones only
    resp = await c.post("/v1/chat/completions", json={"model": "open", "messages": [], "max_tokens": 1})
    assert resp.status == 200
    resp = await c.post("/v1/chat/completions", json={"model": "closed", "messages": [], "max_tokens": 1})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "missing_api_key"
    token = admin.headers["Authorization"].split()[1]
    resp = await c.post("/v1/chat/completions", json={"model": "closed", "messages": [], "max_tokens": 1}, headers={"Authorization": f"BackendAI {token}"})
    assert resp.status == 200
    await admin.call("PATCH", "/api/v1/endpoints/closed", json_body={"public": True})

    async def opened() -> bool:
        resp = await c.post("/v1/chat/completions", json={"model": "closed", "messages": [], "max_tokens": 1})
        return resp.status == 200

    await async_wait_for(opened, timeout=5, what="public to take effect")


async def test_endpoint_url_passes_everything_through(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "triton", fake_folder(tmp_path, "triton"), public=True)
    resp = await admin.client.post("/endpoints/triton/v2/models/m/infer?trace=1", data=b'{"inputs": []}', headers={"X-Custom": "yes", "Authorization": "Bearer secret"})
    echo = await resp.json()
    assert resp.status == 200 and echo["method"] == "POST" and echo["path"] == "/v2/models/m/infer" and echo["query"] == "trace=1"
    assert echo["body"] == '{"inputs": []}' and echo["headers"]["X-Custom"] == "yes" and "Authorization" not in echo["headers"]
    resp = await admin.client.delete("/endpoints/triton/echo/anything", headers={"user-agent": "custom/1"}, skip_auto_headers=["Accept-Encoding"])
    echo = await resp.json()
    seen = {k.lower(): v for k, v in echo["headers"].items()}
    assert resp.status == 200 and echo["method"] == "DELETE"
    assert seen["user-agent"] == "custom/1" and seen["accept-encoding"] == "identity"  # no compression it did not ask for
    resp = await admin.client.get("/endpoints/triton/echo/x", skip_auto_headers=["User-Agent"])
    assert {k.lower(): v for k, v in (await resp.json())["headers"].items()}["user-agent"] == "appliance"
    resp = await admin.client.get("/endpoints/nobody/x", headers=admin.headers)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "endpoint_not_found"
    # encoded bytes in the path and query reach the worker as the client sent them
    resp = await admin.client.get(URL("/endpoints/triton/echo/a%2Fb%3Fc/infer?q=1&x=%26%20", encoded=True))
    echo = await resp.json()
    assert resp.status == 200 and echo["raw_path"] == "/echo/a%2Fb%3Fc/infer?q=1&x=%26%20", echo
    # every cookie a worker sets reaches the client, except one named as the console's session
    resp = await admin.client.get("/endpoints/triton/echo/c", params=[("set-cookie", "a=1"), ("set-cookie", "b=2"), ("set-cookie", "appliance_session=x")])
    assert resp.status == 200 and resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_worker_errors_pass_through_unchanged(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "dead", fake_folder(tmp_path, "dead", "--dead-generation"), public=True)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "dead", "messages": []})
    assert resp.status == 500 and await resp.json() == {"error": {"message": "generation is dead", "type": "server_error"}}


async def test_no_healthy_replica_503_and_wait_for_a_starting_one(admin: Admin, tmp_path: Path) -> None:
    await create(admin, "zero", fake_folder(tmp_path, "zero"), replicas=0, min_replicas=0, public=True)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "zero", "messages": []})
    err = await resp.json()
    assert resp.status == 503 and err["error"]["message"] == "endpoint zero has no healthy replica (none running)"
    await create(admin, "slowstart", fake_folder(tmp_path, "slowstart", "--startup-delay", "1.0", health={"initial_delay": 30}), public=True)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "slowstart", "messages": [], "max_tokens": 1})
    assert resp.status == 200  # waited for the starting replica instead of failing
    await create(admin, "never", fake_folder(tmp_path, "never", "--startup-delay", "3600", health={"initial_delay": 30}), public=True, queue_timeout_seconds=0.5)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "never", "messages": []})
    err = await resp.json()
    assert resp.status == 503 and "has no healthy replica (1 starting)" in err["error"]["message"]


async def test_large_sse_events_pass_unbuffered(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "big", fake_folder(tmp_path, "big"), public=True)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "big", "messages": [], "stream": True, "big_event": True, "max_tokens": 2})
    text = await resp.text()
    assert resp.status == 200 and len(text) > 200_000 and text.rstrip().endswith("data: [DONE]")
    assert "Content-Encoding" not in resp.headers


async def test_least_outstanding_prefers_the_fast_replica(admin: Admin, tmp_path: Path) -> None:
    # The slow replica holds every request it gets until the test ends: least outstanding sends it one only
    # while it holds no more than the fast one has in flight, so of 32 requests from 4 clients it can hold
    # at most 2 (with 4 clients, a pick that finds it holding 2 sees at most 1 on the fast one).
    folder = fake_folder(tmp_path, "skew", "--slow-marker", str(tmp_path / "slow"), "--slow-latency", "3600")
    reps = await healthy(admin, "skew", folder, replicas=2, max_replicas=2, public=True)
    answered: Counter[str] = Counter()
    budget = 32

    async def client() -> None:
        nonlocal budget
        while budget:
            budget -= 1
            resp = await admin.client.post("/v1/chat/completions", json={"model": "skew", "messages": [], "max_tokens": 1})
            answered[(await resp.json())["id"]] += 1

    clients = [asyncio.create_task(client()) for _ in range(4)]

    async def held() -> tuple[int] | None:  # settled: each request answered or held by the slow replica (or every client stuck there)
        running = sum([(await stats(r["port"])).get("running", 0) for r in reps])
        settled = not budget and sum(c.done() for c in clients) + running == len(clients) and sum(answered.values()) + running == 32
        return (running,) if settled or running == len(clients) else None

    try:
        (n_slow,) = await async_wait_for(held, timeout=30, what="every request answered or held by the slow replica")
    finally:
        for c in clients:
            c.cancel()  # their clients leave: the held requests end
        await asyncio.gather(*clients, return_exceptions=True)
    assert len(answered) <= 1 and n_slow <= 2, (answered, n_slow)  # every answer from the fast replica
    assert sum(answered.values()) + n_slow == 32


async def test_session_affinity_sticks_and_moves_when_the_replica_dies(admin: Admin, launcher: InProcessLauncher, tmp_path: Path) -> None:
    await healthy(admin, "sticky", fake_folder(tmp_path, "sticky"), replicas=2, max_replicas=2, public=True, routing="session_affinity")

    async def ask(session: str) -> str:
        resp = await admin.client.post("/v1/chat/completions", json={"model": "sticky", "messages": [], "max_tokens": 1}, headers={"X-Session-ID": session})
        assert resp.status == 200
        return str((await resp.json())["id"])

    owners = {await ask("alice") for _ in range(6)}
    assert len(owners) == 1
    by_user = set()
    for _ in range(4):
        resp = await admin.client.post("/v1/chat/completions", json={"model": "sticky", "messages": [], "user": "bob", "max_tokens": 1})
        by_user.add((await resp.json())["id"])
    assert len(by_user) == 1
    await launcher.on_port(int(owners.pop().split("-")[1])).crash()
    moved = {await ask("alice") for _ in range(6)}  # every call succeeds: retried or rerouted
    assert len(moved) == 1


async def test_retry_on_another_replica_before_the_first_byte(admin: Admin, tmp_path: Path) -> None:
    reps = await healthy(admin, "retry", fake_folder(tmp_path, "retry", health={"max_retries": 20}), replicas=2, max_replicas=2, public=True)
    async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{reps[0]['port']}/_stop_listening") as resp:
        assert resp.status == 200  # still routable for now: its probes have not failed enough yet
    answers = []
    for _ in range(10):
        resp = await admin.client.post("/v1/chat/completions", json={"model": "retry", "messages": [], "max_tokens": 1})
        assert resp.status == 200
        answers.append((await resp.json())["id"])
    assert len(set(answers)) == 1
    status, records = await admin.call("GET", "/api/v1/requests?endpoint=retry")
    assert all(r["status"] == 200 for r in records["data"])


async def test_client_disconnect_cancels_the_worker_stream(admin: Admin, tmp_path: Path) -> None:
    (rep,) = await healthy(admin, "cancel", fake_folder(tmp_path, "cancel", "--tokens-per-second", "10"), public=True)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "cancel", "messages": [], "stream": True, "max_tokens": 100})
    assert (await resp.content.readline()).startswith(b"data: ")
    resp.close()  # the client goes away mid-stream

    async def cancelled() -> bool:
        return (await stats(rep["port"]))["cancelled"] == 1

    await async_wait_for(cancelled, timeout=10, what="the worker to see the stream cancelled")


async def test_worker_killed_mid_stream_ends_the_stream_cleanly(admin: Admin, launcher: InProcessLauncher, tmp_path: Path) -> None:
    reps = await healthy(admin, "fragile", fake_folder(tmp_path, "fragile", "--tokens-per-second", "20"), replicas=2, max_replicas=2, public=True)
    client = sdk(admin, key="unused")
    stream = await client.chat.completions.create(model="fragile", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=200)
    got = 0
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            got += 1
            if got == 3:
                await (await _streaming_worker(launcher, reps)).crash()
    assert "failed mid-stream" in str(info.value)
    for _ in range(5):  # later requests succeed on the other replica
        reply = await client.chat.completions.create(model="fragile", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert reply.choices


async def _streaming_worker(launcher: InProcessLauncher, reps: list[dict[str, Any]]) -> InProcessWorker:
    for r in reps:
        if (await stats(r["port"]))["requests"]:
            return launcher.on_port(r["port"])
    raise AssertionError("no replica is streaming")


async def test_a_worker_silent_mid_stream_ends_the_stream_with_an_error_event(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_inprocess_app(make_config({"workers": WORKERS, "gateway": {"idle_read_timeout_seconds": 0.5}}))
    (rep,) = await healthy(admin, "quiet", fake_folder(tmp_path, "quiet", "--tokens-per-second", "4"), public=True)
    body = {"model": "quiet", "messages": [], "stream": True, "max_tokens": 10, "stall_after": 3}
    resp = await admin.client.post("/v1/chat/completions", json=body)
    events = [line for line in (await asyncio.wait_for(resp.content.read(), timeout=10)).split(b"\n\n") if line]
    assert len(events) == 4 and b'"worker_failed"' in events[-1]  # three tokens, then the error; the stream ends
    assert b"idle_read_timeout_seconds" in events[-1]

    async def cancelled() -> bool:
        return (await stats(rep["port"]))["cancelled"] == 1

    await async_wait_for(cancelled, timeout=10, what="the silent worker to see its stream closed")
    # gaps of 0.25 s, each below the timeout, for 1.25 s in all: the watch follows the stream
    resp = await admin.client.post("/v1/chat/completions", json={**body, "stall_after": None, "max_tokens": 5})
    answer = await resp.read()
    assert b"worker_failed" not in answer and answer.endswith(b"data: [DONE]\n\n")


async def test_a_silent_worker_is_a_504_not_a_retry_elsewhere(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_inprocess_app(make_config({"workers": WORKERS, "gateway": {"idle_read_timeout_seconds": 0.5}}))
    reps = await healthy(admin, "stall", fake_folder(tmp_path, "stall", "--latency", "2.0"), replicas=2, max_replicas=2, public=True)
    resp = await admin.client.post("/v1/chat/completions", json={"model": "stall", "messages": [], "max_tokens": 1})
    err = await resp.json()
    assert resp.status == 504 and err["error"]["code"] == "worker_timeout" and err["error"]["source"] == "worker"
    served = [(await stats(r["port"]))["requests"] for r in reps]
    assert sorted(served) == [0, 1]  # the request ran once, on one replica


async def test_a_plain_body_cut_off_by_the_worker_reaches_the_client_incomplete(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "cutoff", fake_folder(tmp_path, "cutoff"), public=True)
    resp = await admin.client.get("/endpoints/cutoff/_partial?bytes=300000")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # not a clean, short 200
    # the same with a declared length over the 1 MiB the gateway would buffer: streamed, and cut off too
    resp = await admin.client.get("/endpoints/cutoff/_partial?bytes=1500000&length=3000000")
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    # under it, the whole answer is read before anything is sent: a cut one is the worker's failure, said so
    resp = await admin.client.get("/endpoints/cutoff/_partial?bytes=300000&length=600000")
    error = (await resp.json())["error"]
    assert resp.status == 502 and "cutoff" in error["message"], error
    resp = await admin.client.get("/endpoints/cutoff/health")
    assert resp.status == 200  # the appliance itself is fine


async def test_engine_control_routes_need_an_admin_key_and_inference_routes_do_not(admin: Admin, tmp_path: Path) -> None:
    from appliance.domain.routes import is_inference_route

    assert is_inference_route("vllm", "/v1/chat/completions") and not is_inference_route("vllm", "/sleep")
    assert not is_inference_route("vllm", "/v1/load_lora_adapter") and is_inference_route("custom", "/anything/at/all")
    assert is_inference_route("llama-cpp", "/completion") and not is_inference_route("llama-cpp", "/slots")
    assert is_inference_route("vllm", "/v1/responses/resp_1") and not is_inference_route("vllm", "/v1/responses/../../sleep")
    assert not is_inference_route("vllm", "/v1/responses/./x") and not is_inference_route("vllm", "/v1//chat/completions")
    # nim: an engine runtime with an allow-list that takes its command (the fake worker) as it is given
    command = ["python", str(FAKE), "--port", "8000", "--model", "engine", "--health-path", "/v1/health/ready"]
    await healthy(admin, "engine", tmp_path, runtime="nim", command=command, health_check={"path": "/v1/health/ready", "interval": 0.2, "max_retries": 2, "initial_delay": 10})
    status, body = await admin.call("POST", "/api/v1/keys", json_body={"name": "user", "scopes": ["inference"]})
    user = {"Authorization": f"Bearer {body['key']}"}
    for path in ("/endpoints/engine/sleep", "/endpoints/engine/collective_rpc", "/endpoints/engine/echo/x",
                 "/endpoints/engine/v1/responses/%2E%2E/%2E%2E/sleep", "/endpoints/engine/v1/responses/x%2F..%2F..%2Fsleep"):
        resp = await admin.client.post(URL(path, encoded=True), json={}, headers=user)  # as sent: dot segments not resolved
        error = (await resp.json())["error"]
        assert resp.status == 403 and error["code"] == "route_not_allowed", path
        assert "responses" in error["message"] or "responses" not in path, error  # refused as sent, not after resolving
    resp = await admin.client.post("/v1/load_lora_adapter", json={"model": "engine", "lora_name": "x", "lora_path": "/tmp"}, headers=user)
    assert resp.status == 403 and "not an inference route of the nim runtime" in (await resp.json())["error"]["message"]
    resp = await admin.client.post("/endpoints/engine/v1/chat/completions", json={"model": "engine", "messages": [{"role": "user", "content": "hi"}]}, headers=user)
    assert resp.status == 200
    resp = await admin.client.post("/endpoints/engine/echo/x", json={}, headers=admin.headers)  # an admin key reaches any route
    assert resp.status == 200


async def test_answers_name_the_model_as_the_client_did(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "renamed", fake_folder(tmp_path, "inner"), aliases=["renamed-latest"])  # the worker serves "inner"
    client = sdk(admin)
    for asked in ("renamed", "renamed-latest"):
        reply = await client.chat.completions.create(model=asked, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.model == asked
        stream = await client.chat.completions.create(model=asked, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        assert {c.model async for c in stream} == {asked}


async def test_worker_pages_are_sandboxed_from_the_consoles_origin(admin: Admin, tmp_path: Path) -> None:
    await healthy(admin, "chat", fake_folder(tmp_path, "chat"))
    page = await admin.client.get("/endpoints/chat/page", headers=admin.headers)
    assert page.status == 200 and page.headers["Content-Security-Policy"] == "sandbox"  # its scripts get an opaque origin
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    api = await admin.client.get("/endpoints/chat/v1/models", headers=admin.headers)
    assert api.headers["X-Content-Type-Options"] == "nosniff" and "Content-Security-Policy" not in api.headers


def test_a_served_name_the_worker_extends_is_renamed_too() -> None:
    from appliance.api.inference.rename import rename

    to_demo = rename("/srv/models/demo", "demo")  # transformers serve answers with <path>@<revision>
    assert to_demo(b'{"id":"1","model":"/srv/models/demo@main","object":"chat.completion"}') == b'{"id":"1","model":"demo","object":"chat.completion"}'
    assert to_demo(b'data: {"model": "/srv/models/demo", "choices": []}\n\n') == b'data: {"model": "demo", "choices": []}\n\n'
    assert to_demo(b'{"model":"/srv/models/demo-2"}') == b'{"model":"/srv/models/demo-2"}'  # another model is left alone
