//! `GET /api/v1/changes`: exactly the closed buckets whose value changed
//! after they were published — late events within the allowed lateness
//! and a replay of the late DLQ — with their old and new values; events
//! into open windows, duplicates and events too late to count change
//! nothing listed.

mod common;

use std::time::Duration;

use common::{T0, get, start_server};
use serde_json::{Value, json};

const M: i64 = 60_000;

/// One session: every event in one partition, applied in the order sent
/// (events spread over partitions may be applied behind a watermark
/// another partition moved, and then are changes too).
fn ev(id: &str, ty: &str, ts: i64) -> Value {
    json!({"event_id": id, "event_type": ty, "timestamp": ts, "user_id": id,
           "session_id": "s1", "tenant": "acme"})
}

async fn send(c: &reqwest::Client, base: &str, events: &[Value]) {
    common::post_ndjson(c, base, common::ndjson(events)).await;
}

/// (event type, bucket, old count, new count) of each change listed.
fn listed(v: &Value) -> Vec<(String, String, u64, u64)> {
    v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["kind"], "bucket", "{c}");
            (
                c["key"]["event_type"].as_str().unwrap().to_string(),
                c["key"]["bucket"].as_str().unwrap().to_string(),
                c["old"]["count"].as_u64().unwrap(),
                c["new"]["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_list_exactly_the_closed_buckets_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.stream.watermark_bound = "5s".into();
        cfg.stream.allowed_lateness = "5m".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let applied = |n| tally_server::http::wait_applied(&server.shared, n, Duration::from_secs(20));
    let url = |since: u64| format!("{base}/api/v1/changes?since={since}&tenant=acme");

    // Two clicks in each of minutes 0..3, in order; the watermark ends
    // in minute 3 (minutes 0, 1 and 2 are closed).
    let mut first = Vec::new();
    for m in 0..4 {
        for i in 0..2 {
            first.push(ev(
                &format!("c{m}-{i}"),
                "click",
                T0 + m * M + 1000 * (i + 1),
            ));
        }
    }
    first.push(ev("tick", "view", T0 + 3 * M + 30_000));
    send(&c, &base, &first).await;
    assert!(applied(9).await);
    let v = get(&c, url(0)).await;
    assert_eq!(listed(&v), vec![], "{v}");
    let v0 = v["version"].as_u64().unwrap();

    // A late click into closed minute 1, a duplicate, a click into the
    // open minute 3, and one 10 minutes late (past the lateness: DLQ).
    send(
        &c,
        &base,
        &[
            ev("late1", "click", T0 + M + 5000),
            ev("c2-0", "click", T0 + 2 * M + 1000),
            ev("open", "click", T0 + 3 * M + 40_000),
            ev("gone", "error", T0 - 10 * M),
        ],
    )
    .await;
    assert!(applied(11).await);
    let v = get(&c, url(v0)).await;
    assert_eq!(
        listed(&v),
        vec![("click".into(), "2026-11-01T12:01:00Z".into(), 2, 3)],
        "{v}"
    );
    assert_eq!(v["complete"], true);
    let c1 = &v["changes"][0];
    assert_eq!(c1["key"]["tenant"], "acme");
    assert_eq!(
        (
            c1["old"]["unique_users"].as_u64(),
            c1["new"]["unique_users"].as_u64()
        ),
        (Some(2), Some(3))
    );
    let v1 = v["version"].as_u64().unwrap();
    // Nothing new since.
    assert_eq!(listed(&get(&c, url(v1)).await), vec![]);
    // Another tenant sees none of it.
    let other = get(&c, format!("{base}/api/v1/changes?since=0&tenant=other")).await;
    assert_eq!(listed(&other), vec![]);

    // Replaying the late DLQ counts the 10-minute-late error: a change of
    // its bucket from nothing to one.
    let r = c
        .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=acme"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut got = Vec::new();
    for _ in 0..100 {
        got = listed(&get(&c, url(v1)).await);
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        got,
        vec![("error".into(), "2026-11-01T11:50:00Z".into(), 0, 1)]
    );

    // Paging: limit=1 from the start gives the first change and the
    // version to go on from.
    let p1 = get(&c, format!("{}&limit=1", url(0))).await;
    assert_eq!(listed(&p1).len(), 1);
    let p2 = get(
        &c,
        format!("{}&limit=1", url(p1["version"].as_u64().unwrap())),
    )
    .await;
    assert_eq!(listed(&p2), got);
    // A bad version says what to give.
    let r = c
        .get(format!("{base}/api/v1/changes?since=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("since"));
}
