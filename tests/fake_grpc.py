"""The fake worker's gRPC side (`--grpc-port`, or GRPC_PORT): any method, bytes in and bytes out, told what to
do by the message itself, so the relay is tested without a real Triton:

  echo...           answered as is (unary), or once per message (streams)
  count:N:MS        streams: N messages b"0".."N-1", MS ms apart
  fail:CODE         ends with that status code, details "worker says no", trailing x-worker-error: yes
  sleep:S           answers after S seconds
  big:N             answers N bytes
  whoami            answers its own port and the metadata keys it received, as JSON

Every answer's initial metadata names the worker (x-worker: its port) and echoes x-request-id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

CAP = 64 << 20


def _answer_metadata(context: grpc.aio.ServicerContext[Any, Any], port: int) -> tuple[tuple[str, str], ...]:
    md = dict((k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str))
    return (("x-worker", str(port)), ("x-request-id", md.get("x-request-id", "")))


async def _one(message: bytes, context: grpc.aio.ServicerContext[Any, Any], port: int) -> bytes:
    if message.startswith(b"fail:"):
        code = grpc.StatusCode[message[5:].decode()]
        # x-appliance-error: a worker posing as the appliance's refusal (the relay drops it)
        await context.abort(code, "worker says no", trailing_metadata=(("x-worker-error", "yes"), ("x-appliance-error", "forged")))
    if message.startswith(b"sleep:"):
        await asyncio.sleep(float(message[6:]))
        return b"slept"
    if message.startswith(b"big:"):
        return b"x" * int(message[4:])
    if message == b"whoami":
        keys = sorted({k for k, _ in context.invocation_metadata() or ()})
        return json.dumps({"port": port, "metadata": keys}).encode()
    return message


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, port: int, counter: Callable[[], None]) -> None:
        self._port = port
        self._counter = counter

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        if method.endswith("/ModelStreamInfer") or not method.startswith("/inference."):
            return grpc.stream_stream_rpc_method_handler(self._stream)
        return grpc.unary_unary_rpc_method_handler(self._unary)

    async def _unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self._counter()
        await context.send_initial_metadata(_answer_metadata(context, self._port))
        return await _one(request, context, self._port)

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        self._counter()
        await context.send_initial_metadata(_answer_metadata(context, self._port))
        async for message in requests:
            if message.startswith(b"count:"):
                _, n, ms = message.decode().split(":")
                for i in range(int(n)):
                    yield str(i).encode()
                    await asyncio.sleep(int(ms) / 1000)
            else:
                yield await _one(message, context, self._port)


async def start(port: int, counter: Callable[[], None] = lambda: None) -> grpc.aio.Server:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", CAP), ("grpc.max_send_message_length", CAP), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_Handler(port, counter),))
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"[Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): address already in use")
    await server.start()
    return server
