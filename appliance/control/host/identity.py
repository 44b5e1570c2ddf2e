"""Who workers run as. Model code (trust_remote_code, a custom start command, a pre-start action)
must not read the appliance's keys or database: when the appliance runs as root, its workers run
as an unprivileged account of their own (`appliance-worker`), or, where that account does not
exist, as a uid and gid of their own with no passwd entry (as systemd's DynamicUser). The state
directory lets them through to their work directories (0711) without letting them read anything
else in it. Root runs workers only when `workers.user = "root"` says so."""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
DEFAULT_ACCOUNT = "appliance-worker"
# systemd's range for DynamicUser= (61184-65519): distributions keep it free of accounts.
DYNAMIC_RANGE = (61184, 65519)


@dataclass(frozen=True)
class WorkerIdentity:
    user: str  # the account's name, or a label (USER) for a dynamic uid, which has no passwd entry
    uid: int
    gid: int
    account: bool = True  # False: a dynamic uid (no groups to look up: it has none but its own gid)

    def hand_over(self, path: Path) -> None:
        """Give a work directory (and what pre-start actions wrote in it) to the worker account (blocking)."""
        # Descriptor-relative and never following a symlink: a worker (every worker runs as this account)
        # that swaps a directory for a link while this walks must not get a file outside chowned to it.
        for _, dirs, files, at in os.fwalk(path, follow_symlinks=False):
            for name in [*dirs, *files]:
                os.chown(name, self.uid, self.gid, dir_fd=at, follow_symlinks=False)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, self.uid, self.gid)
        finally:
            os.close(fd)

    def unreachable(self, path: str | Path) -> Path | None:
        """The first part of `path` this identity may not pass through (a directory it cannot search)
        or, for the last part, read; None when it can (blocking: a stat per part). Only a dynamic
        uid is checked: an account's groups and ACLs are for its administrator to arrange."""
        if self.account:
            return None
        target = Path(os.path.realpath(path))
        for part in [*reversed(target.parents), target]:
            try:
                st = part.stat()
            except OSError:
                return part
            bits = (st.st_mode >> 6) if st.st_uid == self.uid else (st.st_mode >> 3) if st.st_gid == self.gid else st.st_mode
            need = 0o1 if stat.S_ISDIR(st.st_mode) else 0o4
            if not bits & need:
                return part
        return None


def _running_ids() -> set[int]:
    """Every uid and gid a running process has, real, effective or saved (blocking: one pass over /proc)."""
    ids: set[int] = set()
    for p in psutil.process_iter(["uids", "gids"]):
        for found in (p.info["uids"], p.info["gids"]):
            if found is not None:
                ids.update(found)
    return ids


def _has_entry(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def dynamic_identity(state_dir: Path, *, taken: Callable[[int], bool] | None = None) -> WorkerIdentity:
    """A uid (and a gid of the same number) of the reserved range that no account, group or running
    process has (blocking). The search starts at a number taken from the state directory, so one
    appliance gets the same uid across restarts (its work dirs stay its workers') and two appliances
    on a box start apart."""
    if taken is None:
        running = _running_ids()
        taken = lambda uid: uid in running or _has_entry(uid)  # noqa: E731
    first, last = DYNAMIC_RANGE
    span = last - first + 1
    start = int.from_bytes(hashlib.sha256(str(state_dir.resolve()).encode()).digest()[:4], "big") % span
    for i in range(span):
        uid = first + (start + i) % span
        if not taken(uid):
            return WorkerIdentity(f"appliance-worker-{uid}", uid, uid, account=False)
    raise ApplianceError(f"workers.user: every id of {first}-{last} is taken: create the {DEFAULT_ACCOUNT} account (useradd --system {DEFAULT_ACCOUNT})",
                         code="invalid_config")


def worker_identity(setting: str | None, state_dir: Path) -> WorkerIdentity | None:
    """The identity workers run as; None: the appliance's own user (then say so in the log)."""
    root = os.geteuid() == 0
    if setting == "root" or (setting is None and root):
        if not root:
            raise ApplianceError(f"workers.user = \"root\" needs the appliance to run as root (it runs as uid {os.geteuid()})", code="invalid_config")
        if setting is None:
            raise ApplianceError('workers.user = null would run model code as root: set "root" to mean it, or "auto" (the default) to keep workers '
                                 "away from the appliance's keys", code="invalid_config")
        log.warning('workers run as root (workers.user = "root"): model code can read the appliance\'s keys and database')
        return None
    if setting is None:
        return None
    name = DEFAULT_ACCOUNT if setting == "auto" else setting
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if setting != "auto":
            raise ApplianceError(f"workers.user: no account named {name!r} on this box (useradd --system {name})", code="invalid_config") from None
        if not root:  # an unprivileged appliance cannot switch users; its secrets are 0600 all the same
            log.info("workers run as the appliance's own user (uid %d)", os.geteuid())
            return None
        identity = dynamic_identity(state_dir)
        log.info("workers run as uid %d, gid %d (no account: %s does not exist)", identity.uid, identity.gid, name)
        if (blocked := identity.unreachable(sys.executable)) is not None:
            log.warning('workers (uid %d) cannot reach %s, on the way to this Python (%s): workers it runs will not start; install the appliance '
                        'where other users can read it, create the %s account with access to it, or set workers.user = "root"',
                        identity.uid, blocked, sys.executable, name)
        return identity
    if not root:
        if setting == "auto":  # an unprivileged appliance cannot switch users; its secrets are 0600 all the same
            log.info("workers run as the appliance's own user (uid %d): only an appliance run as root gives them %s", os.geteuid(), name)
            return None
        raise ApplianceError(f"workers.user = {name!r} needs the appliance to run as root (it runs as uid {os.geteuid()})", code="invalid_config")
    if entry.pw_uid == 0:
        raise ApplianceError(f'workers.user: {name!r} is root; say workers.user = "root" to run workers as root', code="invalid_config")
    log.info("workers run as %s (uid %d, group %s)", name, entry.pw_uid, grp.getgrgid(entry.pw_gid).gr_name)
    return WorkerIdentity(name, entry.pw_uid, entry.pw_gid)
