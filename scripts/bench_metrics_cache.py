#!/usr/bin/env python3
"""Latency of one dashboard panel from the metrics cache vs computed.

Usage: bench_metrics_cache.py BASE_URL TENANT START END [N]
e.g.   bench_metrics_cache.py http://127.0.0.1:7070 default \
           2026-11-01T00:00:00Z 2026-11-01T02:30:00Z

The same URL repeated is served from the cache (X-Tally-Cache: hit); the
same panel with an end moved by a few ms each time is computed (miss).
"""
import json
import sys
import time
import urllib.request


def timed(url):
    t = time.perf_counter()
    r = urllib.request.urlopen(url)
    r.read()
    return (time.perf_counter() - t) * 1000, r.headers.get("x-tally-cache")


def pct(ts, q):
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(len(ts) * q))]


def main():
    base, tenant, start, end = sys.argv[1:5]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 200
    url = (f"{base}/api/v1/metrics?metric=p95:duration_ms&granularity=5m"
           f"&group_by=event_type&tenant={tenant}&start={start}&end={{end}}")
    body = json.loads(urllib.request.urlopen(url.format(end=end)).read())
    points = sum(len(s["points"]) for s in body["series"])
    print(f"panel: {len(body['series'])} series, {points} points")
    hits = [timed(url.format(end=end)) for _ in range(n)]
    assert all(h == "hit" for _, h in hits), "expected cache hits"
    # A different explicit end (1 ms apart) is a new key: computed.
    end_ms = end.rstrip("Z")
    misses = [timed(url.format(end=f"{end_ms}.{i + 1:03d}Z" if "." not in end_ms else end))
              for i in range(min(n, 999))]
    for name, xs in (("cached", hits), ("computed", misses)):
        ts = [t for t, _ in xs]
        print(f"{name:9} p50 {pct(ts, 0.5):.3f} ms  p99 {pct(ts, 0.99):.3f} ms  ({xs[-1][1]})")


if __name__ == "__main__":
    main()
