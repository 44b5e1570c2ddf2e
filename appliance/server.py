"""`appliance serve`: run the application until SIGINT/SIGTERM, then shut down cleanly."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import resource
import signal
from pathlib import Path

from aiohttp import web

from appliance.api.app import GRPC, make_app
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.logs import setup_logging
from appliance.security.tls import server_context
from appliance.service import Reloader, sd_notify, tell_systemd

log = logging.getLogger(__name__)
_STRAGGLERS = 2.0  # seconds
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i" request=%{X-Request-ID}o'
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn



async def run(config: Config) -> None:
    app = make_app(config)
    # handler_cancellation: a client that disconnects cancels its request, and so the worker's generation.
    access = logging.getLogger("appliance.api.manage.access") if config.gateway.access_log else None
    # The app's on_shutdown hook already gave requests shutdown_timeout_seconds and ended the rest; aiohttp's own
    # wait (which it makes twice, around a cancel) only has stragglers left to see out.
    # keepalive_timeout also closes a connection that has not finished sending its headers (slowloris).
    runner = web.AppRunner(
        app, handle_signals=False, access_log=access, handler_cancellation=True, shutdown_timeout=_STRAGGLERS,
        keepalive_timeout=config.server.idle_timeout_seconds, access_log_format=ACCESS_LOG_FORMAT,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(app, config)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    path = config.server_file
    listening = False
    try:
        tls = server_context(config.server.tls_cert, config.server.tls_key) if config.server.tls_cert and config.server.tls_key else None
        # A deep accept queue: a burst of new connections (many clients at once) waits there for the loop
        # rather than being dropped and retried by the clients' kernels a second later.
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True, ssl_context=tls, backlog=LISTEN_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            raise ApplianceError(
                f"cannot listen on {config.server.host}:{config.server.port}: {exc.strerror or exc}; "
                "another program has it: choose another server.port (`appliance demo --port N` for the demo)",
                code="address_in_use",
            ) from None
        listening = True
        host, port = runner.addresses[0][:2]
        url_host = f"[{host}]" if ":" in host else host
        url = f"{config.server.scheme}://{url_host}:{port}"
        grpc = {"grpc": app[GRPC].address} if GRPC in app else {}
        path.write_text(json.dumps({"url": url, "pid": os.getpid(), **grpc}) + "\n")
        log.info("appliance listening on %s (state in %s)", url, config.server.state_dir)
        notifier = asyncio.create_task(tell_systemd(app, freeze_heap=True))
        await stop.wait()
        log.info("shutting down")
        sd_notify("STOPPING=1")
        notifier.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await reloader.close()
        await runner.cleanup()
        if listening:  # only this server's own record: another one may have written it
            path.unlink(missing_ok=True)


def _raise_open_files_limit() -> None:
    """Every client connection and worker pipe is a file descriptor; the usual soft limit (1024) would
    let a few thousand idle clients lock everyone else out, so take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)


def lock_state_dir(state_dir: Path) -> int:
    """One appliance per state dir: a second one would share its database and, at start, end the first
    one's workers as leftovers of a crashed run. Returns the held lock (a descriptor)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            running = json.loads((state_dir / "server.json").read_text())  # Config.server_file, of a config not read yet
            who = f" (pid {running['pid']}, {running['url']})"
        except (OSError, ValueError, KeyError):
            who = ""
        raise ApplianceError(
            f"another appliance is already running with state_dir {state_dir}{who}: stop it first, "
            "or give this one a state_dir of its own", code="already_running",
        ) from None
    return fd


def serve(config: Config) -> int:
    setup_logging(config.server.log_level, config.logging.format)
    # Files the appliance and its workers create are not world-readable (logs 0640, directories 0750);
    # the state directory and the secrets in it are the appliance user's alone.
    os.umask(0o027)
    _raise_open_files_limit()
    config.server.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = lock_state_dir(config.server.state_dir)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(run(config))
        else:
            uvloop.run(run(config))
    finally:
        os.close(lock)
    return 0
