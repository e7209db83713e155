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

log "cold build: every action runs on kiln's workers"
bazel_build cold
expect_summary cold remote
check_bazel_outputs

log "the actions were spread over both workers"
ASSIGNED=$(coordinator_logs | grep -o 'assigned operation=[^ ]* worker=[^ ]*' | sed 's/.*worker=//' | sort | uniq -c)
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
check_bazel_outputs

log "--noremote_accept_cached: every action runs remotely again"
BEFORE=$(coordinator_logs | grep -c 'assigned operation=')
(cd "$WORKSPACE" && "$BAZEL" --output_user_root="$WORK/bazel-root" --batch clean >/dev/null 2>&1)
bazel_build forced --noremote_accept_cached
expect_summary forced remote
check_bazel_outputs
AFTER=$(coordinator_logs | grep -c 'assigned operation=')
[ $((AFTER - BEFORE)) -ge "$GENRULES" ] || fail "only $((AFTER - BEFORE)) actions reached the workers"

echo "bazel remote execution: $GENRULES actions remote on 2 workers, then $GENRULES/$GENRULES remote cache hits, then $GENRULES remote again"
