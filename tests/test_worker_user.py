"""Workers run as an account of their own, or a uid of their own with no account, when the appliance is
root: model code cannot read the appliance's keys or database, and still runs, joins its cgroup and
writes its work directory. Root runs workers only when the config says so."""

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


def _guarded(server_factory: Any, tmp_path: Path, user: str | None) -> tuple[Any, Any, dict[str, Any], list[Path]]:
    """An appliance (as root) serving one fake-worker endpoint with a pre-start action and a sealed secret,
    `workers.user` set to `user` (None: left at its default); its server, an API caller, the healthy
    replica and the secrets a worker must not read."""
    # The worker runs a system interpreter of the same version with the test's packages:
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
    # whatever the shared test settings say of workers.user, this test's own (or the default) is the one
    text = "\n".join(line for line in config.read_text().splitlines() if not line.startswith("user = ")) + "\n"
    # None: the default, "auto", stated so that the test harness (conftest.root_workers) leaves it
    config.write_text(text.replace("[workers]\n", f'[workers]\nuser = "{user or "auto"}"\n'))
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
    assert any(p.name == "appliance.db-wal" for p in secrets)
    return server, api, rep, secrets


def _whoami(api: Any, rep: dict[str, Any], secrets: list[Path]) -> dict[str, Any]:
    note = Path(rep["work_dir"]) / "note.txt"
    me = api("/endpoints/guarded/whoami?" + "&".join(f"read={p}" for p in [*secrets, note]))
    assert me["can_read"] == {**{str(p): False for p in secrets}, str(note): True}
    return me


def test_a_worker_cannot_read_the_appliances_secrets(server_factory: Any, tmp_path: Path) -> None:
    account = _account()
    if account is None:
        pytest.skip("needs root and useradd to make a worker account (the appliance then runs as root)")
    server, api, rep, secrets = _guarded(server_factory, tmp_path, ACCOUNT)
    assert _whoami(api, rep, secrets)["uid"] == account.pw_uid
    assert oct(((tmp_path / "state").stat().st_mode) & 0o777) == "0o711"
    assert server.stop() == 0


def test_as_root_with_no_account_workers_get_a_uid_of_their_own(server_factory: Any, tmp_path: Path) -> None:
    """The default (`workers.user = "auto"`) on a box with no appliance-worker account: not root, but a uid
    and gid with no passwd entry, no supplementary groups, HOME in its work dir; the secrets stay out of reach."""
    if os.geteuid() != 0:
        pytest.skip("needs the appliance to run as root")
    try:
        pwd.getpwnam("appliance-worker")
        pytest.skip("this box has the appliance-worker account: workers run as it")
    except KeyError:
        pass
    server, api, rep, secrets = _guarded(server_factory, tmp_path, None)
    me = _whoami(api, rep, secrets)
    assert 61184 <= me["uid"] <= 65519
    with pytest.raises(KeyError):
        pwd.getpwuid(me["uid"])
    status = dict(line.split(":", 1) for line in Path(f"/proc/{me['pid']}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(me["uid"])] * 4 and status["Gid"].split() == [str(me["uid"])] * 4
    assert status["Groups"].strip() == ""
    env = dict(v.split("=", 1) for v in Path(f"/proc/{me['pid']}/environ").read_text().split("\0") if "=" in v)
    assert env["HOME"] == rep["work_dir"]
    assert oct(((tmp_path / "state").stat().st_mode) & 0o777) == "0o711"
    assert server.stop() == 0
