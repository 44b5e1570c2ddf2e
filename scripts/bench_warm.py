"""Warm throughput of the model registry, against the plain tools, in the same run.

Local: a folder of SIZE (default 2 GiB, in --files shards plus a config.json) is copied with `cp -r`
and warmed by the appliance's registry (listing, definition files, parallel copy with sha256,
fsync, atomic rename), in turn, --runs times each, with the wall and CPU time of each; the ratio is
cp's time over the warm's (the warm's throughput as a fraction of cp's: target ≥ 0.8). `cp -r`
followed by `sync` is shown too, since the warm's copy is on disk when it reports READY and cp's
need not be, and so is the warm with fsync turned off in this process (a diagnostic, not a setting).

S3: moto's standalone server on a loopback port holds --s3-size of shards under one prefix; boto3
downloads the prefix through one transfer manager with 10 requests at a time, with the AWS CLI's
8 MiB ranged parts and with one GET per object, and the registry warms it from the same prefix; the
ratios are boto3's times over the warm's.

With --cold (root only) the page cache is dropped before each local copy: the source is read from
the disk, as a model on a disk or an NFS mount usually is, rather than from memory.

Free space is checked first (four copies of the local folder must fit, with 1 GiB to spare);
everything made is removed at the end. Run: .venv/bin/python scripts/bench_warm.py [--size 2gb]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.config import parse_config
from appliance.control.models import warm as warm_module
from appliance.control.models.registry import Registry
from appliance.domain.models import ModelSpec, size_text
from appliance.domain.specs import parse_bytes
from appliance.security.vault import Vault
from appliance.store import Store

TARGET = 0.8


def make_folder(root: Path, size: int, files: int) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    block = os.urandom(8 << 20)  # incompressible, written over and over: making the folder costs no CPU to speak of
    per = size // files
    for i in range(files):
        with open(root / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            left = per
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
    subprocess.run(["sync"], check=True)


async def warm_once(root: Path, name: str, source: str, **extra: Any) -> float:
    state = root / f"state-{name}"
    config = parse_config({"server": {"state_dir": str(state)}, "models": {"min_free_bytes": "0"}}, base=root)
    store = Store(config.db_path, time.time)
    await store.open()
    registry = Registry(config, store, time.time, Vault(config.secret_key_path))
    started = time.perf_counter()
    await registry.register(ModelSpec(name=name, source=source, **extra))
    while True:
        row = await store.models.get(name)
        assert row is not None
        if row["state"] == "READY":
            took = time.perf_counter() - started
            break
        if row["state"] == "FAILED":
            raise SystemExit(f"warm failed: {row['last_error']}")
        await asyncio.sleep(0.05)  # a coarse poll: the copy threads need the CPU more than this loop
    await registry.stop()
    await store.close()
    shutil.rmtree(state)
    return took


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drop_page_cache() -> None:
    """Written-back pages out of memory: the next read of the source comes from the disk (root only)."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(kind: str, work: Path, src: Path, i: int, cold: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one copy of `src`; what it made is removed and synced away after.
    cold: the page cache is dropped first, so the source is read from the disk, as a model's usually is."""
    dst = work / f"{kind}-{i}"
    if cold:
        drop_page_cache()
    cpu0, cpu0_self = cpu_of_children(), cpu_of_self()
    started = time.perf_counter()
    if kind == "cp":
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    elif kind == "cp+sync":
        subprocess.run(["sh", "-c", f"cp -r '{src}' '{dst}' && sync"], check=True)
    else:
        real = os.fsync, warm_module.start_writeback
        if kind == "warm-nofsync":  # a diagnostic: what writing to disk before READY costs
            os.fsync, warm_module.start_writeback = (lambda fd: None), (lambda fd, offset, length: None)
        try:
            asyncio.run(warm_once(work, f"{kind.replace('-', '')}{i}", str(src)))
        finally:
            os.fsync, warm_module.start_writeback = real
    took = time.perf_counter() - started
    cpu = (cpu_of_children() - cpu0) + (cpu_of_self() - cpu0_self)
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    return took, cpu


