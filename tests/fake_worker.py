"""A small OpenAI-compatible worker for supervision and failure tests.

Knobs: --startup-delay (seconds before listening), --latency (seconds before answering),
--tokens-per-second (streaming pace), --crash-after (exit 1 this long after listening),
--fail-health-after K (503 from the K+1-th health probe on), --refuse-to-start (exit 1 at
once with a message), --dead-generation (health passes, completions fail), --port-conflict-once
FILE (the first start pretends its port was taken), --spawn-child (leave a grandchild in
the process group, as engines with helper processes do), --health-path PATH (health served there too; /moved
redirects to /health), --old-metric-names (/metrics with
vLLM's pre-0.9 KV-cache gauge name), --usage-on-last-chunk (a stream's usage on its last content chunk); POST /_burn?seconds=N keeps its GPU busy. Each probe and event is printed
with its time so tests can read them back from the replica log.

Run as a script it is a worker process of its own; tests/inprocess.py runs the same `parser()`,
`build()` and `serve()` inside the test's event loop, with a `Runtime` that writes to the replica log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

Out = Callable[[str], None]
SITES = web.AppKey("sites", list)  # the listening sites, so /_stop_listening can close them after startup
GRPC_SERVERS = web.AppKey("grpc_servers", list)  # its gRPC server (--grpc-port), for an in-process host to end


def _stdout(line: str) -> None:
    print(line, flush=True)


def say(message: str, out: Out = _stdout) -> None:
    out(f"{time.time():.3f} {message}")


@dataclass(frozen=True)
class Runtime:
    """Where the worker runs. The defaults are its own process; tests/inprocess.py runs it inside the test's
    event loop and passes what the launcher was given instead (log sink, environment, cwd, no pid of its own)."""

    out: Out = _stdout
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    cwd: str | None = None  # None: the process's own
    pid: int | None = field(default_factory=os.getpid)
    ident: str = field(default_factory=lambda: str(os.getpid()))  # in completion ids, telling replicas apart

    def say(self, message: str) -> None:
        say(message, self.out)


def _readable(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False


def parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake_worker.py")
    p.add_argument("--port", type=int, default=int(env.get("PORT", "8000")))
    p.add_argument("--grpc-port", type=int, default=int(env["GRPC_PORT"]) if env.get("GRPC_PORT") else None, help="also serve gRPC (tests/fake_grpc.py)")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--startup-delay", type=float, default=0.0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--tokens-per-second", type=float, default=1000.0)
    p.add_argument("--crash-after", type=float)
    p.add_argument("--fail-health-after", type=int)
    p.add_argument("--refuse-to-start", action="store_true")
    p.add_argument("--dead-generation", action="store_true")
    p.add_argument("--port-conflict-once")
    p.add_argument("--spawn-child", action="store_true")
    p.add_argument("--spawn-detached", action="store_true", help="a grandchild in a session of its own: out of the worker's process group")
    p.add_argument("--report-gpu", action="store_true")
    p.add_argument("--slow-marker", help="the replica that creates this file first answers with --slow-latency")
    p.add_argument("--slow-latency", type=float, default=0.2)
    p.add_argument("--old-metric-names", action="store_true")
    p.add_argument("--metrics-padding", type=int, default=0, help="this many more series in /metrics (a vLLM-sized exposition)")
    p.add_argument("--health-path", default="/health", help="serve the health check here too (a runtime's own path, e.g. /info)")
    p.add_argument("--log-request-bytes", type=int, default=0, help="print a line this long for every completion (a chatty engine)")
    p.add_argument("--sleep-api", action="store_true", help="vLLM's dev-mode sleep routes: /sleep, /wake_up, /is_sleeping (asleep: /v1/* answers 503)")
    p.add_argument("--usage-on-last-chunk", action="store_true",
                   help="streams: usage rides on the last content chunk, as `transformers serve` sends it, not on a chunk of its own")
    return p


def build(args: argparse.Namespace, rt: Runtime | None = None) -> web.Application:
    rt = rt or Runtime()
    say = rt.say
    state = {"probes": 0, "cancelled": 0, "requests": 0, "listening": True}
    started = time.time()
    latency = args.latency
    if args.slow_marker:
        try:
            os.close(os.open(args.slow_marker, os.O_CREAT | os.O_EXCL))
            latency = args.slow_latency  # the first replica to start is the slow one
        except FileExistsError:
            pass

    async def health(request: web.Request) -> web.Response:
        state["probes"] += 1
        ok = not state.get("sick") and (args.fail_health_after is None or state["probes"] <= args.fail_health_after)
        say(f"health {200 if ok else 503}")
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def partial(request: web.Request) -> web.StreamResponse:
        # a plain (not SSE) body of unknown length, cut off after `bytes`: a worker dying mid-answer
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("length"):  # or one that declared its length, and is cut off short of it
            resp.content_length = int(request.query["length"])
        await resp.prepare(request)
        await resp.write(b"x" * int(request.query.get("bytes", "100000")))
        assert request.transport is not None
        request.transport.close()  # what was written goes out, then the connection ends without the last chunk
        return resp

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/health")

    async def whoami(request: web.Request) -> web.Response:
        info = {
            "pid": rt.pid,
            "pgid": os.getpgid(0) if rt.pid is not None else None,
            "cwd": rt.cwd or os.getcwd(),
            "cuda_visible_devices": rt.env.get("CUDA_VISIBLE_DEVICES"),
            "cuda_device_order": rt.env.get("CUDA_DEVICE_ORDER"),
            "env": {k: v for k, v in rt.env.items() if k.startswith(("FAKE_", "BACKEND_", "NIM_")) or k in ("PORT", "ROOT_VAR", "VARIANT_VAR")},
            "uptime": time.time() - started,
            "uid": os.getuid(),
            "can_read": {path: _readable(path) for path in request.query.getall("read", [])},
        }
        if args.report_gpu:
            import torch

            info["torch_devices"] = [torch.cuda.get_device_properties(i).name for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available():
                torch.ones(1, device="cuda")  # create a context: NVML then lists this pid
        return web.json_response(info)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model", "owned_by": "fake"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        state["requests"] += 1
        state["running"] = state.get("running", 0) + 1
        state["last_body"] = (await request.read()).decode()
        if args.log_request_bytes:
            say("request " + "x" * args.log_request_bytes)
        try:
            return await _complete(request)
        finally:
            state["running"] -= 1

    async def metrics(request: web.Request) -> web.Response:
        # As vLLM exports them (gauges labelled by model); --old-metric-names uses the pre-0.9 KV-cache name.
        kv = "vllm:gpu_cache_usage_perc" if args.old_metric_names else "vllm:kv_cache_usage_perc"
        running = state.get("running", 0)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{args.model}"}} {float(running)}',
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{args.model}"}} 0.0',
            f"# TYPE {kv} gauge",
            f'{kv}{{model_name="{args.model}"}} {min(1.0, running / 10):.3f}',
            "# TYPE vllm:request_success counter",
            f'vllm:request_success_total{{model_name="{args.model}"}} {float(state["requests"])}',
        ]
        if args.metrics_padding:  # histogram-like series, as a real engine exports by the hundred
            lines += ["# TYPE vllm:padding_seconds histogram"] + [
                f'vllm:padding_seconds_bucket{{model_name="{args.model}",le="{i}.0"}} {float(i)}' for i in range(args.metrics_padding)
            ] + [f'vllm:padding_seconds_bucket{{model_name="{args.model}",le="+Inf"}} {float(args.metrics_padding)}',
                 f'vllm:padding_seconds_count{{model_name="{args.model}"}} {float(args.metrics_padding)}',
                 f'vllm:padding_seconds_sum{{model_name="{args.model}"}} 1.0']
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if state.get("asleep"):
            return web.json_response({"error": {"message": "the engine is asleep", "type": "server_error"}}, status=503)
        if args.dead_generation:
            return web.json_response({"error": {"message": "generation is dead", "type": "server_error"}}, status=500)
        await asyncio.sleep(latency)
        n = int(body.get("max_tokens") or 8)
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            text = " ".join(f"tok{i}" for i in range(n))
            choice = {"index": 0, "finish_reason": "length", **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return web.json_response(
                {"id": f"fake-{rt.ident}", "object": "chat.completion" if chat else "text_completion", "model": body.get("model"), "choices": [choice],
                 "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}}
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if body.get("big_event"):
                await resp.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': 'x' * 200_000}}]})}\n\n".encode())
            # As OpenAI and vLLM do: with stream_options.include_usage every chunk carries "usage": null,
            # and one last chunk has no choices and the usage of the whole request.
            # --usage-on-last-chunk: no null ones, and the usage on the last chunk that has choices.
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            extra: dict[str, object] = {"usage": None} if include_usage and not args.usage_on_last_chunk else {}
            for i in range(n):
                delta = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
                if include_usage and args.usage_on_last_chunk and i + 1 == n:
                    extra = {"usage": usage}
                await resp.write(f"data: {json.dumps({'model': body.get('model'), 'choices': [{'index': 0, **delta}], **extra})}\n\n".encode())
                await asyncio.sleep(3600 if i + 1 == body.get("stall_after") else 1.0 / args.tokens_per_second)
            if include_usage and not args.usage_on_last_chunk:
                await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            state["cancelled"] += 1
            raise
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), 0.5, -0.5]} for i, x in enumerate(items)]
        return web.json_response({"object": "list", "data": data, "model": body.get("model"), "usage": {"prompt_tokens": len(items), "total_tokens": len(items)}})

    async def echo(request: web.Request) -> web.Response:
        resp = web.json_response({"method": request.method, "path": request.path, "raw_path": request.raw_path, "query": request.query_string,
                                  "body": (await request.read()).decode(), "headers": dict(request.headers)})
        for cookie in request.query.getall("set-cookie", []):  # a worker that sets cookies (several Set-Cookie headers)
            resp.headers.add("Set-Cookie", cookie)
        return resp

    async def page(request: web.Request) -> web.Response:  # an engine's own HTML page, such as /docs
        return web.Response(text="<script>fetch('/ui/session')</script>", content_type="text/html")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def burn(request: web.Request) -> web.Response:
        # Keep the replica's GPU busy for `seconds` (a real load for GPU autoscaling tests).
        seconds = float(request.query.get("seconds", "10"))

        def work() -> None:
            import torch

            a = torch.randn(4096, 4096, device="cuda")
            until = time.time() + seconds
            while time.time() < until:
                for _ in range(20):
                    a = torch.tanh(a @ a)  # tanh keeps values finite
                torch.cuda.synchronize()

        asyncio.get_running_loop().run_in_executor(None, work)
        return web.json_response({"burning": seconds})

    async def fail_health(request: web.Request) -> web.Response:
        # Health answers 503 from now on while requests in flight go on: a replica turning sick mid-stream.
        state["sick"] = True
        return web.json_response({"sick": True})

    async def sleep(request: web.Request) -> web.Response:
        state["asleep"] = True
        say(f"sleep level {request.query.get('level', '1')}")
        return web.json_response({"status": "sleeping", "level": int(request.query.get("level", "1"))})

    async def wake_up(request: web.Request) -> web.Response:
        state["asleep"] = False
        say("wake_up")
        return web.json_response({"status": "awake", "tags": None})

    async def is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": bool(state.get("asleep"))})

    async def stop_listening(request: web.Request) -> web.Response:
        # The process lives on but refuses new connections, as a worker whose server died would.
        for site in request.app[SITES]:
            await site.stop()
        return web.json_response({"listening": False})

    app = web.Application()
    app[SITES] = []
    app[GRPC_SERVERS] = []
    app.router.add_get("/health", health)
    if args.health_path != "/health":
        app.router.add_get(args.health_path, health)
    if args.sleep_api:
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_get("/moved", moved)
    app.router.add_get("/_partial", partial)  # a health path that redirects
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/stats", stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/_stop_listening", stop_listening)
    app.router.add_post("/_fail_health", fail_health)
    app.router.add_post("/_burn", burn)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_route("*", "/v2/models/{name}/infer", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/page", page)
    return app


async def serve(args: argparse.Namespace, rt: Runtime, *, on_runner: Callable[[web.AppRunner], None] = lambda runner: None) -> int:
    """The worker's life, process or not: returns the exit code when it ends by itself (a refusal,
    a pretended port conflict, --crash-after); otherwise serves until cancelled or killed.
    `on_runner` sees the runner before it listens, so an in-process host can shut it down."""
    if args.refuse_to_start:
        rt.say("refusing to start: model weights are corrupt (fake)")
        return 3
    if args.port_conflict_once and not Path(args.port_conflict_once).exists():
        Path(args.port_conflict_once).write_text("taken")
        rt.say(f"OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', {args.port}): address already in use")
        return 1
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        rt.say(f"child {child.pid}")
    if args.spawn_detached:
        loner = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"], start_new_session=True)
        rt.say(f"detached child {loner.pid}")
    await asyncio.sleep(args.startup_delay)
    app = build(args, rt)
    # shutdown_timeout bounds an in-process stop; a worker process never cleans up (it is signalled)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    on_runner(runner)
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    app[SITES].append(site)
    if args.grpc_port:
        import fake_grpc  # grpc only where asked for

        app[GRPC_SERVERS].append(await fake_grpc.start(args.grpc_port))
    await site.start()
    rt.say(f"listening on {args.port} pid {rt.pid}")
    if args.crash_after is not None:
        await asyncio.sleep(args.crash_after)
        rt.say("crashing now")
        return 1
    await asyncio.Event().wait()
    return 0


async def main(args: argparse.Namespace) -> None:
    code = await serve(args, Runtime())
    os._exit(code)  # abrupt, as before: --crash-after must look like a crash, not a clean shutdown


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
