#!/usr/bin/env bash
# Actions in container images, with kiln's own registry as the image store:
# - `kiln publish` makes a toolchain image of Debian's static busybox (every applet a
#   link) and pushes it to `kiln up`'s registry;
# - Bazel 2.1 builds the interop workspace remotely on an execution platform whose
#   exec_properties name the image by digest (--shell_executable=/bin/sh: busybox has no
#   bash); the genrules compute what they compute on the host, and one more genrule reads
#   a file only the image has;
# - `kiln run --platform container-image=…` by tag sees the image's files, not the
#   host's; with a wrong digest it fails with FAILED_PRECONDITION naming the image.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_debian_packages bubblewrap busybox-static
install_bazel
build_kiln

MARKER="from the busybox image"
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/etc" "$ROOTFS/tmp"
cp /bin/busybox "$ROOTFS/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ROOTFS/bin/$applet"
done
echo "$MARKER" >"$ROOTFS/etc/marker"

start_kiln up up --grpc-addr 127.0.0.1:0 --registry-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --workers 1 --data-dir "$WORK/kiln-data"
GRPC=$(listen_addr up grpc)
REGISTRY=$(listen_addr up http registry)

log "kiln publish: the busybox toolchain image"
"$KILN" publish --registry "$REGISTRY" --repo toolchains/busybox --from "$ROOTFS" --tag v1.0.0 \
    >"$WORK/publish.out" 2>"$WORK/publish.err" || { cat "$WORK/publish.err" >&2; fail "kiln publish"; }
PINNED=$(grep -h -o "$REGISTRY/toolchains/busybox@sha256:[0-9a-f]*" "$WORK/publish.out" "$WORK/publish.err" | head -n 1)
[ -n "$PINNED" ] || { cat "$WORK/publish.out" "$WORK/publish.err" >&2; fail "kiln publish printed no pinned reference"; }
IMAGE="docker://$PINNED"
echo "image: $IMAGE"

log "kiln run in the image by tag: its files, not the host's"
mkdir -p "$WORK/project" && echo input >"$WORK/project/in.txt"
(cd "$WORK/project" && timeout 120 "$KILN" run --coordinator "grpc://$GRPC" \
    --platform "container-image=docker://$REGISTRY/toolchains/busybox:v1.0.0" -- \
    sh -c 'cat /etc/marker; cat in.txt; test -e /usr/bin/env && echo host-visible; true') \
    >"$WORK/run.out" 2>"$WORK/run.err" || { cat "$WORK/run.err" >&2; fail "kiln run in the image"; }
contains "^$MARKER\$" <"$WORK/run.out" || fail "the action did not see the image's /etc/marker"
contains '^input$' <"$WORK/run.out" || fail "the action did not see its input"
contains 'host-visible' <"$WORK/run.out" && fail "the host's /usr shows through the image"

log "kiln run with a wrong digest: FAILED_PRECONDITION naming the image"
WRONG="docker://$REGISTRY/toolchains/busybox@sha256:$(printf '0%.0s' $(seq 1 64))"
(cd "$WORK/project" && timeout 120 "$KILN" run --no-cache --coordinator "grpc://$GRPC" \
    --platform "container-image=$WRONG" -- true) >/dev/null 2>"$WORK/wrong.err" \
    && fail "an action with a wrong image digest succeeded"
contains 'FailedPrecondition\|FAILED_PRECONDITION\|failed precondition' <"$WORK/wrong.err" \
    || { cat "$WORK/wrong.err" >&2; fail "a wrong digest did not fail with FAILED_PRECONDITION"; }
contains "container image $WRONG" <"$WORK/wrong.err" \
    || { cat "$WORK/wrong.err" >&2; fail "the error does not name the image"; }

log "Bazel 2.1: the interop workspace on an execution platform in the image"
prepare_bazel_workspace 20
cat >>"$WORKSPACE/BUILD" <<BUILD

platform(
    name = "busybox",
    exec_properties = {"container-image": "$IMAGE"},
)

genrule(
    name = "in_image",
    outs = ["in_image.txt"],
    cmd = "cat /etc/marker > \$@",
)
BUILD
(cd "$WORKSPACE" && timeout 300 "$BAZEL" --output_user_root="$WORK/bazel-root" --batch build //... \
    --remote_executor="grpc://$GRPC" --remote_timeout=120 --jobs=8 \
    --extra_execution_platforms=//:busybox --shell_executable=/bin/sh) \
    >"$WORK/bazel.out" 2>&1 || { cat "$WORK/bazel.out" >&2; fail "bazel build in the image"; }
grep -E '^INFO: [0-9]+ processes' "$WORK/bazel.out" | tail -n 1
BIN="$WORKSPACE/bazel-bin"
[ "$(cat "$BIN/in_image.txt")" = "$MARKER" ] || fail "in_image.txt: the genrule did not run in the image"
BIG_SHA=$(awk 'BEGIN { for (i = 0; i < 200000; i++) print "kiln interop big blob line " i }' | sha256sum | cut -d' ' -f1)
[ "$(tail -n 1 "$BIN/summary.txt")" = "$BIG_SHA" ] || fail "summary.txt, computed in the image, is wrong"
diff <(for n in $(seq 1 100); do echo "leaf 0 line $n"; done) "$BIN/leaf_0.txt" >/dev/null || fail "leaf_0.txt is wrong"
[ "$(cat "$BIN/tree/sub/b.txt")" = nested ] || fail "tree/sub/b.txt is wrong"
[ "$(ls "$WORK/kiln-data/workers/0/images" | grep -c '^[0-9a-f]\{64\}$')" -eq 1 ] \
    || fail "expected the one image unpacked once in the worker's image cache"

echo "container images: kiln publish → kiln run by tag and Bazel 2.1 by digest in the busybox image; a wrong digest refused"
