"""`appliance model add|list|show|warm|rm`: the model registry on the running server, through its admin API;
`warm` (and `add --wait`) follow the copy with a progress bar. `seal-secret` works on the box directly."""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
from pathlib import Path
from typing import Any

from appliance.cli.options import SharedOptions, Subcommands, admin_client, load_cli_config
from appliance.cli.output import emit, print_table
from appliance.domain.models import size_text
from appliance.errors import ApplianceError

POLL_SECONDS = 0.5


def _source(text: str) -> str:
    # A relative path means relative to where the command runs; the server needs it absolute.
    return text if text.startswith("s3://") else str(Path(text).expanduser().resolve())


def _progress_text(m: dict[str, Any]) -> str:
    p = m["progress"]
    if m["state"] != "WARMING" or not p.get("bytes_total"):
        return "-"
    rate = f", {size_text(p['bytes_per_second'])}/s" if p.get("bytes_per_second") else ""
    eta = f", {p['eta_seconds']:.0f} s left" if p.get("eta_seconds") is not None else ""
    return f"{p['percent']:g}%{rate}{eta}"


def _show(m: dict[str, Any]) -> None:
    p = m["progress"]
    lines = [
        ("name", m["name"]),
        ("state", m["state"] + (f" ({m['last_error']})" if m["last_error"] else "")),
        ("source", m["source"] + (f" at {m['endpoint_url']}" if m.get("endpoint_url") else "")),
        ("credentials", m["credentials"] or ("-" if not m["source"].startswith("s3://") else "the standard AWS chain")),
        ("revision", m["revision"]),
        ("local path", m["local_path"]),
        ("size", f"{size_text(m['size'])} in {m['files']} files"),
        ("progress", _progress_text(m) if m["state"] == "WARMING" else
         (f"{size_text(p.get('bytes_fetched', 0))} fetched in {p.get('elapsed_seconds', 0):.1f} s" if p else "-")),
        ("used by", ", ".join(m["used_by"]) or "-"),
        ("last used", m["last_used_at"] or "-"),
        ("ready since", m["ready_at"] or "-"),
        ("origin", m["origin"]),
        ("description", m["description"] or "-"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def follow_warm(client: Any, name: str, *, quiet: bool) -> dict[str, Any]:
    """Poll the model until it is READY or FAILED, drawing a progress bar on a terminal (a line per
    state change elsewhere); returns the last answer."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    console = Console(stderr=True)
    live = not quiet and console.is_terminal
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), TextColumn("{task.fields[detail]}"),
        console=console, disable=not live, transient=False,
    )
    task = bar.add_task(f"warming {name}", total=None, detail="")
    seen = None
    with bar:
        while True:
            m = client.request("GET", f"/api/v1/models/{name}")
            p = m["progress"]
            if m["state"] != seen and not live and not quiet:
                detail = m["last_error"] or (_progress_text(m) if m["state"] == "WARMING" else "")
                print(m["state"] + (f": {detail}" if detail and detail != "-" else ""), file=sys.stderr, flush=True)
            seen = m["state"]
            if p.get("bytes_total"):
                rate = f"{size_text(p['bytes_per_second'])}/s" if p.get("bytes_per_second") else ""
                eta = f"ETA {p['eta_seconds']:.0f} s" if p.get("eta_seconds") else ""
                files = f"{p.get('files_done', 0)}/{p.get('files_total', 0)} files"
                bar.update(task, total=p["bytes_total"], completed=p.get("bytes_done", 0), detail="  ".join(x for x in (files, rate, eta) if x))
            if m["state"] in ("READY", "FAILED", "REGISTERED", "EVICTED"):
                return m
            threading.Event().wait(POLL_SECONDS)


def _finish(args: argparse.Namespace, m: dict[str, Any]) -> int:
    def human(d: dict[str, Any]) -> None:
        if d["state"] == "READY":
            p = d["progress"]
            print(f"model {d['name']} is READY at {d['local_path']} ({size_text(d['size'])}, {size_text(p.get('bytes_fetched', 0))} fetched "
                  f"in {p.get('elapsed_seconds', 0):.1f} s)")
        else:
            print(f"model {d['name']} is {d['state']}" + (f": {d['last_error']}" if d["last_error"] else ""))

    emit(args, m, human)
    return 0 if m["state"] == "READY" else 1


def cmd_model_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "source": _source(args.source), "warm": not args.no_warm}
    for key in ("revision", "endpoint_url", "region", "credentials", "description"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    client = admin_client(args)
    m = client.request("POST", "/api/v1/models", body)
    if args.wait and not args.no_warm:
        return _finish(args, follow_warm(client, m["name"], quiet=args.json))
    return emit(args, m, lambda d: print(f"registered model {d['name']} ({d['files']} files, {size_text(d['size'])}, revision {d['revision']}): {d['state']}"))


def cmd_model_list(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", "/api/v1/models")

    def human(d: dict[str, Any]) -> None:
        rows = [[m["name"], m["state"], _progress_text(m), size_text(m["size"]), str(m["files"]), m["source"], ", ".join(m["used_by"]) or "-"] for m in d["data"]]
        if not rows:
            print("no models")
            return
        print_table(rows, ["NAME", "STATE", "PROGRESS", "SIZE", "FILES", "SOURCE", "USED BY"])

    return emit(args, data, human)


def cmd_model_show(args: argparse.Namespace) -> int:
    return emit(args, admin_client(args).request("GET", f"/api/v1/models/{args.name}"), _show)


def cmd_model_warm(args: argparse.Namespace) -> int:
    client = admin_client(args)
    m = client.request("POST", f"/api/v1/models/{args.name}/warm")
    if args.no_wait:
        return emit(args, m, lambda d: print(f"model {d['name']}: {d['state']}"))
    return _finish(args, follow_warm(client, args.name, quiet=args.json))


def cmd_model_rm(args: argparse.Namespace) -> int:
    data = admin_client(args).request("DELETE", f"/api/v1/models/{args.name}")
    return emit(args, data, lambda d: print(f"deleted model {d['id']}"))


def cmd_model_seal_secret(args: argparse.Namespace) -> int:
    """Seal a value with this box's secret key, for [models.credentials.<name>] in the config file."""
    from appliance.security.vault import Vault

    config = load_cli_config(args)
    value = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("secret to seal: ")
    if not value:
        raise ApplianceError("nothing to seal: give the secret on stdin or at the prompt", code="usage")
    print(Vault(config.secret_key_path).seal(value))
    return 0


def register(sub: Subcommands, shared: SharedOptions) -> None:
    p = sub.add_parser("model", help="the model registry: register models from paths or S3 and warm them to local disk")
    m = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = m.add_parser("add", parents=[shared.client], help="register a model (and start its warm)")
    a.add_argument("name")
    a.add_argument("source", help="a directory (local disk, an NFS mount) or s3://bucket/prefix")
    a.add_argument("--revision", help="label of this copy (default: a digest of the source's file list)")
    a.add_argument("--endpoint-url", help="S3: an S3-compatible endpoint, e.g. http://minio:9000")
    a.add_argument("--region", help="S3: the bucket's region")
    a.add_argument("--credentials", help="S3: a [models.credentials.<name>] entry of the config (default: the standard AWS chain)")
    a.add_argument("--description")
    a.add_argument("--no-warm", action="store_true", help="only register; `appliance model warm` copies it later")
    a.add_argument("--wait", action="store_true", help="follow the warm with a progress bar until READY (exit 0) or FAILED (exit 1)")
    a.set_defaults(func=cmd_model_add)
    m.add_parser("list", parents=[shared.client], help="models with their state and progress").set_defaults(func=cmd_model_list)
    for action, func, text in (("show", cmd_model_show, "show a model"), ("rm", cmd_model_rm, "delete a model and its local copy")):
        q = m.add_parser(action, parents=[shared.client], help=text)
        q.add_argument("name")
        q.set_defaults(func=func)
    w = m.add_parser("warm", parents=[shared.client], help="copy a model to local disk (or verify its copy), with a progress bar")
    w.add_argument("name")
    w.add_argument("--no-wait", action="store_true", help="start it and return")
    w.set_defaults(func=cmd_model_warm)
    s = m.add_parser("seal-secret", parents=[shared.config], help="seal a secret (read from stdin) for [models.credentials] in the config")
    s.set_defaults(func=cmd_model_seal_secret)

