#!/usr/bin/env bash
# Interop: real OCI clients against kiln's registry, on loopback.
#
# - skopeo: copy an OCI layout made by umoci in and out, inspect, list-tags, delete, and
#   registry-to-registry copies (within one registry, which mounts across repositories,
#   and between two registries);
# - oras-py: a custom artifact, a chunked upload, and a referrer via `subject`, checked
#   through the referrers API with artifactType filtering.
#
# Then runs registry_daemons.sh (docker, containerd, podman, buildah). Uses `kiln
# registry` when the kiln binary has it, otherwise the kiln-registry `serve` example (same
# flags). Clients are installed idempotently; a missing one is a failure.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$INTEROP_DIR/registry_server.sh"

install_oci_clients() {
    install_debian_packages skopeo umoci python3-venv
    command -v skopeo >/dev/null || fail "skopeo is not installed"
    command -v umoci >/dev/null || fail "umoci is not installed"
    ORAS_VENV="$CLIENT_CACHE/oras-venv"
    if ! "$ORAS_VENV/bin/python" -c 'import oras.client' 2>/dev/null; then
        log "installing oras-py"
        mkdir -p "$CLIENT_CACHE"
        python3 -m venv "$ORAS_VENV"
        "$ORAS_VENV/bin/pip" install -q oras
    fi
    "$ORAS_VENV/bin/python" -c 'import oras.client' || fail "oras-py did not install"
}

install_oci_clients
choose_registry_binary
start_registry reg1 R1
REG1_PID=$LAST_PID
start_registry reg2 R2
[ -n "$R1" ] && [ -n "$R2" ] || fail "registries did not report their addresses"
log "registries on $R1 and $R2"
TLS=(--tls-verify=false)

log "umoci: build an OCI layout"
LAYOUT="$WORK/layout"
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:v1.0.0"
umoci unpack --rootless --image "$LAYOUT:v1.0.0" "$WORK/bundle"
echo "hello from kiln interop" >"$WORK/bundle/rootfs/hello.txt"
umoci repack --image "$LAYOUT:v1.0.0" "$WORK/bundle"
umoci config --image "$LAYOUT:v1.0.0" --config.entrypoint /hello.txt
# A second, different image to delete later (v1.0.0 is immutable under the default policy).
umoci new --image "$LAYOUT:main-abc1234"
umoci unpack --rootless --image "$LAYOUT:main-abc1234" "$WORK/bundle2"
echo "short-lived" >"$WORK/bundle2/rootfs/branch.txt"
umoci repack --image "$LAYOUT:main-abc1234" "$WORK/bundle2"

log "skopeo: copy the layout in"
skopeo copy --dest-tls-verify=false "oci:$LAYOUT:v1.0.0" "docker://$R1/interop/app:v1.0.0"
skopeo copy --dest-tls-verify=false "oci:$LAYOUT:main-abc1234" "docker://$R1/interop/app:main-abc1234"

log "skopeo: inspect and list-tags"
RAW_LOCAL="$(skopeo inspect --raw "oci:$LAYOUT:v1.0.0")"
RAW_REMOTE="$(skopeo inspect "${TLS[@]}" --raw "docker://$R1/interop/app:v1.0.0")"
[ "$RAW_LOCAL" = "$RAW_REMOTE" ] || fail "the registry did not store the manifest byte for byte"
DIGEST="$(skopeo inspect "${TLS[@]}" --format '{{.Digest}}' "docker://$R1/interop/app:v1.0.0")"
EXPECTED="sha256:$(skopeo inspect --raw "oci:$LAYOUT:v1.0.0" | sha256sum | cut -d' ' -f1)"
[ "$DIGEST" = "$EXPECTED" ] || fail "inspect digest $DIGEST, expected $EXPECTED"
skopeo inspect "${TLS[@]}" --config "docker://$R1/interop/app:v1.0.0" | contains '"/hello.txt"' \
    || fail "inspect does not show the entrypoint"
TAGS="$(skopeo list-tags "${TLS[@]}" "docker://$R1/interop/app")"
echo "$TAGS" | contains '"v1.0.0"' || fail "list-tags lacks v1.0.0: $TAGS"
echo "$TAGS" | contains '"main-abc1234"' || fail "list-tags lacks main-abc1234: $TAGS"

log "skopeo: copy out to a layout and compare"
skopeo copy --src-tls-verify=false "docker://$R1/interop/app:v1.0.0" "oci:$WORK/out:v1.0.0"
[ "$(skopeo inspect --raw "oci:$WORK/out:v1.0.0")" = "$RAW_LOCAL" ] \
    || fail "the pulled manifest differs from the pushed one"
umoci unpack --rootless --image "$WORK/out:v1.0.0" "$WORK/unpacked"
grep -q "hello from kiln interop" "$WORK/unpacked/rootfs/hello.txt" || fail "layer content lost"

log "skopeo: registry-to-registry copies (cross-repository mount within one registry)"
skopeo copy --src-tls-verify=false --dest-tls-verify=false \
    "docker://$R1/interop/app:v1.0.0" "docker://$R1/interop/copy:v1.0.0"
registry_logs reg1 | contains 'blob mounted.*interop/copy' \
    || fail "skopeo did not mount blobs across repositories (no 201 mount in the log)"
