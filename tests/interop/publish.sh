#!/usr/bin/env bash
# End to end, from build to deploy (issue 5), on loopback:
# 1. `kiln up` with two local workers;
# 2. `kiln run` compiles a static C program on the farm and downloads it;
# 3. `kiln publish --tags-from-git` pushes it from a temporary git checkout whose HEAD is
#    on `main` and carries `v0.1.0`;
# 4. skopeo lists the tags v0.1.0, <sha> and main-<sha> and shows the OCI labels;
# 5. containerd (ctr) and docker, started by hand under $WORK, pull the image by digest
#    and run it;
# 6. a fresh build of the same source, published again, gives the same digest;
# 7. re-pushing v0.1.0 with other content is refused (DENIED, immutable) while <sha> and
#    main-<sha> move to the new image.
# Every client is installed idempotently; anything missing is a failure, never a skip.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Bounds each client call: nothing here should take more than a minute.
bounded() { timeout --kill-after=5 60 "$@"; }

install_debian_packages skopeo containerd runc docker.io gcc libc6-dev git
for tool in skopeo containerd ctr runc dockerd docker gcc git; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
build_kiln

log "1. kiln up: coordinator, registry and two workers on free loopback ports"
start_kiln up up --data-dir "$WORK/kiln-data" --workers 2 \
    --grpc-addr 127.0.0.1:0 --registry-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0
GRPC="$(listen_addr up grpc)"
R="$(listen_addr up http registry)"
[ -n "$GRPC" ] && [ -n "$R" ] || fail "kiln up did not log its addresses: $(cat "$WORK/up.log")"
log "coordinator grpc://$GRPC, registry http://$R"

log "2. kiln run: a static program compiled on the farm"
SRC="$WORK/src"
mkdir -p "$SRC"
cat >"$SRC/hello.c" <<'EOF'
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("hello from kiln v0.1.0, uid %d\n", (int)getuid());
    return 0;
}
EOF
# remote_build OUT [RUN-FLAG...] : compiles $SRC/hello.c on a worker into OUT/hello.
remote_build() {
    local out="$1"
    shift
    mkdir -p "$out"
    bounded "$KILN" run --coordinator "grpc://$GRPC" --input "$SRC" --output-dir "$out" \
        --env PATH=/usr/bin:/bin --output hello "$@" -- gcc -static -O2 -o hello hello.c \
        || fail "kiln run could not build hello.c on the farm"
    [ -x "$out/hello" ] || fail "kiln run did not download an executable hello into $out"
}
IMAGE="$WORK/image"
remote_build "$IMAGE"
file_type="$(head -c 4 "$IMAGE/hello" | od -An -c | tr -d ' ')"
[ "$file_type" = '177ELF' ] || fail "the farm's output is not an ELF binary ($file_type)"
# The host runs it too: proves the bytes came back intact before any registry is involved.
[ "$("$IMAGE/hello")" = "hello from kiln v0.1.0, uid $(id -u)" ] || fail "the farm's binary prints $("$IMAGE/hello")"

log "3. kiln publish --tags-from-git from a checkout on main tagged v0.1.0"
CHECKOUT="$WORK/checkout"
mkdir -p "$CHECKOUT"
cp "$SRC/hello.c" "$CHECKOUT/"
git -C "$CHECKOUT" init -q -b main
git -C "$CHECKOUT" config user.name "kiln interop"
git -C "$CHECKOUT" config user.email "interop@kiln.invalid"
git -C "$CHECKOUT" config commit.gpgSign false
git -C "$CHECKOUT" config tag.gpgSign false
git -C "$CHECKOUT" remote add origin https://git.kiln.invalid/demo/hello.git
git -C "$CHECKOUT" add hello.c
GIT_COMMITTER_DATE="2024-05-01T12:00:00Z" GIT_AUTHOR_DATE="2024-05-01T12:00:00Z" \
    git -C "$CHECKOUT" commit -q -m "hello"
git -C "$CHECKOUT" tag v0.1.0
SHA="$(git -C "$CHECKOUT" rev-parse HEAD)"
SHORT="${SHA:0:7}"
CREATED="$(date -u -d "@$(git -C "$CHECKOUT" show -s --format=%ct HEAD)" +%Y-%m-%dT%H:%M:%SZ)"
[ "$CREATED" = 2024-05-01T12:00:00Z ] || fail "git recorded commit time $CREATED"

