"""Commands that act on this box directly, not through the admin API: serve, check-config, demo-model, demo,
admin-key reset. Their heavy imports happen inside each command, so `appliance --help` stays fast."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from appliance.cli.options import SharedOptions, Subcommands, load_cli_config
from appliance.config import default_config_path, load_config
from appliance.errors import ApplianceError


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.server import serve

    return serve(load_cli_config(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from appliance.control.ops.doctor import check_declared

    path = Path(args.path or args.config or default_config_path())
    try:
        config = load_config(path)
    except ApplianceError as exc:
        for p in exc.problems or [exc.message]:
            print(f"{path}: {p}" if not p.startswith(str(path)) else p, file=sys.stderr)
        return 1
    from appliance.control.ops.doctor import gpu_warnings, read_gpus
    from appliance.control.endpoints import resolve

    problems, model_warnings = check_declared(list(config.endpoints), config.models.declared)
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    if problems:
        return 1
    # resources as the folders' definitions complete them (endpoints on registered models: as declared)
    resolved = [resolve(spec)[0] for spec in config.endpoints if spec.model is None]
    wants_gpus = any(c.resources.gpus or c.resources.gpu_share for c in resolved)
    warnings = model_warnings + (gpu_warnings(config, resolved, read_gpus()) if wants_gpus else [])
    for w in warnings:
        print(f"{path}: warning: {w}", file=sys.stderr)
    note = f", {len(warnings)} warning(s)" if warnings else ""
    models = f", {len(config.models.declared)} model(s)" if config.models.declared else ""
    print(f"{path}: OK ({len(config.endpoints)} endpoint(s){models} declared, state in {config.server.state_dir}){note}")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from appliance.demo_model import write_demo_model

    folder = write_demo_model(Path(args.dir), seed=args.seed, overwrite=args.force)
    print(f"wrote a tiny random-weight causal LM to {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo_model import is_current_demo_model, write_demo_config
    from appliance.server import lock_state_dir, serve

    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ApplianceError(
            f"--engine vllm needs vLLM, which is not installed in this Python ({sys.executable}): run "
            "`scripts/setup.sh --with-vllm` (or `scripts/demo.sh --engine vllm`, which does), or leave --engine out "
            "to serve with transformers", code="missing_dependency",
        )
    state = Path(args.state_dir).resolve()
    os.close(lock_state_dir(state))  # a demo already running here: say so before writing or printing anything
    folder = state / "models" / "demo"
    if not is_current_demo_model(folder):
        print(f"demo: writing the demo model (config, tokenizer, random weights) to {folder} ...", end=" ", flush=True)
        started = time.monotonic()
        # In a process of its own: the server that follows never loads torch (less memory, a quiet exit).
        made = subprocess.run([sys.executable, "-m", "appliance", "demo-model", str(folder), "--force"], capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise ApplianceError(f"could not write the demo model: {made.stderr.strip()[-2000:]}", code="demo_model_failed")
        print(f"done ({time.monotonic() - started:.1f} s)", flush=True)
    workers_user, why = demo_workers_user(state)
    if why:
        print(f"demo: {why}", flush=True)
    path = write_demo_config(state, folder, port=args.port, engine=args.engine, workers_user=workers_user)
    key = state / "admin.key"
    config = load_config(path)
    config.server_file.unlink(missing_ok=True)  # a killed run's: no server holds the state dir (the lock said so)
    bin_dir = Path(sys.executable).parent
    print(
        f"demo: model folder {folder}\ndemo: config {path}\ndemo: admin key in {key}\n"
        f"demo: for the CLI in another shell (`appliance endpoint list`, `appliance key create`, ...):\n"
        f"  export PATH=\"{bin_dir}:$PATH\" APPLIANCE_CONFIG=\"{path}\"",
        flush=True,
    )
    if args.port:  # known now; with --port 0 the lines follow once the server has taken one
        print(_try_lines(f"http://127.0.0.1:{args.port}", key), flush=True)
    threading.Thread(target=say_when_ready, args=(config.server_file, key, not args.port), daemon=True).start()
    return serve(config)


def demo_workers_user(state: Path, python: str = sys.executable) -> tuple[str | None, str | None]:
    """`[workers] user` for the demo, and why when it is not the default. As root, workers run as a uid of
    their own; where that uid cannot reach this Python or the state dir (a Python under /root, as pyenv
    puts it), the demo's workers would never start, so there they run as root, said out loud."""
    import pwd

    from appliance.control.host.identity import DEFAULT_ACCOUNT, dynamic_identity

    if os.geteuid() != 0:
        return None, None
    try:
        pwd.getpwnam(DEFAULT_ACCOUNT)
        return None, None  # the account's access is its administrator's to arrange
    except KeyError:
        pass
    identity = dynamic_identity(state)
    blocked = identity.unreachable(python) or identity.unreachable(state.parent)
    if blocked is None:
        return None, None
    return "root", (f"workers run as root: a uid of their own ({identity.uid}) cannot reach {blocked}, on the way to {python} or {state}; "
                    f"to keep model code away from the keys, install where other users can read (or create the {DEFAULT_ACCOUNT} account)")


