#!/usr/bin/env bash
# Two builds of tally side by side: `tally bench` with build A, then build
# B, taking turns ROUNDS times on the same machine (bench figures move
# 10-20% between runs on a noisy VM; only runs side by side compare). Prints
# each run's sustained ingest and server CPU per event, then the medians.
#   A=/path/old/tally B=/path/new/tally ROUNDS=3 DURATION=15 scripts/bench_ab.sh
# A_ARGS / B_ARGS add arguments to one side's bench, e.g. the same binary
# with and without declared dimensions:
#   printf '[dimensions]\ndefault = []\n' >/tmp/nodims.toml
#   A=target/release/tally B=target/release/tally A_ARGS="--config /tmp/nodims.toml" scripts/bench_ab.sh
# Build an older commit beside this one with a git worktree, e.g.
#   git worktree add /tmp/tally-old <commit> && (cd /tmp/tally-old && cargo build --release -p tally-cli)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${A:?set A to the first tally binary}" "${B:?set B to the second tally binary}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-15}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

run() { # label, binary, round
  local extra
  if [ "$1" = A ]; then extra="${A_ARGS:-}"; else extra="${B_ARGS:-}"; fi
  # shellcheck disable=SC2086
  "$2" bench --duration "$DURATION" --connections 8 --batch 2000 --alert-samples 0 $extra \
    >"$OUT/$1.$3" 2>&1
  local rate ns
  rate=$(awk '/sustained ingest/ {print $3}' "$OUT/$1.$3")
  ns=$(awk '/server CPU/ {for (i = 1; i < NF; i++) if ($(i + 1) == "ns") print $i}' "$OUT/$1.$3" | tr -d ',')
  echo "  $1: ${rate:-?} events/s, ${ns:-?} ns CPU per event"
  echo "$rate $ns" >>"$OUT/$1.all"
}

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  run A "$A" "$r"
  run B "$B" "$r"
done
for l in A B; do
  rate=$(cut -d' ' -f1 "$OUT/$l.all" | median)
  ns=$(cut -d' ' -f2 "$OUT/$l.all" | median)
  echo "median $l: $rate events/s, $ns ns CPU per event"
done
