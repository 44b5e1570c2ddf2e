#!/usr/bin/env python3
"""Soak test: the appliance under a steady mixed load for a long time, watching for leaks.

Starts `appliance serve` as a subprocess on loopback (port 0) in a temporary directory, with one
private endpoint of two fake-worker replicas (tests/fake_worker.py) and an inference key created
through the admin API. For --minutes it then offers a fixed request rate, paced on a clock with at
most --concurrency requests in flight: non-streaming chat completions and SSE streams (80/20 by
default), a tenth of them on a fresh connection, plus admin reads (endpoints, usage, events) every
--admin-seconds. Every --sample-seconds it records RSS, open file descriptors, threads and CPU time
of the appliance and of each worker, and the requests that failed (non-200, connection error,
timeout, a stream that does not end with `data: [DONE]`).

The first --warmup-minutes (at most half the run) are warm-up. Targets, exit status 1 if one is missed:
  - appliance RSS growth ≤ 10 % from the end of warm-up to the end of the load
  - appliance open fds: end − end of warm-up ≤ 5 (with bursts of streams every --burst-every s that grow
    the keep-alive pools: their extra connections must be let go again)
  - 0 failed requests (inference and admin)
  - the offered rate achieved: ≥ 99 % of --rate
  - a clean stop: SIGTERM → exit code 0, and no worker left running

Not run in CI: the default run takes 30 minutes. Run nothing else heavy beside it.

Usage:
  .venv/bin/python scripts/soak.py                                   # 30 minutes at 50 req/s
  .venv/bin/python scripts/soak.py --minutes 2 --warmup-minutes 0.5  # a short check
  .venv/bin/python scripts/soak.py --minutes 120 --rate 80 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from yarl import URL


ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_worker.py"
ENDPOINT = "soak"
REPLICAS = 2
CHAT_TOKENS = 8
STREAM_TOKENS = 20
WORKER_TOKENS_PER_SECOND = 200  # a 20-token stream lasts ~0.1 s: streams overlap, as real ones do


class NewestFirstConnector(aiohttp.TCPConnector):
    """A client pool that hands out the connection released last, as the openai SDK's (httpx) does in effect.
    aiohttp's own reuses the oldest first, so under a steady load every connection a burst opened stays busy
    enough never to idle out."""

    def _get(self, key: Any, *args: Any, **kwargs: Any) -> Any:
        conns = self._conns.get(key) if isinstance(getattr(self, "_conns", None), dict) else None
        if isinstance(conns, deque) and len(conns) > 1:
            conns.rotate(1)  # the newest to the front, where aiohttp takes from; the oldest stay in order
        return super()._get(key, *args, **kwargs)


# The appliance's default gateway.request_records: its last requests, kept in memory. RSS grows while
# that ring fills (10,000 ÷ rate seconds), by design; a warm-up shorter than that counts part of it.
REQUEST_RECORDS = 10_000

RSS_GROWTH_MAX = 0.10
FD_GROWTH_MAX = 5
RATE_ACHIEVED_MIN = 0.99
MB = 1 << 20


# --- records ------------------------------------------------------------------------------------


@dataclass
class ProcSample:
    pid: int
    rss_mb: float
    fds: int
    threads: int
    cpu_s: float
    inbound: int = 0  # of its sockets: clients' connections to it
    upstream: int = 0  # of its sockets: its own connections out (to workers)


@dataclass
class Sample:
    t: float  # seconds since the load started
    appliance: ProcSample | None
    workers: dict[str, ProcSample | None]  # by replica id
    restarts: int  # the replicas' restart counters, summed
    started: int  # inference requests sent so far
    failed: int  # inference + admin failures so far
    inflight: int
    interval_requests: int  # answered since the previous sample
    interval_p50_ms: float | None  # chat answer or stream first token
    interval_p99_ms: float | None
    loadavg: tuple[float, float, float]


@dataclass
class Failure:
    t: float
    kind: str  # chat, stream or admin
    error: str


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    chat_ms: list[float] = field(default_factory=list)
    stream_total_ms: list[float] = field(default_factory=list)
    stream_ttft_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)  # how late each request left against its slot
    held: int = 0  # requests that waited for the concurrency bound
    burst: int = 0  # requests sent in bursts, beyond the paced ones
    admin_reads: int = 0
    failures: list[Failure] = field(default_factory=list)
    # Since the last sample: chat answer time, and a stream's first token (its length is the worker's pace).
    interval_ms: list[float] = field(default_factory=list)
    first_send: float | None = None
    last_send: float | None = None
    last_done: float | None = None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


# --- the appliance --------------------------------------------------------------------------------


def write_config(root: Path) -> Path:
    folder = root / "models" / ENDPOINT
    folder.mkdir(parents=True)
    service = {
        "start_command": ["python", str(FAKE), "--port", "8000", "--tokens-per-second", str(WORKER_TOKENS_PER_SECOND)],
        "port": 8000,
        "health_check": {"path": "/health", "interval": 2.0, "max_retries": 3, "initial_delay": 30},
    }
    definition = {"models": [{"name": ENDPOINT, "model_path": "/models", "service": service}]}
    (folder / "model-definition.yaml").write_text(json.dumps(definition))  # JSON is YAML
    # Worker ports of their own per run, below the kernel's ephemeral range, so a soak beside a test run does not collide.
    first = 23000 + (os.getpid() % 50) * 100
    config = root / "config.toml"
    config.write_text(
        f"[server]\nport = 0\nstate_dir = {json.dumps(str(root / 'state'))}\n"
        f'[gpus]\ndevices = "none"\n'
        f"[workers]\nport_range = [{first}, {first + 99}]\n"
        + ('user = "root"\n' if os.geteuid() == 0 else "")  # as root, workers would get a uid that cannot read a venv under /root
        + f"[[endpoints]]\nname = {json.dumps(ENDPOINT)}\nmodel_folder = {json.dumps(str(folder))}\n"
        f"replicas = {REPLICAS}\npublic = false\n"
    )
    return config


def http_json(url: str, token: str | None = None, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_appliance(config: Path, state: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    server_json = state / "server.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the appliance exited with {proc.returncode} while starting:\n{log_path.read_text()[-3000:]}")
        try:
            url = str(json.loads(server_json.read_text())["url"])
            with urllib.request.urlopen(url + "/readyz", timeout=2):
                return proc, url
        except (OSError, ValueError, KeyError):
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the appliance did not become ready in 60 s:\n{log_path.read_text()[-3000:]}")


def wait_healthy(url: str, admin_key: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    reps: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        reps = http_json(f"{url}/api/v1/endpoints/{ENDPOINT}/replicas", admin_key)["data"]
        if sum(r["state"] == "HEALTHY" for r in reps) == REPLICAS:
            return
        time.sleep(0.2)
    raise SystemExit(f"{REPLICAS} replicas did not become healthy in {timeout:.0f} s: {[(r['id'], r['state']) for r in reps]}")


def proc_sample(pid: int | None, listen_port: int | None = None) -> ProcSample | None:
    """With `listen_port`, the process's TCP sockets are split into clients' connections and its own."""
    if not pid:
        return None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            sample = ProcSample(pid, p.memory_info().rss / MB, p.num_fds(), p.num_threads(), cpu.user + cpu.system)
        if listen_port is not None:
            for c in p.net_connections(kind="tcp"):
                if c.raddr:
                    if c.laddr.port == listen_port:
                        sample.inbound += 1
                    else:
                        sample.upstream += 1
        return sample
    except psutil.Error:
        return None


# --- the load -------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, admin_key: str, inference_key: str, appliance_pid: int, warmup_s: float) -> None:
        self.args = args
        self.url = url
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.inference = {"Authorization": f"Bearer {inference_key}", "Content-Type": "application/json"}
        self.appliance_pid = appliance_pid
        self.duration = args.minutes * 60.0
        self.warmup_s = warmup_s
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.sem = asyncio.Semaphore(args.concurrency)
        self.inflight = 0
        self.pending: set[asyncio.Task[None]] = set()  # requests still running when the load period ends
        self.t0 = 0.0
        # Bodies encoded once: the load generator shares the 2 cores with what it measures.
        self.chat = json.dumps({"model": ENDPOINT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CHAT_TOKENS}).encode()
        self.stream = json.dumps({"model": ENDPOINT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": STREAM_TOKENS, "stream": True}).encode()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def fail(self, kind: str, error: str) -> None:
        self.stats.failures.append(Failure(round(self.now(), 3), kind, error))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.args.request_timeout)
        # Pooled keep-alive connections for most requests; a fresh connection per request for the rest, so
        # the accept and close paths (where descriptors leak) are exercised too.
        # The pool hands out its newest idle connection by default, as the openai SDK's (httpx) does in
        # effect: after a burst the extra connections idle out. aiohttp's own pool (--client-pool oldest)
        # cycles through all of them, so they never idle and the appliance holds its side of each.
        pool = NewestFirstConnector(limit=0) if self.args.client_pool == "newest" else aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=pool, timeout=timeout) as pooled, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0), timeout=timeout
        ) as fresh:
            self.t0 = time.perf_counter()
            sampler = asyncio.create_task(self.sample_loop(pooled))
            admin = asyncio.create_task(self.admin_loop(pooled))
            await self.offer(pooled, fresh)
            await sampler  # its last sample is at the end of the load, with the last requests still in flight
            admin.cancel()
            await asyncio.gather(admin, return_exceptions=True)
            await self.drain()

    async def offer(self, pooled: aiohttp.ClientSession, fresh: aiohttp.ClientSession) -> None:
        """Request i is due at i / rate on the clock (open loop): a slow answer does not slow the offered load."""
        rate = self.args.rate
        pick = random.Random(1)  # the same mix every run
        tasks: set[asyncio.Task[None]] = set()
        every = self.args.burst_every
        next_burst = every if every > 0 else None
        i = 0
        while (due := i / rate) < self.duration:
            wait = due - self.now()
            if wait > 0:
                await asyncio.sleep(wait)
            if next_burst is not None and due >= next_burst:
                # Many streams at once: both keep-alive pools (the clients' and the gateway's to the workers)
                # grow; the extra connections must be let go again before the end is judged.
                for _ in range(self.args.burst_size):
                    await self.sem.acquire()
                    task = asyncio.create_task(self.request(pooled, True))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                self.stats.burst += self.args.burst_size
                next_burst = next_burst + every if next_burst + every <= self.duration - 90 else None
            if self.sem.locked():
                self.stats.held += 1
            await self.sem.acquire()
            sent = self.now()
            self.stats.lag_ms.append((sent - due) * 1e3)
            if self.stats.first_send is None:
                self.stats.first_send = sent
            self.stats.last_send = sent
            # Deterministic interleaving: exactly stream_fraction of the requests are streams.
            stream = int((i + 1) * self.args.stream_fraction) > int(i * self.args.stream_fraction)
            session = fresh if pick.random() < self.args.fresh_fraction else pooled
            task = asyncio.create_task(self.request(session, stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        self.stats.started = i + self.stats.burst
        self.pending = tasks

    async def drain(self) -> None:
        if not self.pending:
            return
        _, stuck = await asyncio.wait(self.pending, timeout=self.args.request_timeout + 5)
        for task in stuck:  # past the client's own timeout: hung somewhere, and counted as failed
            task.cancel()
            self.fail("stuck", "no answer and no timeout by the end of the drain")

    async def request(self, session: aiohttp.ClientSession, stream: bool) -> None:
        kind = "stream" if stream else "chat"
        self.inflight += 1
        t = time.perf_counter()
        ttft: float | None = None
        error: str | None = None
        try:
            async with session.post(f"{self.url}/v1/chat/completions", data=self.stream if stream else self.chat, headers=self.inference) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                elif stream:
                    last = b""
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line:
                            continue
                        if ttft is None:
                            ttft = time.perf_counter() - t
                        last = line
                    if last != b"data: [DONE]":
                        error = f"stream did not end with [DONE]; last line {last[:120]!r}"
                else:
                    body = await resp.json()
                    if not body.get("choices"):
                        error = f"no choices in {str(body)[:200]}"
        except TimeoutError:
            error = f"timeout after {self.args.request_timeout} s"
        except (aiohttp.ClientError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.inflight -= 1
            self.sem.release()
        ms = (time.perf_counter() - t) * 1e3
        self.stats.completed += 1
        self.stats.last_done = self.now()
        if error is not None:
            self.fail(kind, error)
            return
        if stream:
            self.stats.stream_total_ms.append(ms)
            if ttft is not None:
                self.stats.stream_ttft_ms.append(ttft * 1e3)
                self.stats.interval_ms.append(ttft * 1e3)
        else:
            self.stats.chat_ms.append(ms)
            self.stats.interval_ms.append(ms)

    async def admin_get(self, session: aiohttp.ClientSession, path: str) -> Any:
        self.stats.admin_reads += 1
        try:
            async with session.get(self.url + path, headers=self.admin) as resp:
                if resp.status != 200:
                    self.fail("admin", f"GET {path}: HTTP {resp.status}: {(await resp.text())[:200]}")
                    return None
                return await resp.json()
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.fail("admin", f"GET {path}: {type(exc).__name__}: {exc}")
            return None

    async def admin_loop(self, session: aiohttp.ClientSession) -> None:
        # What a dashboard polling the appliance does, beside the inference traffic.
        while True:
            await asyncio.sleep(self.args.admin_seconds)
            for path in ("/api/v1/endpoints", "/api/v1/usage", "/api/v1/events?limit=100", f"/api/v1/endpoints/{ENDPOINT}/events?limit=100"):
                await self.admin_get(session, path)

    async def sample_loop(self, session: aiohttp.ClientSession) -> None:
        step = self.args.sample_seconds
        # On the sampling grid, plus the two instants the verdicts compare: the end of warm-up and the end.
        times = sorted({k * step for k in range(int(self.duration // step) + 1)} | {self.warmup_s, self.duration})
        for t in times:
            wait = t - self.now()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.sample(session, t)

    async def sample(self, session: aiohttp.ClientSession, t: float) -> None:
        reps = await self.admin_get(session, f"/api/v1/endpoints/{ENDPOINT}/replicas")
        live = [r for r in (reps or {}).get("data", []) if r["state"] != "TERMINATED"]
        window = self.stats.interval_ms
        self.stats.interval_ms = []
        s = Sample(
            t=round(t, 3),
            appliance=proc_sample(self.appliance_pid, URL(self.url).port),
            workers={r["id"]: proc_sample(r["pid"]) for r in live},
            restarts=sum(r["restarts"] for r in live),
            started=len(self.stats.lag_ms),
            failed=len(self.stats.failures),
            inflight=self.inflight,
            interval_requests=len(window),
            interval_p50_ms=pct(window, 0.5),
            interval_p99_ms=pct(window, 0.99),
            loadavg=os.getloadavg(),
        )
        self.samples.append(s)
        a = s.appliance
        print(
            f"  t={t:7.1f}s  sent {s.started:7d}  failed {s.failed:4d}  in flight {s.inflight:3d}  "
            f"answer/TTFT p99 {fmt(s.interval_p99_ms):>6} ms  appliance RSS {fmt(a and a.rss_mb):>6} MiB  fds {a.fds if a else '-':>4} "
            f"(sockets in {a.inbound if a else '-'}, out {a.upstream if a else '-'})  "
            f"threads {a.threads if a else '-':>3}  load {s.loadavg[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )

    async def usage_totals(self, key_id: str) -> dict[str, int] | None:
        async with aiohttp.ClientSession() as session:
            body = await self.admin_get(session, f"/api/v1/usage?key={key_id}")
        return None if body is None else dict(body["totals"])


# --- report ---------------------------------------------------------------------------------------


def at(samples: list[Sample], t: float) -> Sample:
    """The first sample taken at or after t."""
    return next((s for s in samples if s.t >= t), samples[-1])


def growth_row(name: str, first: ProcSample | None, base: ProcSample | None, end: ProcSample | None) -> str:
    def cell(attr: str, spec: str) -> str:
        values = [getattr(x, attr) if x else None for x in (first, base, end)]
        return " / ".join(fmt(v, spec) for v in values)

    rss = f"{(end.rss_mb / base.rss_mb - 1) * 100:+.1f}%" if base and end else "-"
    fds = f"{end.fds - base.fds:+d}" if base and end else "-"
    cpu = f"{end.cpu_s - first.cpu_s:.1f}" if first and end else "-"
    return f"{name:18}{cell('rss_mb', '.1f'):>26}{rss:>8}{cell('fds', 'd'):>20}{fds:>6}{cell('threads', 'd'):>24}{cpu:>8}"


def rss_trend(samples: list[Sample], since: float) -> float | None:
    """Least-squares slope of the appliance's RSS after warm-up, in MiB per hour: a steady leak shows here
    even when the end point alone is within the bound."""
    points = [(s.t, s.appliance.rss_mb) for s in samples if s.t >= since and s.appliance]
    if len(points) < 3:
        return None
    mt = sum(t for t, _ in points) / len(points)
    mr = sum(r for _, r in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var * 3600 if var else None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def log_findings(log_path: Path) -> list[str]:
    """Lines of the appliance's own log that say something went wrong."""
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(w in line for w in ("Traceback", "ERROR", "CRITICAL", "WARNING", "Exception"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    parser.add_argument("--warmup-minutes", type=float, default=2.0, help="warm-up, not judged (default 2; at most half the run)")
    parser.add_argument("--rate", type=float, default=50.0, help="inference requests per second, paced on a clock (default 50)")
    parser.add_argument("--concurrency", type=int, default=64, help="most requests in flight (default 64)")
    parser.add_argument("--stream-fraction", type=float, default=0.2, help="share of SSE streams (default 0.2)")
    parser.add_argument("--fresh-fraction", type=float, default=0.1, help="share of requests on a new connection (default 0.1)")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="process sampling period (default 10)")
    parser.add_argument("--admin-seconds", type=float, default=5.0, help="period of the admin reads (default 5)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="a request slower than this fails (default 60)")
    parser.add_argument("--burst-every", type=float, default=300.0,
                        help="seconds between bursts of --burst-size streams at once (none in the last 90 s; 0: no bursts; default 300)")
    parser.add_argument("--burst-size", type=int, default=48, help="streams in one burst (default 48, within --concurrency)")
    parser.add_argument(
        "--client-pool", choices=("newest", "oldest"), default="newest",
        help="which idle keep-alive connection the load generator reuses: newest (as httpx, the default) or oldest (aiohttp's own)",
    )
    parser.add_argument("--json", type=Path, help="write the samples, failures and summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, state, logs) and print its path")
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.sample_seconds <= 0 or args.concurrency < 1:
        parser.error("--minutes, --rate, --sample-seconds and --concurrency must be positive")
    warmup_s = max(0.0, min(args.warmup_minutes, args.minutes / 2)) * 60  # short runs keep half their samples for judging

    command = shlex.join(sys.orig_argv)
    cores = os.cpu_count()
    machine = {
        "cores": cores,
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    log_path = tmp / "appliance.log"
    state = tmp / "state"
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    worker_pids: set[int] = set()
    usage: dict[str, int] | None = None
    try:
        config = write_config(tmp)
        proc, url = start_appliance(config, state, log_path)
        admin_key = (state / "admin.key").read_text().strip()
        wait_healthy(url, admin_key)
        # Limits far above the load: the key check, the limiter and usage accounting stay on the path.
        created = http_json(f"{url}/api/v1/keys", admin_key,
                            {"name": "soak", "scopes": ["inference"], "endpoints": [ENDPOINT], "rpm_limit": 10**9, "tpm_limit": 10**12})
        print(f"appliance at {url} (pid {proc.pid}), {REPLICAS} replicas healthy; "
              f"{args.minutes:g} min at {args.rate:g} req/s, warm-up {warmup_s / 60:g} min", file=sys.stderr, flush=True)
        soak = Soak(args, url, admin_key, created["key"], proc.pid, warmup_s)
        asyncio.run(soak.run())
        worker_pids = {w.pid for s in soak.samples for w in s.workers.values() if w}
        usage = asyncio.run(soak.usage_totals(created["id"]))
    except BaseException:
        print(f"stopped early; config, state and the appliance log are kept in {tmp}", file=sys.stderr)
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif proc is not None:
            exit_code = proc.returncode
    time.sleep(0.5)  # the workers' process groups end with the appliance; give the kernel a moment to reap
    leftover = sorted(p for p in worker_pids if alive(p))
    findings = log_findings(log_path)

    st, samples = soak.stats, soak.samples
    first, base, end = samples[0], at(samples, warmup_s), at(samples, soak.duration)
    send_span = max(soak.duration, (st.last_send or 0) - (st.first_send or 0) + 1 / args.rate)
    achieved = (st.started - st.burst) / send_span
    completed_rate = st.completed / max(soak.duration, st.last_done or 0)
    inference_failures = [f for f in st.failures if f.kind != "admin"]
    admin_failures = [f for f in st.failures if f.kind == "admin"]
    a0, a1 = base.appliance, end.appliance
    rss_growth = (a1.rss_mb / a0.rss_mb - 1) if a0 and a1 else float("inf")
    fd_growth = (a1.fds - a0.fds) if a0 and a1 else 10**9
    chats, streams = len(st.chat_ms), len(st.stream_total_ms)

    print()
    print(f"command:  {command}")
    print(f"machine:  {cores} cores ({machine['physical_cores']} physical), {machine['memory_gib']} GiB, "
          f"Python {machine['python']}, {machine['platform']}")
    print(f"load:     {args.minutes:g} min, warm-up {warmup_s / 60:g} min, {REPLICAS} fake-worker replicas, private endpoint with a key; "
          f"{args.stream_fraction:.0%} streams of {STREAM_TOKENS} tokens, {args.fresh_fraction:.0%} on fresh connections, ≤ {args.concurrency} in flight; "
          f"{st.burst} more in bursts of {args.burst_size} streams" + (f" every {args.burst_every:g} s" if args.burst_every > 0 else "") + f"; client pool {args.client_pool} first")
    print(f"requests: {st.started} sent ({chats} chat + {streams} stream answered), {len(inference_failures)} failed; "
          f"{st.admin_reads} admin reads, {len(admin_failures)} failed")
    print(f"rate:     target {args.rate:g} req/s, offered {achieved:.2f} req/s ({achieved / args.rate:.1%}), completed {completed_rate:.2f} req/s; "
          f"send lag p99 {fmt(pct(st.lag_ms, 0.99), '.1f')} ms, max {fmt(max(st.lag_ms, default=None), '.1f')} ms; "
          f"{st.held} waited for the concurrency bound")
    print(f"latency:  chat p50 {fmt(pct(st.chat_ms, 0.5), '.2f')} ms, p99 {fmt(pct(st.chat_ms, 0.99), '.2f')} ms; "
          f"stream TTFT p50 {fmt(pct(st.stream_ttft_ms, 0.5), '.2f')} ms, p99 {fmt(pct(st.stream_ttft_ms, 0.99), '.2f')} ms; "
          f"stream total p50 {fmt(pct(st.stream_total_ms, 0.5), '.1f')} ms, p99 {fmt(pct(st.stream_total_ms, 0.99), '.1f')} ms")
    if usage is not None:
        # The key's usage as the appliance recorded it, against what was answered: a miscount is a finding too.
        want_tokens = chats * CHAT_TOKENS + streams * STREAM_TOKENS
        ok = usage["requests"] == st.completed and usage["completion_tokens"] == want_tokens
        print(f"usage:    appliance recorded {usage['requests']} requests, {usage['completion_tokens']} completion tokens, {usage['errors']} errors "
              f"(answered {st.completed}, {want_tokens} tokens) {'ok' if ok else 'MISMATCH'}")
    restarts = end.restarts - first.restarts
    trend = rss_trend(samples, warmup_s)
    print(f"memory:   appliance RSS trend after warm-up {fmt(trend, '+.1f')} MiB/h (least squares over {sum(s.t >= warmup_s for s in samples)} samples)")
    fill_s = REQUEST_RECORDS / args.rate
    if fill_s > warmup_s:
        print(f"note:     the appliance's ring of its last {REQUEST_RECORDS} requests fills in {fill_s:.0f} s, after the {warmup_s:.0f} s "
              "warm-up: RSS grows by design until then, so growth and trend include part of that fill")
    print(f"workers:  {len(worker_pids)} worker pids seen, replica restarts during the run: {restarts}")
    print(f"log:      {len(findings)} warning/error lines in the appliance log")
    for line in findings[:10]:
        print(f"            {line[:200]}")
    print()
    print(f"{'process':18}{'RSS MiB start/warm/end':>26}{'growth':>8}{'fds start/warm/end':>20}{'Δfds':>6}{'threads start/warm/end':>24}{'CPU s':>8}")
    print(growth_row("appliance", first.appliance, base.appliance, end.appliance))
    for rid in sorted(end.workers):
        print(growth_row(f"worker {rid[:10]}", first.workers.get(rid), base.workers.get(rid), end.workers.get(rid)))
    if st.failures:
        print(f"\nfirst failures (of {len(st.failures)}):")
        for f in st.failures[:10]:
            print(f"  t={f.t:8.1f}s {f.kind:6} {f.error}")

    checks = [
        (f"appliance RSS growth, warm-up end → end (≤ {RSS_GROWTH_MAX:.0%})", f"{rss_growth:+.1%}", rss_growth <= RSS_GROWTH_MAX),
        (f"appliance open fds, end − warm-up end (≤ {FD_GROWTH_MAX})", f"{fd_growth:+d}", fd_growth <= FD_GROWTH_MAX),
        ("failed requests, inference + admin (0)", str(len(st.failures)), not st.failures),
        (f"offered rate ÷ target (≥ {RATE_ACHIEVED_MIN:.0%})", f"{achieved / args.rate:.1%}", achieved >= RATE_ACHIEVED_MIN * args.rate),
        ("clean stop: SIGTERM → exit 0, no worker left", f"exit {exit_code}, {len(leftover)} left", exit_code == 0 and not leftover),
    ]
    print()
    for label, value, ok in checks:
        print(f"{label:56}{value:>14}  {'PASS' if ok else 'FAIL'}")

    if args.json:
        summary = {
            "command": command,
            "machine": machine,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "warmup_seconds": warmup_s,
            "requests": {"sent": st.started, "completed": st.completed, "chat_ok": chats, "stream_ok": streams,
                         "failed": len(inference_failures), "admin_reads": st.admin_reads, "admin_failed": len(admin_failures)},
            "rate": {"target": args.rate, "offered": achieved, "completed": completed_rate,
                     "lag_p99_ms": pct(st.lag_ms, 0.99), "lag_max_ms": max(st.lag_ms, default=None), "held": st.held},
            "latency_ms": {"chat_p50": pct(st.chat_ms, 0.5), "chat_p99": pct(st.chat_ms, 0.99),
                           "stream_ttft_p50": pct(st.stream_ttft_ms, 0.5), "stream_ttft_p99": pct(st.stream_ttft_ms, 0.99),
                           "stream_total_p50": pct(st.stream_total_ms, 0.5), "stream_total_p99": pct(st.stream_total_ms, 0.99)},
            "usage": usage,
            "appliance_rss_trend_mib_per_hour": trend,
            "exit_code": exit_code,
            "leftover_workers": leftover,
            "log_findings": findings[:100],
            "checks": [{"check": label, "value": value, "pass": ok} for label, value, ok in checks],
        }
        args.json.write_text(json.dumps({"summary": summary, "samples": [asdict(s) for s in samples],
                                         "failures": [asdict(f) for f in st.failures]}, indent=1))
        print(f"\nwrote {args.json}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
