#!/usr/bin/env python3
"""gRPC through the appliance against a real Triton server (PyTriton on the CPU, tests/triton_worker.py), side
by side in one run.

One endpoint of one Triton replica; each leg is called three ways, in interleaved rounds so drift hits both alike:

  direct     the replica's own gRPC port (the port the ledger gave it)
  appliance  the appliance's [grpc] port, with a key in `authorization` and `x-endpoint`, as clients call it

  bare       a 20-line grpc.aio relay (generic handler, one channel, nothing checked): what grpc.aio itself costs

Legs: ServerLive (an empty message each way) and ModelInfer on the `identity` model (16 bytes), each at 1 and
16 concurrent calls on one channel, closed loop. The client sends pre-serialized messages over a generic
channel, so its own cost is the same on every path. Printed per leg: p50 and the p50 each relay adds,
calls/s and the ratios, and the appliance's CPU per call.

Needs .venv-triton (scripts/setup.sh --with-tests) and tritonclient (its messages) in this Python.

Usage: .venv/bin/python scripts/bench_grpc.py [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from tritonclient.grpc import service_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import ROOT, WORKERS_USER, api, cpu_seconds, free_port, free_range, stop_all, wait  # noqa: E402

# The bare reference: every unary call passed on as bytes over one channel, grpc.aio on the same loop kind as
# the appliance's (uvloop where installed), nothing checked, counted or routed.
BARE_RELAY = """
import asyncio, sys
import grpc
try:
    import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
