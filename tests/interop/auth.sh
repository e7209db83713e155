#!/usr/bin/env bash
# Token auth end to end, with the real binary: a coordinator with auth on and a separate
# worker (which reaches the CAS with the join token), an admin token declared in the
# configuration file (`kiln token generate`), tokens made with `kiln token create`, and
# `kiln run`, `kiln status` and `kiln token` refused without a token or the right scope,
# allowed with it; a revoked token stops working at once; Bazel 2.1 is refused without
# `--remote_header=authorization=Bearer …` and builds remotely with it (its uploads carry
# no header, a Bazel bug fixed in 3.0, so this farm grants anonymous calls `cas:write`);
# protected mode refuses to bind off loopback without auth.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_bazel
build_kiln

log "protected mode: no auth off loopback is refused, with the reason"
if "$KILN" coordinator --grpc-addr 0.0.0.0:0 --metrics-addr 127.0.0.1:0 \
    --data-dir "$WORK/open" >"$WORK/open.log" 2>&1; then
    fail "a coordinator without auth started on 0.0.0.0"
fi
contains 'not a loopback address' <"$WORK/open.log" || { cat "$WORK/open.log" >&2; fail "no reason given"; }

log "an admin token for the configuration file"
# Bazel 2.1 sends no header on its ByteStream uploads (bazelbuild/bazel#10634), so this
# farm lets anonymous calls write the CAS, and nothing else.
printf '[coordinator.auth]\nanonymous_scopes = ["cas:write"]\n\n' >"$WORK/kiln.toml"
"$KILN" token generate --name bootstrap --scopes admin >>"$WORK/kiln.toml" 2>"$WORK/generated"
ADMIN=$(grep '^kiln_' "$WORK/generated")
[ -n "$ADMIN" ] || fail "kiln token generate printed no token"
grep -q "$ADMIN" "$WORK/kiln.toml" && fail "the configuration entry holds the token itself"
contains '^hash = "' <"$WORK/kiln.toml" || fail "no hash in the generated entry"

JOIN="join-$RANDOM$RANDOM"
INTEROP_KILN_LOG=info,kiln_coordinator::auth=debug \
    start_kiln coordinator coordinator --config "$WORK/kiln.toml" --coordinator-auth \
    --grpc-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --data-dir "$WORK/kiln-data" \
    --join-token "$JOIN"
ADDR="grpc://$(listen_addr coordinator grpc)"
start_kiln_worker worker --coordinator "$ADDR" --slots 2 --work-dir "$WORK/worker" \
    --join-token "$JOIN"

# as NAME TOKEN ARGS... : `kiln ARGS...` with KILN_TOKEN=TOKEN (none when empty).
as() {
    local name="$1" token="$2"; shift 2
    (cd "$WORK/project" && env -u KILN_TOKEN ${token:+KILN_TOKEN="$token"} \
        KILN_COORDINATOR="$ADDR" timeout 60 "$KILN" "$@") >"$WORK/$name.out" 2>"$WORK/$name.err"
}
mkdir -p "$WORK/project"
echo hello >"$WORK/project/in.txt"

log "kiln status needs admin"
as status-none "" status && fail "kiln status answered without a token"
contains 'needs a token' <"$WORK/status-none.err" || { cat "$WORK/status-none.err" >&2; fail "no UNAUTHENTICATED reason"; }
as status-admin "$ADMIN" status || { cat "$WORK/status-admin.err" >&2; fail "kiln status with the admin token"; }
contains 'Workers: 1 connected' <"$WORK/status-admin.out" || fail "the status lists no worker"

log "kiln token create: a CI token and a read-only one"
as create-ci "$ADMIN" token create --name ci --scopes cas:read,cas:write,ac:read,execute \
    || { cat "$WORK/create-ci.err" >&2; fail "kiln token create"; }
CI=$(cat "$WORK/create-ci.out")
as create-ro "$ADMIN" token create --name laptop --scopes cas:read,ac:read --expires 1h \
    || fail "kiln token create (read-only)"
RO=$(cat "$WORK/create-ro.out")
[ "${CI#kiln_}" != "$CI" ] && [ "${RO#kiln_}" != "$RO" ] || fail "tokens do not look like kiln_…"
as create-by-ci "$CI" token create --scopes admin && fail "a non-admin token made a token"
contains 'admin' <"$WORK/create-by-ci.err" || fail "the refusal does not name the admin scope"

