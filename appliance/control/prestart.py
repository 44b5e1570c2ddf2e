"""Backend.AI pre-start actions, run in order before a replica's worker starts, as Backend.AI's
kernel runner runs them (kernel/service_actions.py): relative paths are in the replica's work
directory (Backend.AI's /home/work), arguments are filled with the template variables, and an
action with a `ref` stores its result as a variable for later actions and the start command."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from appliance.control.identity import WorkerIdentity
from appliance.control.process import end_group, resolve_executable
from appliance.control.replica_log import ReplicaLog
from appliance.domain.definitions import PreStartAction
from appliance.domain.templates import WORK_MOUNT, map_paths, render
from appliance.errors import ApplianceError


def _text(body: Any, newline: str) -> list[str]:
    # Backend.AI iterates the body: a list of lines, each followed by `newline`. A plain string is
    # written as it is here (Backend.AI would iterate its characters, one per line).
    return [body] if isinstance(body, str) else [str(line) + newline for line in body]


def _mode(args: Mapping[str, Any]) -> int:
    raw = args.get("mode", "644")
    return int(str(raw), 8)  # Backend.AI: an octal string; a YAML integer 644 is read the same way here


async def run_pre_start_actions(
    actions: Iterable[PreStartAction], *, work_dir: Path, variables: dict[str, Any], env: Mapping[str, str], sink: ReplicaLog,
    grace: float = 10.0, identity: WorkerIdentity | None = None,
) -> None:
    """Run `actions` in order; `variables` gains each `ref`'s result (and {tempfile} / {tempfile_N}).
    Cancelled (the replica is stopped), a running command's process tree is ended within `grace` seconds."""
    work_dir = Path(os.path.normpath(work_dir))
    temp_count = 0
    for number, action in enumerate(actions):
        args = action.args
        where = f"pre-start action {number} ({action.action})"

        def fill(raw: Any, where: str = where) -> str:
            return render(str(raw), variables, where=where)

        def path_of(raw: Any) -> Path:
            # Files land in the replica's work dir (Backend.AI's /home/work) and nowhere else: model code must
            # not write over the appliance's state or another replica's files.
            given = fill(raw)
            p = Path(os.path.normpath(work_dir / map_paths(given, {WORK_MOUNT: str(work_dir)})))
            if p != work_dir and work_dir not in p.parents:
                raise ApplianceError(f"{given!r} is outside the replica's work directory (/home/work); pre-start files stay inside it", status=422, code="path_outside_work_dir")
            return p

        result: Any = None
        try:
            if action.action == "write_file":
                target = path_of(args["filename"])
                text = "".join(fill(part) for part in _text(args["body"], "\n"))
                append, mode = bool(args.get("append", False)), _mode(args)

                def write(target: Path = target, text: str = text, append: bool = append, mode: int = mode) -> None:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "a" if append else "w", encoding="utf-8") as f:
                        f.write(text)
                    target.chmod(mode)

                await asyncio.to_thread(write)
                sink.note(f"{where}: wrote {target}")
            elif action.action == "write_tempfile":
                text = "".join(fill(part) for part in _text(args["body"], ""))  # Backend.AI adds no newlines here
                mode = _mode(args)

                def write_temp(text: str = text, mode: int = mode) -> str:
                    fd, name = tempfile.mkstemp(suffix=".py", dir=work_dir)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(text)
                    os.chmod(name, mode)
                    return name

                result = await asyncio.to_thread(write_temp)
                variables["tempfile"] = variables[f"tempfile_{temp_count}"] = result
                temp_count += 1
                sink.note(f"{where}: wrote {result}")
            elif action.action == "mkdir":
                target = path_of(args["path"])
                await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
                sink.note(f"{where}: created {target}")
            elif action.action == "log":
                sink.note(("[debug] " if args.get("debug") else "") + fill(args["message"]))
            elif action.action == "run_command":
                argv = [fill(a) for a in args["command"]]
                result = await _run_command(argv, env=env, cwd=work_dir, sink=sink, where=where, grace=grace, identity=identity)
        except ApplianceError as exc:
            if exc.code == "undefined_template_variable":
                raise ApplianceError(exc.message, status=422, code="pre_start_failed") from None
            raise ApplianceError(f"{where}: {exc.message}", status=422, code="pre_start_failed") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ApplianceError(f"{where}: {exc}", status=422, code="pre_start_failed") from None
        if action.ref:
            variables[action.ref] = result


async def _run_command(
    argv: list[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, where: str, grace: float, identity: WorkerIdentity | None
) -> dict[str, str]:
    """Backend.AI's run_command: an argv (no shell), output captured and returned as {out, err},
    the exit code noted but not fatal. Here the output also goes to the replica log."""
    sink.note(f"{where}: running {argv}")
    proc = await asyncio.create_subprocess_exec(
        resolve_executable(argv[0]), *argv[1:], cwd=str(cwd), env=dict(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        **({"user": identity.uid, "group": identity.gid, "extra_groups": os.getgrouplist(identity.user, identity.gid)} if identity else {}),
    )
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:
        sink.note(f"{where}: stopped with the replica")
        await asyncio.to_thread(end_group, proc.pid, grace)
        await proc.wait()
        raise
    text_out, text_err = out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace")
    for line in (text_out + text_err).splitlines():
        sink.write(line)
    sink.note(f"{where}: {argv[0]} exited with code {proc.returncode}" + (" (Backend.AI goes on regardless)" if proc.returncode else ""))
    await asyncio.to_thread(end_group, proc.pid, 0.0)  # a helper it left in its group would outlive the replica otherwise
    return {"out": text_out, "err": text_err}
