"""Pre-start file actions run as the appliance (root under systemd) in a work dir the worker account
owns: they must not follow a symlink (or a hard link, or a FIFO) the worker left there out of it."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.control.host.identity import WorkerIdentity
from appliance.control.host.prestart import run_pre_start_actions
from appliance.control.host.replica_log import ReplicaLog
from appliance.domain.definitions import PreStartAction
from appliance.errors import ApplianceError


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[ReplicaLog]:
    log = ReplicaLog(tmp_path / "replica.log", 1 << 20, 1)
    yield log
    log.close()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory the worker must not reach, with a file in it (think /etc and /etc/passwd)."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("root only\n")
    (tmp_path / "outside" / "secret").chmod(0o600)
    return tmp_path / "outside"


async def run(work: Path, sink: ReplicaLog, *actions: dict[str, Any], variables: dict[str, Any] | None = None,
              identity: WorkerIdentity | None = None) -> dict[str, Any]:
    variables = {} if variables is None else variables
    await run_pre_start_actions([PreStartAction(**a) for a in actions], work_dir=work, variables=variables,
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, sink=sink, identity=identity)
    return variables


def untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "root only\n"
    assert stat.S_IMODE((outside / "secret").stat().st_mode) == 0o600


async def refused(work: Path, sink: ReplicaLog, *actions: dict[str, Any], says: str = "symlink") -> str:
    with pytest.raises(ApplianceError) as info:
        await run(work, sink, *actions)
    assert info.value.status == 422 and says in info.value.message
    return info.value.message


@pytest.mark.parametrize("filename", ["r/x", "r/etc/cron.d/x", "/home/work/r/x"])
async def test_write_file_through_a_planted_directory_symlink_is_refused(work: Path, outside: Path, sink: ReplicaLog, filename: str) -> None:
    (work / "r").symlink_to(outside)
    message = await refused(work, sink, {"action": "write_file", "args": {"filename": filename, "body": ["* * * * * root sh"], "mode": "644"}})
    assert f"pre-start action 0 (write_file): {filename!r}" in message and "symlinks are not followed" in message
    untouched(outside)


async def test_write_file_through_a_symlink_a_run_command_made_is_refused(work: Path, outside: Path, sink: ReplicaLog) -> None:
    message = await refused(
        work, sink,
        {"action": "run_command", "args": {"command": ["ln", "-s", str(outside), "r"]}},
        {"action": "write_file", "args": {"filename": "r/etc/cron.d/x", "body": ["x"]}},
    )
    assert (work / "r").is_symlink() and "pre-start action 1 (write_file)" in message
    untouched(outside)


async def test_a_symlink_deeper_down_is_refused_and_nothing_is_created_beyond_it(work: Path, outside: Path, sink: ReplicaLog) -> None:
    (work / "a").mkdir()
    (work / "a" / "b").symlink_to(outside)
    await refused(work, sink, {"action": "write_file", "args": {"filename": "a/b/c/d/x", "body": ["x"]}})
    await refused(work, sink, {"action": "mkdir", "args": {"path": "a/b/c/d"}})
    untouched(outside)


@pytest.mark.parametrize("args", [{"body": ["x"]}, {"body": ["x"], "append": True}, {"body": ["x"], "mode": "666"}, {"body": "x", "mode": "4777"}])
async def test_a_final_symlink_to_an_outside_file_is_neither_written_nor_chmodded(work: Path, outside: Path, sink: ReplicaLog, args: dict[str, Any]) -> None:
    (work / "cfg").symlink_to(outside / "secret")
    await refused(work, sink, {"action": "write_file", "args": {"filename": "cfg", **args}})
    untouched(outside)
    (work / "dangling").symlink_to(outside / "new")  # a link to a file not there yet: not created through it
    await refused(work, sink, {"action": "write_file", "args": {"filename": "dangling", **args}})
    untouched(outside)


async def test_mkdir_through_or_onto_a_symlink_is_refused(work: Path, outside: Path, sink: ReplicaLog) -> None:
    (work / "r").symlink_to(outside)
    await refused(work, sink, {"action": "mkdir", "args": {"path": "r/new"}})
    await refused(work, sink, {"action": "mkdir", "args": {"path": "/home/work/r/new/deeper"}})
    await refused(work, sink, {"action": "mkdir", "args": {"path": "r"}})
    untouched(outside)


async def test_a_hard_link_to_an_outside_file_is_not_written(work: Path, outside: Path, sink: ReplicaLog) -> None:
    os.link(outside / "secret", work / "cfg")  # protected_hardlinks stops this for others' files; do not count on it
    await refused(work, sink, {"action": "write_file", "args": {"filename": "cfg", "body": ["x"], "mode": "666"}}, says="hard link")
    untouched(outside)


async def test_a_fifo_is_refused_without_blocking(work: Path, sink: ReplicaLog) -> None:
    os.mkfifo(work / "pipe")
    task = asyncio.ensure_future(refused(work, sink, {"action": "write_file", "args": {"filename": "pipe", "body": ["x"]}}, says="not a regular file"))
    done, _ = await asyncio.wait({task}, timeout=10)
    if not done:  # the open waits for a reader: give it one, so that the thread it blocks ends
        reader = os.open(work / "pipe", os.O_RDONLY | os.O_NONBLOCK)
        try:
            await asyncio.wait({task}, timeout=10)
        finally:
            os.close(reader)
        task.cancel()
        pytest.fail("write_file blocked opening a FIFO")
    task.result()


@pytest.mark.parametrize("as_worker", [False, True])
async def test_ordinary_files_and_directories_still_work(work: Path, sink: ReplicaLog, as_worker: bool) -> None:
    # as_worker: what the actions make is handed to the worker account as it is made (here: this test's own account)
    identity = WorkerIdentity("me", os.getuid(), os.getgid()) if as_worker else None
    (work / "existing").write_text("a much longer old content\n")
    (work / "models").mkdir()
    (work / "models" / "real").mkdir()
    variables = await run(
        work, sink,
        {"action": "mkdir", "args": {"path": "conf/deep/er"}},
        {"action": "mkdir", "args": {"path": "conf/deep"}},  # already there: fine
        {"action": "mkdir", "args": {"path": "/home/work"}},  # the work dir itself: fine
        {"action": "write_file", "args": {"filename": "conf/app.cfg", "body": ["port={port}", "b"], "mode": "600"}},
        {"action": "write_file", "args": {"filename": "conf/app.cfg", "body": ["c"], "append": True, "mode": "640"}},
        {"action": "write_file", "args": {"filename": "/home/work/new/sub/f.txt", "body": "plain {port}"}},
        {"action": "write_file", "args": {"filename": "existing", "body": ["short"], "mode": "755"}},
        {"action": "write_file", "args": {"filename": "models/./real/../real/w", "body": ["w"]}},
        {"action": "write_tempfile", "args": {"body": ["print(", "{port})"], "mode": "700"}, "ref": "script"},
        {"action": "write_tempfile", "args": {"body": ["two"]}},
        variables={"port": 8123}, identity=identity,
    )
    assert (work / "conf" / "deep" / "er").is_dir()
    cfg = work / "conf" / "app.cfg"
    assert cfg.read_text() == "port=8123\nb\nc\n" and stat.S_IMODE(cfg.stat().st_mode) == 0o640
    assert (work / "new" / "sub" / "f.txt").read_text() == "plain 8123"
    assert stat.S_IMODE((work / "new" / "sub" / "f.txt").stat().st_mode) == 0o644
    assert (work / "existing").read_text() == "short\n" and stat.S_IMODE((work / "existing").stat().st_mode) == 0o755
    assert (work / "models" / "real" / "w").read_text() == "w\n"
    first, second = Path(variables["tempfile_0"]), Path(variables["tempfile_1"])
    assert variables["script"] == str(first) and variables["tempfile"] == str(second)
    assert first.parent == work and first.suffix == ".py" and first.read_text() == "print(8123)"
    assert stat.S_IMODE(first.stat().st_mode) == 0o700 and stat.S_IMODE(second.stat().st_mode) == 0o644
    assert second.read_text() == "two"


async def test_paths_outside_the_work_dir_are_still_refused(work: Path, outside: Path, sink: ReplicaLog) -> None:
    for action in ({"action": "write_file", "args": {"filename": str(outside / "x"), "body": ["x"]}},
                   {"action": "write_file", "args": {"filename": "../outside/x", "body": ["x"]}},
                   {"action": "mkdir", "args": {"path": "/home/work/../outside/x"}}):
        await refused(work, sink, action, says="outside the replica's work directory")
    untouched(outside)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another account needs root")
def test_handing_a_work_dir_over_never_follows_a_symlink_out_of_it(tmp_path: Path) -> None:
    # (the walk is descriptor-relative too, so a link swapped in while it runs is not followed either)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "f").write_text("y")
    (work / "link").symlink_to(outside)
    (work / "file-link").symlink_to(outside / "secret")
    nobody = WorkerIdentity("nobody", 65534, 65534)
    nobody.hand_over(work)
    assert {p.stat().st_uid for p in (work, work / "sub", work / "sub" / "f")} == {65534}
    assert (work / "link").lstat().st_uid == 65534  # the link itself is the worker's
    assert (outside / "secret").stat().st_uid == 0 and outside.stat().st_uid == 0  # what it points at is not
