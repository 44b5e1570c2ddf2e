"""Backend.AI pre-start actions, run in order before a replica's worker starts, as Backend.AI's
kernel runner runs them (kernel/service_actions.py): relative paths are in the replica's work
directory (Backend.AI's /home/work), arguments are filled with the template variables, and an
action with a `ref` stores its result as a variable for later actions and the start command."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from appliance.control.host.identity import WorkerIdentity
from appliance.control.host.process import end_group, resolve_executable
from appliance.control.host.replica_log import LineSplitter, ReplicaLog
from appliance.domain.definitions import PreStartAction
from appliance.domain.templates import WORK_MOUNT, map_paths, render
from appliance.errors import ApplianceError
from appliance.security.vault import mask_argv


def _text(body: Any, newline: str) -> list[str]:
    # Backend.AI iterates the body: a list of lines, each followed by `newline`. A plain string is
    # written as it is here (Backend.AI would iterate its characters, one per line).
    return [body] if isinstance(body, str) else [str(line) + newline for line in body]


def _mode(args: Mapping[str, Any]) -> int:
    raw = args.get("mode", "644")
    return int(str(raw), 8)  # Backend.AI: an octal string; a YAML integer 644 is read the same way here


# The work dir belongs to the worker account (and every worker runs as that account), while these actions
# run as the appliance, root under systemd: a symlink, hard link or FIFO that model code left in the work
# dir (now, earlier, or while the actions run) must not take a write, a chmod or a mkdir out of it. So each
# path is walked one component at a time from a descriptor on the work dir, never following a symlink.
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _through_symlink(given: str) -> ApplianceError:
    return ApplianceError(
        f"{given!r} is or goes through a symlink in the replica's work directory; symlinks are not followed there",
        status=422, code="path_through_symlink",
    )


def _refusal(at: int, name: str, given: str, exc: OSError) -> Exception:
    """Why opening `name` (in the directory `at`) failed, in words that name the action's path."""
    try:
        st = os.stat(name, dir_fd=at, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return _through_symlink(given)
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return _not_regular(given)
    return OSError(exc.errno, exc.strerror, given)


def _not_regular(given: str) -> ApplianceError:
    return ApplianceError(f"{given!r} is not a regular file (a FIFO, socket or device); pre-start actions write only regular files",
                          status=422, code="path_not_regular_file")


def _open_dir(at: int, name: str, given: str, owner: WorkerIdentity | None) -> int:
    """A descriptor on the directory `name` in `at`, made if missing (as Path.mkdir makes it); never a symlink's target."""
    made = False
    while True:
        try:
            fd = os.open(name, _DIR, dir_fd=at)
            break
        except FileNotFoundError:
            if made:  # made, then gone again before it could be opened
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), given) from None
        except OSError as exc:  # ENOTDIR or ELOOP: a symlink or a file stands there
            raise _refusal(at, name, given, exc) from None
        try:
            os.mkdir(name, 0o777, dir_fd=at)
        except FileExistsError:
            pass  # made meanwhile (or a dangling symlink): opened and checked as any other
        made = True
    if owner is not None:
        try:
            os.fchown(fd, owner.uid, owner.gid)  # the worker's, as everything in its work dir
        except BaseException:
            os.close(fd)
            raise
    return fd


def _walk(work_dir: Path, parts: tuple[str, ...], given: str, owner: WorkerIdentity | None) -> int:
    """A descriptor on work_dir/parts…, each directory made as needed, no symlink followed below the work dir."""
    fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the appliance made it, in its own state directory
    try:
        for name in parts:
            inner = _open_dir(fd, name, given, owner)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_file(work_dir: Path, parts: tuple[str, ...], given: str, text: str, append: bool, mode: int, owner: WorkerIdentity | None) -> None:
    """write_file (blocking): parent directories made, then `text` written or appended, then chmod `mode`."""
    if not parts:
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), given)
    at = _walk(work_dir, parts[:-1], given, owner)
    try:
        # O_NOFOLLOW: a symlink is not opened (nor created through, dangling); O_NONBLOCK: a FIFO does not wait
        # for a reader; no O_TRUNC: nothing is cut before the checks below say it is the work dir's own file.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_APPEND if append else 0)
        try:
            fd = os.open(parts[-1], flags, 0o600, dir_fd=at)
        except OSError as exc:
            raise _refusal(at, parts[-1], given, exc) from None
    finally:
        os.close(at)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(given)
        if st.st_nlink > 1:
            raise ApplianceError(f"{given!r} has other hard links; pre-start actions write only files of the work directory's own",
                                 status=422, code="path_hard_linked")
        os.set_blocking(fd, True)
        if not append:
            os.ftruncate(fd, 0)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)  # before the chmod: never a root-owned file with a mode the definition chose
        f.write(text)
        f.flush()
        os.fchmod(fd, mode)


