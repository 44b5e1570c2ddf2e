"""What `appliance serve` tells its service manager, and what it takes from it: systemd's notify
protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) and SIGHUP to reload the config file.

The protocol is one datagram of `KEY=VALUE` lines to the socket in $NOTIFY_SOCKET; it is written
here in a few lines rather than through sdnotify or systemd-python (a C extension that needs
libsystemd headers to build), so the appliance installs anywhere and behaves the same without systemd."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from pathlib import Path

from aiohttp import web

from appliance.api.app import reload_declared
from appliance.api.services import SERVICES
from appliance.config import Config, load_config
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
GC_YOUNG_THRESHOLD = 10_000
STATUS_SECONDS = 5.0


def sd_notify(message: str) -> bool:
    """Send `message` to systemd; False when not started by systemd (or the socket refused it)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)
        return False


def status_line(app: web.Application) -> str:
    """e.g. '3 endpoints, 4/5 replicas healthy' (desired replicas), for STATUS= and `systemctl status`."""
    supervisor = app[SERVICES].supervisor
    table = supervisor.table
    healthy = sum(len(replicas) for replicas in table.routable.values())
    desired = sum(table.desired.values())
    failing = sorted(name for name, status in table.statuses.items() if status == "ERROR")
    line = f"{len(table.endpoints)} endpoints, {healthy}/{desired} replicas healthy"
    return line + (f"; in ERROR: {', '.join(failing)}" if failing else "")


async def started(app: web.Application) -> None:
    """Returns once startup reconciliation has run, whether or not it succeeded."""
    readiness = app[SERVICES].readiness
    while not readiness.ready and not readiness.failure:
        await asyncio.sleep(0.05)


async def tell_systemd(app: web.Application, *, freeze_heap: bool) -> None:
    """READY=1 once the store is open and declared endpoints are reconciled, then STATUS= whenever it
    changes and WATCHDOG=1 at half the interval systemd asks for, from the event loop itself: a loop
    that hangs stops the pings, and systemd restarts the appliance."""
    readiness = app[SERVICES].readiness
    await started(app)
    if freeze_heap:
        # Everything loaded at start lives as long as the process: keep it out of every garbage
        # collection, so a burst of requests does not pay for scanning it (tail latency).
        gc.collect()
        gc.freeze()
        # Request state is short-lived and freed by reference counting; with the default threshold
        # (700) the collector ran every few requests and took about 5% of the gateway's CPU time
        # (measured in a fixed workload: 527 young collections and about 360 ms, against 16 and 40 ms).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # READY=1 either way: the process stays up after a failed start (for /healthz, /readyz and the log),
    # and systemd would otherwise kill it at TimeoutStartSec; STATUS says what failed.
    status = status_line(app) if readiness.ready else f"startup failed: {readiness.failure}"
    sd_notify(f"READY=1\nSTATUS={status}")
    watchdog = _watchdog_interval()
    every = min(STATUS_SECONDS, watchdog / 2) if watchdog else STATUS_SECONDS
    while True:
        await asyncio.sleep(every)
        lines = ["WATCHDOG=1"] if watchdog else []
        if readiness.ready and (now := status_line(app)) != status:
            status = now
            lines.append(f"STATUS={status}")
        if lines:
            sd_notify("\n".join(lines))


def _watchdog_interval() -> float | None:
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


class Reloader:
    """SIGHUP: read the config file again. Declared endpoints (and their rules) are reconciled, replicas
    whose spec did not change go on running; an invalid file is refused with its problems, and the
    running config kept. Other sections take effect at the next restart, and the log says which."""

    def __init__(self, app: web.Application, config: Config) -> None:
        self._app = app
        self._config = config
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()  # held until done: the loop keeps only weak references

    def request(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The running config stays as it was; the appliance goes on serving it.
            log.error("reload failed, the running config is kept: %s", exc, exc_info=exc)

    async def close(self) -> None:
        """End a reload still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self) -> bool:
        await started(self._app)  # a SIGHUP during startup waits for it: never two reconciliations at once
        async with self._lock:
            # compared with the config the process started with: the sections a reload does not
            # apply are still running as they were then
            path = self._config.source
            if path is None:
                log.warning("reload: the appliance was not started from a config file; nothing to reload")
                return False
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                try:
                    new = await asyncio.to_thread(load_config, Path(path))
                except ApplianceError as exc:
                    problems = exc.problems or [exc.message]
                    log.error("reload: %s is not valid, the running config is kept: %s", path, "; ".join(problems))
                    return False
                # declared endpoints, their rules and the model registry's declared models are applied now
                later = [name for name in type(new).model_fields if name not in ("endpoints", "models", "source") and getattr(new, name) != getattr(self._config, name)]
                if later:
                    log.warning("reload: [%s] changed: takes effect at the next restart", "], [".join(later))
                problems = await reload_declared(self._app, new)
                log.info("reload: %s applied: %d declared endpoint(s)%s", path, len(new.endpoints),
                         f", {len(problems)} not applied (see above)" if problems else "")
                return True
            finally:
                sd_notify("READY=1\nSTATUS=" + status_line(self._app))
