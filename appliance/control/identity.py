"""Who workers run as. Model code (trust_remote_code, a custom start command, a pre-start action)
must not read the appliance's keys or database: when the appliance runs as root, its workers run
as an unprivileged account of their own, and the state directory lets them through to their work
directories (0711) without letting them read anything else in it."""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
DEFAULT_ACCOUNT = "appliance-worker"


@dataclass(frozen=True)
class WorkerIdentity:
    user: str
    uid: int
    gid: int

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


def worker_identity(setting: str | None) -> WorkerIdentity | None:
    """The account workers run as; None: the appliance's own user (then say so in the log)."""
    if setting is None:
        return None
    name = DEFAULT_ACCOUNT if setting == "auto" else setting
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if setting == "auto":
            if os.geteuid() == 0:
                log.warning("workers run as root: create the %s account (useradd --system %s) to keep model code away from the appliance's keys", name, name)
            return None
        raise ApplianceError(f"workers.user: no account named {name!r} on this box (useradd --system {name})", code="invalid_config") from None
    if os.geteuid() != 0:
        if setting == "auto":  # an unprivileged appliance cannot switch users; its secrets are 0600 all the same
            log.info("workers run as the appliance's own user (uid %d): only an appliance run as root gives them %s", os.geteuid(), name)
            return None
        raise ApplianceError(f"workers.user = {name!r} needs the appliance to run as root (it runs as uid {os.geteuid()})", code="invalid_config")
    if entry.pw_uid == 0:
        raise ApplianceError(f"workers.user: {name!r} is root; workers must not be", code="invalid_config")
    log.info("workers run as %s (uid %d, group %s)", name, entry.pw_uid, grp.getgrgid(entry.pw_gid).gr_name)
    return WorkerIdentity(name, entry.pw_uid, entry.pw_gid)
