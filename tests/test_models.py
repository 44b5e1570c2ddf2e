"""The model registry with local and NFS-style path sources, in-process: registration, warms to local disk,
resume after an interruption, verification and re-fetch, the disk and cache checks, eviction, and
endpoints that serve a registered model (waiting in PROVISIONING while it warms)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Admin, async_wait_for
from test_supervisor import WORKERS, fake_folder, replicas, wait_status

from appliance.config import parse_config
from appliance.control.models import sources as model_sources
from appliance.control.models.sources import PathSource
from appliance.control.models.registry import Registry
from appliance.domain.models import Cached, FileEntry, ModelSpec, RateMeter, check_relative, choose_evictions, compare, eta_seconds, parse_source, revision_of
from appliance.security.vault import Vault
from appliance.store import Store

MiB = 1 << 20


def write_model(folder: Path, sizes: dict[str, int], seed: int = 1) -> Path:
    """A folder of files of the given sizes with distinct, reproducible contents."""
    for rel, size in sizes.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        block = hashlib.sha256(f"{seed}:{rel}".encode()).digest() * 2048  # 64 KiB
        with open(path, "wb") as f:
            left = size
            while left > 0:
                f.write(block[:left])
                left -= len(block)
    return folder


def same_tree(a: Path, b: Path) -> bool:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).digest() for p in root.rglob("*") if p.is_file()}

    return files(a) == files(b)


def damage(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\x00\xff")


async def model(admin: Admin, name: str) -> dict[str, Any]:
    status, body = await admin.call("GET", f"/api/v1/models/{name}")
    assert status == 200, body
    return body


async def wait_model(admin: Admin, name: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        m = await model(admin, name)
        return m if m["state"] in states else None

    return await async_wait_for(check, timeout=timeout, what=f"model {name} to be {'/'.join(states)}")


async def model_events(admin: Admin) -> list[dict[str, Any]]:
    return list(reversed((await admin.call("GET", "/api/v1/events?kind=model&limit=1000"))[1]["data"]))


class Gate:
    """Makes a source's read of one file stop after its first chunk until released, and records every
    read (path, offset, bytes) so a test can tell what came from the source."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: str | None = None, cls: Any = PathSource) -> None:
        self.path = path
        self.reached = threading.Event()
        self.release = threading.Event()
        self.reads: list[list[Any]] = []  # [path, offset, bytes read]
        self._lock = threading.Lock()
        original = cls.read
        gate = self

        def read(source: Any, rel: str, offset: int) -> Iterator[Any]:
            record = [rel, offset, 0]
            with gate._lock:
                gate.reads.append(record)
            chunks = original(source, rel, offset)
            try:
                for i in itertools.count():
                    if rel == gate.path and i == 1:  # before the second chunk is read from the source
                        gate.reached.set()
                        assert gate.release.wait(30), "the gate was never released"
                    chunk = next(chunks, None)
                    if chunk is None:
                        return
                    record[2] += len(chunk)
                    yield chunk
            finally:
                chunks.close()

        monkeypatch.setattr(cls, "read", read)

    def fetched(self, rel: str | None = None) -> int:
        return sum(n for path, _, n in self.reads if rel is None or path == rel)


# --- pure parts ---------------------------------------------------------------------------------------


