#!/usr/bin/env python3
"""Side-by-side SQL benchmark: Tally vs DuckDB vs chDB on the same data.

Tally answers over HTTP (POST /api/v1/query, result cache off on the
server: TALLY__QUERY__CACHE_ENTRIES=0); DuckDB and chDB read the very
Parquet files Tally archived (<data-dir>/archive, Hive layout). Each query
runs --runs times per engine after one warm-up run; the median and the
minimum are printed, plus whether the three answers agree.

    python3 scripts/bench_sql.py --url http://127.0.0.1:7070 \
        --archive /tmp/tally-bench/archive --tenant tenant0 --runs 7

Needs `pip install duckdb chdb pytz`.
"""
import argparse
import json
import statistics
import time
import urllib.request

QUERIES = [
    # (name, tally SQL, DuckDB SQL, chDB SQL) - {src} is the engine's table
    # of the tenant's rows, {h0}/{h1} an hour of event time.
    (
        "per-minute counts by type, one hour",
        "SELECT date_trunc('minute', ts) AS m, event_type, count(*) AS n FROM events "
        "WHERE ts >= '{h0}' AND ts < '{h1}' GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT date_trunc('minute', ts) AS m, event_type, count(*) AS n FROM {src} "
        "WHERE ts >= TIMESTAMPTZ '{h0}' AND ts < TIMESTAMPTZ '{h1}' GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT toStartOfMinute(ts) AS m, event_type, count() AS n FROM {src} "
        "WHERE ts >= parseDateTime64BestEffort('{h0}', 3, 'UTC') AND ts < parseDateTime64BestEffort('{h1}', 3, 'UTC') "
        "GROUP BY m, event_type ORDER BY m, event_type",
    ),
    (
        "distinct users per hour",
        "SELECT date_trunc('hour', ts) AS h, count(DISTINCT user_id) AS users FROM events GROUP BY 1 ORDER BY 1",
        "SELECT date_trunc('hour', ts) AS h, count(DISTINCT user_id) AS users FROM {src} GROUP BY 1 ORDER BY 1",
        "SELECT toStartOfHour(ts) AS h, uniqExact(user_id) AS users FROM {src} GROUP BY h ORDER BY h",
    ),
    (
        "top 10 pages",
        "SELECT json_get_str(properties, 'page') AS page, count(*) AS n FROM events "
        "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
        "SELECT json_extract_string(properties, '$.page') AS page, count(*) AS n FROM {src} "
        "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
        "SELECT JSONExtractString(properties, 'page') AS page, count() AS n FROM {src} "
        "GROUP BY page ORDER BY n DESC, page LIMIT 10",
    ),
    (
        "p95 duration",
        "SELECT approx_percentile_cont(json_get_float(properties, 'duration_ms'), 0.95) AS p95 FROM events",
        "SELECT approx_quantile(CAST(json_extract(properties, '$.duration_ms') AS DOUBLE), 0.95) AS p95 FROM {src}",
        "SELECT quantile(0.95)(JSONExtractFloat(properties, 'duration_ms')) AS p95 FROM {src}",
    ),
]


def tally(url, tenant, sql):
    req = urllib.request.Request(
        f"{url}/api/v1/query?tenant={tenant}",
        data=json.dumps({"sql": sql}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["rows"]


def timed(f, runs):
    f()  # warm-up (file metadata, page cache)
    ts = []
    out = None
    for _ in range(runs):
        t = time.perf_counter()
        out = f()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), min(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:7070")
    ap.add_argument("--archive", required=True)
    ap.add_argument("--tenant", default="tenant0")
    ap.add_argument("--hour", default="2026-11-01T02:00:00Z", help="start of the hour for query 1")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import chdb
    import duckdb

    h0 = a.hour
    h1 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
        time.mktime(time.strptime(h0, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone + 3600))
    glob = f"{a.archive}/tenant={a.tenant}/*/*/*.parquet"
    con = duckdb.connect()
    con.execute(f"SET threads = {a.threads}")
    duck_src = f"read_parquet('{glob}')"
    ch_src = f"file('{glob}', Parquet)"
    sess = chdb.session.Session()

    rows = con.execute(f"SELECT count(*) FROM {duck_src}").fetchone()[0]
    print(f"rows of {a.tenant} in the archive: {rows:,}  ({glob})")
    print(f"{'query':40} {'tally ms':>16} {'duckdb ms':>16} {'chdb ms':>16}   agree")
    for name, tq, dq, cq in QUERIES:
        tq = tq.format(h0=h0, h1=h1)
        dq = dq.format(src=duck_src, h0=h0, h1=h1)
        cq = cq.format(src=ch_src, h0=h0, h1=h1)
        tm, tmin, tout = timed(lambda: tally(a.url, a.tenant, tq), a.runs)
        dm, dmin, dout = timed(lambda: con.execute(dq).fetchall(), a.runs)
        cm, cmin, cout = timed(
            lambda: sess.query(cq + f" SETTINGS max_threads = {a.threads}", "JSONCompact"), a.runs)
        cout = json.loads(cout.bytes())["data"] if hasattr(cout, "bytes") else cout
        agree = len(tout) == len(dout) == len(cout)
        if name == "top 10 pages":
            agree = agree and [r[1] for r in tout] == [r[1] for r in dout] == [int(r[1]) for r in cout]
        print(f"{name:40} {tm:8.1f} ({tmin:5.1f}) {dm:8.1f} ({dmin:5.1f}) {cm:8.1f} ({cmin:5.1f})   {agree}")
        if name == "p95 duration":
            print(f"{'':40} {tout[0][0]!s:>16} {dout[0][0]!s:>16} {cout[0][0]!s:>16}   (approximate)")


if __name__ == "__main__":
    main()
