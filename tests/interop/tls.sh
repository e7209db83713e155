#!/usr/bin/env bash
# TLS end to end, with certificates made here by openssl:
# - `kiln up` serving grpcs, https and /metrics over https (--tls-metrics); `kiln run`
#   over grpcs with the CA, refused without;
# - Bazel 2.1 builds the interop workspace remotely over grpcs (--tls_certificate);
# - skopeo copies an image in and out over HTTPS with the CA in a cert dir, and docker
#   logs in, pushes, pulls and runs one, with the registry's token auth on;
#   `kiln publish --registry https://… --ca-cert` pushes one, and is refused without the CA;
# - a `kiln coordinator` with mutual TLS and auth: a `kiln worker` with a client
#   certificate from the client CA joins, one without (or with a foreign one) is refused;
#   certificates map to scopes by subject CN (Bazel 2.1 has no client-certificate
#   flags, so this is for kiln's own clients and newer Bazels); `kiln drain` over mTLS;
# - rotation: the certificate files are replaced and new connections see the new
#   certificate (openssl s_client), without a restart.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install_bazel
install_debian_packages skopeo umoci openssl python3-venv docker.io containerd busybox-static
for tool in skopeo dockerd docker containerd ctr runc busybox; do
    command -v "$tool" >/dev/null || fail "$tool is not installed"
done
build_kiln

CERTS="$WORK/certs"
mkdir -p "$CERTS"
# ca NAME : a CA certificate and key, $CERTS/NAME.pem and NAME.key.
ca() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=$1" -keyout "$CERTS/$1.key" -out "$CERTS/$1.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
}
# issue CA NAME CN [SAN] : a certificate signed by CA, $CERTS/NAME.pem and NAME.key.
issue() {
    local ca="$1" name="$2" cn="$3" san="${4:-}"
    local ext="$CERTS/$name.ext"
    echo "basicConstraints=critical,CA:FALSE" >"$ext"
    [ -n "$san" ] && echo "subjectAltName=$san" >>"$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
        -keyout "$CERTS/$name.key" -out "$CERTS/$name.csr" 2>/dev/null
    openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/$ca.pem" -CAkey "$CERTS/$ca.key" \
        -CAcreateserial -days 2 -extfile "$ext" -out "$CERTS/$name.pem" 2>/dev/null
}
ca server-ca
ca client-ca
ca stranger-ca
issue server-ca server localhost "DNS:localhost,IP:127.0.0.1"
issue client-ca worker worker-1
issue client-ca operator operator
issue client-ca nobody nobody
issue stranger-ca stranger worker-2

log "kiln up over TLS, with registry token auth on"
PASSWORD=interop-secret
python3 -m venv "$WORK/venv" >/dev/null && "$WORK/venv/bin/pip" install -q argon2-cffi >/dev/null \
    || fail "could not install argon2-cffi to hash the registry password"
HASH=$("$WORK/venv/bin/python" -c 'import argon2,sys; print(argon2.PasswordHasher().hash(sys.argv[1]))' "$PASSWORD")
# The local workers trust the server's CA (by default they trust the server's own
# certificate, which only works for a self-signed one).
cat >"$WORK/kiln.toml" <<TOML
[worker]
ca_cert = "$CERTS/server-ca.pem"

[registry.auth]
enabled = true
users = [{ name = "ci", password_hash = "$HASH", grants = [{ repositories = "*", actions = ["pull", "push"] }] }]
TOML
start_kiln up up --config "$WORK/kiln.toml" --grpc-addr 127.0.0.1:0 --registry-addr 127.0.0.1:0 \
    --metrics-addr 127.0.0.1:0 --workers 1 --data-dir "$WORK/kiln-data" \
    --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --tls-metrics
GRPC=$(listen_addr up grpc)
REGISTRY=$(listen_addr up http registry)
METRICS=$(listen_addr up http)
contains "listening on grpcs://$GRPC" <"$WORK/up.log" || fail "the coordinator does not say grpcs"

# /metrics over HTTPS (--tls-metrics) with the same certificate; plain HTTP is not answered.
curl -sf --cacert "$CERTS/server-ca.pem" "https://localhost:${METRICS##*:}/metrics" >"$WORK/metrics.txt" \
    || fail "/metrics over HTTPS with the CA"
