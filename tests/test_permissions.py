"""What `appliance serve` creates is not readable by other users: the state directory and its
secrets are the appliance user's alone, logs are 0640."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_supervisor import fake_folder, server_config

pytestmark = pytest.mark.process


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private_and_logs_are_not_world_readable(server_factory: Any, tmp_path: Path) -> None:
    folder = fake_folder(tmp_path, "perm")
    config = server_config(tmp_path, f'[[endpoints]]\nname = "perm"\nmodel_folder = "{folder}"\n')
    state = tmp_path / "state"
    assert not state.exists()
    server = server_factory(config).start()
    logs = state / "logs"
    wait_for(lambda: any(logs.glob("perm-*.log")), what="a replica log")
    assert mode(state) == 0o700
    for secret in ("appliance.db", "admin.key", "secret.key", "jwt.key"):
        if (state / secret).exists():
            assert mode(state / secret) == 0o600, secret
    assert mode(state / "appliance.db") == 0o600
    log = next(logs.glob("perm-*.log"))
    assert mode(log) & 0o007 == 0 and mode(log) & 0o600 == 0o600  # 0640 at most
    assert server.stop() == 0
