#!/usr/bin/env bash
# Tally against ClickHouse, same machine, same run, taking turns: the same
# generated events posted by the same client (PAR parallel curl, CHUNK-line
# bodies) to each. Tally counts an event when the metrics API shows it
# (fsync before ack, dedupe, sketches, the raw archive all on); ClickHouse
# gets the events flattened for JSONEachRow into a MergeTree table with a
# per-minute AggregatingMergeTree materialized view (count, uniq(user_id),
# sum(revenue)) and counts them when the inserts return. ClickHouse comes
# from Debian's clickhouse-server (installed here when missing) and runs on
# its own ports with its own data dir.
#
#   cargo build --release -p tally-cli
#   scripts/bench_clickhouse.sh [path/to/tally]
#   EVENTS=2000000 RUNS=3 CHUNK=40000 PAR=4 scripts/bench_clickhouse.sh
#
# Prints per run: events/s and server CPU ns per event for each, and the
# Tally/ClickHouse ratio of events/s; then the median ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
TALLY="$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/tally}")"
EVENTS="${EVENTS:-2000000}"
RUNS="${RUNS:-3}"
CHUNK="${CHUNK:-40000}"
PAR="${PAR:-4}"
[ -x "$TALLY" ] || { echo "no tally binary at $TALLY: cargo build --release -p tally-cli" >&2; exit 1; }

if ! command -v clickhouse-server >/dev/null; then
  echo "installing clickhouse-server (Debian) ..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q clickhouse-server clickhouse-client >/dev/null
fi