contains '^kiln_store_bytes' <"$WORK/metrics.txt" || fail "/metrics over HTTPS has no kiln_store_bytes"
curl -sf "http://$METRICS/metrics" >/dev/null 2>&1 && fail "/metrics answered plain HTTP under --tls-metrics"

mkdir -p "$WORK/project" && echo "over tls" >"$WORK/project/in.txt"
run_over() { (cd "$WORK/project" && timeout 120 "$KILN" run "$@" -- cat in.txt); }
run_over --coordinator "grpcs://$GRPC" --ca-cert "$CERTS/server-ca.pem" >"$WORK/run.out" 2>"$WORK/run.err" \
    || { cat "$WORK/run.err" >&2; fail "kiln run over grpcs"; }
contains '^over tls$' <"$WORK/run.out" || fail "the action's output is missing"
contains 'executed, exit code 0' <"$WORK/run.err" || fail "the local worker did not run it over TLS"
run_over --no-cache --coordinator "grpcs://$GRPC" >/dev/null 2>"$WORK/run-noca.err" \
    && fail "kiln run trusted the server without its CA"
contains 'certificate' <"$WORK/run-noca.err" || { cat "$WORK/run-noca.err" >&2; fail "no certificate error"; }

log "Bazel 2.1 over grpcs"
prepare_bazel_workspace 20
(cd "$WORKSPACE" && timeout 300 "$BAZEL" --output_user_root="$WORK/bazel-root" --batch build //... \
    --remote_executor="grpcs://$GRPC" --tls_certificate="$CERTS/server-ca.pem" --remote_timeout=60 --jobs=8) \
    >"$WORK/bazel.out" 2>&1 || { tail -n 30 "$WORK/bazel.out" >&2; fail "Bazel over grpcs"; }
line=$(grep -E '^INFO: [0-9]+ processes' "$WORK/bazel.out" | tail -n 1)
echo "bazel over grpcs: $line"
[[ "$line" =~ ^INFO:\ ([0-9]+)\ processes:\ ([0-9]+)\ remote\.?$ ]] && [ "${BASH_REMATCH[2]}" -eq "$GENRULES" ] \
    || fail "expected all $GENRULES actions to run remotely: $line"

log "skopeo over HTTPS with the CA, token auth on"
mkdir -p "$WORK/skopeo-certs"
cp "$CERTS/server-ca.pem" "$WORK/skopeo-certs/ca.crt"
LAYOUT="$WORK/layout"
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:v1.0.0"
umoci unpack --rootless --image "$LAYOUT:v1.0.0" "$WORK/bundle"
echo "hello over https" >"$WORK/bundle/rootfs/hello.txt"
umoci repack --image "$LAYOUT:v1.0.0" "$WORK/bundle"
CREDS=(--dest-creds "ci:$PASSWORD" --dest-cert-dir "$WORK/skopeo-certs")
skopeo copy "${CREDS[@]}" "oci:$LAYOUT:v1.0.0" "docker://$REGISTRY/tls/app:v1.0.0" \
    || fail "skopeo could not push over HTTPS"
skopeo copy --src-creds "ci:$PASSWORD" --src-cert-dir "$WORK/skopeo-certs" \
    "docker://$REGISTRY/tls/app:v1.0.0" "oci:$WORK/pulled:v1.0.0" || fail "skopeo could not pull over HTTPS"
[ "$(skopeo inspect --raw "oci:$LAYOUT:v1.0.0")" = "$(skopeo inspect --raw "oci:$WORK/pulled:v1.0.0")" ] \
    || fail "the pulled manifest differs"
skopeo inspect --creds "ci:$PASSWORD" "docker://$REGISTRY/tls/app:v1.0.0" >/dev/null 2>"$WORK/skopeo-noca.err" \
    && fail "skopeo trusted the registry without its CA"
grep -q "$PASSWORD" "$WORK/up.log" && fail "the registry password appears in kiln's log"

