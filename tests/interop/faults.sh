#!/usr/bin/env bash
# Faults with real processes: `kiln coordinator`, `kiln worker` and `kiln run`.
#
# 1. kill -9 a worker in the middle of an action: it completes on another worker.
# 2. restart the coordinator (SIGTERM, same data dir and port) with actions queued and
#    no worker: `kiln run` resumes with WaitExecution and they all complete.
# 3. an action past its --timeout fails with DEADLINE_EXCEEDED.
# 4. an output path escaping the action directory is an error.
# 5. a worker with a wrong join token is refused and exits non-zero with the reason.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_kiln

TOKEN="faults-$RANDOM$RANDOM"
DATA="$WORK/kiln-data"

# start_coordinator GRPC-ADDR : a `kiln coordinator` on DATA; sets ADDR and COORDINATOR_PID.
start_coordinator() {
    INTEROP_KILN_LOG=info,kiln_coordinator=debug \
        start_kiln "coordinator-$1" coordinator --grpc-addr "$1" --metrics-addr 127.0.0.1:0 \
        --data-dir "$DATA" --join-token "$TOKEN"
    COORDINATOR_PID=$LAST_PID
    COORDINATOR_LOG="$WORK/coordinator-$1.log"
    ADDR=$(listen_addr "coordinator-$1" grpc)
    [ -n "$ADDR" ] || fail "could not read the coordinator's address from its log"
}

PROJECT="$WORK/project"
mkdir -p "$PROJECT"
echo input >"$PROJECT/input.txt"

# kiln_run_bg NAME ARGS... : `kiln run` in the background; sets RUN_PID.
kiln_run_bg() {
    local name="$1"; shift
    (cd "$PROJECT" && exec env -u INTEROP_KILN_LOG timeout 120 "$KILN" run --coordinator "grpc://$ADDR" "$@") \
        >"$WORK/$name.out" 2>"$WORK/$name.err" &
    RUN_PID=$!
    STARTED_PIDS+=("$RUN_PID")
}

# kiln_run NAME ARGS... : `kiln run` in the foreground; returns its exit code.
kiln_run() {
    kiln_run_bg "$@"
    local rc=0
    wait "$RUN_PID" || rc=$?
    return "$rc"
}

start_coordinator 127.0.0.1:0

log "kill -9 a worker in the middle of an action"
start_kiln_worker doomed --coordinator "grpc://$ADDR" --slots 1 --work-dir "$WORK/doomed" \
    --join-token "$TOKEN" --platform pool=faults
kiln_run_bg killed --platform pool=faults --output done.txt -- sh -c 'sleep 4; echo done > done.txt'
wait_for_log "coordinator-127.0.0.1:0" 'assigned operation=.* worker=.* attempt=1' "$COORDINATOR_PID"
DOOMED_PID=$LAST_PID
start_kiln_worker rescuer --coordinator "grpc://$ADDR" --slots 1 --work-dir "$WORK/rescuer" \
    --join-token "$TOKEN" --platform pool=faults
RESCUER_PID=$LAST_PID
stop_pid "$DOOMED_PID" KILL
wait "$RUN_PID" || { cat "$WORK/killed.err" >&2; fail "kiln run failed after its worker was killed"; }
[ "$(cat "$PROJECT/done.txt")" = done ] || fail "done.txt is wrong"
grep -q 'attempt=2' "$COORDINATOR_LOG" || fail "the action was not reassigned"
grep -q 'requeued after losing its worker' "$COORDINATOR_LOG" || fail "the lease was not requeued"
stop_pid "$RESCUER_PID" TERM

log "an action past its timeout gets DEADLINE_EXCEEDED"
start_kiln_worker worker --coordinator "grpc://$ADDR" --slots 2 --work-dir "$WORK/worker" --join-token "$TOKEN"
WORKER_PID=$LAST_PID
START=$SECONDS
if kiln_run timeout --timeout 1 -- sh -c 'echo started; sleep 30'; then
    fail "a timed-out action succeeded"
