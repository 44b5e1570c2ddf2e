"""Fake workers inside the test's event loop: a Launcher for make_app, so the gateway and admission
tests spawn no worker process.

A worker here is tests/fake_worker.py itself (its parser, handlers and life in `serve()`) on a real
loopback port; what a process would give for free is emulated: an exit code for wait(), a stop that
closes every connection (as SIGTERM ends the fake worker: -15) and a crash that aborts them mid-response
(as SIGKILL would: -9). The supervisor, health probes and gateway run exactly as with processes.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import fake_worker
from aiohttp import web
from fake_worker import Runtime, parser, serve

from appliance.control.host.process import Slot
from appliance.control.host.replica_log import ReplicaLog
from appliance.errors import ApplianceError

FAKE = Path(fake_worker.__file__).resolve()
SIGTERM_CODE = -15  # what the runner sees from a worker process stopped by SIGTERM
SIGKILL_CODE = -9


class NotInProcess(ApplianceError):
    """An argv the in-process launcher cannot run. An ApplianceError, so the runner records it as a failed start
    (the replica's last_error says why) instead of losing the runner."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422, code="not_in_process")


class InProcessWorker:
    """One fake worker in the current event loop, as the replica runner sees a worker process."""

    def __init__(self, args: argparse.Namespace, *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog) -> None:
        self.pid: int | None = None  # no OS process: the supervisor has no orphan to look for after a restart
        self.started_at: float | None = None
        self.cgroup: Path | None = None
        self.port: int = args.port
        self._sink = sink
        self._runner: web.AppRunner | None = None
        self._ending = False
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        rt = Runtime(out=self._out, env=dict(env), cwd=str(cwd), pid=None, ident=str(args.port))
        self._life = asyncio.create_task(self._live(args, rt), name=f"fake-worker-{args.port}")

    def __repr__(self) -> str:
        return f"<InProcessWorker port={self.port} returncode={self.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)  # a cancelled waiter must not cancel the exit itself

    async def stop(self, grace: float) -> int:
        """As SIGTERM ends the fake worker: stop listening and close every connection (open streams end);
        what is still not shut down after `grace` seconds is aborted, as SIGKILL would."""
        await self._end(SIGTERM_CODE, abort=False, grace=grace)
        return await self.wait()

    async def crash(self) -> int:
        """As SIGKILL looks to clients: every open connection is aborted mid-response and the port stops
        listening, at once; wait() then returns -9."""
        await self._end(SIGKILL_CODE, abort=True)
        return await self.wait()

    def _out(self, line: str) -> None:
        if not self._ending:  # a dead process writes nothing more
            self._sink.write(line)

    def _hold(self, runner: web.AppRunner) -> None:
        self._runner = runner

    async def _live(self, args: argparse.Namespace, rt: Runtime) -> None:
        try:
            code = await serve(args, rt, on_runner=self._hold)
        except asyncio.CancelledError:
            raise  # stop() or crash() ended it and records the code
        except Exception as exc:  # as an uncaught exception ends the process: its last line, exit 1 (port conflicts are read from it)
            self._out(f"{type(exc).__name__}: {exc}")
            code = 1
        await self._end(code, abort=True)  # --crash-after and the refusals end the process abruptly

    async def _end(self, code: int, *, abort: bool, grace: float = 5.0) -> None:
        if self._ending:
            await self.wait()
            return
        self._ending = True
        await self._cut(abort)  # first, before anything yields: nothing more reaches a client
        if asyncio.current_task() is not self._life:
            self._life.cancel()
            await asyncio.gather(self._life, return_exceptions=True)
            await self._cut(abort)  # a runner that came up meanwhile
        if self._runner is not None:
            cleanup = asyncio.ensure_future(self._runner.cleanup())  # frees the port and ends the handlers
            _, pending = await asyncio.wait({cleanup}, timeout=grace)
            if pending:
                await self._cut(abort=True)
                code = SIGKILL_CODE
            await cleanup
        self._exit.set_result(code)

    async def _cut(self, abort: bool) -> None:
        """What the kernel does at once when a process dies: its listening sockets close, and its connections
        end (aborted, or closed after what was already written)."""
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()  # closes the listener without suspending
        for server in runner.app[fake_worker.GRPC_SERVERS]:
            await server.stop(None if abort else 0.5)  # its calls end with the process
        if runner.server is None:
            return
        for conn in runner.server.connections:
            if abort and conn.transport is not None:
                conn.transport.abort()
            else:
                conn.force_close()


class InProcessLauncher:
    """A Launcher (appliance.control.host.process) that runs `python tests/fake_worker.py ...` in the current
    event loop. Keeps every worker it started, by port, so a test can reach a replica's worker from the
    `port` the admin API shows."""

    def __init__(self) -> None:
        self.workers: list[InProcessWorker] = []  # every start, in order
        self.refused: list[str] = []  # argv it could not run, for the fixture to report
        self._by_port: dict[int, InProcessWorker] = {}

    async def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, slot: Slot) -> InProcessWorker:
        try:
            args = self.parse(argv, env)
        except NotInProcess as exc:
            self.refused.append(exc.message)
            raise
        worker = InProcessWorker(args, env=env, cwd=cwd, sink=sink)
        self.workers.append(worker)
        self._by_port[worker.port] = worker
        return worker

    @staticmethod
    def parse(argv: Sequence[str], env: Mapping[str, str]) -> argparse.Namespace:
        """The fake worker's knobs from its start command; NotInProcess for anything else."""
        command = shlex.join(argv)
        if len(argv) < 2 or not Path(argv[0]).name.startswith("python") or Path(argv[1]).resolve() != FAKE:
            raise NotInProcess(f"the in-process launcher runs only `python {FAKE} ...`, not `{command}`: start this app with the process launcher")
        try:
            args = parser(env).parse_args(list(argv[2:]))
        except SystemExit:  # argparse printed why on stderr
            raise NotInProcess(f"the fake worker does not accept `{command}`") from None
        for knob in ("spawn_child", "spawn_detached", "report_gpu"):  # about a process of its own: nothing to emulate in-process
            if getattr(args, knob):
                raise NotInProcess(f"--{knob.replace('_', '-')} needs a worker process: `{command}`")
        return args

    def on_port(self, port: int) -> InProcessWorker:
        """The latest worker started on `port` (a replica's `port` in the admin API)."""
        try:
            return self._by_port[port]
        except KeyError:
            raise AssertionError(f"no in-process worker was started on port {port} (ports: {sorted(self._by_port)})") from None

    def running(self) -> list[InProcessWorker]:
        return [w for w in self.workers if w.returncode is None]

    async def close(self, grace: float = 5.0) -> list[InProcessWorker]:
        """Stop whatever the app left running (it should have stopped them all); returns those."""
        left = self.running()
        await asyncio.gather(*(w.stop(grace) for w in left))
        return left