log "docker over HTTPS: login, push, pull and run, with the CA in certs.d and token auth on"
# docker counts 127.0.0.0/8 as an insecure registry and may skip the CA check there; what
# this shows is docker's client pushing and pulling through kiln's TLS listener and token
# flow (the registry serves nothing but HTTPS).
ROOTFS="$WORK/rootfs"
mkdir -p "$ROOTFS/bin"
cp "$(command -v busybox)" "$ROOTFS/bin/busybox"
for applet in sh cat; do ln -s busybox "$ROOTFS/bin/$applet"; done
echo "hello over https from docker" >"$ROOTFS/hello.txt"
tar -C "$ROOTFS" -czf "$WORK/rootfs.tar.gz" .
STATE="$WORK/d"
mkdir -p "$STATE"
start_containerd "$STATE/ctd"
start_dockerd "$STATE/docker"
CERTS_D="/etc/docker/certs.d/$REGISTRY"
mkdir -p "$CERTS_D" && cp "$CERTS/server-ca.pem" "$CERTS_D/ca.crt"
docker login --username ci --password-stdin "$REGISTRY" <<<"$PASSWORD" >/dev/null \
    || fail "docker login over HTTPS"
docker import --change 'CMD ["/bin/cat", "/hello.txt"]' "$WORK/rootfs.tar.gz" kiln-local/tls:v1 >/dev/null
docker tag kiln-local/tls:v1 "$REGISTRY/tls/docker:v1.0.0"
docker push "$REGISTRY/tls/docker:v1.0.0" >"$WORK/docker-push.txt" || { cat "$WORK/docker-push.txt" >&2; fail "docker push over HTTPS"; }
docker rmi "$REGISTRY/tls/docker:v1.0.0" kiln-local/tls:v1 >/dev/null
docker pull "$REGISTRY/tls/docker:v1.0.0" >/dev/null || fail "docker pull over HTTPS"
[ "$(docker run --rm --network none "$REGISTRY/tls/docker:v1.0.0")" = "hello over https from docker" ] \
    || fail "the image docker pulled over HTTPS does not run"
rm -rf "$CERTS_D"
grep -q "$PASSWORD" "$WORK/up.log" && fail "the registry password appears in kiln's log"

log "kiln publish over HTTPS (--registry https://, --ca-cert)"
mkdir -p "$WORK/publish-src" && echo "published over https" >"$WORK/publish-src/hello.txt"
publish_over() {
    KILN_REGISTRY_USER=ci KILN_REGISTRY_PASSWORD="$PASSWORD" timeout 120 "$KILN" publish --no-progress \
        --repo tls/published --from "$WORK/publish-src" --tag v1.0.0 "$@"
}
publish_over --registry "https://$REGISTRY" --ca-cert "$CERTS/server-ca.pem" >"$WORK/publish.out" 2>"$WORK/publish.err" \
    || { cat "$WORK/publish.err" >&2; fail "kiln publish over HTTPS"; }
skopeo inspect --creds "ci:$PASSWORD" --cert-dir "$WORK/skopeo-certs" "docker://$REGISTRY/tls/published:v1.0.0" >/dev/null \
    || fail "the image kiln publish pushed over HTTPS is not in the registry"
publish_over --registry "https://$REGISTRY" >/dev/null 2>"$WORK/publish-noca.err" \
    && fail "kiln publish trusted the registry without its CA"
contains 'certificate' <"$WORK/publish-noca.err" || { cat "$WORK/publish-noca.err" >&2; fail "no certificate error from kiln publish"; }

log "mutual TLS with auth: certificates are identities; a worker with one joins, others are refused"
JOIN="join-$RANDOM$RANDOM"
# Client certificates map to scopes by subject CN, for clients that send no token.
cat >"$WORK/mtls.toml" <<TOML
[[coordinator.auth.client_certificates]]
common_name = "operator"
scopes = ["admin"]
TOML
INTEROP_KILN_LOG=info,kiln_coordinator::auth=debug start_kiln mtls coordinator --config "$WORK/mtls.toml" \
    --coordinator-auth --grpc-addr 127.0.0.1:0 \
    --metrics-addr 127.0.0.1:0 --data-dir "$WORK/mtls-data" --join-token "$JOIN" \
    --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --tls-client-ca "$CERTS/client-ca.pem"
MTLS=$(listen_addr mtls grpc)
WORKER_TLS=(--coordinator "grpcs://$MTLS" --ca-cert "$CERTS/server-ca.pem" --join-token "$JOIN" --slots 1)
start_kiln_worker good "${WORKER_TLS[@]}" --work-dir "$WORK/good" \
    --client-cert "$CERTS/worker.pem" --client-key "$CERTS/worker.key"
