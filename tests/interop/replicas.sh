# kiln as several replicas behind Debian's HAProxy, for the interop scripts: coordinators
# as one farm (gRPC over HTTP/2) and registries (HTTP/1.1), all on the PostgreSQL
# metadata and Garage bucket that lib.sh starts. Sourced by lib.sh; do not run it.
#
# INTEROP_REPLICAS=3 makes lib.sh's start_farm and registry_server.sh's start_registry
# start three replicas behind a balancer instead of one server, so that the interop
# scripts run unchanged through one load-balanced address.

FARM_TERM_SECS="${FARM_TERM_SECS:-3}"
REPLICA_PORTS=()
REPLICA_METRICS_PORTS=()
REPLICA_PIDS=()

# start_coordinator_replica N : `kiln coordinator` N of the farm ($WORK/replicaN.log, with
# the scheduler's debug lines), on the same ports as before when it is restarted. Needs
# TOKEN.
start_coordinator_replica() {
    local n="$1" port
    port="${REPLICA_PORTS[$n]:-$(free_port)}"
    REPLICA_PORTS[$n]="$port"
    REPLICA_METRICS_PORTS[$n]="${REPLICA_METRICS_PORTS[$n]:-$(free_port)}"
    cat >"$WORK/replica$n.toml" <<EOF
[coordinator.farm]
enabled = true
advertise_url = "http://127.0.0.1:$port"
lease_term_secs = $FARM_TERM_SECS
EOF
    INTEROP_KILN_LOG=info,kiln_coordinator=debug \
        start_kiln "replica$n" coordinator --config "$WORK/replica$n.toml" \
        --grpc-addr "127.0.0.1:$port" --metrics-addr "127.0.0.1:${REPLICA_METRICS_PORTS[$n]}" \
        --data-dir "$WORK/replica$n" --join-token "$TOKEN"
    REPLICA_PIDS[$n]="$LAST_PID"
}

# start_balancer NAME MODE VAR PORTS... : HAProxy in front of the servers on PORTS (each
# "serving-port:metrics-port"), round robin, each taken out of the rotation within a
# second once its /readyz stops answering (paused or gone). MODE h2 balances gRPC calls,
# http plain HTTP requests (each request on its own, so one upload's requests spread).
# Sets VAR to the balancer's host:port. Not run in a subshell, so its PID reaches the
# exit trap.
start_balancer() {
    local name="$1" mode="$2" var="$3" port i=0 server proto=""
    shift 3
    port=$(free_port)
    [ "$mode" = h2 ] && proto="proto h2"
    {
        cat <<EOF
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 3
    option redispatch
frontend $name
    bind 127.0.0.1:$port $proto
    default_backend $name
backend $name
    balance roundrobin
    option httpchk GET /readyz
    timeout check 500ms
    default-server $proto check check-proto h1 inter 500ms fall 2 rise 2
EOF
        for server in "$@"; do
            i=$((i + 1))
            echo "    server ${name}$i 127.0.0.1:${server%%:*} port ${server##*:}"
        done
    } >"$WORK/$name-haproxy.cfg"
    install_debian_packages haproxy
    haproxy -f "$WORK/$name-haproxy.cfg" -db >"$WORK/$name-haproxy.log" 2>&1 &
    STARTED_PIDS+=("$!")
    local pid=$! i
    # Listening, and past the first health checks (two in a row mark a server up).
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name-haproxy.log" >&2; fail "haproxy $name exited"; }
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    sleep 1.5
    printf -v "$var" '%s' "127.0.0.1:$port"
}

# start_replicated_farm WORKERS : three coordinator replicas behind a balancer and
# WORKERS `kiln worker` processes joined through it. Sets ADDR (the balancer) and TOKEN.
start_replicated_farm() {
    local n w servers=()
    TOKEN="farm-$RANDOM$RANDOM"
    for n in 1 2 3; do
        start_coordinator_replica "$n"
        servers+=("${REPLICA_PORTS[$n]}:${REPLICA_METRICS_PORTS[$n]}")
    done
    start_balancer farm h2 ADDR "${servers[@]}"
    log "haproxy on $ADDR in front of coordinator replicas on ports ${REPLICA_PORTS[*]:1}"
    log "replica $(wait_for_farm_leader) leads"
    for w in $(seq 1 "$1"); do
        start_kiln_worker "worker$w" --coordinator "grpc://$ADDR" --slots 2 \
            --work-dir "$WORK/worker$w" --join-token "$TOKEN"
    done
}

# farm_leader : the number of the live replica that leads with the newest epoch, by the
# logs (one that has since lost its lease or closed its engine does not count; a paused
# one still does, by its log, until a newer epoch exists).
farm_leader() {
    local n line epoch best="" best_epoch=0
    for n in 1 2 3; do
        kill -0 "${REPLICA_PIDS[$n]}" 2>/dev/null || continue
        line=$(grep -n 'this replica leads the farm\|lost the farm.s lease\|closing the farm.s engine' "$WORK/replica$n.log" | tail -n 1)
        case "$line" in *'leads the farm'*) ;; *) continue ;; esac
        epoch=$(sed -E 's/.*epoch=([0-9]+).*/\1/' <<<"$line")
        if [ "$epoch" -gt "$best_epoch" ]; then best="$n"; best_epoch="$epoch"; fi
    done
    echo "$best"
}

# wait_for_farm_leader [NOT] : waits (10 s at most) for a leader other than replica NOT,
# and prints its number.
wait_for_farm_leader() {
    local not="${1:-}" i n
    for i in $(seq 1 200); do
        n=$(farm_leader)
        if [ -n "$n" ] && [ "$n" != "$not" ]; then echo "$n"; return 0; fi
        sleep 0.05
    done
    fail "no farm leader (other than ${not:-none}) within 10 s"
}

# start_replicated_registry NAME VAR : three `kiln registry` processes behind a balancer
# (logs $WORK/NAME-1.log …, PIDs in REGISTRY_PIDS); sets VAR to the balancer's host:port.
REGISTRY_PIDS=()
start_replicated_registry() {
    local n servers=() metrics
    for n in 1 2 3; do
        metrics=$(free_port)
        start_kiln "$1-$n" registry --registry-addr 127.0.0.1:0 \
            --metrics-addr "127.0.0.1:$metrics" --data-dir "$WORK/$1-$n"
        REGISTRY_PIDS[$n]="$LAST_PID"
        servers+=("$(listen_addr "$1-$n" http registry | cut -d: -f2):$metrics")
    done
    start_balancer "$1" http "$2" "${servers[@]}"
    log "haproxy on ${!2} in front of three registry replicas"
}

# coordinator_logs : every coordinator log of this script (one server's, or each
# replica's), for counting what the scheduler did.
coordinator_logs() {
    cat "$WORK"/coordinator.log "$WORK"/replica[0-9]*.log 2>/dev/null || true
}
