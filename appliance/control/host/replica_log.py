"""A replica's log: a size-capped, rotating file, its recent lines in memory, and live followers.
Worker output reaches it from a pump thread per worker, appliance notes from one note thread: the
event loop never writes to it."""

from __future__ import annotations

import asyncio
import logging
import os
import queue as queues
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path

TAIL_LINES = 200
FILTER_SCAN_BYTES = 32 << 20  # a filtered tail reads at most this much of the log
Keep = Callable[[str], bool]  # which lines a reader wants


class _NoteWriter:
    """The appliance's own notes go into replica logs from this thread: the event loop only enqueues,
    and never waits on the disk or on a lock that a log pump holds while it writes."""

    def __init__(self) -> None:
        self._queue: queues.SimpleQueue[tuple[ReplicaLog, str | None]] = queues.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def put(self, log: ReplicaLog, line: str | None) -> None:
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="replica-notes", daemon=True)
                    self._thread.start()
        self._queue.put((log, line))

    def _run(self) -> None:
        while True:
            log, line = self._queue.get()
            try:
                log.write(line) if line is not None else log.close_now()
            except Exception:  # one bad log must not stop the notes of the others
                logging.getLogger(__name__).exception("could not write to %s", log.path)


_NOTES = _NoteWriter()
FOLLOW_BACKLOG = 10_000  # lines a follower may fall behind before lines are skipped for it


def _offer(queue: asyncio.Queue[str | None], line: str) -> None:
    """On the follower's loop: a follower that fell FOLLOW_BACKLOG lines behind skips them (and is told)."""
    if queue.full():
        skipped = queue.qsize()
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(f"[appliance] this follower fell behind: {skipped} lines skipped")
    queue.put_nowait(line)


