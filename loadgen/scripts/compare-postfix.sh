#!/usr/bin/env bash
# compare-postfix.sh - loadgen send -> loadgen sink against Postfix's smtp-source -> smtp-sink,
# same workloads, interleaved in one run, on loopback.
#
#   bash loadgen/scripts/compare-postfix.sh            # needs: apt-get install postfix
#
# Workloads (Postfix flags | loadgen flags), 1 KiB bodies, one recipient, lock-step (no
# pipelining: smtp-source cannot pipeline):
#   W1  smtp-source -s 10 -l 1024        | loadgen send --sessions 10 --size 1024
#   W5  smtp-source -s 10 -d -l 1024     | loadgen send --sessions 10 --size 1024 --per-session <all>
# Each repetition runs every (workload, tool) pair once, order rotated per repetition, each
# after waiting (at most QUIET_MAX s) for the machine to be quiet (other jobs share the box).
# As in shared/bench/compare.sh, the source is pinned to CPU $PIN_SOURCE and the sink to
# $PIN_SINK (empty = unpinned). Prints one line per run and the medians.
#
# Environment: LOADGEN [target/release/loadgen next to this checkout, else on PATH]
#   REPS [3]  W1_MSGS [20000]  W5_MSGS [80000]  PORT [30611]  PIN_SOURCE [0]  PIN_SINK [1]
#   QUIET_PCT [10] QUIET_MAX [30]  RUN_TIMEOUT [120]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
LOADGEN=${LOADGEN:-}
if [[ -z $LOADGEN ]]; then
  for c in "$here/../../target/release/loadgen" "${CARGO_TARGET_DIR:-/nonexistent}/release/loadgen"; do
    [[ -x $c ]] && LOADGEN=$c && break
  done
  LOADGEN=${LOADGEN:-loadgen}
