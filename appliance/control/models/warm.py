"""The copy of one model (blocking, on a pool of threads): parallel, resumable, verified.

Every file grows in a partial directory and is moved into the target directory only once its size
and sha256, read back from the file on disk, match the manifest (or, where the manifest has none,
the bytes read from the source). A partial file left by a crash or a stop is finished from where it
ended (its bytes are hashed from local disk, the rest is read from the source at that offset); a
complete file already in the target is hashed and kept when it matches, fetched again when not.
The registry makes the whole folder appear at once (the target is a staging directory it renames).
Nothing here touches a GPU: it is file I/O and hashing in the appliance's own threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path

from appliance.control.models.sources import CHUNK, Source, SourceBroken
from appliance.domain.models import FileEntry
from appliance.errors import ApplianceError

RETRIES = 3  # a read that breaks off is resumed where it stopped, this many times per file
WRITEBACK_BYTES = 8 << 20  # written bytes handed to the disk at a time


def _sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range, to start writing a file's new bytes to disk while the copy goes on."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_WRITEBACK = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, without waiting


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start the disk write of what was just written: the fsync before the file is published then waits
    for little, and the disk works while the threads hash (otherwise the kernel holds gigabytes of dirty
    pages until the fsync, and writing and hashing happen one after the other)."""
    if _WRITEBACK is not None:
        _WRITEBACK(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Cancelled(Exception):
    """The warm was stopped (shutdown, delete): partial files stay and are finished next time."""


@dataclass
class Tally:
    """What the copy threads have done so far; read by the registry for progress."""

    bytes_total: int = 0
    files_total: int = 0
    bytes_done: int = 0  # bytes of the manifest present and verified, or written (resumed parts included)
    files_done: int = 0
    bytes_fetched: int = 0  # read from the source by this warm: what resuming saves is not here
    refetched: list[str] = field(default_factory=list)  # complete files whose sha256 did not match
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, done: int = 0, fetched: int = 0, files: int = 0) -> None:
        with self.lock:
            self.bytes_done += done
            self.bytes_fetched += fetched
            self.files_done += files


@dataclass(frozen=True)
class Layout:
    target: Path  # complete, verified files
    partial: Path  # files still growing


def sha256_of(path: Path, cancel: threading.Event, upto: int | None = None, into: hashlib._Hash | None = None) -> hashlib._Hash:
    """The sha256 of a local file (or of its first `upto` bytes), read in chunks."""
    h = into or hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = upto
    with open(path, "rb") as f:
        while left is None or left > 0:
            if cancel.is_set():
                raise Cancelled()
            n = f.readinto(view if left is None or left >= CHUNK else view[:left])
            if not n:
                break
            h.update(view[:n])
            left = None if left is None else left - n
    return h


