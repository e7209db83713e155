#!/usr/bin/env bash
# The sandbox in the two ways a container runs `kiln worker`, reproduced without a
# container runtime, and on a host as root; each worker a real `kiln worker` process:
#
#   nonroot  as uid 65532, the Docker image's user: bwrap in a user namespace of that uid
#   noadmin  as root without CAP_SYS_ADMIN (a container run as root, default
#            capabilities): bwrap as a host uid per action, in a user namespace
#   root     as root on a host: warm sandboxes, a host uid each
#
# Each offers a platform property of its own (`mode=…`), so `kiln run --platform`
# reaches it. On each: the worker names its way in its log; an action cannot see the
# worker's cache or data, the join token in any process it sees, nor write outside its
# directory and /tmp; it has no network; and no way of rewriting an input reaches the
# next action on the worker. A third worker, uid 65532 with `--sandbox none`, takes the
# input rewrites too: inputs are copies, whoever runs the action.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_kiln
install_debian_packages bubblewrap util-linux

# The workers' users must reach their binary and directories.
chmod 0711 "$WORK"
install -D -m 0755 "$KILN" "$WORK/bin/kiln"

TOKEN="modes-$RANDOM$RANDOM"
start_kiln coordinator coordinator --grpc-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --data-dir "$WORK/kiln-data" --join-token "$TOKEN"
ADDR=$(listen_addr coordinator grpc)
[ -n "$ADDR" ] || fail "could not read the coordinator's address from its log"

# start_mode NAME SETPRIV-ARGS... : `kiln worker` under setpriv, offering mode=NAME.
start_mode() {
    local name="$1"; shift
    mkdir -p "$WORK/$name"
    case "$name" in nonroot | unconfined) chown 65532:65532 "$WORK/$name" ;; esac
    KILN_LOG=info KILN_JOIN_TOKEN="$TOKEN" setpriv "$@" -- "$WORK/bin/kiln" worker \
        --coordinator "grpc://$ADDR" --metrics-addr 127.0.0.1:0 --slots 2 \
        --work-dir "$WORK/$name/work" --platform "mode=$name" \
        $([ "$name" = unconfined ] && echo --sandbox none) >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$!")
    wait_for_log "$name" 'registered with the coordinator' "$LAST_PID"
}

start_mode nonroot --reuid=65532 --regid=65532 --clear-groups
grep -q 'in a user namespace of the worker' "$WORK/nonroot.log" \
    || fail "the non-root worker does not say it sandboxes in its own user namespace"
start_mode noadmin --inh-caps=-sys_admin --bounding-set=-sys_admin
start_mode root --reuid=0 --regid=0 --keep-groups
grep -q 'warm sandboxes' "$WORK/root.log" || fail "the root worker does not say it uses warm sandboxes"
start_mode unconfined --reuid=65532 --regid=65532 --clear-groups
grep -q 'a host uid per action, in a user namespace' "$WORK/noadmin.log" \
    || fail "the root worker without CAP_SYS_ADMIN does not say it gives each action a uid in a user namespace"

PROJECT="$WORK/project"
mkdir -p "$PROJECT"
echo good >"$PROJECT/f.txt"
# run MODE COMMAND... : `kiln run` on the worker offering mode=MODE; its stdout.
run() {
    local mode="$1"; shift
    (cd "$PROJECT" && env -u INTEROP_KILN_LOG timeout 120 "$KILN" run \
        --coordinator "grpc://$ADDR" --no-cache --platform "mode=$mode" -- "$@")
}

for mode in nonroot noadmin root; do
    log "$mode: what an action can reach"
    probe="
        test -e '$WORK/$mode/work/cache' && echo cache-visible
        test -e '$WORK/kiln-data' && echo data-visible
        [ \$(ls -A '$WORK/$mode/work/actions' | wc -l) -gt 1 ] && echo other-actions-visible
        grep -qs '$TOKEN' /proc/[0-9]*/environ && echo token-visible
        touch /usr/kiln-probe 2>/dev/null && echo usr-writable
        touch '$WORK/$mode-probe' 2>/dev/null
        touch /tmp/probe && echo tmp-writable
        touch ./probe && echo own-dir-writable
        (exec 3<>/dev/tcp/127.0.0.1/${ADDR##*:}) 2>/dev/null && echo network-reachable
        echo uid=\$(id -u)
    "
    out=$(run "$mode" bash -c "$probe") || fail "$mode: the probe failed: $out"
    echo "$out"
    for seen in cache-visible data-visible other-actions-visible token-visible usr-writable \
        network-reachable; do
        grep -qx "$seen" <<<"$out" && fail "$mode: an action found $seen"
    done
    # The way to the action's directory is the sandbox's own (in its private /tmp here):
    # what the action writes there never reaches the host.
    [ -e "$WORK/$mode-probe" ] && fail "$mode: an action wrote into the host's $WORK"
    grep -qx tmp-writable <<<"$out" || fail "$mode: /tmp is not the action's to write"
    grep -qx own-dir-writable <<<"$out" || fail "$mode: the action cannot write its directory"
    # A user namespace shows the action as nobody, whatever its host uid; a warm sandbox
    # shows the host uid of its own.
    if [ "$mode" = root ]; then
        grep -qx 'uid=16[0-9]\{8\}' <<<"$out" || fail "$mode: the action has no uid of its own"
    else
        grep -qx uid=65534 <<<"$out" || fail "$mode: the action is not uid 65534 in its namespace"
    fi

done

# Ways to rewrite an input in place (the in-process suite, worker/tests/integration/
# input_integrity.rs, adds a write through a shared mapping).
REWRITES=(
    'chmod u+w f.txt && echo evil > f.txt'
    'chmod u+w f.txt && truncate -s 0 f.txt'
    'chmod u+w f.txt && printf evil | dd of=f.txt conv=notrunc status=none'
    'chmod u+w f.txt && echo evil >> f.txt'
    'chmod 0777 f.txt'
    'echo evil > new && mv -f new f.txt'
    'rm -f f.txt && echo evil > f.txt'
    'ln f.txt alias && chmod u+w alias && echo evil > alias'
)
for mode in nonroot noadmin root unconfined; do
    log "$mode: no rewrite of an input reaches the next action"
    for rewrite in "${REWRITES[@]}"; do
        out=$(run "$mode" sh -c "$rewrite; cat f.txt; stat -c %a f.txt") \
            || fail "$mode: '$rewrite' failed: $out"
        [ "$out" = "$(printf 'good\n444')" ] && fail "$mode: '$rewrite' did not change the action's own view"
        out=$(run "$mode" sh -c 'cat f.txt; stat -c %a f.txt') || fail "$mode: the reader failed: $out"
        [ "$out" = "$(printf 'good\n444')" ] \
            || fail "$mode: after '$rewrite', the next action read '$out' for an input whose digest says 'good', mode 0444"
    done
done

echo "worker modes: non-root, root without CAP_SYS_ADMIN and root workers sandbox their actions; no input rewrite reaches the next action, sandboxed or not"
