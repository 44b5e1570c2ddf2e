"""The gateway's HTTP/1.1 client to its workers: a pool of keep-alive connections, each an asyncio
protocol whose answers llhttp (httptools) parses.

A worker is a trusted HTTP server one hop away, most often on the same box, and every request through
the appliance crosses this hop: aiohttp's general-purpose client spends about 90 µs of Python on a small
request (redirects, cookies, proxies, traces, per-read timers), several times what the hop itself needs.
Here a request is one write of its head and body, and its answer is read through one reader that the
relay drains chunk by chunk, with backpressure (the worker's socket is paused while a slow client lets
answers pile up) and one silence timer per quiet period.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from urllib.parse import urlsplit

from multidict import CIMultiDict

from appliance.api.inference.connection import Connection, UpstreamClosed, UpstreamError, UpstreamTimeout, UpstreamUnreachable

__all__ = ["UpstreamClosed", "UpstreamError", "UpstreamPool", "UpstreamResponse", "UpstreamTimeout", "UpstreamUnreachable"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # a Content-Length even when the body is empty


class UpstreamResponse:
    """A worker's answer: its status and headers, and its body through `content`."""

    __slots__ = ("_pool", "content", "content_length", "headers", "status")

    def __init__(self, pool: UpstreamPool, conn: Connection, status: int, raw: list[tuple[bytes, bytes]]) -> None:
        self._pool = pool
        self.content = conn
        self.status = status
        # as aiohttp reads them: UTF-8, and any other byte kept as it came
        self.headers: CIMultiDict[str] = CIMultiDict((n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in raw)
        length = self.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() and "Transfer-Encoding" not in self.headers else None

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool."""
        self._pool.release(self.content)

    def close(self) -> None:
        """Ended before its end: the worker sees its connection close (and stops generating)."""
        conn = self.content
        conn.set_exception(UpstreamClosed("the appliance ended this answer"))
        conn.abort()
        self._pool.release(conn)


class UpstreamPool:
    """Keep-alive connections to workers, the one released last reused first: after a burst the extra
    ones sit unused and close after `keepalive` seconds instead of all staying warm. At most
    `max_connections` open in all (0: no limit); a request past it waits for one to close or come back."""

    def __init__(self, connect_timeout: float, idle_read_timeout: float, max_connections: int = 0, keepalive: float = 30.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_read_timeout = idle_read_timeout
        self._max = max_connections
        self._keepalive = keepalive
        self._idle: dict[tuple[str, int], list[Connection]] = {}  # the newest last
        self._open: set[Connection] = set()
        self._room: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._targets: dict[str, tuple[str, int, str, bool, str]] = {}
        self.closed = False

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def open_count(self) -> int:
        return len(self._open)

    async def request(self, method: str, base: str, target: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        """Send one request to the worker at `base` (scheme://host:port, and a path prefix such as a Serve
        route's) for `target` (the path and query as sent)."""
        host, port, netloc, tls, prefix = self._target(base)
        lines = [f"{method} {prefix}{target} HTTP/1.1\r\nHost: {netloc}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        if body or method in _BODY_METHODS:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        data = "".join(lines).encode("utf-8", "surrogateescape") + body
        for attempt in range(2):
            conn, reused = await self._connection(host, port, tls)
            try:
                status, raw = await conn.send(data, head_only=method == "HEAD", timeout=self.idle_read_timeout)
            except UpstreamTimeout:
                self._close(conn)
                raise
            except UpstreamError as exc:
                self._close(conn)
                if reused and attempt == 0:
                    continue  # a kept-alive connection the worker closed meanwhile: once more on a new one
                raise UpstreamUnreachable(str(exc)) from None
            except BaseException:
                self._close(conn)  # cancelled (the client left): the worker sees the connection close
                raise
            return UpstreamResponse(self, conn, status, raw)
        raise AssertionError("unreachable")

    def _target(self, base: str) -> tuple[str, int, str, bool, str]:
        found = self._targets.get(base)
        if found is None:
            parts = urlsplit(base)
            tls = parts.scheme == "https"
            host = parts.hostname or "127.0.0.1"
            found = self._targets[base] = (host, parts.port or (443 if tls else 80), parts.netloc, tls, parts.path.rstrip("/"))
        return found

    async def _connection(self, host: str, port: int, tls: bool) -> tuple[Connection, bool]:
        while True:
            idle = self._idle.get((host, port))
            while idle:
                conn = idle.pop()
                if conn.transport is not None and not conn.transport.is_closing():
                    return conn, True
            if not self._max or len(self._open) < self._max:
                break
            if self._close_oldest_idle():  # another worker's: this one has none idle
                continue
            room = self.loop.create_future()
            self._room.append(room)
            try:
                await room
            finally:
                if room in self._room:
                    self._room.remove(room)
        conn = Connection(self.loop, (host, port), self._lost)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(lambda: conn, host, port, ssl=tls or None)
        except (OSError, TimeoutError) as exc:
            self._lost(conn)
            what = f"no connection within {self.connect_timeout:g}s" if isinstance(exc, TimeoutError) else f"{exc.__class__.__name__}: {exc}"
            raise UpstreamUnreachable(f"cannot connect to {host}:{port} ({what})") from None
        except BaseException:
            self._lost(conn)
            raise
        return conn, False

    def release(self, conn: Connection) -> None:
        if not (conn.eof and conn.keep_alive and conn.at_eof() and not self.closed) or conn.transport is None or conn.transport.is_closing():
            self._close(conn)
            return
        conn.reset()
        conn.idle_since = self.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self._keepalive, self._close_idle)
        self._give_room()

    def _close(self, conn: Connection) -> None:
        conn.abort()
        self._lost(conn)

    def _lost(self, conn: Connection) -> None:
        """The connection closed (either side): out of the pool, and its room to whoever waits."""
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._give_room()

    def _give_room(self) -> None:
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
                return

    def _close_oldest_idle(self) -> bool:
        oldest = min((c for idle in self._idle.values() for c in idle[:1]), key=lambda c: c.idle_since, default=None)
        if oldest is None:
            return False
        self._close(oldest)
        return True

    def _close_idle(self) -> None:
        """Connections unused for `keepalive` seconds are closed; the sweep comes again for the next one due."""
        self._sweep = None
        now = self.loop.time()
        due = [c for idle in self._idle.values() for c in idle if now - c.idle_since >= self._keepalive - 0.01]
        for conn in due:
            self._close(conn)
        left = [c.idle_since for idle in self._idle.values() for c in idle]
        if left:
            self._sweep = self.loop.call_at(min(left) + self._keepalive, self._close_idle)

    async def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            self._close(conn)
        for room in self._room:
            if not room.done():
                room.set_result(None)
