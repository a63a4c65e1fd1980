#!/usr/bin/env python3
"""Reads a Tally Parquet archive with DuckDB, as any analyst would, and
prints per (tenant, event_type) the row count, distinct event ids and the
sum of properties.duration_ms, as JSON. Used by the SQL oracle test."""
import json
import sys

import duckdb

root = sys.argv[1]
con = duckdb.connect()
rows = con.execute(
    f"""
    SELECT tenant, event_type, count(*) AS n, count(DISTINCT event_id) AS ids,
           sum(CAST(json_extract(properties, '$.duration_ms') AS BIGINT)) AS duration,
           bool_and(hour(ts AT TIME ZONE 'UTC') = CAST(hour AS INTEGER)) AS hours_match
    FROM read_parquet('{root}/*/*/*/*.parquet', hive_partitioning = true)
    GROUP BY ALL ORDER BY ALL
    """
).fetchall()
print(json.dumps([
    {"tenant": t, "event_type": e, "n": n, "ids": i, "duration": int(d or 0), "hours_match": bool(h)}
    for (t, e, n, i, d, h) in rows
]))