def _end(queue: asyncio.Queue[str | None]) -> None:
    """On the follower's loop: the end of the log, room made for it by dropping the oldest line."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(None)


class _LogFile(RotatingFileHandler):
    """A rotating file that counts the lines the disk refused instead of printing a traceback per line
    (the worker's output is still read, kept in memory and sent to followers: its pipe never fills)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.refused = 0
        self.last_error = ""

    def handleError(self, record: logging.LogRecord) -> None:
        self.refused += 1
        self.last_error = str(sys.exc_info()[1])
        if self.stream is not None:  # a partly written buffer would be written again with the next line
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None  # type: ignore[assignment]  # reopened by the next emit


class ReplicaLog:
    """A replica's log file (kept across restarts of the replica) plus its recent lines and live followers."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # delay: the file is opened by the first line written (a pump or the note thread), not here on the loop
        self._handler = _LogFile(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()
        self._tail_lock = threading.Lock()  # never held across a disk write: the event loop reads the tail under it
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._followers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[str | None]]] = set()
        self._closed = False

    def write(self, line: str) -> None:
        """Thread-safe and blocking: called from pump threads, the note thread and worker threads, never the event loop."""
        with self._lock:
            refused = self._handler.refused
            if refused:  # the disk refused earlier lines: say so in the file, once it takes lines again
                self._handler.refused = 0
                self._emit(f"[appliance {time.strftime('%Y-%m-%dT%H:%M:%S')}] {refused} lines were not written here: {self._handler.last_error}")
                if self._handler.refused:  # still refused: go on counting from where it was
                    self._handler.refused = refused
            self._emit(line)
            with self._tail_lock:
                self.tail.append(line)
            followers = list(self._followers)
        for loop, queue in followers:
            loop.call_soon_threadsafe(_offer, queue, line)

    def _emit(self, line: str) -> None:
        self._handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))

    def note(self, message: str) -> None:
        """An appliance note (any thread, the event loop included): written by the note thread, in order."""
        _NOTES.put(self, f"[appliance {time.strftime('%Y-%m-%dT%H:%M:%S')}] {message}")

    def follow_from(self, n: int, loop: asyncio.AbstractEventLoop, keep: Keep | None = None) -> tuple[list[str], asyncio.Queue[str | None]]:
        """The last n lines (those `keep` accepts) and a queue of every line after them, with none lost
        or repeated (blocking). The queue is not filtered: the follower filters what it takes."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=FOLLOW_BACKLOG + 2)
        with self._lock:
            self._handler.flush()
            lines = self.read_tail(n, keep)
            if self._closed:
                queue.put_nowait(None)  # a finished replica: its tail, then the end
            else:
                self._followers.add((loop, queue))
        return lines, queue

    def unfollow(self, queue: asyncio.Queue[str | None]) -> None:
        with self._lock:
            self._followers = {f for f in self._followers if f[1] is not queue}

    def last_lines(self, n: int = 20) -> list[str]:
        """The recent lines in memory (on the event loop: takes no lock a disk write holds)."""
        with self._tail_lock:
            return list(self.tail)[-n:]

    def read_tail(self, n: int, keep: Keep | None = None) -> list[str]:
        """The last n lines from disk (those `keep` accepts, if given), rotated files included (blocking:
        call off the loop). Reads from the end, so a 50 MB log costs what its last lines cost; a filtered
        read gives up after FILTER_SCAN_BYTES, so that a log of nothing but hidden lines stays cheap."""
        lines: list[str] = []
        budget = [FILTER_SCAN_BYTES] if keep is not None else None
        files = [self.path] + [Path(f"{self.path}.{i}") for i in range(1, self._handler.backupCount + 1)]
        for f in files:
            if len(lines) >= n or not f.exists() or (budget is not None and budget[0] <= 0):
                break
            lines = _last_lines(f, n - len(lines), keep=keep, budget=budget) + lines
        return lines[-n:] if n else []

    def end_followers(self) -> None:
        """Tell every follower the log ends here (the appliance is stopping)."""
        with self._lock:
            followers, self._followers = list(self._followers), set()
        for loop, queue in followers:
            loop.call_soon_threadsafe(_end, queue)

    def close(self) -> None:
        """Closed after the notes written before it (by the note thread)."""
        _NOTES.put(self, None)

    def close_now(self) -> None:
        with self._lock:
            self._handler.close()
            self._closed = True
        self.end_followers()


def _last_lines(path: Path, n: int, block: int = 64 << 10, keep: Keep | None = None, budget: list[int] | None = None) -> list[str]:
    """The last n lines of a file (those `keep` accepts, if given), read block by block from its end.
    `budget` is bytes left to read for a filtered read, shared across files and spent here."""
    found: list[list[str]] = []  # blocks' lines, newest block first
    count = 0
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        head = b""  # the oldest line read so far, whose start is in the block before
        first = True
        while end > 0 and count < n and (budget is None or budget[0] > 0):
            step = min(block, end)
            end -= step
            if budget is not None:
                budget[0] -= step
            f.seek(end)
            parts = (f.read(step) + head).split(b"\n")
            if first and parts[-1] == b"":  # the file's last line ends with its newline
                parts.pop()
            first = False
            head = parts.pop(0) if end > 0 else b""
            lines = [p.decode("utf-8", errors="replace") for p in parts]
            if keep is not None:
                lines = [line for line in lines if keep(line)]
            found.append(lines)
            count += len(lines)
    out = [line for lines in reversed(found) for line in lines]
    return out[-n:] if n else []


MAX_LINE = 8 << 10  # bytes of one line kept; the rest of a longer line is dropped (and the cut is marked)
_BREAK = re.compile(rb"[\r\n]")


class LineSplitter:
    """Bytes from a worker, cut into lines as they come, in memory bounded by MAX_LINE.
    \r ends a line too (progress bars redraw with it; \r\n is one break), and a line longer than
    `limit` is passed on at once, cut and marked, its remainder dropped up to the next break, so that
    an output that never breaks its line neither grows a buffer nor hides what came first."""

    def __init__(self, emit: Callable[[str], None], limit: int = MAX_LINE) -> None:
        self._emit, self._limit = emit, limit
        self._buf = bytearray()
        self._dropping = False  # the current line was cut: the rest of it is skipped
        self._after_cr = False  # the last break was \r: a \n right after it ends nothing new

    def feed(self, data: bytes) -> None:
        pos, size = 0, len(data)
        while pos < size:
            found = _BREAK.search(data, pos)
            end = found.start() if found else size
            if end > pos:
                self._take(data, pos, end)
                self._after_cr = False
            if found is None:
                return
            cr = data[end] == 0x0D
            if self._dropping:
                self._dropping = False
            elif self._buf or not (cr or self._after_cr):  # an empty piece between \r and a break is no line
                self._line(bytes(self._buf))
            self._buf.clear()
            self._after_cr = cr
            pos = end + 1

    def flush(self) -> None:
        """The last bytes, which no break ended."""
        if self._buf and not self._dropping:
            self._line(bytes(self._buf))
        self._buf.clear()
        self._dropping = False

    def _take(self, data: bytes, start: int, end: int) -> None:
        if self._dropping:
            return
        room = self._limit - len(self._buf)
        if end - start <= room:
            self._buf += data[start:end]
            return
        self._buf += data[start:start + room]
        self._line(bytes(self._buf), cut=True)
        self._buf.clear()
        self._dropping = True

    def _line(self, raw: bytes, cut: bool = False) -> None:
        mark = f" [appliance: line cut at {self._limit:,} bytes]" if cut else ""
        self._emit(raw.decode("utf-8", errors="replace") + mark)


def _pump(fd: int, sink: ReplicaLog) -> None:
    """A worker's output (its pipe's reading end) into its log, line by line, until the pipe closes."""
    lines = LineSplitter(sink.write)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        lines.feed(chunk)
    lines.flush()
    os.close(fd)
