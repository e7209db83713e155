#!/usr/bin/env bash
# Three `kiln coordinator` replicas as one farm: metadata in PostgreSQL, blobs in Garage,
# HAProxy (Debian's) round-robin in front over HTTP/2, two workers and every client on
# the load-balanced address only.
# - `kiln run --shards 8` through the balancer: every shard executes once, whichever
#   replica each call lands on;
# - kill -9 of the leader in the middle of a sharded run, and again in the middle of a
#   Bazel --remote_executor build of the interop workspace: another replica takes over,
#   the run and the build complete with every output correct, and the script reports how
#   long the farm had no leader;
# - the leader paused (SIGSTOP) past its lease: another takes over; resumed (SIGCONT),
#   the old leader finds its epoch superseded and assigns nothing.
INTEROP_METADATA=postgres INTEROP_STORAGE=s3 INTEROP_REPLICAS=3
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_bazel
build_kiln
prepare_bazel_workspace 20
start_replicated_farm 2
LEADER=$(farm_leader)
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
kill -9 "${REPLICA_PIDS[$LEADER]}"
wait "${REPLICA_PIDS[$LEADER]}" 2>/dev/null || true
OLD=$LEADER
LEADER=$(wait_for_farm_leader "$OLD")
LED_AT=$(date +%s.%N)
GAP=$(awk -v a="$KILLED_AT" -v b="$LED_AT" 'BEGIN { printf "%.1f", b - a }')
log "replica $LEADER leads after ${GAP}s without a leader (lease term ${FARM_TERM_SECS}s)"
wait "$RUN" || { cat "$WORK/failover.err" >&2; fail "the run across the failover failed"; }
check_sums failover
grep -q 'resuming' "$WORK/failover.err" || log "(the client needed no resume)"
start_coordinator_replica "$OLD"

log "kill -9 of the leader (replica $LEADER) in the middle of a Bazel --remote_executor build"
# Bazel 2.1's default 5 retries back off for about 3 s in all, less than a failover takes
# (a lease term and a bit); 10 span about 20 s.
BEFORE=$(grep -c 'assigned operation=' "$WORK/replica$LEADER.log" || true)
(cd "$WORKSPACE" && timeout 300 "$BAZEL" --output_user_root="$WORK/bazel-root" --batch build //... \
    --remote_executor="grpc://$ADDR" --remote_timeout=120 --remote_retries=10 --jobs=8) \
    >"$WORK/bazel_failover.out" 2>&1 &
BUILD=$!
for i in $(seq 1 600); do
    [ "$(grep -c 'assigned operation=' "$WORK/replica$LEADER.log" || true)" -gt "$BEFORE" ] && break
    kill -0 "$BUILD" 2>/dev/null || break
    sleep 0.05
done
kill -0 "$BUILD" 2>/dev/null || { cat "$WORK/bazel_failover.out" >&2; fail "the build ended before the leader could be killed"; }
KILLED_AT=$(date +%s.%N)
kill -9 "${REPLICA_PIDS[$LEADER]}"
wait "${REPLICA_PIDS[$LEADER]}" 2>/dev/null || true
OLD=$LEADER
LEADER=$(wait_for_farm_leader "$OLD")
BAZEL_GAP=$(awk -v a="$KILLED_AT" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
log "replica $LEADER leads after ${BAZEL_GAP}s without a leader"
wait "$BUILD" || { cat "$WORK/bazel_failover.out" >&2; fail "the Bazel build across the failover failed"; }
grep -E '^INFO: [0-9]+ processes' "$WORK/bazel_failover.out" | tail -n 1
check_bazel_outputs
start_coordinator_replica "$OLD"

log "the leader (replica $LEADER) paused past its lease, then resumed"
PAUSED=$LEADER
kill -STOP "${REPLICA_PIDS[$PAUSED]}"
LEADER=$(wait_for_farm_leader "$PAUSED")
log "replica $LEADER took over from the paused replica $PAUSED"
BEFORE=$(grep -c 'assigned operation=' "$WORK/replica$PAUSED.log" || true)
# While it is still paused: the workers, no longer hearing from it, rejoin through the
# balancer, which no longer sends anything to it either.
rm -f "$PROJECT"/sum-*.txt
sharded 0 during-pause
kiln_run during_pause "${SHARDED[@]}" || { cat "$WORK/during_pause.err" >&2; fail "the run while the old leader was paused failed"; }
check_sums during_pause
kill -CONT "${REPLICA_PIDS[$PAUSED]}"
wait_for_log "replica$PAUSED" "lost the farm.s lease|closing the farm.s engine" "${REPLICA_PIDS[$PAUSED]}" 10
rm -f "$PROJECT"/sum-*.txt
sharded 0 after-pause
kiln_run after_pause "${SHARDED[@]}" || { cat "$WORK/after_pause.err" >&2; fail "the run after the pause failed"; }
check_sums after_pause
AFTER=$(grep -c 'assigned operation=' "$WORK/replica$PAUSED.log" || true)
[ "$AFTER" -eq "$BEFORE" ] || fail "the deposed replica $PAUSED assigned $((AFTER - BEFORE)) actions after it resumed"
if grep -q 'refusing an Assign from a deposed leader' "$WORK"/worker*.log; then
    fail "a worker was sent an Assign from a deposed leader"
fi

echo "farm: 8/8 shards through haproxy; leader killed mid-run: ${GAP}s without a leader, run correct; leader killed mid-Bazel-build: ${BAZEL_GAP}s without a leader, outputs correct; a run completed while the old leader was paused, which assigned nothing after resuming"
