#!/usr/bin/env bash
# `kiln run --shards 4` against a `kiln coordinator` with two `kiln worker` processes:
# every shard executes exactly once (one assignment each, each output written by its own
# shard), and the second run of the same command is all cache hits.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_kiln

start_farm 2

make_run_project

# Each shard sums its slice of numbers.txt (lines where n % total == shard) and records
# who it was in its own output.
SHARDED=(--shards 4 --output 'sum-{shard}.txt' -- sh -c \
    'awk -v s="$TEST_SHARD_INDEX" -v t="$TEST_TOTAL_SHARDS" "NR % t == s { x += \$1 } END { print x }" numbers.txt > sum-{shard}.txt; echo "shard {shard} of {total} ran"')

log "first sharded run: every shard executes once"
kiln_run first "${SHARDED[@]}" || { cat "$WORK/first.err" >&2; fail "the sharded run failed"; }
cat "$WORK/first.out" "$WORK/first.err"
TOTAL=0
for shard in 0 1 2 3; do
    expected=$(awk -v s=$shard 'NR % 4 == s { x += $1 } END { print x }' "$PROJECT/numbers.txt")
    [ "$(cat "$PROJECT/sum-$shard.txt")" = "$expected" ] || fail "sum-$shard.txt is not shard $shard's sum"
    [ "$(grep -c "shard $shard of 4 ran" "$WORK/first.out")" -eq 1 ] || fail "shard $shard's output is not there exactly once"
    TOTAL=$((TOTAL + expected))
done
[ "$TOTAL" -eq 5050 ] || fail "the shards' sums add up to $TOTAL, not 5050"
[ "$(grep -c 'executed, exit code 0' "$WORK/first.err")" -eq 4 ] || fail "expected 4 executed shards"
ASSIGNED=$(coordinator_logs | grep -c 'assigned operation=' || true)
[ "$ASSIGNED" -eq 4 ] || fail "expected exactly 4 assignments (one per shard), got $ASSIGNED"

log "second run: every shard is a cache hit"
rm -f "$PROJECT"/sum-*.txt
kiln_run second "${SHARDED[@]}" || { cat "$WORK/second.err" >&2; fail "the second sharded run failed"; }
cat "$WORK/second.err"
[ "$(grep -c 'cache hit, exit code 0' "$WORK/second.err")" -eq 4 ] || fail "expected 4 cache hits"
grep -q 'executed' "$WORK/second.err" && fail "a shard executed again"
[ "$(coordinator_logs | grep -c 'assigned operation=')" -eq 4 ] || fail "the second run reached a worker"
for shard in 0 1 2 3; do
    [ -s "$PROJECT/sum-$shard.txt" ] || fail "the cached run did not download sum-$shard.txt"
done

echo "kiln run: 4 shards executed once each, then 4/4 cache hits"
