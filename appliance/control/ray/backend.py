"""Replicas on a Ray Serve cluster, behind the same seam as local processes (supervision/backend.py):
each replica the supervisor starts is one Serve application of one Serve replica (route prefix
`/replicas/{app}`) that runs the appliance's worker on its node (replica.py). Ray places it (nodes,
GPUs), restarts its actor and checks its health; the appliance keeps everything else: routing per
replica, admission, drain before stop, autoscaling, keys and usage.

Serve is driven through its REST API on the dashboard (`PUT /api/serve/applications/`, as `serve
deploy` does), never a Ray driver in this process: every change puts the whole set of the appliance's
applications, so the cluster's Serve belongs to the appliance (applications it does not know are
deleted, those an earlier run left first of all). One task reads their statuses every second."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from appliance.control.host.process import Slot
from appliance.control.host.replica_log import ReplicaLog
from appliance.control.supervision.backend import ProbeResult
from appliance.control.supervision.prepare import read_definition
from appliance.control.supervision.probe import asleep, probe
from appliance.control.supervision.replica import Replica
from appliance.domain.runtimes import Placement, WorkerSpec, build_worker_spec
from appliance.domain.serve_export import WORKER_PATH, replica_application
from appliance.domain.specs import EndpointConfig, HealthCheck
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
RAY_INSTALL = "pip install 'appliance[ray]' (ray[serve] 2.60)"
_POLL = 1.0  # seconds between reads of the applications' statuses
_CALL = aiohttp.ClientTimeout(total=60)
_GONE_AFTER = 60.0  # an application Serve does not list this long after it was put is lost


class RayWorker:
    """One replica's Serve application, as the runner sees a worker: it ends when Serve gives up on it
    (DEPLOY_FAILED), when it disappears from the cluster, or when stopped (the application deleted)."""

    pid: int | None = None
    cgroup: Path | None = None

    def __init__(self, backend: RayBackend, app: str, sink: ReplicaLog) -> None:
        self.app = app
        self.sink = sink
        self.started_at: float | None = time.time()
        self.put_at = time.monotonic()
        self.seen = False
        self._code: int | None = None
        self._ended = asyncio.Event()
        self._backend = backend

    @property
    def returncode(self) -> int | None:
        return self._code

    def end(self, code: int, why: str | None = None) -> None:
        if self._code is None:
            if why:
                self.sink.note(why)
            self._code = code
            self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        assert self._code is not None
        return self._code

    async def stop(self, grace: float) -> int:
        await self._backend.remove(self.app)
        await self._backend.gone(self.app, grace + 30.0)  # Serve's graceful end: its own drain, then the worker's tree
        self.end(0)
        return self.returncode or 0


class RayBackend:
    def __init__(self, address: str, proxy: str, route: str = "proxy") -> None:
        self._address = address.rstrip("/")
        self._proxy = proxy.rstrip("/")
        self._direct = route == "direct"
        self._routes: dict[str, str] = {}  # replica id → its route on Serve's proxy (where a direct worker says its address)
        split = urlsplit(self._proxy)
        self._http = {"host": split.hostname or "127.0.0.1", "port": split.port or 8000}
        self._apps: dict[str, dict[str, Any]] = {}  # what the cluster should run: application name → its config
        self._workers: dict[str, RayWorker] = {}
        self._statuses: dict[str, dict[str, Any]] = {}
        self._put_lock = asyncio.Lock()
        self._numbers = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # removals of lost applications, held until done
        self.places = True  # Ray places replicas and prepares their workers on its nodes

    async def open(self) -> None:
        self._session = aiohttp.ClientSession()
        try:
            await self._put()  # what an earlier run left is deleted before anything starts
        except ApplianceError as exc:  # the cluster may come later: each start puts again, and says why it cannot
            log.warning("%s", exc.message)
        self._poller = asyncio.create_task(self._poll(), name="ray-serve-status")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._session is not None:
            await self._session.close()

    async def place(self, config: EndpointConfig, r: Replica) -> WorkerSpec:
        """What the runner needs of the worker (its health check, its served name); the argv is built on the node."""
        definition = await read_definition(config)
        return build_worker_spec(config, definition, Placement(port=0, replica_id=r.id, work_dir=str(r.work_dir)))

    async def start(self, argv: tuple[str, ...], *, env: dict[str, str], cwd: Path, sink: ReplicaLog, slot: Slot,
                    replica: Replica | None = None, config: EndpointConfig | None = None) -> RayWorker:
        assert replica is not None and config is not None
        app = f"{replica.id}-{next(self._numbers)}"  # a restart is a new application: a failed one is not put again unchanged
        self._apps[app] = replica_application(config, app, direct=self._direct)
        worker = self._workers[app] = RayWorker(self, app, sink)
        try:
            await self._put()
        except ApplianceError:
            self._apps.pop(app, None)
            self._workers.pop(app, None)
            raise
        replica.address = self._routes[replica.id] = f"{self._proxy}/replicas/{app}"
        sink.note(f"deployed as Serve application {app} ({self._address})")
        return worker

    async def remove(self, app: str) -> None:
        if self._apps.pop(app, None) is not None:
            await self._put()

    async def gone(self, app: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while app in self._statuses and time.monotonic() < deadline:
            await asyncio.sleep(_POLL / 2)

    async def probe(self, r: Replica, check: HealthCheck, deep_model: str | None) -> ProbeResult:
        """Through Serve's proxy, or (route = "direct") at the worker's own address, asked of its replica on the
        proxy until known, and again when the worker stops answering there (Serve may have restarted it elsewhere)."""
        assert self._session is not None
        moved = self._direct and r.address == self._routes.get(r.id) and await self._find_worker(r)
        passed, detail = await probe(self._session, r.url, check, deep_model=deep_model)
        if not passed and self._direct and r.address != self._routes.get(r.id) and await self._find_worker(r):
            moved = True
            passed, detail = await probe(self._session, r.url, check, deep_model=deep_model)
        return ProbeResult(passed, detail, moved=moved)

    async def _find_worker(self, r: Replica) -> bool:
        """The worker's address, from its Serve replica; True when it changed."""
        assert self._session is not None
        route = self._routes.get(r.id)
        if route is None:
            return False
        try:
            async with self._session.get(route + WORKER_PATH, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                url = str((await resp.json()).get("url") or "") if resp.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return False
        if not url.startswith("http://") or url == r.address:
            return False
        r.address = url
        return True

    async def asleep(self, r: Replica) -> bool | None:
        assert self._session is not None
        return await asleep(self._session, r.url)

    async def engine_call(self, r: Replica, path: str) -> str | None:
        return "sleep is not used on Ray: evictions stop the replica"

    def forget(self, r: Replica) -> None:
        r.address = None
        self._routes.pop(r.id, None)

    async def _put(self) -> None:
        """The whole set of the appliance's applications, checked with Ray's schema, to Serve's REST API."""
        assert self._session is not None
        async with self._put_lock:
            document = {"proxy_location": "HeadOnly", "http_options": self._http, "applications": list(self._apps.values())}
            if not validate(document):
                raise ApplianceError(f"the Ray backend needs Ray installed: {RAY_INSTALL}", status=500, code="ray_missing")
            try:
                async with self._session.put(f"{self._address}/api/serve/applications/", json=document, timeout=_CALL) as resp:
                    if resp.status != 200:
                        raise ApplianceError(f"Ray Serve refused the applications: HTTP {resp.status}: {(await resp.text())[:500]}",
                                             status=502, code="ray_refused")
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ApplianceError(f"Ray's dashboard at {self._address} could not be reached: {exc.__class__.__name__}: {exc}",
                                     status=503, code="ray_unreachable") from None

    async def _poll(self) -> None:
        assert self._session is not None
        while True:
            try:
                async with self._session.get(f"{self._address}/api/serve/applications/", timeout=_CALL) as resp:
                    if resp.status == 200:
                        self._statuses = dict((await resp.json()).get("applications") or {})
                        self._judge()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("Ray Serve's status could not be read: %s", exc)
            except Exception:  # noqa: BLE001 -- the poller must outlive one odd answer
                log.exception("reading Ray Serve's status failed")
            await asyncio.sleep(_POLL)

    def _judge(self) -> None:
        now = time.monotonic()
        for app, worker in list(self._workers.items()):
            if worker.returncode is not None:
                self._workers.pop(app, None)
                continue
            status = self._statuses.get(app)
            if status is not None:
                worker.seen = True
                if status.get("status") == "DEPLOY_FAILED":
                    self._lost(app, worker, f"Serve could not start it: {status.get('message', '')[:1500]}")
            elif app in self._apps and (worker.seen or now - worker.put_at > _GONE_AFTER):
                self._lost(app, worker, "its Serve application is gone from the cluster")

    def _lost(self, app: str, worker: RayWorker, why: str) -> None:
        worker.end(1, why)
        self._apps.pop(app, None)
        task = asyncio.create_task(self._put_quietly(), name=f"ray-remove-{app}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put_quietly(self) -> None:
        try:
            await self._put()
        except ApplianceError as exc:
            log.warning("%s", exc.message)


def require_ray() -> None:
    """The one-line refusal of the Ray backend where Ray is not installed."""
    try:
        importlib.import_module("ray.serve.schema")  # what the backend checks every config with
    except ImportError:
        raise ApplianceError(f'[backend] kind = "ray" needs Ray installed: {RAY_INSTALL}', status=500, code="ray_missing") from None


def validate(document: dict[str, Any]) -> bool:
    """Check `document` with Ray's own ServeDeploySchema; False when Ray is not installed here. Raises on a
    config Serve would refuse."""
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return False
    try:
        ServeDeploySchema.model_validate(document)
    except Exception as exc:  # pydantic's error
        raise ApplianceError(f"the Serve config would be refused by Ray: {exc}", status=422, code="ray_refused") from None
    return True
