"""A Ray Serve deployment whose replica runs one of the appliance's workers on its node: the same
runtimes, Backend.AI model definitions, pre-start actions, templates and environment as on one box
(control/supervision/prepare.py), probed with Backend.AI's semantics and relayed to as bytes.

Imported on the cluster's nodes through `serve_export.IMPORT_PATH`; the appliance must be installed
in the nodes' Python environment. Ray ends each replica's process group when the replica ends, so the
worker stays in that group (never a session of its own, which would outlive even `ray stop`), and
its own stop ends its tree by pid, never the actor's group."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from appliance.control.host.process import resolve_executable
from appliance.control.host.replica_log import ReplicaLog
from appliance.control.ray.stats import ReplicaStats
from appliance.control.supervision.prepare import prepare_worker, read_definition
from appliance.control.supervision.probe import probe
from appliance.domain.health import Health, HealthState, due_for_replacement, observe
from appliance.domain.runtimes import Placement
from appliance.domain.serve_export import WORKER_PATH
from appliance.domain.specs import EndpointConfig
from appliance.errors import ApplianceError
from appliance.security.vault import SEALED

log = logging.getLogger("ray.serve")
SECRET_KEY_ENV = "APPLIANCE_SECRET_KEY"  # the Fernet key sealed environ values open with (the appliance's state_dir/secret.key)
_GRACE = 10.0  # seconds a stopped worker's tree gets before SIGKILL
_READY_POLL = 0.1
_LOG_BYTES, _LOG_BACKUPS = 10 << 20, 2
# The hop-by-hop headers, and what the proxy sets itself, are not relayed.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers", "transfer-encoding", "upgrade",
                  "host", "content-length"})
_PROXY_OWN = frozenset({"date", "server"})  # Serve's proxy (uvicorn) writes its own


@serve.deployment
class Worker:
    async def __init__(self, endpoint: dict[str, Any], stats: list[list[Any]] | None = None, listen: str | None = None) -> None:
        self._config = config = EndpointConfig.model_validate(endpoint)
        # "node": the worker listens on the node's address, and says it at WORKER_PATH, for a gateway that calls it directly
        self._says_address = listen == "node"
        self._host = ray.util.get_node_ip_address() if self._says_address else "127.0.0.1"
        self._stats = ReplicaStats(stats or [], config.resources.mem)
        self._work = Path(tempfile.mkdtemp(prefix=f"appliance-{config.name}-"))
        self._log = ReplicaLog(self._work / "worker.log", _LOG_BYTES, _LOG_BACKUPS)
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        try:
            await self._start(config)
        except BaseException:
            await self.__del__()  # Serve retries the replica: nothing of this attempt is left behind
            raise

    async def _start(self, config: EndpointConfig) -> None:
        port = _free_port(self._host)
        replica = serve.get_replica_context().replica_id.unique_id
        placement = Placement(port=port, host=self._host, replica_id=f"{config.name}-{replica}", work_dir=str(self._work),
                              gpu_share=config.resources.gpu_share, runtime_path=sys.executable)
        definition = await read_definition(config)
        spec, env = await prepare_worker(
            config, definition, placement, work_dir=self._work, device_env=_devices(), secrets=_open(config.secret_environ), sink=self._log, grace=_GRACE,
        )
        self._check = spec.health_check
        self._url = f"http://{self._host}:{spec.port}"
        argv = [resolve_executable(spec.argv[0]), *spec.argv[1:]]
        out = open(self._work / "worker.out", "ab")  # noqa: SIM115  (the child holds it; closed with the worker)
        try:
            # No new session: Ray's end of this replica's process group takes the worker with it; and the kernel ends
            # the worker when the replica dies without Ray (`ray stop --force` kills the raylet that would end the group).
            self._proc = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=spec.cwd or str(self._work), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=functools.partial(_die_with, os.getpid()),
            )
        finally:
            out.close()
        log.info("appliance worker of %s: pid %s on port %s", config.name, self._proc.pid, port)
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._health = HealthState(spawned_at=asyncio.get_running_loop().time())
        await self._until_ready()

    async def _until_ready(self) -> None:
        """Serve has no start timeout of its own: the worker gets Backend.AI's initial_delay to pass a probe."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._check.initial_delay + self._check.interval * max(1, self._check.max_retries)
        detail = ""
        while loop.time() < deadline:
            if self._proc is not None and self._proc.returncode is not None:
                raise RuntimeError(f"worker of {self._config.name} exited with code {self._proc.returncode} before it was ready: {self._tail()}")
            assert self._session is not None
            passed, detail = await probe(self._session, self._url, self._check)
            if passed:
                self._health = observe(self._health, self._check, passed=True, detail=detail, now=loop.time())
                return
            await asyncio.sleep(_READY_POLL)
        raise RuntimeError(f"worker of {self._config.name} not ready within {deadline - self._health.spawned_at:.0f}s: {detail}")

    async def check_health(self) -> None:
        """One probe per Serve health check, counted as Backend.AI counts them (max_retries failures in a
        row make it unhealthy; Serve then replaces it after its own three failed checks)."""
        if self._proc is None or self._proc.returncode is not None:
            raise RuntimeError(f"worker exited with code {self._proc.returncode if self._proc else None}: {self._tail()}")
        now = asyncio.get_running_loop().time()
        assert self._session is not None
        passed, detail = await probe(self._session, self._url, self._check)
        self._health = observe(self._health, self._check, passed=passed, detail=detail, now=now)
        if self._health.status is Health.UNHEALTHY or due_for_replacement(self._health, self._config.unhealthy_replace_after, now):
            raise RuntimeError(f"{self._health.consecutive_failures} failed probes in a row: {detail}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the endpoint's rules need, for the appliance's Serve policy (policy.py)."""
        assert self._session is not None
        return await self._stats.sample(self._proc.pid if self._proc else None, self._session, self._url)

    async def __call__(self, request: Request) -> Response:
        began = self._stats.started()
        try:
            response = await self._relay(request, began)
        except BaseException:
            self._stats.finished(began, None, ok=False)
            raise
        if not isinstance(response, StreamingResponse):
            self._stats.finished(began, time.monotonic(), ok=response.status_code < 400)
        return response

    async def _relay(self, request: Request, began: float) -> Response:
        """The request relayed as bytes: path below the route prefix, query, headers and body as sent; the
        answer streamed back chunk by chunk. A client that leaves cancels this, which closes the worker's answer."""
        root = request.scope.get("root_path", "")
        path = request.url.path[len(root):] if root and request.url.path.startswith(root) else request.url.path
        if path == WORKER_PATH and self._says_address:
            return Response(json.dumps({"url": self._url}), media_type="application/json")
        target = self._url + (path or "/") + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        body = await request.body()
        assert self._session is not None
        try:
            upstream = await self._session.request(request.method, target, data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = {"message": f"the worker of {self._config.name} could not be reached: {exc.__class__.__name__}", "type": "upstream_error",
                     "code": "worker_unreachable"}
            return Response(json.dumps({"error": error}), status_code=502, media_type="application/json")
        answer = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP and k.lower() not in _PROXY_OWN}
        if upstream.content_length is not None and "text/event-stream" not in upstream.headers.get("Content-Type", ""):
            try:
                return Response(await upstream.read(), status_code=upstream.status, headers=answer)
            finally:
                upstream.release()
        return _Relayed(upstream, lambda first, done: self._stats.finished(began, first, ok=done and upstream.status < 400), status_code=upstream.status,
                        headers=answer)

    async def __del__(self) -> None:
        """Serve's graceful end of the replica: the worker's whole tree, by pid."""
        if self._proc is not None and self._proc.returncode is None:
            await _end_tree(self._proc, _GRACE)
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._log.close()
        shutil.rmtree(self._work, ignore_errors=True)

    def _tail(self) -> str:
        try:
            return (self._work / "worker.out").read_bytes()[-1500:].decode(errors="replace")
        except OSError:
            return ""




class _Relayed(StreamingResponse):
    """The worker's answer streamed chunk by chunk; `ended(first byte at, complete)` is called once however it
    ends, even when the client left before the first chunk (then the body is never iterated)."""

    def __init__(self, upstream: aiohttp.ClientResponse, ended: Callable[[float | None, bool], None], **kw: Any) -> None:
        self._upstream, self._ended = upstream, ended
        self._first: float | None = None
        self._done = False
        super().__init__(self._chunks(), **kw)

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._upstream.content.iter_any():
            self._first = self._first or time.monotonic()
            yield chunk
        self._done = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._upstream.close()  # cut short (the client left): the worker sees the disconnect and stops generating
            self._ended(self._first, self._done)


def build(args: dict[str, Any]) -> Any:
    """The application builder Serve's config names (`import_path`): `args` carries the endpoint, and the
    figures its autoscaling rules need (source, name, window), which the replica records for the policy."""
    return Worker.bind(args["endpoint"], args.get("stats"), args.get("listen"))


def _die_with(parent: int) -> None:
    """In the child before exec: SIGKILL when the replica's thread that started it ends (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # the replica died before the line above
        os._exit(1)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _devices() -> dict[str, str]:
    """The GPUs Ray gave this replica (CUDA_VISIBLE_DEVICES, set on the actor), handed to its worker."""
    return {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ}


def _open(sealed: dict[str, str]) -> dict[str, str]:
    """Sealed environ values, opened with the key in the node's environment: never in Serve's config in plain."""
    if not sealed:
        return {}
    key = os.environ.get(SECRET_KEY_ENV)
    if not key:
        raise ApplianceError(f"this endpoint has secret environ values: set {SECRET_KEY_ENV} on the cluster's nodes (the appliance's secret.key)",
                             status=500, code="secret_key_missing")
    from cryptography.fernet import Fernet

    box = Fernet(key.encode())
    return {k: box.decrypt(v.removeprefix(SEALED).encode()).decode() for k, v in sealed.items()}


async def _end_tree(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM to the worker's whole tree, the grace, then SIGKILL to what is left. The leader is this
    replica's child and only asyncio reaps it (a reap by psutil would leave asyncio's wait() hanging for
    ever, and Serve's shutdown of the replica with it)."""
    tree = await asyncio.to_thread(_members, proc.pid)
    _send(tree, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace)
    rest = tree[1:]
    left = max(0.0, deadline - asyncio.get_running_loop().time())
    _, alive = await asyncio.to_thread(psutil.wait_procs, rest, left)  # not our children: waiting on them reaps nothing
    _send([*alive, *(tree[:1] if proc.returncode is None else [])], signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 5.0)


def _members(pid: int) -> list[psutil.Process]:
    try:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return []


def _send(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
