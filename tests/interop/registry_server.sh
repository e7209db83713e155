# Starting kiln's registry (`kiln registry`) for the registry interop scripts. Source it
# after lib.sh; do not run it.

# Builds kiln if needed and checks that it has the registry subcommand.
choose_registry_binary() {
    build_kiln
    "$KILN" registry --help >/dev/null 2>&1 || fail "$KILN has no registry subcommand"
}

# start_registry NAME VAR [DATA]: serves a registry with its data in DATA (default
# $WORK/NAME) on a free port and sets VAR to its host:port. Not run in a subshell, so its
# PID reaches the exit trap. With INTEROP_REPLICAS=3, three replicas behind HAProxy.
start_registry() {
    if [ "${INTEROP_REPLICAS:-1}" -gt 1 ]; then
        start_replicated_registry "$1" "$2"
        return
    fi
    local data="${3:-$WORK/$1}"
    mkdir -p "$data"
    # `kiln registry` also serves /metrics and the probes, on a port of its own.
    start_kiln "$1" registry --registry-addr 127.0.0.1:0 \
        --metrics-addr 127.0.0.1:0 --data-dir "$data"
    printf -v "$2" '%s' "$(listen_addr "$1" http registry)"
}

# registry_logs NAME : the log of registry NAME, or of each of its replicas.
registry_logs() {
    cat "$WORK/$1.log" "$WORK/$1"-[0-9]*.log 2>/dev/null || true
}
