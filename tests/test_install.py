"""scripts/install.sh and uninstall.sh into a throw-away root: accounts, directories and modes, the
virtual environment, a config written once, the unit as installed passing `systemd-analyze verify`,
a second run changing nothing, and an uninstall that keeps the state unless told otherwise."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates an account in a throw-away root with useradd --root (needs root)"),
]


def _root(tmp_path: Path) -> Path:
    """A root with the account databases useradd needs, and what systemd-analyze verify looks up."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow", "login.defs"):
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), root / "etc" / name)
    units = root / "usr" / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    for target in Path("/usr/lib/systemd/system").glob("*.target"):
        shutil.copy2(target, units)
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/kill", root / "usr" / "bin" / "kill")
    (root / "bin").symlink_to("usr/bin")
    return root


def _run(script: str, *args: str, src: Path = REPO) -> str:
    done = subprocess.run([str(src / "scripts" / script), *args], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or shutil.which("useradd") is None, reason="needs systemd-analyze and useradd")
def test_install_verify_reinstall_uninstall(tmp_path: Path) -> None:
    root = _root(tmp_path)
    first = _run("install.sh", "--root", str(root), "--python", sys.executable, "--reuse-deps")
    assert "created account appliance-worker" in first and "wrote /etc/appliance/config.toml" in first
    assert "appliance-worker:" in (root / "etc" / "passwd").read_text()
    assert _mode(root / "var" / "lib" / "appliance") == 0o711 and _mode(root / "etc" / "appliance") == 0o750
    assert _mode(root / "var" / "log" / "appliance") == 0o750
    config = root / "etc" / "appliance" / "config.toml"
    assert 'state_dir = "/var/lib/appliance"' in config.read_text()
    appliance = root / "opt" / "appliance" / ".venv" / "bin" / "appliance"
    checked = subprocess.run([str(appliance), "check-config", str(config)], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0 and "OK (0 endpoint(s) declared" in checked.stdout, checked.stderr

    unit = root / "etc" / "systemd" / "system" / "appliance.service"
    assert unit.read_text() == (REPO / "systemd" / "appliance.service").read_text()
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/appliance.service"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={root}", "appliance.service"],
                              capture_output=True, text=True, timeout=60, check=False)
    score = next((line for line in security.stdout.splitlines() if "Overall exposure level" in line), security.stderr)
    print(f"systemd-analyze security: {score}")
    assert "Overall exposure level" in score and float(score.split("level for appliance.service:")[1].split()[0]) < 6.5

    config.write_text(config.read_text() + "# edited by the operator\n")
    second = _run("install.sh", "--root", str(root), "--python", sys.executable, "--reuse-deps")
    assert "account appliance-worker exists" in second and "kept /etc/appliance/config.toml" in second
    assert "is installed and current" in second and "unit /etc/systemd/system/appliance.service is current" in second
    assert config.read_text().endswith("# edited by the operator\n")  # never overwritten

    # a changed source tree is installed again, though its version number stayed the same
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "tests", "*-state", "docs"))
    (src / "appliance" / "changed.py").write_text("MARK = 1\n")
    third = _run("install.sh", "--root", str(root), "--python", sys.executable, "--reuse-deps", src=src)
    assert "updating appliance" in third and "updated appliance" in third, third
    marked = subprocess.run([str(root / "opt" / "appliance" / ".venv" / "bin" / "python"), "-I", "-c", "import appliance.changed"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert marked.returncode == 0, marked.stderr

    (root / "var" / "lib" / "appliance" / "appliance.db").write_text("state")
    kept = _run("uninstall.sh", "--root", str(root))
    assert not unit.exists() and not (root / "opt" / "appliance").exists()
    assert (root / "var" / "lib" / "appliance" / "appliance.db").exists() and config.exists() and "--purge removes them" in kept
    _run("uninstall.sh", "--root", str(root), "--purge")
    assert not (root / "var" / "lib" / "appliance").exists() and not (root / "etc" / "appliance").exists()
    assert "appliance-worker:" not in (root / "etc" / "passwd").read_text()
