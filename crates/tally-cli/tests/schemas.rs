//! Tenant schemas against the real server over HTTP.
//!
//! - An event whose declared property has another type is rejected (its
//!   index, the property, the value and the type in the answer, and in the
//!   malformed DLQ); the rest of the batch is accepted; undeclared
//!   properties and tenants without a schema take anything.
//! - SQL shows each declared property as a typed column of `events`
//!   (nulls where an event lacks it), filters on them work, the view stays
//!   scoped to the tenant, and after a restart (the shutdown seals into
//!   Parquet) the same queries answer the same from the archive.

mod common;

use std::collections::BTreeMap;

use common::{T0, rows};
use serde_json::{Value, json};
use tally_types::schema::PropType;

fn schemas() -> tally_types::schema::Schemas {
    let acme: BTreeMap<String, PropType> = [
        ("page", PropType::String),
        ("duration_ms", PropType::Float),
        ("qty", PropType::Int),
        ("ok", PropType::Bool),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t))
    .collect();
    [("acme".to_string(), acme)].into_iter().collect()
}

async fn start(dir: &std::path::Path) -> tally_server::Server {
    common::start_server(dir, |cfg| {
        cfg.archive.seal_interval = "1h".into();
        cfg.schemas = schemas();
    })
    .await
}

const TYPED: &str = "SELECT event_id, page, duration_ms, qty, ok FROM events ORDER BY event_id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_properties_are_checked_and_become_typed_columns() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();

    let ev = |id: &str, tenant: &str, i: i64, props: Value| {
        json!({"event_id": id, "event_type": "view", "timestamp": T0 + i * 1000,
               "tenant": tenant, "properties": props})
    };
    let batch = json!([
        ev(
            "a1",
            "acme",
            0,
            json!({"page": "/home", "duration_ms": 12, "qty": 3, "ok": true, "utm": "x"})
        ),
        ev(
            "a2",
            "acme",
            1,
            json!({"page": "/docs", "duration_ms": 250.5, "ok": false})
        ),
        ev(
            "a3",
            "acme",
            2,
            json!({"duration_ms": "fast", "page": "/home"})
        ),
        ev("a4", "acme", 3, json!({"other": {"nested": [1, 2]}})),
        ev("a5", "acme", 4, json!({"qty": 2.5})),
        ev("z1", "zeta", 5, json!({"page": 7, "duration_ms": "fast"})),
    ]);
    let r = c
        .post(format!("{base}/api/v1/events"))
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(answer["accepted"], 4, "{answer}");
    assert_eq!(answer["rejected"], 2, "{answer}");
    let errors = answer["errors"].as_array().unwrap();
    assert_eq!(errors[0]["index"], 2);
    let e0 = errors[0]["error"].as_str().unwrap();
    assert!(
        e0.starts_with("properties.duration_ms: expected float, got \"fast\"")
            && e0.contains("acme"),
        "{e0}"
    );
    assert_eq!(errors[1]["index"], 4);
    assert!(
        errors[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("properties.qty: expected int, got 2.5")
    );

    // The malformed DLQ holds both, with the reason, under their tenant.
    let dlq = common::get(&c, format!("{base}/api/v1/dlq?kind=malformed&tenant=acme")).await;
    let text = dlq.to_string();
    assert!(
        text.contains("properties.duration_ms: expected float") && text.contains("a3"),
        "{text}"
    );
    assert!(
        text.contains("properties.qty: expected int") && text.contains("a5"),
        "{text}"
    );

    common::wait_events(&c, &base, "acme", 3).await;
    common::wait_events(&c, &base, "zeta", 1).await;
    let want = vec![
        vec![
            json!("a1"),
            json!("/home"),
            json!(12.0),
            json!(3),
            json!(true),
        ],
        vec![
            json!("a2"),
            json!("/docs"),
            json!(250.5),
            Value::Null,
            json!(false),
        ],
        vec![
            json!("a4"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
    ];
    assert_eq!(rows(&c, &base, "acme", TYPED).await, want);
    let filtered = "SELECT event_id FROM events WHERE duration_ms > 100 AND ok = false \
                    AND ts >= '2026-11-01T12:00:00Z' ORDER BY 1";
    assert_eq!(
        rows(&c, &base, "acme", filtered).await,
        vec![vec![json!("a2")]]
    );
    // Still one tenant: the view is over the tenant's own scan.
    let hostile = "SELECT count(*) FROM events WHERE tenant = 'zeta' OR page IS NULL";
    assert_eq!(rows(&c, &base, "acme", hostile).await, vec![vec![json!(1)]]);
    // A tenant without a schema has no such columns (and kept the event).
    let (status, v) = common::post_sql(&c, &base, "zeta", "SELECT page FROM events").await;
    assert_eq!(status, 400, "{v}");
    let z = rows(
        &c,
        &base,
        "zeta",
        "SELECT json_get_int(properties, 'page') FROM events",
    )
    .await;
    assert_eq!(z, vec![vec![json!(7)]]);

    // From the archive after a restart: the same answers.
    server.stop().await.unwrap();
    let server = start(dir.path()).await;
    let base = format!("http://{}", server.addr);
    common::wait_events(&c, &base, "acme", 3).await;
    assert_eq!(rows(&c, &base, "acme", TYPED).await, want);
    assert_eq!(
        rows(&c, &base, "acme", filtered).await,
        vec![vec![json!("a2")]]
    );
    server.stop().await.unwrap();
}