async def main(port, upstream):
    channel = grpc.aio.insecure_channel(upstream)
    class Relay(grpc.GenericRpcHandler):
        def service(self, details):
            forward = channel.unary_unary(details.method)
            async def unary(request, context):
                return await forward(request, timeout=context.time_remaining())
            return grpc.unary_unary_rpc_method_handler(unary)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Relay(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
WORKER = ROOT / "tests" / "triton_worker.py"
SERVICE = "/inference.GRPCInferenceService/"


def messages() -> dict[str, tuple[str, bytes]]:
    live = service_pb2.ServerLiveRequest()
    infer = service_pb2.ModelInferRequest(model_name="identity")
    infer.inputs.add(name="data", datatype="UINT8", shape=[16])
    infer.raw_input_contents.append(bytes(range(16)))  # the tensor's bytes, as tritonclient sends them
    return {"ServerLive": (SERVICE + "ServerLive", live.SerializeToString()), "ModelInfer": (SERVICE + "ModelInfer", infer.SerializeToString())}


async def leg(target: str, metadata: tuple[tuple[str, str], ...], method: str, body: bytes, concurrency: int, seconds: float) -> tuple[list[float], float]:
    """Latencies and calls/s of `concurrency` closed-loop callers on one channel for `seconds`."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        for _ in range(20):  # warm: the connection, and the appliance's channel to the worker
            await call(body, metadata=metadata, timeout=10)
        latencies: list[float] = []
        end = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < end:
                t = time.perf_counter()
                await call(body, metadata=metadata, timeout=10)
                latencies.append(time.perf_counter() - t)

        began = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return latencies, len(latencies) / (time.monotonic() - began)


async def answers(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await channel.unary_unary(SERVICE + "ServerLive")(messages()["ServerLive"][1], timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per leg and round")
    args = parser.parse_args()
    if not TRITON_PYTHON.exists():
        raise SystemExit("no .venv-triton: run scripts/setup.sh --with-tests first (it installs PyTriton there)")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "triton"
        folder.mkdir()
        service = {"start_command": [str(TRITON_PYTHON), str(WORKER)], "port": 8000, "grpc_port": 8001,
                   "health_check": {"path": "/v2/models/slow/ready", "interval": 1.0, "max_retries": 3, "initial_delay": 120}}
        (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "triton", "model_path": "/models", "service": service}]}))
        port, grpc_port = free_port(), free_port()
        first, last = free_range()
        config = work / "config.toml"
        config.write_text(f'[server]\nport = {port}\nstate_dir = "{work / "state"}"\n[gpus]\ndevices = "none"\n[workers]\nport_range = [{first}, {last}]\n'
                          f'{WORKERS_USER}[grpc]\nport = {grpc_port}\n[[endpoints]]\nname = "triton"\nmodel_folder = "{folder}"\n')
        try:
            appliance_proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--config", str(config)], cwd=ROOT,
                                              stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": tmp})
            procs.append(appliance_proc)
            url = f"http://127.0.0.1:{port}"
            key = wait("the appliance", lambda: (work / "state" / "admin.key").exists() and (work / "state" / "admin.key").read_text().strip(), 60)
            replica = wait("a HEALTHY Triton replica", lambda: next((r for r in api(url, "/api/v1/endpoints/triton/replicas", key)["data"]
                                                                    if r["state"] == "HEALTHY"), None), 180)
            bare_port = free_port()
            worker = f"127.0.0.1:{replica['grpc_port']}"
            procs.append(subprocess.Popen([sys.executable, "-c", BARE_RELAY, str(bare_port), worker], stderr=subprocess.DEVNULL))
            targets = {
                "direct": (worker, ()),
                "bare": (f"127.0.0.1:{bare_port}", ()),
                "appliance": (f"127.0.0.1:{grpc_port}", (("authorization", f"Bearer {key}"), ("x-endpoint", "triton"))),
            }
            wait("the bare relay", lambda: asyncio.run(answers(targets["bare"][0])), 30)
            results = asyncio.run(measure(targets, messages(), args.rounds, args.seconds, appliance_proc.pid))
        finally:
            stop_all(procs)
    print(f"Triton (PyTriton 0.7.0, CPU) behind the appliance's gRPC port, {args.rounds} interleaved rounds of {args.seconds:g} s per leg, "
          f"{os.cpu_count()} cores, one channel per leg")
    print("added: p50 over direct; ×direct, ×bare: calls/s against direct and against a bare grpc.aio relay (no checks, one channel)")
    print(f"{'call':11}{'conc':>5}{'p50 direct':>11}{'added bare':>11}{'added appl.':>12}{'calls/s direct':>15}{'bare':>7}{'appl.':>7}"
          f"{'×direct':>8}{'×bare':>7}{'appl. CPU µs/call':>18}")
    for (name, conc), r in results.items():
        d, b, a = (statistics.median(r[k]) for k in ("direct", "bare", "appliance"))
        rd, rb, ra = (statistics.median(r[f"rate_{k}"]) for k in ("direct", "bare", "appliance"))
        print(f"{name:11}{conc:5d}{d * 1e3:11.2f}{(b - d) * 1e3:11.2f}{(a - d) * 1e3:12.2f}{rd:15.0f}{rb:7.0f}{ra:7.0f}{ra / rd:8.2f}{ra / rb:7.2f}"
              f"{statistics.median(r['cpu']) * 1e6:18.0f}")
    return 0


async def measure(targets: dict[str, tuple[str, tuple[tuple[str, str], ...]]], calls: dict[str, tuple[str, bytes]], rounds: int, seconds: float,
                  appliance_pid: int) -> dict[tuple[str, int], dict[str, list[float]]]:
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in range(rounds):
        for name, (method, body) in calls.items():
            for conc in (1, 16):
                out = results.setdefault((name, conc), {"cpu": [], **{k: [] for t in targets for k in (t, f"rate_{t}")}})
                n = r % len(targets)
                order = list(targets.items())[n:] + list(targets.items())[:n]
                for which, (target, metadata) in order:
                    cpu = cpu_seconds(appliance_pid)
                    latencies, rate = await leg(target, metadata, method, body, conc, seconds)
                    out[which] += latencies
                    out[f"rate_{which}"].append(rate)
                    if which == "appliance":
                        out["cpu"].append((cpu_seconds(appliance_pid) - cpu) / max(1, len(latencies) + 20))
    return results


if __name__ == "__main__":
    sys.exit(main())
