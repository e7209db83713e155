#!/usr/bin/env bash
# Checks kiln's deployment files (deploy/): every YAML file parses, the Helm chart lints
# and renders (with Helm itself), and everything it and the other files describe keeps
# kiln's invariants: non-root, probes on long-running containers, pinned images (no
# `latest`, no untagged), resources set. Then proves the checker catches violations by
# running it on tests/deploy/fixtures/bad, which must fail with every expected message.
#
# Installs what it needs idempotently (a Python venv, CRD schema packages from npm,
# docker-compose and HAProxy from apt); a tool that cannot be installed is a failure,
# never a skip.
# Exits non-zero on any violation.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${KILN_DEPLOY_CACHE:-${HOME:-/tmp}/.cache/kiln-deploy}"
VENV="$CACHE/venv"
NODE_DIR="$CACHE/node"

fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
log() { printf '\n== %s\n' "$*"; }

install_system_packages() {
    local missing=()
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    # `haproxy -c` checks the HAProxy configurations (deploy/compose-ha/haproxy.cfg).
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || fail "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || fail "could not install ${missing[*]}"
    fi
    command -v docker-compose >/dev/null || fail "docker-compose is missing after install"
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || fail "haproxy is missing after install"
}

install_python_packages() {
    # The stamp holds the requirements the venv was built from; reinstall on change.
    if [ -x "$VENV/bin/python" ] && cmp -s "$HERE/requirements.txt" "$VENV/.requirements"; then
        return
    fi
    log "installing the checker's Python packages into $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    python3 -m venv "$VENV" || fail "could not create a venv in $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$HERE/requirements.txt" \
        || fail "pip could not install tests/deploy/requirements.txt"
    cp "$HERE/requirements.txt" "$VENV/.requirements"
}

install_node_packages() {
    # Same stamp scheme: the package.json the node_modules were installed from.
    if [ -d "$NODE_DIR/node_modules/@kubernetes-models" ] \
        && cmp -s "$HERE/package.json" "$NODE_DIR/package.json"; then
        return
    fi
    log "installing the CRD schema packages into $NODE_DIR"
    rm -rf "$NODE_DIR"
    mkdir -p "$NODE_DIR"
    cp "$HERE/package.json" "$NODE_DIR/package.json"
    (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund --no-package-lock) \
        || { rm -f "$NODE_DIR/package.json"; fail "npm could not install tests/deploy/package.json"; }
}

install_system_packages
install_python_packages
install_node_packages
"$VENV/bin/python" -c 'import helm_python, kubernetes_validate, dockerfile, yaml' \
    || fail "the checker's Python packages do not import"
"$VENV/bin/python" -c 'import helm_python as h; print("Helm", h.helm_sdk_version(), "via helm-python-sdk", h.__version__)'

cd "$REPO_ROOT"

main_out="$(mktemp)"
out="$(mktemp)"
trap 'rm -f "$main_out" "$out"' EXIT

log "checking deploy/"
"$VENV/bin/python" "$HERE/check_deploy.py" --root deploy --must-fail "$HERE/render-must-fail.yaml" \
    --crd-node-modules "$NODE_DIR/node_modules" \
    | tee "$main_out" || fail "deploy/ breaks the invariants above"
passed="$(sed -n 's/^check_deploy: \([0-9]*\) passed, 0 failed$/\1/p' "$main_out")"
[ -n "$passed" ] || fail "the checker printed no summary"

log "self-test: the checker must reject tests/deploy/fixtures/bad"
status=0
"$VENV/bin/python" "$HERE/check_deploy.py" --root "$HERE/fixtures/bad" \
    --crd-node-modules "$NODE_DIR/node_modules" >"$out" 2>&1 || status=$?
[ "$status" = 1 ] || { cat "$out"; fail "the checker exited $status on the broken fixtures (want 1)"; }
# A summary line proves the checker ran to the end rather than crashing (also exit 1).
grep -qE '^check_deploy: [0-9]+ passed, [1-9][0-9]* failed$' "$out" \
    || { cat "$out"; fail "the checker did not finish its run on the broken fixtures"; }
expected=0
missing=0
while IFS= read -r line; do
    [ -n "$line" ] || continue
    expected=$((expected + 1))
    if ! grep -qF -- "$line" "$out"; then
        echo "  not reported: $line"
        missing=$((missing + 1))
    fi
done <"$HERE/fixtures/bad/expected-violations.txt"
if [ "$missing" -gt 0 ]; then
    grep -E '^(ok|FAIL|  VIOLATION)' "$out" || true
    fail "$missing of $expected expected violations were not reported"
fi
echo "ok   all $expected expected violations reported for the broken fixtures"
echo "deploy: $((passed + 1)) passed, 0 failed"
