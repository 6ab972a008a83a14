# shellcheck shell=bash
# Sourced by scripts/test: make sure the programs in scripts/system-tools are installed,
# before the venv is built or anything runs (a missing broker must not cost minutes of
# set-up first).  Root with apt-get: `apt-get update`, then `apt-get install -y` of the
# missing packages.  Anyone else: stop at once, naming the command to run.
#
# STORA_TEST_TOOLS (tests of this file only): another list to check instead.

# Where Debian keeps programs that a user's PATH often lacks (mosquitto, mkfs.ext4; the
# PostgreSQL server's initdb and pg_ctl, under their version's directory).
TOOLS_SBIN_DIRS=(/usr/local/sbin /usr/sbin /sbin /usr/lib/postgresql/*/bin)
TOOLS_LIST="${STORA_TEST_TOOLS:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/system-tools}"
# Exit status when the suite cannot run here: as a bad invocation, like _env.sh's
# missing Python; 1 stays the suite's own "a test failed".
TOOLS_EXIT_MISSING=2

have_tool() {  # command
  local dir
  command -v "$1" >/dev/null 2>&1 && return 0
  for dir in "${TOOLS_SBIN_DIRS[@]}"; do
    [ -x "$dir/$1" ] && return 0
  done
  return 1
}

# The packages whose commands are missing, one a line, each once, in the list's order.
missing_packages() {
  local command package seen=" "
  while read -r command package _; do
    case "$command" in '' | '#'*) continue ;; esac
    if ! have_tool "$command" && [[ "$seen" != *" $package "* ]]; then
      seen+="$package "
      printf '%s\n' "$package"
    fi
  done <"$TOOLS_LIST"
}

ensure_system_tools() {
  local missing
  mapfile -t missing < <(missing_packages)
  [ "${#missing[@]}" = 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing what the tests need: ${missing[*]}"
    # No debconf questions: CI and a chroot have nobody to answer them.
    if ! DEBIAN_FRONTEND=noninteractive apt-get update \
        || ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; then
      echo "scripts/test: apt-get could not install ${missing[*]} (its error is above)" >&2
      exit "$TOOLS_EXIT_MISSING"
    fi
    mapfile -t missing < <(missing_packages)
    [ "${#missing[@]}" = 0 ] && return 0
    echo "scripts/test: still missing after apt-get install: ${missing[*]}" \
      "(see $TOOLS_LIST for the programs the tests need)" >&2
    exit "$TOOLS_EXIT_MISSING"
  fi
  if command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test: the tests need ${missing[*]}, not installed here; install" \
      "them with: sudo apt-get install -y ${missing[*]}" >&2
  else
    echo "scripts/test: the tests need the programs of the Debian packages" \
      "${missing[*]}, not installed here; on Debian: sudo apt-get install -y" \
      "${missing[*]} (the list: $TOOLS_LIST)" >&2
  fi
  exit "$TOOLS_EXIT_MISSING"
}
