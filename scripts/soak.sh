#!/usr/bin/env bash
# Soak: hold SESSIONS idle SMTP sessions open through mailguard while a steady stream of
# messages flows through it for DURATION seconds; report sessions held, messages/s, p99
# latency, the guard's RSS per held session, and the sink's --verify result (nothing lost,
# duplicated or corrupted).
#
#   scripts/soak.sh                       # 10,000 sessions, 200 msgs/s for 60 s
#   SESSIONS=2000 RATE=100 DURATION=30 scripts/soak.sh
#
# Loopback only, bounded in count and time. Not part of `cargo test`. Needs python3 and a
# Rust toolchain; raises `ulimit -n` itself (as root it can raise the hard limit too). Every
# process it starts is stopped by its PID on exit. Set CARGO_TARGET_DIR to reuse a build.
set -euo pipefail

SESSIONS=${SESSIONS:-10000}
RATE=${RATE:-200}
DURATION=${DURATION:-60}
THREADS=${THREADS:-2}
OUT=${OUT:-$(mktemp -d /tmp/mailguard-soak.XXXXXX)}
mkdir -p "$OUT"

cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if [ "$SESSIONS" -gt 50000 ] || [ "$DURATION" -gt 600 ]; then
    echo "soak: SESSIONS <= 50000 and DURATION <= 600, please" >&2
    exit 2
fi

# The guard holds two descriptors per session (client and upstream), the holder and the sink
# one each: the guard is the one that needs the most.
need=$((SESSIONS * 2 + 1024))
ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt "$need" ]; then
    echo "soak: ulimit -n is $(ulimit -n) (hard limit $(ulimit -Hn)), $need needed for" \
        "$SESSIONS sessions; raise the hard limit (needs CAP_SYS_RESOURCE) or use" \
        "SESSIONS=$((($(ulimit -Hn) - 1024) / 2))" >&2
    exit 1
fi

echo "soak: building (release)" >&2
cargo build --release -q -p mailguard -p loadgen
MG=$TARGET/release/mailguard
LG=$TARGET/release/loadgen

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
SINK_PORT=$(free_port)
GUARD_PORT=$(free_port)
MESSAGES=$((RATE * DURATION))

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }

"$LG" sink --listen "127.0.0.1:$SINK_PORT" --threads 1 --verify --expect "$MESSAGES" --json \
    --timeout $((DURATION * 4 + 600)) >"$OUT/sink.json" 2>"$OUT/sink.err" &
SINK=$!
PIDS+=("$SINK")
"$MG" --listen "127.0.0.1:$GUARD_PORT" --upstream "127.0.0.1:$SINK_PORT" --threads "$THREADS" \
    2>"$OUT/guard.err" &
GUARD=$!
PIDS+=("$GUARD")
for _ in $(seq 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$GUARD_PORT),1); socket.create_connection(('127.0.0.1',$SINK_PORT),1)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
sleep 0.5
RSS0=$(rss_kib "$GUARD")
echo "soak: guard pid $GUARD on $GUARD_PORT, sink on $SINK_PORT; RSS idle ${RSS0} KiB" >&2

echo "soak: opening $SESSIONS sessions" >&2
python3 scripts/hold_sessions.py --target "127.0.0.1:$GUARD_PORT" --sessions "$SESSIONS" \
    --stop-file "$OUT/stop" --status "$OUT/hold.json" --noop-every 30 \
    --max-seconds $((DURATION * 4 + 400)) >"$OUT/hold.out" 2>"$OUT/hold.err" &
HOLD=$!
PIDS+=("$HOLD")
for _ in $(seq 400); do
    if grep -q '"phase": "holding"' "$OUT/hold.json" 2>/dev/null; then break; fi
    if ! kill -0 "$HOLD" 2>/dev/null; then echo "soak: holder died: $(cat "$OUT/hold.err")" >&2; exit 1; fi
    sleep 0.5
