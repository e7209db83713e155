#!/usr/bin/env bash
# Real Bazel 2.1 executing remotely on kiln: a `kiln coordinator` and two `kiln worker`
# processes; Bazel with --remote_executor builds the genrule workspace.
#
# - cold build: every action runs remotely ("N processes: N remote") and the outputs
#   are what the genrules compute;
# - after `bazel clean`: every action is a remote cache hit;
# - with --noremote_accept_cached: every action runs remotely again;
# - the coordinator's scheduler log shows the actions spread over both workers.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_bazel
build_kiln

prepare_bazel_workspace 20

start_farm 2

# bazel_build NAME FLAGS... : builds //... remotely; Bazel's output goes to $WORK/NAME.out.
bazel_build() {
    local name="$1"; shift
    (cd "$WORKSPACE" && timeout 300 "$BAZEL" --output_user_root="$WORK/bazel-root" --batch build //... \
        --remote_executor="grpc://$ADDR" --remote_timeout=120 --jobs=8 "$@") \
        >"$WORK/$name.out" 2>&1 || { cat "$WORK/$name.out" >&2; fail "bazel build ($name) failed"; }
}

# expect_summary NAME KIND : Bazel's summary must say that all $GENRULES actions were KIND.
expect_summary() {
    local line
    line=$(grep -E '^INFO: [0-9]+ processes' "$WORK/$1.out" | tail -n 1)
    echo "$1: $line"
    [[ "$line" =~ ^INFO:\ ([0-9]+)\ processes:\ ([0-9]+)\ $2\.?$ ]] \
        || fail "$1: expected every action to be '$2': $line"
    [ "${BASH_REMATCH[1]}" -eq "$GENRULES" ] && [ "${BASH_REMATCH[2]}" -eq "$GENRULES" ] \
        || fail "$1: expected $GENRULES actions, all '$2': $line"
}

# check_outputs : the outputs are what the genrules compute, recomputed here.
check_outputs() {
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

log "cold build: every action runs on kiln's workers"
bazel_build cold
expect_summary cold remote
check_outputs

log "the actions were spread over both workers"
ASSIGNED=$(grep -o 'assigned operation=[^ ]* worker=[^ ]*' "$WORK/coordinator.log" | sed 's/.*worker=//' | sort | uniq -c)
echo "$ASSIGNED"
[ "$(wc -l <<<"$ASSIGNED")" -eq 2 ] || fail "expected assignments to two workers, got: $ASSIGNED"
while read -r count _; do
    [ "$count" -ge 2 ] || fail "a worker ran only $count actions: $ASSIGNED"
done <<<"$ASSIGNED"

log "bazel clean, then a rebuild: every action is a remote cache hit"
(cd "$WORKSPACE" && "$BAZEL" --output_user_root="$WORK/bazel-root" --batch clean >/dev/null 2>&1)
[ ! -e "$WORKSPACE/bazel-bin/summary.txt" ] || fail "bazel clean left outputs behind"
bazel_build warm
expect_summary warm 'remote cache hit'
check_outputs

log "--noremote_accept_cached: every action runs remotely again"
BEFORE=$(grep -c 'assigned operation=' "$WORK/coordinator.log")
(cd "$WORKSPACE" && "$BAZEL" --output_user_root="$WORK/bazel-root" --batch clean >/dev/null 2>&1)
bazel_build forced --noremote_accept_cached
expect_summary forced remote
check_outputs
AFTER=$(grep -c 'assigned operation=' "$WORK/coordinator.log")
[ $((AFTER - BEFORE)) -ge "$GENRULES" ] || fail "only $((AFTER - BEFORE)) actions reached the workers"

echo "bazel remote execution: $GENRULES actions remote on 2 workers, then $GENRULES/$GENRULES remote cache hits, then $GENRULES remote again"
