#!/usr/bin/env bash
# Kafka mode, one node: how fast it consumes a backlog of the events topic
# into its rollups (through transactions and the materialized view), and
# the CPU it spends per event; then embedded mode fed the same generated
# events over HTTP, in the same run, for comparison.
#
#   EVENTS=1000000 scripts/bench_kafka.sh [path/to/tally]     (release build)
#
# Prints events/s and server CPU ns per event for each. The broker is the
# test broker (scripts/kafka-broker), on this machine, sharing its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
TALLY="${1:-${CARGO_TARGET_DIR:-target}/release/tally}"
EVENTS="${EVENTS:-1000000}"
PORT=$((20000 + RANDOM % 20000))
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
BROKER_BIN="$(scripts/kafka-broker install)"
"$BROKER_BIN" start --data-dir "$WORK/broker" --host 127.0.0.1 --only kafka --kafka-port "$PORT" >/dev/null 2>&1 &
sleep 1
clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
counted() {  # processed events (counted + duplicates + malformed) of a node
  curl -s "$1/metrics" | awk '/^tally_kafka_messages_total/{print $2}'
}

echo "== producing $EVENTS generated events to the topic"
"$TALLY" gen --kafka "127.0.0.1:$PORT" --events "$EVENTS" --seed 5 --tenants 4 --late 0 --batch 5000 | tail -1

echo "== kafka mode: one node consumes the backlog"
HTTP=$((PORT + 1))
TALLY__KAFKA__BROKERS="127.0.0.1:$PORT" "$TALLY" serve --listen "127.0.0.1:$HTTP" --data-dir "$WORK/node" >"$WORK/node.log" 2>&1 &
NODE=$!
until curl -sf "http://127.0.0.1:$HTTP/readyz" >/dev/null; do sleep 0.1; done
t0=$(date +%s.%N); c0=$(cpu_ticks $NODE)
# The generator's lines are messages; each holds one event.
until [ "$(counted "http://127.0.0.1:$HTTP")" = "$EVENTS" ]; do sleep 0.2; done
# ... and visible in the node's store (its own committed aggregates).
until curl -s "http://127.0.0.1:$HTTP/api/v1/status" | grep -q '"lag_records":0'; do sleep 0.2; done
t1=$(date +%s.%N); c1=$(cpu_ticks $NODE)
secs=$(echo "$t1 - $t0" | bc -l)
kafka_rate=$(echo "$EVENTS / $secs" | bc -l)
kafka_ns=$(echo "($c1 - $c0) / $clk * 1000000000 / $EVENTS" | bc -l)
printf "kafka mode: %.0f events/s, %.0f ns server CPU per event (%.1f s)\n" "$kafka_rate" "$kafka_ns" "$secs"
kill $NODE; wait $NODE 2>/dev/null || true

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
printf "kafka / embedded throughput: %.2f\n" "$(echo "$kafka_rate / $emb_rate" | bc -l)"
