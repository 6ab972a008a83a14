#!/usr/bin/env bash
# Install (or upgrade) stora-gateway as a hardened systemd service on Raspberry Pi OS or
# Debian 12+, from this checkout.  Idempotent: run it again after `git pull`.
#
#   sudo deploy/install.sh                          install, or upgrade after `git pull`
#   sudo deploy/install.sh --uninstall              remove it; keep config, secrets, state
#   sudo deploy/install.sh --uninstall --purge      remove those and the user too
#
# What it does (deploy/README.md has the why):
#   - system user and group "stora-gateway", member of "dialout" (the serial ports);
#   - /opt/stora-gateway/venv with this package in it, and /usr/local/bin/stora-gateway;
#     the documentation next to it, laid out as in the checkout (README.md, hardware.md,
#     docs/, deploy/README.md and deploy/gateway.example.toml);
#   - /etc/stora-gateway (root:stora-gateway 0750) with
#       secrets/       root:stora-gateway 0750; the secret files in it stora-gateway 0600
#       config/        stora-gateway 0750: the only place the agent writes (config.set)
#       gateway.toml   a link to config/gateway.toml, root's;
#     an install of the old layout (the agent owning /etc/stora-gateway and a regular
#     gateway.toml in it) is moved to this one;
#   - /etc/systemd/system/stora-gateway.service, enabled;
#   - loads the USB serial drivers at boot, so the unit's DeviceAllow= can name them.
# It starts (or restarts) the agent only when /etc/stora-gateway/gateway.toml exists and
# passes check-config as the agent's user; otherwise it prints what to do next.
#
# --uninstall stops and disables the unit and removes what the install put in place
# (the unit, the modules-load file, /opt/stora-gateway, the CLI's link).  It keeps
# /etc/stora-gateway (config and secrets), /var/lib/stora-gateway (the state database:
# the outbox may hold events Stora has not received yet) and the user and group, and
# says so; --purge removes them as well.  The site broker's files are not its own.
#
# Root never follows a link inside a directory the agent can write: the agent's user may
# be compromised, and a link planted there must not make root re-own or re-mode a file
# elsewhere at the next upgrade.  Every path this script manages is checked first, and
# it stops, changing nothing, where one is a link (or another kind of file) than expected.
# Nothing under config/ is touched at all, except the one rename of a migration.
#
# STORA_GATEWAY_INSTALL_ROOT (tests only): a throw-away directory standing in for "/";
# users, systemd and Python are then whatever the caller put first on PATH.
set -euo pipefail

NAME=stora-gateway
ROOT="${STORA_GATEWAY_INSTALL_ROOT:-}"
PREFIX="$ROOT/opt/stora-gateway"
VENV="$PREFIX/venv"
CONF_DIR="$ROOT/etc/stora-gateway"
CONFIG="$CONF_DIR/gateway.toml"
# The link's target, relative so that it holds under any root.
CONFIG_TARGET=config/gateway.toml
CONFIG_DIR="$CONF_DIR/config"
SECRETS="$CONF_DIR/secrets"
UNIT="$ROOT/etc/systemd/system/stora-gateway.service"
MODULES="$ROOT/etc/modules-load.d/stora-gateway.conf"
BIN_LINK="$ROOT/usr/local/bin/stora-gateway"
COMPLETIONS="$ROOT/usr/share/bash-completion/completions"
COMPLETION="$COMPLETIONS/stora-gateway"
# What the CLI's link points to: the same under any root (the link is only followed on
# the real one).
BIN_TARGET=/opt/stora-gateway/venv/bin/stora-gateway
# The unit's StateDirectory=: made by systemd at the first start, not by this script.
STATE_DIR="$ROOT/var/lib/stora-gateway"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The system's Python by default: the agent's user must be able to run the venv's
# interpreter, which a python3 found on root's PATH (pyenv under /root) may not allow.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=python3; fi
fi

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
usage() {
  printf 'install.sh: %s\nusage: %s [--uninstall [--purge]]\n' "$1" "$0" >&2
  exit 2
}

uninstall=false
purge=false
for arg in "$@"; do
  case "$arg" in
    --uninstall) uninstall=true ;;
    --purge) purge=true ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
      exit 0 ;;
    *) usage "unknown argument $arg" ;;
  esac
done
if $purge && ! $uninstall; then
  usage "--purge goes with --uninstall"
fi

