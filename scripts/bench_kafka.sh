#!/usr/bin/env bash
# Kafka mode, one node: how fast it consumes a backlog of the events topic
# into its rollups (through transactions and the materialized view), and
# the CPU it spends per event; then embedded mode fed the same generated
# events over HTTP, in the same run, for comparison.
#
#   EVENTS=1000000 NODES="1 2 3" scripts/bench_kafka.sh [path/to/tally]   (release build)
#   GROUPED=1 ...: several events per message (NDJSON grouped by partition,
#   as Tally's HTTP ingest produces them); default one event per message.
#
# Prints events/s and server CPU ns per event for each (all nodes together). The broker is the
# test broker (scripts/kafka-broker), on this machine, sharing its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
TALLY="${1:-${CARGO_TARGET_DIR:-target}/release/tally}"
EVENTS="${EVENTS:-1000000}"
PORT=$((20000 + RANDOM % 20000))
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.5; rm -rf "$WORK"' EXIT
BROKER_BIN="$(scripts/kafka-broker install)"
"$BROKER_BIN" start --data-dir "$WORK/broker" --host 127.0.0.1 --only kafka --kafka-port "$PORT" >/dev/null 2>&1 &
BROKER=$!
sleep 1
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
caught_up() {  # every partition of the cluster at lag 0, as node $1 sees it
  curl -s "$1/api/v1/status" | python3 -c 'import json, sys
c = json.load(sys.stdin)["cluster"]
ps = c["partitions"]
sys.exit(0 if ps and all(p.get("lag_records", 1) == 0 for p in ps) else 1)'
}
counted() {  # messages of the events topic a node handled
  curl -s "$1/metrics" | awk '/^tally_kafka_messages_total/{print $2}'
}
processed() {  # events the cluster committed (counted, duplicate, late; node $1's
  # view of every partition) plus the malformed ones of every node ($@)
  local first=$1 m=0
  for b in "$@"; do
    m=$((m + $(curl -s "$b/metrics" | awk '/^tally_kafka_malformed_total/{print $2}')))
  done
  curl -s "$first/metrics" | awk -v m="$m" \
    '/^tally_events_(counted|duplicate|late)_total /{s+=$2} END {print s + m}'
}

# Kafka mode with N nodes (NODES="1 2 3"): each run has a consumer group
# and topics of its own, fed the same backlog; the time is until every
# message is processed and no node lags; CPU is all nodes' together.
kafka_run() {  # $1 = nodes; prints "rate ns"
  local n=$1 tag="b$1-$RANDOM" pids=() bases=() t0 t1 c0=0 c1=0 b0 b1
  "$TALLY" gen --kafka "127.0.0.1:$PORT" --topic "$tag-events" --events "$EVENTS" --seed 5 --tenants 4 --late 0 --batch 5000 \
    ${GROUPED:+--grouped} >/dev/null
  for i in $(seq 1 "$n"); do
    local http=$((PORT + 10 + i + 10 * n))
    TALLY__KAFKA__BROKERS="127.0.0.1:$PORT" TALLY__KAFKA__GROUP_ID="$tag" \
      TALLY__KAFKA__TOPIC_EVENTS="$tag-events" TALLY__KAFKA__TOPIC_AGGREGATES="$tag-agg" \
      TALLY__KAFKA__TOPIC_LATE="$tag-late" TALLY__KAFKA__NODE_ID="$tag-n$i" \
      TALLY__ARCHIVE__DIR="$WORK/$tag-archive" \
      "$TALLY" serve --listen "127.0.0.1:$http" --data-dir "$WORK/$tag-n$i" >"$WORK/$tag-n$i.log" 2>&1 &
    pids+=($!); bases+=("http://127.0.0.1:$http")
  done
  for b in "${bases[@]}"; do until curl -sf "$b/readyz" >/dev/null; do sleep 0.1; done; done
  t0=$(date +%s.%N); b0=$(cpu_ticks "$BROKER")
  for p in "${pids[@]}"; do c0=$((c0 + $(cpu_ticks "$p"))); done
  # Every message processed (by whichever node owns its partition) ...
  if [ -n "${GROUPED:-}" ]; then
    # (messages hold many events: count the events)
    until [ "$(processed "${bases[@]}")" -ge "$EVENTS" ]; do sleep 0.2; done
  else
    until [ "$(for b in "${bases[@]}"; do counted "$b"; done | awk '{s+=$1} END {print s+0}')" -ge "$EVENTS" ]; do sleep 0.2; done
  fi
  # ... and committed: no partition lags, as each node sees them all.
  for b in "${bases[@]}"; do
    until caught_up "$b"; do sleep 0.2; done
  done
  t1=$(date +%s.%N); b1=$(cpu_ticks "$BROKER")
  for p in "${pids[@]}"; do c1=$((c1 + $(cpu_ticks "$p"))); done
  local secs; secs=$(echo "$t1 - $t0" | bc -l)
  printf "%.0f %.0f %.1f %.0f\n" "$(echo "$EVENTS / $secs" | bc -l)" "$(echo "($c1 - $c0) / $clk * 1000000000 / $EVENTS" | bc -l)" "$secs" \
    "$(echo "($b1 - $b0) / $clk * 1000000000 / $EVENTS" | bc -l)"
  for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
}

kafka_rate=0
for n in ${NODES:-1}; do
  echo "== kafka mode: $n node(s) consume a backlog of $EVENTS events"
  read -r rate ns secs bns < <(kafka_run "$n")
  printf "kafka mode, %d node(s): %s events/s, %s ns CPU per event, all nodes (%s s); broker %s ns per event\n" "$n" "$rate" "$ns" "$secs" "$bns"
  [ "$n" = 1 ] && kafka_rate=$rate
done

echo "== embedded mode: the same events over HTTP"
HTTP2=$((PORT + 2))
"$TALLY" serve --listen "127.0.0.1:$HTTP2" --data-dir "$WORK/embedded" >"$WORK/embedded.log" 2>&1 &
EMB=$!
until curl -sf "http://127.0.0.1:$HTTP2/readyz" >/dev/null; do sleep 0.1; done
t0=$(date +%s.%N); c0=$(cpu_ticks $EMB)
"$TALLY" gen --url "http://127.0.0.1:$HTTP2" --events "$EVENTS" --seed 5 --tenants 4 --late 0 --batch 5000 --connections 4 | tail -1
until curl -s "http://127.0.0.1:$HTTP2/api/v1/status" | grep -q '"behind_records":0'; do sleep 0.1; done
t1=$(date +%s.%N); c1=$(cpu_ticks $EMB)
secs=$(echo "$t1 - $t0" | bc -l)
emb_rate=$(echo "$EVENTS / $secs" | bc -l)
emb_ns=$(echo "($c1 - $c0) / $clk * 1000000000 / $EVENTS" | bc -l)
printf "embedded (HTTP ingest + log + processor): %.0f events/s, %.0f ns server CPU per event (%.1f s)\n" "$emb_rate" "$emb_ns" "$secs"
if [ "$kafka_rate" != 0 ]; then
  printf "kafka (1 node) / embedded throughput: %.2f\n" "$(echo "$kafka_rate / $emb_rate" | bc -l)"
fi