class _Copy:
    """One file's copy; `credited` is what it added to bytes_done, taken back if it starts over."""

    def __init__(self, source: Source, entry: FileEntry, layout: Layout, cancel: threading.Event, tally: Tally) -> None:
        self.source, self.entry, self.layout, self.cancel, self.tally = source, entry, layout, cancel, tally
        self.credited = 0

    def credit(self, n: int, fetched: int = 0) -> None:
        self.credited += n
        self.tally.add(done=n, fetched=fetched)

    def restart(self, part: Path) -> None:
        part.unlink(missing_ok=True)
        self.tally.add(done=-self.credited)
        self.credited = 0

    def run(self) -> str:
        if self.cancel.is_set():  # stopped before this file's turn came
            raise Cancelled()
        entry, dest = self.entry, self.layout.target / self.entry.path
        if dest.is_file():  # complete from an earlier warm, or the READY copy being verified
            if dest.stat().st_size == entry.size:
                digest = sha256_of(dest, self.cancel).hexdigest()
                if entry.sha256 is None or digest == entry.sha256:
                    self.credit(entry.size)
                    self.tally.add(files=1)
                    return digest
            with self.tally.lock:
                self.tally.refetched.append(entry.path)
        part = self.layout.partial / entry.path
        digest = self._fetch(part)
        if entry.sha256 is not None and digest != entry.sha256:
            # The part resumed from an earlier run may hold bad bytes: one fresh copy decides.
            self.restart(part)
            digest = self._fetch(part)
            if digest != entry.sha256:
                part.unlink(missing_ok=True)
                raise ApplianceError(
                    f"{entry.path}: sha256 {digest[:16]}… does not match the manifest's {entry.sha256[:16]}… after a fresh copy: "
                    "the source changed since the model was registered; register it again", status=409, code="checksum_mismatch",
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(part, 0o644)  # workers may run as an account of their own
        os.replace(part, dest)  # over a corrupted copy too: readers see the old file or the new one
        self.tally.add(files=1)
        return digest

    def _fetch(self, part: Path) -> str:
        for attempt in range(RETRIES + 1):
            try:
                return self._fetch_once(part)
            except SourceBroken:
                if attempt == RETRIES or self.cancel.is_set():
                    raise
        raise AssertionError("unreachable")

    def _fetch_once(self, part: Path) -> str:
        """Bring `part` to the entry's size from the source; returns the sha256 of the file as it is on disk.
        With no sha256 in the manifest the streamed bytes are hashed too, and the two must agree: what was
        read is what was written (no other writer's bytes in between, nothing lost on the way)."""
        entry = self.entry
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > entry.size:
            self.restart(part)
            have = 0
        # The manifest's sha256, when known, is checked against the file on disk; else the stream's own hash is
        # the reference (a resumed part's bytes are hashed from disk, not fetched).
        streamed = None if entry.sha256 is not None else (sha256_of(part, self.cancel, upto=have) if have else hashlib.sha256())
        self.credit(have - self.credited)
        with open(part, "ab") as f:
            flushed = have
            if have < entry.size:
                for chunk in self.source.read(entry.path, have):
                    f.write(chunk)  # every byte read is kept: a stop loses nothing that was fetched
                    if streamed is not None:
                        streamed.update(chunk)
                    have += len(chunk)
                    if have - flushed >= WRITEBACK_BYTES:
                        f.flush()
                        start_writeback(f.fileno(), flushed, have - flushed)
                        flushed = have
                    self.credit(len(chunk), fetched=len(chunk))
                    if have > entry.size:
                        break
                    if self.cancel.is_set():
                        raise Cancelled()
            f.flush()
            os.fsync(f.fileno())  # the rename that follows must never expose a file whose data is not on disk
        if have < entry.size:
            raise SourceBroken(f"{entry.path}: the source ended after {have} of {entry.size} bytes")
        if have > entry.size:
            self.restart(part)
            raise ApplianceError(
                f"{entry.path}: the source now has more than the {entry.size} bytes of the manifest: it changed since the model was "
                "registered; register it again", status=409, code="source_changed",
            )
        on_disk = part.stat().st_size
        digest = sha256_of(part, self.cancel).hexdigest()
        if on_disk != entry.size or (streamed is not None and digest != streamed.hexdigest()):
            self.restart(part)
            raise ApplianceError(
                f"{entry.path}: the file written ({on_disk} bytes, sha256 {digest[:16]}…) is not what was read from the source "
                f"({entry.size} bytes{f', sha256 {streamed.hexdigest()[:16]}…' if streamed is not None else ''}): something else wrote to "
                f"{part}; nothing else may write under the model cache", status=500, code="written_file_mismatch",
            )
        return digest


def copy_files(
    source: Source, manifest: Sequence[FileEntry], layout: Layout, *, parallel: int, cancel: threading.Event, tally: Tally,
    learnt: Callable[[FileEntry], None] = lambda e: None,
) -> list[FileEntry]:
    """Bring `layout.target` to a verified copy of `manifest`; returns the manifest with every sha256 known.
    The first failure stops the other files (they stay partial) and is raised; a stop raises Cancelled."""
    tally.bytes_total, tally.files_total = sum(e.size for e in manifest), len(manifest)
    known: dict[str, FileEntry] = {e.path: e for e in manifest}
    # Largest first: the last file to start is a small one, so the threads finish together.
    order = sorted(manifest, key=lambda e: -e.size)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(order))), thread_name_prefix="appliance-warm") as pool:
        futures: dict[Future[str], FileEntry] = {pool.submit(_Copy(source, e, layout, cancel, tally).run): e for e in order}
        for future in as_completed(futures):
            failure = future.exception()
            if failure is not None:
                cancel.set()  # the rest stop at their next chunk; what they wrote stays for the next warm
                wait(futures)
                raise failure
            entry, digest = futures[future], future.result()
            if entry.sha256 != digest:  # learnt as each file completes: a crash later keeps what was verified
                known[entry.path] = FileEntry(entry.path, entry.size, digest, entry.tag)
                learnt(known[entry.path])
    return [known[e.path] for e in manifest]


def fsync_tree(root: Path) -> None:
    """Directory entries on disk too, so the rename of a complete folder survives a power loss."""
    for folder, dirs, _files in os.walk(root):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