# publish OUTFILE DIR [FLAG...] : `kiln publish` of DIR as demo/hello from the checkout;
# stdout to OUTFILE, stderr to OUTFILE.err. Returns kiln's exit status.
publish() {
    local outfile="$1" dir="$2"
    shift 2
    (cd "$CHECKOUT" && bounded "$KILN" publish --repo demo/hello --from "$dir" --registry "$R" \
        --tags-from-git --entrypoint /hello --label org.example.stage=interop --no-progress "$@") \
        >"$outfile" 2>"$outfile.err"
}
publish "$WORK/publish1.out" "$IMAGE" || fail "kiln publish failed: $(cat "$WORK/publish1.out.err")"
PINNED="$(cat "$WORK/publish1.out")"
DIGEST="${PINNED##*@}"
[ "$PINNED" = "$R/demo/hello@$DIGEST" ] || fail "kiln publish printed '$PINNED', not $R/demo/hello@sha256:…"
[[ "$DIGEST" =~ ^sha256:[0-9a-f]{64}$ ]] || fail "kiln publish printed a malformed digest: $DIGEST"
for tag in v0.1.0 "$SHORT" "main-$SHORT"; do
    grep -qx "tagged $R/demo/hello:$tag" "$WORK/publish1.out.err" || fail "kiln publish did not report tag $tag: $(cat "$WORK/publish1.out.err")"
done
log "published $PINNED"

log "4. skopeo: the three tags, the digest and the labels"
TAGS="$(bounded skopeo list-tags --tls-verify=false "docker://$R/demo/hello" \
    | python3 -c 'import json,sys; print(" ".join(sorted(json.load(sys.stdin)["Tags"])))')"
EXPECTED_TAGS="$(printf '%s\n' v0.1.0 "$SHORT" "main-$SHORT" | sort | tr '\n' ' ' | sed 's/ $//')"
[ "$TAGS" = "$EXPECTED_TAGS" ] || fail "skopeo list-tags shows '$TAGS', not '$EXPECTED_TAGS'"
for tag in v0.1.0 "$SHORT" "main-$SHORT"; do
    bounded skopeo inspect --tls-verify=false "docker://$R/demo/hello:$tag" >"$WORK/inspect-$tag.json" \
        || fail "skopeo cannot inspect demo/hello:$tag"
    python3 - "$WORK/inspect-$tag.json" "$DIGEST" "$SHA" "$CREATED" <<'EOF' || fail "skopeo inspect of demo/hello:$tag: wrong digest or labels"
import json, sys
path, digest, sha, created = sys.argv[1:]
image = json.load(open(path))
labels = image.get("Labels") or {}
want = {
    "org.opencontainers.image.revision": sha,
    "org.opencontainers.image.version": "v0.1.0",
    "org.opencontainers.image.source": "https://git.kiln.invalid/demo/hello.git",
    "org.opencontainers.image.created": created,
    "org.example.stage": "interop",
}
problems = [f"{k}={labels.get(k)!r}, want {v!r}" for k, v in want.items() if labels.get(k) != v]
if image["Digest"] != digest:
    problems.append(f"Digest {image['Digest']}, want {digest}")
if image.get("Created") not in (created, created.replace("Z", "+00:00")):
    problems.append(f"Created {image.get('Created')}, want {created}")
if (image.get("Os"), image.get("Architecture")) != ("linux", "amd64"):
    problems.append(f"platform {image.get('Os')}/{image.get('Architecture')}")
if len(image.get("Layers") or []) != 1:
    problems.append(f"layers {image.get('Layers')}")
