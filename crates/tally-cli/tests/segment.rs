//! Segment's own Python SDK (PyPI `segment-analytics-python`, installed by
//! `scripts/test` / `.ci/run`) sends to Tally unchanged, gzip included:
//! track, page, screen and identify calls become events with the mapped
//! types, ids, users and properties; a retried message counts once; in
//! keyed mode the write key is a Tally key given as basic auth. Plain
//! `POST /api/v1/events` takes gzip bodies too.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::{get, start_server};
use serde_json::{Value, json};

const SDK_SCRIPT: &str = r#"
import sys, datetime
from segment.analytics.client import Client
host, key = sys.argv[1], sys.argv[2]
errors = []
c = Client(write_key=key, host=host, gzip=True, sync_mode=True, max_retries=0,
           on_error=lambda e, batch: errors.append(repr(e)))
t = datetime.datetime(2026, 11, 1, 12, 0, 30, tzinfo=datetime.timezone.utc)
c.track("u1", "Order Completed", {"revenue": 42.5, "country": "DE"}, timestamp=t, message_id="m-1")
c.track("u1", "Order Completed", {"revenue": 42.5, "country": "DE"}, timestamp=t, message_id="m-1")
c.track(None, "Signed Up", {"plan": "pro"}, timestamp=t, anonymous_id="anon-7", message_id="m-2")
c.page("u2", "Docs", "Install", {"path": "/docs/install"}, timestamp=t, message_id="m-3")
c.screen("u3", None, "Home", timestamp=t, message_id="m-4")
c.identify("u1", {"plan": "enterprise"}, timestamp=t, message_id="m-5")
c.flush()
if errors:
    print("errors:", errors)
    sys.exit(1)
print("sent")
"#;

fn run_sdk(base: &str, key: &str) -> std::process::Output {
    std::process::Command::new("python3")
        .args(["-c", SDK_SCRIPT, base, key])
        .output()
        .expect("python3 runs (scripts/test installs segment-analytics-python)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_python_sdk_sends_to_tally_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let out = run_sdk(&base, "any-write-key");
    assert!(
        out.status.success(),
        "the SDK failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c = reqwest::Client::new();
    assert!(tally_server::http::wait_applied(&server.shared, 5, Duration::from_secs(20)).await);
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=count&group_by=event_type&granularity=1h&start=2026-11-01T12:00:00Z&end=2026-11-01T13:00:00Z"),
    )
    .await;
    let mut got: Vec<(String, u64)> = v["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["labels"]["event_type"].as_str().unwrap().to_string(),
                s["points"][0][1].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("identify".into(), 1),
            ("order_completed".into(), 1),
            ("page_view".into(), 1),
            ("screen_view".into(), 1),
            ("signed_up".into(), 1),
        ],
        "{v}"
    );
    common::wait_events(&c, &base, "default", 5).await;
    let r = c
        .post(format!("{base}/api/v1/query"))
        .header("content-type", "application/json")
        .body(json!({"sql": "SELECT event_id, event_type, user_id, json_get_float(properties, 'revenue') AS revenue, \
            json_get_str(properties, 'name') AS name, json_get_str(properties, 'context.library.name') AS lib, ts \
            FROM events ORDER BY event_id"}).to_string())
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{v}");
    let row = |id: &str| {
        rows.iter()
            .find(|r| r[0] == id)
            .unwrap_or_else(|| panic!("{id} in {v}"))
    };
    assert_eq!(row("m-1")[1], "order_completed");
    assert_eq!(row("m-1")[3], 42.5);
    assert_eq!(row("m-1")[5], "analytics-python");
    assert_eq!(
        row("m-2")[2],
        "anon-7",
        "anonymousId when there is no userId"
    );
    assert_eq!(row("m-3")[4], "Install");
    assert_eq!(row("m-4")[4], "Home");
    // The SDK's clock is this machine's: the timestamp stays within the
    // time the request took.
    let ts = tally_types::time::parse_rfc3339(row("m-1")[6].as_str().unwrap()).unwrap();
    let sent = tally_types::time::parse_rfc3339("2026-11-01T12:00:30Z").unwrap();
    assert!((ts - sent).abs() < 5_000, "{}", row("m-1")[6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_key_is_a_tally_key_and_gzip_works_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.auth.keys = vec![tally_server::config::KeySection {
            key: "wk-ingest-0123456789".into(),
            tenant: "acme".into(),
            scopes: vec!["ingest".into(), "read".into()],
            name: "segment".into(),
            ..Default::default()
        }];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let out = run_sdk(&base, "wk-ingest-0123456789");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let c = reqwest::Client::new();
    // An unknown write key is refused.
    let r = c
        .post(format!("{base}/v1/track"))
        .basic_auth("not-a-key", Some(""))
        .body(r#"{"userId": "u", "event": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A message that cannot map is rejected by its index, the rest kept.
    let r = c
        .post(format!("{base}/v1/batch"))
        .basic_auth("wk-ingest-0123456789", Some(""))
        .body(
            json!({"batch": [
                {"type": "track", "userId": "u", "messageId": "b-1", "event": "Ok", "timestamp": "2026-11-01T12:00:40Z"},
                {"type": "track", "userId": "u", "messageId": "b-2"},
            ]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(v["errors"][0]["index"], 1, "{v}");
    assert_eq!(v["success"], false);
    // gzip on the native ingest path.
    let line = json!({"event_id": "gz-1", "event_type": "click", "timestamp": "2026-11-01T12:00:50Z", "user_id": "u"});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("{line}\n").as_bytes()).unwrap();
    let r = c
        .post(format!("{base}/api/v1/events"))
        .bearer_auth("wk-ingest-0123456789")
        .header("content-encoding", "gzip")
        .header("content-type", "application/x-ndjson")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["accepted"], 1, "{v}");
    let r = c
        .post(format!("{base}/api/v1/events"))
        .bearer_auth("wk-ingest-0123456789")
        .header("content-encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("gzip"));
    assert!(tally_server::http::wait_applied(&server.shared, 7, Duration::from_secs(20)).await);
    let v = get_keyed(&c, format!("{base}/api/v1/metrics?metric=count&granularity=1h&start=2026-11-01T12:00:00Z&end=2026-11-01T13:00:00Z")).await;
    assert_eq!(v["series"][0]["points"][0][1], 7, "{v}");
}

async fn get_keyed(c: &reqwest::Client, url: String) -> Value {
    let r = c
        .get(&url)
        .bearer_auth("wk-ingest-0123456789")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}
