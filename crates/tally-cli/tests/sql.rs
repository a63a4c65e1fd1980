//! SQL, sessions and the Parquet archive against an independent computation.
//!
//! Generated input (duplicates, disorder, late and malformed events, two
//! tenants) goes through the real server over HTTP. Then:
//! - SQL answers over `events` (hot, in memory) equal what is computed here
//!   from the input: counts by type, distinct users, per-minute counts, sums
//!   of a JSON property; `rollups_1m`/`rollups_1h` equal the rollup oracle;
//! - hostile SQL (other tenants named in WHERE, UNION, subqueries, DDL, file
//!   tables) never sees another tenant's rows;
//! - CSV, NDJSON and Arrow IPC answers hold the same rows;
//! - sessions equal sessions computed here;
//! - after a restart (the shutdown seals everything into Parquet) the same
//!   queries answer the same from the archive, and the archive files, read
//!   with the parquet crate directly, hold exactly the expected rows.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;

use arrow::array::AsArray;
use common::{T0, expected, rows, ts_of};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Value, json};
use tally_cli::generator::{GenConfig, Generator, Kind};
use tally_server::Server;
use tally_types::time::{MINUTE_MS, format_rfc3339};

async fn start(dir: &std::path::Path) -> Server {
    common::start_server(dir, |cfg| {
        // No timed seals during the test: hot first, then the shutdown seal.
        cfg.archive.seal_interval = "1h".into();
        cfg.archive.row_group_rows = 1024;
    })
    .await
}

/// The answers compared before and after the restart.
async fn answers(c: &reqwest::Client, base: &str) -> Vec<Vec<Vec<Value>>> {
    let mut out = Vec::new();
    for q in QUERIES {
        out.push(rows(c, base, "tenant0", q).await);
    }
    out
}