def bench_local(work: Path, size: int, files: int, runs: int, cold: bool = False) -> None:
    src = work / "src"
    print(f"local: making {size_text(size)} in {files} shards at {src} ...", flush=True)
    make_folder(src, size, files)
    total = sum(p.stat().st_size for p in src.iterdir())
    kinds = ["cp", "warm", "cp+sync", "warm-nofsync"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(runs):
        order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]  # each kind in every position: drift spreads evenly
        for kind in order:
            took, cpu = measure(kind, work, src, i, cold)
            times[kind].append(took)
            cpus[kind].append(cpu)
        print(f"  run {i + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s ({cpus[k][-1]:.2f} CPU s)" for k in kinds), flush=True)
    med = statistics.median
    print(f"local {size_text(total)}, {'cold page cache (read from disk)' if cold else 'source in the page cache'}, medians of {runs}: " + ", ".join(
        f"{k} {total / med(times[k]) / 2**20:.0f} MiB/s ({med(cpus[k]):.2f} CPU s)" for k in kinds))
    ratio = med(times["cp"]) / med(times["warm"])
    print(f"RATIO local warm / cp -r: {ratio:.2f} ({'meets' if ratio >= TARGET else 'misses'} the {TARGET} target); "
          f"warm / (cp -r && sync): {med(times['cp+sync']) / med(times['warm']):.2f}; "
          f"without fsync: warm / cp -r {med(times['cp']) / med(times['warm-nofsync']):.2f}")
    shutil.rmtree(src)


def bench_s3(work: Path, size: int, files: int, runs: int) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    log = work / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"moto server did not start: {log.read_text()}")
            time.sleep(0.05)
        url = f"http://127.0.0.1:{found.group(1)}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="bench")
        src = work / "s3-src"
        print(f"s3: uploading {size_text(size)} in {files} shards to {url} ...", flush=True)
        make_folder(src, size, files)
        for p in src.iterdir():
            client.upload_file(str(p), "bench", f"model/{p.name}")
        total = sum(p.stat().st_size for p in src.iterdir())
        shutil.rmtree(src)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="bench", Prefix="model/")["Contents"]]
        # The AWS CLI's settings (8 MiB ranged parts, 10 requests at a time), and one GET per object
        # (what the warm does): moto answers each ranged GET from the whole object, so parts cost it more.
        baselines = {"boto3 parts": TransferConfig(max_concurrency=10), "boto3 whole": TransferConfig(max_concurrency=10, multipart_threshold=1 << 40)}
        times: dict[str, list[float]] = {k: [] for k in [*baselines, "warm"]}
        for i in range(runs):
            for name, transfer in baselines.items():
                dst = work / f"boto3-{i}"
                dst.mkdir()
                started = time.perf_counter()
                with create_transfer_manager(client, transfer) as manager:
                    for done in [manager.download("bench", k, str(dst / Path(k).name)) for k in keys]:
                        done.result()
                times[name].append(time.perf_counter() - started)
                shutil.rmtree(dst)
            times["warm"].append(asyncio.run(warm_once(work, f"s3{i}", "s3://bench/model", endpoint_url=url)))
            print(f"  run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        med = statistics.median
        print(f"s3 {size_text(total)}, medians of {runs}: " + ", ".join(f"{k} {total / med(v) / 2**20:.0f} MiB/s" for k, v in times.items()))
        print(f"RATIO s3 warm / boto3 (one GET per object): {med(times['boto3 whole']) / med(times['warm']):.2f}; "
              f"warm / boto3 (AWS CLI settings): {med(times['boto3 parts']) / med(times['warm']):.2f}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2gb", help="local folder size (default 2gb)")
    parser.add_argument("--files", type=int, default=8, help="shards of the local folder (default 8)")
    parser.add_argument("--s3-size", default="1gb", help="size under the S3 prefix (default 1gb; moto keeps it in memory); 0 skips S3")
    parser.add_argument("--s3-files", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (medians reported)")
    parser.add_argument("--dir", default=None, help="where to work (default: a temporary directory)")
    parser.add_argument("--cold", action="store_true",
                        help="local: drop the page cache before each copy (root), so the source is read from the disk as a model's usually is")
    args = parser.parse_args()
    size, s3_size = parse_bytes(args.size), parse_bytes(args.s3_size)
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    need = 4 * max(size, s3_size) + (1 << 30)  # the source, cp's copy (removed before the warm), the warm's copy, staging
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"not enough free space under {base}: {size_text(free)} free, {size_text(need)} needed; use --size or --dir", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-warm-", dir=base))
    try:
        print(f"working in {work} ({size_text(free)} free); {os.cpu_count()} CPUs")
        if size:
            bench_local(work, size, args.files, args.runs, args.cold)
        if s3_size:
            bench_s3(work, s3_size, args.s3_files, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
