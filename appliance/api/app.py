"""make_app: the one aiohttp application, wired from one Config."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from appliance.api import console
from appliance.api.inference import gateway
from appliance.api.manage import access, admin, models, oauth, residency, scaling, validate
from appliance.api.inference.gateway import GATEWAY, Gateway
from appliance.api.http import BODY_TIMEOUT, MAX_BODY, TELEMETRY, Handler, Route, add_routes, error_middleware, error_response, json_response, request_id
from appliance.api.openapi import build_openapi
from appliance.api.rpc.front import GrpcFront
from appliance.api.services import SERVICES, Services
from appliance.api.manage.views import Health
from appliance.config import Config
from appliance.control.scaling.autoscaler import Autoscaler
from appliance.control.host.cgroups import open_isolation
from appliance.control.host.cpu_share import YieldingLauncher
from appliance.control.endpoints import EndpointService
from appliance.control.host.gpus import GpuMonitor
from appliance.control.host.identity import worker_identity
from appliance.control.supervision.load import Load
from appliance.control.host.process import Launcher, ProcessLauncher
from appliance.control.ops.retention import Retention
from appliance.control.scaling.signals import Signals
from appliance.control.supervision.residency import memory_books
from appliance.control.ray.backend import RayBackend, require_ray
from appliance.control.supervision.backend import ReplicaBackend
from appliance.control.supervision.supervisor import Supervisor
from appliance.control.telemetry import EXPOSITION_TYPE, Live, Telemetry
from appliance.domain.placement import visible
from appliance.errors import ApplianceError
from appliance.security.auth import Authenticator, TokenSigner, bootstrap_admin_key
from appliance.security.usage import Accounting
from appliance.security.vault import Vault
from appliance.store import Clock, Store, iso

log = logging.getLogger(__name__)

STARTUP_TASK = web.AppKey("startup_task", asyncio.Task)
METRICS = web.AppKey("metrics", Signals)
AUTOSCALER = web.AppKey("autoscaler", Autoscaler)
GRPC = web.AppKey("grpc", GrpcFront)  # present when [grpc] port is set
HELD_RETRY_SECONDS = 2.0  # how often writes held while the disk was full are retried


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer (and whether the disk takes the state's writes)."""
    return json_response(Health(status="ok", detail=_storage_detail(request.app[SERVICES].store)))


def _storage_detail(store: Store) -> str:
    if store.full_since is None:
        return ""
    return f"the state database cannot be written since {iso(store.full_since)} (disk full); {store.held} writes held in memory until space returns"


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store is open and startup reconciliation ran."""
    readiness = request.app[SERVICES].readiness
    if readiness.ready:  # still serving when the disk is full: inference needs no writes
        return json_response(Health(status="ok", detail=_storage_detail(request.app[SERVICES].store)))
    if readiness.failure:
        return json_response(Health(status="failed", detail=readiness.failure), status=503)
    return json_response(Health(status="starting", detail="opening the store and reconciling endpoints"), status=503)


async def metrics(request: web.Request) -> web.Response:
    """The appliance's own metrics in Prometheus text format; a key with the read scope unless [metrics] public."""
    services = request.app[SERVICES]
    if not services.config.metrics.public:
        await services.auth.authenticate(request, "read")
    supervisor, gateway = services.supervisor, request.app[GATEWAY]
    names = supervisor.endpoint_names()
    try:
        gpus = await services.gpus.inventory()  # NVML, off the loop and cached for a second
    except ApplianceError:
        gpus = []  # no NVML on this box: no GPU series
    live = Live(
        replicas={n: supervisor.counts(n) for n in names},
        inflight={n: services.load.total(n) for n in names},
        queued={n: gateway.queue_length(n) for n in names},
        gpus=gpus,
        held=supervisor.held(),
        replica_endpoint={r.id: n for n in names for r in supervisor.replicas(n)},
    )
    live.claims, live.budgets = memory_books(
        live.held, supervisor.ledger.host_claims(), visible(gpus, services.config.gpus.devices), services.config.gpus.memory_reserve,
        services.config.residency.host_memory_budget,
    )
    return web.Response(body=request.app[TELEMETRY].exposition(live), headers={"Content-Type": EXPOSITION_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi(all_routes()))


def all_routes() -> list[Route]:
    return [
        Route("GET", "/healthz", healthz, "Liveness", response=Health, auth=False, tags=("system",)),
        Route("GET", "/readyz", readyz, "Readiness (503 until startup reconciliation ran)", response=Health, auth=False, tags=("system",)),
        Route("GET", f"{admin.PREFIX}/openapi.json", openapi, "This document", auth=False, tags=("system",)),
        Route("GET", "/metrics", metrics, "Prometheus metrics of the appliance (a read key unless [metrics] public)", auth=False, tags=("system",)),
        *validate.ROUTES,  # before admin's {name} routes
        *admin.ROUTES,
        *scaling.ROUTES,
        *residency.ROUTES,
        *models.ROUTES,
        *access.ROUTES,
        *oauth.ROUTES,
        *console.ROUTES,
    ]


def admin_only(route: Route) -> Handler:
    """Admin routes answer only when ready, and only to a caller with the route's scope."""
    handler, scope = route.handler, route.required_scope

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES]
        if not services.readiness.ready:
            detail = services.readiness.failure or "the appliance is starting"
            return error_response(ApplianceError(f"not ready: {detail}", status=503, code="not_ready", headers={"Retry-After": "1"}))
        await services.auth.authenticate(request, scope)
        return await handler(request)

    return guarded


