"""Warms of one model: two callers at once start one copy, and a file is checked as it lies on disk,
so bytes that another writer put into a partial file are never published."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import async_wait_for
from test_models import MiB, Gate, same_tree, write_model

from appliance.control.models import sources as model_sources
from appliance.control.models.sources import PathSource
from appliance.control.models.registry import Registry
from appliance.control.models.warm import Layout, Tally, copy_files
from appliance.domain.models import FileEntry, ModelSpec
from appliance.errors import ApplianceError
from appliance.security.vault import Vault
from appliance.store import Store


async def test_two_warms_at_once_start_one_copy(make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST …/warm and the models.demand job racing: both pass the early check, only one copy runs."""
    monkeypatch.setattr(model_sources, "CHUNK", MiB)
    sizes = {"big.bin": 4 * MiB + 3, "small.bin": 100_000}
    source = write_model(tmp_path / "src", sizes)
    config = make_config({"models": {"parallel": 4}})
    store = Store(config.db_path, time.time)
    await store.open()
    registry = Registry(config, store, time.time, Vault(config.secret_key_path))
    try:
        await registry.register(ModelSpec(name="m", source=str(source), revision="r1", warm=False))
        gate = Gate(monkeypatch, "big.bin")  # the copy holds after its first chunk: the warm is still running
        # The first caller is held inside the disk check (as a slow disk or cache decision would hold it) while
        # the second makes its early check and waits for the lock.
        deciding, decide = asyncio.Event(), asyncio.Event()
        check_room = registry._check_room

        async def held_check(*args: Any) -> list[str]:
            deciding.set()
            await decide.wait()
            return await check_room(*args)

        monkeypatch.setattr(registry, "_check_room", held_check)
        one = asyncio.create_task(registry.warm("m"))
        await asyncio.wait_for(deciding.wait(), 10)
        two = asyncio.create_task(registry.warm("m"))
        await async_wait_for(lambda: len(registry._room._waiters or ()) == 1, timeout=10, what="the second warm to wait for the lock")
        decide.set()
        first, second = await asyncio.gather(one, two)
        assert first["state"] == second["state"] == "WARMING"
        await asyncio.to_thread(gate.reached.wait, 10)
        assert len(registry._warms) == 1
        again = await registry.warm("m")  # while it runs: told it is warming, nothing started
        assert again["state"] == "WARMING"
        gate.release.set()

        async def ready() -> bool:
            row = await store.models.get("m")
            assert row is not None and row["state"] != "FAILED", row["last_error"]
            return row["state"] == "READY"

        await async_wait_for(ready, timeout=30, what="the warm")
        assert [(p, off) for p, off, _ in gate.reads if p == "big.bin"] == [("big.bin", 0)]  # read once, by one copy
        assert gate.fetched() == sum(sizes.values())
        warming = [e for e in await store.events.list(kind="model.warming", limit=100)]
        assert len(warming) == 1, warming
        row = await store.models.get("m")
        assert row is not None and same_tree(source, Path(row["local_path"]))
    finally:
        await registry.stop()
        await store.close()


class Meddling(PathSource):
    """A source whose read lets another writer touch the partial file once its first chunk is written."""

    def __init__(self, root: str, meddle: Any) -> None:
        super().__init__(root)
        self.meddle = meddle
        self.done = threading.Event()

    def read(self, path: str, offset: int) -> Iterator[memoryview]:
        for i, chunk in enumerate(super().read(path, offset)):
            yield chunk
            if i == 0 and not self.done.is_set():  # the caller wrote the first chunk before asking for the next
                self.done.set()
                self.meddle(path)


def _append(part: Path) -> None:
    with open(part, "ab") as f:  # a second copy appending to the same file, as two warms did
        f.write(b"x" * 1000)


def _overwrite(part: Path) -> None:
    with open(part, "r+b") as f:  # the same size, other bytes
        f.write(b"\x00\xff" * 500)


@pytest.mark.parametrize("meddle", [_append, _overwrite], ids=["interleaved", "overwritten"])
def test_a_partial_file_changed_on_disk_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meddle: Any) -> None:
    """The manifest has no sha256 (a folder or S3 listing): the file on disk must hash as the bytes read did."""
    monkeypatch.setattr(model_sources, "CHUNK", 64 << 10)
    source = write_model(tmp_path / "src", {"w.bin": MiB})
    layout = Layout(tmp_path / "staging", tmp_path / "partial")
    meddling = Meddling(str(source), lambda rel: meddle(layout.partial / rel))
    with pytest.raises(ApplianceError) as caught:
        copy_files(meddling, [FileEntry("w.bin", MiB)], layout, parallel=1, cancel=threading.Event(), tally=Tally())
    assert caught.value.code == "written_file_mismatch" and "something else wrote" in caught.value.message
    assert meddling.done.is_set() and not (layout.target / "w.bin").exists()  # nothing published
    assert not (layout.partial / "w.bin").exists()  # and the bad part is not resumed by the next warm


def test_with_a_known_sha256_a_file_changed_on_disk_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's sha256 is checked against the file on disk: one changed while written is fetched afresh."""
    import hashlib

    monkeypatch.setattr(model_sources, "CHUNK", 64 << 10)
    source = write_model(tmp_path / "src", {"w.bin": MiB})
    digest = hashlib.sha256((source / "w.bin").read_bytes()).hexdigest()
    layout = Layout(tmp_path / "staging", tmp_path / "partial")
    meddling = Meddling(str(source), lambda rel: _overwrite(layout.partial / rel))
    tally = Tally()
    full = copy_files(meddling, [FileEntry("w.bin", MiB, digest)], layout, parallel=1, cancel=threading.Event(), tally=tally)
    assert meddling.done.is_set() and full[0].sha256 == digest
    assert (layout.target / "w.bin").read_bytes() == (source / "w.bin").read_bytes()
    assert tally.bytes_fetched == 2 * MiB  # the first copy, then the fresh one
