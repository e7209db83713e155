# Starting kiln's registry for the registry interop scripts. Source it after lib.sh; do
# not run it.
#
# Uses `kiln registry` when the kiln binary has it, otherwise the kiln-registry `serve`
# example (same flags).

# Sets REGISTRY_BIN and REGISTRY_ARGS: `kiln registry` if it exists, else the example.
choose_registry_binary() {
    build_kiln
    if "$KILN" registry --help >/dev/null 2>&1; then
        REGISTRY_BIN="$KILN"
        REGISTRY_ARGS=(registry)
    else
        log "kiln has no registry subcommand yet: building the kiln-registry serve example"
        (cd "$REPO_ROOT" && cargo build --release --quiet -p kiln-registry --example serve)
        REGISTRY_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/serve"
        REGISTRY_ARGS=()
    fi
    [ -x "$REGISTRY_BIN" ] || fail "registry binary $REGISTRY_BIN is missing"
}

# start_registry NAME VAR [DATA]: serves a registry with its data in DATA (default
# $WORK/NAME) on a free port and sets VAR to its host:port. Not run in a subshell, so its
# PID reaches the exit trap.
start_registry() {
    local data="${3:-$WORK/$1}"
    mkdir -p "$data"
    local saved_kiln="$KILN"
    KILN="$REGISTRY_BIN"
    if [ "$REGISTRY_BIN" = "$saved_kiln" ]; then
        # `kiln registry` also serves /metrics and the probes, on a port of its own.
        KILN_EXPECT_LISTENERS=2 start_kiln "$1" "${REGISTRY_ARGS[@]}" --registry-addr 127.0.0.1:0 \
            --metrics-addr 127.0.0.1:0 --data-dir "$data"
    else
        start_kiln "$1" "${REGISTRY_ARGS[@]}" --registry-addr 127.0.0.1:0 --data-dir "$data"
    fi
    KILN="$saved_kiln"
    printf -v "$2" '%s' "$(listen_addr "$1" http registry)"
}
