"""`appliance gpu list` and `appliance ps`: the box's GPUs, and the endpoints loaded on them, as the running server sees them."""

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


def cmd_ps(args: argparse.Namespace) -> int:
    data = admin_client(args).request("GET", "/api/v1/ps")

    def human(d: dict[str, Any]) -> None:
        rows = [
            [e["endpoint"], e["status"], str(len(e["replicas"])), ",".join(map(str, e["gpus"])) or "-",
             fmt_bytes(e["gpu_claim"]) if e["gpu_claim"] else "-", fmt_bytes(e["host_claim"]) if e["host_claim"] else "-",
             fmt_bytes(e["gpu_memory_used"]) if e["gpu_memory_used"] is not None else "-", str(e["in_flight"]), f"{e['idle_seconds']:.0f}s",
             "pinned" if e["pin"] else ("never" if e["unloads_in_seconds"] is None else f"{e['unloads_in_seconds']:.0f}s")]
            for e in d["data"]
        ]
        print_table(rows, ["ENDPOINT", "STATUS", "REPLICAS", "GPUS", "GPU CLAIM", "HOST CLAIM", "GPU IN USE", "IN FLIGHT", "IDLE", "UNLOADS IN"])
        for m in d["memory"]:
            where = "host memory" if m["device"] == "host" else f"GPU {m['device']}"
            print(f"{where}: {fmt_bytes(m['claimed'])} of {fmt_bytes(m['budget'])} claimed")

    return emit(args, data, human)


def register(sub: Subcommands, shared: SharedOptions) -> None:
    sub.add_parser("ps", parents=[shared.client], help="loaded endpoints: memory claimed and in use, idle time, time until unload").set_defaults(func=cmd_ps)
    p = sub.add_parser("gpu", help="GPUs on this box")
    g = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g.add_parser("list", parents=[shared.client], help="GPUs seen through NVML and which replicas hold them").set_defaults(func=cmd_gpu_list)
