#!/usr/bin/env bash
# Interop: docker, containerd (ctr), podman and buildah against kiln's registry, on
# loopback. Each daemon is started by hand with all its state under $WORK and killed by
# PID on exit.
#
# - docker 20.10 (Debian docker.io, on its own containerd): push an image made with
#   `docker import` from busybox-static, re-push under a second tag (layers already
#   exist), pull by tag and by digest, run it; `latest` is refused with DENIED;
# - containerd 1.6 (ctr): pull by tag and by digest with --plain-http, run it, push an
#   image it tagged;
# - podman 4.3: push its own image, pull by tag and by digest (docker's image too), run;
# - buildah 1.28: build on top of docker's image and push; docker and ctr pull it back.
#
# The daemons come from lib.sh (start_containerd, start_dockerd) and stop newest first on
# exit. Every client pulls what the others pushed, so each manifest flavour (docker schema2
# from docker, OCI from podman and buildah) is read by every client. 127.0.0.0/8 is an
# insecure registry to all of them; podman and buildah need --tls-verify=false and ctr
# --plain-http. A client that cannot be installed, or a daemon that does not start, is
# a failure.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$INTEROP_DIR/registry_server.sh"

install_debian_packages docker.io containerd podman buildah busybox-static
for tool in dockerd docker containerd ctr podman buildah runc busybox; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done

# manifest_header REPO REF HEADER: a header of the registry's answer to a manifest HEAD.
manifest_header() {
    curl -fsS -I \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
        "http://$R/v2/$1/manifests/$2" | tr -d '\r' | grep -i "^$3:" | cut -d' ' -f2-
}

choose_registry_binary
start_registry reg R
[ -n "$R" ] || fail "the registry did not report its address"
log "registry on $R"

# Unix socket paths must stay under 108 bytes; $WORK is short.
STATE="$WORK/d"
mkdir -p "$STATE"

log "a tiny image: busybox-static plus one file, as a gzip tarball (docker 20.10 cannot pull zstd)"
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS/bin"
cp "$(command -v busybox)" "$ROOTFS/bin/busybox"
for applet in sh cat; do ln -s busybox "$ROOTFS/bin/$applet"; done
echo "hello from docker" >"$ROOTFS/hello.txt"
tar -C "$ROOTFS" -czf "$WORK/rootfs.tar.gz" .

log "containerd and dockerd (on that containerd: vfs storage, no iptables, no bridge)"
start_containerd "$STATE/ctd"
start_dockerd "$STATE/docker"

# podman and buildah are daemonless; their storage lives under $STATE too. Podman hands
# runc its own RLIMIT_NOFILE/NPROC values, which runc's init may not raise back on this
# machine (root lacks CAP_SYS_RESOURCE: "error setting rlimit type 7: operation not
# permitted"), so containers get explicit lower limits.
STORAGE=(--root "$STATE/containers-root" --runroot "$STATE/containers-run" --storage-driver vfs)
mkdir -p "$STATE/podman-tmp"
PODMAN=(podman "${STORAGE[@]}" --cgroup-manager cgroupfs --events-backend file --runtime runc
    --tmpdir "$STATE/podman-tmp")
PODMAN_RUN=(run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
BUILDAH=(buildah "${STORAGE[@]}")

# pull_and_run CLIENT IMAGE EXPECTED: CLIENT (docker, ctr or podman) pulls IMAGE from the
# registry and runs it; it must print EXPECTED.
CONTAINERS_RUN=0
pull_and_run() {
    local client="$1" image="$2" expected="$3" output
    CONTAINERS_RUN=$((CONTAINERS_RUN + 1))
    case "$client" in
        docker) docker pull "$image" && output="$(docker run --rm --network none "$image")" ;;
        ctr) "${CTR[@]}" images pull --plain-http "$image" \
            && output="$("${CTR[@]}" run --rm "$image" "kiln-interop-$CONTAINERS_RUN")" ;;
        podman) "${PODMAN[@]}" pull --tls-verify=false "$image" \
            && output="$("${PODMAN[@]}" "${PODMAN_RUN[@]}" "$image")" ;;
        *) fail "pull_and_run: unknown client $client" ;;
    esac || fail "$client could not pull and run $image"
    [ "$output" = "$expected" ] || fail "$client ran $image, which printed '$output', not '$expected'"
}

log "docker: import, push, re-push under a second tag"
docker import --change 'CMD ["/bin/cat", "/hello.txt"]' "$WORK/rootfs.tar.gz" kiln-local/docker:v1.0.0 >/dev/null
docker tag kiln-local/docker:v1.0.0 "$R/interop/docker:v1.0.0"
docker push "$R/interop/docker:v1.0.0" | tee "$WORK/docker-push.txt"
DOCKER_DIGEST="$(grep -o 'digest: sha256:[0-9a-f]*' "$WORK/docker-push.txt" | cut -d' ' -f2)"
[ -n "$DOCKER_DIGEST" ] || fail "docker push printed no digest"
[ "$(manifest_header interop/docker v1.0.0 Docker-Content-Digest)" = "$DOCKER_DIGEST" ] \
    || fail "the registry serves another digest than docker pushed"
manifest_header interop/docker v1.0.0 Content-Type | contains 'application/vnd.docker.distribution.manifest.v2+json' \
    || fail "docker's schema2 manifest lost its media type"
docker tag kiln-local/docker:v1.0.0 "$R/interop/docker:main-abc1234"
docker push "$R/interop/docker:main-abc1234" | tee "$WORK/docker-repush.txt"
grep -q 'Layer already exists' "$WORK/docker-repush.txt" || fail "docker re-uploaded a layer the registry has"