fi
REPS=${REPS:-3} W1_MSGS=${W1_MSGS:-20000} W5_MSGS=${W5_MSGS:-80000} PORT=${PORT:-30611}
PIN_SOURCE=${PIN_SOURCE-0} PIN_SINK=${PIN_SINK-1}
QUIET_PCT=${QUIET_PCT:-10} QUIET_MAX=${QUIET_MAX:-30} RUN_TIMEOUT=${RUN_TIMEOUT:-120}
SRC=/usr/sbin/smtp-source SNK=/usr/sbin/smtp-sink
[[ -x $SRC && -x $SNK ]] || { echo "compare-postfix.sh: smtp-source/smtp-sink not found (apt-get install postfix)" >&2; exit 1; }
command -v "$LOADGEN" >/dev/null || { echo "compare-postfix.sh: loadgen not found (cargo build --release -p loadgen, or set LOADGEN)" >&2; exit 1; }
CLK_TCK=$(getconf CLK_TCK) NCPU=$(nproc)
WORK=$(mktemp -d /tmp/compare-postfix.XXXXXX)
SINK_PID=
cleanup() { [[ -n $SINK_PID ]] && kill -TERM "$SINK_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

pin() { local c=$1; shift; if [[ -n $c ]]; then exec taskset -c "$c" "$@"; else exec "$@"; fi; }
listening() { ss -Hltn "sport = :$PORT" | grep -q .; }
busy() { local _ u n s i w q sq st; read -r _ u n s i w q sq st _ </proc/stat; echo $((u + n + s + q + sq + st)); }
wait_quiet() {
  local t=$SECONDS a b
  while :; do
    a=$(busy); sleep 0.5; b=$(busy)
    (( (b - a) * 100 * 2 / (CLK_TCK * NCPU) < QUIET_PCT || SECONDS - t >= QUIET_MAX )) && break
  done
}
ticks() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }; s=${s##*) }; read -r -a a <<<"$s"; echo $((a[11] + a[12])); }

# run TOOL WORKLOAD MSGS -> prints "msgs_per_s src_cpu_us sink_cpu_us delivered"
run() {
  local tool=$1 w=$2 m=$3 d=() lflags=()
  [[ $w == W5 ]] && d=(-d) && lflags=(--per-session "$m")
  if [[ $tool == postfix ]]; then
    pin "$PIN_SINK" "$SNK" -u nobody -c -m 1000 "127.0.0.1:$PORT" 4096 >"$WORK/sink.out" 2>&1 &
  else
    pin "$PIN_SINK" "$LOADGEN" sink --listen "127.0.0.1:$PORT" --json >"$WORK/sink.out" 2>/dev/null &
  fi
  until listening; do sleep 0.05; done
  # The listener's own PID (taskset and smtp-sink's privilege switch may add a process).
  SINK_PID=$(ss -Hltnp "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
  local s0 t0 t1 s1 src
  s0=$(ticks "$SINK_PID"); t0=$EPOCHREALTIME
  if [[ $tool == postfix ]]; then
    src=$( { /usr/bin/time -f "%U %S" timeout "$RUN_TIMEOUT" taskset -c "${PIN_SOURCE:-0-$((NCPU-1))}" \
      "$SRC" -s 10 "${d[@]}" -l 1024 -m "$m" -M bench.example -f a@bench.example -t b@bench.example \
      "127.0.0.1:$PORT" >/dev/null; } 2>&1 | tail -n 1)
  else
    src=$( { /usr/bin/time -f "%U %S" timeout "$RUN_TIMEOUT" taskset -c "${PIN_SOURCE:-0-$((NCPU-1))}" \
      "$LOADGEN" send --target "127.0.0.1:$PORT" --sessions 10 --size 1024 --messages "$m" "${lflags[@]}" \
      --json >/dev/null; } 2>&1 | tail -n 1)
  fi
  t1=$EPOCHREALTIME
  s1=$(ticks "$SINK_PID")
  [[ $tool == postfix ]] && sleep 0.3   # smtp-sink's counter output lags
  kill -TERM "$SINK_PID"; wait 2>/dev/null || true; SINK_PID=
  while listening; do sleep 0.05; done
  local delivered
  if [[ $tool == postfix ]]; then
    delivered=$(tr '\r' '\n' <"$WORK/sink.out" | grep -ao 'mesg=[0-9]*' | tail -n 1 | cut -d= -f2)
  else
    delivered=$(grep -o '"messages":[0-9]*' "$WORK/sink.out" | cut -d: -f2)
  fi
  awk -v m="$m" -v a="$t0" -v b="$t1" -v src="$src" -v s0="$s0" -v s1="$s1" -v hz="$CLK_TCK" -v del="${delivered:-0}" \
    'BEGIN { split(src, c, " "); printf "%.1f %.1f %.1f %d\n", m / (b - a), (c[1] + c[2]) * 1e6 / m, (s1 - s0) / hz * 1e6 / m, del }'
}

echo "# compare-postfix: loadgen=$LOADGEN pins source=${PIN_SOURCE:-none} sink=${PIN_SINK:-none} reps=$REPS"
echo "# W1: smtp-source -s 10 -l 1024 -m $W1_MSGS  vs  loadgen send --sessions 10 --size 1024 --messages $W1_MSGS"
echo "# W5: smtp-source -s 10 -d -l 1024 -m $W5_MSGS  vs  loadgen send --sessions 10 --size 1024 --messages $W5_MSGS --per-session $W5_MSGS"
declare -A RES=()
pairs=("W1 postfix" "W1 loadgen" "W5 postfix" "W5 loadgen")
for (( r = 0; r < REPS; r++ )); do
  for (( k = 0; k < ${#pairs[@]}; k++ )); do
    read -r w tool <<<"${pairs[(k + r) % ${#pairs[@]}]}"
    m=$W1_MSGS; [[ $w == W5 ]] && m=$W5_MSGS
    wait_quiet
    out=$(run "$tool" "$w" "$m")
    read -r rate scpu kcpu del <<<"$out"
    ok=ok; (( del == m )) || ok="FAIL(delivered $del)"
    printf "RUN %s %-8s rep=%d msgs=%d msgs_per_s=%s src_cpu_us=%s sink_cpu_us=%s %s\n" "$w" "$tool" "$r" "$m" "$rate" "$scpu" "$kcpu" "$ok"
    RES["$w $tool"]+="$rate $scpu $kcpu;"
  done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
printf "%-4s %-8s %12s %12s %12s\n" wl tool "msgs/s" "src_cpu_us" "sink_cpu_us"
for p in "${pairs[@]}"; do
  IFS=';' read -r -a runs <<<"${RES[$p]}"
  col() { for x in "${runs[@]}"; do [[ -n $x ]] && { read -r -a f <<<"$x"; echo "${f[$1]}"; }; done | median; }
  printf "%-4s %-8s %12s %12s %12s\n" $p "$(col 0)" "$(col 1)" "$(col 2)"
done