def test_sources_and_specs() -> None:
    assert parse_source("s3://my-bucket/models/llama/").prefix == "models/llama/"
    assert str(parse_source("s3://my-bucket")) == "s3://my-bucket/"
    assert parse_source("/srv//nfs/./m/").path == "/srv/nfs/m"
    assert parse_source("//").path == "/"
    for bad in ("relative/dir", "s3://No_Such", "s3://b/../x", "http://x/y", "s3://ab/p"):
        with pytest.raises(ValueError):
            parse_source(bad)
    with pytest.raises(ValueError, match="only for s3"):
        ModelSpec(name="m", source="/srv/m", region="eu-west-1")
    with pytest.raises(ValueError, match="credentials go in"):
        ModelSpec(name="m", source="s3://bucket/m", endpoint_url="http://user:pw@minio:9000")
    assert ModelSpec(name="m", source="s3://bucket/m", endpoint_url="http://127.0.0.1:9000/").endpoint_url == "http://127.0.0.1:9000"
    for bad in ("../x", "/abs", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            check_relative(bad)


def test_manifest_progress_and_eviction_arithmetic() -> None:
    old = [FileEntry("a", 1), FileEntry("b", 2), FileEntry("c", 3)]
    diff = compare(old, [FileEntry("a", 1), FileEntry("b", 5), FileEntry("d", 1)])
    assert (diff.added, diff.removed, diff.resized) == (("d",), ("c",), ("b",)) and not compare(old, list(reversed(old)))
    assert revision_of(old) == revision_of(list(reversed(old))) != revision_of([FileEntry("a", 1, tag="x"), *old[1:]])
    meter = RateMeter(window=10)
    for t, done in ((0, 0), (1, 100), (2, 300)):
        meter.add(t, done)
    assert meter.rate() == 150 and eta_seconds(600, meter.rate()) == 4 and eta_seconds(10, None) is None and eta_seconds(0, None) == 0
    cached = [Cached("old", 4, "2026-01-01", False), Cached("new", 4, "2026-06-01", False), Cached("busy", 4, "2025-01-01", True)]
    assert choose_evictions(cached, 2, 14) == []
    assert choose_evictions(cached, 4, 14) == ["old"]  # least recently used first; the one in use never
    assert choose_evictions(cached, 9, 14) == ["old", "new"]
    assert choose_evictions(cached, 11, 14) is None and choose_evictions([], 15, 14) is None


# --- local and NFS-style sources ----------------------------------------------------------------------


@pytest.fixture
async def admin(start_inprocess_app: Any, make_config: Any) -> Admin:
    return await start_inprocess_app(make_config({"workers": WORKERS, "models": {"parallel": 4}}))


async def test_register_and_warm_a_local_folder(admin: Admin, tmp_path: Path) -> None:
    source = write_model(tmp_path / "src" / "m1", {"config.json": 300, "model-00001.safetensors": 3 * MiB + 17, "tok/vocab.txt": 5000})
    status, body = await admin.call("POST", "/api/v1/models", json_body={"name": "m1", "source": str(source), "revision": "v1"})
    assert status == 201, body
    assert body["state"] == "WARMING" and body["files"] == 3 and body["local_path"].endswith("/models/m1/v1")
    ready = await wait_model(admin, "m1", "READY")
    local = Path(ready["local_path"])
    assert same_tree(source, local) and not list(local.parent.glob(".staging-*")) and not list(local.parent.glob(".partial-*"))
    assert {f["path"]: f["sha256"] for f in ready["manifest"]}["config.json"] == hashlib.sha256((source / "config.json").read_bytes()).hexdigest()
    p = ready["progress"]
    assert p["bytes_done"] == p["bytes_total"] == ready["size"] and p["files_done"] == 3 and p["percent"] == 100 and p["bytes_fetched"] == ready["size"]
    kinds = [e["kind"] for e in await model_events(admin)]
    assert kinds == ["model.registered", "model.warming", "model.ready"]
    listed = (await admin.call("GET", "/api/v1/models"))[1]["data"]
    assert [m["name"] for m in listed] == ["m1"] and listed[0]["manifest"] is None
    # Warming a READY model verifies it: nothing is fetched when nothing changed.
    status, body = await admin.call("POST", "/api/v1/models/m1/warm")
    assert status == 202
    again = await wait_model(admin, "m1", "READY")
    assert again["progress"]["bytes_fetched"] == 0 and again["progress"]["refetched"] == []


async def test_nfs_style_source_elsewhere_with_links(admin: Admin, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A directory elsewhere on disk, as an NFS mount is, laid out like a Hugging Face snapshot (links to blobs)."""
    mount = tmp_path_factory.mktemp("nfs-mount")
    blobs = write_model(mount / "hub" / "blobs", {"aaa": 2 * MiB, "bbb": 1000})
    snapshot = mount / "hub" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blobs / "aaa")
    (snapshot / "config.json").symlink_to(blobs / "bbb")
    status, body = await admin.call("POST", "/api/v1/models", json_body={"name": "nfs", "source": str(snapshot)})
    assert status == 201, body
    ready = await wait_model(admin, "nfs", "READY")
    local = Path(ready["local_path"])
    assert (local / "model.safetensors").read_bytes() == (blobs / "aaa").read_bytes() and not (local / "model.safetensors").is_symlink()
    assert ready["revision"] == body["revision"] and len(ready["revision"]) == 12


async def test_bad_input_is_a_clear_4xx_with_nothing_created(admin: Admin, tmp_path: Path) -> None:
    state = admin.config.server.state_dir
    cases = [
        ({"name": "gone", "source": str(tmp_path / "no-such-dir")}, 422, "source_not_found"),
        ({"name": "rel", "source": "models/rel"}, 422, "validation_error"),
        ({"name": "state", "source": str(state)}, 422, "source_forbidden"),
        ({"name": "root", "source": "/"}, 422, "source_forbidden"),
        ({"name": "creds", "source": str(tmp_path), "credentials": "x"}, 422, "validation_error"),
    ]
    for body, status, code in cases:
        got, answer = await admin.call("POST", "/api/v1/models", json_body=body)
        assert (got, answer["error"]["code"]) == (status, code), answer
        assert body["name"] in answer["error"]["message"] or answer["error"]["message"], answer
    empty = tmp_path / "empty"
    empty.mkdir()
    got, answer = await admin.call("POST", "/api/v1/models", json_body={"name": "empty", "source": str(empty)})
    assert (got, answer["error"]["code"]) == (422, "source_empty")
    source = write_model(tmp_path / "src", {"w.bin": 1000})
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "taken", "source": str(source)}))[0] == 201
    got, answer = await admin.call("POST", "/api/v1/models", json_body={"name": "taken", "source": str(source)})
    assert (got, answer["error"]["code"]) == (409, "model_exists")
    await wait_model(admin, "taken", "READY")
    assert [m["name"] for m in (await admin.call("GET", "/api/v1/models"))[1]["data"]] == ["taken"]
    assert sorted(p.name for p in (state / "models").iterdir()) == ["taken"]
    assert (await admin.call("GET", "/api/v1/models/nope"))[0] == 404
    assert (await admin.call("POST", "/api/v1/models/nope/warm"))[0] == 404
    assert (await admin.call("DELETE", "/api/v1/models/nope"))[0] == 404
    # The demo keeps a plain model folder in state_dir/models: a model of that name is refused, the folder left alone.
    demo = write_model(state / "models" / "demo", {"config.json": 10})
    got, answer = await admin.call("POST", "/api/v1/models", json_body={"name": "demo", "source": str(source)})
    assert (got, answer["error"]["code"]) == (409, "folder_taken") and (demo / "config.json").exists()


async def test_disk_check_and_cache_cap(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_inprocess_app(make_config({"workers": WORKERS, "models": {"cache_max_bytes": 3 * MiB}}))
    small = write_model(tmp_path / "small", {"w.bin": 2 * MiB})
    big = write_model(tmp_path / "big", {"w.bin": 4 * MiB})
    got, answer = await admin.call("POST", "/api/v1/models", json_body={"name": "big", "source": str(big)})
    assert (got, answer["error"]["code"]) == (409, "cache_full") and "cache_max_bytes" in answer["error"]["message"], answer
    assert (await admin.call("GET", "/api/v1/models"))[1]["data"] == []
    assert not (admin.config.server.state_dir / "models" / "big").exists()
    # A model that fits only when the least recently used one goes: it is evicted.
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "first", "source": str(small)}))[0] == 201
    await wait_model(admin, "first", "READY")
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "second", "source": str(small)}))[0] == 201
    await wait_model(admin, "second", "READY")
    first = await model(admin, "first")
    assert first["state"] == "EVICTED" and not Path(first["local_path"]).exists()
    evicted = [e for e in await model_events(admin) if e["kind"] == "model.evicted"]
    assert len(evicted) == 1 and "make room for second" in evicted[0]["message"]
    # A warm brings it back, evicting the other in turn.
    assert (await admin.call("POST", "/api/v1/models/first/warm"))[0] == 202
    await wait_model(admin, "first", "READY")
    assert (await model(admin, "second"))["state"] == "EVICTED"


async def test_not_enough_free_disk(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    admin = await start_inprocess_app(make_config({"workers": WORKERS, "models": {"min_free_bytes": "1000pb"}}))
    source = write_model(tmp_path / "src", {"w.bin": 1000})
    got, answer = await admin.call("POST", "/api/v1/models", json_body={"name": "m", "source": str(source)})
    assert (got, answer["error"]["code"]) == (409, "insufficient_storage") and "min_free_bytes" in answer["error"]["message"]
    assert (await admin.call("GET", "/api/v1/models"))[1]["data"] == []
    got, answer = await admin.call("POST", "/api/v1/models", json_body={"name": "m", "source": str(source), "warm": False})
    assert got == 201 and answer["state"] == "REGISTERED"
    got, answer = await admin.call("POST", "/api/v1/models/m/warm")
    assert (got, answer["error"]["code"]) == (409, "insufficient_storage") and (await model(admin, "m"))["state"] == "REGISTERED"


async def test_corrupted_file_is_detected_and_fetched_again(admin: Admin, tmp_path: Path) -> None:
    source = write_model(tmp_path / "src", {"a.bin": 2 * MiB, "b.bin": MiB, "c.txt": 100})
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "m", "source": str(source)}))[0] == 201
    local = Path((await wait_model(admin, "m", "READY"))["local_path"])
    damage(local / "b.bin", 1234)
    (local / "c.txt").write_text("short")
    assert (await admin.call("POST", "/api/v1/models/m/warm"))[0] == 202
    ready = await wait_model(admin, "m", "READY")
    assert sorted(ready["progress"]["refetched"]) == ["b.bin", "c.txt"] and ready["progress"]["bytes_fetched"] == MiB + 100
    assert same_tree(source, local)
    ready_event = [e for e in await model_events(admin) if e["kind"] == "model.ready"][-1]
    assert ready_event["details"]["refetched"] and "fetched again" in ready_event["message"]


async def test_source_changed_fails_the_model_and_its_endpoint(admin: Admin, tmp_path: Path) -> None:
    source = fake_folder(tmp_path, "changing")
    write_model(source, {"weights.bin": 1000})
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "changing", "source": str(source), "warm": False}))[0] == 201
    (source / "weights.bin").unlink()
    status, body = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "on-changing", "model": "changing"})
    assert status == 201, body  # resolved from the definition files read at registration
    failed = await wait_model(admin, "changing", "FAILED")  # the endpoint's need started the warm
    assert "source changed" in failed["last_error"] and "weights.bin" in failed["last_error"]
    ep = await wait_status(admin, "on-changing", "ERROR")
    assert ep["status_message"].startswith("model changing failed: the source changed")
    assert [e["kind"] for e in await model_events(admin)][-1] == "model.failed"


async def test_endpoint_waits_for_a_warming_model_then_serves(admin: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = fake_folder(tmp_path, "served")
    write_model(source, {"padding.bin": 9 * MiB})
    gate = Gate(monkeypatch, "padding.bin")
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "served", "source": str(source)}))[0] == 201
    await asyncio.to_thread(gate.reached.wait, 10)
    status, ep = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "chat", "model": "served"})
    assert status == 201, ep
    assert ep["model"] == "served" and ep["model_folder"].endswith("/models/served/" + (await model(admin, "served"))["revision"])
    assert ep["runtime"] == "custom" and ep["served_model_name"] == "served"  # from the definition read at registration
    await wait_status(admin, "chat", "PROVISIONING")
    (rep,) = await replicas(admin, "chat")
    assert rep["state"] == "PROVISIONING" and rep["gpus"] == [] and rep["port"] is None and rep["gpu_share"] is None
    warming = await model(admin, "served")
    assert warming["state"] == "WARMING" and warming["used_by"] == ["chat"] and 0 < warming["progress"]["bytes_done"] < warming["size"]
    got, answer = await admin.call("DELETE", "/api/v1/models/served")
    assert (got, answer["error"]["code"]) == (409, "model_in_use") and "chat" in answer["error"]["message"]
    gate.release.set()
    await wait_model(admin, "served", "READY")
    await wait_status(admin, "chat", "HEALTHY")
    resp = await admin.client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                                   headers=admin.headers)
    assert resp.status == 200, await resp.text()
    assert (await model(admin, "served"))["last_used_at"] is not None
    # Removing a model an endpoint serves stays refused; once the endpoint is gone it goes, files and all.
    assert (await admin.call("DELETE", "/api/v1/models/served"))[0] == 409
    assert (await admin.call("DELETE", "/api/v1/endpoints/chat"))[0] == 200
    status, body = await admin.call("DELETE", "/api/v1/models/served")
    assert status == 200 and body == {"id": "served", "object": "model", "deleted": True}
    assert not (admin.config.server.state_dir / "models" / "served").exists()


async def test_declared_models_and_endpoints(start_inprocess_app: Any, make_config: Any, tmp_path: Path) -> None:
    source = fake_folder(tmp_path, "declared")
    admin = await start_inprocess_app(make_config({
        "workers": WORKERS,
        "models": {"declared": [{"name": "declared", "source": str(source), "description": "from the file"}]},
        "endpoints": [{"name": "from-file", "model": "declared"}],
    }))
    await wait_status(admin, "from-file", "HEALTHY")
    m = await model(admin, "declared")
    assert m["origin"] == "config" and m["state"] == "READY" and m["used_by"] == ["from-file"] and m["description"] == "from the file"


async def test_interrupted_warm_resumes_partial_files_and_refetches_a_corrupted_one(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop mid-warm, then a new start: the partial file is finished from where it stopped (the source is
    read from that offset), complete files are verified locally (one corrupted meanwhile is fetched again),
    and no other byte is read twice."""
    monkeypatch.setattr(model_sources, "CHUNK", MiB)
    sizes = {"big.bin": 6 * MiB + 5, "small-1.bin": 200_000, "small-2.bin": 300_000}
    source = write_model(tmp_path / "src", sizes)
    config = make_config({"models": {"parallel": 4}})
    clock = time.time
    gate = Gate(monkeypatch, "big.bin")

    async def registry() -> tuple[Store, Registry]:
        store = Store(config.db_path, clock)
        await store.open()
        return store, Registry(config, store, clock, Vault(config.secret_key_path))

    store, first = await registry()
    await first.register(ModelSpec(name="m", source=str(source), revision="r1"))
    await asyncio.to_thread(gate.reached.wait, 10)
    staging, partial = config.server.state_dir / "models" / "m" / ".staging-r1", config.server.state_dir / "models" / "m" / ".partial-r1"
    await async_wait_for(lambda: (staging / "small-1.bin").exists() and (staging / "small-2.bin").exists(), what="the small files")
    stopping = asyncio.create_task(first.stop())
    # the stop has reached every warm before the held read goes on: it ends at its next chunk
    await async_wait_for(lambda: all(w.cancel.is_set() for w in first._warms.values()), timeout=10, what="the stop to reach the warms")
    gate.release.set()
    await stopping
    row = await store.models.get("m")
    assert row is not None and row["state"] == "WARMING"
    kept = (partial / "big.bin").stat().st_size
    assert kept == 2 * MiB  # the chunk before the gate and the one read as the stop came: every byte read is kept
    assert all(e["sha256"] for e in row["manifest"] if e["path"].startswith("small"))  # learnt before the stop
    assert gate.fetched() == kept + sizes["small-1.bin"] + sizes["small-2.bin"]
    damage(staging / "small-2.bin", 0)  # while the appliance was down
    gate.reads.clear()
    second = Registry(config, store, clock, Vault(config.secret_key_path))
    await second.start()  # resumes the interrupted warm

    async def ready() -> bool:
        current = await store.models.get("m")
        assert current is not None and current["state"] != "FAILED", current["last_error"]
        return current["state"] == "READY"

    await async_wait_for(ready, timeout=30, what="the resumed warm")
    assert [(p, off) for p, off, _ in gate.reads if p == "big.bin"] == [("big.bin", kept)]  # finished, not restarted
    assert gate.fetched("big.bin") == sizes["big.bin"] - kept and gate.fetched("small-1.bin") == 0
    assert gate.fetched("small-2.bin") == sizes["small-2.bin"]  # the damaged one, fetched again
    row = await store.models.get("m")
    assert row is not None and row["progress"]["refetched"] == ["small-2.bin"] and row["progress"]["bytes_fetched"] == gate.fetched()
    assert same_tree(source, Path(row["local_path"])) and not partial.exists() and not staging.exists()
    await second.stop()
    await store.close()


def test_config_declares_models_and_credentials(tmp_path: Path) -> None:
    raw = {
        "models": {
            "cache_max_bytes": "100gb",
            "credentials": {"lab": {"access_key_id": "AKIA", "secret_access_key": "s3cr3t"}},
            "declared": [{"name": "m", "source": "weights/m"}, {"name": "s", "source": "s3://bucket/s", "credentials": "lab"}],
        },
    }
    config = parse_config(raw, base=tmp_path)
    assert config.models.cache_max_bytes == 100 << 30 and config.models.declared[0].source == str(tmp_path / "weights" / "m")
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.models.model_dump())
    bad = {"models": {"declared": [{"name": "s", "source": "s3://bucket/s", "credentials": "nope"}]}}
    with pytest.raises(Exception, match="no \\[models.credentials.nope\\]"):
        parse_config(bad, base=tmp_path)
    with pytest.raises(Exception, match="key pair or a profile"):
        parse_config({"models": {"credentials": {"x": {"access_key_id": "a", "secret_access_key": "b", "profile": "p"}}}}, base=tmp_path)


async def test_a_file_rewritten_at_the_same_size_before_the_warm_is_caught(admin: Admin, tmp_path: Path) -> None:
    source = tmp_path / "same-size"
    write_model(source, {"config.json": 10, "weights.bin": 1000})
    assert (await admin.call("POST", "/api/v1/models", json_body={"name": "same-size", "source": str(source), "warm": False}))[0] == 201
    weights = source / "weights.bin"
    weights.write_bytes(os.urandom(1000))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten: a new mtime
    assert (await admin.call("POST", "/api/v1/models/same-size/warm"))[0] in (200, 202)
    failed = await wait_model(admin, "same-size", "FAILED")
    assert "source changed" in failed["last_error"] and "rewritten: weights.bin" in failed["last_error"], failed["last_error"]


async def test_declared_models_on_reload_are_updated_pruned_and_their_source_fields_kept(
    start_inprocess_app: Any, make_config: Any, tmp_path: Path
) -> None:
    from appliance.api.app import reload_declared

    one, two = fake_folder(tmp_path, "one"), fake_folder(tmp_path, "two")

    def config(models: list[dict[str, Any]], endpoints: list[dict[str, Any]]) -> Any:
        return make_config({"workers": WORKERS, "models": {"declared": models}, "endpoints": endpoints})

    serving = [{"name": "on-one", "model": "one"}]
    admin = await start_inprocess_app(config([{"name": "one", "source": str(one)}, {"name": "two", "source": str(two), "warm": False}], serving))
    await wait_status(admin, "on-one", "HEALTHY")
    app = admin.client.app
    # a new description is applied; `two`, gone from the file, is deleted
    assert await reload_declared(app, config([{"name": "one", "source": str(one), "description": "now described"}], serving)) == []
    assert (await model(admin, "one"))["description"] == "now described"
    assert (await admin.call("GET", "/api/v1/models/two"))[0] == 404
    # a source field cannot change under the same name: refused, the model as it was
    problems = await reload_declared(app, config([{"name": "one", "source": str(two)}], serving))
    assert len(problems) == 1 and "source cannot change on a registered model" in problems[0], problems
    assert (await model(admin, "one"))["source"] == str(one)
    # gone from the file while an endpoint (an API one now) serves it: it stays, and the reason is given
    status, _ = await admin.call("POST", "/api/v1/endpoints", json_body={"name": "api-on-one", "model": "one"})
    assert status == 201
    problems = await reload_declared(app, config([], []))
    assert any("api-on-one" in p for p in problems), problems
    assert (await model(admin, "one"))["state"] == "READY"
