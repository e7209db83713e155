#!/usr/bin/env bash
# Tracing export off, on, and on with 10% head sampling, side by side: on the registry's
# hottest path (manifest GETs, `registry`) or on remote execution of no-op actions
# (`exec`). ROUNDS rounds, the three modes interleaved in each so that the shared
# machine's drift hits all of them alike. Prints every run, then per mode the best and the
# median throughput and process CPU per request or action (the span receiver's, a stand-in
# for a collector elsewhere, not counted), and their ratios to "off".
#
#   cargo build --release -p kiln-loadtests && loadtests/tracing-overhead.sh registry|exec [ROUNDS] [SECONDS]
set -euo pipefail
bench_kind=${1:?usage: tracing-overhead.sh registry|exec [ROUNDS] [SECONDS]}
rounds=${2:-5}
seconds=${3:-4}
registry_bench=${REGISTRY_BENCH:-target/release/registry-bench}
exec_bench=${EXEC_BENCH:-target/release/exec-bench}
runs=$(mktemp)
trap 'rm -f "$runs"' EXIT

# One run with the mode's environment (`env`) and flags: prints "per_second
# cpu_per_operation receiver_cpu_per_operation spans operations".
run_once() {
  local report
  case $bench_kind in
    registry)
      report=$(env "${env[@]}" "$registry_bench" --blob-mib 4 --repetitions 1 --seconds "$seconds" \
        --tags 100 --listings 10 --iperf-seconds 1 "$@" 2>/dev/null)
      # The kiln row of the manifest-GET table, the first with latencies in ms:
      # | kiln | req/s | p50 | p99 | CPU µs (…) | receiver µs |
      local row
      row=$(awk -F'|' '$2 ~ /^ kiln $/ && $4 ~ / ms $/ { print $3, $6, $7; exit }' <<<"$report" | tr -d 'µsA-Za-z()')
      local requests
      requests=$(sed -n 's/^kiln requests: at least \([0-9]*\).*/\1/p' <<<"$report")
      echo "$row $(spans_of "$report") $requests"
      ;;
    exec)
      # About as many actions as `seconds` of a quiet machine's throughput.
      report=$(env "${env[@]}" "$exec_bench" --actions $((seconds * 1500)) --concurrency 16 --small 1 "$@" 2>/dev/null)
      # The row under the no-op table's header:
      # | actions | seconds | actions/s | … | kiln CPU per action (receiver not counted) |
      local actions per_second cpu
      read -r actions per_second cpu < <(awk -F'|' 'previous ~ /^\|---/ && header ~ /actions\/s/ { print $2, $4, $9; exit } { header = previous; previous = $0 }' <<<"$report" | tr -d 'µs')
      echo "$per_second $cpu 0 $(spans_of "$report") $actions"
      ;;
    *) echo "tracing-overhead.sh: registry or exec, not $bench_kind" >&2; exit 2 ;;
  esac
}

spans_of() { sed -n 's/^tracing: export on (\([0-9]*\) spans received)/\1/p' <<<"$1" | grep . || echo -; }

for round in $(seq "$rounds"); do
  for mode in off on sampled; do
    case $mode in
      off) env=(); flags=() ;;
      on) env=(); flags=(--otlp) ;;
      sampled) env=(OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.1); flags=(--otlp) ;;
    esac
    read -r per_second cpu receiver spans operations < <(run_once "${flags[@]}")
    echo "round $round  $mode  $per_second per second  $cpu µs CPU each  (receiver $receiver µs)  spans $spans for ≥ $operations operations"
    echo "$mode $per_second $cpu $receiver" >>"$runs"
  done
done

echo
echo "| mode | best per second | median per second | best / off | median / off | median CPU µs each (without the receiver) | CPU / off |"
echo "|---|---|---|---|---|---|---|"
for mode in off on sampled; do
  awk -v mode="$mode" '$1 == mode { print $2, $3 - $4 }' "$runs"
done | awk -v rounds="$rounds" '
  { mode = int((NR - 1) / rounds); rate[mode, (NR - 1) % rounds] = $1; cpu[mode, (NR - 1) % rounds] = $2 }
  function median(a, m,    i, j, t, v) {
    for (i = 0; i < rounds; i++) v[i] = a[m, i]
    for (i = 0; i < rounds; i++) for (j = i + 1; j < rounds; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return rounds % 2 ? v[int(rounds / 2)] : (v[rounds / 2 - 1] + v[rounds / 2]) / 2
  }
  function best(a, m,    i, b) { b = 0; for (i = 0; i < rounds; i++) if (a[m, i] > b) b = a[m, i]; return b }
  END {
    split("off on sampled-10%", names, " ")
    for (m = 0; m < 3; m++) {
      printf "| %s | %.0f | %.0f | %.2f | %.2f | %.1f | %.2f |\n", names[m + 1], best(rate, m), median(rate, m),
        best(rate, m) / best(rate, 0), median(rate, m) / median(rate, 0), median(cpu, m), median(cpu, m) / median(cpu, 0)
    }
  }'
