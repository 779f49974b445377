#!/usr/bin/env bash
# Install edge-agent on this device: a venv under /opt, the systemd unit, its user and groups,
# its folders, a starter config, and `agentctl` / `edge-agent` on PATH; then enable the service.
#
#   sudo tools/install.sh                              # from this checkout, with onnxruntime
#   sudo tools/install.sh --from dist/edge_agent-0.1.0-py3-none-any.whl --extras onnx,openvino
#   sudo tools/install.sh --pip-arg=--no-index --pip-arg=--find-links=/media/usb/wheels   # offline
#   tools/install.sh --root /tmp/stage --no-systemctl  # stage into a folder (tests, images)
#
# Idempotent: running it again upgrades the package and keeps config, keys and state.
# Undo with tools/uninstall.sh (keeps data unless --purge).
set -euo pipefail

PREFIX=/opt/edge-agent
ROOT=/
SRC=""
EXTRAS=onnx
PYTHON=python3
SYSTEMCTL=1
VENV_ARGS=()
PIP_ARGS=()
UNIT=edge-agent.service
HERE="$(cd "$(dirname "$0")/.." && pwd)"

usage() {
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"   # the comment block at the top, however long
  echo
  cat <<EOF
options:
  --prefix DIR            install folder (default $PREFIX; the venv is DIR/venv)
  --root DIR              stage everything under DIR instead of / (no users are touched on the host)
  --from PATH             a checkout folder or a wheel (default: this checkout, $HERE)
  --extras LIST           pip extras, comma-separated (default $EXTRAS; "" for none)
  --python PY             interpreter for the venv (default $PYTHON, 3.10 or newer)
  --system-site-packages  let the venv see the distribution's packages (e.g. a vendor onnxruntime)
  --pip-arg ARG           extra pip argument; repeatable (e.g. --no-index, --find-links=DIR, --no-deps)
  --no-systemctl          do not enable or start the service
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    --root) ROOT="$2"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --from) SRC="$2"; shift 2 ;;
    --from=*) SRC="${1#*=}"; shift ;;
    --extras) EXTRAS="$2"; shift 2 ;;
    --extras=*) EXTRAS="${1#*=}"; shift ;;
    --python) PYTHON="$2"; shift 2 ;;
    --python=*) PYTHON="${1#*=}"; shift ;;
    --system-site-packages) VENV_ARGS+=(--system-site-packages); shift ;;
    --pip-arg) PIP_ARGS+=("$2"); shift 2 ;;
    --pip-arg=*) PIP_ARGS+=("${1#*=}"); shift ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
R="${ROOT%/}"   # "" for the real root, so "$R/etc" is /etc
SRC="${SRC:-$HERE}"
[ -e "$SRC" ] || die "--from $SRC: no such file or folder"
[ "$(id -u)" -eq 0 ] || [ -n "$R" ] || die "run as root (or stage with --root DIR)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || die "$PYTHON is missing or older than 3.10 (use --python)"

# -- 1. the package, in its own venv ---------------------------------------------------------------
VENV="$R$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  # A venv is always built on the base interpreter: --system-site-packages then shows the base's
  # packages, never those of a venv whose python was given with --python. Say so, not a later ImportError.
  BASE="$("$PYTHON" -c 'import sys; print(sys.base_prefix if sys.prefix != sys.base_prefix else "")')"
  if [ -n "$BASE" ] && [ "${#VENV_ARGS[@]}" -gt 0 ]; then
    say "note: $PYTHON is a venv's interpreter; --system-site-packages shows the packages of its base $BASE, not that venv's"
  fi
  "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV"
fi
SPEC="$SRC"
[ -n "$EXTRAS" ] && SPEC="$SRC[$EXTRAS]"
say "pip install $SPEC"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "${PIP_ARGS[@]}" "$SPEC"
"$VENV/bin/edge-agent" --version >/dev/null || die "the installed edge-agent does not run"

# -- 2. units, users, folders ----------------------------------------------------------------------
install -d -m 0755 "$R/etc/systemd/system" "$R/usr/lib/sysusers.d" "$R/usr/lib/tmpfiles.d" \
  "$R/usr/share/edge-agent/hw-profiles" "$R/usr/local/bin" "$R/etc"
sed "s#^ExecStart=/opt/edge-agent/venv/bin/edge-agent #ExecStart=$PREFIX/venv/bin/edge-agent #" \
  "$HERE/systemd/edge-agent.service" > "$R/etc/systemd/system/$UNIT.tmp"
