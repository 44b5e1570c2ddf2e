"""The gRPC relay: each call checked as HTTP requests are (keys, limits), admitted to one replica through the
gateway's admission (least outstanding, max_concurrency, the queue, waking a sleeping endpoint), and its
messages passed on as bytes, never parsed.

One channel per replica, so one client connection spreads its calls over every replica. Unary calls are
relayed as unary; ModelStreamInfer and unknown services as streams. A call goes to another replica only
when its worker could not be reached before anything was sent. The worker's status, details and metadata
reach the client as the worker sent them; the appliance's own refusals carry `x-appliance-error`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from appliance.api.http import REQUEST_ID_OK
from appliance.api.inference.gateway import CLIENT_CLOSED, Gateway, RequestRecord
from appliance.api.rpc.access import ENDPOINT_KEY, ERROR_KEY, SESSION_KEY, NOT_FORWARDED, REQUEST_ID_KEY, CallOrigin, authorize, code_of, http_status, method_label
from appliance.api.services import Services
from appliance.config import GrpcConfig
from appliance.control.telemetry import Telemetry
from appliance.domain.routing import RoutableReplica
from appliance.domain.specs import EndpointConfig
from appliance.domain.states import ReplicaState
from appliance.errors import ApplianceError
from appliance.security.auth import Principal

log = logging.getLogger(__name__)
Metadata = Sequence[tuple[str, str | bytes]]
_SERVING = frozenset((ReplicaState.HEALTHY, ReplicaState.UNHEALTHY, ReplicaState.DRAINING, ReplicaState.SLEEPING))  # its worker is the one the channel reaches


class _Conn:
    """The channel to one replica's worker; `gone` once the replica left (its calls were cancelled)."""

    __slots__ = ("channel", "gone", "target")

    def __init__(self, target: str | None, options: list[tuple[str, Any]]) -> None:
        self.target = target or "(no gRPC port)"
        self.channel = grpc.aio.insecure_channel(target, options=options) if target else None
        self.gone = False


@dataclass(slots=True)
class _Call:
    method: str
    started: float
    request_id: str
    forward: list[tuple[str, str | bytes]]
    endpoint: str = ""
    session: str | None = None  # x-session-id, for an endpoint routed by session affinity
    principal: Principal | None = None
    replica: str | None = None
    limited: bool = False
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    error_source: str | None = None