# A path this script manages must be a real directory (or absent): never a link.
check_dir() {
  if [ -L "$1" ]; then
    die "$1 is a symbolic link, not a directory; refusing to follow it as root. \
Remove the link (and check how it got there), then run this again."
  fi
  if [ -e "$1" ] && [ ! -d "$1" ]; then
    die "$1 exists but is not a directory; move it away, then run this again."
  fi
}
# Likewise for a file: a regular file (or absent), never a link.
check_file() {
  if [ -L "$1" ]; then
    die "$1 is a symbolic link, not a file; refusing to follow it as root. \
Remove the link (and check how it got there), then run this again."
  fi
  if [ -e "$1" ] && [ ! -f "$1" ]; then
    die "$1 exists but is not a regular file; move it away, then run this again."
  fi
}
# A directory with this owner and mode: created if absent, else fixed without following
# links (check_dir ran first, and every parent is root's, so it cannot be swapped since).
own_dir() {  # path owner group mode
  check_dir "$1"
  if [ -d "$1" ]; then
    chown -h "$2:$3" "$1"
    chmod "$4" "$1"
  else
    install -d -m "$4" -o "$2" -g "$3" "$1"
  fi
}

[ "$(id -u)" = 0 ] || die "run as root: sudo $0 $*"

# --- uninstall -----------------------------------------------------------------------------
# Checked first, like the install: every path it removes must be what the install made
# (a real directory or file, or the CLI's link to the venv), else it stops, changing
# nothing.  `rm -rf` of a real directory never follows the links inside it (GNU rm
# walks with O_NOFOLLOW), so links the agent planted in config/ or in its state
# directory are removed as links, their targets untouched.
uninstall_all() {
  local kept=() left=() dir
  for dir in "$ROOT/etc" "$ROOT/opt" "$PREFIX" "$ROOT/etc/systemd/system" \
             "$ROOT/etc/modules-load.d" "$ROOT/usr/local/bin"; do
    check_dir "$dir"
  done
  check_file "$UNIT"
  check_file "$MODULES"
  check_file "$COMPLETION"
  if $purge; then
    for dir in "$CONF_DIR" "$ROOT/var" "$ROOT/var/lib" "$STATE_DIR"; do
      check_dir "$dir"
    done
  fi

  if [ -f "$UNIT" ]; then
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
      say "stopping and disabling $NAME"
      systemctl disable --now "$NAME.service"
    elif [ -n "$ROOT" ]; then
      systemctl --root="$ROOT" disable "$NAME.service"
    else
      systemctl disable "$NAME.service"  # no systemd running (a chroot): links only
    fi
  fi
  say "removing the unit, the serial modules file, $PREFIX and $BIN_LINK"
  rm -f -- "$UNIT" "$MODULES" "$COMPLETION"
  if [ -d "$UNIT.d" ]; then
    left+=("$UNIT.d (drop-ins: yours, not the install's)")
  fi
  if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed "$NAME.service" 2>/dev/null || true
  fi
  rm -rf -- "$PREFIX"
  if [ -L "$BIN_LINK" ] && [ "$(readlink "$BIN_LINK")" = "$BIN_TARGET" ]; then
    rm -f -- "$BIN_LINK"
  elif [ -e "$BIN_LINK" ] || [ -L "$BIN_LINK" ]; then
    left+=("$BIN_LINK (not the link this script made)")
  fi

  if $purge; then
    say "removing $CONF_DIR (config and secrets) and $STATE_DIR (state database)"
    rm -rf -- "$CONF_DIR" "$STATE_DIR"
    if id -u "$NAME" >/dev/null 2>&1; then
      say "removing user $NAME"
      userdel "$NAME"
    fi
    if getent group "$NAME" >/dev/null; then
      say "removing group $NAME"
      groupdel "$NAME"
    fi
  else
    [ -e "$CONF_DIR" ] && kept+=("$CONF_DIR: the config and the secrets")
    [ -e "$STATE_DIR" ] && kept+=("$STATE_DIR: the state database (outbox, commands, audit)")
    id -u "$NAME" >/dev/null 2>&1 && kept+=("user and group $NAME (they own the above)")
  fi

  echo
  echo "stora-gateway is uninstalled."
  if [ "${#kept[@]}" -gt 0 ]; then
    echo "Kept, so that installing again picks up where it left off:"
    printf '  %s\n' "${kept[@]}"
    echo "Remove them too with: $0 --uninstall --purge"
  fi
  if [ "${#left[@]}" -gt 0 ]; then
    echo "Left alone:"
    printf '  %s\n' "${left[@]}"
  fi
  echo "The site broker (Mosquitto, its accounts and ACL) is not touched: deploy/README.md."
}
if $uninstall; then
  uninstall_all
  exit 0
fi

