//! Shared by the integration tests: the independent computation of what the
//! server must answer for generated input, and fetching metrics over HTTP.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;
use tally_cli::generator::Kind;
use tally_types::time::{MINUTE_MS, parse_rfc3339};

pub const T0: i64 = 1_793_534_400_000; // 2026-11-01T12:00:00Z

#[derive(Default)]
pub struct Bucket {
    pub count: u64,
    pub users: HashSet<String>,
    pub sessions: HashSet<String>,
    pub props: HashMap<String, Vec<f64>>,
}

/// What the server must hold after all `lines` were accepted once or more.
pub struct Expected {
    /// (tenant, minute, event_type) → bucket.
    pub buckets: BTreeMap<(String, i64, String), Bucket>,
    /// Distinct late events per tenant.
    pub late: HashMap<String, u64>,
    pub rejected: u64,
    pub counted: u64,
    /// Every event the raw store must hold, in input order: the first copy
    /// of each (tenant, event_id), late ones included.
    pub kept: Vec<Value>,
    /// The events rollups count: `kept` without the late ones.
    pub counted_events: Vec<Value>,
}

/// An on-time event at `T0`, sent alone before the concurrent feed starts.
/// Until the server has seen one event there is no watermark, and an event
/// is never late without one; with concurrent requests the first record
/// applied could otherwise open with a "late" line and count it.
pub fn warmup() -> (String, Kind) {
    let line = format!(
        r#"{{"event_id":"warmup","event_type":"page_view","timestamp":{T0},"tenant":"tenant0","user_id":"warmup","session_id":"warmup","properties":{{"duration_ms":1}}}}"#
    );
    (line, Kind::Normal)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn ts_of(v: &Value) -> i64 {
    match &v["timestamp"] {
        Value::String(s) => parse_rfc3339(s).expect("generator writes valid times"),
        n => n.as_i64().expect("epoch ms"),
    }
}

/// The independent computation: dedupe by (tenant, event_id), late events
/// out (a copy of a late event is a duplicate: the server remembers late
/// events so a retried batch does not fill the DLQ twice), malformed out.
pub fn expected(lines: &[(String, Kind)]) -> Expected {
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut late_ids: HashSet<(String, String)> = HashSet::new();
    let mut buckets: BTreeMap<(String, i64, String), Bucket> = BTreeMap::new();
    let mut late: HashMap<String, u64> = HashMap::new();
    let mut rejected = 0u64;
    let mut kept = Vec::new();
    let mut counted_events = Vec::new();
    for (line, kind) in lines {
        if *kind == Kind::Malformed {
            rejected += 1;
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        let tenant = v["tenant"].as_str().unwrap().to_string();
        let id = (tenant.clone(), v["event_id"].as_str().unwrap().to_string());
        if late_ids.contains(&id) {
            continue;
        }
        if *kind == Kind::Late {
            late_ids.insert(id);
            *late.entry(tenant).or_default() += 1;
            kept.push(v);
            continue;
        }
        if !seen.insert(id) {
            continue;
        }
        kept.push(v.clone());
        counted_events.push(v.clone());
        let minute = ts_of(&v).div_euclid(MINUTE_MS) * MINUTE_MS;
        let b = buckets
            .entry((
                tenant,
                minute,
                v["event_type"].as_str().unwrap().to_string(),
            ))
            .or_default();
        b.count += 1;
        if let Some(u) = v["user_id"].as_str() {
            b.users.insert(u.to_string());
        }
        if let Some(s) = v["session_id"].as_str() {
            b.sessions.insert(s.to_string());
        }
        for (k, val) in v["properties"].as_object().unwrap() {
            if let Some(x) = val.as_f64() {
                b.props.entry(k.clone()).or_default().push(x);
            }
        }
    }
    let counted = buckets.values().map(|b| b.count).sum();
    Expected {
        buckets,
        late,
        rejected,
        counted,
        kept,
        counted_events,
    }
}

pub async fn get(c: &reqwest::Client, url: String) -> Value {
    let r = c.get(&url).send().await.expect("request");
    assert!(r.status().is_success(), "{url}: {}", r.status());
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

/// The Prometheus text of `/metrics`.
pub async fn prom(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the unlabelled series `name` in Prometheus text `text`.
pub fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// All points of a grouped metric as (event_type, bucket) → value.
pub async fn fetch(
    c: &reqwest::Client,
    base: &str,
    tenant: &str,
    metric: &str,
    gran: &str,
) -> BTreeMap<(String, String), f64> {
    let url = format!(
        "{base}/api/v1/metrics?metric={metric}&start={}&end={}&granularity={gran}&group_by=event_type&tenant={tenant}",
        T0 - 3 * 3_600_000,
        T0 + 6 * 3_600_000
    );
    let v = get(c, url).await;
    assert_eq!(v["metric"], metric);
    points(&v)
}

/// The points of a metrics answer grouped by event type: (event_type, bucket) → value.
pub fn points(v: &Value) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for s in v["series"].as_array().unwrap() {
        let ty = s["labels"]["event_type"].as_str().unwrap().to_string();
        for p in s["points"].as_array().unwrap() {
            out.insert(
                (ty.clone(), p[0].as_str().unwrap().to_string()),
                p[1].as_f64().unwrap(),
            );
        }
    }
    out
}

pub fn fmt_bucket(t: i64) -> String {
    tally_types::time::format_rfc3339(t)
}

/// A server on a free port over `dir`, with the defaults changed by `tweak`.
pub async fn start_server(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut tally_server::Config),
) -> tally_server::Server {
    start_server_at(dir, tally_types::Clock::system(), tweak).await
}

/// [`start_server`] with an injected clock.
pub async fn start_server_at(
    dir: &std::path::Path,
    clock: tally_types::Clock,
    tweak: impl FnOnce(&mut tally_server::Config),
) -> tally_server::Server {
    let mut cfg = tally_server::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..tally_server::Config::default()
    };
    tweak(&mut cfg);
    tally_server::Server::start(cfg, clock)
        .await
        .expect("server starts")
}

/// `POST /api/v1/query?tenant=` with `{"sql": q}`: (status, body).
pub async fn post_sql(c: &reqwest::Client, base: &str, tenant: &str, q: &str) -> (u16, Value) {
    let r = c
        .post(format!("{base}/api/v1/query?tenant={tenant}"))
        .body(serde_json::json!({ "sql": q }).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

/// The rows of a `200` SQL answer for `tenant` (any other status fails).
pub async fn rows(c: &reqwest::Client, base: &str, tenant: &str, q: &str) -> Vec<Vec<Value>> {
    let (status, v) = post_sql(c, base, tenant, q).await;
    assert_eq!(status, 200, "{q}: {v}");
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().clone())
        .collect()
}

/// Waits until `tenant`'s `events` table holds `n` rows. Raw events become
/// visible to SQL on the raw store's own thread, a little after the
/// processor applied them (`wait_applied`), so a test reading `events` or
/// `sessions` waits for this instead.
pub async fn wait_events(c: &reqwest::Client, base: &str, tenant: &str, n: u64) {
    let mut last = Vec::new();
    for _ in 0..400 {
        last = rows(c, base, tenant, "SELECT count(*) FROM events").await;
        if last[0][0] == serde_json::json!(n) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{tenant}'s events never reached {n} rows: {last:?}");
}

/// A webhook receiver on a free port that records every call (the answer it
/// gave included) and fails the first `fail_first` calls with a 500.
pub struct Hook {
    pub url: String,
    pub calls: std::sync::Arc<parking_lot::Mutex<Vec<(u16, Value)>>>,
}

impl Hook {
    pub async fn start(fail_first: usize) -> Hook {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls: std::sync::Arc<parking_lot::Mutex<Vec<(u16, Value)>>> = Default::default();
        let failed = std::sync::Arc::new(AtomicUsize::new(0));
        let rec = calls.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let rec = rec.clone();
                let failed = failed.clone();
                async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let code = if failed.fetch_add(1, Ordering::SeqCst) < fail_first {
                        500
                    } else {
                        200
                    };
                    rec.lock().push((code, v));
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Hook { url, calls }
    }

    /// Waits until `n` calls were answered 2xx (or the timeout), then
    /// returns every call.
    pub async fn wait_ok(&self, n: usize, timeout: std::time::Duration) -> Vec<(u16, Value)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let calls = self.calls.lock().clone();
            if calls.iter().filter(|c| c.0 == 200).count() >= n
                || std::time::Instant::now() > deadline
            {
                return calls;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// `POST /api/v1/events` of an NDJSON body; the answer must be 200.
pub async fn post_ndjson(c: &reqwest::Client, base: &str, body: impl Into<reqwest::Body>) {
    let r = c
        .post(format!("{base}/api/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// NDJSON of JSON values, one per line.
pub fn ndjson(events: &[Value]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

/// Every file under `dir`, recursively (none if it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `n` events of tenant0 ten days before the stream, in sessions the
/// stream used (so their partitions hold the tenant's clock): late on
/// every backend, whichever partition they land in.
pub fn late_lines(lines: &[(String, Kind)], n: usize) -> Vec<String> {
    lines
        .iter()
        .filter_map(|(l, _)| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["tenant"] == "tenant0" && v["session_id"].is_string())
        .take(n)
        .enumerate()
        .map(|(i, v)| {
            format!(
                r#"{{"event_id":"late-{i}","event_type":"page_view","timestamp":"{}","tenant":"tenant0","session_id":{},"user_id":"late"}}"#,
                fmt_bucket(T0 - 10 * 86_400_000),
                v["session_id"]
            )
        })
        .collect()
}

/// An `[auth]` key for `tenant` with `scopes`.
pub fn key(secret: &str, tenant: &str, scopes: &[&str]) -> tally_server::config::KeySection {
    tally_server::config::KeySection {
        key: secret.into(),
        tenant: tenant.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..tally_server::config::KeySection::default()
    }
}

/// One session as the oracle computes it: id, user, start, end, events.
pub type OracleSession = (String, Option<String>, i64, i64, u64);

/// The sessions of `tenant`'s kept events, computed the plain way: the
/// events with one `session_id` together, every other event per user,
/// sorted by time and split where two are `gap` or more apart (derived
/// ids `<user>:<start ms>`). By id.
pub fn oracle_sessions(kept: &[Value], tenant: &str, gap: i64) -> Vec<OracleSession> {
    let mut explicit: BTreeMap<String, Vec<(i64, Option<String>)>> = BTreeMap::new();
    let mut anon: BTreeMap<Option<String>, Vec<i64>> = BTreeMap::new();
    for v in kept.iter().filter(|v| v["tenant"] == tenant) {
        let user = v["user_id"].as_str().map(str::to_string);
        match v["session_id"].as_str().filter(|s| !s.is_empty()) {
            Some(s) => explicit
                .entry(s.to_string())
                .or_default()
                .push((ts_of(v), user)),
            None => anon.entry(user).or_default().push(ts_of(v)),
        }
    }
    let mut out = Vec::new();
    for (id, evs) in explicit {
        let start = evs.iter().map(|e| e.0).min().unwrap();
        let end = evs.iter().map(|e| e.0).max().unwrap();
        let user = evs.iter().find_map(|e| e.1.clone());
        out.push((id, user, start, end, evs.len() as u64));
    }
    for (user, mut ts) in anon {
        ts.sort_unstable();
        let mut i = 0;
        while i < ts.len() {
            let mut j = i;
            while j + 1 < ts.len() && ts[j + 1] - ts[j] < gap {
                j += 1;
            }
            let id = format!("{}:{}", user.as_deref().unwrap_or(""), ts[i]);
            out.push((id, user.clone(), ts[i], ts[j], (j - i + 1) as u64));
            i = j + 1;
        }
    }
    out.sort();
    out
}

/// `tenant`'s sessions table as (id, duration, events), by id.
pub async fn session_rows(
    c: &reqwest::Client,
    base: &str,
    tenant: &str,
) -> Vec<(String, i64, u64)> {
    let mut out: Vec<(String, i64, u64)> = rows(
        c,
        base,
        tenant,
        "SELECT session_id, duration_ms, events FROM sessions",
    )
    .await
    .into_iter()
    .map(|r| {
        (
            r[0].as_str().unwrap().to_string(),
            r[1].as_i64().unwrap(),
            r[2].as_u64().unwrap(),
        )
    })
    .collect();
    out.sort();
    out
}

/// `tally_session_answers_total` by source: (index, raw).
pub async fn session_answers(c: &reqwest::Client, base: &str) -> (u64, u64) {
    let text = prom(c, base).await;
    let read = |src: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("tally_session_answers_total{{source=\"{src}\"}} "))
            })
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    (read("index"), read("raw"))
}