def _clean(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """A client's metadata as the worker gets it."""
    return [(k, v) for k, v in metadata or () if k not in NOT_FORWARDED and not k.startswith((":", "grpc-"))]


def _answer(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """A worker's metadata as the client gets it: its rich error details too, never the appliance's own error key."""
    return [(k, v) for k, v in metadata or () if k != ERROR_KEY and not k.startswith(":") and (k == _DETAILS or not k.startswith("grpc-"))]


_DETAILS = "grpc-status-details-bin"  # google.rpc.Status, the worker's rich error details
_NOT_CONNECTED = "failed to connect to all addresses"  # grpc's words when no connection was made: nothing was sent


def _unreachable(err: grpc.aio.AioRpcError) -> bool:
    """Refused before anything was sent: the worker could not be connected to (a reset after the call
    was written could have run it: never sent again)."""
    return err.code() is grpc.StatusCode.UNAVAILABLE and (err.details() or "").startswith(_NOT_CONNECTED)


class Relay:
    def __init__(self, services: Services, gateway: Gateway, telemetry: Telemetry, config: GrpcConfig) -> None:
        self._services = services
        self._gateway = gateway
        self._telemetry = telemetry
        self._idle = config.stream_idle_seconds
        cap = config.max_message_bytes
        self._options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)]
        self._conns: dict[str, _Conn] = {}  # replica id → its channel
        self._closing: set[asyncio.Future[None]] = set()  # channels being closed (held: a task nobody holds may vanish)

    # --- channels ------------------------------------------------------------------------------

    def _conn(self, replica: RoutableReplica) -> _Conn:
        if replica.grpc is None:
            return _Conn(None, self._options)
        conn = self._conns.get(replica.id)
        if conn is None or conn.target != replica.grpc:
            if conn is not None:
                self._drop(replica.id)
            conn = self._conns[replica.id] = _Conn(replica.grpc, self._options)
        return conn

    def _drop(self, rid: str) -> None:
        conn = self._conns.pop(rid)
        conn.gone = True
        log.info("gRPC: replica %s stopped serving: its channel to %s closes, and its calls end", rid, conn.target)
        assert conn.channel is not None
        closing = asyncio.ensure_future(conn.channel.close())  # cancels its calls at once
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def prune(self) -> None:
        """Channels of replicas no longer serving (stopped after their drain, failed, restarted elsewhere)
        are closed, and their calls end UNAVAILABLE: a stopped worker may never end a quiet stream itself."""
        supervisor = self._services.supervisor
        live = {r.id for run in supervisor.runs().values() for r in run.replicas.values() if r.state in _SERVING and not r.exited}
        for rid in [rid for rid in self._conns if rid not in live]:
            self._drop(rid)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.channel.close() for c in conns if c.channel is not None), *self._closing, return_exceptions=True)

    # --- a call's life -------------------------------------------------------------------------

    def _begin(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[_Call, dict[str, str]]:
        metadata: dict[str, str] = {}
        for k, v in context.invocation_metadata() or ():
            if isinstance(v, str):
                metadata.setdefault(k, v)
        rid = metadata.get(REQUEST_ID_KEY, "")
        if not REQUEST_ID_OK.fullmatch(rid):  # as on HTTP: the client's when it is sane, else a new one
            rid = secrets.token_hex(8)
        forward = [(k, v) for k, v in _clean(context.invocation_metadata()) if k != REQUEST_ID_KEY]
        forward.append((REQUEST_ID_KEY, rid))
        return _Call(method, time.monotonic(), rid, forward), metadata

    async def _open(self, call: _Call, metadata: dict[str, str], context: grpc.aio.ServicerContext[Any, Any]) -> EndpointConfig:
        """Who calls which endpoint, and whether the key's limits let it: the endpoint's config, or the call ends refused."""
        if self._gateway.stopping.is_set():
            await self._refuse(call, context, ApplianceError("the appliance is shutting down", status=503, code="shutting_down"))
        try:
            call.endpoint, config, call.principal = await authorize(self._services, CallOrigin(metadata, call.method, context.peer()), metadata.get(ENDPOINT_KEY))
            if config.grpc_port is None:
                raise ApplianceError(f"endpoint {call.endpoint} serves no gRPC: its model definition declares no grpc_port", status=501, code="no_grpc")
            self._services.load.arrived(call.endpoint)
            if config.routing == "session_affinity":  # as X-Session-ID on HTTP: one session's calls stay on one replica
                call.session = metadata.get(SESSION_KEY)
            call.limited = self._gateway.admit(call.principal) is not None
        except ApplianceError as err:
            self._telemetry.rejected(err.code)
            await self._refuse(call, context, err)
        return config

    async def _refuse(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any], err: ApplianceError) -> None:
        call.code = code_of(err)
        call.error_source = err.source or "appliance"
        await context.abort(call.code, err.message, trailing_metadata=((ERROR_KEY, err.code),))

    async def _acquire(self, call: _Call, config: EndpointConfig, tried: set[str], context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Any, RoutableReplica, _Conn]:
        """A replica with room for this call, counted in flight until released, whose worker is connected."""
        while True:
            try:
                adm, replica = await self._gateway.acquire(call.endpoint, config, call.session, tried)
            except ApplianceError as err:
                await self._refuse(call, context, err)
            call.replica = replica.id
            try:
                conn = self._conn(replica)
                connected = await self._connected(conn)
            except BaseException:  # the client left, its deadline came: the slot goes back
                self._gateway.release(adm, replica)
                raise
            if connected:
                return adm, replica, conn
            self._gateway.release(adm, replica)
            tried.add(replica.id)
            if not [r for r in self._services.supervisor.table.routable.get(call.endpoint, ()) if r.id not in tried]:
                await self._refuse(call, context, ApplianceError(
                    f"replica {replica.id} of endpoint {call.endpoint} could not be reached at {conn.target}", status=503, code="worker_unreachable", source="worker",
                ))

    async def _connected(self, conn: _Conn) -> bool:
        """Whether the worker is connected to, within the gateway's connect timeout (no replica without
        a gRPC port gets here: a replica of an endpoint's old definition is taken as unreachable)."""
        if conn.channel is None:
            return False
        try:
            if conn.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
                return True
            # not wait_for: on 3.11 it can drop the cancel of a client that gives up as the channel connects
            async with asyncio.timeout(self._services.config.gateway.connect_timeout_seconds):
                await conn.channel.channel_ready()
        except (TimeoutError, grpc.aio.UsageError):  # UsageError: the replica left and its channel closed meanwhile
            return False
        return True

    def _finish(self, call: _Call, streamed: bool) -> None:
        services = self._services
        now = services.clock()
        latency = time.monotonic() - call.started
        status = http_status(call.code)
        key_id = call.principal.id if call.principal else None
        if call.limited and call.principal is not None:
            services.limiter.finish(call.principal.id, 0, now)
        if call.endpoint:
            services.accounting.record(now, key_id, call.endpoint, failed=status >= 400, prompt_tokens=None, completion_tokens=None)
            self._gateway.records.append(RequestRecord(
                time=now, endpoint=call.endpoint, replica=call.replica, key_id=key_id, status=status, latency=latency, ttfb=None,
                prompt_tokens=None, completion_tokens=None, streamed=streamed,
                error_source=call.error_source if (call.error_source or status >= 500) else None, request_id=call.request_id,
            ))
            self._telemetry.request(call.endpoint, status, latency, ttft=None, gap=None, prompt=None, completion=None)
        self._telemetry.grpc_call(call.endpoint, method_label(call.method), call.code.name)

    async def _relay_status(self, call: _Call, conn: _Conn, err: grpc.aio.AioRpcError | None, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """End the client's call as the worker ended its own, or UNAVAILABLE when the replica left under it."""
        if conn.gone and (err is None or err.code() is grpc.StatusCode.CANCELLED):
            call.error_source = "worker"
            await self._refuse(call, context, ApplianceError(
                f"replica {call.replica} of endpoint {call.endpoint} stopped serving during the call", status=503, code="replica_gone", source="worker",
            ))
        assert err is not None
        call.code = err.code()
        call.error_source = "worker"
        await context.abort(call.code, err.details() or "", trailing_metadata=tuple(_answer(err.trailing_metadata())))

    def _cancelled_here(self) -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    # --- unary ---------------------------------------------------------------------------------

    async def unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        call, metadata = self._begin(method, context)
        tried: set[str] = set()
        try:
            config = await self._open(call, metadata, context)
            while True:
                adm, replica, conn = await self._acquire(call, config, tried, context)
                assert conn.channel is not None
                upstream = conn.channel.unary_unary(method)(request, metadata=call.forward, timeout=context.time_remaining())
                try:
                    response: bytes = await upstream
                except grpc.aio.AioRpcError as err:
                    if _unreachable(err) and not conn.gone and [r for r in self._services.supervisor.table.routable.get(call.endpoint, ()) if r.id not in tried | {replica.id}]:
                        tried.add(replica.id)
                        continue
                    await self._relay_status(call, conn, err, context)
                    raise  # not reached: abort raised
                except asyncio.CancelledError:
                    if self._cancelled_here() or not conn.gone:
                        raise
                    await self._relay_status(call, conn, None, context)
                    raise
                finally:
                    if not upstream.done():
                        upstream.cancel()  # the client left, or its deadline came: the worker's call ends too
                    self._gateway.release(adm, replica)
                initial = _answer(await upstream.initial_metadata())
                if initial:  # sent with the answer otherwise: one batch less
                    await context.send_initial_metadata(initial)
                context.set_trailing_metadata(tuple(_answer(await upstream.trailing_metadata())))
                call.code = grpc.StatusCode.OK
                return response
        except asyncio.CancelledError:
            self._ended_early(call, context)
            raise
        finally:
            self._finish(call, streamed=False)

    def _ended_early(self, call: _Call, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """A call cancelled from outside: its deadline came, the client left, or the appliance is stopping."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif self._gateway.stopping.is_set():
            call.code, call.error_source = grpc.StatusCode.UNAVAILABLE, "appliance"
        else:
            call.code, call.error_source = grpc.StatusCode.CANCELLED, CLIENT_CLOSED

    # --- streams -------------------------------------------------------------------------------

    async def stream(self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """A coroutine writing through the context, not a generator: a client's cancel lands in here, so the
        slot and the record are settled at once, never left to a generator's finalizer."""
        call, metadata = self._begin(method, context)
        try:
            config = await self._open(call, metadata, context)
            adm, replica, conn = await self._acquire(call, config, set(), context)
            assert conn.channel is not None
            upstream = conn.channel.stream_stream(method)(metadata=call.forward, timeout=context.time_remaining())
            last = [time.monotonic()]  # the latest message either way
            idle = [False]
            pump = asyncio.create_task(self._pump(requests, upstream, last))
            watchdog = asyncio.create_task(self._watch_idle(upstream, last, idle))
            err: grpc.aio.AioRpcError | None = None
            cut = False  # the worker's call was cancelled under it: the replica left, or the stream went idle
            try:
                await context.send_initial_metadata(_answer(await upstream.initial_metadata()))
                while (message := await upstream.read()) is not grpc.aio.EOF:
                    last[0] = time.monotonic()
                    await context.write(message)
            except grpc.aio.AioRpcError as exc:
                err = exc
            except asyncio.CancelledError:
                if self._cancelled_here() or not (conn.gone or idle[0]):
                    raise
                cut = True
            finally:
                for task in (pump, watchdog):
                    task.cancel()
                await asyncio.gather(pump, watchdog, return_exceptions=True)
                if not upstream.done():
                    upstream.cancel()
                self._gateway.release(adm, replica)
            if cut and not conn.gone:
                await self._refuse(call, context, ApplianceError(f"no message either way for {self._idle:g} s ([grpc] stream_idle_seconds)", status=504, code="stream_idle"))
            if cut:
                await self._relay_status(call, conn, None, context)
            if err is None and (code := await upstream.code()) is not grpc.StatusCode.OK:
                # The worker's own status, read from the call even when a write failed first (a write to a
                # call the worker already ended must not turn its status into INTERNAL).
                err = grpc.aio.AioRpcError(code, await upstream.initial_metadata(), await upstream.trailing_metadata(), details=await upstream.details())
            if err is not None:
                await self._relay_status(call, conn, err, context)
            context.set_trailing_metadata(tuple(_answer(await upstream.trailing_metadata())))
            call.code = grpc.StatusCode.OK
        except asyncio.CancelledError:
            self._ended_early(call, context)
            raise
        finally:
            self._finish(call, streamed=True)

    async def _pump(self, requests: AsyncIterator[bytes], upstream: Any, last: list[float]) -> None:
        """The client's messages to the worker; a failed write only stops the pump: the worker's status,
        read on the other side, is what the client gets."""
        try:
            async for message in requests:
                last[0] = time.monotonic()
                if upstream.done():
                    return  # a write to an ended call turns its status into INTERNAL (grpc/grpc#36066)
                await upstream.write(message)
            if not upstream.done():
                await upstream.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError):
            pass

    async def _watch_idle(self, upstream: Any, last: list[float], idle: list[bool]) -> None:
        while (wait := last[0] + self._idle - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        idle[0] = True
        upstream.cancel()

