#!/usr/bin/env bash
# Three `kiln coordinator` replicas as one farm: metadata in PostgreSQL, blobs in Garage,
# HAProxy (Debian's) round-robin in front over HTTP/2, two workers and every client on
# the load-balanced address only.
# - `kiln run --shards 8` through the balancer: every shard executes once, whichever
#   replica each call lands on;
# - kill -9 of the leader in the middle of a sharded run: another replica takes over, the
#   run completes with every shard's output correct, and the script reports how long
#   the farm had no leader;
# - the leader paused (SIGSTOP) past its lease: another takes over; resumed (SIGCONT),
#   the old leader finds its epoch superseded and assigns nothing.
INTEROP_METADATA=postgres INTEROP_STORAGE=s3
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_debian_packages haproxy
build_kiln
TERM_SECS=3
TOKEN="farm-$RANDOM$RANDOM"

# start_replica N : kiln coordinator N on its own free port, in the farm.
PORTS=()
PIDS=()
METRICS_PORTS=()
start_replica() {
    local n="$1" port
    port="${PORTS[$n]:-$(free_port)}"
    PORTS[$n]="$port"
    METRICS_PORTS[$n]="${METRICS_PORTS[$n]:-$(free_port)}"
    cat >"$WORK/replica$n.toml" <<EOF
[coordinator.farm]
enabled = true
advertise_url = "http://127.0.0.1:$port"
lease_term_secs = $TERM_SECS
EOF
    INTEROP_KILN_LOG=info,kiln_coordinator=debug \
        start_kiln "replica$n" coordinator --config "$WORK/replica$n.toml" \
        --grpc-addr "127.0.0.1:$port" --metrics-addr "127.0.0.1:${METRICS_PORTS[$n]}" \
        --data-dir "$WORK/replica$n" --join-token "$TOKEN"
    PIDS[$n]="$LAST_PID"
}
for n in 1 2 3; do start_replica "$n"; done

LB_PORT=$(free_port)
cat >"$WORK/haproxy.cfg" <<EOF
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
frontend grpc
    bind 127.0.0.1:$LB_PORT proto h2
    default_backend kiln
backend kiln
    balance roundrobin
    # Each replica's /readyz on its metrics listener: a replica that is paused or gone
    # stops answering it and is out of the rotation within a second.
    option httpchk GET /readyz
    timeout check 500ms
    default-server proto h2 check check-proto h1 inter 500ms fall 2 rise 2
    server replica1 127.0.0.1:${PORTS[1]} port ${METRICS_PORTS[1]}
    server replica2 127.0.0.1:${PORTS[2]} port ${METRICS_PORTS[2]}
    server replica3 127.0.0.1:${PORTS[3]} port ${METRICS_PORTS[3]}
EOF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
STARTED_PIDS+=("$!")
LB="127.0.0.1:$LB_PORT"
log "haproxy on $LB in front of replicas on ports ${PORTS[*]:1}"

# leader : the number of the live replica that leads with the newest epoch, by the logs
# (a replica that has since lost its lease or closed its engine does not count; a paused
# one still does, by its log, until a newer epoch exists).
leader() {
    local n line epoch best="" best_epoch=0
    for n in 1 2 3; do
        kill -0 "${PIDS[$n]}" 2>/dev/null || continue
        line=$(grep -n 'this replica leads the farm\|lost the farm.s lease\|closing the farm.s engine' "$WORK/replica$n.log" | tail -n 1)
        case "$line" in *'leads the farm'*) ;; *) continue ;; esac
        epoch=$(sed -E 's/.*epoch=([0-9]+).*/\1/' <<<"$line")
        if [ "$epoch" -gt "$best_epoch" ]; then best="$n"; best_epoch="$epoch"; fi
    done
    echo "$best"
}
wait_for_leader() {
    local not="${1:-}" i n
    for i in $(seq 1 200); do
        n=$(leader)
        if [ -n "$n" ] && [ "$n" != "$not" ]; then echo "$n"; return 0; fi
        sleep 0.05
    done
    fail "no leader (other than ${not:-none}) within 10 s"
}
LEADER=$(wait_for_leader)
log "replica $LEADER leads"

for w in 1 2; do
    start_kiln_worker "worker$w" --coordinator "grpc://$LB" --slots 2 \
        --work-dir "$WORK/worker$w" --join-token "$TOKEN"