log "docker: latest is refused by the default tag policy, with the reason"
docker tag kiln-local/docker:v1.0.0 "$R/interop/docker:latest"
if docker push "$R/interop/docker:latest" >"$WORK/docker-latest.txt" 2>&1; then
    fail "docker pushed latest, which the default policy refuses"
fi
grep -qi 'denied' "$WORK/docker-latest.txt" || fail "docker's push of latest failed without DENIED: $(cat "$WORK/docker-latest.txt")"

log "docker: pull by tag and by digest, run"
docker rmi -f kiln-local/docker:v1.0.0 "$R/interop/docker:v1.0.0" "$R/interop/docker:main-abc1234" \
    "$R/interop/docker:latest" >/dev/null
pull_and_run docker "$R/interop/docker:v1.0.0" "hello from docker"
docker rmi -f "$R/interop/docker:v1.0.0" >/dev/null
pull_and_run docker "$R/interop/docker@$DOCKER_DIGEST" "hello from docker"

log "containerd: pull by tag and by digest (plain HTTP), run, push"
pull_and_run ctr "$R/interop/docker:v1.0.0" "hello from docker"
pull_and_run ctr "$R/interop/docker@$DOCKER_DIGEST" "hello from docker"
"${CTR[@]}" images ls | contains "$DOCKER_DIGEST" || fail "ctr did not record docker's digest"
"${CTR[@]}" images check | grep "$R/interop/docker:v1.0.0" | contains complete \
    || fail "ctr's pull is incomplete: $("${CTR[@]}" images check)"
"${CTR[@]}" images tag "$R/interop/docker:v1.0.0" "$R/interop/ctr:v1.1.0" >/dev/null
"${CTR[@]}" images push --plain-http "$R/interop/ctr:v1.1.0"
[ "$(manifest_header interop/ctr v1.1.0 Docker-Content-Digest)" = "$DOCKER_DIGEST" ] \
    || fail "ctr's push changed the manifest"

log "podman: its own image, push, pull by tag and by digest, run"
echo "hello from podman" >"$ROOTFS/hello.txt"
tar -C "$ROOTFS" -czf "$WORK/rootfs-podman.tar.gz" .
"${PODMAN[@]}" import --change 'CMD ["/bin/cat", "/hello.txt"]' "$WORK/rootfs-podman.tar.gz" \
    localhost/kiln-local/podman:v2.0.0 >/dev/null
"${PODMAN[@]}" push --tls-verify=false --format oci --digestfile "$WORK/podman.digest" \
    localhost/kiln-local/podman:v2.0.0 "docker://$R/interop/podman:v2.0.0"
PODMAN_DIGEST="$(cat "$WORK/podman.digest")"
[ "$(manifest_header interop/podman v2.0.0 Docker-Content-Digest)" = "$PODMAN_DIGEST" ] \
    || fail "the registry serves another digest than podman pushed"
manifest_header interop/podman v2.0.0 Content-Type | contains 'application/vnd.oci.image.manifest.v1+json' \
    || fail "podman's OCI manifest lost its media type"
"${PODMAN[@]}" rmi -f localhost/kiln-local/podman:v2.0.0 >/dev/null
pull_and_run podman "$R/interop/podman:v2.0.0" "hello from podman"
"${PODMAN[@]}" rmi -f "$R/interop/podman:v2.0.0" >/dev/null
pull_and_run podman "$R/interop/podman@$PODMAN_DIGEST" "hello from podman"
pull_and_run podman "$R/interop/docker@$DOCKER_DIGEST" "hello from docker"

log "docker and ctr pull podman's OCI image"
pull_and_run docker "$R/interop/podman@$PODMAN_DIGEST" "hello from podman"
pull_and_run ctr "$R/interop/podman:v2.0.0" "hello from podman"

log "buildah: a layer on top of docker's image, pushed; docker and ctr pull it"
CONTAINER="$("${BUILDAH[@]}" from --tls-verify=false "$R/interop/docker:v1.0.0")"
echo "hello from buildah" >"$WORK/buildah.txt"
"${BUILDAH[@]}" copy "$CONTAINER" "$WORK/buildah.txt" /hello.txt >/dev/null
"${BUILDAH[@]}" config --cmd '["/bin/cat", "/hello.txt"]' "$CONTAINER"
"${BUILDAH[@]}" commit "$CONTAINER" localhost/kiln-local/buildah:v3.0.0 >/dev/null
"${BUILDAH[@]}" push --tls-verify=false --digestfile "$WORK/buildah.digest" \
    localhost/kiln-local/buildah:v3.0.0 "docker://$R/interop/buildah:v3.0.0"
BUILDAH_DIGEST="$(cat "$WORK/buildah.digest")"
"${BUILDAH[@]}" rm "$CONTAINER" >/dev/null
[ "$(curl -fsS "http://$R/v2/interop/buildah/manifests/$BUILDAH_DIGEST" \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["layers"]))')" = 2 ] \
    || fail "buildah's image does not have the base layer plus its own"
pull_and_run docker "$R/interop/buildah@$BUILDAH_DIGEST" "hello from buildah"
pull_and_run ctr "$R/interop/buildah:v3.0.0" "hello from buildah"

log "the registry lists every repository the clients pushed to"
CATALOG="$(curl -fsS "http://$R/v2/_catalog")"
for repo in interop/docker interop/ctr interop/podman interop/buildah; do
    echo "$CATALOG" | contains "\"$repo\"" || fail "_catalog lacks $repo: $CATALOG"
done
TAGS="$(curl -fsS "http://$R/v2/interop/docker/tags/list" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["tags"]))')"
[ "$TAGS" = "main-abc1234 v1.0.0" ] \
    || fail "unexpected tags for interop/docker: $TAGS"

log "registry interop with docker, containerd, podman and buildah passed"
