#!/usr/bin/env bash
# Builds every fuzz target and runs each briefly on its seed corpus: a CI smoke test that
# the targets still build and that no seed (or quick mutation of one) crashes. Exits
# non-zero on the first crash; the reproducer is left in fuzz/artifacts/<target>/.
#
#   fuzz/run-briefly.sh [seconds per target, default 20]
#
# One fuzz process at a time, niced: CI machines are small and shared. The per-input
# timeout is generous: a slow input is a finding only past 60 s.
set -euo pipefail

seconds="${1:-20}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
# Off the root workspace's target dir: sanitizer builds would invalidate its cache.
target_dir="${CARGO_TARGET_DIR:-$here/target}"

# What it needs, installed only when missing.
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

nice -n 19 cargo +nightly fuzz build --fuzz-dir "$here" -a --target-dir "$target_dir"

failed=()
for target in $(cargo +nightly fuzz list --fuzz-dir "$here"); do
    corpus="$here/corpus/$target"
    mkdir -p "$corpus"
    # A scratch corpus (what is found here is not meant for the repository) and working
    # directory: with -jobs, libFuzzer writes its log to fuzz-0.log there.
    scratch="$(mktemp -d)"
    mkdir "$scratch/corpus"
    echo "== $target (${seconds}s)"
    status=0
    (cd "$scratch" && nice -n 19 cargo +nightly fuzz run --fuzz-dir "$here" -a \
        --target-dir "$target_dir" "$target" "$scratch/corpus" "$corpus" -- \
        -max_total_time="$seconds" -jobs=1 -workers=1 \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=60 -print_final_stats=1 \
        >/dev/null 2>&1) || status=$?
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        tail -n 40 "$scratch"/fuzz-0.log 2>/dev/null || true
    else
        grep -aE '^(#[0-9]+.*DONE|Done )' "$scratch"/fuzz-0.log 2>/dev/null || true
    fi
    rm -rf "$scratch"
done

if ((${#failed[@]})); then
    echo "fuzz: crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: every target ran ${seconds}s without a crash"
