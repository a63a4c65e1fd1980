//! Sessions over HTTP: the SQL table `sessions`, the metrics `sessions`,
//! `avg_session_duration` and `bounce_rate` by session start, and a late
//! event that joins two sessions into one everywhere.

mod common;

use std::time::Duration;

use common::{T0, get, start_server};
use serde_json::{Value, json};

const M: i64 = 60_000;

fn ev(id: &str, user: &str, session: Option<&str>, ts: i64, ty: &str, page: &str) -> Value {
    let mut e = json!({"event_id": id, "event_type": ty, "timestamp": ts, "user_id": user,
        "tenant": "acme", "properties": {"page": page}});
    if let Some(s) = session {
        e["session_id"] = json!(s);
    }
    e
}

async fn sql(c: &reqwest::Client, base: &str, q: &str) -> Vec<Vec<Value>> {
    let r = c
        .post(format!("{base}/api/v1/query?tenant=acme"))
        .header("content-type", "application/json")
        .body(json!({ "sql": q }).to_string())
        .send()
        .await
        .unwrap();
    let code = r.status();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(code, 200, "{v}");
    serde_json::from_value(v["rows"].clone()).unwrap()
}

async fn metric(c: &reqwest::Client, base: &str, m: &str) -> Vec<(String, f64)> {
    let v = get(
        c,
        format!(
            "{base}/api/v1/metrics?metric={m}&granularity=1h&start={}&end={}&tenant=acme",
            T0,
            T0 + 3 * 60 * M
        ),
    )
    .await;
    assert_eq!(v["series"][0]["labels"], json!({}), "{v}");
    v["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_a_table_and_metrics_and_late_events_join_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    // A: one explicit session over three pages. B (no session id): two
    // sessions 40 minutes apart. C: one event an hour later (a bounce).
    let first = vec![
        ev("a1", "A", Some("s-a"), T0 + M, "page_view", "/a"),
        ev("a2", "A", Some("s-a"), T0 + 4 * M, "click", "/b"),
        ev("a3", "A", Some("s-a"), T0 + 9 * M, "page_view", "/c"),
        ev("b1", "B", None, T0 + 2 * M, "page_view", "/home"),
        ev("b2", "B", None, T0 + 12 * M, "page_view", "/docs"),
        ev("b3", "B", None, T0 + 52 * M, "purchase", "/pay"),
        ev("c1", "C", None, T0 + 70 * M, "page_view", "/"),
    ];
    // One at a time in time order: users land in different partitions,
    // and none of these may be judged late.
    let mut first = first;
    first.sort_by_key(|e| e["timestamp"].as_i64());
    for (i, e) in first.iter().enumerate() {
        common::post_ndjson(&c, &base, common::ndjson(std::slice::from_ref(e))).await;
        assert!(
            tally_server::http::wait_applied(&server.shared, i as u64 + 1, Duration::from_secs(20))
                .await
        );
    }

    common::wait_events(&c, &base, "acme", first.len() as u64).await;
    let q = "SELECT session_id, user_id, duration_ms, events, first_page, last_page, event_types \
             FROM sessions ORDER BY start";
    let rows = sql(&c, &base, q).await;
    let b1 = format!("B:{}", T0 + 2 * M);
    let b3 = format!("B:{}", T0 + 52 * M);
    let c1 = format!("C:{}", T0 + 70 * M);
    assert_eq!(
        rows,
        vec![
            vec![
                json!("s-a"),
                json!("A"),
                json!(8 * M),
                json!(3),
                json!("/a"),
                json!("/c"),
                json!("click,page_view")
            ],
            vec![
                json!(b1),
                json!("B"),
                json!(10 * M),
                json!(2),
                json!("/home"),
                json!("/docs"),
                json!("page_view")
            ],
            vec![
                json!(b3),
                json!("B"),
                json!(0),
                json!(1),
                json!("/pay"),
                json!("/pay"),
                json!("purchase")
            ],
            vec![
                json!(c1),
                json!("C"),
                json!(0),
                json!(1),
                json!("/"),
                json!("/"),
                json!("page_view")
            ],
        ]
    );
    let h0 = "2026-11-01T12:00:00Z".to_string();
    let h1 = "2026-11-01T13:00:00Z".to_string();
    assert_eq!(
        metric(&c, &base, "sessions").await,
        vec![(h0.clone(), 3.0), (h1.clone(), 1.0)]
    );
    assert_eq!(
        metric(&c, &base, "avg_session_duration").await,
        vec![
            (h0.clone(), (8 * M + 10 * M) as f64 / 3.0),
            (h1.clone(), 0.0)
        ]
    );
    assert_eq!(
        metric(&c, &base, "bounce_rate").await,
        vec![(h0.clone(), 1.0 / 3.0), (h1.clone(), 1.0)]
    );
    // Durations 8m, 10m and 0 in the first hour; 0 in the second.
    assert_eq!(
        metric(&c, &base, "median_session_duration").await,
        vec![(h0.clone(), (8 * M) as f64), (h1.clone(), 0.0)]
    );

    // A late event of B between its sessions (too late for the rollups:
    // it is kept with the raw events and listed as late) joins them: one
    // session of four events from 12:02 to 12:52, everywhere.
    common::post_ndjson(
        &c,
        &base,
        common::ndjson(&[ev("b-late", "B", None, T0 + 32 * M, "click", "/x")]),
    )
    .await;
    let q = "SELECT session_id, events, duration_ms, last_page FROM sessions WHERE user_id = 'B'";
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = sql(&c, &base, q).await;
        if rows.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        rows,
        vec![vec![json!(b1), json!(4), json!(50 * M), json!("/pay")]]
    );
    assert_eq!(
        metric(&c, &base, "sessions").await,
        vec![(h0.clone(), 2.0), (h1.clone(), 1.0)]
    );
    assert_eq!(
        metric(&c, &base, "bounce_rate").await,
        vec![(h0.clone(), 0.0), (h1.clone(), 1.0)]
    );
    // 8m and 50m: the mean of the middle two.
    assert_eq!(
        metric(&c, &base, "median_session_duration").await,
        vec![(h0.clone(), (29 * M) as f64), (h1.clone(), 0.0)]
    );
    let v = get(
        &c,
        format!(
            "{base}/api/v1/sessions?tenant=acme&user_id=B&start={T0}&end={}",
            T0 + 3 * 60 * M
        ),
    )
    .await;
    assert_eq!(v["sessions"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["sessions"][0]["events"], 4);

    // A filter on start bounds the table; session metrics refuse a split.
    let rows = sql(
        &c,
        &base,
        "SELECT count(*) FROM sessions WHERE start >= TIMESTAMP '2026-11-01T13:00:00Z'",
    )
    .await;
    assert_eq!(rows, vec![vec![json!(1)]]);
    let r = c
        .get(format!(
            "{base}/api/v1/metrics?metric=sessions&group_by=country&tenant=acme"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("group_by"));
}

/// Messy input for one tenant: users with explicit sessions and without,
/// events in random order (many of them late), retried copies, pages as
/// text, as numbers or missing. Each event's time is distinct, so first
/// and last pages are defined whatever the arrival order.
fn messy(seed: u64, n: usize) -> (Vec<Value>, Vec<Value>) {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut times: Vec<i64> = (0..n as i64).map(|i| T0 + i * 7_001).collect();
    times.shuffle(&mut rng);
    let mut events: Vec<Value> = Vec::new();
    for (i, ts) in times.into_iter().enumerate() {
        let user = rng.random_range(0..30);
        let ty = ["page_view", "click", "purchase"][rng.random_range(0..3)];
        let mut e = json!({"event_id": format!("m{i}"), "tenant": "acme",
            "event_type": ty,
            "timestamp": ts, "user_id": format!("u{user}"), "properties": {}});
        match rng.random_range(0..20) {
            0 => {}
            1 => e["properties"]["page"] = json!(rng.random_range(0..5)),
            _ => e["properties"]["page"] = json!(format!("/p{}", rng.random_range(0..6))),
        }
        if rng.random_bool(0.4) {
            // A user's explicit sessions: one per 40 minutes of time.
            e["session_id"] = json!(format!("s{user}-{}", (ts - T0) / (40 * M)));
        }
        events.push(e);
    }
    // Mostly in time order, with a disordered tail and retries.
    events.sort_by_key(|e| e["timestamp"].as_i64().unwrap() / (20 * M));
    let unique = events.clone();
    let mut sent = Vec::new();
    for e in events {
        if rng.random_bool(0.05) {
            sent.push(e.clone());
        }
        sent.push(e);
    }
    (unique, sent)
}

/// Every column of the oracle's sessions: id, user, duration, events,
/// first and last page, types.
fn oracle_full(events: &[Value]) -> Vec<Vec<Value>> {
    let sessions = common::oracle_sessions(events, "acme", 30 * M);
    let page = |v: &Value| match &v["properties"]["page"] {
        Value::Null => json!(null),
        Value::String(s) => json!(s),
        n => json!(n.to_string()),
    };
    sessions
        .into_iter()
        .map(|(id, user, start, end, n)| {
            // The session's events: by id, or the user's without one in its span.
            let mine: Vec<&Value> = events
                .iter()
                .filter(|e| match e["session_id"].as_str() {
                    Some(s) => s == id,
                    None => {
                        !id.starts_with('s')
                            && e["user_id"].as_str() == user.as_deref()
                            && (start..=end).contains(&e["timestamp"].as_i64().unwrap())
                    }
                })
                .collect();
            assert_eq!(mine.len() as u64, n);
            let first = mine.iter().min_by_key(|e| e["timestamp"].as_i64()).unwrap();
            let last = mine.iter().max_by_key(|e| e["timestamp"].as_i64()).unwrap();
            let types: std::collections::BTreeSet<&str> = mine
                .iter()
                .map(|e| e["event_type"].as_str().unwrap())
                .collect();
            vec![
                json!(id),
                json!(user),
                json!(end - start),
                json!(n),
                page(first),
                page(last),
                json!(types.into_iter().collect::<Vec<_>>().join(",")),
            ]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_built_in_the_stream_match_an_oracle_and_the_raw_path() {
    let dir = tempfile::tempdir().unwrap();
    let (unique, sent) = messy(7, 1500);
    let want = oracle_full(&unique);
    assert!(want.iter().any(|r| r[0].as_str().unwrap().starts_with('s')));
    assert!(want.iter().any(|r| r[0].as_str().unwrap().starts_with('u')));
    assert!(want.iter().any(|r| r[3].as_u64().unwrap() > 5));
    let q = "SELECT session_id, user_id, duration_ms, events, first_page, last_page, event_types \
             FROM sessions ORDER BY session_id";
    let mut want_sorted = want.clone();
    want_sorted.sort_by(|a, b| a[0].as_str().cmp(&b[0].as_str()));
    // Per hour of the sessions' start: how many, and their median duration.
    let mut per_hour: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for r in &want_sorted {
        let id = r[0].as_str().unwrap();
        let start = unique
            .iter()
            .filter(|e| e["session_id"].as_str() == Some(id))
            .map(|e| e["timestamp"].as_i64().unwrap())
            .min()
            .unwrap_or_else(|| id.rsplit(':').next().unwrap().parse().unwrap());
        per_hour
            .entry(start.div_euclid(60 * M) * 60 * M)
            .or_default()
            .push(r[2].as_i64().unwrap());
    }
    let hour = |h: i64| tally_types::time::format_rfc3339(h).replace(".000", "");
    let want_hours: Vec<(String, f64)> = per_hour
        .iter()
        .map(|(&h, d)| (hour(h), d.len() as f64))
        .collect();
    let want_medians: Vec<(String, f64)> = per_hour
        .into_iter()
        .map(|(h, mut d)| {
            d.sort();
            let n = d.len();
            let m = if n % 2 == 1 {
                d[n / 2] as f64
            } else {
                (d[n / 2 - 1] + d[n / 2]) as f64 / 2.0
            };
            (hour(h), m)
        })
        .collect();
    let c = reqwest::Client::new();
    // The index on (the default), twice (the second time recovered); then
    // off, so the same answers are computed from the raw events.
    for (run, index) in [(0, true), (1, true), (2, false)] {
        let server = start_server(dir.path(), |cfg| cfg.sessions.index = index).await;
        let base = format!("http://{}", server.addr);
        if run == 0 {
            for chunk in sent.chunks(100) {
                common::post_ndjson(&c, &base, common::ndjson(chunk)).await;
            }
        }
        common::wait_events(&c, &base, "acme", unique.len() as u64).await;
        let before = common::session_answers(&c, &base).await;
        let got = sql(&c, &base, q).await;
        assert_eq!(got.len(), want_sorted.len(), "run {run}");
        for (g, w) in got.iter().zip(&want_sorted) {
            assert_eq!(g, w, "run {run}");
        }
        assert_eq!(metric(&c, &base, "sessions").await, want_hours, "run {run}");
        assert_eq!(
            metric(&c, &base, "median_session_duration").await,
            want_medians,
            "run {run}"
        );
        // One user's sessions: whole, each with an event in the range.
        let v = get(
            &c,
            format!(
                "{base}/api/v1/sessions?tenant=acme&user_id=u3&start={}&end={}",
                T0 + 30 * M,
                T0 + 60 * M
            ),
        )
        .await;
        let mut ids: Vec<&str> = v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["session_id"].as_str().unwrap())
            .collect();
        ids.sort();
        let mut want_ids: Vec<&str> = want_sorted
            .iter()
            .filter(|r| r[1] == json!("u3"))
            .filter(|r| {
                let id = r[0].as_str().unwrap();
                let start: i64 = match id.split_once(':') {
                    Some((_, t)) => t.parse().unwrap(),
                    None => unique
                        .iter()
                        .filter(|e| e["session_id"].as_str() == Some(id))
                        .map(|e| e["timestamp"].as_i64().unwrap())
                        .min()
                        .unwrap(),
                };
                let end = start + r[2].as_i64().unwrap();
                start < T0 + 60 * M && end >= T0 + 30 * M
            })
            .map(|r| r[0].as_str().unwrap())
            .collect();
        want_ids.sort();
        assert_eq!(ids, want_ids, "run {run}");
        let after = common::session_answers(&c, &base).await;
        if index {
            assert_eq!(after.0 - before.0, 4, "run {run}: from the index");
            assert_eq!(after.1, before.1, "run {run}");
        } else {
            assert_eq!(after.1 - before.1, 4, "run {run}: from the raw events");
        }
        server.stop().await.unwrap();
    }
}

/// `[sessions] gap` sets the gap of the index, the SQL table and the
/// API's default; another `gap` on the API is computed from the raw
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_gap_splits_sessions_and_another_one_reads_the_raw_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| cfg.sessions.gap = "10m".into()).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let evs = vec![
        ev("g1", "G", None, T0, "page_view", "/a"),
        ev("g2", "G", None, T0 + 5 * M, "page_view", "/b"),
        ev("g3", "G", None, T0 + 20 * M, "page_view", "/c"),
    ];
    common::post_ndjson(&c, &base, common::ndjson(&evs)).await;
    common::wait_events(&c, &base, "acme", 3).await;
    let rows = sql(
        &c,
        &base,
        "SELECT session_id, events FROM sessions ORDER BY start",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            vec![json!(format!("G:{T0}")), json!(2)],
            vec![json!(format!("G:{}", T0 + 20 * M)), json!(1)]
        ]
    );
    let before = common::session_answers(&c, &base).await;
    let url = |gap: &str| {
        format!(
            "{base}/api/v1/sessions?tenant=acme&user_id=G&start={}&end={}{gap}",
            T0,
            T0 + 60 * M
        )
    };
    let n = |v: Value| v["sessions"].as_array().unwrap().len();
    assert_eq!(n(get(&c, url("")).await), 2);
    assert_eq!(n(get(&c, url("&gap=30m")).await), 1);
    let after = common::session_answers(&c, &base).await;
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1));
    server.stop().await.unwrap();
}
