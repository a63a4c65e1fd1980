//! An event counted on time and re-sent after its window became final is
//! judged late (its dedupe entry has expired) and lands in the late DLQ.
//! Replaying the DLQ must not count it a second time: the raw store shows
//! it was received before. A genuinely late event is still applied.

mod common;

use std::time::Duration;

use common::{T0, get, post_ndjson};
use serde_json::{Value, json};

const MIN: i64 = 60_000;

async fn status_events(c: &reqwest::Client, base: &str) -> Value {
    get(c, format!("{base}/api/v1/status")).await["events"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_counted_event_is_not_counted_again_by_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    // One partition: the watermark follows the stream directly.
    let server = common::start_server(dir.path(), |cfg| cfg.log.partitions = 1).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let ev = |id: &str, ts: i64| json!({"event_id": id, "event_type": "click", "timestamp": ts, "tenant": "acme", "user_id": "u1"});
    post_ndjson(
        &c,
        &base,
        common::ndjson(&[ev("x", T0), ev("a", T0 + 1000)]),
    )
    .await;
    // Half an hour later in event time: T0's window is final, x's dedupe
    // entry is gone.
    post_ndjson(&c, &base, common::ndjson(&[ev("b", T0 + 30 * MIN)])).await;
    // x again (a client retrying an old batch) and y, never seen before.
    post_ndjson(
        &c,
        &base,
        common::ndjson(&[ev("x", T0), ev("y", T0 + 2000)]),
    )
    .await;
    for _ in 0..200 {
        if status_events(&c, &base).await["late"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_events(&c, &base).await["late"], 2);
    let r = c
        .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["applied"], 1, "{v}");
    assert_eq!(v["already_counted"], 1, "{v}");
    assert_eq!(v["skipped"], 1, "{v}");
    let m = get(
        &c,
        format!(
            "{base}/api/v1/metrics?metric=count&granularity=1m&tenant=acme&start={T0}&end={}",
            T0 + MIN
        ),
    )
    .await;
    assert_eq!(
        m["series"][0]["points"],
        json!([[common::fmt_bucket(T0), 3]]),
        "x, a and y once each"
    );
    // A second replay applies nothing more.
    let r = c
        .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=acme"))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["applied"], 0, "{v}");
    server.stop().await.unwrap();
}
