#!/usr/bin/env bash
# The newcomer's first command, as a newcomer runs it: `kiln up` from a fresh directory
# with its default (relative) data directory and the sandbox on (bubblewrap installed).
# Then the reproduction of a cache-poisoning bug: an action that rewrites its input must
# not change what the next action on the same worker reads under the same digest.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_kiln
install_debian_packages bubblewrap

UP="$WORK/newcomer"
mkdir -p "$UP"
cd "$UP"
start_kiln up up --workers 1 \
    --grpc-addr 127.0.0.1:0 --registry-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0
ADDR=$(listen_addr up grpc)
[ -n "$ADDR" ] || fail "could not read kiln up's gRPC address from its log"
wait_for_log up 'registered with the coordinator' "$LAST_PID"
grep -q 'bubblewrap=true' "$WORK/up.log" || fail "kiln up's worker did not sandbox with bubblewrap"
[ -d "$UP/kiln-data" ] || fail "kiln up did not make its default data directory in the working directory"

PROJECT="$WORK/project"
mkdir -p "$PROJECT"
echo good >"$PROJECT/f.txt"
run() {
    (cd "$PROJECT" && env -u INTEROP_KILN_LOG timeout 120 "$KILN" run --coordinator "grpc://$ADDR" --no-cache -- "$@")
}

log "an action rewrites its input"
out=$(run sh -c 'chmod u+w f.txt && echo evil > f.txt; cat f.txt') || fail "the rewriting action failed: $out"
[ "$out" = evil ] || fail "the rewriting action saw '$out', not its own change"

log "the next action on the same worker reads the input"
out=$(run sh -c 'cat f.txt') || fail "the reading action failed: $out"
[ "$out" = good ] || fail "the input's digest says 'good' but the next action read '$out'"

echo "kiln up (default data dir, sandboxed): inputs stay what their digests say"