fi
cat "$WORK/timeout.err"
[ $((SECONDS - START)) -lt 20 ] || fail "the timeout took $((SECONDS - START)) s"
grep -q 'DeadlineExceeded' "$WORK/timeout.err" || fail "DEADLINE_EXCEEDED was not reported"

log "an output path that escapes the action directory is an error"
if kiln_run escape --output ../escape.txt -- sh -c 'echo x > ../escape.txt'; then
    fail "an escaping output path succeeded"
fi
cat "$WORK/escape.err"
grep -q 'escape' "$WORK/escape.err" || fail "the escape was not reported"
[ ! -e "$WORK/escape.txt" ] || fail "the escaping output was written"
# kiln run refuses `..` itself; an escape through a symlink is the worker's to catch.
echo secret >"$WORK/outside.txt"
if kiln_run symlink-escape --output d/outside.txt -- sh -c "rm -rf d && ln -s '$WORK' d"; then
    fail "an output reached through a symlink out of the action directory succeeded"
fi
cat "$WORK/symlink-escape.err"
grep -q 'escapes the action directory' "$WORK/symlink-escape.err" || fail "the worker did not report the escape"
[ ! -e "$PROJECT/d/outside.txt" ] || fail "the escaping output was downloaded"
stop_pid "$WORKER_PID" TERM

log "a worker with a wrong join token is refused"
env -u INTEROP_KILN_LOG KILN_LOG=info "$KILN" worker --coordinator "grpc://$ADDR" --slots 1 \
    --work-dir "$WORK/intruder" --join-token wrong >"$WORK/intruder.log" 2>&1 &
INTRUDER_PID=$!
STARTED_PIDS+=("$INTRUDER_PID")
for i in $(seq 1 100); do kill -0 "$INTRUDER_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$INTRUDER_PID" 2>/dev/null && fail "the intruding worker is still running"
RC=0; wait "$INTRUDER_PID" || RC=$?
[ "$RC" -ne 0 ] || fail "the refused worker exited 0"
grep -q 'wrong join token' "$WORK/intruder.log" || { cat "$WORK/intruder.log" >&2; fail "the refusal gave no reason"; }

log "restart the coordinator with actions queued and no worker"
for i in 1 2 3; do
    kiln_run_bg "queued-$i" --output "q$i.txt" -- sh -c "echo queued $i > q$i.txt"
    QUEUED_PIDS[$i]=$RUN_PID
done
METRICS=$(listen_addr "coordinator-127.0.0.1:0" http)
for i in $(seq 1 200); do
    curl -fs "http://$METRICS/metrics" | contains '^kiln_actions_queued 3' && break
    sleep 0.1
done
curl -fs "http://$METRICS/metrics" | contains '^kiln_actions_queued 3' || fail "the three actions never queued"
START=$SECONDS
stop_pid "$COORDINATOR_PID" TERM
[ $((SECONDS - START)) -lt 10 ] || fail "the coordinator took $((SECONDS - START)) s to stop"
start_coordinator "$ADDR"
grep -q 'reloaded unfinished operations requeued=3' "$COORDINATOR_LOG" || fail "the queue was not reloaded"
start_kiln_worker after --coordinator "grpc://$ADDR" --slots 2 --work-dir "$WORK/after" --join-token "$TOKEN"
for i in 1 2 3; do
    wait "${QUEUED_PIDS[$i]}" || { cat "$WORK/queued-$i.err" >&2; fail "queued run $i failed across the restart"; }
    [ "$(cat "$PROJECT/q$i.txt")" = "queued $i" ] || fail "q$i.txt is wrong"
    grep -q 'execution stream broke; resuming' "$WORK/queued-$i.err" || fail "queued run $i did not resume"
done

echo "faults: killed worker's action finished elsewhere; timeout and escape reported; wrong token refused; queued actions survived a coordinator restart"