WORK="$(mktemp -d)"
CH_PID=""
TALLY_PID=""
cleanup() {
  [ -n "$TALLY_PID" ] && kill "$TALLY_PID" 2>/dev/null || true
  [ -n "$CH_PID" ] && kill "$CH_PID" 2>/dev/null || true
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
clk=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
wait_up() {  # $1 = URL answering 2xx once up, $2 = server pid, $3 = its log
  until curl -sf "$1" >/dev/null; do
    kill -0 "$2" 2>/dev/null || { cat "$3" >&2; exit 1; }
    sleep 0.1
  done
}

echo "generating $EVENTS events ..." >&2
# Event time: two minutes that ended a minute ago, so that in whatever
# order the bodies arrive nothing is late for Tally (allowed lateness 5
# min); no duplicates or malformed lines, so both count the same events.
START=$(( $(date +%s) * 1000 - 180000 ))
"$TALLY" gen --events "$EVENTS" --seed 7 --start "$START" --events-per-sec $(( EVENTS / 120 + 1 )) \
  --duplicate 0 --malformed 0 --late 0 --disorder 0 --out "$WORK/events.ndjson" >/dev/null
mkdir -p "$WORK/tally" "$WORK/ch"
split -l "$CHUNK" -d -a 5 "$WORK/events.ndjson" "$WORK/tally/chunk-"
# ClickHouse's flat rows (before the clock starts: it gets flatter input).
python3 - "$WORK/tally" "$WORK/ch" <<'EOF'
import json, os, sys, datetime
src, dst = sys.argv[1], sys.argv[2]
def ms(t):
    if isinstance(t, (int, float)):
        return int(t)
    return int(datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as out:
        for line in f:
            e = json.loads(line)
            p = e.get("properties") or {}
            rev = p.get("revenue", 0)
            out.write(json.dumps({
                "event_id": e["event_id"], "event_type": e["event_type"],
                "ts": ms(e["timestamp"]) // 1000, "user_id": e.get("user_id") or "",
                "revenue": float(rev) if isinstance(rev, (int, float)) else 0.0,
                "properties": json.dumps(p),
            }) + "\n")
EOF

# ClickHouse: its own config, ports and data dir.
CH_HTTP=$(free_port); CH_TCP=$(free_port)
mkdir -p "$WORK/chserver"
cat > "$WORK/chserver/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <http_port>$CH_HTTP</http_port>
    <tcp_port>$CH_TCP</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>$WORK/chserver/data/</path>
    <tmp_path>$WORK/chserver/tmp/</tmp_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>536870912</mark_cache_size>
</yandex>
EOF
cat > "$WORK/chserver/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>10000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default></default></quotas>
</yandex>
EOF
clickhouse-server --config-file="$WORK/chserver/config.xml" >"$WORK/chserver/log" 2>&1 &
CH_PID=$!
CH="http://127.0.0.1:$CH_HTTP/"
wait_up "$CH?query=SELECT%201" "$CH_PID" "$WORK/chserver/log"
chq() { curl -sf "$CH" --data-binary "$1"; }

post_all() {  # $1 = dir of bodies, $2 = URL
  find "$1" -type f | sort | xargs -P "$PAR" -I{} \
    curl -sf -o /dev/null -H 'Content-Type: application/x-ndjson' --data-binary @{} "$2"
}

run_clickhouse() {  # prints "events/s ns/event"
  chq "DROP TABLE IF EXISTS per_minute" ; chq "DROP TABLE IF EXISTS events"
  chq "CREATE TABLE events (event_id String, event_type String, ts DateTime, user_id String,
       revenue Float64, properties String) ENGINE = MergeTree ORDER BY (event_type, ts)"
  chq "CREATE MATERIALIZED VIEW per_minute ENGINE = AggregatingMergeTree ORDER BY (event_type, minute)
       AS SELECT event_type, toStartOfMinute(ts) AS minute, countState() AS n,
       uniqState(user_id) AS users, sumState(revenue) AS revenue FROM events GROUP BY event_type, minute"
  local t0 t1 c0 c1 n
  c0=$(ticks "$CH_PID"); t0=$(date +%s.%N)
  post_all "$WORK/ch" "${CH}?query=INSERT%20INTO%20events%20FORMAT%20JSONEachRow"
  t1=$(date +%s.%N); c1=$(ticks "$CH_PID")
  n=$(chq "SELECT countMerge(n) FROM per_minute")
  [ "$n" = "$EVENTS" ] || { echo "ClickHouse counted $n of $EVENTS" >&2; exit 1; }
  echo "$(echo "$EVENTS / ($t1 - $t0)" | bc -l) $(echo "($c1 - $c0) / $clk * 1000000000 / $EVENTS" | bc -l)"
}

run_tally() {  # prints "events/s ns/event"
  local port dir t0 t1 c0 c1 base q seen
  port=$(free_port); dir="$WORK/tally-data-$RANDOM"
  RUST_LOG=warn "$TALLY" serve --listen "127.0.0.1:$port" --data-dir "$dir" >"$WORK/tally.log" 2>&1 &
  TALLY_PID=$!
  base="http://127.0.0.1:$port"
  wait_up "$base/readyz" "$TALLY_PID" "$WORK/tally.log"
  q="$base/api/v1/metrics?metric=count&granularity=1d&start=$((START - 86400000))&end=$((START + 86400000))"
  c0=$(ticks "$TALLY_PID"); t0=$(date +%s.%N)
  post_all "$WORK/tally" "$base/api/v1/events"
  # Counted: every event visible in the metrics API.
  local give_up=$(( $(date +%s) + 300 ))
  while :; do
    seen=$(curl -sf "$q" | python3 -c 'import json,sys; print(sum(p[1] for s in json.load(sys.stdin)["series"] for p in s["points"]))')
    [ "$seen" -ge "$EVENTS" ] && break
    if [ "$(date +%s)" -gt "$give_up" ]; then
      echo "Tally shows $seen of $EVENTS events after 5 min; its counters:" >&2
      curl -s "$base/metrics" | grep -E '^tally_events_(accepted|rejected|counted|duplicate|late)_total' >&2
      exit 1
    fi
    sleep 0.01
  done
  t1=$(date +%s.%N); c1=$(ticks "$TALLY_PID")
  kill "$TALLY_PID"; wait "$TALLY_PID" 2>/dev/null || true; TALLY_PID=""
  rm -rf "$dir"
  echo "$(echo "$EVENTS / ($t1 - $t0)" | bc -l) $(echo "($c1 - $c0) / $clk * 1000000000 / $EVENTS" | bc -l)"
}

echo "Tally $("$TALLY" --version 2>/dev/null | head -1) vs ClickHouse $(chq 'SELECT version()'); $EVENTS events, $PAR × curl, $CHUNK lines per body, $RUNS runs taking turns"
printf "%-4s %16s %14s %16s %14s %8s\n" run "tally ev/s" "tally ns/ev" "clickhouse ev/s" "ch ns/ev" ratio
ratios=()
for r in $(seq 1 "$RUNS"); do
  read -r tr tc < <(run_tally)
  read -r cr cc < <(run_clickhouse)
  ratio=$(echo "$tr / $cr" | bc -l)
  ratios+=("$ratio")
  printf "%-4s %16.0f %14.0f %16.0f %14.0f %8.2f\n" "$r" "$tr" "$tc" "$cr" "$cc" "$ratio"
done
median=$(printf "%s\n" "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
printf "median Tally/ClickHouse ratio %.2f (target ≥ 1.5)\n" "$median"
