"""At start: the workers an earlier run of the appliance left behind (it was killed, or the box lost
power mid-stop) are ended before any port or GPU is handed out again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from appliance.control.host.cgroups import Isolation
from appliance.control.host.process import stop_orphan
from appliance.domain.states import ReplicaState
from appliance.store import Store


async def stop_orphans(store: Store, isolation: Isolation, grace: float) -> None:
    """End every leftover replica cgroup, and every recorded worker pid still running as that process
    (its start time checked), with one grace period for all; then forget the old replica rows."""
    cgroups = isolation.cgroups
    leaves = await asyncio.to_thread(cgroups.leftovers) if cgroups else []
    held = {leaf.name for leaf in leaves}  # a leaf holds its replica's whole tree: ending it is enough
    rows = [r for r in await store.replicas.all() if r["pid"] and r["state"] != ReplicaState.TERMINATED.value and r["id"] not in held]

    async def stop(row: dict[str, Any]) -> None:
        if await asyncio.to_thread(stop_orphan, row["pid"], row["pid_started_at"], grace):
            await store.events.add(
                "replica.orphan_stopped",
                f"stopped worker pid {row['pid']} of replica {row['id']} left by an earlier run",
                endpoint=row["endpoint"],
                details={"replica": row["id"], "pid": row["pid"]},
            )

    async def stop_leaf(leaf: Path) -> None:
        assert cgroups is not None
        populated = await asyncio.to_thread(cgroups.populated, leaf)
        await asyncio.to_thread(cgroups.end, leaf, grace)
        if not populated:
            return
        await store.events.add(
            "replica.orphan_stopped", f"ended cgroup {leaf} of replica {leaf.name} left by an earlier run",
            endpoint=leaf.name.rsplit("-", 1)[0], details={"replica": leaf.name, "cgroup": str(leaf)},
        )

    await asyncio.gather(*(stop_leaf(leaf) for leaf in leaves), *(stop(row) for row in rows))  # one grace period in all, not one each
    await store.replicas.clear()
