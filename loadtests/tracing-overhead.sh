#!/usr/bin/env bash
# Tracing export off, on, and on with 10% head sampling, side by side on the registry's
# hottest path (manifest GETs): ROUNDS rounds, the three modes interleaved in each so that
# the shared machine's drift hits all of them alike. Prints every run, then per mode the
# best and the median req/s and process CPU per request, and their ratios to "off".
#
#   cargo build --release -p kiln-loadtests && loadtests/tracing-overhead.sh [ROUNDS] [SECONDS]
set -euo pipefail
rounds=${1:-5}
seconds=${2:-4}
bench=${REGISTRY_BENCH:-target/release/registry-bench}
runs=$(mktemp)
trap 'rm -f "$runs"' EXIT

for round in $(seq "$rounds"); do
  for mode in off on sampled; do
    case $mode in
      off) env=(); flags=() ;;
      on) env=(); flags=(--otlp) ;;
      sampled) env=(OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.1); flags=(--otlp) ;;
    esac
    report=$(env "${env[@]}" "$bench" --blob-mib 4 --repetitions 1 --seconds "$seconds" \
      --tags 100 --listings 10 --iperf-seconds 1 "${flags[@]}" 2>/dev/null)
    # The kiln row of the manifest-GET table: | kiln | req/s | p50 | p99 | CPU µs (…) | receiver µs |
    row=$(awk -F'|' '$2 ~ /^ kiln $/ && $4 ~ / ms $/ { print $3, $6, $7 }' <<<"$report" | tr -d 'µsA-Za-z()')
    read -r per_second cpu receiver <<<"$row"
    spans=$(sed -n 's/^tracing: export on (\([0-9]*\) spans received)/\1/p' <<<"$report")
    requests=$(sed -n 's/^kiln requests: at least \([0-9]*\).*/\1/p' <<<"$report")
    echo "round $round  $mode  $per_second req/s  $cpu µs CPU/request  (receiver $receiver µs)  spans ${spans:--} for ≥ $requests requests"
    echo "$mode $per_second $cpu $receiver" >>"$runs"
  done
done

echo
echo "| mode | best req/s | median req/s | best / off | median / off | median CPU µs/request (without the receiver) | CPU / off |"
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
