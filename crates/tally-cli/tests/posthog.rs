//! PostHog's own Python SDK (PyPI `posthog`, installed by `scripts/test` /
//! `.ci/run`) sends to Tally unchanged, gzip included: `$pageview`,
//! `$screen` and custom events become events with the mapped types, ids,
//! users, sessions and properties; a retried event counts once; in keyed
//! mode the project API key is a Tally key, and an unknown one is refused.

mod common;

use std::time::Duration;

use common::start_server;
use serde_json::{Value, json};

const SDK_SCRIPT: &str = r#"
import sys, datetime
from posthog import Posthog
host, key = sys.argv[1], sys.argv[2]
errors = []
p = Posthog(key, host=host, sync_mode=True, gzip=True, max_retries=0,
            on_error=lambda e, batch: errors.append(repr(e)))
t = datetime.datetime(2026, 11, 1, 12, 0, 30, tzinfo=datetime.timezone.utc)
ids = ["00000000-0000-4000-8000-00000000000%d" % i for i in range(1, 5)]
view = {"$current_url": "https://shop.example/", "$session_id": "sess-1", "country": "DE"}
p.capture("$pageview", distinct_id="u1", properties=view, timestamp=t, uuid=ids[0])
p.capture("$pageview", distinct_id="u1", properties=view, timestamp=t, uuid=ids[0])
p.capture("Order Completed", distinct_id="u1", properties={"revenue": 42.5, "$session_id": "sess-1"}, timestamp=t, uuid=ids[1])
p.capture("$screen", distinct_id="u2", properties={"$screen_name": "Home"}, timestamp=t, uuid=ids[2])
p.capture("signed up", distinct_id="u3", timestamp=t, uuid=ids[3])
p.shutdown()
if errors:
    print("errors:", errors)
    sys.exit(1)
print("sent")
"#;

fn run_sdk(base: &str, key: &str) -> std::process::Output {
    std::process::Command::new("python3")
        .args(["-c", SDK_SCRIPT, base, key])
        .output()
        .expect("python3 runs (scripts/test installs posthog)")
}

/// Events per type in the hour of the SDK's events, for `tenant`.
async fn per_type(
    c: &reqwest::Client,
    base: &str,
    tenant: &str,
    key: Option<&str>,
) -> Vec<(String, u64)> {
    let mut r = c.get(format!("{base}/api/v1/metrics?metric=count&group_by=event_type&granularity=1h&start=2026-11-01T12:00:00Z&end=2026-11-01T13:00:00Z&tenant={tenant}"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let v: Value = serde_json::from_str(&r.send().await.unwrap().text().await.unwrap()).unwrap();
    let mut got: Vec<(String, u64)> = v["series"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|s| {
            (
                s["labels"]["event_type"].as_str().unwrap().to_string(),
                s["points"][0][1].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    got
}

fn want() -> Vec<(String, u64)> {
    vec![
        ("order_completed".into(), 1),
        ("page_view".into(), 1),
        ("screen_view".into(), 1),
        ("signed_up".into(), 1),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthogs_python_sdk_sends_to_tally_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let out = run_sdk(&base, "phc_any_project_key");
    assert!(
        out.status.success(),
        "the SDK failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c = reqwest::Client::new();
    assert!(tally_server::http::wait_applied(&server.shared, 4, Duration::from_secs(20)).await);
    assert_eq!(per_type(&c, &base, "default", None).await, want());
    common::wait_events(&c, &base, "default", 4).await;
    let r = c
        .post(format!("{base}/api/v1/query"))
        .header("content-type", "application/json")
        .body(json!({"sql": "SELECT event_id, event_type, user_id, session_id, \
            json_get_str(properties, '$current_url') AS url, json_get_float(properties, 'revenue') AS revenue, \
            json_get_str(properties, '$lib') AS lib, json_get_str(properties, 'token') AS token, ts \
            FROM events ORDER BY event_id"}).to_string())
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{v}");
    let view = &rows[0];
    assert_eq!(view[0], "00000000-0000-4000-8000-000000000001");
    assert_eq!(view[1], "page_view");
    assert_eq!(view[2], "u1");
    assert_eq!(view[3], "sess-1");
    assert_eq!(view[4], "https://shop.example/");
    assert_eq!(view[6], "posthog-python");
    assert!(view[7].is_null(), "the project key is not stored: {view}");
    assert_eq!(rows[1][5], 42.5);
    // The SDK's clock is this machine's: the timestamp stays within the
    // time the request took.
    let ts = tally_types::time::parse_rfc3339(view[8].as_str().unwrap()).unwrap();
    let sent = tally_types::time::parse_rfc3339("2026-11-01T12:00:30Z").unwrap();
    assert!((ts - sent).abs() < 5_000, "{}", view[8]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_project_key_is_a_tally_key_in_keyed_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.auth.keys = vec![
            tally_server::config::KeySection {
                key: "phc-ingest-0123456789".into(),
                tenant: "acme".into(),
                scopes: vec!["ingest".into(), "read".into()],
                name: "posthog".into(),
                ..Default::default()
            },
            tally_server::config::KeySection {
                key: "read-only-0123456789".into(),
                tenant: "acme".into(),
                scopes: vec!["read".into()],
                name: "reader".into(),
                ..Default::default()
            },
        ];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let out = run_sdk(&base, "phc-ingest-0123456789");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let c = reqwest::Client::new();
    assert!(tally_server::http::wait_applied(&server.shared, 4, Duration::from_secs(20)).await);
    assert_eq!(
        per_type(&c, &base, "acme", Some("read-only-0123456789")).await,
        want()
    );
    // A body with an unknown key, without one, or with a key that cannot
    // ingest: refused, nothing counted.
    let body = |key: Option<&str>| {
        let mut b = json!({"batch": [{"event": "x", "distinct_id": "u", "uuid": "00000000-0000-4000-8000-0000000000ff"}]});
        if let Some(k) = key {
            b["api_key"] = json!(k);
        }
        b.to_string()
    };
    for (key, status) in [
        (Some("phc-wrong"), 401),
        (None, 401),
        (Some("read-only-0123456789"), 403),
    ] {
        let r = c
            .post(format!("{base}/batch/"))
            .body(body(key))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{key:?}");
        let text = r.text().await.unwrap();
        assert!(text.contains("key"), "{text}");
    }
    // The single-event form on /capture/ with the key as `token`.
    let r = c
        .post(format!("{base}/capture/"))
        .body(
            json!({"event": "$pageview", "token": "phc-ingest-0123456789", "distinct_id": "u9",
            "uuid": "00000000-0000-4000-8000-000000000009", "timestamp": "2026-11-01T12:10:00Z"})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(tally_server::http::wait_applied(&server.shared, 5, Duration::from_secs(20)).await);
    let got = per_type(&c, &base, "acme", Some("read-only-0123456789")).await;
    assert!(got.contains(&("page_view".into(), 2)), "{got:?}");
    server.stop().await.unwrap();
}
