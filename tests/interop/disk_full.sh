#!/usr/bin/env bash
# The disk fills for real: `kiln up` with its data directory on a 64 MiB tmpfs (CI runs as
# root and mounts it; the store's own limit is set far above, so the filesystem is what
# refuses). With the disk nearly full:
# 1. a registry push gets 507 with an OCI error body, and a `kiln run` upload fails with
#    RESOURCE_EXHAUSTED;
# 2. nothing partial is visible, and no temp file is left;
# 3. kiln keeps serving reads;
# 4. once space is freed, the same push and run succeed, without a restart.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build_kiln
[ "$(id -u)" = 0 ] || fail "mounting a tmpfs needs root (CI runs as root)"
command -v curl >/dev/null || fail "curl is missing"

DISK="$WORK/small-disk"
mkdir -p "$DISK"
mount -t tmpfs -o size=64m kiln-interop-disk "$DISK" || fail "cannot mount a tmpfs at $DISK"
# kiln goes first, then the tmpfs, then the lib's clean-up of $WORK.
unmount_then_clean() {
    [ -n "${KILN_PID:-}" ] && stop_pid "$KILN_PID" TERM
    umount "$DISK" 2>/dev/null || true
    cleanup
}
trap unmount_then_clean EXIT

start_kiln up up --data-dir "$DISK/data" --workers 1 --grpc-addr 127.0.0.1:0 \
    --registry-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 --cas-max-bytes 10GiB
KILN_PID=$LAST_PID
REGISTRY=$(listen_addr up registry)
GRPC=$(listen_addr up grpc)

# push FILE : a monolithic blob push; prints the HTTP status, the body goes to FILE.body.
push() {
    local digest="sha256:$(sha256sum "$1" | cut -d' ' -f1)"
    curl -s -o "$1.body" -w '%{http_code}' -X POST \
        -H 'Content-Type: application/octet-stream' --data-binary "@$1" \
        "http://$REGISTRY/v2/team/app/blobs/uploads/?digest=$digest"
}

PROJECT="$WORK/project"
mkdir -p "$PROJECT"
head -c $((12 << 20)) /dev/urandom >"$PROJECT/input.bin"
run_on_farm() {
    (cd "$PROJECT" && timeout 120 "$KILN" run --coordinator "grpc://$GRPC" --no-cache -- \
        sh -c 'wc -c < input.bin') >"$WORK/run.out" 2>"$WORK/run.err"
}

log "a first blob fits"
head -c $((8 << 20)) /dev/urandom >"$WORK/a.bin"
[ "$(push "$WORK/a.bin")" = 201 ] || fail "the first push failed: $(cat "$WORK/a.bin.body")"

log "filling the disk to its last 4 MiB"
AVAILABLE_MIB=$(df --output=avail -B1M "$DISK" | tail -1 | tr -d ' ')
dd if=/dev/zero of="$DISK/filler" bs=1M count=$((AVAILABLE_MIB - 4)) status=none

log "a push that does not fit: 507 with an OCI error body"
head -c $((12 << 20)) /dev/urandom >"$WORK/b.bin"
STATUS=$(push "$WORK/b.bin")
[ "$STATUS" = 507 ] || fail "expected 507, got $STATUS: $(cat "$WORK/b.bin.body")"
grep -q '"code":"BLOB_UPLOAD_INVALID"' "$WORK/b.bin.body" || fail "no OCI error body: $(cat "$WORK/b.bin.body")"
B_DIGEST="sha256:$(sha256sum "$WORK/b.bin" | cut -d' ' -f1)"
HEAD_STATUS=$(curl -s -o /dev/null -w '%{http_code}' -I "http://$REGISTRY/v2/team/app/blobs/$B_DIGEST")
[ "$HEAD_STATUS" = 404 ] || fail "the refused blob is visible ($HEAD_STATUS)"

log "a kiln run whose input does not fit: RESOURCE_EXHAUSTED"
if run_on_farm; then fail "kiln run succeeded on a full disk"; fi
contains 'ResourceExhausted\|RESOURCE_EXHAUSTED\|No space left' <"$WORK/run.err" \
    || fail "kiln run failed for another reason: $(cat "$WORK/run.err")"

log "nothing partial stays behind"
LEFT=$(find "$DISK/data/cas/tmp" -type f | wc -l)
[ "$LEFT" = 0 ] || fail "$LEFT temp file(s) left in cas/tmp"
kill -0 "$KILN_PID" 2>/dev/null || fail "kiln exited on a full disk"

log "reads are still served"
A_DIGEST="sha256:$(sha256sum "$WORK/a.bin" | cut -d' ' -f1)"
curl -sf "http://$REGISTRY/v2/team/app/blobs/$A_DIGEST" -o "$WORK/a.pulled" || fail "the first blob cannot be read"
cmp -s "$WORK/a.bin" "$WORK/a.pulled" || fail "the first blob reads back different"

log "space freed: the same push and run succeed without a restart"
rm -f "$DISK/filler"
STATUS=$(push "$WORK/b.bin")
[ "$STATUS" = 201 ] || fail "the push still fails after freeing space: $STATUS $(cat "$WORK/b.bin.body")"
run_on_farm || fail "kiln run still fails after freeing space: $(cat "$WORK/run.err")"
[ "$(tr -d ' \n' <"$WORK/run.out")" = $((12 << 20)) ] || fail "unexpected output: $(cat "$WORK/run.out")"
log "disk_full: all checks passed"