done

ADDR="$LB"
make_run_project
# check_sums NAME SALT : every shard's sum-{shard}.txt is its slice's sum.
check_sums() {
    local shard expected
    for shard in $(seq 0 7); do
        expected=$(awk -v s="$shard" 'NR % 8 == s { x += $1 } END { print x }' "$PROJECT/numbers.txt")
        [ "$(cat "$PROJECT/sum-$shard.txt")" = "$expected" ] || fail "$1: sum-$shard.txt is not shard $shard's sum"
    done
}
# sharded SLEEP SALT : sets SHARDED to a run of 8 shards, each summing its slice after
# sleeping SLEEP seconds (to be caught mid-run); SALT makes each run's actions new.
sharded() {
    SHARDED=(--shards 8 --output 'sum-{shard}.txt' -- sh -c \
        "sleep $1; awk -v s=\"\$TEST_SHARD_INDEX\" -v t=\"\$TEST_TOTAL_SHARDS\" 'NR % t == s { x += \$1 } END { print x }' numbers.txt > sum-{shard}.txt; echo salt $2")
}

log "kiln run --shards 8 through the balancer"
sharded 0 first
kiln_run first "${SHARDED[@]}" || { cat "$WORK/first.err" >&2; fail "the sharded run failed"; }
check_sums first
[ "$(grep -c 'executed, exit code 0' "$WORK/first.err")" -eq 8 ] || fail "expected 8 executed shards"

log "kill -9 of the leader (replica $LEADER) in the middle of a sharded run"
rm -f "$PROJECT"/sum-*.txt
sharded 3 failover
kiln_run failover "${SHARDED[@]}" &
RUN=$!
# The first wave of shards (4 slots) is running: each sleeps 3 s.
sleep 2
KILLED_AT=$(date +%s.%N)
kill -9 "${PIDS[$LEADER]}"
wait "${PIDS[$LEADER]}" 2>/dev/null || true
OLD=$LEADER
LEADER=$(wait_for_leader "$OLD")
LED_AT=$(date +%s.%N)
GAP=$(awk -v a="$KILLED_AT" -v b="$LED_AT" 'BEGIN { printf "%.1f", b - a }')
log "replica $LEADER leads after ${GAP}s without a leader (lease term ${TERM_SECS}s)"
wait "$RUN" || { cat "$WORK/failover.err" >&2; fail "the run across the failover failed"; }
check_sums failover
grep -q 'resuming' "$WORK/failover.err" || log "(the client needed no resume)"
start_replica "$OLD"

log "the leader (replica $LEADER) paused past its lease, then resumed"
PAUSED=$LEADER
kill -STOP "${PIDS[$PAUSED]}"
LEADER=$(wait_for_leader "$PAUSED")
log "replica $LEADER took over from the paused replica $PAUSED"
BEFORE=$(grep -c 'assigned operation=' "$WORK/replica$PAUSED.log" || true)
# While it is still paused: the workers, no longer hearing from it, rejoin through the
# balancer, which no longer sends anything to it either.
rm -f "$PROJECT"/sum-*.txt
sharded 0 during-pause
kiln_run during_pause "${SHARDED[@]}" || { cat "$WORK/during_pause.err" >&2; fail "the run while the old leader was paused failed"; }
check_sums during_pause
kill -CONT "${PIDS[$PAUSED]}"
wait_for_log "replica$PAUSED" "lost the farm.s lease|closing the farm.s engine" "${PIDS[$PAUSED]}" 10
rm -f "$PROJECT"/sum-*.txt
sharded 0 after-pause
kiln_run after_pause "${SHARDED[@]}" || { cat "$WORK/after_pause.err" >&2; fail "the run after the pause failed"; }
check_sums after_pause
AFTER=$(grep -c 'assigned operation=' "$WORK/replica$PAUSED.log" || true)
[ "$AFTER" -eq "$BEFORE" ] || fail "the deposed replica $PAUSED assigned $((AFTER - BEFORE)) actions after it resumed"
if grep -q 'refusing an Assign from a deposed leader' "$WORK"/worker*.log; then
    fail "a worker was sent an Assign from a deposed leader"
fi

echo "farm: 8/8 shards through haproxy; leader killed mid-run: ${GAP}s without a leader, run correct; a run completed while the old leader was paused, which assigned nothing after resuming"
