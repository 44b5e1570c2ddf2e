"""Who workers run as, decided at start: an account of their own, a uid of their own with no account
(as root, when the account does not exist), or root only when the config says so."""

from __future__ import annotations

import logging
import pwd
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.control.host import identity as identity_mod
from appliance.control.host.identity import DYNAMIC_RANGE, WorkerIdentity, dynamic_identity, worker_identity
from appliance.errors import ApplianceError


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity_mod.os, "geteuid", lambda: 0)


@pytest.fixture
def no_account(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pwd.getpwnam

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name == "appliance-worker":
            raise KeyError(name)
        return real(name)

    monkeypatch.setattr(identity_mod.pwd, "getpwnam", getpwnam)


def test_as_root_with_no_account_the_default_is_a_uid_of_their_own(as_root: None, no_account: None, tmp_path: Path) -> None:
    me = worker_identity("auto", tmp_path)
    assert me is not None and not me.account
    assert DYNAMIC_RANGE[0] <= me.uid <= DYNAMIC_RANGE[1] and me.gid == me.uid and me.user == f"appliance-worker-{me.uid}"
    with pytest.raises(KeyError):
        pwd.getpwuid(me.uid)
    assert worker_identity("auto", tmp_path) == me  # the same one across restarts of one appliance


def test_a_dynamic_uid_skips_ids_that_are_taken(tmp_path: Path) -> None:
    first = dynamic_identity(tmp_path, taken=lambda uid: False)
    second = dynamic_identity(tmp_path, taken=lambda uid: uid == first.uid)
    assert second.uid != first.uid and DYNAMIC_RANGE[0] <= second.uid <= DYNAMIC_RANGE[1]
    other = dynamic_identity(tmp_path / "elsewhere", taken=lambda uid: False)
    assert other.uid != first.uid  # another appliance's state dir starts its search elsewhere
    with pytest.raises(ApplianceError, match="every id of 61184-65519 is taken"):
        dynamic_identity(tmp_path, taken=lambda uid: True)


def test_root_only_when_the_config_says_root(as_root: None, no_account: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="appliance.control.host.identity"):
        assert worker_identity("root", tmp_path) is None
    assert any('workers run as root (workers.user = "root")' in r.getMessage() for r in caplog.records)
    with pytest.raises(ApplianceError, match='set "root" to mean it'):
        worker_identity(None, tmp_path)  # null as root would be root without saying so


def test_root_needs_an_appliance_run_as_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(identity_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(ApplianceError, match="needs the appliance to run as root"):
        worker_identity("root", tmp_path)
    assert worker_identity("auto", tmp_path) is None and worker_identity(None, tmp_path) is None  # its own user: it cannot switch


def test_what_a_dynamic_uid_cannot_reach(tmp_path: Path) -> None:
    dynamic = WorkerIdentity("appliance-worker-61184", 61184, 61184, account=False)
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "python").write_text("")
    for parent in [tmp_path, *tmp_path.parents]:  # pytest's temp dirs are 0700: open the way down to `closed`
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o711)
    assert dynamic.unreachable(closed / "python") == closed
    closed.chmod(0o755)
    (closed / "python").chmod(0o600)
    assert dynamic.unreachable(closed / "python") == closed / "python"
    (closed / "python").chmod(0o755)
    assert dynamic.unreachable(closed / "python") is None
    assert WorkerIdentity("someone", 61184, 61184).unreachable("/root/x") is None  # an account's access is its administrator's to arrange


async def test_a_worker_that_cannot_reach_its_program_is_refused_in_words(tmp_path: Path) -> None:
    from appliance.control.host.process import WorkerProcess

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    program = closed / "server"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    dynamic = WorkerIdentity("appliance-worker-61184", 61184, 61184, account=False)
    with pytest.raises(ApplianceError, match="workers run as uid 61184, which cannot reach") as err:
        await WorkerProcess.spawn([str(program)], env={}, cwd=tmp_path, sink=None, identity=dynamic)  # type: ignore[arg-type]
    assert err.value.code == "spawn_failed" and 'workers.user = "root"' in err.value.message


def test_doctor_says_who_workers_run_as(as_root: None, no_account: None, monkeypatch: pytest.MonkeyPatch, make_config: Any, tmp_path: Path) -> None:
    from appliance.control.ops import doctor

    monkeypatch.setattr(doctor.os, "geteuid", lambda: 0)
    check = doctor._worker_user(make_config({"workers": {"user": "auto"}}))
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    (closed / "python").write_text("")
    if check.status == "ok":
        assert "a uid and gid of their own with no account" in check.detail
    monkeypatch.setattr(sys, "executable", str(closed / "python"))
    blocked = doctor._worker_user(make_config({"workers": {"user": "auto"}}))
    assert blocked.status == "problem" and "cannot reach" in blocked.detail and 'workers.user = "root"' in blocked.fix
    assert doctor._worker_user(make_config({"workers": {"user": None}})).status == "problem"
    root = doctor._worker_user(make_config({"workers": {"user": "root"}}))
    assert root.status == "warning" and "model code can read" in root.detail