done
sleep 1
RSS_HELD=$(rss_kib "$GUARD")
FDS_HELD=$(fds "$GUARD")
HELD=$(python3 -c "import json; print(json.load(open('$OUT/hold.json'))['held'])")
echo "soak: $HELD sessions held; guard RSS ${RSS_HELD} KiB, $FDS_HELD fds" >&2

# Peak RSS while the stream runs.
(
    peak=0
    while kill -0 "$GUARD" 2>/dev/null && [ ! -e "$OUT/stop" ]; do
        r=$(rss_kib "$GUARD" 2>/dev/null || echo 0)
        [ "$r" -gt "$peak" ] && peak=$r && echo "$peak" >"$OUT/peak_rss"
        sleep 0.5
    done
) &
PIDS+=("$!")

echo "soak: $MESSAGES messages at $RATE/s through the guard" >&2
"$LG" send --target "127.0.0.1:$GUARD_PORT" --messages "$MESSAGES" --rate "$RATE" \
    --sessions 50 --per-session 20 --size 2048 --json --timeout $((DURATION * 2 + 60)) \
    >"$OUT/send.json" 2>"$OUT/send.err" || true

touch "$OUT/stop"
for _ in $(seq 200); do
    if ! kill -0 "$HOLD" 2>/dev/null; then break; fi
    sleep 0.5
done
kill -TERM "$SINK" 2>/dev/null || true
for _ in $(seq 100); do
    if ! kill -0 "$SINK" 2>/dev/null; then break; fi
    sleep 0.1
done

python3 - "$OUT" "$RSS0" "$RSS_HELD" "$FDS_HELD" "$SESSIONS" "$RATE" "$DURATION" <<'EOF'
import json, sys
out, rss0, rss_held, fds_held, sessions, rate, duration = sys.argv[1:]
rss0, rss_held, fds_held = int(rss0), int(rss_held), int(fds_held)
hold = json.load(open(out + "/hold.json"))
send = json.loads(open(out + "/send.json").read().strip().splitlines()[-1])
sink_lines = [l for l in open(out + "/sink.json").read().splitlines() if l.startswith("{")]
sink = json.loads(sink_lines[-1])
try:
    peak = int(open(out + "/peak_rss").read())
except OSError:
    peak = rss_held
held = hold["held"]
lat = send["latency"]
per = (rss_held - rss0) / held if held else float("nan")
print(f"soak: {sessions} sessions requested, {held} held, {hold.get('alive_at_end')} answered NOOP at the end "
      f"(held {hold.get('held_seconds')} s; errors {hold.get('errors')})")
print(f"soak: stream {send['acknowledged']}/{send['attempted']} acknowledged, {send['failed']} failed, "
      f"{send['messages_per_s']:.1f} msgs/s (target {rate}/s for {duration} s)")
print(f"soak: latency MAIL->final p50 {lat['mail_to_final']['p50_us']/1000:.2f} ms, "
      f"p99 {lat['mail_to_final']['p99_us']/1000:.2f} ms, max {lat['mail_to_final']['max_us']/1000:.2f} ms"
      + (f"; intended->final p99 {lat['intended_to_final']['p99_us']/1000:.2f} ms" if lat.get('intended_to_final') else ""))
print(f"soak: guard RSS idle {rss0} KiB, with {held} sessions {rss_held} KiB "
      f"({per:.1f} KiB/session), peak {peak} KiB; {fds_held} fds")
print(f"soak: sink verify: {sink.get('distinct')} distinct of {sink.get('expected')} expected, "
      f"lost {sink.get('lost')}, duplicated {sink.get('duplicated')}, corrupted {sink.get('corrupted')}, "
      f"foreign {sink.get('foreign')}")
ok = (held == int(sessions) and hold.get("alive_at_end") == held
      and send["acknowledged"] == send["attempted"] and sink.get("lost") == 0
      and sink.get("duplicated") == 0 and sink.get("corrupted") == 0)
print("soak: " + ("PASS" if ok else "FAIL") + f" (files in {out})")
sys.exit(0 if ok else 1)
EOF
