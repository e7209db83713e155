# Shared helpers for the interop scripts: installing clients, building kiln, and
# starting kiln servers on free loopback ports. Source it; do not run it.
#
# Every server started here is recorded and killed by PID on exit. A client that cannot
# be installed is a failure, never a skip.

set -euo pipefail

INTEROP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INTEROP_DIR/../.." && pwd)"
# Clients are cached here between runs; installs are idempotent.
CLIENT_CACHE="${KILN_INTEROP_CACHE:-$HOME/.cache/kiln-interop}"
WORK="$(mktemp -d /tmp/kiln-interop.XXXXXX)"
STARTED_PIDS=()

# Newest first: a daemon started on top of another (dockerd on containerd, a client on a
# server) stops while what it depends on still answers.
stop_started() {
    local i pid
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid="${STARTED_PIDS[$i]}"
        [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
    STARTED_PIDS=()
}
cleanup() {
    stop_started
    if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
on_exit() {
    local status=$?
    # On object storage, a script that passed must have put its blobs in the bucket.
    if [ "$status" -eq 0 ] && [ -n "${GARAGE_CONFIG:-}" ]; then
        garage_holds_objects || status=1
    fi
    # kiln first (it holds connections), then PostgreSQL, then the files.
    stop_started
    if [ -n "${POSTGRES_STOP:-}" ]; then "${POSTGRES_STOP[@]}" >/dev/null 2>&1 || true; fi
    cleanup
    exit "$status"
}
trap on_exit EXIT

log() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# Builds the release binary once and sets KILN to it.
build_kiln() {
    if [ -z "${KILN:-}" ]; then
        log "building kiln (release)"
        (cd "$REPO_ROOT" && cargo build --release --quiet -p kiln)
        KILN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/kiln"
    fi
    [ -x "$KILN" ] || fail "kiln binary $KILN is missing"
}

# PRODUCER | contains PATTERN : whether the input has a line matching PATTERN. It reads
# all of its input first: `grep -q` stops at the first match, and under pipefail the
# producer's SIGPIPE would then fail the pipeline at random.
contains() {
    local input
    input="$(cat)"
    grep -q -- "$1" <<<"$input"
}

# start_kiln NAME ARGS... : runs `kiln ARGS...` with logs in $WORK/NAME.log and waits
# for its ready file ($WORK/NAME.ready.json, `--ready-file`), which kiln writes once every
# listener is up; `listen_addr` reads the addresses from it.
start_kiln() {
    local name="$1"; shift
    local logfile="$WORK/$name.log" ready="$WORK/$name.ready.json"
    rm -f "$ready"
    # INTEROP_KILN_LOG overrides the log filter, e.g. to see the scheduler's decisions.
    KILN_LOG="${INTEROP_KILN_LOG:-info}" "$KILN" "$@" --ready-file "$ready" >"$logfile" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$!")
    local i
    for i in $(seq 1 200); do
        [ -s "$ready" ] && return 0
        kill -0 "$!" 2>/dev/null || { cat "$logfile" >&2; fail "kiln $name exited during start-up"; }
        sleep 0.1
    done
    cat "$logfile" >&2
    fail "kiln $name did not start within 20 s"
}

# start_kiln_worker NAME ARGS... : runs `kiln worker ARGS...` with logs in $WORK/NAME.log
# and waits until it has registered with its coordinator. Sets LAST_PID.
start_kiln_worker() {
    local name="$1"; shift
    KILN_LOG="${INTEROP_KILN_LOG:-info}" "$KILN" worker --metrics-addr 127.0.0.1:0 "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$!")
    wait_for_log "$name" 'registered with the coordinator' "$LAST_PID"
}

# start_farm N : a `kiln coordinator` (log: $WORK/coordinator.log, with the scheduler's
# "assigned" debug lines; `coordinator_logs` prints it) and N `kiln worker` processes
# (worker1..N, 2 slots each) joined with a fresh token. Sets ADDR (host:port) and TOKEN.
# With INTEROP_REPLICAS=3, three coordinator replicas behind HAProxy (replicas.sh).
start_farm() {
    local w
    if [ "${INTEROP_REPLICAS:-1}" -gt 1 ]; then
        start_replicated_farm "$1"
        return
    fi
    TOKEN="farm-$RANDOM$RANDOM"
    INTEROP_KILN_LOG=info,kiln_coordinator=debug \
        start_kiln coordinator coordinator --grpc-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
        --data-dir "$WORK/kiln-data" --join-token "$TOKEN"
    ADDR=$(listen_addr coordinator grpc)
    [ -n "$ADDR" ] || fail "could not read the coordinator's address from its log"
    for w in $(seq 1 "$1"); do
        start_kiln_worker "worker$w" --coordinator "grpc://$ADDR" --slots 2 \
            --work-dir "$WORK/worker$w" --join-token "$TOKEN"
    done
}

# make_run_project : a project directory for `kiln run` ($PROJECT) holding numbers.txt
# (1 to 100, a line each).
make_run_project() {
    PROJECT="$WORK/project"
    mkdir -p "$PROJECT"
    seq 1 100 >"$PROJECT/numbers.txt"
}

# kiln_run NAME ARGS... : `kiln run ARGS...` in $PROJECT against grpc://$ADDR, output in
# $WORK/NAME.{out,err}; five minutes at most.
kiln_run() {
    local name="$1"; shift
    (cd "$PROJECT" && env -u INTEROP_KILN_LOG timeout 300 "$KILN" run --coordinator "grpc://$ADDR" "$@") \
        >"$WORK/$name.out" 2>"$WORK/$name.err"
}

# wait_for_log NAME PATTERN PID [SECONDS] : waits until $WORK/NAME.log matches PATTERN
# (grep -E), failing if PID exits first or SECONDS (default 20) pass.
wait_for_log() {
    local name="$1" pattern="$2" pid="$3" seconds="${4:-20}" i
    for i in $(seq 1 $((seconds * 10))); do
        grep -Eqs "$pattern" "$WORK/$name.log" && return 0
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$WORK/$name.log" >&2; fail "$name exited while waiting for: $pattern"; }
        sleep 0.1
    done
    tail -n 30 "$WORK/$name.log" >&2
    fail "$name did not log \"$pattern\" within $seconds s"
}

# stop_pid PID SIGNAL : sends SIGNAL to a process this script started and reaps it.
stop_pid() {
    kill "-$2" "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# listen_addr NAME SCHEME [SERVER] : the host:port kiln NAME bound for SCHEME, from its
# ready file: `grpc` is the coordinator; `http registry` the registry; `http` alone the
# metrics and health listener.
listen_addr() {
    local key="$2"
    [ "$2" = http ] && key="${3:-metrics}"
    grep -o "\"$key\":\"[^\"]*\"" "$WORK/$1.ready.json" | cut -d'"' -f4
}

# Installs Bazel 2.1.0 from npm (see shared/CLIENTS.md) and sets BAZEL.
install_bazel() {
    local dir="$CLIENT_CACHE/bazel"
    BAZEL="$dir/node_modules/@bazel/bazel-linux_x64/bazel-2.1.0-linux-x86_64"
    if [ ! -x "$BAZEL" ]; then
        log "installing Bazel 2.1.0 from npm"
        command -v npm >/dev/null || fail "npm is required to install Bazel"
        mkdir -p "$dir"
        (cd "$dir" && npm init -y >/dev/null && npm install --no-audit --no-fund @bazel/bazel-linux_x64@2.1.0 >/dev/null)
    fi
    [ -x "$BAZEL" ] || fail "Bazel did not install"
}

# install_debian_packages PACKAGE... : installs the missing ones (`apt-get update` only
# then); a package that does not install is a failure.
install_debian_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || fail "Debian package $p did not install"
    done
}

# start_daemon NAME READY-COMMAND -- COMMAND... : runs COMMAND with its log in
# $WORK/NAME.log until READY-COMMAND succeeds (20 s at most). Its PID is killed on exit.
start_daemon() {
    local name="$1" ready="$2"
    shift 3
    "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PIDS+=("$!")
    local pid="$!" i
    for i in $(seq 1 200); do
        if eval "$ready" >/dev/null 2>&1; then return 0; fi
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$WORK/$name.log" >&2; fail "$name exited during start-up"; }
        sleep 0.1
    done
    tail -n 30 "$WORK/$name.log" >&2
    fail "$name did not become ready within 20 s"
}

# start_containerd DIR : a containerd (no CRI plugin) with its root, state and socket
# under DIR; sets CONTAINERD_SOCK and CTR, a ctr command line bound to it. DIR must be
# short: unix socket paths end at 108 bytes.
start_containerd() {
    local dir="$1"
    mkdir -p "$dir"
    cat >"$dir/containerd.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/ctd.sock"
[ttrpc]
  address = "$dir/ctd.sock.ttrpc"
TOML
    start_daemon containerd "ctr --address $dir/ctd.sock version" -- containerd --config "$dir/containerd.toml"
    CONTAINERD_SOCK="$dir/ctd.sock"
    CTR=(ctr --address "$CONTAINERD_SOCK" --namespace kiln-interop)
}

# start_dockerd DIR : a dockerd on start_containerd's containerd, with its data, socket
# and client config under DIR: vfs storage, no iptables, no bridge (run containers with
# --network none). Exports DOCKER_HOST and DOCKER_CONFIG for the docker client.
start_dockerd() {
    local dir="$1"
    [ -n "${CONTAINERD_SOCK:-}" ] || fail "start_dockerd needs start_containerd first"
    export DOCKER_HOST="unix://$dir/docker.sock" DOCKER_CONFIG="$dir/docker-config"
    mkdir -p "$DOCKER_CONFIG" && echo '{}' >"$DOCKER_CONFIG/config.json"
    start_daemon dockerd "docker info" -- dockerd \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
        -H "$DOCKER_HOST" --containerd "$CONTAINERD_SOCK" \
        --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs
}

# prepare_bazel_workspace MIN : copies the genrule workspace to $WORK/workspace (WORKSPACE)
# and counts its genrules (GENRULES), failing if there are fewer than MIN.
prepare_bazel_workspace() {
    WORKSPACE="$WORK/workspace"
    cp -r "$INTEROP_DIR/bazel-workspace" "$WORKSPACE"
    GENRULES=$(grep -c '' <(cd "$WORKSPACE" && "$BAZEL" --output_user_root="$WORK/bazel-root" --batch query 'kind(genrule, //...)' 2>/dev/null))
    [ "$GENRULES" -ge "$1" ] || fail "the workspace should hold at least $1 genrules, found $GENRULES"
}

# check_bazel_outputs : the interop workspace's outputs (prepare_bazel_workspace) are
# what its genrules compute, recomputed here.
check_bazel_outputs() {
    local bin="$WORKSPACE/bazel-bin" i n
    for i in $(seq 0 15); do
        diff <(for n in $(seq 1 $((100 + i))); do echo "leaf $i line $n"; done) "$bin/leaf_$i.txt" >/dev/null \
            || fail "leaf_$i.txt is wrong"
    done
    for i in $(seq 0 7); do
        diff <(cat "$bin/leaf_$((2 * i)).txt" "$bin/leaf_$((2 * i + 1)).txt" | sort) "$bin/pair_$i.txt" >/dev/null \
            || fail "pair_$i.txt is wrong"
    done
    local big_sha
    big_sha=$(awk 'BEGIN { for (i = 0; i < 200000; i++) print "kiln interop big blob line " i }' | sha256sum | cut -d' ' -f1)
    [ "$(sha256sum <"$bin/big.bin" | cut -d' ' -f1)" = "$big_sha" ] || fail "big.bin is wrong"
    [ "$(tail -n 1 "$bin/summary.txt")" = "$big_sha" ] || fail "summary.txt does not end with big.bin's digest"
    [ "$(head -n 1 "$bin/summary.txt" | awk '{print $1}')" = $((100 + 101 + 114 + 115)) ] \
        || fail "summary.txt's line count is wrong: $(head -n 1 "$bin/summary.txt")"
    cmp -s "$bin/summary.txt" "$bin/tree/a.txt" || fail "tree/a.txt is wrong"
    [ "$(cat "$bin/tree/sub/b.txt")" = nested ] || fail "tree/sub/b.txt is wrong"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_garage : one Garage node (an S3-compatible object store) on free loopback ports
# under $WORK/garage, with the bucket `kiln` and a key allowed on it, and exports what
# makes every kiln this script starts keep its blobs there (KILN_STORAGE_BACKEND=s3,
# KILN_S3_*, AWS_*). Sets GARAGE and GARAGE_CONFIG.
start_garage() {
    local dir="$WORK/garage" s3 rpc id i
    GARAGE="$(command -v garage || echo "$HOME/.cargo/bin/garage")"
    [ -x "$GARAGE" ] || fail "garage is not installed: cargo install garage --version 2.5.0 --locked"
    mkdir -p "$dir"
    s3=$(free_port) rpc=$(free_port)
    GARAGE_CONFIG="$dir/garage.toml"
    cat >"$GARAGE_CONFIG" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
TOML
    "$GARAGE" -c "$GARAGE_CONFIG" server >"$WORK/garage.log" 2>&1 &
    STARTED_PIDS+=("$!")
    for i in $(seq 1 100); do
        id=$("$GARAGE" -c "$GARAGE_CONFIG" node id -q 2>/dev/null | cut -d@ -f1) && [ -n "$id" ] && break
        sleep 0.2
    done
    [ -n "$id" ] || { cat "$WORK/garage.log" >&2; fail "garage did not start"; }
    local key_id=GK6b696c6e2d696e7465726f70 secret
    secret="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    {
        "$GARAGE" -c "$GARAGE_CONFIG" layout assign -z z0 -c 1G "$id"
        "$GARAGE" -c "$GARAGE_CONFIG" layout apply --version 1
        "$GARAGE" -c "$GARAGE_CONFIG" key import --yes -n kiln "$key_id" "$secret"
        "$GARAGE" -c "$GARAGE_CONFIG" bucket create kiln
        "$GARAGE" -c "$GARAGE_CONFIG" bucket allow --read --write --owner kiln --key kiln
    } >>"$WORK/garage.log" 2>&1 || { cat "$WORK/garage.log" >&2; fail "setting up garage"; }
    export KILN_STORAGE_BACKEND=s3 KILN_S3_BUCKET=kiln KILN_S3_ENDPOINT="http://127.0.0.1:$s3" \
        KILN_S3_REGION=garage AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$secret"
    log "garage on 127.0.0.1:$s3: kiln keeps its blobs in bucket kiln"
}

# Whether the bucket holds any object (what a script on object storage wrote went there).
garage_holds_objects() {
    local objects
    objects=$("$GARAGE" -c "$GARAGE_CONFIG" bucket info kiln | awk '/^Objects:/ { print $2 }')
    printf '\n== the bucket holds %s objects\n' "${objects:-?}" >&2
    [ "${objects:-0}" -gt 0 ] || { echo "FAIL: nothing reached the bucket" >&2; return 1; }
}

# start_postgres : a throwaway PostgreSQL cluster (Debian's initdb and pg_ctl) on a free
# loopback port under $WORK/postgres, user kiln with trust authentication, and exports
# KILN_POSTGRES_URL so every kiln this script starts keeps its metadata there. Under root
# the cluster belongs to the postgres system user (PostgreSQL refuses root). Sets
# POSTGRES_URL.
start_postgres() {
    local bin dir="$WORK/postgres" port as=()
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [ -x "$bin/initdb" ] || fail "PostgreSQL is not installed (Debian's postgresql package)"
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$dir"
        chmod o+x "$WORK"  # for the postgres user to reach its directory
        as=(runuser -u postgres --)
    fi
    port=$(free_port)
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U kiln --auth=trust --no-sync -E UTF8 >"$WORK/postgres.log" 2>&1 \
        || { cat "$WORK/postgres.log" >&2; fail "initdb"; }
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >>"$WORK/postgres.log" 2>&1 \
        || { cat "$WORK/postgres.log" "$dir/server.log" >&2; fail "pg_ctl start"; }
    POSTGRES_STOP=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
    POSTGRES_START=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start)
    POSTGRES_URL="postgres://kiln@127.0.0.1:$port/postgres"
    export KILN_POSTGRES_URL="$POSTGRES_URL"
    log "postgres on 127.0.0.1:$port: kiln keeps its metadata there"
}

# INTEROP_STORAGE=s3 runs a script with every kiln on a Garage bucket
# (tests/interop/object_storage.sh does that for the scripts that matter).
if [ "${INTEROP_STORAGE:-fs}" = s3 ]; then
    start_garage
fi
# INTEROP_METADATA=postgres runs a script with every kiln's metadata in PostgreSQL.
if [ "${INTEROP_METADATA:-sled}" = postgres ]; then
    start_postgres
fi
source "$INTEROP_DIR/replicas.sh"
if [ "${INTEROP_REPLICAS:-1}" -gt 1 ] && [ "${INTEROP_METADATA:-sled}:${INTEROP_STORAGE:-fs}" != postgres:s3 ]; then
    fail "INTEROP_REPLICAS needs shared stores: INTEROP_METADATA=postgres INTEROP_STORAGE=s3"
fi
