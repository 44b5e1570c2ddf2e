"""A real Triton Inference Server (PyTriton, CPU only) as a replica for the gRPC tests.

Run by `.venv-triton/bin/python tests/triton_worker.py` (scripts/setup.sh --with-tests makes that venv: PyTriton
pins numpy<2, so it cannot live in .venv). Environment: PORT (Triton's HTTP port, /v2/health/ready),
GRPC_PORT (KServe v2 gRPC), optional TRITON_WORKER_LOG_VERBOSE (Triton's --log-verbose level). Prints
"triton worker ready http=PORT grpc=GRPC_PORT models=identity,counter,slow in S s" once every model is loaded
(6 to 12 s on a 2-core box), then serves until SIGTERM or SIGINT, which stop tritonserver and its Python
backend stubs (2 to 7 s) before the script exits 0.

Models, none batched (max_batch_size 0: the shapes below are exactly what a request sends), one instance each:
  identity  data UINT8 [-1] -> data UINT8 [-1], the same bytes. 16 MiB and more pass (200 MiB was tried):
            tritonclient and Triton both allow gRPC messages up to 2 GiB.
  counter   decoupled (streaming; gRPC ModelStreamInfer only, plain ModelInfer answers UNIMPLEMENTED):
            n INT32 [1], optional delay_ms INT32 [1] -> n responses, value INT32 [1] = 0, 1, ..., n-1, each
            after sleeping delay_ms. n <= 0 sends none (only the empty final one, if the client asks for it).
            Streams run concurrently: the model is async, so one stream's sleeps do not hold another back.
  slow      delay_ms INT32 [1] -> delay_ms INT32 [1] (the same value), after sleeping delay_ms. Unary calls
            queue in Triton and run one at a time: for concurrent slow work use counter streams.
            (More instances would run them side by side, but PyTriton's multi-instance start races on
            its handshake socket and fails now and then on a busy 2-core box.)
"""

from __future__ import annotations

import asyncio
import contextlib
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


async def identity(requests):
    return [{"data": request["data"]} for request in requests]


async def counter(requests):
    # decoupled: each yield is one response for each request; unbatched, Triton passes one request a call
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


def _descendants() -> dict[int, list[str]]:
    """pid -> argv of every process below this one (tritonserver, its stubs and their helpers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, list[str]] = {}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
        todo.extend(children.get(pid, []))
    return found


def _reap(before: dict[int, list[str]]) -> None:
    """What PyTriton's stop can leave behind, removed: stubs ignore SIGTERM and outlive a tritonserver that
    gave up on unloading them (exit timeout, a failed start), and then so do their shared memory region
    and the model folder tritonserver wrote under /tmp (named in the stub's argv, whatever TMPDIR says)."""
    for pid, argv in before.items():
        with contextlib.suppress(OSError):
            if (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0") == argv:
                os.kill(pid, signal.SIGKILL)
    for argv in before.values():
        if argv[0].endswith("/triton_python_backend_stub") and len(argv) > 2:
            model_dir = Path(argv[1]).parent.parent  # /tmp/folderXXXXXX/1/model.py
            if model_dir.name.startswith("folder"):
                shutil.rmtree(model_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / argv[2]).unlink()  # the stub's shm region; gone already after a clean unload


def _workspace_root() -> Path:
    """Where PyTriton copies tritonserver (~30 MB) and its sockets: $TMPDIR, else the working directory.

    Never PyTriton's default ~/.cache/pytriton. A SIGKILLed worker leaves its folder there; the next start
    removes the folders of workers that are gone."""
    root = Path(os.environ.get("TMPDIR") or os.getcwd())
    for old in root.glob("triton-worker-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and not Path("/proc", pid).exists():
            shutil.rmtree(old, ignore_errors=True)
    return root


def main() -> int:
    # The Python backend stub links libpython3.x.so; without this it finds the system's copy (another build of
    # the same version) first and every model fails with "'_thread.RLock' object has no attribute
    # '_recursion_count'". tritonserver and the stubs get PyTriton's copy of os.environ, so no re-exec is needed.
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    http_port, grpc_port = int(os.environ["PORT"]), int(os.environ["GRPC_PORT"])
    # SIGTERM as Ctrl-C: Triton.serve() catches it and stops tritonserver and the models. (PyTriton also sets
    # PR_SET_PDEATHSIG on tritonserver, so a SIGKILL of this process ends it too.)
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
        exit_timeout_secs=3,  # on SIGTERM, in-flight requests and model unloads get this long, not Triton's 30 s
        log_verbose=int(os.environ.get("TRITON_WORKER_LOG_VERBOSE", "0")),
    )
    # no restricted endpoints: tests may read statistics or unload a model without PyTriton's random token
    triton = Triton(config=config, workspace=scratch / "workspace", security_config=TritonSecurityConfig(restricted_endpoints=[]))
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
        inputs=[Tensor(name="n", dtype=np.int32, shape=(1,)), Tensor(name="delay_ms", dtype=np.int32, shape=(1,), optional=True)],
        outputs=[Tensor(name="value", dtype=np.int32, shape=(1,))],
        config=ModelConfig(batching=False, max_batch_size=0, decoupled=True),
    )
    triton.bind(
        model_name="slow",
        infer_func=slow,
        inputs=[Tensor(name="delay_ms", dtype=np.int32, shape=(1,))],
        outputs=[Tensor(name="delay_ms", dtype=np.int32, shape=(1,))],
        config=unbatched,
    )
    status = 0
    tree: dict[int, list[str]] = {}
    try:
        triton.run()  # starts tritonserver and returns once it and every model are ready
        tree = _descendants()
        print(f"triton worker ready http={http_port} grpc={grpc_port} models=identity,counter,slow in {time.monotonic() - started:.1f} s", flush=True)
        triton.serve()  # until SIGTERM/SIGINT (caught inside) or tritonserver's death; it stops Triton either way
    except KeyboardInterrupt:  # a signal before serve() began
        pass
    except Exception:
        logging.exception("triton worker failed")
        status = 1
    finally:
        tree = {**tree, **_descendants()}
        triton.stop()  # a no-op after serve()
        _reap(tree)
        shutil.rmtree(scratch, ignore_errors=True)
    print("triton worker stopped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
