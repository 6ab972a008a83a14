#!/usr/bin/env bash
# Install (or upgrade) stora-gateway as a hardened systemd service on Raspberry Pi OS or
# Debian 12+, from this checkout.  Idempotent: run it again after `git pull`.
#
#   sudo deploy/install.sh
#
# What it does (deploy/README.md has the why):
#   - system user and group "stora-gateway", member of "dialout" (the serial ports);
#   - /opt/stora-gateway/venv with this package in it, and /usr/local/bin/stora-gateway;
#   - /etc/stora-gateway (stora-gateway 0750: config.set writes it) and its secrets/, fixing
#     the owner and mode of what is already there;
#   - /etc/systemd/system/stora-gateway.service, enabled;
#   - loads the USB serial drivers at boot, so the unit's DeviceAllow= can name them.
# It starts (or restarts) the agent only when /etc/stora-gateway/gateway.toml exists and
# passes check-config as the agent's user; otherwise it prints what to do next.
set -euo pipefail

NAME=stora-gateway
PREFIX=/opt/stora-gateway
VENV="$PREFIX/venv"
CONF_DIR=/etc/stora-gateway
CONFIG="$CONF_DIR/gateway.toml"
SECRETS="$CONF_DIR/secrets"
UNIT=/etc/systemd/system/stora-gateway.service
MODULES=/etc/modules-load.d/stora-gateway.conf
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The system's Python by default: the agent's user must be able to run the venv's
# interpreter, which a python3 found on root's PATH (pyenv under /root) may not allow.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=python3; fi
fi

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: sudo $0"
[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/deploy/systemd/$NAME.service" ] \
  || die "run from a stora-gateway checkout (no pyproject.toml next to deploy/)"
# Root's umask may be 077; the agent's user must be able to read the venv and the unit.
umask 022

# --- Python ------------------------------------------------------------------------------
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  die "stora-gateway needs Python 3.11 or newer (found: $("$PY" --version 2>&1 || echo none))"
fi
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  say "installing python3-venv"
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
fi

# --- user and group ----------------------------------------------------------------------
if ! getent group "$NAME" >/dev/null; then
  say "creating group $NAME"
  groupadd --system "$NAME"
fi
if ! id -u "$NAME" >/dev/null 2>&1; then
  say "creating user $NAME"
  useradd --system --gid "$NAME" --groups dialout --no-create-home \
    --home-dir /var/lib/stora-gateway --shell /usr/sbin/nologin \
    --comment "stora-gateway agent" "$NAME"
else
  usermod --append --groups dialout "$NAME"
fi

# --- the package ---------------------------------------------------------------------------
install -d -m 0755 -o root -g root "$PREFIX" "$PREFIX/deploy"
venv_usable() {
  [ -x "$VENV/bin/python" ] && runuser -u "$NAME" -- "$VENV/bin/python" -c 'import sys' 2>/dev/null
}
if [ -e "$VENV" ] && ! venv_usable; then
  say "the venv's Python is gone or not usable by user $NAME: recreating $VENV"
  rm -rf "$VENV"
fi
if [ ! -e "$VENV" ]; then
  say "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
venv_usable || die "user $NAME cannot run $VENV/bin/python ($(readlink -f "$VENV/bin/python")); \
use a system-wide Python: PYTHON=/usr/bin/python3 $0"
say "installing stora-gateway from $SRC into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# Built from a copy, so the build leaves no root-owned build/ or *.egg-info in the
# checkout.  Not editable: /opt keeps working if the checkout moves or goes.  pip
# reinstalls a local directory even when its version number did not change.
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/gateway" "$SRC/drivers" "$BUILD/"
find "$BUILD" -name __pycache__ -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip install --quiet --upgrade "$BUILD"
install -m 0644 "$SRC/deploy/README.md" "$PREFIX/deploy/README.md"
ln -sfn "$VENV/bin/stora-gateway" /usr/local/bin/stora-gateway

# --- configuration directory ---------------------------------------------------------------
# The agent owns its config directory: a signed config.set request (README "Remote
# management") replaces gateway.toml atomically, which needs write access to the
# directory (the unit's ReadWritePaths= opens only this one under /etc).  Nobody else can
# read it.  Secrets are the agent user's alone: it refuses to start when a *_file secret
# is open to group or others (fault matrix #48).
install -d -m 0750 -o "$NAME" -g "$NAME" "$CONF_DIR"
install -d -m 0700 -o "$NAME" -g "$NAME" "$SECRETS"
if [ -f "$CONFIG" ]; then
  chown "$NAME:$NAME" "$CONFIG"
  chmod 0640 "$CONFIG"
fi
find "$SECRETS" -mindepth 1 -maxdepth 1 -type f -exec chown "$NAME:$NAME" {} + \
  -exec chmod 0600 {} +

# --- systemd -------------------------------------------------------------------------------
# DeviceAllow=char-ttyUSB / char-ttyACM resolve a driver's major number when the unit
# starts; loading the drivers at boot makes an adapter plugged in later usable too.
cat >"$MODULES" <<'END'
# stora-gateway: the serial drivers its unit's DeviceAllow= names (deploy/install.sh)
usbserial
cdc_acm
END
modprobe -q usbserial 2>/dev/null || true
modprobe -q cdc_acm 2>/dev/null || true

install -m 0644 -o root -g root "$SRC/deploy/systemd/$NAME.service" "$UNIT"
systemd_up=false
if [ -d /run/systemd/system ]; then
  systemd_up=true
  systemctl daemon-reload
fi
# Works without a running systemd too (a chroot, an image build): it only makes links.
systemctl enable "$NAME.service"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$UNIT" || say "systemd-analyze verify complained (see above)"
fi

# --- start, or say what is missing ---------------------------------------------------------
config_ok=false
if [ -f "$CONFIG" ]; then
  say "checking $CONFIG as user $NAME"
  if runuser -u "$NAME" -- "$VENV/bin/stora-gateway" check-config --config "$CONFIG"; then
    config_ok=true
    if $systemd_up; then
      say "starting $NAME"
      systemctl restart "$NAME.service"
    fi
  else
    say "$CONFIG is not valid yet: fix it, then: systemctl restart $NAME"
  fi
fi

cat <<EOF

$("$VENV/bin/stora-gateway" --version) is installed in $VENV.
EOF
if $config_ok && $systemd_up; then
  cat <<EOF
The agent is running:    systemctl status $NAME    journalctl -u $NAME -f
EOF
elif $config_ok; then
  cat <<EOF
Its config is valid; systemd is not running here (a chroot, an image build), so the
agent starts at the next boot.
EOF
else
  cat <<EOF
Next steps:
  1. Write $CONFIG (contract §3, hardware.md); keep secrets out of it:
       install -m 0600 -o $NAME -g $NAME /path/to/mqtt-password $SECRETS/mqtt-password
     and name them relative to the config: password_file = "secrets/mqtt-password".
  2. Check it as the agent's user:
       runuser -u $NAME -- stora-gateway check-config --config $CONFIG
  3. Start it:   systemctl start $NAME    then: journalctl -u $NAME -f
EOF
fi
cat <<EOF
Technicians use the CLI through the agent's control socket once in its group:
  usermod -aG $NAME <login>     (then log in again)
The site broker (Mosquitto with the ACL and the cloud bridge): deploy/README.md.
EOF
