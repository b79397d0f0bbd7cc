#!/usr/bin/env bash
# End-to-end test of `kdcache slurm` on a real one-node Slurm cluster, started here.
#
# Debian's munge, slurmctld and slurmd (apt-get installed when missing) run as root in the
# foreground of their own sessions, with every file (munge key and socket, slurm.conf, state and
# spool dirs, logs) under one temporary directory and the Slurm ports picked free, so nothing is
# shared with a system Slurm or munge. Process tracking is proctrack/linuxproc with no cgroup
# plugins, so no systemd or cgroup delegation is needed. Then tests/fleet/test_slurm_cluster.py
# runs against it (KDCACHE_TEST_SLURM_CONF). Everything is torn down, on failure too: the jobs
# cancelled, the daemons and every process started under them killed, the directory removed.
# Run as `make test-slurm` (needs root).
set -euo pipefail

E2E_NAME=slurm E2E_ROOT="it starts munged, slurmctld and slurmd"
# shellcheck source=scripts/e2e_preamble.sh
. "$(dirname "$0")/e2e_preamble.sh"
MUNGED_PID=
CTLD_PID=
SLURMD_PID=
# Every process started below carries this in its environment (sbatch exports it to the jobs
# too), so that the cleanup finds exactly ours.
export KDCACHE_SLURM_TEST_RUN=$WORK

ours() {
    local pid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [ "$pid" = $$ ] && continue
        { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null |
            grep -qx "KDCACHE_SLURM_TEST_RUN=$WORK" && echo "$pid"
    done
    return 0
}

stop_pid() {
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null
    return 0
}

cleanup() {
    local rc=$? pid left
    set +e
    trap - EXIT INT TERM
    unset KDCACHE_SLURM_TEST_RUN # what cleanup itself starts is not to be killed
    if [ "$rc" != 0 ] && [ -d "$WORK/log" ]; then
        log "failed (exit $rc); daemon logs:"
        tail -n 30 "$WORK"/log/*.log 2>/dev/null
    fi
    if [ -n "$CTLD_PID" ] && kill -0 "$CTLD_PID" 2>/dev/null; then
        log "cancelling every job"
        timeout 20 scancel --full --quiet --user=root 2>/dev/null
        for _ in $(seq 50); do
            [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    stop_pid "$SLURMD_PID"
    stop_pid "$CTLD_PID"
    # slurmstepd and job processes outlive slurmd: ours carry the marker
    for pid in $(ours); do
        [ "$pid" != "$MUNGED_PID" ] && kill -9 "$pid" 2>/dev/null
    done
    stop_pid "$MUNGED_PID"
    left=$(ours)
    [ -n "$POLICY_RC" ] && rm -f "$POLICY_RC"
    rm -rf "$WORK"
    if [ -n "$left" ] || [ -e "$WORK" ]; then
        log "WARNING: cleanup incomplete (processes $left, or $WORK left)"
        rc=1
    fi
    log "cleaned up; exit $rc after $(($(date +%s) - T0))s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    apt_install "${missing[@]}"
}

wait_until() { # SECONDS WHAT COMMAND...
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${secs}s waiting for $what"
}

start_munge() {
    mkdir -p "$WORK/munge" "$WORK/run"
    chmod 700 "$WORK/munge"
    chmod 755 "$WORK/run"
    head -c 1024 /dev/urandom >"$WORK/munge/munge.key"
    chmod 400 "$WORK/munge/munge.key"
    setsid munged --foreground --force --key-file="$WORK/munge/munge.key" \
        --socket="$WORK/run/munge.sock" --pid-file="$WORK/run/munged.pid" \
        --seed-file="$WORK/munge/seed" --log-file="$WORK/munge/munged.log" \
        >"$WORK/munge/out.log" 2>&1 </dev/null &
    MUNGED_PID=$!
    wait_until 30 "munged" sh -c "munge -S '$WORK/run/munge.sock' -n | unmunge -S '$WORK/run/munge.sock'"
}

write_conf() {
    local node=$1 mem_mb
    mem_mb=$(awk '$1 == "MemTotal:" {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    mkdir -p "$WORK/state" "$WORK/spool" "$WORK/log"
    cat >"$WORK/slurm.conf" <<EOF
ClusterName=kdcachetest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$WORK/run/munge.sock
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

node_idle() { [ "$(sinfo -h -n "$NODE" -o %t 2>/dev/null)" = idle ]; }

install_packages
log "work dir $WORK; $(slurmctld -V), munge $(munged --version 2>&1 | awk '{print $1}')"
NODE=$(hostname -s)
start_munge
log "munged up ($MUNGED_PID)"
write_conf "$NODE"
export SLURM_CONF=$WORK/slurm.conf
setsid slurmctld -D -i -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 </dev/null &
CTLD_PID=$!
wait_until 60 "slurmctld" scontrol ping
setsid slurmd -D -N "$NODE" -f "$SLURM_CONF" >"$WORK/log/slurmd.out" 2>&1 </dev/null &
SLURMD_PID=$!
wait_until 90 "node $NODE to be idle" node_idle
sinfo | sed 's/^/  /'

log "running tests/fleet/test_slurm_cluster.py"
KDCACHE_TEST_SLURM_CONF=$SLURM_CONF timeout --foreground 900 "$PY" -m pytest -q -p no:cacheprovider \
    -o addopts="" tests/fleet/test_slurm_cluster.py
log "PASSED"
