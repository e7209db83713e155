#!/usr/bin/env bash
# One `kiln run` whose action turns a SIZE_MIB random input into an output of the same
# size, end to end (hash and upload the input, execute, download the output), against `cp`
# of the same file (then `sync` of the copy) on the same disk, in the same run. Starts its
# own `kiln up` (coordinator, registry, local workers, embedded storage) on loopback ports
# with its data under DIR, runs the action twice (executed, then a cache hit that only
# downloads), checks every downloaded output byte for byte, and prints a Markdown table.
#
#   cargo build --release -p kiln && loadtests/run-large-output.sh [DIR]
#
#   DIR          parent of the temporary directory (kiln's data, the input, the copies);
#                default $BENCH_DIR, else /var/tmp (the real disk; /dev/shm for tmpfs)
#   KILN         the kiln binary (default target/release/kiln of this repository)
#   SIZE_MIB     the input's and the output's size (default 1024)
#   OUTPUT_MODE  distinct (default): the action copies the input and changes its first
#                byte, so the output is a blob of its own that the worker must upload;
#                copy: a plain `cp`, whose output has the input's digest, so the worker
#                finds it already stored and uploads nothing
#   RUN_TIMEOUT  seconds each `kiln run` may take (default 1800)
#   KEEP=1       keep the temporary directory (logs, event trace) and print its path
#
# The phases of the first run are read off timestamps: the digest cache's mtime (hashing
# done), the coordinator's "assigned" debug line, the action's own `date` before and
# after its copy, and a poller (every 10 ms) that sees the CAS's temporary files, the
# input appearing in the worker's action directory and the client's `.kiln-download-*`
# file. A phase whose marker was not seen is n/a.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kiln=${KILN:-$repo/target/release/kiln}
parent=${1:-${BENCH_DIR:-/var/tmp}}
size_mib=${SIZE_MIB:-1024}
mode=${OUTPUT_MODE:-distinct}
run_timeout=${RUN_TIMEOUT:-1800}
size=$((size_mib * 1024 * 1024))

[ -x "$kiln" ] || { echo "run-large-output.sh: no kiln binary at $kiln (cargo build --release -p kiln)" >&2; exit 2; }
[ -d "$parent" ] || { echo "run-large-output.sh: $parent is not a directory" >&2; exit 2; }
case $mode in distinct | copy) ;; *) echo "run-large-output.sh: OUTPUT_MODE is distinct or copy, not $mode" >&2; exit 2 ;; esac
[ "$size_mib" -ge 1 ] || { echo "run-large-output.sh: SIZE_MIB must be at least 1" >&2; exit 2; }

dir=$(mktemp -d "$parent/kiln-large-output.XXXXXX")
up_pid=""
poller_pid=""
cleanup() {
  local status=$?
  if [ -n "$poller_pid" ]; then kill "$poller_pid" 2>/dev/null || true; wait "$poller_pid" 2>/dev/null || true; fi
  if [ -n "$up_pid" ]; then
    # SIGTERM, then SIGKILL after 30 s should `kiln up` not exit (its local workers drain
    # within worker.drain_timeout_secs, 30 s, before the coordinator stops).
    kill "$up_pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$up_pid" 2>/dev/null; then
      echo "run-large-output.sh: kiln up ($up_pid) still running 30 s after SIGTERM; killing it" >&2
      kill -KILL "$up_pid" 2>/dev/null || true
    fi
    wait "$up_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ]; then
    for f in "$dir"/up.log "$dir"/run*.err; do
      [ -s "$f" ] && { echo "--- last lines of $f" >&2; tail -n 20 "$f" >&2; }
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi
  exit "$status"
}
trap cleanup EXIT
say() { printf '== %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

project=$dir/project
data=$dir/data
mkdir -p "$project" "$dir/ref"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# The input, before anything is timed. Its first byte is fixed so that the distinct
# output (first byte K) always differs from it; its mtime is set a minute back so that the
# digest cache (which distrusts files changed within 2 s of hashing) keeps its digest and
# the second run does not hash it again.
say "writing a $size_mib MiB random input under $dir"
{ printf I; head -c $((size - 1)) /dev/urandom; } >"$project/input.bin"
touch -d "@$(($(date +%s) - 60))" "$project/input.bin"
sync "$project/input.bin"
case $mode in
  copy) action='date +%s.%N; cp input.bin out.bin; date +%s.%N' ;;
  distinct) action='date +%s.%N; cp input.bin out.bin && printf K | dd of=out.bin bs=1 count=1 conv=notrunc status=none; date +%s.%N' ;;
esac
check_output() {
  local out=$project/out.bin
  [ -f "$out" ] || fail "$1: out.bin was not downloaded"
  [ "$(stat -c %s "$out")" -eq "$size" ] || fail "$1: out.bin holds $(stat -c %s "$out") bytes, not $size"
  case $mode in
    copy) cmp -s "$project/input.bin" "$out" || fail "$1: out.bin differs from input.bin" ;;
    distinct)
      [ "$(head -c 1 "$out")" = K ] || fail "$1: out.bin does not start with K"
      cmp -s -i 1 "$project/input.bin" "$out" || fail "$1: out.bin differs from input.bin past its first byte"
      ;;
  esac
}