for who in none stranger; do
    extra=()
    [ "$who" = stranger ] && extra=(--client-cert "$CERTS/stranger.pem" --client-key "$CERTS/stranger.key")
    KILN_LOG=info "$KILN" worker --metrics-addr 127.0.0.1:0 "${WORKER_TLS[@]}" --work-dir "$WORK/$who" \
        "${extra[@]}" >"$WORK/$who.log" 2>&1 &
    pid=$!
    STARTED_PIDS+=("$pid")
    sleep 3
    grep -q 'registered with the coordinator' "$WORK/$who.log" && fail "a worker with $who certificate joined"
    contains 'lost the coordinator' <"$WORK/$who.log" || { cat "$WORK/$who.log" >&2; fail "the $who worker says nothing of its refusal"; }
    stop_pid "$pid" TERM
done
STATUS=$("$KILN" status --coordinator "grpcs://$MTLS" --ca-cert "$CERTS/server-ca.pem" \
    --client-cert "$CERTS/operator.pem" --client-key "$CERTS/operator.key")
echo "$STATUS" | contains 'Workers: 1 connected' || { echo "$STATUS" >&2; fail "kiln status over mTLS does not show the one worker"; }
"$KILN" status --coordinator "grpcs://$MTLS" --ca-cert "$CERTS/server-ca.pem" \
    --client-cert "$CERTS/nobody.pem" --client-key "$CERTS/nobody.key" >/dev/null 2>"$WORK/nobody.err" \
    && fail "a certificate that maps to no scopes read the status"
contains 'needs a token' <"$WORK/nobody.err" || { cat "$WORK/nobody.err" >&2; fail "no UNAUTHENTICATED for an unmapped certificate"; }
WORKER_ID=$("$KILN" status --json --coordinator "grpcs://$MTLS" --ca-cert "$CERTS/server-ca.pem" \
    --client-cert "$CERTS/operator.pem" --client-key "$CERTS/operator.key" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["id"])')
"$KILN" drain --coordinator "grpcs://$MTLS" --ca-cert "$CERTS/server-ca.pem" --join-token "$JOIN" \
    --client-cert "$CERTS/operator.pem" --client-key "$CERTS/operator.key" "$WORKER_ID" >"$WORK/drain.out" 2>&1 \
    || { cat "$WORK/drain.out" >&2; fail "kiln drain over mTLS"; }
contains 'is draining' <"$WORK/drain.out" || { cat "$WORK/drain.out" >&2; fail "kiln drain did not drain $WORKER_ID"; }

log "rotation: new connections see the new certificate, without a restart"
serial() { openssl s_client -connect "$1" -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial; }
BEFORE=$(serial "$GRPC")
issue server-ca server-next localhost "DNS:localhost,IP:127.0.0.1"
cp "$CERTS/server-next.key" "$CERTS/server.key.new" && mv "$CERTS/server.key.new" "$CERTS/server.key"
cp "$CERTS/server-next.pem" "$CERTS/server.pem.new" && mv "$CERTS/server.pem.new" "$CERTS/server.pem"
sleep 3
AFTER=$(serial "$GRPC")
AFTER_HTTPS=$(serial "$REGISTRY")
echo "gRPC certificate: $BEFORE -> $AFTER; registry: $AFTER_HTTPS"
[ -n "$BEFORE" ] && [ "$BEFORE" != "$AFTER" ] || fail "the coordinator still presents the old certificate"
[ "$AFTER_HTTPS" = "$AFTER" ] || fail "the registry does not present the new certificate"
run_over --no-cache --coordinator "grpcs://$GRPC" --ca-cert "$CERTS/server-ca.pem" >/dev/null 2>"$WORK/run2.err" \
    || { cat "$WORK/run2.err" >&2; fail "kiln run after rotation"; }
grep -q "BEGIN.*PRIVATE KEY" "$WORK/up.log" "$WORK/mtls.log" && fail "a private key appears in a log"

echo "tls: grpcs and https with kiln run, /metrics over https, Bazel 2.1, skopeo, docker and kiln publish; mTLS workers, status and drain; rotation without restart"