if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/deploy/systemd/$NAME.service" ]; then
  die "run from a stora-gateway checkout (no pyproject.toml next to deploy/)"
fi
# Root's umask may be 077; the agent's user must be able to read the venv and the unit.
umask 022

# --- check before changing anything ----------------------------------------------------
for dir in "$ROOT/etc" "$ROOT/opt" "$PREFIX" "$PREFIX/deploy" "$PREFIX/docs" \
           "$PREFIX/docs/partner-review" "$CONF_DIR" \
           "$CONFIG_DIR" "$SECRETS" "$ROOT/etc/systemd/system" "$ROOT/etc/modules-load.d" \
           "$ROOT/usr/local/bin" "$ROOT/usr/share" "$ROOT/usr/share/bash-completion" \
           "$COMPLETIONS"; do
  check_dir "$dir"
done
check_file "$UNIT"
check_file "$MODULES"
check_file "$COMPLETION"
if [ -L "$CONFIG" ]; then
  [ "$(readlink "$CONFIG")" = "$CONFIG_TARGET" ] \
    || die "$CONFIG is a symbolic link to $(readlink "$CONFIG"), not $CONFIG_TARGET; \
refusing to follow it as root.  Remove the link (and check how it got there), then run \
this again."
elif [ -e "$CONFIG" ]; then
  check_file "$CONFIG"
  [ "$(stat -c %h -- "$CONFIG")" = 1 ] \
    || die "$CONFIG has other hard links; copy it to a file of its own, then run this again."
  if [ -e "$CONFIG_DIR/gateway.toml" ] || [ -L "$CONFIG_DIR/gateway.toml" ]; then
    die "both $CONFIG and $CONFIG_DIR/gateway.toml exist; keep the one in use as \
$CONFIG_DIR/gateway.toml, remove $CONFIG, then run this again."
  fi
fi
if [ -L "$BIN_LINK" ]; then :; else check_file "$BIN_LINK"; fi

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
# By number from here on: what chown and install are given is what was checked.
AGENT_UID="$(id -u "$NAME")"
AGENT_GID="$(getent group "$NAME" | cut -d: -f3)"
if [ -z "$AGENT_UID" ] || [ -z "$AGENT_GID" ]; then
  die "cannot resolve user and group $NAME"
fi

# --- the package ---------------------------------------------------------------------------
install -d -m 0755 -o root -g root "$PREFIX" "$PREFIX/deploy" "$PREFIX/docs"
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
# The agent's packages: gateway, drivers and the site link protocol they share with the
# relay (sitelink).  Not the dev kit or the relay (tests/deploy/test_deploy_install.py).
cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/gateway" "$SRC/drivers" "$SRC/sitelink" \
  "$BUILD/"
