"""The model registry: registration, warms and their progress, the disk and cache checks, eviction.

A model is registered from its source's listing (nothing is copied but its small definition files,
so that endpoints on it resolve at once); a warm copies it into state_dir/models/<name>/<revision>
through control.warm on threads of its own, never on the event loop and never near a GPU. The
models table holds each model's state; every change of state is an event (model.registered,
model.warming, model.ready, model.failed, model.evicted, model.deleted).

On disk, under state_dir/models/<name>/ (a folder the registry marks as its own):
  .definitions/        the definition files, read at registration
  .staging-<revision>/ complete, verified files of a warm in progress
  .partial-<revision>/ files still growing (finished, not restarted, by the next warm)
  <revision>/          the READY copy: the staging folder renamed once complete
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from appliance.config import Config
from appliance.control.models.files import bytes_present, claim_folder, fetch_definitions, publish, remove_folder, seed_definitions
from appliance.control.models.sources import Source, SourceBroken, open_source, s3_access
from appliance.control.models.warm import RETRIES, Cancelled, Layout, Tally, copy_files
from appliance.domain.models import (
    Cached,
    FileEntry,
    ModelSpec,
    ModelState,
    RateMeter,
    choose_evictions,
    compare,
    eta_seconds,
    parse_source,
    percent,
    revision_of,
    size_text,
    total_size,
)
from appliance.errors import ApplianceError
from appliance.security.vault import Vault
from appliance.store import Clock, Store, iso
from appliance.store.models_repo import ModelRow

log = logging.getLogger(__name__)
T = TypeVar("T")
PROGRESS_SECONDS = 1.0  # how often a warm's progress is measured and saved
_READY, _WARMING, _FAILED = ModelState.READY.value, ModelState.WARMING.value, ModelState.FAILED.value


@dataclass
class Warm:
    """One warm in progress, as the registry follows it."""

    name: str
    started: float
    tally: Tally
    cancel: threading.Event = field(default_factory=threading.Event)
    meter: RateMeter = field(default_factory=RateMeter)
    learnt: dict[str, str] = field(default_factory=dict)  # sha256s found for files the manifest had none for
    task: asyncio.Task[None] | None = None

    def learn(self, entry: FileEntry) -> None:
        if entry.sha256 is not None:
            self.learnt[entry.path] = entry.sha256


class Registry:
    def __init__(
        self, config: Config, store: Store, clock: Clock, vault: Vault, on_ready: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._vault = vault
        self.on_ready = on_ready  # the app retries endpoints that failed with the model
        self._warms: dict[str, Warm] = {}
        self._room = asyncio.Lock()  # one disk and cache decision at a time
        # A thread per warm runs its copy (which has a pool of its own); short file work goes to asyncio's threads.
        self._copies = ThreadPoolExecutor(max_workers=16, thread_name_prefix="appliance-warm-run")

    @property
    def root(self) -> Path:
        return self._config.server.state_dir / "models"

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: credentials, the cache cap and parallelism apply to the next warm."""
        self._config = config

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _paths(self, name: str, revision: str) -> tuple[Path, Path, Path]:
        folder = self.root / name
        return folder / revision, folder / f".staging-{revision}", folder / f".partial-{revision}"

    # --- reading ---------------------------------------------------------------------------------

    async def get(self, name: str) -> ModelRow:
        row = await self._store.models.get(name)
        if row is None:
            raise ApplianceError(f"model {name!r} not found", status=404, code="model_not_found", param="name")
        return row

    def live(self, name: str) -> dict[str, Any] | None:
        """The progress of a warm in progress, fresher than the row's."""
        warm = self._warms.get(name)
        return self._progress(warm) if warm else None

    def _progress(self, warm: Warm, finished: bool = False) -> dict[str, Any]:
        t, now = warm.tally, self._clock()
        elapsed = max(0.0, now - warm.started)
        rate = (t.bytes_done / elapsed if elapsed > 0 else None) if finished else warm.meter.rate()
        return {
            "bytes_total": t.bytes_total, "bytes_done": t.bytes_done, "percent": percent(t.bytes_done, t.bytes_total),
            "files_total": t.files_total, "files_done": t.files_done, "bytes_fetched": t.bytes_fetched,
            "bytes_per_second": round(rate, 1) if rate is not None else None,
            "eta_seconds": round(eta, 1) if (eta := eta_seconds(t.bytes_total - t.bytes_done, rate)) is not None else None,
            "started_at": iso(warm.started), "elapsed_seconds": round(elapsed, 2), "refetched": list(t.refetched[:20]),
        }

    # --- registration ----------------------------------------------------------------------------

    async def _open(self, row: dict[str, Any]) -> Source:
        ref = parse_source(row["source"])
        access = s3_access(row, self._config.models.credentials, self._vault.open) if ref.kind == "s3" else None
        return await self._io(open_source, ref, access, self._config.models.parallel, self._config.server.state_dir)

    async def register(self, spec: ModelSpec, origin: str = "api") -> ModelRow:
        """List the source, read its definition files, and record the model; with `warm`, start the warm.
        Nothing is left behind when any step is refused."""
        name = spec.name
        if await self._store.models.get(name) is not None:
            raise ApplianceError(f"model {name!r} already exists", status=409, code="model_exists", param="name")
        stated = spec.model_dump(mode="json", exclude_unset=True)
        source = await self._open(spec.model_dump())
        folder = self.root / name
        claimed = False
        try:
            listing = await self._io(source.list)
            size = total_size(listing)
            if spec.warm:
                await self._check_room(name, size, 0)
            revision = spec.revision or revision_of(listing)
            await self._io(claim_folder, folder)
            claimed = True
            learnt = await self._io(fetch_definitions, source, listing, folder)
            manifest = [learnt.get(e.path, e).to_json() for e in listing]
            row = {
                "name": name, "revision": revision, "source": spec.source, "endpoint_url": spec.endpoint_url, "region": spec.region,
                "credentials": spec.credentials, "origin": origin, "spec": stated, "local_path": str(self._paths(name, revision)[0]),
                "size": size, "files": len(listing), "manifest": manifest, "state": ModelState.REGISTERED.value, "progress": {},
            }
            created = await self._store.models.create(
                row, f"model {name} registered from {spec.source}: {len(listing)} files, {size_text(size)}, revision {revision}",
                {"source": spec.source, "revision": revision, "size": size, "files": len(listing), "origin": origin},
            )
        except SourceBroken as exc:
            if claimed:
                await self._io(remove_folder, folder)
            raise ApplianceError(f"reading {spec.source} failed: {exc}", status=422, code="source_unreadable", param="source") from None
        except BaseException:
            if claimed:
                await self._io(remove_folder, folder)
            raise
        finally:
            await self._io(source.close)
        if not spec.warm:
            return created
        try:
            return await self.warm(name)
        except ApplianceError:  # the disk filled up since the check: the registration is taken back
            await self._store.models.delete(name, f"model {name} deleted: its warm could not start")
            await self._io(remove_folder, folder)
            raise

    # --- warms -----------------------------------------------------------------------------------

    async def _check_room(self, name: str, size: int, present: int) -> list[str]:
        """The models to evict so that `name` fits; a 409 when it cannot fit (nothing is evicted then)."""
        settings = self._config.models
        chosen: list[str] = []
        freed = 0
        if settings.cache_max_bytes is not None:
            rows, used = await self._store.models.list(), await self._store.models.in_use()
            cached = [
                Cached(r["name"], _on_disk(r), r["last_used_at"] or "", r["name"] in used, evictable=r["state"] == _READY and r["name"] not in self._warms)
                for r in rows if r["name"] != name and _on_disk(r) > 0
            ]
            choice = choose_evictions(cached, size, settings.cache_max_bytes)
            if choice is None:
                held = sum(c.size for c in cached if c.in_use or not c.evictable)
                raise ApplianceError(
                    f"model {name} ({size_text(size)}) does not fit in the model cache ([models] cache_max_bytes = {size_text(settings.cache_max_bytes)}): "
                    f"{size_text(held)} of it is held by models in use or warming; nothing was evicted",
                    status=409, code="cache_full",
                )
            chosen = choice
            freed = sum(c.size for c in cached if c.name in chosen)
        need = max(0, size - present)
        free = (await self._io(shutil.disk_usage, _existing(self.root))).free
        if free + freed - need < settings.min_free_bytes:
            raise ApplianceError(
                f"insufficient storage for model {name}: it needs {size_text(need)} more on the disk of {self.root}, which has {size_text(free)} free "
                f"and must keep {size_text(settings.min_free_bytes)} free ([models] min_free_bytes); free some space or delete models",
                status=409, code="insufficient_storage",
            )
        return chosen

    async def warm(self, name: str) -> ModelRow:
        """Start copying the model to local disk (or verifying a READY copy, fetching again what does not match).
        Returns at once; a warm already running is left as it is (the caller is told the model is WARMING)."""
        row = await self.get(name)
        if name in self._warms:
            return row
        async with self._room:
            # Checked again, and claimed, under the lock that every warm takes: two callers (the models.demand job
            # and POST …/warm) that both passed the check above must not run two copies into the same partial files.
            row = await self.get(name)
            if name in self._warms:
                return row
            final, staging, partial = self._paths(name, row["revision"])
            verifying = row["state"] == _READY and await self._io(final.is_dir)
            target = final if verifying else staging
            present = row["size"] if verifying else await self._io(bytes_present, [staging, partial])
            for victim in await self._check_room(name, row["size"], present):
                await self._evict(victim, name)
            warm = self._warms[name] = Warm(name, self._clock(), Tally(bytes_total=row["size"], files_total=row["files"]))
            try:
                what = "verifying its local copy" if verifying else f"copying {size_text(row['size'] - present)} from {row['source']}"
                row = await self._store.models.update(
                    name, {"state": _WARMING, "last_error": "", "progress": self._progress(warm)}, "model.warming", f"model {name} warming: {what}",
                    {"verify": verifying, "present": present},
                )
            except BaseException:
                self._warms.pop(name, None)
                raise
        warm.task = asyncio.create_task(self._run(row, warm, Layout(target, partial), publish_to=None if verifying else final), name=f"warm-{name}")
        return row

    async def _run(self, row: ModelRow, warm: Warm, layout: Layout, publish_to: Path | None) -> None:
        name = row["name"]
        manifest = [FileEntry.of(e) for e in row["manifest"]]
        saver = asyncio.create_task(self._save_loop(warm, manifest), name=f"warm-progress-{name}")
        source: Source | None = None
        try:
            source = await self._open(row)
            listing = await self._io(source.list)
            if diff := compare(manifest, listing):
                raise ApplianceError(f"the source changed since model {name} was registered ({diff.describe()}): register it again", status=409, code="source_changed")
            if publish_to is not None:
                await self._io(seed_definitions, self.root / name, layout.target, manifest)
            copy = functools.partial(
                copy_files, source, manifest, layout, parallel=self._config.models.parallel, cancel=warm.cancel, tally=warm.tally, learnt=warm.learn
            )
            full = await asyncio.get_running_loop().run_in_executor(self._copies, copy)
            if publish_to is not None:
                await self._io(publish, layout.target, publish_to, layout.partial)
            else:
                await self._io(shutil.rmtree, layout.partial, True)
            await self._ready(row, warm, full)
        except Cancelled:  # a stop or a delete: the row stays WARMING and the next start resumes it
            await self._store.models.save_progress(name, self._progress(warm), _with(manifest, warm.learnt))
        except SourceBroken as exc:
            await self._fail(name, f"reading the source failed {RETRIES + 1} times in a row: {exc}", warm, manifest)
        except ApplianceError as exc:
            await self._fail(name, exc.message, warm, manifest)
        except Exception as exc:  # a bug must not leave the model WARMING for ever
            log.exception("warm of model %s failed", name)
            await self._fail(name, f"internal error: {exc}", warm, manifest)
        finally:
            saver.cancel()
            await asyncio.gather(saver, return_exceptions=True)
            if source is not None:
                await self._io(source.close)
            self._warms.pop(name, None)

    async def _save_loop(self, warm: Warm, manifest: list[FileEntry]) -> None:
        saved = 0
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            warm.meter.add(self._clock(), warm.tally.bytes_done)
            learnt = len(warm.learnt)
            await self._store.models.save_progress(warm.name, self._progress(warm), _with(manifest, warm.learnt) if learnt != saved else None)
            saved = learnt

    async def _ready(self, row: ModelRow, warm: Warm, full: list[FileEntry]) -> None:
        name, t = row["name"], warm.tally
        progress = self._progress(warm, finished=True)
        now = iso(self._clock())
        again = f", {len(t.refetched)} file(s) fetched again after a failed check" if t.refetched else ""
        await self._store.models.update(
            name, {"state": _READY, "manifest": [e.to_json() for e in full], "progress": progress, "ready_at": now, "last_used_at": now, "last_error": ""},
            "model.ready", f"model {name} ready at {row['local_path']}: {size_text(row['size'])} in {row['files']} files, "
            f"{size_text(t.bytes_fetched)} fetched in {progress['elapsed_seconds']:.1f} s{again}",
            {"bytes_fetched": t.bytes_fetched, "seconds": progress["elapsed_seconds"], "refetched": list(t.refetched)},
        )
        if self.on_ready is not None:
            await self.on_ready(name)

    async def _fail(self, name: str, message: str, warm: Warm | None = None, manifest: list[FileEntry] | None = None) -> None:
        changes: dict[str, Any] = {"state": _FAILED, "last_error": message}
        if warm is not None:
            changes["progress"] = self._progress(warm)
            if manifest is not None:
                changes["manifest"] = _with(manifest, warm.learnt)
        try:
            await self._store.models.update(name, changes, "model.failed", f"model {name} failed: {message}", {"error": message})
        except ApplianceError as exc:
            if exc.code != "model_not_found":  # deleted meanwhile: nothing to record
                raise

    async def _evict(self, name: str, for_: str) -> None:
        row = await self.get(name)
        await self._io(shutil.rmtree, row["local_path"], True)
        await self._store.models.update(
            name, {"state": ModelState.EVICTED.value}, "model.evicted",
            f"model {name} evicted to make room for {for_} ({size_text(row['size'])}; last used {row['last_used_at'] or 'never'})",
            {"for": for_, "size": row["size"]},
        )

    async def delete(self, name: str) -> None:
        """Forget a model and remove its files; refused (409) while an endpoint serves it."""
        await self.get(name)
        users = await self._store.models.users(name)
        if users:
            raise ApplianceError(f"model {name!r} is used by endpoint(s) {', '.join(users)}: delete them or point them elsewhere first", status=409, code="model_in_use", param="name")
        warm = self._warms.get(name)
        if warm is not None and warm.task is not None:
            warm.cancel.set()
            await asyncio.gather(warm.task, return_exceptions=True)
        await self._store.models.delete(name, f"model {name} deleted")
        await self._io(remove_folder, self.root / name)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume the warms a stop or a crash interrupted; a READY model whose copy is gone is EVICTED."""
        for row in await self._store.models.list():
            if row["state"] == _WARMING:
                await self.warm_or_fail(row["name"])
            elif row["state"] == _READY and not await self._io(Path(row["local_path"]).is_dir):
                await self._store.models.update(row["name"], {"state": ModelState.EVICTED.value}, "model.evicted", f"model {row['name']}: its local copy is gone")

    async def warm_or_fail(self, name: str) -> None:
        """A warm nobody waits on (a restart, the config, an endpoint's need): a refusal makes the model FAILED."""
        try:
            await self.warm(name)
        except ApplianceError as exc:
            await self._fail(name, exc.message)

    async def warm_wanted(self) -> None:
        """A job: models that endpoints serve but that are not on disk (registered only, evicted, or lost) are warmed."""
        used = await self._store.models.in_use()
        for row in await self._store.models.list():
            if row["name"] not in used or row["name"] in self._warms:
                continue
            state = row["state"]
            if state in (ModelState.REGISTERED.value, ModelState.EVICTED.value) or (state == _READY and not await self._io(Path(row["local_path"]).is_dir)):
                await self.warm_or_fail(row["name"])

    async def stop(self) -> None:
        """Stop every warm at its next chunk; partial files stay and are finished at the next start."""
        warms = list(self._warms.values())
        for warm in warms:
            warm.cancel.set()
        await asyncio.gather(*(w.task for w in warms if w.task is not None), return_exceptions=True)
        self._copies.shutdown(wait=False)


def _on_disk(row: ModelRow) -> int:
    """Bytes a model holds (or is about to hold) in the cache."""
    if row["state"] in (_READY, _WARMING):
        return int(row["size"])
    return int((row.get("progress") or {}).get("bytes_done", 0)) if row["state"] == _FAILED else 0


def _with(manifest: list[FileEntry], learnt: dict[str, str]) -> list[dict[str, Any]]:
    return [{**e.to_json(), "sha256": learnt.get(e.path, e.sha256)} for e in manifest]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
