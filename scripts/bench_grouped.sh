#!/usr/bin/env bash
# Grouped metrics queries at rest over a day of 1-minute buckets: one
# server (release build) is fed a day of generated events (20 per second
# of event time, each with country, device and page, the default declared
# dimensions), then each query runs REPS times in turn.
# Prints p50 / p99 per query, each run over a new range (no cache hit),
# then the same query repeated (answered from the metrics cache). A query
# naming one or two dimensions reads totals each bucket builds when
# first asked: the first run of each such query is printed apart (it
# pays for that), and the server's RSS before and after.
#   TALLY=target/release/tally REPS=50 scripts/bench_grouped.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TALLY="${TALLY:-target/release/tally}"
REPS="${REPS:-50}"
PORT="${PORT:-17272}"
DIR="$(mktemp -d)"
trap 'kill "${PID:-0}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
BASE="http://127.0.0.1:$PORT"
"$TALLY" serve --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" >"$DIR/server.log" 2>&1 &
PID=$!
until curl -sf "$BASE/readyz" >/dev/null 2>&1; do sleep 0.1; done
now_ms=$(($(date +%s) * 1000))
day_ago=$((now_ms - 24 * 3600 * 1000))
echo "== feeding a day of events (gen --events-per-sec 20 --users 5000)"
"$TALLY" gen --url "$BASE" --start "$day_ago" --events-per-sec 20 --users 5000 \
  --events 1728000 --connections 4 --batch 5000 | tail -1
until curl -s "$BASE/api/v1/status" | grep -q '"behind_records":0'; do sleep 0.2; done
M="$BASE/api/v1/metrics?granularity=1m&start=$day_ago"
QUERIES=(
  "count, 1m, 24 h, no breakdown|$M&metric=count"
  "count by country|$M&metric=count&group_by=country"
  "count by event_type,country|$M&metric=count&group_by=event_type,country"
  "unique_users by country|$M&metric=unique_users&group_by=country"
  "p95 duration_ms by device|$M&metric=p95:duration_ms&group_by=device"
  "error rate by country|$M&metric=count&where=event_type:error&over=count&group_by=country"
  "count by country, window=5m|$M&metric=count&group_by=country&window=5m"
  "count by country,device|$M&metric=count&group_by=country,device"
  "count by country,device,page|$M&metric=count&group_by=country,device,page"
)
rss() { awk '/VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$PID/status"; }
echo "== server RSS after ingest: $(rss)"
for q in "${QUERIES[@]}"; do
  name="${q%%|*}" url="${q#*|}"
  curl -s -o /dev/null -w '%{time_total}\n' "$url&end=$((now_ms - 1000))" |
    awk -v name="$name" '{printf "  %-34s first run %8.2f ms\n", name, $1 * 1000}'
done
echo "== server RSS after the first runs: $(rss)"
for q in "${QUERIES[@]}"; do
  name="${q%%|*}" url="${q#*|}"
  # Each run ends a millisecond earlier: a new range, so the metrics
  # cache answers none of them (a repeated query is a cache hit).
  for i in $(seq 1 "$REPS"); do
    curl -s -o /dev/null -w '%{time_total}\n' "$url&end=$((now_ms - i))"
  done | sort -n | awk -v name="$name" '{v[NR] = $1 * 1000}
    END {printf "  %-34s p50 %8.2f ms   p99 %8.2f ms\n", name, v[int((NR + 1) / 2)], v[int(NR * 0.99 + 0.999)]}'
done
echo "== the same query repeated (metrics cache)"
q="${QUERIES[2]}"
for i in $(seq 1 "$REPS"); do
  curl -s -o /dev/null -w '%{time_total}\n' "${q#*|}&end=$now_ms"
done | sort -n | awk -v name="${q%%|*}" '{v[NR] = $1 * 1000}
  END {printf "  %-34s p50 %8.2f ms   p99 %8.2f ms\n", name, v[int((NR + 1) / 2)], v[int(NR * 0.99 + 0.999)]}'