skopeo copy --src-tls-verify=false --dest-tls-verify=false \
    "docker://$R1/interop/app:v1.0.0" "docker://$R2/mirror/app:v1.0.0"
[ "$(skopeo inspect "${TLS[@]}" --raw "docker://$R2/mirror/app:v1.0.0")" = "$RAW_LOCAL" ] \
    || fail "the registry-to-registry copy changed the manifest"

log "skopeo: delete"
skopeo delete "${TLS[@]}" "docker://$R1/interop/app:main-abc1234"
if skopeo inspect "${TLS[@]}" --raw "docker://$R1/interop/app:main-abc1234" >/dev/null 2>&1; then
    fail "a deleted image can still be inspected"
fi
if skopeo delete "${TLS[@]}" "docker://$R1/interop/app:v1.0.0" 2>"$WORK/denied.txt"; then
    fail "an immutable semver image was deleted"
fi
grep -qi denied "$WORK/denied.txt" || fail "deleting v1.0.0 failed without DENIED: $(cat "$WORK/denied.txt")"
skopeo list-tags "${TLS[@]}" "docker://$R1/interop/app" | contains main-abc1234 \
    && fail "list-tags still shows the deleted tag"

log "oras-py: custom artifact, chunked upload, referrer via subject"
mkdir -p "$WORK/oras"
"$ORAS_VENV/bin/python" - "$R1" "$WORK/oras" <<'PY'
import hashlib, json, os, sys

import oras.client
import oras.oci
import requests

host, work = sys.argv[1], sys.argv[2]
os.chdir(work)
client = oras.client.OrasClient(hostname=host, insecure=True)

def write(name, data):
    with open(name, "wb") as f:
        f.write(data)

# A custom artifact with its own config media type.
write("artifact.txt", b"kiln interop artifact\n")
write("config.json", b'{"kind":"interop"}')
client.push(
    files=["artifact.txt:application/vnd.kiln.test.v1"],
    target=f"{host}/oras/artifact:v0.1.0",
    manifest_config="config.json:application/vnd.kiln.config.v1+json",
)
pulled = client.pull(target=f"{host}/oras/artifact:v0.1.0", outdir="pulled")
assert any(open(p, "rb").read() == b"kiln interop artifact\n" for p in pulled), pulled
assert "v0.1.0" in client.get_tags(f"{host}/oras/artifact"), "tag not listed"

# A chunked upload of a 5 MiB file in 1 MiB chunks.
big = os.urandom(5 * 1024 * 1024 + 123)
write("big.bin", big)
client.push(
    files=["big.bin:application/octet-stream"],
    target=f"{host}/oras/chunked:v0.2.0",
    do_chunked=True,
    chunk_size=1024 * 1024,
)
pulled = client.pull(target=f"{host}/oras/chunked:v0.2.0", outdir="pulled-big")
assert any(open(p, "rb").read() == big for p in pulled), "chunked blob differs"

# A referrer: an SBOM whose subject is the artifact above.
head = requests.head(
    f"http://{host}/v2/oras/artifact/manifests/v0.1.0",
    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
)
head.raise_for_status()
subject = oras.oci.Subject(
    mediaType=head.headers["Content-Type"],
    digest=head.headers["Docker-Content-Digest"],
    size=int(head.headers["Content-Length"]),
)
write("sbom.json", b'{"spdxVersion":"SPDX-2.3"}')
write("sbom-config.json", b"{}")
client.push(
    files=["sbom.json:application/spdx+json"],
    target=f"{host}/oras/artifact:v0.1.0-sbom",
    manifest_config="sbom-config.json:application/vnd.kiln.sbom.v1+json",
    subject=subject,
)
url = f"http://{host}/v2/oras/artifact/referrers/{subject.digest}"
everything = requests.get(url).json()["manifests"]
assert len(everything) == 1, everything
filtered = requests.get(url, params={"artifactType": "application/vnd.kiln.sbom.v1+json"})
assert filtered.headers.get("OCI-Filters-Applied") == "artifactType", filtered.headers
assert [m["digest"] for m in filtered.json()["manifests"]] == [everything[0]["digest"]]
other = requests.get(url, params={"artifactType": "application/x-other"}).json()["manifests"]
assert other == [], other
print("oras-py: artifact, chunked upload and referrer OK")
PY

log "crash safety: kill -9, restart on the same data, pull what was acknowledged"
kill -9 "$REG1_PID"
wait "$REG1_PID" 2>/dev/null || true
start_registry reg1-restarted R1 "$WORK/reg1"
[ "$(skopeo inspect "${TLS[@]}" --raw "docker://$R1/interop/app:v1.0.0")" = "$RAW_LOCAL" ] \
    || fail "an acknowledged push did not survive kill -9"
skopeo copy --src-tls-verify=false "docker://$R1/oras/chunked:v0.2.0" "oci:$WORK/after-crash:v0.2.0" >/dev/null \
    || fail "the chunked artifact did not survive kill -9"

log "docker, containerd, podman and buildah: registry_daemons.sh"
KILN="$KILN" bash "$INTEROP_DIR/registry_daemons.sh"

log "registry interop passed"