const QUERIES: [&str; 5] = [
    "SELECT event_type, count(*) AS n FROM events GROUP BY event_type ORDER BY event_type",
    "SELECT count(DISTINCT user_id) AS users, count(*) AS n FROM events",
    "SELECT date_trunc('minute', ts) AS m, count(*) AS n FROM events \
     WHERE ts >= '2026-11-01T12:00:00Z' AND ts < '2026-11-01T12:30:00Z' GROUP BY 1 ORDER BY 1",
    "SELECT event_type, sum(json_get_int(properties, 'duration_ms')) AS d, \
     count(json_get_float(properties, 'revenue')) AS purchases FROM events GROUP BY 1 ORDER BY 1",
    "SELECT event_type, sum(count) AS n FROM rollups_1h GROUP BY 1 ORDER BY 1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_sessions_and_archive_match_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();

    let mut g = Generator::new(GenConfig {
        seed: 11,
        tenants: 2,
        users: 200,
        start_ms: Some(T0),
        events_per_sec: 10.0,
        disorder: 0.10,
        late: 0.02,
        duplicate: 0.05,
        malformed: 0.02,
    });
    let lines: Vec<(String, Kind)> = std::iter::once(common::warmup())
        .chain((0..8_000).map(|_| g.next_line()))
        .collect();
    let exp = expected(&lines);
    let kept0: Vec<&Value> = exp
        .kept
        .iter()
        .filter(|v| v["tenant"] == "tenant0")
        .collect();
    assert!(kept0.len() > 3000);
    assert!(kept0.iter().any(|v| v.get("session_id").is_none()));

    // Feed in order (one connection): the oracle's notion of "first copy"
    // is the input order.
    common::post_ndjson(&c, &base, lines[0].0.clone()).await;
    for ch in lines[1..].chunks(500) {
        let body: String = ch.iter().map(|(l, _)| format!("{l}\n")).collect();
        common::post_ndjson(&c, &base, body).await;
    }
    // Wait until the raw store shows every kept event.
    let total = exp.kept.len() as i64;
    let mut seen = 0;
    for _ in 0..200 {
        let a = rows(&c, &base, "tenant0", "SELECT count(*) FROM events").await;
        let b = rows(&c, &base, "tenant1", "SELECT count(*) FROM events").await;
        seen = a[0][0].as_i64().unwrap() + b[0][0].as_i64().unwrap();
        if seen == total {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, total, "raw rows vs kept events");

    // The oracle, for tenant0.
    let mut by_type: BTreeMap<String, i64> = BTreeMap::new();
    let mut users = BTreeSet::new();
    let mut per_minute: BTreeMap<i64, i64> = BTreeMap::new();
    let mut dur: BTreeMap<String, i64> = BTreeMap::new();
    let mut purchases: BTreeMap<String, i64> = BTreeMap::new();
    for v in &kept0 {
        let ty = v["event_type"].as_str().unwrap().to_string();
        *by_type.entry(ty.clone()).or_default() += 1;
        users.insert(v["user_id"].as_str().unwrap().to_string());
        let ts = ts_of(v);
        if (T0..T0 + 30 * MINUTE_MS).contains(&ts) {
            *per_minute
                .entry(ts.div_euclid(MINUTE_MS) * MINUTE_MS)
                .or_default() += 1;
        }
        *dur.entry(ty.clone()).or_default() += v["properties"]["duration_ms"].as_i64().unwrap();
        *purchases.entry(ty).or_default() += v["properties"].get("revenue").is_some() as i64;
    }
    let mut rollup_by_type: BTreeMap<String, i64> = BTreeMap::new();
    for ((t, _, ty), b) in &exp.buckets {
        if t == "tenant0" {
            *rollup_by_type.entry(ty.clone()).or_default() += b.count as i64;
        }
    }
    let want: Vec<Vec<Vec<Value>>> = vec![
        by_type
            .iter()
            .map(|(t, n)| vec![json!(t), json!(n)])
            .collect(),
        vec![vec![json!(users.len()), json!(kept0.len())]],
        per_minute
            .iter()
            .map(|(m, n)| vec![json!(format_rfc3339(*m)), json!(n)])
            .collect(),
        dur.iter()
            .map(|(t, d)| vec![json!(t), json!(d), json!(purchases[t])])
            .collect(),
        rollup_by_type
            .iter()
            .map(|(t, n)| vec![json!(t), json!(n)])
            .collect(),
    ];
    let hot = answers(&c, &base).await;
    for (i, (got, want)) in hot.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "query {i} over hot rows: {}", QUERIES[i]);
    }

    // Hostile SQL: another tenant's name never widens the scope.
    for q in [
        "SELECT count(*) FROM events WHERE tenant = 'tenant1'",
        "SELECT count(*) FROM events WHERE tenant <> 'tenant0'",
        "SELECT count(*) FROM (SELECT tenant FROM events UNION ALL SELECT tenant FROM rollups_1m) x WHERE tenant = 'tenant1'",
        "SELECT count(*) FROM events WHERE event_id IN (SELECT event_id FROM events WHERE tenant = 'tenant1')",
        "SELECT count(*) FROM rollups_1h WHERE tenant = 'tenant1'",
    ] {
        assert_eq!(
            rows(&c, &base, "tenant0", q).await,
            vec![vec![json!(0)]],
            "{q}"
        );
    }
    let tenants = rows(
        &c,
        &base,
        "tenant0",
        "SELECT DISTINCT tenant FROM events UNION SELECT DISTINCT tenant FROM rollups_1m",
    )
    .await;
    assert_eq!(tenants, vec![vec![json!("tenant0")]]);
    // information_schema lists the tenant's own tables, nothing else.
    let tables = rows(
        &c,
        &base,
        "tenant0",
        "SELECT DISTINCT table_schema || '.' || table_name FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY 1",
    )
    .await;
    assert_eq!(
        tables,
        ["events", "rollups_1h", "rollups_1m", "sessions"]
            .iter()
            .map(|t| vec![json!(format!("public.{t}"))])
            .collect::<Vec<_>>()
    );
    let archive = dir.path().join("archive");
    for q in [
        format!(
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '{}/tenant=tenant1/'",
            archive.display()
        ),
        format!(
            "SELECT count(*) FROM '{}/tenant=tenant1/'",
            archive.display()
        ),
        "SELECT * FROM tally.public.other".to_string(),
        "DROP TABLE events".to_string(),
        "INSERT INTO events SELECT * FROM events".to_string(),
        "SET datafusion.execution.target_partitions = 1".to_string(),
        "SELEKT 1".to_string(),
    ] {
        let (status, v) = common::post_sql(&c, &base, "tenant0", &q).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{q}: {v}"
        );
    }
    // A bad request names the fix.
    let r = c
        .post(format!("{base}/api/v1/query"))
        .body("{\"query\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("sql"));

    // Formats: the same rows as CSV, NDJSON and Arrow IPC.
    let q = QUERIES[0];
    let fetch = |accept: &'static str| {
        let c = c.clone();
        let base = base.clone();
        async move {
            let r = c
                .post(format!("{base}/api/v1/query?tenant=tenant0"))
                .header("accept", accept)
                .body(json!({ "sql": q }).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            (ct, r.bytes().await.unwrap())
        }
    };
    let (ct, csv) = fetch("text/csv").await;
    assert!(ct.starts_with("text/csv"));
    let csv = String::from_utf8(csv.to_vec()).unwrap();
    let mut lines_csv = csv.lines();
    assert_eq!(lines_csv.next(), Some("event_type,n"));
    let csv_rows: Vec<String> = lines_csv.map(str::to_string).collect();
    let want_csv: Vec<String> = by_type.iter().map(|(t, n)| format!("{t},{n}")).collect();
    assert_eq!(csv_rows, want_csv);
    let (ct, nd) = fetch("application/x-ndjson").await;
    assert_eq!(ct, "application/x-ndjson");
    let nd: Vec<Value> = String::from_utf8(nd.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want_nd: Vec<Value> = by_type
        .iter()
        .map(|(t, n)| json!({"event_type": t, "n": n}))
        .collect();
    assert_eq!(nd, want_nd);
    let (ct, ipc) = fetch("application/vnd.apache.arrow.stream").await;
    assert_eq!(ct, "application/vnd.apache.arrow.stream");
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc.to_vec()), None)
            .unwrap();
    let mut from_ipc = BTreeMap::new();
    for b in reader {
        let b = b.unwrap();
        let t = b.column(0).as_string::<i32>();
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            from_ipc.insert(t.value(i).to_string(), n.value(i));
        }
    }
    assert_eq!(from_ipc, by_type);

    // Sessions of the three busiest users of tenant0.
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for v in &kept0 {
        *per_user
            .entry(v["user_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let mut busiest: Vec<(usize, String)> = per_user.into_iter().map(|(u, n)| (n, u)).collect();
    busiest.sort();
    let busiest: Vec<String> = busiest
        .iter()
        .rev()
        .take(3)
        .map(|(_, u)| u.clone())
        .collect();
    let start_q = format_rfc3339(T0 - 3_600_000);
    let end_q = format_rfc3339(T0 + 24 * 3_600_000);
    let mut sessions_hot = Vec::new();
    for u in &busiest {
        let want = oracle_sessions(&kept0, u);
        assert!(want.len() > 1);
        let v = common::get(
            &c,
            format!(
                "{base}/api/v1/sessions?tenant=tenant0&user_id={u}&start={start_q}&end={end_q}"
            ),
        )
        .await;
        let got: Vec<(String, String, String, u64)> = v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert_eq!(s["user_id"], json!(u));
                (
                    s["session_id"].as_str().unwrap().to_string(),
                    s["start"].as_str().unwrap().to_string(),
                    s["end"].as_str().unwrap().to_string(),
                    s["events"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "sessions of {u}");
        sessions_hot.push(got);
    }
    // Another tenant's user has no sessions here.
    let v = common::get(
        &c,
        format!("{base}/api/v1/sessions?tenant=tenant1&user_id=nobody&start={start_q}&end={end_q}"),
    )
    .await;
    assert_eq!(v["sessions"], json!([]));

    // Restart: the shutdown seals everything; the same answers come from Parquet.
    server.stop().await.unwrap();
    let files = parquet_files(&archive);
    assert!(!files.is_empty());
    for f in &files {
        let rel = f.strip_prefix(&archive).unwrap().display().to_string();
        let parts: Vec<&str> = rel.split('/').collect();
        assert_eq!(parts.len(), 4, "{rel}");
        assert!(
            parts[0].starts_with("tenant=")
                && parts[1].starts_with("date=2026-11-")
                && parts[2].starts_with("hour="),
            "{rel}"
        );
    }
    // Read back with the parquet crate: exactly the kept events, each once,
    // in the partition of its tenant, date and hour.
    let mut from_files: Vec<(String, String, i64)> = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&archive).unwrap().display().to_string();
        let r = ParquetRecordBatchReaderBuilder::try_new(File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let id = b.column(0).as_string::<i32>();
            let tenant = b.column(1).as_string::<i32>();
            let ts = b
                .column(5)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            for i in 0..b.num_rows() {
                let iso = format_rfc3339(ts.value(i));
                let dir = format!(
                    "tenant={}/date={}/hour={}/",
                    tenant.value(i),
                    &iso[..10],
                    &iso[11..13]
                );
                assert!(rel.starts_with(&dir), "{rel} holds a row of {dir}");
                from_files.push((
                    tenant.value(i).to_string(),
                    id.value(i).to_string(),
                    ts.value(i),
                ));
            }
        }
    }
    from_files.sort();
    let mut want_rows: Vec<(String, String, i64)> = exp
        .kept
        .iter()
        .map(|v| {
            (
                v["tenant"].as_str().unwrap().to_string(),
                v["event_id"].as_str().unwrap().to_string(),
                ts_of(v),
            )
        })
        .collect();
    want_rows.sort();
    assert_eq!(from_files.len(), want_rows.len());
    assert!(
        from_files == want_rows,
        "archive rows differ from the kept events"
    );

    duckdb_reads_the_archive(&archive, &exp.kept);

    let server = start(dir.path()).await;
    let base = format!("http://{}", server.addr);
    let metrics = common::prom(&c, &base).await;
    assert!(
        metrics.contains("tally_raw_hot_rows 0"),
        "nothing re-read into hot"
    );
    let cold = answers(&c, &base).await;
    for (i, (got, want)) in cold.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "query {i} over the archive: {}", QUERIES[i]);
    }
    for (u, hot) in busiest.iter().zip(&sessions_hot) {
        let v = common::get(
            &c,
            format!(
                "{base}/api/v1/sessions?tenant=tenant0&user_id={u}&start={start_q}&end={end_q}"
            ),
        )
        .await;
        assert_eq!(v["sessions"].as_array().unwrap().len(), hot.len());
    }
    // Time filters prune: a range with no data reads no file and answers 0.
    let none = rows(
        &c,
        &base,
        "tenant0",
        "SELECT count(*) FROM events WHERE ts >= '2030-01-01T00:00:00Z'",
    )
    .await;
    assert_eq!(none, vec![vec![json!(0)]]);
    server.stop().await.unwrap();
}