for p in problems:
    print("  " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
done
bounded skopeo inspect --tls-verify=false --config "docker://$R/demo/hello@$DIGEST" >"$WORK/config.json" \
    || fail "skopeo cannot read the image config"
python3 - "$WORK/config.json" <<'EOF' || fail "the image config is not what kiln publish was asked for"
import json, sys
config = json.load(open(sys.argv[1]))["config"]
assert config.get("Entrypoint") == ["/hello"], config
assert config.get("User") == "65532:65532", config
EOF

log "5. containerd (ctr) and docker pull demo/hello by digest and run it without arguments"
# uid 65532: the image's non-root default user, not the caller's root.
EXPECTED_OUTPUT="hello from kiln v0.1.0, uid 65532"
start_containerd "$WORK/ctd"
bounded "${CTR[@]}" images pull --plain-http "$PINNED" >"$WORK/ctr-pull.log" 2>&1 \
    || fail "ctr could not pull $PINNED: $(tail -n 5 "$WORK/ctr-pull.log")"
"${CTR[@]}" images ls | contains "$DIGEST" || fail "ctr did not record $DIGEST"
OUTPUT="$(bounded "${CTR[@]}" run --rm "$PINNED" kiln-publish-e2e 2>"$WORK/ctr-run.err")" \
    || fail "ctr run $PINNED failed: $(cat "$WORK/ctr-run.err")"
[ "$OUTPUT" = "$EXPECTED_OUTPUT" ] || fail "ctr run printed '$OUTPUT', not '$EXPECTED_OUTPUT'"
start_dockerd "$WORK/dkr"
bounded docker pull "$PINNED" >"$WORK/docker-pull.log" 2>&1 \
    || fail "docker could not pull $PINNED: $(tail -n 5 "$WORK/docker-pull.log")"
OUTPUT="$(bounded docker run --rm --network none "$PINNED" 2>"$WORK/docker-run.err")" \
    || fail "docker run $PINNED failed: $(cat "$WORK/docker-run.err")"
[ "$OUTPUT" = "$EXPECTED_OUTPUT" ] || fail "docker run printed '$OUTPUT', not '$EXPECTED_OUTPUT'"
log "ctr run and docker run printed: $OUTPUT"

log "6. a fresh build of the same source publishes to the same digest"
REBUILT="$WORK/image-rebuilt"
remote_build "$REBUILT" --no-cache
cmp -s "$IMAGE/hello" "$REBUILT/hello" || fail "two builds of hello.c on the farm differ: gcc is not deterministic here"
touch -d '2001-01-01' "$REBUILT/hello"
chmod 0700 "$REBUILT/hello"
publish "$WORK/publish2.out" "$REBUILT" || fail "re-publishing the same content failed: $(cat "$WORK/publish2.out.err")"
[ "$(cat "$WORK/publish2.out")" = "$PINNED" ] || fail "the same content published as $(cat "$WORK/publish2.out"), not $PINNED"

log "7. v0.1.0 with other content is refused; the other tags still land"
OTHER="$WORK/image-other"
cp -r "$IMAGE" "$OTHER"
echo "a file that changes the layer" >"$OTHER/NOTICE"
if publish "$WORK/publish3.out" "$OTHER"; then
    fail "re-pushing v0.1.0 with other content succeeded: $(cat "$WORK/publish3.out" "$WORK/publish3.out.err")"
fi
grep "refused $R/demo/hello:v0.1.0" "$WORK/publish3.out.err" | contains DENIED \
    || fail "the refusal does not say DENIED: $(cat "$WORK/publish3.out.err")"
grep "refused $R/demo/hello:v0.1.0" "$WORK/publish3.out.err" | contains immutable \
    || fail "the refusal does not say the tag is immutable: $(cat "$WORK/publish3.out.err")"
OTHER_DIGEST="$(cat "$WORK/publish3.out")"
OTHER_DIGEST="${OTHER_DIGEST##*@}"
[[ "$OTHER_DIGEST" =~ ^sha256:[0-9a-f]{64}$ ]] && [ "$OTHER_DIGEST" != "$DIGEST" ] \
    || fail "the refused publish did not print the new image's digest: $(cat "$WORK/publish3.out")"
tag_digest() { bounded skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$R/demo/hello:$1"; }
[ "$(tag_digest v0.1.0)" = "$DIGEST" ] || fail "v0.1.0 moved to $(tag_digest v0.1.0)"
for tag in "$SHORT" "main-$SHORT"; do
    [ "$(tag_digest "$tag")" = "$OTHER_DIGEST" ] || fail "$tag did not move to the new image $OTHER_DIGEST"
done

log "8. kiln publish --from-run: the outputs of the last kiln run, fetched from the farm's cache"
remote_build "$WORK/image-run" # a cache hit; it rewrites $SRC/.kiln/last-run.json
[ -f "$SRC/.kiln/last-run.json" ] || fail "kiln run did not write $SRC/.kiln/last-run.json"
bounded "$KILN" publish --repo demo/hello-from-run --from-run "$SRC/.kiln/last-run.json" \
    --coordinator "grpc://$GRPC" --registry "$R" --tag v0.1.0 --entrypoint /hello --no-progress \
    >"$WORK/publish-run.out" 2>"$WORK/publish-run.err" \
    || fail "kiln publish --from-run failed: $(cat "$WORK/publish-run.err")"
RUN_PINNED="$(cat "$WORK/publish-run.out")"
[[ "$RUN_PINNED" == "$R/demo/hello-from-run@sha256:"* ]] \
    || fail "kiln publish --from-run printed '$RUN_PINNED'"
OUTPUT="$(bounded docker run --rm --network none "$RUN_PINNED" 2>"$WORK/docker-run-from-run.err")" \
    || fail "docker run $RUN_PINNED failed: $(cat "$WORK/docker-run-from-run.err")"
[ "$OUTPUT" = "$EXPECTED_OUTPUT" ] || fail "the --from-run image printed '$OUTPUT', not '$EXPECTED_OUTPUT'"
log "the --from-run image $RUN_PINNED printed: $OUTPUT"

log "9. kiln status lists both repositories with their tag counts, and the workers"
bounded "$KILN" status --coordinator "grpc://$GRPC" --json >"$WORK/status.json" \
    || fail "kiln status failed"
python3 - "$WORK/status.json" <<'EOF' || fail "kiln status does not match what this script did: $(cat "$WORK/status.json")"
import json, sys
status = json.load(open(sys.argv[1]))
repositories = {r["name"]: r["tags"] for r in status["registry"]}
assert repositories == {"demo/hello": 3, "demo/hello-from-run": 1}, repositories
assert sorted(w["id"] for w in status["workers"]) == ["local-0", "local-1"], status["workers"]
assert status["cache"]["actions_succeeded"] >= 2, status["cache"]  # the first build and --no-cache
assert status["cache"]["action_cache_hits"] >= 1, status["cache"]  # step 8's build
EOF
bounded "$KILN" status --coordinator "grpc://$GRPC" | tee "$WORK/status.txt" >&2
grep -q "Workers: 2 connected" "$WORK/status.txt" || fail "kiln status does not show the two workers"

log "10. kiln packages itself without Docker: a base image of this host's glibc, then the kiln binary on top"
# A stand-in for the Debian base of deploy/README.md (Docker Hub is out of reach here):
# the shared libraries kiln links against, copied from this host.
BASE_ROOT="$WORK/base-rootfs"
ldd "$KILN" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$BASE_ROOT$(dirname "$lib")"
    cp -L "$lib" "$BASE_ROOT$lib"
done
[ -e "$BASE_ROOT/lib64/ld-linux-x86-64.so.2" ] || fail "the base has no dynamic loader: $(ldd "$KILN")"
bounded "$KILN" publish --repo base/host-glibc --from "$BASE_ROOT" --registry "$R" --tag v1.0.0 \
    --no-progress >"$WORK/publish-base.out" 2>"$WORK/publish-base.err" \
    || fail "publishing the base failed: $(cat "$WORK/publish-base.err")"
SELF_DIR="$WORK/self"
mkdir -p "$SELF_DIR/usr/local/bin"
objcopy --strip-debug "$KILN" "$SELF_DIR/usr/local/bin/kiln"
timeout --kill-after=5 300 "$KILN" publish --repo kiln --from "$SELF_DIR" --registry "$R" --tag v0.1.0 \
    --base "$R/base/host-glibc:v1.0.0" --entrypoint /usr/local/bin/kiln --no-progress \
    >"$WORK/publish-self.out" 2>"$WORK/publish-self.err" \
    || fail "kiln could not publish itself: $(cat "$WORK/publish-self.err")"
SELF_PINNED="$(cat "$WORK/publish-self.out")"
bounded skopeo inspect --tls-verify=false "docker://$R/kiln:v0.1.0" >"$WORK/inspect-self.json" \
    || fail "skopeo cannot inspect the kiln image"
python3 -c 'import json,sys; n=len(json.load(open(sys.argv[1]))["Layers"]); sys.exit(0 if n == 2 else f"{n} layers, want the base and kiln")' \
    "$WORK/inspect-self.json" || fail "the kiln image is not base + binary"
OUTPUT="$(timeout --kill-after=5 300 docker run --rm --network none "$SELF_PINNED" --version 2>"$WORK/docker-run-self.err")" \
    || fail "docker run $SELF_PINNED --version failed: $(cat "$WORK/docker-run-self.err")"
[[ "$OUTPUT" == "kiln "* ]] || fail "the packaged kiln printed '$OUTPUT'"
log "kiln packaged itself as $SELF_PINNED; in docker it says: $OUTPUT"

log "publish end to end passed: $PINNED"