async def _startup(app: web.Application) -> None:
    services = app[SERVICES]
    config = services.config
    try:
        await bootstrap_admin_key(services.store, config.admin_key_path)
        await services.auth.reload()
        services.jobs.every("auth.reload", config.auth.reload_seconds, services.auth.reload)
        services.jobs.every("usage.flush", config.auth.usage_flush_seconds, services.accounting.flush)
        services.jobs.every("store.held", HELD_RETRY_SECONDS, services.store.write_held)
        retention = Retention(config.retention, services.store, services.clock, config.log_dir, services.supervisor.live_logs)
        services.jobs.every("retention.prune", config.retention.interval_seconds, retention.prune)
        services.jobs.start()
        problems = await models.start_models(app)  # first: declared endpoints may name declared models
        problems += await services.endpoints.apply_declared(list(config.endpoints))
        problems += await models.prune_models(app, config)
        await app[GATEWAY].start()
        await services.supervisor.start()  # stops orphans of an earlier run, then reconciles
        services.jobs.every("autoscale", config.autoscaling.interval_seconds, app[AUTOSCALER].evaluate)
        await services.store.events.add(
            "server.started",
            f"appliance started on {config.server.host}:{config.server.port}",
            details={"config": str(config.source) if config.source else None, "declared_problems": problems},
        )
        services.readiness.ready = True
    except Exception as exc:  # readiness says why; the process stays up for /healthz and the log
        log.exception("startup reconciliation failed")
        services.readiness.failure = str(exc)


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request_id(request)
    if rid:
        response.headers["X-Request-ID"] = rid


async def reload_declared(app: web.Application, config: Config) -> list[str]:
    """A reloaded config file's declared endpoints applied (SIGHUP); returns the problems met."""
    services = app[SERVICES]
    problems = await models.reload_models(app, config)
    problems += await services.endpoints.apply_declared(list(config.endpoints))
    problems += await models.prune_models(app, config)
    await services.supervisor.sync()
    return problems