log "kiln run: refused without a token and with the read-only one, runs with the CI token"
as run-none "" run -- cat in.txt && fail "kiln run ran without a token"
contains 'needs a token' <"$WORK/run-none.err" || { cat "$WORK/run-none.err" >&2; fail "no UNAUTHENTICATED reason for kiln run"; }
as run-ro "$RO" run -- cat in.txt && fail "kiln run ran with a read-only token"
contains 'cas:write\|execute' <"$WORK/run-ro.err" || { cat "$WORK/run-ro.err" >&2; fail "the refusal names no scope"; }
as run-ci "$CI" run -- cat in.txt || { cat "$WORK/run-ci.err" >&2; fail "kiln run with the CI token"; }
contains '^hello$' <"$WORK/run-ci.out" || fail "the action's output is missing"
contains 'executed, exit code 0' <"$WORK/run-ci.err" || fail "the action did not run on the worker"
for name in run-none run-ro run-ci create-ci create-ro status-admin; do
    grep -q "$CI\|$RO\|$ADMIN" "$WORK/$name.err" && fail "a token appears in $name's messages"
done
grep -q "$CI\|$RO\|$ADMIN\|$JOIN" "$WORK/coordinator.log" "$WORK/worker.log" && fail "a token appears in a server log"

log "kiln token list and revoke"
as list "$ADMIN" token list || fail "kiln token list"
contains 'bootstrap' <"$WORK/list.out" || fail "the configured token is not listed"
CI_ID=$(awk '$2 == "ci" { print $1 }' "$WORK/list.out")
[ -n "$CI_ID" ] || { cat "$WORK/list.out" >&2; fail "the CI token is not listed"; }
grep -q "$CI\|$RO" "$WORK/list.out" && fail "kiln token list shows a token"
as revoke "$ADMIN" token revoke "$CI_ID" || { cat "$WORK/revoke.err" >&2; fail "kiln token revoke"; }
as run-revoked "$CI" run --no-cache -- cat in.txt && fail "a revoked token still runs actions"
contains 'not valid' <"$WORK/run-revoked.err" || { cat "$WORK/run-revoked.err" >&2; fail "no reason for the revoked token"; }

log "Bazel 2.1: refused without the header, builds remotely with it"
prepare_bazel_workspace 20
as create-bazel "$ADMIN" token create --name bazel --scopes cas:read,cas:write,ac:read,execute \
    || fail "kiln token create (bazel)"
BAZEL_TOKEN=$(cat "$WORK/create-bazel.out")
# bazel_build NAME FLAGS... : builds //... remotely; Bazel's output goes to $WORK/NAME.out.
bazel_build() {
    local name="$1"; shift
    (cd "$WORKSPACE" && timeout 300 "$BAZEL" --output_user_root="$WORK/bazel-root" --batch build //... \
        --remote_executor="$ADDR" --remote_timeout=60 --jobs=8 "$@") >"$WORK/$name.out" 2>&1
}
bazel_build bazel-none && fail "Bazel built without a token"
contains 'UNAUTHENTICATED' <"$WORK/bazel-none.out" || { tail -n 20 "$WORK/bazel-none.out" >&2; fail "Bazel's failure does not say UNAUTHENTICATED"; }
bazel_build bazel-token --remote_header=authorization="Bearer $BAZEL_TOKEN" \
    || { tail -n 30 "$WORK/bazel-token.out" >&2; fail "Bazel with the token"; }
line=$(grep -E '^INFO: [0-9]+ processes' "$WORK/bazel-token.out" | tail -n 1)
echo "bazel with a token: $line"
[[ "$line" =~ ^INFO:\ ([0-9]+)\ processes:\ ([0-9]+)\ remote\.?$ ]] && [ "${BASH_REMATCH[2]}" -eq "$GENRULES" ] \
    || fail "expected all $GENRULES actions to run remotely: $line"
grep -q "$BAZEL_TOKEN" "$WORK/coordinator.log" "$WORK/worker.log" && fail "Bazel's token appears in a server log"

echo "auth: UNAUTHENTICATED without a token, PERMISSION_DENIED without the scope, runs with it; revocation takes effect at once; no token in any log"
