#!/usr/bin/env bash
# Side-by-side SQL benchmark on N generated events (default 10M):
#   1. a release `tally serve` ingests them over HTTP (`tally gen`), with the
#      archive on (events in event time over ~14 h, 2 tenants);
#   2. SIGTERM: the shutdown seals everything into Parquet;
#   3. restart with the result cache off, then scripts/bench_sql.py times the
#      same four queries on Tally (HTTP), DuckDB and chDB (both reading the
#      Parquet files Tally wrote).
# Needs: cargo build --release -p tally-cli; pip install duckdb chdb pytz.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-10000000}"
DIR="${DIR:-/tmp/tally-sqlbench}"
PORT="${PORT:-7171}"
BIN="${CARGO_TARGET_DIR:-target}/release/tally"
URL="http://127.0.0.1:$PORT"

serve() {
  TALLY__QUERY__CACHE_ENTRIES=0 "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DIR" >"$DIR.log" 2>&1 &
  PID=$!
  until curl -sf "$URL/readyz" >/dev/null; do sleep 0.2; done
}

if [ ! -d "$DIR/archive" ]; then
  rm -rf "$DIR"
  serve
  echo "== ingesting $EVENTS events"
  /usr/bin/time -f "ingest: %e s wall" "$BIN" gen --events "$EVENTS" --url "$URL" --connections 4 --batch 2000 \
    --tenants 2 --users 20000 --start 2026-11-01T00:00:00Z --events-per-sec 200
  kill -TERM "$PID"; wait "$PID" || true
fi
serve
echo "== archive: $(du -sh "$DIR/archive" | cut -f1), $(find "$DIR/archive" -name '*.parquet' | wc -l) files"
python3 scripts/bench_sql.py --url "$URL" --archive "$DIR/archive" --tenant tenant0 --runs "${RUNS:-7}" --threads 2
kill -TERM "$PID"; wait "$PID" || true
