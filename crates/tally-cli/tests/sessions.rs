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
