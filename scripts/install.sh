#!/usr/bin/env bash
# Install appliance as a systemd service; idempotent (a second run changes nothing that is current).
#
#   sudo scripts/install.sh [--vllm] [--root DIR] [--python PY] [--reuse-deps]
#
#   --vllm        also install vLLM (the `vllm` extra, with the CUDA build of torch it pins)
#   --root DIR    install into DIR as if it were / (a DESTDIR for packaging and tests); the service is
#                 then neither enabled nor started
#   --python PY   the interpreter the virtual environment is made with (default: python3, ≥ 3.11)
#   --reuse-deps  the environment sees PY's installed packages and only appliance itself is installed
#                 (air-gapped boxes whose Python already has the dependencies; the tests)
#
# It creates the appliance-worker account, /opt/appliance/.venv with the package, /etc/appliance
# (config.toml written once, never overwritten), /var/lib/appliance and /var/log/appliance, and
# installs, enables and starts systemd/appliance.service. scripts/uninstall.sh reverses it.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
root="" vllm=0 python="python3" reuse=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2%/}"; shift 2 ;;
    --vllm) vllm=1; shift ;;
    --python) python="$2"; shift 2 ;;
    --reuse-deps) reuse=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "install: $*"; }
[ "$(id -u)" -eq 0 ] || [ -n "$root" ] || { echo "install.sh: run as root (or with --root DIR)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "install.sh: $python is older than 3.11" >&2; exit 1; }

# 1. the account workers run as (model code never runs as the appliance's user)
has() { if [ -z "$root" ]; then getent "$1" "$2" >/dev/null; else grep -q "^$2:" "$root/etc/$1" 2>/dev/null; fi; }
if [ -n "$root" ] && [ ! -f "$root/etc/passwd" ]; then
  say "no $root/etc/passwd: the appliance-worker account is for the target box to create"
elif has passwd appliance-worker; then
  say "account appliance-worker exists"
else
  groups=""
  for g in video render; do has group "$g" && groups="$groups,$g"; done
  # (a throw-away root has no /usr/sbin/nologin: useradd's warning about it says nothing)
  useradd ${root:+--root "$root"} --system --no-create-home --shell /usr/sbin/nologin ${groups:+--groups "${groups#,}"} appliance-worker \
    2> >(grep -v "missing or non-executable shell" >&2)
  say "created account appliance-worker${groups:+ (groups ${groups#,})}"
fi

# 2. directories (the unit's StateDirectory=/LogsDirectory= make the same ones at start)
install -d -m 0755 "$root/opt/appliance"
install -d -m 0750 "$root/etc/appliance"
install -d -m 0711 "$root/var/lib/appliance"
install -d -m 0750 "$root/var/log/appliance"
say "directories /opt/appliance /etc/appliance /var/lib/appliance /var/log/appliance"

# 3. the virtual environment, with this source tree's version of the package
venv="$root/opt/appliance/.venv"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  say "virtual environment $venv"
fi
if [ "$reuse" -eq 1 ]; then  # PY's packages (a virtual environment's included) seen through a .pth file
  deps=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$venv/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/appliance-reused-deps.pth", "w").write(sys.argv[1] + "\n")' "$deps"
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$src/pyproject.toml")
own=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
extra=""; [ "$vllm" -eq 1 ] && extra="[vllm]"
# What is installed is this source tree as it is now (not only its version number, which a change may keep).
stamp="$venv/.appliance-source"
tree=$( (cd "$src" && find appliance pyproject.toml -type f -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; echo "$extra") | sha256sum | cut -d' ' -f1)
# installed in this environment itself (not seen through reused packages, nor the source tree's metadata)
installed=0
if [ -d "$own/appliance-$version.dist-info" ] && [ -x "$venv/bin/appliance" ] && { [ "$vllm" -eq 0 ] || "$venv/bin/python" -I -c 'import vllm' 2>/dev/null; }; then
  installed=1
fi
if [ "$installed" -eq 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$tree" ]; then
  say "appliance $version is installed and current"
elif [ "$installed" -eq 1 ]; then
  say "updating appliance $version from $src ..."
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$src"
  echo "$tree" > "$stamp"
  say "updated appliance $version in $venv"
else
  say "installing appliance $version$extra and its dependencies into $venv (a few minutes; pip's output only on failure) ..."
  if [ "$reuse" -eq 1 ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$src"
  elif [ "$vllm" -eq 1 ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$src$extra"  # vLLM pins its CUDA torch
  else
    # a box served on CPU: torch's CPU build, not the multi-GB CUDA one an unpinned install pulls
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple "torch==2.13.0" "$src[transformers,speed]"
  fi
  echo "$tree" > "$stamp"
  say "installed appliance $version$extra into $venv"
fi

# 4. the config: written once from the example's essentials, never overwritten
install -m 0640 "$src/config.example.toml" "$root/etc/appliance/config.example.toml"
if [ -f "$root/etc/appliance/config.toml" ]; then
  say "kept /etc/appliance/config.toml"
else
  umask 027
  cat > "$root/etc/appliance/config.toml" <<'EOF'
# appliance configuration; every key and its default: /etc/appliance/config.example.toml.
# After a change: systemctl reload appliance (declared endpoints are reconciled, running replicas kept).
[server]
host = "127.0.0.1"
port = 8080
state_dir = "/var/lib/appliance"

[workers]
log_dir = "/var/log/appliance"

# Declare endpoints here, or create them with `appliance endpoint create` / the admin API:
# [[endpoints]]
# name = "chat"
# model_folder = "/srv/models/my-model"
# runtime = "vllm"
EOF
  say "wrote /etc/appliance/config.toml"
fi

# 5. the unit
install -d -m 0755 "$root/etc/systemd/system"
if cmp -s "$src/systemd/appliance.service" "$root/etc/systemd/system/appliance.service"; then
  say "unit /etc/systemd/system/appliance.service is current"
else
  install -m 0644 "$src/systemd/appliance.service" "$root/etc/systemd/system/appliance.service"
  say "installed /etc/systemd/system/appliance.service"
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now appliance >/dev/null 2>&1 || systemctl enable --now appliance
  say "service appliance enabled and started (systemctl status appliance)"
else
  say "systemd is not running here${root:+ (--root $root)}: enable it on the box with systemctl enable --now appliance"
fi

port=$(sed -n 's/^port = \([0-9]*\)/\1/p' "$root/etc/appliance/config.toml" | head -1)
say "URL http://127.0.0.1:${port:-8080}/v1; the admin key is /var/lib/appliance/admin.key (root only)"
say "check the box: /opt/appliance/.venv/bin/appliance doctor"