/// Sessions computed here: events with a session_id grouped by it; the
/// rest per user with a 30-minute gap. (session_id, start, end, events),
/// ordered by start.
fn oracle_sessions(kept: &[&Value], user: &str) -> Vec<(String, String, String, u64)> {
    let mut by_id: BTreeMap<String, (i64, i64, u64)> = BTreeMap::new();
    let mut anon: Vec<i64> = Vec::new();
    for v in kept.iter().filter(|v| v["user_id"] == user) {
        let t = ts_of(v);
        match v.get("session_id").and_then(Value::as_str) {
            Some(s) => {
                let e = by_id.entry(s.to_string()).or_insert((t, t, 0));
                e.0 = e.0.min(t);
                e.1 = e.1.max(t);
                e.2 += 1;
            }
            None => anon.push(t),
        }
    }
    let mut out: Vec<(i64, String, i64, u64)> = by_id
        .into_iter()
        .map(|(id, (s, e, n))| (s, id, e, n))
        .collect();
    anon.sort();
    let mut cur: Option<(i64, i64, u64)> = None;
    for t in anon {
        match &mut cur {
            Some((_, e, n)) if t - *e < 30 * MINUTE_MS => {
                *e = t;
                *n += 1;
            }
            _ => {
                if let Some((s, e, n)) = cur.take() {
                    out.push((s, format!("{user}:{s}"), e, n));
                }
                cur = Some((t, t, 1));
            }
        }
    }
    if let Some((s, e, n)) = cur {
        out.push((s, format!("{user}:{s}"), e, n));
    }
    out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    out.into_iter()
        .map(|(s, id, e, n)| (id, format_rfc3339(s), format_rfc3339(e), n))
        .collect()
}