# The reference: cp of the same file on the same disk, then sync of the copy.
say "reference: cp + sync"
t0=$EPOCHREALTIME
cp "$project/input.bin" "$dir/ref/copy.bin"
t1=$EPOCHREALTIME
sync "$dir/ref/copy.bin"
t2=$EPOCHREALTIME
cmp -s "$project/input.bin" "$dir/ref/copy.bin" || fail "the reference copy differs"
cp_seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
cp_sync_seconds=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.3f", b - a }')
rm -f "$dir/ref/copy.bin"

# kiln up, on free loopback ports; the dispatcher's debug line dates the assignment.
say "starting kiln up (data in $data)"
KILN_LOG=info,kiln_coordinator::execution::dispatcher=debug "$kiln" up --data-dir "$data" \
  --grpc-addr 127.0.0.1:0 --registry-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --ready-file "$dir/ready.json" >"$dir/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 300); do
  [ -s "$dir/ready.json" ] && break
  kill -0 "$up_pid" 2>/dev/null || fail "kiln up exited during start-up"
  sleep 0.1
done
[ -s "$dir/ready.json" ] || fail "kiln up did not write its ready file within 30 s"
addr=$(grep -o '"grpc":"[^"]*"' "$dir/ready.json" | cut -d'"' -f4)
[ -n "$addr" ] || fail "no grpc address in $dir/ready.json"
# Local workers register right after the listeners are up.
for _ in $(seq 100); do
  grep -q 'registered with the coordinator' "$dir/up.log" && break
  sleep 0.1
done

# The poller: one line "EPOCH NAME appear|gone" whenever a glob starts or stops matching.
declare -A globs=(
  [cas_tmp]="$data/cas/tmp/*"
  [cas_uploads]="$data/cas/uploads/*"
  [action_input]="$data/workers/*/actions/*/input.bin"
  [download]="$project/.kiln-download-*"
)
poll_events() {
  local -A seen=()
  local name now present
  mkfifo "$dir/tick"
  exec 9<>"$dir/tick"
  while :; do
    now=$EPOCHREALTIME
    for name in "${!globs[@]}"; do
      present=0
      compgen -G "${globs[$name]}" >/dev/null && present=1
      if [ "$present" != "${seen[$name]:-0}" ]; then
        seen[$name]=$present
        if [ "$present" = 1 ]; then echo "$now $name appear"; else echo "$now $name gone"; fi
      fi
    done
    read -r -t 0.01 -u 9 || true
  done
}
poll_events >"$dir/events" &
poller_pid=$!

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$up_pid/stat"; }
clk_tck=$(getconf CLK_TCK)

# run NAME : one `kiln run` in the project; sets START, END, CLIENT (maxrss KiB, user,
# sys) and UP_CPU (kiln up's CPU seconds during it).
run() {
  local name=$1 before after timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -f '%e %M %U %S' -o "$dir/$name.time")
  rm -f "$project/out.bin"
  before=$(cpu_ticks)
  START=$EPOCHREALTIME
  if ! (cd "$project" && "${timer[@]}" timeout "$run_timeout" \
    "$kiln" run --coordinator "grpc://$addr" --output out.bin -- sh -c "$action") \
    >"$dir/$name.out" 2>"$dir/$name.err"; then
    fail "$name: kiln run failed (its log and kiln up's follow)"
  fi
  END=$EPOCHREALTIME
  after=$(cpu_ticks)
  UP_CPU=$(awk -v a="$before" -v b="$after" -v t="$clk_tck" 'BEGIN { printf "%.1f", (b - a) / t }')
  CLIENT="n/a n/a n/a"
  [ -s "$dir/$name.time" ] && CLIENT=$(tail -n 1 "$dir/$name.time" | awk '{ print $2, $3, $4 }')
  check_output "$name"
}

say "first run (executes)"
run run1
grep -q 'executed, exit code 0' "$dir/run1.err" || fail "run1 was not executed: $(grep '^kiln:' "$dir/run1.err")"
r1_start=$START r1_end=$END r1_client=$CLIENT r1_up_cpu=$UP_CPU
up_hwm_1=$(awk '/^VmHWM/ { print $2 }' "/proc/$up_pid/status")
sleep 0.5 # the poller's last events
mapfile -t stamps < <(grep -E '^[0-9]+\.[0-9]+$' "$dir/run1.out")
[ "${#stamps[@]}" -ge 2 ] || fail "the action did not print its two timestamps"
cmd_start=${stamps[0]} cmd_end=${stamps[1]}
hashed=$(stat -c '%.9Y' "$project/.kiln/digest-cache" 2>/dev/null || echo "")
assigned=$(grep -m1 ' assigned operation=' "$dir/up.log" | cut -d' ' -f1 || true)
[ -n "$assigned" ] && assigned=$(date -d "$assigned" +%s.%N)
# first EVENTS AFTER : when one of the globs EVENTS (a regex of their names) first
# started matching at or after AFTER.
first() {
  [ -n "$2" ] || return 0
  awk -v n="^($1)\$" -v t="$2" '$2 ~ n && $3 == "appear" && $1 >= t { print $1; exit }' "$dir/events"
}
staged=$(first action_input "$assigned")
# A ByteStream upload (the output) lands in cas/uploads; the small blobs (stdout, the
# ActionResult) in batches through cas/tmp.
output_upload=$(first cas_uploads "$cmd_end")
download1=$(first download "$cmd_end")

