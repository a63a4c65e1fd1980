#!/usr/bin/env bash
# What the raw store (hot Arrow batches + sealing into Parquet) costs ingest:
# `tally bench` with the archive off and on, taking turns ROUNDS times on the
# same machine (bench figures move 10-20% between runs on a noisy VM; only
# runs side by side compare), then the throughput lost per round and the
# raw store's share of the server's CPU per event.
#   ROUNDS=3 DURATION=15 scripts/bench_archive_cost.sh
# Needs: cargo build --release -p tally-cli (or BIN=path/to/tally).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-15}"
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/tally}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

run() { # archive on|off, round
  TALLY__ARCHIVE__ENABLED="$1" "$BIN" bench --duration "$DURATION" --connections 8 \
    --batch 2000 --alert-samples 0 >"$OUT/$1.$2" 2>&1
  grep -E "sustained ingest|raw store share" "$OUT/$1.$2" | sed "s/^/  archive=$1  /"
}

rate() { awk '/sustained ingest/ {print $3}' "$1"; }

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  run false "$r"
  run true "$r"
  off=$(rate "$OUT/false.$r")
  on=$(rate "$OUT/true.$r")
  awk -v off="$off" -v on="$on" 'BEGIN { printf "  throughput %d -> %d events/s: %+.1f%%\n", off, on, 100 * (on - off) / off }'
done
