"""A real Triton Inference Server (PyTriton, CPU only) as a replica for the gRPC tests.

Run by `.venv-triton/bin/python tests/triton_worker.py` (scripts/setup.sh --with-tests makes that venv: PyTriton
pins numpy<2, so it cannot live in .venv). Environment: PORT (Triton's HTTP port, /v2/health/ready),
GRPC_PORT (KServe v2 gRPC), optional TRITON_WORKER_LOG_VERBOSE (Triton's --log-verbose level). Prints
"triton worker ready http=PORT grpc=GRPC_PORT models=..." once every model is loaded (about 12 s on a
2-core box), then serves until SIGTERM or SIGINT, which stop tritonserver and its Python backend stubs
before the script exits 0.

Models (none batches: max_batch_size 0, so shapes below are exactly what a request sends):
  identity  data UINT8 [-1] -> data UINT8 [-1], the same bytes; 16 MiB and more pass (gRPC messages up to 2 GiB).
  counter   decoupled (streaming, gRPC ModelStreamInfer only): n INT32 [1], optional delay_ms INT32 [1] ->
            n responses, value INT32 [1] = 0, 1, ..., n-1, delay_ms apart (the first after delay_ms too).
            n = 0 yields no response at all (only the final empty one, if the client asks for it).
  slow      delay_ms INT32 [1] -> delay_ms INT32 [1] (the same value), answered after sleeping delay_ms;
            SLOW_INSTANCES (4) instances, so that many calls sleep at once and the next ones queue in Triton.

Every model is async, so a stream's sleeps do not hold other requests back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

SLOW_INSTANCES = 4


async def identity(requests):
    return [{"data": request["data"]} for request in requests]


async def counter(requests):
    # decoupled: each yield is one response per request; with max_batch_size 0 Triton passes one request a call
    (request,) = requests
    n = int(request["n"].reshape(-1)[0])
    delay = _delay_s(request)
    for i in range(n):
        if delay:
            await asyncio.sleep(delay)
        yield [{"value": np.array([i], dtype=np.int32)}]


async def slow(requests):
    out = []
    for request in requests:
        await asyncio.sleep(_delay_s(request))
        out.append({"delay_ms": request["delay_ms"].astype(np.int32)})
    return out


def _delay_s(request) -> float:
    delay = request.data.get("delay_ms")
    return max(0, int(delay.reshape(-1)[0])) / 1000 if delay is not None else 0.0


def _workspace_root() -> Path:
    """Where PyTriton copies tritonserver (~30 MB) and its sockets: $TMPDIR, else the working directory.

    Never PyTriton's default ~/.cache/pytriton, which outlives a killed test run."""
    return Path(os.environ.get("TMPDIR") or os.getcwd())


def main() -> int:
    # The Python backend stub links libpython3.x.so; without this it finds the system's copy (another build of
    # the same version) first and every model fails with "'_thread.RLock' object has no attribute
    # '_recursion_count'". tritonserver and the stubs take PyTriton's copy of os.environ, so no re-exec is needed.
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *filter(None, paths)])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    http_port, grpc_port = int(os.environ["PORT"]), int(os.environ["GRPC_PORT"])
    # SIGTERM as Ctrl-C: Triton.serve() stops tritonserver (which ends its stubs) and cleans the workspace on it.
    # (PyTriton also sets PR_SET_PDEATHSIG on tritonserver, so a SIGKILL of this process ends it too.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"triton-worker-{os.getpid()}-", dir=_workspace_root()))
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        allow_metrics=False,
        allow_sagemaker=False,
        allow_vertex_ai=False,
        exit_timeout_secs=1,  # on SIGTERM, in-flight requests and model unloads get this long, not Triton's 30 s
        log_verbose=int(os.environ.get("TRITON_WORKER_LOG_VERBOSE", "0")),
    )
    # no restricted endpoints: the tests may read statistics or unload models without PyTriton's random token
    triton = Triton(config=config, workspace=scratch / "workspace", security_config=TritonSecurityConfig(restricted_endpoints=[]))
    try:
        unbatched = ModelConfig(batching=False, max_batch_size=0)
        triton.bind(
            model_name="identity",
            infer_func=identity,
            inputs=[Tensor(name="data", dtype=np.uint8, shape=(-1,))],
            outputs=[Tensor(name="data", dtype=np.uint8, shape=(-1,))],
            config=unbatched,
        )
        triton.bind(
            model_name="counter",
            infer_func=counter,
            inputs=[
                Tensor(name="n", dtype=np.int32, shape=(1,)),
                Tensor(name="delay_ms", dtype=np.int32, shape=(1,), optional=True),
            ],
            outputs=[Tensor(name="value", dtype=np.int32, shape=(1,))],
            config=ModelConfig(batching=False, max_batch_size=0, decoupled=True),
        )
        triton.bind(
            model_name="slow",
            infer_func=[slow] * SLOW_INSTANCES,
            inputs=[Tensor(name="delay_ms", dtype=np.int32, shape=(1,))],
            outputs=[Tensor(name="delay_ms", dtype=np.int32, shape=(1,))],
            config=unbatched,
        )
        triton.run()  # starts tritonserver and returns once it and every model are ready
        print(
            f"triton worker ready http={http_port} grpc={grpc_port} models=identity,counter,slow "
            f"in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        triton.serve()  # until SIGTERM/SIGINT (caught inside) or tritonserver's death; stops Triton either way
    except KeyboardInterrupt:  # a signal before serve() began
        pass
    finally:
        triton.stop()  # a no-op after serve(); else stops tritonserver and the stubs
        shutil.rmtree(scratch, ignore_errors=True)
    print("triton worker stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
