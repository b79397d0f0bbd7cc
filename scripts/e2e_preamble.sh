# Sourced (never run) by the root end-to-end tests, scripts/test_compose.sh and scripts/test_slurm.sh:
# the start they share. Before sourcing, the script sets
#   E2E_NAME   short name: log prefix "[test-$E2E_NAME]" and work dir /tmp/kdcache-$E2E_NAME.*
#   E2E_ROOT   why it must run as root (said in the error when it does not)
# After it: the repository root is the working directory (ROOT), PY is the venv's Python, WORK a
# fresh directory (mode 755) for the script's cleanup to remove, T0 the start time, and log, die,
# free_port and apt_install are defined. apt_install records in POLICY_RC a policy-rc.d it wrote,
# for the cleanup to remove.

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
T0=$(date +%s)
POLICY_RC=

log() { printf '[test-%s %4ds] %s\n' "$E2E_NAME" "$(($(date +%s) - T0))" "$*"; }
die() {
    log "ERROR: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root ($E2E_ROOT)"
[ -x "$PY" ] || die "no $PY: run 'make env' first"

WORK=$(mktemp -d "/tmp/kdcache-$E2E_NAME.XXXXXX")
# daemons (munged, dockerd's containers) want every directory above their files searchable by all
chmod 755 "$WORK"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# apt_install PACKAGE...: apt-get update and install, logged to $WORK/apt.log.
apt_install() {
    [ $# = 0 ] && return
    log "installing $*"
    # Keep the packages' maintainer scripts from starting system daemons of their own.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        POLICY_RC=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod +x "$POLICY_RC"
    fi
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -qq)
    "${apt[@]}" update >"$WORK/apt.log" 2>&1 || die "apt-get update failed: $(tail "$WORK/apt.log")"
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "$@" \
        >>"$WORK/apt.log" 2>&1 || die "apt-get install failed: $(tail "$WORK/apt.log")"
}