chmod 0644 "$R/etc/systemd/system/$UNIT.tmp"
mv -f "$R/etc/systemd/system/$UNIT.tmp" "$R/etc/systemd/system/$UNIT"
install -m 0644 "$HERE/systemd/edge-agent.sysusers" "$R/usr/lib/sysusers.d/edge-agent.conf"
install -m 0644 "$HERE/systemd/edge-agent.tmpfiles" "$R/usr/lib/tmpfiles.d/edge-agent.conf"
if [ -d "$HERE/hw-profiles" ]; then
  install -m 0644 "$HERE"/hw-profiles/*.toml "$R/usr/share/edge-agent/hw-profiles/"
fi

if command -v systemd-sysusers >/dev/null 2>&1; then
  say "users and groups (systemd-sysusers)"
  systemd-sysusers --root="$ROOT" "$R/usr/lib/sysusers.d/edge-agent.conf"
elif [ -z "$R" ]; then
  say "users and groups (useradd: no systemd-sysusers here)"
  getent group edge-agent >/dev/null || groupadd --system edge-agent
  getent group edge-agent-admin >/dev/null || groupadd --system edge-agent-admin
  getent passwd edge-agent >/dev/null || useradd --system --gid edge-agent --home-dir /var/lib/edge-agent \
    --no-create-home --shell /usr/sbin/nologin --comment "edge-agent daemon" edge-agent
  for g in video render plugdev apex users; do
    getent group "$g" >/dev/null || groupadd --system "$g"
    usermod -aG "$g" edge-agent
  done
else
  die "systemd-sysusers is needed to create users under --root"
fi

if command -v systemd-tmpfiles >/dev/null 2>&1; then
  say "folders (systemd-tmpfiles)"
  systemd-tmpfiles --root="$ROOT" --create "$R/usr/lib/tmpfiles.d/edge-agent.conf"
else
  say "folders (install -d: no systemd-tmpfiles here)"
  install -d -m 0755 -o root -g root "$R/etc/edge-agent" "$R/etc/edge-agent/hw-profiles"
  install -d -m 0755 -o edge-agent -g edge-agent "$R/etc/edge-agent/trust"
  install -d -m 0700 -o root -g root "$R/etc/edge-agent/credentials"
  install -d -m 0750 -o edge-agent -g edge-agent "$R/var/lib/edge-agent"
  for f in mqtt-password device.key; do
    [ -e "$R/etc/edge-agent/credentials/$f" ] || install -m 0600 /dev/null "$R/etc/edge-agent/credentials/$f"
  done
fi

# -- 3. a starter config (never overwritten) -------------------------------------------------------
CONF="$R/etc/edge-agent/agent.toml"
if [ ! -e "$CONF" ]; then
  say "starter config $CONF (edit mqtt.url, then restart)"
  DEVICE="$(hostname 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)"
  cat > "$CONF.tmp" <<EOF
# edge-agent config: every key is in docs/configuration.md. \`agentctl doctor\` checks it.
device_id = "${DEVICE:-device}"
groups = []

[mqtt]
url = "mqtt://127.0.0.1:1883"          # mqtts://broker.example:8883 in production
# ca_file = "/etc/edge-agent/ca.pem"
# cert_file = "/etc/edge-agent/device.crt"
# key_file = "\${CREDENTIALS_DIRECTORY}/device.key"          # /etc/edge-agent/credentials/device.key
# password_file = "\${CREDENTIALS_DIRECTORY}/mqtt-password"  # /etc/edge-agent/credentials/mqtt-password
EOF
  GID="$(awk -F: '$1 == "edge-agent" { print $3 }' "$R/etc/group" 2>/dev/null || true)"
  chmod 0640 "$CONF.tmp"
  if [ "$(id -u)" -eq 0 ] && [ -n "$GID" ]; then chown "0:$GID" "$CONF.tmp"; fi
  mv -f "$CONF.tmp" "$CONF"
fi

ln -sfn "$PREFIX/venv/bin/agentctl" "$R/usr/local/bin/agentctl"
ln -sfn "$PREFIX/venv/bin/edge-agent" "$R/usr/local/bin/edge-agent"

# -- 4. the service --------------------------------------------------------------------------------
if [ "$SYSTEMCTL" -eq 1 ] && [ -z "$R" ] && [ -d /run/systemd/system ]; then
  say "enabling and starting $UNIT"
  systemctl daemon-reload
  systemctl enable --now "$UNIT"
  systemctl --no-pager --lines=0 status "$UNIT" || true
else
  why="--no-systemctl"
  [ -n "$R" ] && why="staged under $ROOT"
  [ -d /run/systemd/system ] || why="systemd is not running here"
  say "not starting the service ($why); later: systemctl daemon-reload && systemctl enable --now $UNIT"
fi
say "done: copy the fleet's public key into /etc/edge-agent/trust/, set mqtt.url, then run: agentctl doctor"
