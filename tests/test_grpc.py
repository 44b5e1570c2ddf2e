"""The gRPC port against fake workers that speak gRPC (tests/fake_grpc.py) in the test's event loop: keys and
refusals as status codes, routing by `x-endpoint`, the worker's own status and metadata relayed, streams,
balancing, deadlines, cancellation, the idle timeout, a crash under a stream, message caps, health, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import Admin, async_wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess import InProcessLauncher
from test_access import new_key
from test_gateway import healthy
from test_supervisor import WORKERS, create, fake_folder, replicas, wait_status

from appliance.api.app import GRPC
from appliance.api.inference.gateway import GATEWAY
from appliance.api.services import SERVICES

pytestmark = pytest.mark.usefixtures("slow_callback_guard", "fresh_grpc")

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
REPOSITORY = "/inference.GRPCInferenceService/RepositoryIndex"


def grpc_folder(root: Path, name: str, *knobs: str) -> Path:
    """A fake worker's folder whose definition declares a gRPC port beside its HTTP one."""
    folder = fake_folder(root, name, "--grpc-port", "8001", *knobs)
    path = folder / "model-definition.yaml"
    definition = yaml.safe_load(path.read_text())
    definition["models"][0]["service"]["grpc_port"] = 8001
    path.write_text(yaml.safe_dump(definition))
    return folder


async def start(start_inprocess_app: Any, make_config: Any, **grpc_config: Any) -> Admin:
    admin: Admin = await start_inprocess_app(make_config({"workers": WORKERS, "grpc": {"port": 0, **grpc_config}}))
    return admin


def address(admin: Admin) -> str:
    return admin.client.server.app[GRPC].address


def md(key: str | None, endpoint: str | None = "g", **extra: str) -> list[tuple[str, str]]:
    out = [("authorization", f"Bearer {key}")] if key else []
    out += [("x-endpoint", endpoint)] if endpoint else []
    return out + list(extra.items())


def admin_key(admin: Admin) -> str:
    return admin.config.admin_key_path.read_text().strip()


async def unary(channel: grpc.aio.Channel, message: bytes, metadata: list[tuple[str, str]], method: str = INFER, timeout: float | None = 10) -> Any:
    call = channel.unary_unary(method)(message, metadata=metadata, timeout=timeout)
    return call, await call


async def refused(channel: grpc.aio.Channel, metadata: list[tuple[str, str]], method: str = INFER, message: bytes = b"hi") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(method)(message, metadata=metadata, timeout=10)
    return info.value


