"""`appliance endpoint create|update|list|show|delete|replicas|retry|logs|events`: endpoints on the running
server, through its admin API. `endpoint token` and `endpoint autoscale` hang off the same group but live in
their own modules."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from appliance.cli.options import SharedOptions, Subcommands, admin_client, parse_kv
from appliance.cli.output import Spinner, emit, print_table
from appliance.domain.memory import fmt_bytes
from appliance.config import absolute, read_toml
from appliance.errors import ApplianceError


def _spec_file(path: str) -> dict[str, Any]:
    file = Path(path)
    data = read_toml(file, what="spec file", code="usage")
    # A relative model_folder in the file means relative to the file, not to where the command runs.
    if isinstance(data.get("model_folder"), str):
        data["model_folder"] = absolute(data["model_folder"], file.resolve().parent)
    return data


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Endpoint fields from -f and flags; flags win over the file."""
    body: dict[str, Any] = _spec_file(args.file) if args.file else {}
    if args.model_folder is not None:
        body["model_folder"] = str(Path(args.model_folder).expanduser().resolve())
    if args.model is not None:
        body["model"] = args.model
    simple = {
        "runtime": args.runtime,
        "definition_file": args.definition_file,
        "served_model_name": args.served_model_name,
        "replicas": args.replicas,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "description": args.description,
        "public": args.public,
        "continuous_batching": args.continuous_batching,
        "max_surge": args.max_surge,
        "drain_timeout_seconds": args.drain_timeout,
        "idle_timeout_seconds": args.idle_timeout,
        "wake_timeout_seconds": args.wake_timeout,
        "on_demand": args.on_demand,
        "keep_alive": args.keep_alive,
        "pin": args.pin,
        "priority": args.priority,
    }
    body.update({k: v for k, v in simple.items() if v is not None})
    resources = {"gpus": args.gpus, "gpu_share": args.gpu_share, "cpu": args.cpu, "mem": args.mem}
    if any(v is not None for v in resources.values()):
        body["resources"] = {**body.get("resources", {}), **{k: v for k, v in resources.items() if v is not None}}
    if args.env:
        body["environ"] = {**body.get("environ", {}), **parse_kv(args.env, "--env")}
    if args.secret_env:
        body["secret_environ"] = {**body.get("secret_environ", {}), **parse_kv(args.secret_env, "--secret-env")}
    if args.extra_arg:
        body["extra_args"] = list(args.extra_arg)
    if args.alias:
        body["aliases"] = list(args.alias)
    return body


def _gpu_text(resources: dict[str, Any]) -> str:
    if resources.get("gpus"):
        return f"{resources['gpus']}×GPU"
    if resources.get("gpu_share"):
        return f"{resources['gpu_share']:g} GPU"
    return "-"


def _gpu_list(replica: dict[str, Any]) -> str:
    if not replica["gpus"]:
        return "-"
    text = ",".join(u[:12] for u in replica["gpus"])
    if replica.get("gpu_memory"):
        return f"{text} ({fmt_bytes(replica['gpu_memory'])})"
    return f"{text} ({replica['gpu_share']:g})" if replica["gpu_share"] else text


def _memory_lines(ep: dict[str, Any]) -> list[tuple[str, str]]:
    """The replica's GPU memory claim, where it comes from, and each GPU's budget."""
    est, claim, source = ep.get("memory_estimate"), ep.get("gpu_memory_claim"), ep.get("claim_source", "none")
    what = {"stated": "resources.gpu_memory", "estimate": "estimate + [gpus] claim_overhead, at least", "share": "gpu_share × the GPU's budget",
            "whole": "whole GPUs", "none": "no GPU asked for"}.get(source, source)
    claimed = f"{fmt_bytes(claim)} per replica ({what})" if claim is not None else what
    estimate = "-"
    if est:
        context = f" at {est['max_model_len']} tokens" if est.get("max_model_len") else ""
        estimate = f"weights {fmt_bytes(est['weights'])} + KV cache {fmt_bytes(est['kv_cache'])}{context}"
    budgets = "; ".join(f"GPU {b['index']}: {fmt_bytes(b['claimed'])} of {fmt_bytes(b['budget'])} claimed" for b in ep.get("gpu_budgets", []))
    return [("GPU memory claim", claimed), ("memory estimate", estimate), ("GPU budgets", budgets or "-")]


