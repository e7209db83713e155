#!/usr/bin/env bash
# CPU per exported span, kiln's request span against the OpenTelemetry SDK's own (the
# floor), ROUNDS rounds with the kinds interleaved so that the shared machine's drift hits
# all of them alike. Prints every run, then per kind the median CPU per span, less the
# export-off run's (the simulated request's own cost), for the request kinds.
#
#   cargo build --release -p kiln-loadtests && loadtests/span-cost.sh [ROUNDS] [SPANS]
set -euo pipefail
rounds=${1:-5}
spans=${2:-200000}
bench=${SPAN_COST:-target/release/span-cost}
kinds=(off request tracing sdk-attributes sdk-bare)
runs=$(mktemp)
trap 'rm -f "$runs"' EXIT

for round in $(seq "$rounds"); do
  for kind in "${kinds[@]}"; do
    report=$("$bench" --kind "$kind" --spans "$spans" 2>/dev/null)
    # | kind | spans | seconds | on the request path | in all | receiver |
    row=$(awk -F'|' -v kind="$kind" '$2 ~ "^ " kind " $" { print $5, $6, $7 }' <<<"$report")
    read -r on_path in_all receiver <<<"$row"
    received=$(sed -n 's/^tracing: export on (\([0-9]*\) spans received)/\1/p' <<<"$report")
    echo "round $round  $kind  $on_path ns on the request path  $in_all ns in all  (receiver $receiver ns)  spans received ${received:--}"
    if [[ $kind != off && $received != "$spans" ]]; then
      echo "span-cost: $kind made $spans spans but the receiver got ${received:-none}" >&2
      exit 1
    fi
    echo "$kind $on_path $in_all" >>"$runs"
  done
done

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
off_path=$(awk '$1 == "off" { print $2 }' "$runs" | median)
off_all=$(awk '$1 == "off" { print $3 }' "$runs" | median)
echo
echo "| kind | median ns CPU per span, on the request path | in all (batch thread and gRPC client included, receiver not) |"
echo "|---|---|---|"
for kind in "${kinds[@]}"; do
  path=$(awk -v k="$kind" '$1 == k { print $2 }' "$runs" | median)
  all=$(awk -v k="$kind" '$1 == k { print $3 }' "$runs" | median)
  case $kind in
    off) echo "| off (the simulated request alone) | $path | $all |" ;;
    request) echo "| request, less the simulated request | $((path - off_path)) | $((all - off_all)) |" ;;
    *) echo "| $kind | $path | $all |" ;;
  esac
done