async def test_calls_are_relayed_as_bytes_with_the_workers_status_and_metadata(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start(start_inprocess_app, make_config)
    [replica] = await healthy(admin, "g", grpc_folder(tmp_path, "g"), aliases=["g-latest"])
    assert replica["grpc_port"] and replica["grpc_port"] != replica["port"]  # a second port of the ledger's
    key = admin_key(admin)
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        call, answer = await unary(channel, b"hello", md(key, **{"x-request-id": "req-1", "x-team": "search"}))
        assert answer == b"hello"
        initial = dict(await call.initial_metadata())
        assert initial["x-worker"] == str(replica["grpc_port"]) and initial["x-request-id"] == "req-1"
        assert (await refused(channel, md("ak-wrong"))).code() is grpc.StatusCode.UNAUTHENTICATED
        call, _ = await unary(channel, b"hello", md(key, **{"x-request-id": "not a sane id"}))
        made = dict(await call.initial_metadata())["x-request-id"]
        assert made and made != "not a sane id"  # as on HTTP: a new one instead
        _, seen = await unary(channel, b"whoami", md(key, "g-latest", **{"x-team": "search"}))  # an alias routes too
        received = json.loads(seen)["metadata"]
        assert "x-team" in received and "x-request-id" in received  # one is made when the client sends none
        assert not {"authorization", "x-endpoint", "cookie"} & set(received)
        # The worker's own NOT_FOUND, as it sent it: no x-appliance-error, its own trailing metadata.
        err = await refused(channel, md(key), message=b"fail:NOT_FOUND")
        assert err.code() is grpc.StatusCode.NOT_FOUND and err.details() == "worker says no"
        trailing = dict(err.trailing_metadata() or ())
        assert trailing.get("x-worker-error") == "yes" and "x-appliance-error" not in trailing
        # A stream: every message in order.
        stream = channel.stream_stream(STREAM)(metadata=md(key))
        await stream.write(b"count:5:10")
        await stream.done_writing()
        assert [m async for m in stream] == [b"0", b"1", b"2", b"3", b"4"]
        # The worker ends a stream with an error while the client goes on writing: the client sees the
        # worker's status, not INTERNAL (grpc/grpc#36066).
        # (A grpc.aio client that writes after the end gets INTERNAL from its own library whoever it calls: the
        # synchronous client shows what the relay sent.)
        def keeps_writing() -> grpc.RpcError:
            ended = threading.Event()

            def requests() -> Any:
                yield b"fail:INVALID_ARGUMENT"
                for _ in range(30):  # one more message every 10 ms, on past the worker's end
                    if ended.wait(0.01):
                        return
                    yield b"more"

            with grpc.insecure_channel(address(admin)) as sync_channel, pytest.raises(grpc.RpcError) as info:
                try:
                    for _ in sync_channel.stream_stream(STREAM)(requests(), metadata=md(key), timeout=10):
                        pass
                finally:
                    ended.set()
            return info.value

        err = await asyncio.to_thread(keeps_writing)
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and err.details() == "worker says no"
        def streams() -> list[Any]:
            return [r for r in admin.client.server.app[GATEWAY].records if r.streamed]

        await async_wait_for(lambda: len(streams()) == 2, timeout=5, what="both streams' records")
        assert [r.status for r in streams()] == [200, 400] and all(r.endpoint == "g" and r.replica for r in streams())
        # An unknown service is relayed as a stream, whatever its cardinality.
        _, echoed = await unary(channel, b"anything", md(key), method="/my.Own/Call")
        assert echoed == b"anything"
    exposition = (await (await admin.client.get("/metrics", headers=admin.headers)).text())
    assert 'appliance_grpc_calls_total{code="OK",endpoint="g",method="ModelInfer"}' in exposition
    assert 'appliance_grpc_calls_total{code="NOT_FOUND",endpoint="g",method="ModelInfer"} 1.0' in exposition
    assert 'method="other"' in exposition
    assert 'appliance_grpc_calls_total{code="UNAUTHENTICATED",endpoint="",method="ModelInfer"} 1.0' in exposition


async def test_refusals_are_status_codes_that_do_not_reveal_names(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start(start_inprocess_app, make_config)
    await healthy(admin, "g", grpc_folder(tmp_path, "g"))
    await healthy(admin, "other", fake_folder(tmp_path, "other"))
    inference = (await new_key(admin, name="inf"))["key"]
    elsewhere = (await new_key(admin, name="elsewhere", endpoints=["other"]))["key"]
    limited = (await new_key(admin, name="limited", rpm_limit=1))["key"]
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        for metadata in (md(None), md("ak-wrong"), md(None, "no-such-endpoint"), [("authorization", "Basic abc"), ("x-endpoint", "g")]):
            err = await refused(channel, metadata)
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED, (metadata, err)
        err = await refused(channel, md(elsewhere))
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "may not use endpoint 'g'" in (err.details() or "")
        for metadata in (md(inference, "no-such-endpoint"), md(inference, None)):
            err = await refused(channel, metadata)
            assert err.code() is grpc.StatusCode.NOT_FOUND
            assert dict(err.trailing_metadata() or ())["x-appliance-error"] in ("endpoint_not_found", "endpoint_required")
        err = await refused(channel, md(inference), method=REPOSITORY)  # acts on the whole server: admin only
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "admin" in (err.details() or "")
        _, answer = await unary(channel, b"index", md(admin_key(admin)), method=REPOSITORY)
        assert answer == b"index"
        await unary(channel, b"one", md(limited))
        err = await refused(channel, md(limited))
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        err = await refused(channel, md(inference, "other"))  # an endpoint whose definition has no gRPC port
        assert err.code() is grpc.StatusCode.UNIMPLEMENTED and "grpc_port" in (err.details() or "")
        for _ in range(2):
            await unary(channel, b"counted", md(inference))
    key_id = next(k["id"] for k in (await admin.call("GET", "/api/v1/keys"))[1]["data"] if k["name"] == "inf")
    status, usage = await admin.call("GET", f"/api/v1/usage?key={key_id}&since=1h")
    assert status == 200
    rows = {row["endpoint"]: (row["requests"], row["errors"]) for row in usage["data"]}
    assert rows == {"g": (2, 0), "other": (1, 1)}, rows


async def test_one_channel_spreads_calls_over_replicas_and_deadlines_cancels_and_caps_hold(
    start_inprocess_app: Any, make_config: Any, tmp_path: Path
) -> None:
    admin = await start(start_inprocess_app, make_config, max_message_bytes="20MiB")
    pair = await healthy(admin, "g", grpc_folder(tmp_path, "g"), replicas=2)
    key = admin_key(admin)
    services = admin.client.server.app[SERVICES]
    async with grpc.aio.insecure_channel(address(admin), options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]) as channel:
        answers = await asyncio.gather(*(unary(channel, b"whoami", md(key)) for _ in range(200)))
        ports = Counter(json.loads(a)["port"] for _, a in answers)
        assert set(ports) == {r["grpc_port"] for r in pair} and min(ports.values()) >= 50, ports
        # 16 MiB each way; past the cap, RESOURCE_EXHAUSTED
        _, big = await unary(channel, b"big:" + str(16 << 20).encode(), md(key))
        assert len(big) == 16 << 20
        _, same = await unary(channel, b"x" * (16 << 20), md(key))
        assert len(same) == 16 << 20
        err = await refused(channel, md(key), message=b"x" * (21 << 20))
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # The client's deadline goes upstream.
        began = time.monotonic()
        err = await refused_with_timeout(channel, md(key), b"sleep:5", 1.0)
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and 0.8 < time.monotonic() - began < 2.5
        # A client that cancels a stream frees its slot.
        stream = channel.stream_stream(STREAM)(metadata=md(key))
        await stream.write(b"count:100:50")
        assert await stream.read() == b"0"
        assert sum(services.load.inflight("g").values()) == 1
        stream.cancel()
        await async_wait_for(lambda: sum(services.load.inflight("g").values()) == 0, timeout=5, what="the cancelled stream's slot to free")


async def refused_with_timeout(channel: grpc.aio.Channel, metadata: list[tuple[str, str]], message: bytes, timeout: float) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(INFER)(message, metadata=metadata, timeout=timeout)
    return info.value


async def test_a_crash_under_a_stream_ends_it_unavailable_and_the_next_calls_succeed(
    start_inprocess_app: Any, make_config: Any, tmp_path: Path, launcher: InProcessLauncher
) -> None:
    admin = await start(start_inprocess_app, make_config, stream_idle_seconds=0.5)
    await healthy(admin, "g", grpc_folder(tmp_path, "g"), replicas=2)
    key = admin_key(admin)
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        stream = channel.stream_stream(STREAM)(metadata=md(key))
        await stream.write(b"count:30:200")
        got = [await stream.read() for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        port = int(dict(await stream.initial_metadata())["x-worker"])
        serving = next(r for r in await replicas(admin, "g") if r["grpc_port"] == port)
        crashed = time.monotonic()
        await launcher.on_port(serving["port"]).crash()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await stream.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() - crashed < 2.0
        for _ in range(10):
            assert (await unary(channel, b"after", md(key)))[1] == b"after"
        # A stream with nothing either way ends after stream_idle_seconds.
        quiet = channel.stream_stream(STREAM)(metadata=md(key))
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await quiet.read()
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - began < 3
        assert dict(info.value.trailing_metadata() or ())["x-appliance-error"] == "stream_idle"
    await async_wait_for(lambda: len([w for w in launcher.running()]) == 2, timeout=20, what="the crashed replica to be replaced")


async def test_health_says_which_endpoints_can_serve(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start(start_inprocess_app, make_config)
    await healthy(admin, "g", grpc_folder(tmp_path, "g"))
    await create(admin, "http-only", fake_folder(tmp_path, "http-only"), replicas=0, min_replicas=0, public=True)
    reader = (await new_key(admin, name="reader", endpoints=["g"]))["key"]
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING

        async def check(service: str, key: str | None = reader) -> Any:
            return await health.Check(health_pb2.HealthCheckRequest(service=service), metadata=md(key, None), timeout=5)

        assert (await check("", None)).status == serving
        assert (await check("g")).status == serving
        for service, key in (("no-such", reader), ("g", None), ("http-only", reader)):  # a private endpoint without a key: as a missing one
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(service, key)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        for service in ("g", "no-such"):  # a wrong key is told so whatever the name: names are not probed
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await check(service, "ak-wrong")
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        watch = health.Watch(health_pb2.HealthCheckRequest(service="g"), metadata=md(reader, None))
        assert (await watch.read()).status == serving
        status, body = await admin.call("PATCH", "/api/v1/endpoints/g", json_body={"replicas": 0, "min_replicas": 0})
        assert status == 200, body
        await wait_status(admin, "g", "SCALED_TO_ZERO")
        assert (await check("g")).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_with_a_certificate_the_port_speaks_tls(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    from appliance.security.tls import write_self_signed

    cert, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    write_self_signed(cert, key_file, ["localhost", "127.0.0.1"], days=1)
    admin: Admin = await start_inprocess_app(make_config({"workers": WORKERS, "grpc": {"port": 0}, "server": {"tls_cert": str(cert), "tls_key": str(key_file)}}))
    await healthy(admin, "g", grpc_folder(tmp_path, "g"))
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(address(admin), credentials) as channel:
        assert (await unary(channel, b"sealed", md(admin_key(admin))))[1] == b"sealed"
    async with grpc.aio.insecure_channel(address(admin)) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plain.unary_unary(INFER)(b"x", metadata=md(admin_key(admin)), timeout=3)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_replica_that_stops_after_its_drain_ends_its_quiet_streams(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start(start_inprocess_app, make_config)
    await healthy(admin, "g", grpc_folder(tmp_path, "g"), drain_timeout_seconds=0.5)
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        quiet = channel.stream_stream(STREAM)(metadata=md(admin_key(admin)))
        await quiet.write(b"count:1:0")
        assert await quiet.read() == b"0"  # then nothing either way: only the replica's stop can end it
        status, body = await admin.call("PATCH", "/api/v1/endpoints/g", json_body={"replicas": 0, "min_replicas": 0})
        assert status == 200, body
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(quiet.read(), 10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and "stopped serving" in (info.value.details() or "")
        assert time.monotonic() - began < 5


async def test_a_worker_not_listening_for_grpc_is_unreachable_and_a_call_that_gives_up_frees_its_slot(
    start_inprocess_app: Any, make_config: Any, tmp_path: Path
) -> None:
    admin: Admin = await start_inprocess_app(make_config({"workers": WORKERS, "grpc": {"port": 0}, "gateway": {"connect_timeout_seconds": 1.0}}))
    folder = grpc_folder(tmp_path, "g")
    path = folder / "model-definition.yaml"
    path.write_text(path.read_text().replace("- --grpc-port\n    - '8001'\n", "- --grpc-port\n    - '0'\n"))  # declared, never served
    assert "- '0'" in path.read_text()
    await healthy(admin, "g", folder)
    services = admin.client.server.app[SERVICES]
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        err = await refused_with_timeout(channel, md(admin_key(admin)), b"x", 0.5)  # gives up while the worker is being connected to
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await async_wait_for(lambda: sum(services.load.inflight("g").values()) == 0, timeout=3, what="the slot to free")
        err = await refused(channel, md(admin_key(admin)))
        assert err.code() is grpc.StatusCode.UNAVAILABLE and dict(err.trailing_metadata() or ())["x-appliance-error"] == "worker_unreachable"
        assert sum(services.load.inflight("g").values()) == 0


async def test_session_affinity_keeps_a_sessions_calls_on_one_replica(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start(start_inprocess_app, make_config)
    await healthy(admin, "g", grpc_folder(tmp_path, "g"), replicas=2, routing="session_affinity")
    key = admin_key(admin)
    async with grpc.aio.insecure_channel(address(admin)) as channel:
        by_session: dict[str, set[int]] = {}
        for i in range(60):
            session = f"s{i % 20}"
            _, answer = await unary(channel, b"whoami", md(key, **{"x-session-id": session}))
            by_session.setdefault(session, set()).add(json.loads(answer)["port"])
        assert all(len(ports) == 1 for ports in by_session.values()), by_session  # each session on one replica
        assert len(set().union(*by_session.values())) == 2  # and the sessions spread over both
