#!/bin/sh
# Start `kdcache worker` on a GPU of its own.
#
# `docker compose up --scale worker=N` starts N replicas that all see every GPU of the host. Each
# replica takes the first GPU whose lock file (in a volume the replicas share) it can flock, and
# holds that lock for as long as it lives: the kernel drops it when the container dies, so a
# replacement replica gets the GPU back. KDCACHE_WORKER_DEVICE (cpu, cuda:N) skips the choice.
# Extra arguments are passed on to `kdcache worker`.
set -eu

device="${KDCACHE_WORKER_DEVICE:-auto}"
locks="${KDCACHE_GPU_LOCKS:-}"
if [ "$device" = auto ] && [ -n "$locks" ] && [ -d "$locks" ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    i=0
    while [ "$i" -lt "$gpus" ]; do
        # fd 9 stays open across exec, so the worker process itself holds the lock.
        exec 9>"$locks/gpu$i"
        if flock -n 9; then
            device="cuda:$i"
            break
        fi
        exec 9>&-
        i=$((i + 1))
    done
    if [ "$device" = auto ] && [ "$gpus" -gt 0 ]; then
        echo "kdcache-worker: all $gpus GPUs are taken by other replicas; sharing" >&2
    fi
fi

if [ "$device" = auto ]; then
    exec kdcache worker "$@"
fi
echo "kdcache-worker: using $device" >&2
exec kdcache worker --device "$device" "$@"
