"""`appliance endpoint autoscale add|list|update|rm` and `appliance endpoint decisions`: an endpoint's autoscaling
rules and what they decided, through the admin API."""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli.options import SharedOptions, Subcommands, admin_client
from appliance.cli.output import emit, print_table
from appliance.domain.scaling import KNOWN_METRICS

_COMPARATORS = {"<": "LESS_THAN", "<=": "LESS_THAN_OR_EQUAL", ">": "GREATER_THAN", ">=": "GREATER_THAN_OR_EQUAL"}


def _comparator(text: str) -> str:
    return _COMPARATORS.get(text, text.upper())


def _rule_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        "metric_source": args.source, "metric_name": args.metric,
        "comparator": _comparator(args.comparator) if args.comparator else None,
        "threshold": args.threshold, "step_size": args.step, "min_replicas": args.min, "max_replicas": args.max,
        "cooldown_seconds": args.cooldown, "window_seconds": args.window, "enabled": args.enabled,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _rule_line(r: dict[str, Any]) -> list[str]:
    bounds = f"{'-' if r['min_replicas'] is None else r['min_replicas']}..{'-' if r['max_replicas'] is None else r['max_replicas']}"
    return [
        r["id"], f"{r['metric_source']}/{r['metric_name']}", r["comparator"], f"{r['threshold']:g}", f"{r['step_size']:+d}", bounds,
        f"{r['cooldown_seconds']:g}s", f"{r['window_seconds']:g}s", "yes" if r["enabled"] else "no", r["last_triggered_at"] or "-",
    ]


_HEADERS = ["RULE", "METRIC", "COMPARATOR", "THRESHOLD", "STEP", "MIN..MAX", "COOLDOWN", "WINDOW", "ENABLED", "LAST FIRED"]


def cmd_add(args: argparse.Namespace) -> int:
    rule = admin_client(args).request("POST", f"/api/v1/endpoints/{args.name}/autoscaling-rules", body=_rule_fields(args))
    return emit(args, rule, lambda r: print_table([_rule_line(r)], _HEADERS))


def cmd_update(args: argparse.Namespace) -> int:
    rule = admin_client(args).request("PATCH", f"/api/v1/endpoints/{args.name}/autoscaling-rules/{args.id}", body=_rule_fields(args))
    return emit(args, rule, lambda r: print_table([_rule_line(r)], _HEADERS))


def cmd_list(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", f"/api/v1/endpoints/{args.name}/autoscaling-rules")

    def human(d: dict[str, Any]) -> None:
        if not d["data"]:
            print(f"endpoint {args.name} has no autoscaling rules")
        else:
            print_table([_rule_line(r) for r in d["data"]], _HEADERS)

    return emit(args, data, human)


def cmd_rm(args: argparse.Namespace) -> int:
    data = admin_client(args).request("DELETE", f"/api/v1/endpoints/{args.name}/autoscaling-rules/{args.id}")
    return emit(args, data, lambda d: print(f"deleted autoscaling rule {d['id']}"))


def cmd_decisions(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", f"/api/v1/endpoints/{args.name}/decisions", query={"limit": args.limit})

    def human(d: dict[str, Any]) -> None:
        if not d["data"]:
            print(f"endpoint {args.name}: no autoscaling decisions yet")
            return
        rows = [[e["time"], e["kind"].removeprefix("autoscale."), e["message"].removeprefix(f"endpoint {args.name}: ")] for e in d["data"]]
        print_table(rows, ["TIME", "DECISION", "WHY"])

    return emit(args, data, human)


def _rule_flags(q: argparse.ArgumentParser, *, required: bool) -> None:
    metrics = "; ".join(f"{src}: {', '.join(names)}" for src, names in KNOWN_METRICS.items())
    q.add_argument(
        "--source", required=required,
        help="where the metric comes from: gpu, kernel, inference, gateway, or Backend.AI's KERNEL, INFERENCE_FRAMEWORK, PROMETHEUS (any case)",
    )
    q.add_argument("--metric", required=required, help=f"{metrics}; inference: any Prometheus name the replicas export, e.g. vllm:num_requests_waiting")
    q.add_argument("--comparator", required=required, help="<, <=, >, >= or LESS_THAN, LESS_THAN_OR_EQUAL, GREATER_THAN, GREATER_THAN_OR_EQUAL")
    q.add_argument("--threshold", type=float, required=required)
    q.add_argument("--step", type=int, required=required, help="replicas to add (positive) or remove (negative)")
    q.add_argument("--min", type=int, help="lower bound (default: the endpoint's min_replicas)")
    q.add_argument("--max", type=int, help="upper bound (default: the endpoint's max_replicas)")
    q.add_argument("--cooldown", type=float, metavar="SECONDS", help="default 300")
    q.add_argument("--window", type=float, metavar="SECONDS", help="the metric is averaged over this long (default 30)")
    q.add_argument("--enabled", action=argparse.BooleanOptionalAction, default=None)


def register(endpoint_actions: Subcommands, shared: SharedOptions) -> None:
    """Add `endpoint autoscale` and `endpoint decisions` to the actions endpoint.register returned."""
    p = endpoint_actions.add_parser("autoscale", help="autoscaling rules of an endpoint")
    a = p.add_subparsers(dest="autoscale_action", required=True, metavar="ACTION")
    q = a.add_parser("add", parents=[shared.client], help="add a rule, e.g. --source gateway --metric latency_p95 --comparator '>' --threshold 2 --step 1")
    q.add_argument("name", help="endpoint")
    _rule_flags(q, required=True)
    q.set_defaults(func=cmd_add)
    q = a.add_parser("update", parents=[shared.client], help="change a rule's fields")
    q.add_argument("name", help="endpoint")
    q.add_argument("id")
    _rule_flags(q, required=False)
    q.set_defaults(func=cmd_update)
    q = a.add_parser("list", parents=[shared.client], help="the endpoint's rules")
    q.add_argument("name", help="endpoint")
    q.set_defaults(func=cmd_list)
    q = a.add_parser("rm", parents=[shared.client], help="delete a rule")
    q.add_argument("name", help="endpoint")
    q.add_argument("id")
    q.set_defaults(func=cmd_rm)
    q = endpoint_actions.add_parser("decisions", parents=[shared.client], help="autoscaling decisions: changes, suppressed changes, missing metrics")
    q.add_argument("name")
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(func=cmd_decisions)