def _show_endpoint(ep: dict[str, Any]) -> None:
    hc = ep["health_check"]
    lines = [
        ("name", ep["name"]),
        ("status", ep["status"] + (f" ({ep['status_message']})" if ep.get("status_message") else "")),
        ("runtime", ep["runtime"]),
        ("model folder", ep["model_folder"]),
        ("definition file", ep.get("definition_file") or "-"),
        ("served model name", ep["served_model_name"]),
        ("aliases", ", ".join(ep["aliases"]) or "-"),
        ("replicas", f"{ep['desired_replicas']} desired; configured {ep['replicas']} (min {ep['min_replicas']}, max {ep['max_replicas']})"),
        ("scaling", f"surge {ep['max_surge']}, drain {ep['drain_timeout_seconds']:g}s"
         + (f", idle to zero after {ep['idle_timeout_seconds']:g}s, wake up to {ep['wake_timeout_seconds']:g}s" if ep.get("idle_timeout_seconds") else "")),
        ("resources", json.dumps({k: v for k, v in ep["resources"].items() if v not in (None, 0)}) or "{}"),
        *_memory_lines(ep),
        ("environ", ", ".join(f"{k}={v}" for k, v in ep["environ"].items()) or "-"),
        ("extra args", " ".join(ep["extra_args"]) or "-"),
        ("health check", (f"GET {hc['path']} every {hc['interval']:g}s, expect {hc['expected_status_code']}, "
                          f"{hc['max_retries']} retries, timeout {hc['max_wait_time']:g}s, initial delay {hc['initial_delay']:g}s")),
        ("access", "public" if ep["public"] else "private (key required)"),
        ("environment", json.dumps(ep["environment"]) if ep.get("environment") else "-"),
        ("from folder", ", ".join(ep["inherited"]) or "-"),
        ("source", ep["source"]),
        ("generation", str(ep["generation"])),
        ("created", ep["created_at"]),
        ("updated", ep["updated_at"]),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def named_spec(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """A whole endpoint spec from -f, flags and the NAME argument (create, validate)."""
    body = spec_fields(args)
    if args.name:
        body["name"] = args.name
    if "name" not in body:
        raise ApplianceError(f"endpoint {command} needs a NAME (or name in the -f file)", code="usage")
    return body


def cmd_endpoint_create(args: argparse.Namespace) -> int:
    body = named_spec(args, "create")
    client = admin_client(args)
    ep = client.request("POST", "/api/v1/endpoints", body)
    emit(args, ep, lambda e: print(f"created endpoint {e['name']} ({e['runtime']}, {e['replicas']} replica(s)): {e['status']}"))
    return wait_until_served(client, ep["name"], args.wait_timeout, quiet=args.json) if args.wait else 0


def wait_until_served(client: Any, name: str, timeout: float, *, quiet: bool) -> int:
    """Follow an endpoint until HEALTHY (0) or ERROR (1), printing each status it passes through."""
    spinner, seen = Spinner(not quiet), None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ep = client.request("GET", f"/api/v1/endpoints/{name}")
        status = (ep["status"], ep["status_message"])
        if status != seen:
            spinner.clear()
            if not quiet:
                print(f"{ep['status']}: {ep['status_message']}", flush=True)
            seen = status
        if ep["status"] in ("HEALTHY", "ERROR"):
            spinner.clear()
            return 0 if ep["status"] == "HEALTHY" else 1
        spinner.tick(f"waiting for {name}: {ep['status']}")
        threading.Event().wait(0.5)
    spinner.clear()
    raise ApplianceError(f"endpoint {name} was not HEALTHY after {timeout:g} s (it goes on starting; see `appliance endpoint replicas {name}`)",
                         code="timeout")


def cmd_endpoint_update(args: argparse.Namespace) -> int:
    body = spec_fields(args)
    body.pop("name", None)
    if not body:
        raise ApplianceError("nothing to change: give flags or -f spec.toml", code="usage")
    ep = admin_client(args).request("PATCH", f"/api/v1/endpoints/{args.name}", body)
    return emit(args, ep, lambda e: print(f"updated endpoint {e['name']} (generation {e['generation']})"))


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", "/api/v1/endpoints")

    def human(d: dict[str, Any]) -> None:
        rows = [
            [e["name"], e["runtime"], e["status"], str(e["desired_replicas"]), f"{e['min_replicas']}-{e['max_replicas']}",
             _gpu_text(e["resources"]), "public" if e["public"] else "private", e["source"], e["model_folder"]]
            for e in d["data"]
        ]
        if not rows:
            print("no endpoints")
            return
        print_table(rows, ["NAME", "RUNTIME", "STATUS", "REPLICAS", "RANGE", "GPU", "ACCESS", "SOURCE", "MODEL FOLDER"])

    return emit(args, data, human)


def cmd_endpoint_show(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("GET", f"/api/v1/endpoints/{args.name}"), _show_endpoint)


def cmd_endpoint_delete(args: argparse.Namespace) -> int:
    data = admin_client(args).request("DELETE", f"/api/v1/endpoints/{args.name}")
    return emit(args, data, lambda d: print(f"deleted endpoint {d['id']}"))


def cmd_endpoint_events(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", f"/api/v1/endpoints/{args.name}/events", query={"limit": args.limit})
    return emit(args, data, lambda d: print_table([[e["time"], e["kind"], e["message"]] for e in d["data"]], ["TIME", "KIND", "MESSAGE"]))


def _ports(r: dict[str, Any]) -> str:
    """Its HTTP port, and its gRPC one after a slash when it has one."""
    port = str(r["port"] or "-")
    return f"{port}/{r['grpc_port']} (gRPC)" if r.get("grpc_port") else port


def cmd_endpoint_replicas(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", f"/api/v1/endpoints/{args.name}/replicas")

    def human(d: dict[str, Any]) -> None:
        rows = [
            [r["id"], r["state"], str(r["pid"] or "-"), _ports(r), str(r.get("inflight", 0)), _gpu_list(r), str(r["restarts"]),
             str(r["consecutive_failures"]), r["last_probe_result"] or "-", r["last_error"] or "-"]
            for r in d["data"]
        ]
        if not rows:
            print(f"endpoint {args.name} has no replicas")
            return
        print_table(rows, ["REPLICA", "STATE", "PID", "PORT", "IN FLIGHT", "GPUS", "RESTARTS", "FAILS", "LAST PROBE", "LAST ERROR"])

    return emit(args, data, human)


def cmd_endpoint_logs(args: argparse.Namespace) -> int:
    client = admin_client(args)
    rid = args.replica
    if rid is None:
        reps = client.request("GET", f"/api/v1/endpoints/{args.name}/replicas")["data"]
        if not reps:
            raise ApplianceError(f"endpoint {args.name} has no replicas", code="no_replicas")
        rid = reps[0]["id"]
        if len(reps) > 1:
            # On stderr, so that stdout stays the log itself.
            print(f"(replica {rid}; others: {', '.join(r['id'] for r in reps[1:])}; choose with --replica)", file=sys.stderr)
    path = f"/api/v1/endpoints/{args.name}/replicas/{rid}/logs"
    query = {"tail": args.tail, "follow": 1 if args.follow else None, "probes": 1 if args.probes else None}
    for line in client.lines(path, query):
        print(line, flush=True)
    return 0


def cmd_endpoint_load(args: argparse.Namespace) -> int:
    r = admin_client(args).request("POST", f"/api/v1/endpoints/{args.name}/load")
    return emit(args, r, lambda x: print(f"endpoint {x['endpoint']}: {'loading' if x['changed'] else 'already loaded'} ({x['desired_replicas']} desired)"))


def cmd_endpoint_unload(args: argparse.Namespace) -> int:
    r = admin_client(args).request("POST", f"/api/v1/endpoints/{args.name}/unload")
    return emit(args, r, lambda x: print(f"endpoint {x['endpoint']}: {'unloading' if x['changed'] else 'not loaded'}"))


def cmd_endpoint_retry(args: argparse.Namespace) -> int:
    ep = admin_client(args).request("POST", f"/api/v1/endpoints/{args.name}/retry")
    return emit(args, ep, lambda e: print(f"endpoint {e['name']}: error cleared, retrying ({e['status']})"))


def endpoint_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", help="TOML file with endpoint fields (as in a [[endpoints]] entry)")
    p.add_argument("--model-folder", help="model folder on this box")
    p.add_argument("--model", help="a registered model (appliance model add) instead of --model-folder; the endpoint waits while it warms")
    p.add_argument("--runtime", choices=["custom", "vllm", "transformers", "sglang"])
    p.add_argument("--definition-file", help="model definition file name in the folder")
    p.add_argument("--served-model-name")
    p.add_argument("--alias", action="append", help="another model name for this endpoint (repeatable)")
    p.add_argument("--replicas", type=int)
    p.add_argument("--min-replicas", type=int)
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--max-surge", type=int, help="rolling update: replicas started above the desired count at a time (0: drain first)")
    p.add_argument("--drain-timeout", type=float, metavar="SECONDS", help="a leaving replica gets this long to finish its requests")
    p.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="scale to zero after this long without a request (min replicas 0)")
    p.add_argument("--wake-timeout", type=float, metavar="SECONDS", help="longest a request waits for a scaled-to-zero endpoint to start")
    p.add_argument("--on-demand", action=argparse.BooleanOptionalAction, default=None, help="load on the first request; unload after --keep-alive idle, or when evicted")
    p.add_argument("--keep-alive", metavar="DURATION", help="stay loaded this long after the last request: 5m, 1h, 300, 0 (unload once idle), -1 (no idle unload)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None, help="never evicted for another endpoint; loaded first at start")
    p.add_argument("--priority", type=int, help="start order at boot, higher first")
    p.add_argument("--gpus", type=int, help="whole GPUs per replica")
    p.add_argument("--gpu-share", type=float, help="fraction of one GPU per replica (0 < f < 1)")
    p.add_argument("--cpu", type=float)
    p.add_argument("--mem", help="e.g. 8gb")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="worker environment (repeatable)")
    p.add_argument("--secret-env", action="append", metavar="KEY=VALUE", help="worker environment encrypted at rest and masked (repeatable)")
    p.add_argument("--extra-arg", action="append", metavar="ARG", help="appended to the start command (repeatable; use --extra-arg=--flag)")
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--public", action=argparse.BooleanOptionalAction, default=None, help="open without a key (--no-public: private)")
    p.add_argument("--description")


def register(sub: Subcommands, shared: SharedOptions) -> Subcommands:
    """Add `endpoint` and its actions; returns the actions so that other modules can add theirs after these."""
    p = sub.add_parser("endpoint", help="manage endpoints on the running server")
    ep = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = ep.add_parser("create", parents=[shared.client], help="create an endpoint")
    c.add_argument("name", nargs="?")
    endpoint_flags(c)
    c.add_argument("--wait", action="store_true", help="follow the endpoint until it is HEALTHY (exit 0) or in ERROR (exit 1)")
    c.add_argument("--wait-timeout", type=float, default=900.0, metavar="SECONDS", help="give up waiting after this long (default 900)")
    c.set_defaults(func=cmd_endpoint_create)
    u = ep.add_parser("update", parents=[shared.client], help="change an endpoint")
    u.add_argument("name")
    endpoint_flags(u)
    u.set_defaults(func=cmd_endpoint_update)
    ep.add_parser("list", parents=[shared.client], help="list endpoints").set_defaults(func=cmd_endpoint_list)
    for action, func, text in (
        ("show", cmd_endpoint_show, "show an endpoint"),
        ("delete", cmd_endpoint_delete, "delete an endpoint"),
        ("replicas", cmd_endpoint_replicas, "an endpoint's replicas: state, pid, port, GPUs, probes"),
        ("retry", cmd_endpoint_retry, "clear the endpoint's error and restart failed replicas now"),
        ("load", cmd_endpoint_load, "load an endpoint that has no replica, as its first request would"),
        ("unload", cmd_endpoint_unload, "unload an on-demand endpoint: its replicas drain and stop"),
    ):
        q = ep.add_parser(action, parents=[shared.client], help=text)
        q.add_argument("name")
        q.set_defaults(func=func)
    q = ep.add_parser("logs", parents=[shared.client], help="a replica's log")
    q.add_argument("name")
    q.add_argument("--replica", help="replica id (default: the first listed)")
    q.add_argument("--tail", type=int, default=100, help="lines from the end (default 100)")
    q.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    q.add_argument("--probes", action="store_true", help="show the worker's access lines of passing health probes too (hidden by default)")
    q.set_defaults(func=cmd_endpoint_logs)
    e = ep.add_parser("events", parents=[shared.client], help="an endpoint's audit events, newest first")
    e.add_argument("name")
    e.add_argument("--limit", type=int, default=50)
    e.set_defaults(func=cmd_endpoint_events)
    return ep
