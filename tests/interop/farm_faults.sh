#!/usr/bin/env bash
# Faults in a farm of three coordinator replicas and three registry replicas, each set
# behind HAProxy, on PostgreSQL and Garage (see replicas.sh):
# - replica loss: kill -9 of a coordinator follower while `kiln run` uploads 64 MiB of
#   inputs through ByteStream and runs 8 shards on them, and kill -9 of a registry replica
#   during chunked registry pushes. The run completes with every output correct; every
#   push the registry acknowledged reads back intact; clients saw at most retries.
# - PostgreSQL stopped for longer than a lease term and started again, under the same
#   load: kiln serves again without a restart, the run completes, and nothing
#   acknowledged is lost.
INTEROP_METADATA=postgres INTEROP_STORAGE=s3 INTEROP_REPLICAS=3
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_kiln
start_replicated_farm 2
start_replicated_registry reg REG
make_run_project
for i in $(seq 1 16); do head -c 4M /dev/urandom >"$PROJECT/input-$i.bin"; done
(cd "$PROJECT" && sha256sum input-*.bin) >"$WORK/expected-sums"

# sums_run NAME SLEEP : 8 shards, each sleeping SLEEP seconds (to be running when the
# fault comes) and writing the digests of every input (so each needs all 64 MiB of
# them), in the background; sets RUN to its PID.
sums_run() {
    kiln_run "$1" --shards 8 --output 'sums-{shard}.txt' -- sh -c \
        "sleep $2; sha256sum input-*.bin > sums-{shard}.txt; echo salt $1" &
    RUN=$!
}
check_sums() {
    local shard
    wait "$RUN" || { cat "$WORK/$1.err" >&2; fail "$1: the run failed"; }
    for shard in $(seq 0 7); do
        cmp -s "$WORK/expected-sums" "$PROJECT/sums-$shard.txt" || fail "$1: sums-$shard.txt is wrong"
    done
    rm -f "$PROJECT"/sums-*.txt
}
# pushes NAME COUNT MAJOR : registry pushes of vMAJOR.0.* through the balancer, in the
# background; sets PUSH.
pushes() {
    python3 "$INTEROP_DIR/registry_pushes.py" push "$REG" "$2" "$WORK/pushed" "$3" \
        >"$WORK/$1.out" 2>"$WORK/$1.err" &
    PUSH=$!
}
check_pushes() {
    wait "$PUSH" || { cat "$WORK/$1.err" >&2; fail "$1: the pushes failed"; }
    cat "$WORK/$1.out"
    python3 "$INTEROP_DIR/registry_pushes.py" check "$REG" "$WORK/pushed" \
        || fail "$1: an acknowledged push does not read back"
}

log "kill -9 of a coordinator follower and of a registry replica, under load"
LEADER=$(farm_leader)
FOLLOWER=$(( LEADER % 3 + 1 ))
sums_run loss 0
pushes loss_pushes 12 1
sleep 1
kill -9 "${REPLICA_PIDS[$FOLLOWER]}" "${REGISTRY_PIDS[2]}"
wait "${REPLICA_PIDS[$FOLLOWER]}" "${REGISTRY_PIDS[2]}" 2>/dev/null || true
log "killed coordinator replica $FOLLOWER (a follower) and registry replica 2"
check_sums loss
check_pushes loss_pushes
[ "$(farm_leader)" = "$LEADER" ] || fail "losing a follower changed the leader"
echo "retries seen by kiln run: $(grep -c 'resuming\|trying again' "$WORK/loss.err" || true)"
start_coordinator_replica "$FOLLOWER"

log "PostgreSQL stopped for longer than a lease term, then started, under load"
sums_run pg 2
pushes pg_pushes 12 2
sleep 1
"${POSTGRES_STOP[@]}" >/dev/null
sleep $((FARM_TERM_SECS + 2))
# Readiness: an outage of the shared metadata store is reported by every replica's
# /readyz, which stays 200 (failing it would take every replica out of the balancer at
# once, blobs and all); the report is gone once PostgreSQL answers again.
for n in 1 2 3; do
    answer=$(curl -sS -m 5 -w ' %{http_code}' "http://127.0.0.1:${REPLICA_METRICS_PORTS[$n]}/readyz")
    case "$answer" in
        'ready: '*'metadata store has not answered'*' 200') ;;
        *) fail "replica $n during the outage: /readyz said: $answer" ;;
    esac
done
log "every replica's /readyz reports the metadata store's outage (and stays 200)"
"${POSTGRES_START[@]}" >>"$WORK/postgres.log" 2>&1 || fail "PostgreSQL did not start again"
log "PostgreSQL is back"
for n in 1 2 3; do
    for i in $(seq 1 100); do
        answer=$(curl -sS -m 5 -w ' %{http_code}' "http://127.0.0.1:${REPLICA_METRICS_PORTS[$n]}/readyz")
        case "$answer" in *'metadata store'*) ;; 'ready: '*' 200') break ;; esac
        sleep 0.1
    done
    case "$answer" in
        *'metadata store'*) fail "replica $n still reports an outage 10 s after PostgreSQL came back: $answer" ;;
        'ready: '*' 200') log "replica $n: ${answer//$'\n'/}" ;;
        *) fail "replica $n not ready 10 s after PostgreSQL came back: $answer" ;;
    esac
done
check_sums pg
echo "retries seen by kiln run: $(grep -c 'resuming\|trying again' "$WORK/pg.err" || true)"
check_pushes pg_pushes
wait_for_farm_leader >/dev/null

echo "farm faults: a follower and a registry replica killed, then PostgreSQL down for $((FARM_TERM_SECS + 2)) s, under kiln run and registry pushes: every run correct, $(wc -l <"$WORK/pushed") acknowledged pushes intact"
