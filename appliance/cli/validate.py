"""`appliance endpoint validate`: a dry run of an endpoint spec on the running server, its replica's
states and log printed as they happen (a spinner while nothing does), then the verdict."""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any

from appliance.cli.endpoint import endpoint_flags, named_spec
from appliance.cli.options import SharedOptions, Subcommands, admin_client
from appliance.cli.output import Spinner
from appliance.errors import ApplianceError


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from server-sent-event lines."""
    kind, data = "message", ""
    for line in lines:
        if not line:
            if data:
                yield kind, json.loads(data)
            kind, data = "message", ""
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def cmd_endpoint_validate(args: argparse.Namespace) -> int:
    body = named_spec(args, "validate")
    client = admin_client(args)
    events: queue.Queue[tuple[str, dict[str, Any]] | BaseException | None] = queue.Queue()

    def read() -> None:  # a thread: the answer blocks, the spinner must not
        try:
            for event in sse_events(client.lines("/api/v1/endpoints/validate", {"timeout": args.timeout}, method="POST", body=body)):
                events.put(event)
            events.put(None)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which raises it
            events.put(exc)

    threading.Thread(target=read, daemon=True).start()
    spinner = Spinner(not args.json)
    state = "submitting"
    verdict: dict[str, Any] | None = None
    while True:
        try:
            item = events.get(timeout=0.1)
        except queue.Empty:
            spinner.tick(state)
            continue
        spinner.clear()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        kind, data = item
        if args.json:
            print(json.dumps({"event": kind, **data}), flush=True)
        elif kind == "state":
            state = data["state"]
            print(f"[{data['seconds']:7.1f}s] {state:<12} {data['reason']}", flush=True)
        elif kind == "log":
            print(f"           | {data['line']}", flush=True)
        if kind == "verdict":
            verdict = data
    if verdict is None:
        raise ApplianceError("the validation ended without a verdict (the server stopped?)", status=502, code="no_verdict")
    if not args.json:
        if verdict["ok"]:
            print(f"valid: {verdict['reason']}; the replica was stopped (nothing was created)")
        else:
            print(f"FAILED: {verdict['reason']}", file=sys.stderr)
            for line in verdict.get("last_lines", []):
                print(f"  {line}", file=sys.stderr)
    return 0 if verdict["ok"] else 1


def register(actions: Subcommands, shared: SharedOptions) -> None:
    v = actions.add_parser("validate", parents=[shared.client],
                           help="dry run: start one temporary replica of a spec, stream its log and states, report whether it turns healthy")
    v.add_argument("name", nargs="?")
    endpoint_flags(v)
    v.add_argument("--timeout", type=int, metavar="SECONDS", help="give up after this long (default: the health check's worst case)")
    v.set_defaults(func=cmd_endpoint_validate)
