"""Backend.AI pre-start actions, run in order in a replica's work directory before its worker starts."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from appliance.control.process import ReplicaLog, WorkerProcess
from appliance.domain.definitions import PreStartAction
from appliance.domain.runtimes import fill
from appliance.errors import ApplianceError


async def run_pre_start_actions(
    actions: Iterable[PreStartAction], *, work_dir: Path, values: dict[str, str], env: Mapping[str, str], sink: ReplicaLog,
    grace: float = 10.0,
) -> None:
    """Backend.AI pre-start actions, in order. `values` gains {tempfile} / {tempfile_N} for later use.
    Cancelled (the replica is stopped), a running command's process tree is ended within `grace` seconds."""
    temp_count = 0
    for number, action in enumerate(actions):
        args = action.args
        where = f"pre-start action {number} ({action.action})"

        def path_of(raw: str) -> Path:
            p = Path(fill(str(raw), values))
            return p if p.is_absolute() else work_dir / p

        def mode_of(default: int) -> int:
            raw = args.get("mode", default)
            return int(str(raw), 8) if not isinstance(raw, int) or raw > 0o777 else raw

        try:
            if action.action == "write_file":
                target = path_of(args["filename"])
                body = fill(str(args["body"]), values)
                append = bool(args.get("append", False))

                def write(target: Path = target, body: str = body, append: bool = append) -> None:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    existed = target.exists()
                    with open(target, "a" if append else "w", encoding="utf-8") as f:
                        f.write(body)
                    if "mode" in args or not existed:  # appending keeps the mode a file already has
                        target.chmod(mode_of(0o644))

                await asyncio.to_thread(write)
                sink.note(f"{where}: wrote {target}")
            elif action.action == "write_tempfile":
                body = fill(str(args["body"]), values)

                def write_temp(body: str = body) -> str:
                    fd, name = tempfile.mkstemp(suffix=".py", dir=work_dir)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(body)
                    os.chmod(name, mode_of(0o644))
                    return name

                name = await asyncio.to_thread(write_temp)
                values["tempfile"] = values[f"tempfile_{temp_count}"] = name
                temp_count += 1
                sink.note(f"{where}: wrote {name}")
            elif action.action == "mkdir":
                target = path_of(args["path"])
                await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
                sink.note(f"{where}: created {target}")
            elif action.action == "log":
                sink.note(("[debug] " if args.get("debug") else "") + fill(str(args["message"]), values))
            elif action.action == "run_command":
                argv = [fill(str(a), values) for a in args["command"]]
                sink.note(f"{where}: running {argv}")
                proc = await WorkerProcess.spawn(argv, env=env, cwd=work_dir, sink=sink)
                try:
                    code = await proc.wait()
                except asyncio.CancelledError:
                    sink.note(f"{where}: stopped with the replica")
                    await proc.stop(grace)
                    raise
                if code != 0:
                    raise ApplianceError(f"{where}: {argv[0]} exited with code {code}", status=422, code="pre_start_failed")
        except ApplianceError as exc:
            if exc.code == "pre_start_failed":
                raise
            raise ApplianceError(f"{where}: {exc.message}", status=422, code="pre_start_failed") from None
        except (OSError, ValueError) as exc:
            raise ApplianceError(f"{where}: {exc}", status=422, code="pre_start_failed") from None
