"""The model cache's folders under state_dir/models/<name> (blocking): claimed, filled with the definition
files at registration, published when a warm completes, removed with the model.

A folder the registry made carries a marker file; one it did not make (the demo keeps its model folder
in state_dir/models/demo) is never cleared or removed."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from appliance.control.models.sources import Source
from appliance.control.models.warm import Layout, Tally, copy_files, fsync_tree
from appliance.domain.models import DEFINITIONS_DIR, FileEntry, is_definition
from appliance.errors import ApplianceError

MARKER = ".appliance-model"


def share_tree(root: Path) -> None:
    """Readable by the account workers run as (0755 folders, 0644 files): model files are no secret, and the
    files the appliance writes are otherwise 0640 (umask 027)."""
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def claim_folder(folder: Path) -> None:
    """Make `folder` the registry's (empty, marked); refuse one that holds files of someone else's."""
    marker = folder / MARKER
    if folder.exists() and not marker.exists() and any(folder.iterdir()):
        raise ApplianceError(
            f"{folder} holds files the model registry did not put there (a model folder of its own?): choose another name",
            status=409, code="folder_taken", param="name",
        )
    if marker.exists():  # left by an earlier model of this name
        for child in folder.iterdir():
            if child == marker:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    for path in (folder.parent, folder):
        os.chmod(path, 0o755)


def remove_folder(folder: Path) -> None:
    if (folder / MARKER).exists():
        shutil.rmtree(folder, ignore_errors=True)


def bytes_present(folders: Sequence[Path]) -> int:
    """Bytes already on disk under `folders` (what a resumed warm need not fetch again)."""
    total = 0
    for root in folders:
        for folder, _dirs, files in os.walk(root):
            total += sum(os.lstat(os.path.join(folder, name)).st_size for name in files)
    return total


def fetch_definitions(source: Source, listing: Sequence[FileEntry], folder: Path) -> dict[str, FileEntry]:
    """Copy the model's definition files into folder/.definitions (replaced at once); returns them with their sha256."""
    tmp, partial, final = folder / f"{DEFINITIONS_DIR}.tmp", folder / f"{DEFINITIONS_DIR}.partial", folder / DEFINITIONS_DIR
    for stale in (tmp, partial):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted = [e for e in listing if is_definition(e.path, e.size)]
    learnt: dict[str, FileEntry] = {}
    if wanted:
        full = copy_files(source, wanted, Layout(tmp, partial), parallel=4, cancel=threading.Event(), tally=Tally())
        learnt = {e.path: e for e in full}
        shutil.rmtree(partial, ignore_errors=True)
    share_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return learnt


def seed_definitions(folder: Path, staging: Path, manifest: Sequence[FileEntry]) -> None:
    """The definition files read at registration go into a new staging folder as they are: the warm checks
    them against the manifest instead of reading them from the source again."""
    for entry in manifest:
        kept, dest = folder / DEFINITIONS_DIR / entry.path, staging / entry.path
        if "/" not in entry.path and not dest.exists() and kept.is_file() and kept.stat().st_size == entry.size:
            staging.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, dest)


def publish(staging: Path, final: Path, partial: Path) -> None:
    """The complete copy appears at `final` in one rename: no reader ever sees it half made."""
    share_tree(staging)
    fsync_tree(staging)
    if final.exists():  # a stale copy of the same revision
        shutil.rmtree(final)
    os.rename(staging, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(partial, ignore_errors=True)
