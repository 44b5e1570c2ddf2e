"""The gRPC port ([grpc] port): KServe v2 / Triton clients reach the endpoints' workers here, on the same
event loop as HTTP (grpc.aio), with the same keys, admission and records; and grpc.health.v1 says which
endpoints can serve.

Health: the empty service name is the appliance itself (SERVING once it is ready); an endpoint's name or
alias is SERVING while it has a routable replica, NOT_SERVING otherwise. A name the caller may not use
(a private endpoint without a key allowed on it) is NOT_FOUND, as a missing one: names are not probed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance.api.inference.gateway import Gateway
from appliance.api.rpc.access import CallOrigin, is_unary
from appliance.api.rpc.relay import Relay
from appliance.api.services import Services
from appliance.control.telemetry import Telemetry
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
_HEALTH = "/grpc.health.v1.Health/"
_HANDLERS_KEPT = 256  # method handlers cached by name; a client naming endless methods gets fresh ones
_WATCH_SECONDS = 5.0
_STOP_SLACK = 5.0  # seconds past the grace for the listener's own stop
_Status = health_pb2.HealthCheckResponse


class _Methods(grpc.GenericRpcHandler):
    """Every method but health's goes to the relay: bytes in, bytes out (no (de)serializer)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.startswith(_HEALTH):
            return None
        handler = self._handlers.get(method)
        if handler is None:
            if is_unary(method):
                handler = grpc.unary_unary_rpc_method_handler(functools.partial(self._relay.unary, method))
            else:
                handler = grpc.stream_stream_rpc_method_handler(functools.partial(self._relay.stream, method))
            if len(self._handlers) < _HANDLERS_KEPT:
                self._handlers[method] = handler
        return handler


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, services: Services) -> None:
        self._services = services

    async def _status(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> int | None:
        services = self._services
        name = request.service
        if not name:
            return _Status.SERVING if services.readiness.ready else _Status.NOT_SERVING
        principal = None
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        if "authorization" in metadata:  # checked before the name is looked up: a wrong key learns nothing of names
            try:
                principal = await services.auth.identify(CallOrigin(metadata, _HEALTH + "Check", context.peer()))
            except ApplianceError as err:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, err.message)
        table = services.supervisor.table
        endpoint = table.resolve(name)
        config = table.endpoints.get(endpoint) if endpoint else None
        if config is None or config.grpc_port is None:  # an endpoint that speaks no gRPC is no service of this port
            return None
        if not config.public and (principal is None or not principal.allows(config.name)):
            return None
        return _Status.SERVING if table.routable.get(config.name) else _Status.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802 (gRPC's name)
        status = await self._status(request, context)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return _Status(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:  # noqa: N802
        sent = None
        while True:
            status = await self._status(request, context)
            status = _Status.SERVICE_UNKNOWN if status is None else status
            if status != sent:
                sent = status
                yield _Status(status=status)
            await self._services.supervisor.wait_for_change(_WATCH_SECONDS)


class GrpcFront:
    def __init__(self, services: Services, gateway: Gateway, telemetry: Telemetry) -> None:
        self._services = services
        self._config = services.config.grpc
        self.relay = Relay(services, gateway, telemetry, self._config)
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.address = ""  # host:port once listening

    async def start(self) -> None:
        config, server_config = self._config, self._services.config.server
        cap = config.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap), ("grpc.so_reuseport", 0),
        ])
        health_pb2_grpc.add_HealthServicer_to_server(_Health(self._services), server)
        server.add_generic_rpc_handlers((_Methods(self.relay),))
        host = config.host or server_config.host
        bind = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
        try:
            if server_config.tls_cert and server_config.tls_key:
                credentials = grpc.ssl_server_credentials([(_read(server_config.tls_key), _read(server_config.tls_cert))])
                port = server.add_secure_port(bind, credentials)
            else:
                port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            port, why = 0, str(exc)
        else:
            why = "another program has it"
        if not port:
            raise ApplianceError(f"cannot listen for gRPC on {bind}: {why}; choose another [grpc] port", code="address_in_use")
        await server.start()
        self._server = server
        self.address = bind.rsplit(":", 1)[0] + f":{port}"
        self._watcher = asyncio.create_task(self._watch(), name="grpc-channels")
        log.info("gRPC listening on %s", self.address)

    async def _watch(self) -> None:
        supervisor = self._services.supervisor
        while True:
            await supervisor.wait_for_change(_WATCH_SECONDS)
            try:
                self.relay.prune()
            except Exception:  # a dead watcher would leave calls on stopped replicas open: say so, keep watching
                log.exception("gRPC: closing the channels of replicas that stopped serving failed")

    async def stop(self, grace: float) -> None:
        """Calls in flight get `grace` seconds to finish (as HTTP requests do), then are cancelled."""
        server, self._server = self._server, None
        if server is not None:
            try:  # bounded: a call grpc cannot end must not hold the appliance's stop (and systemd's) for ever
                await asyncio.wait_for(server.stop(grace), grace + _STOP_SLACK)
            except TimeoutError:
                log.warning("gRPC: the listener did not stop within %g s of its grace; going on", _STOP_SLACK)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.relay.close()


def _read(path: Path) -> bytes:
    return path.read_bytes()
