#!/usr/bin/env bash
# Uncached latency of metrics queries over 24 hours of 1-minute buckets,
# with the default dimensions (country, device, page): ungrouped, grouped
# by a dimension, distinct users by a dimension, and a filtered breakdown.
#
# Usage: scripts/bench_grouped_query.sh [path/to/tally] [queries per kind]
# (build first: cargo build --release -p tally-cli). Every query moves
# `end` by 1 ms, so none is answered from the metrics cache.
set -euo pipefail
BIN="${1:-target/release/tally}"
N="${2:-200}"
PORT="${PORT:-7391}"
DIR="$(mktemp -d)"
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DIR"' EXIT
"$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" >"$DIR/server.log" 2>&1 &
PID=$!
sleep 2
NOW=$(date +%s%3N)
START=$(( (NOW - 86400000) / 3600000 * 3600000 ))
END=$(( START + 86400000 ))
# ~1.7M events over the day: about 1,000 combinations of type and
# dimension values in every minute.
"$BIN" gen --url "http://127.0.0.1:$PORT" --events 1700000 --start "$START" \
  --events-per-sec 20 --users 5000 --connections 4 --batch 2000 | tail -1
sleep 3
python3 - "http://127.0.0.1:$PORT" "$START" "$END" "$N" <<'PY'
import sys, time, urllib.request
base, start, end, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for q in ["metric=count&granularity=1m",
          "metric=count&group_by=country&granularity=1m",
          "metric=unique_users&group_by=country&granularity=1h",
          "metric=count&group_by=event_type,country&where=device:mobile&granularity=5m"]:
    lat = []
    for i in range(n):
        url = f"{base}/api/v1/metrics?{q}&start={start}&end={end + i + 1}"
        t = time.perf_counter()
        with urllib.request.urlopen(url) as r:
            body = r.read()
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    print(f"{q}: p50 {lat[len(lat) // 2]:.2f} ms  p99 {lat[max(0, int(len(lat) * 0.99) - 1)]:.2f} ms  ({len(body)} bytes)")
PY