find "$BUILD" -name __pycache__ -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip install --quiet --upgrade "$BUILD"
# The documentation, laid out as in the checkout, so that the references between the
# files (deploy/README.md to ../docs/configuration.md, gateway.example.toml to
# hardware.md) hold here too, whatever becomes of the checkout.
install -m 0644 "$SRC/README.md" "$SRC/hardware.md" "$PREFIX/"
install -m 0644 "$SRC/deploy/README.md" "$SRC/deploy/gateway.example.toml" "$PREFIX/deploy/"
install -m 0644 "$SRC"/docs/*.md "$PREFIX/docs/"
install -d -m 0755 "$PREFIX/docs/partner-review"
install -m 0644 "$SRC"/docs/partner-review/*.png "$PREFIX/docs/partner-review/"
install -d -m 0755 "$ROOT/usr/local/bin"
ln -sfn "$BIN_TARGET" "$BIN_LINK"
# Bash completion for technicians, generated from the CLI's own parser (so it lists
# exactly the commands this release has).  Not fatal: the CLI works without it.
install -d -m 0755 "$COMPLETIONS"
if "$VENV/bin/stora-gateway" completion bash > "$BUILD/completion" 2>/dev/null; then
  install -m 0644 "$BUILD/completion" "$COMPLETION"
else
  say "bash completion not installed: \`stora-gateway completion bash\` failed"
fi

# --- configuration directory ---------------------------------------------------------------
# /etc/stora-gateway is root's, so the agent can neither add nor replace anything in it;
# members of the group (the agent, technicians) read it.  Taken back first: until then
# (an install of the old layout) the agent could still rename entries in it.
own_dir "$CONF_DIR" root "$AGENT_GID" 0750
# secrets/: root's too, read by the group; each secret file is the agent's and its alone
# (the agent refuses to start with a secret open to group or others), read-only to
# it under the unit (ReadOnlyPaths=) and in a directory it cannot write.
own_dir "$SECRETS" root "$AGENT_GID" 0750
for secret in "$SECRETS"/* "$SECRETS"/.[!.]*; do
  if [ -L "$secret" ]; then
    say "left alone: $secret is a symbolic link (secrets are regular files; remove it)"
  elif [ -f "$secret" ] && [ "$(stat -c %h -- "$secret")" != 1 ]; then
    # A hard link may be another file's name (where fs.protected_hardlinks is off).
    say "left alone: $secret has other hard links (a secret is one file; copy it)"
  elif [ -f "$secret" ]; then
    chown -h "$AGENT_UID:$AGENT_GID" "$secret"
    chmod 0600 "$secret"
  elif [ -e "$secret" ]; then
    say "left alone: $secret is not a regular file"
  fi
done
# config/: the agent's, the one directory it may write (the unit's ReadWritePaths=), for
# a signed config.set, which replaces config/gateway.toml atomically (a temporary file
# and a rename next to it).  Root does not look inside it.
own_dir "$CONFIG_DIR" "$AGENT_UID" "$AGENT_GID" 0750
if [ -f "$CONFIG" ] && [ ! -L "$CONFIG" ]; then
  # The old layout: gateway.toml was a file of the agent's own directory.  Owner and
  # mode are set while it is still in root's directory, then one rename (-T: never into
  # a directory planted under that name) moves it to config/.
  say "moving $CONFIG to $CONFIG_DIR/gateway.toml (config.set writes only config/ now)"
  # Checked again now that root owns the directory and no one else can swap the name: a
  # hard link made while pip ran would hand the chown below another file (found in
  # review; where fs.protected_hardlinks is off).
  [ "$(stat -c %h -- "$CONFIG")" = 1 ] \
    || die "$CONFIG has other hard links; copy it to a file of its own, then run this again."
  chown -h "$AGENT_UID:$AGENT_GID" "$CONFIG"
  chmod 0640 "$CONFIG"
  mv -T "$CONFIG" "$CONFIG_DIR/gateway.toml"
fi
if [ ! -L "$CONFIG" ]; then
  # The documented path (--config's default, docs/configuration.md) stays valid: a link,
  # root's.
  ln -s "$CONFIG_TARGET" "$CONFIG"
fi

# --- systemd -------------------------------------------------------------------------------
# DeviceAllow=char-ttyUSB / char-ttyACM resolve a driver's major number when the unit
# starts; loading the drivers at boot makes an adapter plugged in later usable too.
install -d -m 0755 "$ROOT/etc/modules-load.d" "$ROOT/etc/systemd/system"
cat >"$MODULES" <<'END'
# stora-gateway: the serial drivers its unit's DeviceAllow= names (deploy/install.sh)
usbserial
cdc_acm
END
if [ -z "$ROOT" ]; then
  modprobe -q usbserial 2>/dev/null || true
  modprobe -q cdc_acm 2>/dev/null || true
fi

install -m 0644 -o root -g root "$SRC/deploy/systemd/$NAME.service" "$UNIT"
systemd_up=false
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  systemd_up=true
  systemctl daemon-reload
fi
# Works without a running systemd too (a chroot, an image build): it only makes links.
if [ -n "$ROOT" ]; then
  systemctl --root="$ROOT" enable "$NAME.service"
else
  systemctl enable "$NAME.service"
fi
if [ -z "$ROOT" ] && command -v systemd-analyze >/dev/null; then
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
  1. Write the config as the agent's user, so that root never writes into the agent's
     directory; init asks for the site, the controller, its locks and the relay's key:
       runuser -u $NAME -- stora-gateway init --config $CONFIG
     It writes $CONFIG_DIR/gateway.toml, where that link points.
     Every key, its default and where its value comes from:
       $PREFIX/deploy/gateway.example.toml    $PREFIX/docs/configuration.md
     Keep secrets out of it, in files of their own:
       install -m 0600 -o $NAME -g $NAME /path/to/mqtt-password $SECRETS/mqtt-password
     and name them relative to $CONF_DIR: password_file = "secrets/mqtt-password".
  2. Check it as the agent's user:
       runuser -u $NAME -- stora-gateway check-config --config $CONFIG
  3. Start it:   systemctl start $NAME    then: journalctl -u $NAME -f
EOF
fi
cat <<EOF
Technicians use the CLI through the agent's control socket once in its group:
  usermod -aG $NAME <login>     (then log in again)
The site broker (Mosquitto with the ACL and the cloud bridge), upgrades, rollback and
uninstall: $PREFIX/deploy/README.md.
EOF
