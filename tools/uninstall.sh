#!/usr/bin/env bash
# Remove edge-agent installed by tools/install.sh.
#
#   sudo tools/uninstall.sh            # stop and remove the program; keep config, keys, state, user
#   sudo tools/uninstall.sh --purge    # also delete /etc/edge-agent, /var/lib/edge-agent and the users
#   tools/uninstall.sh --root /tmp/stage --no-systemctl
#
# --prefix DIR names the install folder when tools/install.sh was given one (default /opt/edge-agent).
set -euo pipefail

PREFIX=/opt/edge-agent
ROOT=/
PURGE=0
SYSTEMCTL=1
UNIT=edge-agent.service

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --root) ROOT="$2"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --purge) PURGE=1; shift ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'uninstall: %s\n' "$*"; }
case "$PREFIX" in /?*) ;; *) echo "uninstall.sh: --prefix must be an absolute path other than /" >&2; exit 2 ;; esac
[ -d "$ROOT" ] || { echo "uninstall.sh: --root $ROOT: no such folder" >&2; exit 2; }
ROOT="$(cd "$ROOT" && pwd)"
R="${ROOT%/}"
[ "$(id -u)" -eq 0 ] || [ -n "$R" ] || { echo "uninstall.sh: run as root" >&2; exit 1; }

if [ "$SYSTEMCTL" -eq 1 ] && [ -z "$R" ] && [ -d /run/systemd/system ]; then
  say "stopping and disabling $UNIT"
  systemctl disable --now "$UNIT" 2>/dev/null || true
fi

rm -f "$R/etc/systemd/system/$UNIT" "$R/usr/lib/sysusers.d/edge-agent.conf" "$R/usr/lib/tmpfiles.d/edge-agent.conf"
for cmd in agentctl edge-agent; do
  link="$R/usr/local/bin/$cmd"
  if [ -L "$link" ] && [ "$(readlink "$link")" = "$PREFIX/venv/bin/$cmd" ]; then rm -f "$link"; fi
done
rm -rf "$R$PREFIX/venv" "$R/usr/share/edge-agent"
rmdir "$R$PREFIX" 2>/dev/null || true
say "removed the program, the unit and the venv under $PREFIX"

if [ "$PURGE" -eq 1 ]; then
  rm -rf "$R/etc/edge-agent" "$R/var/lib/edge-agent" "$R/run/edge-agent"
  if [ -z "$R" ]; then
    getent passwd edge-agent >/dev/null && userdel edge-agent
    getent group edge-agent-admin >/dev/null && groupdel edge-agent-admin
    getent group edge-agent >/dev/null && groupdel edge-agent
  elif [ -f "$R/etc/passwd" ]; then
    grep -q '^edge-agent:' "$R/etc/passwd" && userdel --root "$ROOT" edge-agent
    grep -q '^edge-agent-admin:' "$R/etc/group" && groupdel --root "$ROOT" edge-agent-admin
    grep -q '^edge-agent:' "$R/etc/group" && groupdel --root "$ROOT" edge-agent
  fi
  say "purged config, trust keys, credentials, state and the edge-agent user"
else
  say "kept $R/etc/edge-agent (config, trust keys, credentials), $R/var/lib/edge-agent (models, state) and the edge-agent user; --purge deletes them"
fi

if [ "$SYSTEMCTL" -eq 1 ] && [ -z "$R" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
