#!/usr/bin/env bash
# Reverse scripts/install.sh: stop and disable the service, remove the unit and /opt/appliance.
# The state (/var/lib/appliance: database, keys, replica work dirs), the logs and /etc/appliance are
# kept unless --purge, which also removes the appliance-worker account.
#
#   sudo scripts/uninstall.sh [--purge] [--root DIR]
set -euo pipefail
root="" purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2%/}"; shift 2 ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { echo "uninstall: $*"; }
[ "$(id -u)" -eq 0 ] || [ -n "$root" ] || { echo "uninstall.sh: run as root (or with --root DIR)" >&2; exit 1; }

if [ -z "$root" ] && [ -d /run/systemd/system ] && systemctl list-unit-files appliance.service >/dev/null 2>&1; then
  systemctl disable --now appliance >/dev/null 2>&1 || true  # the appliance stops its workers on the way
  say "service appliance stopped and disabled"
fi
if [ -f "$root/etc/systemd/system/appliance.service" ]; then
  rm -f "$root/etc/systemd/system/appliance.service"
  [ -z "$root" ] && [ -d /run/systemd/system ] && systemctl daemon-reload
  say "removed /etc/systemd/system/appliance.service"
fi
if [ -d "$root/opt/appliance" ]; then
  rm -rf "$root/opt/appliance"
  say "removed /opt/appliance"
fi
if [ "$purge" -eq 1 ]; then
  rm -rf "$root/var/lib/appliance" "$root/var/log/appliance" "$root/etc/appliance"
  say "removed /var/lib/appliance /var/log/appliance /etc/appliance"
  if { [ -z "$root" ] && getent passwd appliance-worker >/dev/null; } || grep -q '^appliance-worker:' "$root/etc/passwd" 2>/dev/null; then
    userdel ${root:+--root "$root"} appliance-worker
    say "removed the account appliance-worker"
  fi
else
  say "kept /var/lib/appliance (database, keys), /var/log/appliance and /etc/appliance: --purge removes them"
fi