/// DuckDB (Python package, installed by `.ci/run`) reads the Hive-partitioned
/// archive directly and finds the same rows per tenant and type, with the
/// `hour=` partition matching every row's time.
fn duckdb_reads_the_archive(archive: &std::path::Path, kept: &[Value]) {
    let script = format!("{}/../../scripts/duckdb_read_archive.py", manifest_dir());
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(archive)
        .output()
        .expect("python3 runs (installed by .ci/run)");
    assert!(
        out.status.success(),
        "DuckDB could not read the archive (pip install duckdb):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut want: BTreeMap<(String, String), (u64, i64)> = BTreeMap::new();
    for v in kept {
        let e = want
            .entry((
                v["tenant"].as_str().unwrap().to_string(),
                v["event_type"].as_str().unwrap().to_string(),
            ))
            .or_default();
        e.0 += 1;
        e.1 += v["properties"]["duration_ms"].as_i64().unwrap();
    }
    let got: BTreeMap<(String, String), (u64, i64)> = got
        .iter()
        .map(|r| {
            assert_eq!(r["n"], r["ids"], "DuckDB sees a row twice: {r}");
            assert_eq!(
                r["hours_match"], true,
                "rows outside their hour= partition: {r}"
            );
            (
                (
                    r["tenant"].as_str().unwrap().to_string(),
                    r["event_type"].as_str().unwrap().to_string(),
                ),
                (r["n"].as_u64().unwrap(), r["duration"].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, want, "DuckDB's view of the archive");
}

fn parquet_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The crate's directory: cargo's at run time (a test executable reused
/// from a shared target dir may have been built from another checkout),
/// else where it was built.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