async def _drain_clients(app: web.Application) -> None:
    """On SIGTERM, before aiohttp closes connections: log followers end at once, requests in flight
    get server.shutdown_timeout_seconds to finish, then open streams are ended cleanly. Workers are
    stopped after this (the cleanup below), so the whole stop takes that timeout plus the workers' grace."""
    services = app[SERVICES]
    services.supervisor.end_followers()
    grace = services.config.server.shutdown_timeout_seconds
    grpc = [app[GRPC].stop(grace)] if GRPC in app else []
    await asyncio.gather(app[GATEWAY].drain(grace), *grpc)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    await services.store.open()  # before listening: a broken database must fail the start
    models.attach_models(app)
    if GRPC in app:
        await app[GRPC].start()  # a port another program holds fails the start, as the HTTP port does
    app[STARTUP_TASK] = asyncio.create_task(_startup(app))
    yield
    task = app[STARTUP_TASK]
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    services.jobs.stop()  # no scaling decision while everything stops
    await models.stop_models(app)  # warms stop at their next chunk and resume at the next start
    running = services.supervisor.replica_count()
    if running:
        log.info("stopping: %d replicas drain and stop (grace %g s)", running, services.config.workers.stop_grace_seconds)
    await services.supervisor.stop()  # every worker drains and stops before the appliance does
    if running:
        log.info("stopping: workers stopped")
    await app[GATEWAY].stop()
    if GRPC in app:
        await app[GRPC].stop(0)  # already drained at shutdown; this ends it when the app was never shut down
    await app[METRICS].stop()
    if services.store.is_open:
        await services.accounting.flush()
        await services.store.events.add("server.stopped", "appliance stopped")
    await services.store.close()


def make_app(
    config: Config, *, clock: Clock = time.time, gpus: GpuMonitor | None = None, launcher: Launcher | None = None,
    backend: ReplicaBackend | None = None,
) -> web.Application:
    """The whole appliance as one aiohttp application. `launcher` starts replica workers (tests run
    them in-process); `backend`, every effect on workers (tests give a fake one: no process at all);
    `gpus` reads the inventory (tests give a fixed one)."""
    store = Store(config.db_path, clock)
    gpus = gpus or GpuMonitor()
    vault = Vault(config.secret_key_path)
    accounting = Accounting(store, clock, config.auth.auth_failure_events_per_minute)
    auth = Authenticator(store, clock, TokenSigner(config.jwt_key_path), on_failure=accounting.auth_failure)
    load = Load(clock)
    isolation = open_isolation(config.workers.isolation, config.server.state_dir)
    identity = worker_identity(config.workers.user, config.server.state_dir)
    if identity is not None and config.server.state_dir.is_dir():
        # workers pass through to their own work dirs (which they own); every other file stays 0600
        for path in (config.server.state_dir, config.server.state_dir / "replicas"):
            path.mkdir(mode=0o711, exist_ok=True)
            path.chmod(0o711)
    telemetry = Telemetry()
    if backend is None and config.backend.kind == "ray":
        require_ray()
        backend = RayBackend(config.backend.address, config.backend.proxy, config.backend.route)
    # Workers yield the CPU to the appliance: an engine filling the cores must not stall its streams.
    launcher = launcher or YieldingLauncher(ProcessLauncher(isolation, identity), nice=config.workers.nice)
    supervisor = Supervisor(
        config, store, clock, gpus.inventory, unseal=vault.open_all, load=load, launcher=launcher, isolation=isolation, identity=identity,
        telemetry=telemetry, backend=backend,
    )
    services = Services(
        config=config,
        clock=clock,
        store=store,
        endpoints=EndpointService(store, on_change=supervisor.sync, vault=vault, on_delete=functools.partial(auth.reload, force=True)),
        auth=auth,
        gpus=gpus,
        supervisor=supervisor,
        vault=vault,
        accounting=accounting,
        load=load,
    )
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[error_middleware])
    app[SERVICES] = services
    app[MAX_BODY] = config.server.max_body_bytes
    app[BODY_TIMEOUT] = config.server.body_timeout_seconds
    app[GATEWAY] = Gateway(services, telemetry)
    app[METRICS] = Signals(
        supervisor, app[GATEWAY], load, gpus.inventory,
        scrape_timeout=config.autoscaling.scrape_timeout_seconds, history_seconds=config.autoscaling.history_seconds,
    )
    app[AUTOSCALER] = Autoscaler(store, supervisor, app[METRICS], load, clock, telemetry)
    app[TELEMETRY] = telemetry
    if config.grpc.port is not None:
        app[GRPC] = GrpcFront(services, app[GATEWAY], telemetry)
    add_routes(app, all_routes(), guard=admin_only)
    add_routes(app, gateway.ROUTES)
    app.on_response_prepare.append(_stamp_request_id)
    app.on_shutdown.append(_drain_clients)
    app.cleanup_ctx.append(_lifecycle)
    return app
