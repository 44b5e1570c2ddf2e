"""One keep-alive HTTP/1.1 connection to a worker, as an asyncio protocol whose answers llhttp (httptools)
parses; it is also the reader the relay drains an answer's body from, with backpressure and a silence timer."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import httptools

_HIGH_WATER = 1 << 17  # buffered answer bytes at which the worker's socket is paused
_LOW_WATER = 1 << 16  # and resumed
_MAX_HEAD = 1 << 16  # bytes of an answer's header names and values (aiohttp's client allowed 8 KiB a line)


class UpstreamError(Exception):
    """Reading a worker's answer failed."""


class UpstreamClosed(UpstreamError):
    """The worker's connection ended before its answer did (or the appliance ended it)."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The worker sent nothing for the idle-read timeout while the gateway waited for it."""


class UpstreamUnreachable(Exception):
    """No byte of the answer came: the worker could not be connected to, or closed the connection first.
    Nothing reached the client, so the caller may try another replica."""


class Connection(asyncio.Protocol):
    """One keep-alive connection to a worker, one request at a time; also the reader of its answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int], on_lost: Callable[[Connection], None]) -> None:
        self._on_lost = on_lost  # the pool forgets it
        self.key = key
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request is out on it
        self.idle_since = 0.0
        self._head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._interim = False  # a 1xx answer, which a final one follows
        self._no_body = False  # the answer to a HEAD
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self.eof = False  # the whole answer is in
        self.keep_alive = False
        self._last_data = 0.0
        self._waiting_since = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- the protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        self._on_lost(self)
        if self.busy and not self.eof:
            head_in = self._head is not None and self._head.done() and not self._head.cancelled() and self._head.exception() is None
            if head_in and not self._states_its_end():
                self._end()  # an answer without a stated length ends with its connection
            else:
                self._fail(UpstreamClosed(f"the worker closed the connection{': ' + str(exc) if exc else ''}"))

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.eof:  # bytes nobody asked for: the connection is not fit for another request
            self.abort()
            return
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # its head is in; what follows the switch is not HTTP and is not read
        except httptools.HttpParserError as exc:
            reason = f"its headers pass {_MAX_HEAD // 1024} KiB" if self._head_size > _MAX_HEAD else exc
            self._fail(UpstreamClosed(f"the worker's answer is not valid HTTP/1.1: {reason}"))
            self.abort()

    # --- the parser's callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > _MAX_HEAD:
            raise httptools.HttpParserError("head too large")  # named in data_received
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200 and status != 101
        if self._interim:
            return  # 100 Continue and the like: the final answer follows
        if self._head is not None and not self._head.done():
            self._head.set_result((status, self._headers))
        if self._no_body or status == 101:
            self._end()  # the parser would wait for a body a HEAD's answer never has; not reused after

    def _states_its_end(self) -> bool:
        """The answer has a Content-Length or is chunked: asked only when its connection closes early."""
        return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._headers)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._size += len(body)
        if self._size > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.keep_alive = self._parser.should_keep_alive() and not self._no_body
        self._end()

    # --- one request ------------------------------------------------------------------------------

    def send(self, data: bytes, *, head_only: bool, timeout: float) -> asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]]:
        assert self.transport is not None
        self.busy = True
        self.keep_alive = False
        self._no_body = head_only
        self._timeout = timeout
        self._head = self._loop.create_future()
        self._last_data = self._waiting_since = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + timeout, self._check_silence)
        self.transport.write(data)
        return self._head

    def _check_silence(self) -> None:
        """A worker is silent only while the gateway waits on it: a client slow to take the answer is not."""
        self._timer = None
        if self.eof or self._exc is not None:
            return
        now = self._loop.time()
        waiting = (self._head is not None and not self._head.done()) or self._waiter is not None
        since = max(self._last_data, self._waiting_since)
        if waiting and now - since >= self._timeout - 0.01:  # timers may fire a little early
            self._fail(UpstreamTimeout(f"no data for {now - since:.1f}s"))
            return
        self._timer = self._loop.call_at((since if waiting else now) + self._timeout, self._check_silence)

    def _end(self) -> None:
        self.eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    # --- the answer's body, as a reader -----------------------------------------------------------

    def read_nowait(self) -> bytes:
        """The next chunk already received, or b""."""
        if self._chunks:
            return self._take()
        if self._exc is not None:
            raise self._exc
        return b""

    async def readany(self) -> bytes:
        """The next chunk of the body as it came; b"" at its end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self.eof:
                return b""
            self._waiter = self._loop.create_future()
            self._waiting_since = self._loop.time()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def _take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._paused and self._size < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def at_eof(self) -> bool:
        return self.eof and not self._chunks and self._exc is None

    def set_exception(self, exc: BaseException) -> None:
        self._fail(exc)

    def reset(self) -> None:
        """Ready for the next request (the last one's answer read to its end)."""
        self.busy = False
        self.eof = False
        self._head = None
        self._headers = []
        self._no_body = False