say "second run (a cache hit: the output is only downloaded)"
run run2
grep -q 'cache hit, exit code 0' "$dir/run2.err" || fail "run2 was not a cache hit: $(grep '^kiln:' "$dir/run2.err")"
r2_start=$START r2_end=$END r2_client=$CLIENT r2_up_cpu=$UP_CPU
sleep 0.5
download2=$(first download "$r2_start")
up_hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$up_pid/status")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
rehashed2=$(grep -o 'rehashed=[0-9]*' "$dir/run2.err" | head -n 1)

# row LABEL FROM TO MOVES : a table row for the span FROM..TO; MOVES=1 when the whole
# file goes through that phase (then MB/s means something).
row() {
  awk -v label="$1" -v a="$2" -v b="$3" -v moves="$4" -v size="$size" -v cp="$cp_sync_seconds" 'BEGIN {
    if (a == "" || b == "") { printf "| %s | n/a | | |\n", label; exit }
    s = b - a
    rate = (moves == 1 && s > 0) ? sprintf("%.0f", size / 1e6 / s) : "—"
    printf "| %s | %.2f | %s | %.2f× |\n", label, s, rate, s / cp
  }'
}

fstype=$(df -T "$data" | awk 'NR == 2 { print $2 " (" $1 ")" }')
echo
echo "## kiln run, one ${size_mib} MiB output end to end ($mode output)"
echo
echo "- command: \`KILN=$kiln SIZE_MIB=$size_mib OUTPUT_MODE=$mode $0${*:+ $*}\`"
echo "- date: $(date -u)"
echo "- machine: $(nproc) cores, $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, load average $load_before before, $load_after after"
echo "- data directory: $dir, filesystem $fstype"
echo "- action: \`sh -c '$action'\`, on one of $(grep -c 'registered with the coordinator' "$dir/up.log") local workers"
echo "- MB/s is $size_mib MiB (= $size bytes) / 10⁶ / seconds; \"vs cp\" divides by cp + sync"
echo
echo "| measure | seconds | MB/s | vs cp |"
echo "|---|---|---|---|"
row "cp input.bin copy.bin (reference, no sync)" "$t0" "$t1" 1
row "cp + sync copy.bin (reference)" "$t0" "$t2" 1
row "**kiln run, executed: end to end**" "$r1_start" "$r1_end" 1
row "↳ client: hash the input" "$r1_start" "$hashed" 1
row "↳ client: upload the input, Execute, until assigned" "$hashed" "$assigned" 1
row "↳ worker: fetch the input into its cache" "$assigned" "$staged" 1
row "↳ worker: copy it into the action directory" "$staged" "$cmd_start" 1
row "↳ action: its cp (no sync)" "$cmd_start" "$cmd_end" 1
if [ -n "$output_upload" ] && [ -n "$download1" ] && awk -v a="$output_upload" -v b="$download1" 'BEGIN { exit !(a < b) }'; then
  row "↳ worker: hash the output" "$cmd_end" "$output_upload" 1
  row "↳ worker: upload the output, report the result" "$output_upload" "$download1" 1
else
  row "↳ worker: hash the output, report (no upload seen)" "$cmd_end" "$download1" 1
fi
row "↳ client: download the output" "$download1" "$r1_end" 1
row "**kiln run, cache hit: end to end**" "$r2_start" "$r2_end" 1
row "↳ client: digest cache, Execute, cache hit" "$r2_start" "$download2" 0
row "↳ client: download the output" "$download2" "$r2_end" 1
echo
echo "| process | peak RSS | CPU seconds |"
echo "|---|---|---|"
read -r m u s <<<"$r1_client"
echo "| kiln run, executed | $(awk -v k="$m" 'BEGIN { print (k == "n/a") ? k : sprintf("%.0f MiB", k / 1024) }') | $u user + $s sys |"
read -r m u s <<<"$r2_client"
echo "| kiln run, cache hit | $(awk -v k="$m" 'BEGIN { print (k == "n/a") ? k : sprintf("%.0f MiB", k / 1024) }') | $u user + $s sys |"
echo "| kiln up (VmHWM after run 1 / at the end; CPU during run 1 / run 2) | $((up_hwm_1 / 1024)) / $((up_hwm / 1024)) MiB | $r1_up_cpu / $r2_up_cpu |"
echo
echo "Second run: $(grep '^kiln:' "$dir/run2.err" | sed 's/^kiln: //'), ${rehashed2:-rehashed=?} (input digest from .kiln/digest-cache)."