def _try_lines(url: str, key: Path) -> str:
    return (
        f"demo: web console at {url}/ui (log in with the admin key: paste the contents of {key})\n"
        f"demo: try (the first call waits until the replica is up):\n"
        f"  curl -s {url}/v1/chat/completions -H \"Authorization: Bearer $(cat {key})\" -H 'Content-Type: application/json' "
        f"-d '{{\"model\": \"demo\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'\n"
        f"  {sys.executable} -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}/v1\", api_key=open(\"{key}\").read().strip()); "
        f"print(c.chat.completions.create(model=\"demo\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}], max_tokens=16))'"
    )


def _call(url: str, key: str, body: dict[str, Any] | None = None, timeout: float = 2.0) -> Any:
    """JSON from the appliance at `url` with `key`: a GET, or a POST of `body`."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def say_when_ready(server_file: Path, key_file: Path, try_lines: bool, timeout: float = 900.0, interval: float = 0.5) -> bool:
    """One line once the demo endpoint has answered a chat request through the appliance's URL with the
    demo's key (the server's log says the rest); first the try lines, when they wait for the port the
    server takes. The endpoint's HEALTHY status is only the cue to ask: a replica can pass its health
    check and still fail a request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            url = json.loads(server_file.read_text())["url"]  # the port the server took (--port 0 picks one)
            if try_lines:
                print(_try_lines(url, key_file), flush=True)
                try_lines = False
            key = key_file.read_text().strip()
            if _call(url + "/api/v1/endpoints/demo", key).get("status") == "HEALTHY":
                reply = _call(url + "/v1/chat/completions", key, {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
                              timeout=60.0)
                text = reply["choices"][0]["message"]["content"]
                if isinstance(text, str):
                    print(f"demo: ready: the demo endpoint answers at {url}/v1 (it said {text.strip()[:60]!r})", flush=True)
                    return True
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass  # not up yet, or not answering yet
        threading.Event().wait(interval)
    print(f"demo: the demo endpoint did not answer within {timeout:.0f} s; its replica's log: `appliance endpoint logs demo`", flush=True)
    return False


def cmd_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from appliance.control.ops.doctor import examine

    config = load_cli_config(args)
    try:
        pid = int(json.loads(config.server_file.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pid = None
    checks = examine(config, pid if pid and Path(f"/proc/{pid}").exists() else None)
    if args.json:
        print(json.dumps({"config": str(config.source), "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        marks = {"ok": "ok     ", "warning": "WARNING", "problem": "PROBLEM"}
        for c in checks:
            print(f"{marks[c.status]}  {c.name}: {c.detail}")
            if c.fix:
                print(f"         fix: {c.fix}")
    return 1 if any(c.status == "problem" for c in checks) else 0


def cmd_admin_key_reset(args: argparse.Namespace) -> int:
    from appliance.security.auth import reset_admin_key
    from appliance.store import open_database

    config = load_cli_config(args)
    db = open_database(config.db_path)
    try:
        reset_admin_key(db, config.admin_key_path, time.time())
    finally:
        db.close()
    print(f"a new admin key is in {config.admin_key_path}; the old bootstrap key no longer works")
    return 0


def register(sub: Subcommands, shared: SharedOptions) -> None:
    p = sub.add_parser("serve", parents=[shared.config], help="run the appliance")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", parents=[shared.config], help="validate a config file and print every problem")
    p.add_argument("path", nargs="?")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("doctor", parents=[shared.config], help="check this box against the config: GPUs, engines, cgroups, worker user, ports, state dir, disk, clock")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("demo-model", help="write a tiny random-weight model folder (needs the transformers extra)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing folder")
    p.set_defaults(func=cmd_demo_model)
    p = sub.add_parser("demo", help="serve the tiny demo model on CPU from a fresh state dir")
    p.add_argument("--state-dir", default="demo-state")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                   help="transformers serve (ready in seconds, the default) or real vLLM on CPU (about a minute; needs vLLM: scripts/setup.sh --with-vllm)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("admin-key", help="admin key recovery")
    ak = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = ak.add_parser("reset", parents=[shared.config], help="revoke the bootstrap admin key and write a new one (works offline)")
    r.set_defaults(func=cmd_admin_key_reset)
