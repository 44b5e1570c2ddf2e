"""`appliance gpu list`: the box's GPUs as the running server sees them, through its admin API."""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli.options import SharedOptions, Subcommands, admin_client
from appliance.cli.output import emit, print_table
from appliance.domain.memory import fmt_bytes


def cmd_gpu_list(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", "/api/v1/gpus")

    def human(d: dict[str, Any]) -> None:
        if not d["available"]:
            print(d["reason"])
            return
        rows = [
            [str(g["index"]), g["uuid"], g["name"], f"{g['memory_used'] >> 20}/{g['memory_total'] >> 20} MiB",
             f"{g['utilization_gpu']}%" if g["utilization_gpu"] is not None else "-", g["mig_mode"], "yes" if g["allowed"] else "no",
             f"{fmt_bytes(g.get('claimed', 0))}/{fmt_bytes(g.get('budget', 0))}",
             ", ".join(h["replica"] + (f" ({fmt_bytes(h['claim'])})" if h.get("claim") else f" ({h['share']:g})" if h["share"] else "") for h in g["held_by"]) or "-"]
            for g in d["data"]
        ]
        print_table(rows, ["IDX", "UUID", "NAME", "MEMORY", "UTIL", "MIG", "ALLOWED", "CLAIMED/BUDGET", "HELD BY"])

    return emit(args, data, human)


def register(sub: Subcommands, shared: SharedOptions) -> None:
    p = sub.add_parser("gpu", help="GPUs on this box")
    g = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g.add_parser("list", parents=[shared.client], help="GPUs seen through NVML and which replicas hold them").set_defaults(func=cmd_gpu_list)
