"""Workers run as an account of their own when the appliance is root: model code cannot read the
appliance's keys or database, and still runs, joins its cgroup and writes its work directory."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import wait_for
from test_supervisor import FAKE, server_config

pytestmark = pytest.mark.process
ACCOUNT = "appliance-test-worker"


def _account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        return None
    try:
        return pwd.getpwnam(ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ACCOUNT], check=True)
        return pwd.getpwnam(ACCOUNT)


def test_a_worker_cannot_read_the_appliances_secrets(server_factory: Any, tmp_path: Path) -> None:
    account = _account()
    if account is None:
        pytest.skip("needs root and useradd to make a worker account (the appliance then runs as root)")
    # The worker account runs a system interpreter of the same version with the test's packages:
    # the test's own interpreter may sit where only root can reach (pyenv under /root).
    python = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("needs a system python3.11 the worker account can run")
    for parent in [tmp_path, *tmp_path.parents]:  # pytest's temp dirs are 0700: let the worker pass through
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o711)
    folder = tmp_path / "models" / "guarded"
    folder.mkdir(parents=True, mode=0o755)
    (tmp_path / "models").chmod(0o755)
    service = {
        "pre_start_actions": [{"action": "write_file", "args": {"filename": "note.txt", "body": ["written before the start"]}}],
        "start_command": [python, str(FAKE), "--port", "8000"],
        "port": 8000,
        "health_check": {"path": "/health", "interval": 0.2, "max_retries": 2, "max_wait_time": 1.0, "initial_delay": 10},
    }
    (folder / "model-definition.yaml").write_text(yaml.safe_dump({"models": [{"name": "guarded", "model_path": "/models", "service": service}]}))
    site = next(Path(sys.prefix, "lib").glob("python3.11/site-packages"))
    config = server_config(tmp_path, f'[[endpoints]]\nname = "guarded"\nmodel_folder = "{folder}"\nenviron = {{ PYTHONPATH = "{site}" }}\n'
                           'secret_environ = { GUARDED_TOKEN = "sealed-under-secret.key" }\n')
    config.write_text(config.read_text().replace("[workers]\n", f'[workers]\nuser = "{ACCOUNT}"\n'))
    server = server_factory(config).start()
    state = tmp_path / "state"
    key = (state / "admin.key").read_text().strip()

    def api(path: str) -> Any:
        req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    rep = wait_for(lambda: next((r for r in api("/api/v1/endpoints/guarded/replicas")["data"] if r["state"] == "HEALTHY"), None), what="a healthy replica")
    secrets = [state / n for n in ("admin.key", "secret.key", "appliance.db")]
    assert all(p.exists() for p in secrets), [p for p in secrets if not p.exists()]  # each one there to be refused
    secrets += [p for p in (state / "jwt.key", *state.glob("appliance.db-*")) if p.exists()]  # the database's WAL and shared memory too
    query = "&".join(f"read={p}" for p in [*secrets, Path(rep["work_dir"]) / "note.txt"])
    me = api(f"/endpoints/guarded/whoami?{query}")
    assert me["uid"] == account.pw_uid
    assert me["can_read"] == {**{str(p): False for p in secrets}, str(Path(rep["work_dir"]) / "note.txt"): True}
    assert oct((state.stat().st_mode) & 0o777) == "0o711"
    assert server.stop() == 0
