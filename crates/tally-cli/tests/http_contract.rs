//! The HTTP contract (README, *Using it*) for ingest, metrics, DLQ and operations,
//! against the real server on a free port.

use serde_json::{Value, json};
use tally_server::{Config, Server};
use tally_types::Clock;

async fn start(max_body: usize) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().into(),
        ..Config::default()
    };
    cfg.ingest.max_body_bytes = max_body;
    (Server::start(cfg, Clock::system()).await.unwrap(), dir)
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    ct: &str,
    body: String,
) -> (u16, Value, Option<String>) {
    let r = c
        .post(url)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_forms_errors_and_limits() {
    let (server, _dir) = start(4096).await;
    let base = format!("http://{}", server.addr);
    let url = format!("{base}/api/v1/events");
    let c = reqwest::Client::new();

    let one = json!({"event_id": "1", "event_type": "click", "timestamp": "2026-11-01T12:00:00Z"});
    let (s, v, _) = post(&c, &url, "application/json", one.to_string()).await;
    assert_eq!(
        (s, v["accepted"].clone(), v["rejected"].clone()),
        (200, json!(1), json!(0))
    );

    let arr = json!([
        {"event_id": "2", "event_type": "click", "timestamp": 1793534400000i64},
        {"event_id": "3", "event_type": "click", "timestamp": "2026-13-01T00:00:00Z"},
        {"event_id": "4", "event_type": "view", "timestamp": "2026-11-01T12:00:01Z", "properties": {"a": {"b": 1}}}
    ]);
    let (s, v, _) = post(&c, &url, "application/json", arr.to_string()).await;
    assert_eq!(s, 200);
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["errors"][0]["index"], 1);
    assert!(
        v["errors"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("timestamp:")
    );

    let nd = "{\"event_id\":\"5\",\"event_type\":\"x\",\"timestamp\":1}\n{oops\n";
    let (s, v, _) = post(&c, &url, "application/x-ndjson", nd.into()).await;
    assert_eq!(
        (s, v["accepted"].clone(), v["errors"][0]["index"].clone()),
        (200, json!(1), json!(1))
    );

    let (s, v, _) = post(&c, &url, "application/json", "this is not json".into()).await;
    assert_eq!(s, 400);
    assert!(v["error"].is_string());

    let big = format!("[{}]", vec![one.to_string(); 100].join(","));
    let (s, v, _) = post(&c, &url, "application/json", big).await;
    assert_eq!(s, 413);
    assert!(v["error"].as_str().unwrap().contains("limit"));

    // Metrics parameter errors name the parameter.
    for (q, param) in [
        ("metric=nope", "metric"),
        ("metric=count&granularity=7m", "granularity"),
        ("metric=count&start=yesterday", "start"),
        ("metric=count&group_by=user", "group_by"),
        ("metric=count&country=US", "country"),
        ("metric=count&granularty=1h", "granularty"),
        ("metric=p95", "metric"),
        ("metric=p100:ms", "metric"),
        ("metric=count&start=now-3x", "start"),
        ("metric=count&end=2026-13-01", "end"),
    ] {
        let r = c
            .get(format!("{base}/api/v1/metrics?{q}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert!(v["error"].as_str().unwrap().starts_with(param), "{q}: {v}");
    }
    // No group_by and no data: one series with empty labels.
    let r = c
        .get(format!(
            "{base}/api/v1/metrics?metric=count&start=2020-01-01T00:00:00Z&end=2020-01-01T01:00:00Z"
        ))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["series"], json!([{"labels": {}, "points": []}]));
    // event_type may repeat.
    tally_server::http::wait_applied(&server.shared, 3, std::time::Duration::from_secs(5)).await;
    let r = c
        .get(format!("{base}/api/v1/metrics?metric=count&start=2026-11-01T12:00:00Z&end=2026-11-01T13:00:00Z&event_type=click&event_type=view&granularity=1h"))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        v["series"][0]["points"],
        json!([["2026-11-01T12:00:00Z", 3]])
    );
    // Errors say what to do: the valid parameters, the missing property.
    let metrics = |q: &'static str| {
        let c = c.clone();
        let base = base.clone();
        async move {
            let r = c
                .get(format!("{base}/api/v1/metrics?{q}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let e = metrics("metric=count&country=US").await.1;
    assert!(
        e.contains("where=country:US") && e.contains("group_by"),
        "{e}"
    );
    assert!(metrics("metric=p95").await.1.contains("p95:<property>"));
    // Dates, relative times and any percentile.
    for q in [
        "metric=count&start=2026-11-01&end=2026-11-02&event_type=click&event_type=view&granularity=1d",
        "metric=count&start=1793491200000&end=2026-11-02T00:00:00Z&event_type=click&event_type=view&granularity=1d",
    ] {
        let v: Value = serde_json::from_str(&metrics(q).await.1).unwrap();
        assert_eq!(
            v["series"][0]["points"],
            json!([["2026-11-01T00:00:00Z", 3]]),
            "{q}: {v}"
        );
    }
    for q in [
        "metric=count&start=now-30d&end=now",
        "metric=p99.9:ms&start=now-1h",
        "metric=p75:ms",
    ] {
        assert_eq!(metrics(q).await.0, 200, "{q}");
    }

    let r = c
        .get(format!("{base}/api/v1/dlq?kind=malformed"))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().any(|e| e["raw"] == "{oops"));
    assert!(entries.iter().any(|e| e["event"]["event_id"] == "3"));
    let r = c
        .get(format!("{base}/api/v1/dlq?kind=other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    for kind in ["malformed", "other"] {
        let r = c
            .post(format!("{base}/api/v1/dlq/replay?kind={kind}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "replay kind={kind}");
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert!(v["error"].as_str().unwrap().starts_with("kind:"), "{v}");
    }
    let status = || async {
        let r = c.get(format!("{base}/api/v1/status")).send().await.unwrap();
        serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()
    };
    let before = status().await;
    let late = before["events"]["late"].as_u64().unwrap();
    for want in [late, 0] {
        let r = c
            .post(format!("{base}/api/v1/dlq/replay?kind=late"))
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["applied"], want, "{v}");
    }
    let v = status().await;
    assert_eq!(v["ready"], true);
    assert_eq!(
        v["events"]["counted"].as_u64().unwrap(),
        before["events"]["counted"].as_u64().unwrap() + late,
        "{v}"
    );
    assert_eq!(v["log"]["behind_records"], 0, "{v}");

    for path in ["/healthz", "/readyz", "/", "/metrics"] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    server.stop().await.unwrap();
}

/// `GET /api/v1/openapi.json` describes every route the server serves,
/// each method with its scope, and nothing it does not serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route() {
    let (server, _dir) = start(1 << 20).await;
    let base = format!("http://{}", server.addr);
    let r = reqwest::get(format!("{base}/api/v1/openapi.json"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(
        !text.contains("(not described)"),
        "routes without a description in tally-server's openapi.rs: {}",
        doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.to_string().contains("(not described)"))
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        doc.get("x-tally-unrouted").is_none(),
        "described but not served: {}",
        doc["x-tally-unrouted"]
    );
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    assert_eq!(op("/api/v1/events", "post")["x-tally-scope"], "ingest");
    assert_eq!(op("/api/v1/alerts", "get")["x-tally-scope"], "read");
    assert_eq!(op("/api/v1/alerts", "post")["x-tally-scope"], "admin");
    assert!(op("/healthz", "get")["security"].is_null());
    let register = op(
        "/api/v1/registry/tenants/{tenant}/subjects/{subject}/versions",
        "post",
    );
    assert_eq!(register["x-tally-scope"], "ingest");
    let names: Vec<&str> = register["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tenant", "subject"]);
    assert_eq!(
        op("/api/v1/registry/subjects/{subject}", "delete")["x-tally-scope"],
        "admin"
    );
    let metrics = op("/api/v1/metrics", "get");
    assert!(
        metrics["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "group_by"),
        "{metrics}"
    );
    server.stop().await.unwrap();
}