def _write_tempfile(work_dir: Path, text: str, mode: int, owner: WorkerIdentity | None) -> str:
    """write_tempfile (blocking): a new file in the work dir itself. mkstemp makes it with O_CREAT|O_EXCL|O_NOFOLLOW,
    so it is a new file of its own; every change after that goes through its descriptor, not its name."""
    fd, name = tempfile.mkstemp(suffix=".py", dir=work_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        f.write(text)
        f.flush()
        os.fchmod(fd, mode)
    return name


def _make_dirs(work_dir: Path, parts: tuple[str, ...], given: str, owner: WorkerIdentity | None) -> None:
    """mkdir (blocking): as Path.mkdir(parents=True, exist_ok=True), refusing a symlink anywhere on the way."""
    os.close(_walk(work_dir, parts, given, owner))


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

        def path_of(raw: Any) -> tuple[Path, tuple[str, ...], str]:
            # Files land in the replica's work dir (Backend.AI's /home/work) and nowhere else: model code must
            # not write over the appliance's state or another replica's files. This is the lexical half; the
            # file operations walk the returned components without following symlinks (_walk).
            given = fill(raw)
            p = Path(os.path.normpath(work_dir / map_paths(given, {WORK_MOUNT: str(work_dir)})))
            if p != work_dir and work_dir not in p.parents:
                raise ApplianceError(f"{given!r} is outside the replica's work directory (/home/work); pre-start files stay inside it", status=422, code="path_outside_work_dir")
            return p, p.relative_to(work_dir).parts, given

        result: Any = None
        try:
            if action.action == "write_file":
                target, parts, given = path_of(args["filename"])
                text = "".join(fill(part) for part in _text(args["body"], "\n"))
                append, mode = bool(args.get("append", False)), _mode(args)
                await asyncio.to_thread(_write_file, work_dir, parts, given, text, append, mode, identity)
                sink.note(f"{where}: wrote {target}")
            elif action.action == "write_tempfile":
                text = "".join(fill(part) for part in _text(args["body"], ""))  # Backend.AI adds no newlines here
                result = await asyncio.to_thread(_write_tempfile, work_dir, text, _mode(args), identity)
                variables["tempfile"] = variables[f"tempfile_{temp_count}"] = result
                temp_count += 1
                sink.note(f"{where}: wrote {result}")
            elif action.action == "mkdir":
                target, parts, given = path_of(args["path"])
                await asyncio.to_thread(_make_dirs, work_dir, parts, given, identity)
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


RESULT_BYTES = 1 << 20  # of each stream, kept for the action's `ref` (its last bytes); the log has every line


class _Captured:
    """The end of one stream as the `ref` result (bounded), its lines sent to the log as they come."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        self.kept += data
        if len(self.kept) > RESULT_BYTES:
            cut = len(self.kept) - RESULT_BYTES
            del self.kept[:cut]
            self.dropped += cut

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


async def _stream(reader: asyncio.StreamReader, sink: ReplicaLog, kept: _Captured) -> None:
    """A command's output into the replica log line by line as it comes, in bounded memory: the next
    chunk is read once the lines of this one are written (off the event loop)."""
    lines: list[str] = []
    splitter = LineSplitter(lines.append)
    while chunk := await reader.read(1 << 16):
        kept.add(chunk)
        splitter.feed(chunk)
        if lines:
            batch, lines[:] = lines[:], []
            await asyncio.to_thread(_write_all, sink, batch)
    splitter.flush()
    if lines:
        await asyncio.to_thread(_write_all, sink, lines)


def _write_all(sink: ReplicaLog, lines: list[str]) -> None:
    for line in lines:
        sink.write(line)


async def _run_command(
    argv: list[str], *, env: Mapping[str, str], cwd: Path, sink: ReplicaLog, where: str, grace: float, identity: WorkerIdentity | None
) -> dict[str, str]:
    """Backend.AI's run_command: an argv (no shell), output captured and returned as {out, err},
    the exit code noted but not fatal. Here the output also goes to the replica log as it comes (a long
    download shows its progress), and the result keeps the last RESULT_BYTES of each stream."""
    sink.note(f"{where}: running {mask_argv(argv)}")  # read keys may read the log: no secrets in it
    proc = await asyncio.create_subprocess_exec(
        resolve_executable(argv[0]), *argv[1:], cwd=str(cwd), env=dict(env),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        **({"user": identity.uid, "group": identity.gid, "extra_groups": os.getgrouplist(identity.user, identity.gid)} if identity else {}),
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Captured(), _Captured()
    pumps = asyncio.gather(_stream(proc.stdout, sink, out), _stream(proc.stderr, sink, err))
    try:
        await pumps
        await proc.wait()
    except asyncio.CancelledError:
        pumps.cancel()
        sink.note(f"{where}: stopped with the replica")
        await asyncio.to_thread(end_group, proc.pid, grace)
        await proc.wait()
        raise
    for stream, kept in (("stdout", out), ("stderr", err)):
        if kept.dropped:
            sink.note(f"{where}: its {stream} was {kept.dropped + len(kept.kept):,} bytes; the result keeps the last {len(kept.kept):,}")
    sink.note(f"{where}: {argv[0]} exited with code {proc.returncode}" + (" (Backend.AI goes on regardless)" if proc.returncode else ""))
    await asyncio.to_thread(end_group, proc.pid, 0.0)  # a helper it left in its group would outlive the replica otherwise
    return {"out": out.text(), "err": err.text()}
