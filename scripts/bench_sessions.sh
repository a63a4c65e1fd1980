#!/usr/bin/env bash
# Session answers from the index built in the stream against the same
# answers computed from the raw events, on the same data, taking turns.
# One server (release build) is fed a day of generated events (20 per
# second of event time, 5,000 users: ~1.7M events) and stopped; a copy of
# its data dir is then served with the index off
# (TALLY__SESSIONS__INDEX=false), the original with it on, taking turns,
# and each time the same queries run REPS times each:
#   metric=sessions for the last hour (1m buckets) and for 24 hours (1h),
#   GET /api/v1/sessions for one hour (everyone) and for a day (one user),
#   and SELECT count(*) FROM sessions for one hour.
# Prints p50 / p99 per query and side, and the server's tally_session_answers_total.
#   TALLY=target/release/tally REPS=30 scripts/bench_sessions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TALLY="${TALLY:-target/release/tally}"
REPS="${REPS:-30}"
ROUNDS="${ROUNDS:-2}"
PORT="${PORT:-17171}"
DIR="$(mktemp -d)"
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$DIR"' EXIT
BASE="http://127.0.0.1:$PORT"

start() { # index: true|false, data dir
  TALLY__SESSIONS__INDEX="$1" "$TALLY" serve --listen "127.0.0.1:$PORT" --data-dir "$2" \
    >"$DIR/server.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 600); do
    curl -sf "$BASE/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "server did not get ready" >&2
  tail -20 "$DIR/server.log" >&2
  exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

now_ms=$(($(date +%s) * 1000))
day_ago=$((now_ms - 24 * 3600 * 1000))
hour_ago=$((now_ms - 3600 * 1000))
start true "$DIR/data"
echo "== feeding a day of events (gen --events-per-sec 20 --users 5000)"
"$TALLY" gen --url "$BASE" --start "$day_ago" --events-per-sec 20 --users 5000 \
  --events 1728000 --connections 4 --batch 5000 >"$DIR/gen.log" 2>&1
tail -1 "$DIR/gen.log"
# Wait until the raw events are all visible.
for _ in $(seq 1 600); do
  n=$(curl -s "$BASE/api/v1/query" -H 'content-type: application/json' \
    -d '{"sql":"SELECT count(*) FROM events"}' | sed -E 's/.*"rows":\[\[([0-9]+).*/\1/')
  [ "${last:-}" = "$n" ] && break
  last=$n
  sleep 1
done
echo "raw events: $n"
stop
cp -r "$DIR/data" "$DIR/data-raw"

# name, url (GET) or sql
QUERIES=(
  "metric=sessions 1h|$BASE/api/v1/metrics?metric=sessions&granularity=1m&start=$hour_ago&end=$now_ms"
  "metric=sessions 24h|$BASE/api/v1/metrics?metric=sessions&granularity=1h&start=$day_ago&end=$now_ms"
  "avg_session_duration 24h|$BASE/api/v1/metrics?metric=avg_session_duration&granularity=1h&start=$day_ago&end=$now_ms"
  "GET /sessions 1h|$BASE/api/v1/sessions?start=$hour_ago&end=$now_ms&limit=100000"
  "GET /sessions 1 user 24h|$BASE/api/v1/sessions?user_id=u_42&start=$day_ago&end=$now_ms"
  "SQL count sessions 1h|sql:SELECT count(*) FROM sessions WHERE start >= to_timestamp_millis($hour_ago)"
)

measure() { # side
  for q in "${QUERIES[@]}"; do
    local name="${q%%|*}" target="${q#*|}"
    for _ in $(seq 1 "$REPS"); do
      if [[ "$target" == sql:* ]]; then
        curl -s -o /dev/null -w '%{time_total}\n' "$BASE/api/v1/query" \
          -H 'content-type: application/json' -d "{\"sql\":\"${target#sql:}\"}"
      else
        curl -s -o /dev/null -w '%{time_total}\n' "$target"
      fi
    done | sort -n | awk -v side="$1" -v name="$name" '{v[NR] = $1 * 1000}
      END {printf "  %-6s %-26s p50 %8.2f ms   p99 %8.2f ms\n", side, name, v[int((NR + 1) / 2)], v[int(NR * 0.99 + 0.999)]}'
  done
  curl -s "$BASE/metrics" | grep '^tally_session_answers_total\|^tally_sessions_indexed' | sed 's/^/    /'
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  start false "$DIR/data-raw"
  measure raw
  stop
  start true "$DIR/data"
  measure index
  stop
done
