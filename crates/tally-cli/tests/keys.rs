//! Keyed mode and quotas against the real server over HTTP.
//!
//! - A missing, malformed or unknown key is 401, a key without the route's
//!   scope 403; health, readiness and the dashboard page need no key.
//! - The key names the tenant: events without a `tenant` field land in the
//!   key's tenant, an event naming another tenant is rejected (its index and
//!   the field in the answer), and the rest of the batch is accepted.
//! - No read path reaches another tenant: `?tenant=` or a body `tenant`
//!   naming another is 403, and hostile SQL finds nothing of it.
//! - A late event sent with a key (no `tenant` field) is replayed into the
//!   key's tenant, not "default".
//! - Per-tenant quotas: over the limit is 429 + Retry-After and nothing of
//!   the request is counted; the bucket refills with (injected) time.

mod common;

use std::time::Duration;

use common::{T0, key};
use serde_json::{Value, json};
use tally_server::config::QuotaSection;

const MIN: i64 = 60_000;

struct Api {
    c: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut r = self.c.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let (s, v, _) = self.call(reqwest::Method::GET, path, key, None).await;
        (s, v)
    }

    async fn post(&self, path: &str, key: Option<&str>, body: String) -> (u16, Value) {
        let (s, v, _) = self
            .call(reqwest::Method::POST, path, key, Some(body))
            .await;
        (s, v)
    }

    async fn sql(&self, key: &str, sql: &str) -> (u16, Value) {
        self.post(
            "/api/v1/query",
            Some(key),
            json!({ "sql": sql }).to_string(),
        )
        .await
    }

    /// Waits until SQL over `events` sees `n` rows of the key's tenant.
    async fn wait_rows(&self, key: &str, n: u64) {
        for _ in 0..250 {
            let (_, v) = self.sql(key, "SELECT count(*) FROM events").await;
            if v["rows"][0][0].as_u64() == Some(n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the raw store did not show {n} events");
    }

    /// Counts per minute of the key's tenant as (bucket, count).
    async fn counts(&self, key: &str) -> Value {
        let (s, v) = self
            .get(
                &format!(
                    "/api/v1/metrics?metric=count&granularity=1m&start={T0}&end={}",
                    T0 + 60 * MIN
                ),
                Some(key),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["series"][0]["points"].clone()
    }
}

fn ev(id: &str, ts: i64) -> Value {
    json!({"event_id": id, "event_type": "click", "timestamp": ts, "user_id": "u1", "session_id": "s1"})
}

/// Waits until the processor applied every acknowledged record (a key's
/// status counts only its own tenant's events, so `counted` of the other
/// tenants cannot be read here).
async fn settle(api: &Api, admin: &str, counted: u64) {
    for _ in 0..250 {
        let (_, v) = api.get("/api/v1/status", Some(admin)).await;
        if v["log"]["behind_records"] == 0 && v["log"]["applied_lsn"].as_u64() > Some(0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the processor did not count {counted} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scope_every_route_to_one_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.auth.cors_origins = vec!["*".into()];
        cfg.log.partitions = 1;
        cfg.stream.allowed_lateness = "1m".into();
        cfg.auth.keys = vec![
            key("acme-ingest-0123456789", "acme", &["ingest"]),
            key("acme-read-0123456789", "acme", &["read"]),
            key("acme-admin-0123456789", "acme", &["admin"]),
            key("globex-all-0123456789", "globex", &["ingest", "read"]),
        ];
    })
    .await;
    let api = Api {
        c: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
    };
    let (ingest, read, admin, globex) = (
        "acme-ingest-0123456789",
        "acme-read-0123456789",
        "acme-admin-0123456789",
        "globex-all-0123456789",
    );
    let batch = common::ndjson(&[ev("a1", T0), ev("a2", T0 + 1000)]);

    // Who may come in.
    let (s, v, h) = api
        .call(
            reqwest::Method::POST,
            "/api/v1/events",
            None,
            Some(batch.clone()),
        )
        .await;
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"), "{v}");
    assert_eq!(h["www-authenticate"], "Bearer realm=\"tally\"");
    assert_eq!(
        api.post("/api/v1/events", Some("no-such-key"), batch.clone())
            .await
            .0,
        401
    );
    let r = api
        .c
        .get(format!("{}/api/v1/metrics?metric=count", api.base))
        .header("authorization", format!("Basic {read}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "only Bearer keys");
    let (s, v) = api.post("/api/v1/events", Some(read), batch.clone()).await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("ingest"), "{v}");
    for open in ["/healthz", "/readyz", "/", "/metrics"] {
        assert_eq!(api.get(open, None).await.0, 200, "{open}");
    }
    // A browser page elsewhere (a web app sending events) may call the API:
    // the preflight needs no key, the answer names the origin.
    let r = api
        .c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/events", api.base),
        )
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");
    let r = api
        .c
        .post(format!("{}/api/v1/events", api.base))
        .header("origin", "https://shop.example")
        .body(batch.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "CORS lets the page ask, not skip the key");
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(api.get("/api/v1/status", Some(read)).await.0, 403);
    assert_eq!(api.get("/api/v1/status", Some(admin)).await.0, 200);
    // The live feed takes the key as ?access_token= (browsers cannot set
    // headers on a WebSocket): not refused by the auth layer with it.
    assert_eq!(api.get("/api/v1/live", None).await.0, 401);
    let (s, _) = api
        .get(&format!("/api/v1/live?access_token={read}"), None)
        .await;
    assert_ne!(s, 401);
    assert_ne!(s, 403);

    // The key names the tenant; an event naming another is rejected alone.
    let mut mixed = vec![ev("a1", T0), ev("a2", T0 + 1000)];
    mixed.push(
        json!({"event_id": "a3", "event_type": "click", "timestamp": T0 + 2000, "tenant": "acme"}),
    );
    mixed.push(json!({"event_id": "g-smuggled", "event_type": "click", "timestamp": T0, "tenant": "globex"}));
    let (s, v) = api
        .post("/api/v1/events", Some(ingest), common::ndjson(&mixed))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["accepted"], 3, "{v}");
    assert_eq!(v["errors"][0]["index"], 3, "{v}");
    assert!(
        v["errors"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("tenant:"),
        "{v}"
    );
    let g: Vec<Value> = (0..5).map(|i| ev(&format!("g{i}"), T0 + i * 100)).collect();
    let (s, v) = api
        .post("/api/v1/events", Some(globex), common::ndjson(&g))
        .await;
    assert_eq!((s, v["accepted"].clone()), (200, json!(5)), "{v}");
    settle(&api, admin, 8).await;
    // The raw store publishes what the processor applied within ~20 ms.
    api.wait_rows(read, 3).await;
    api.wait_rows(globex, 5).await;

    // Reads see the key's tenant only.
    assert_eq!(api.counts(read).await, json!([[common::fmt_bucket(T0), 3]]));
    assert_eq!(
        api.counts(globex).await,
        json!([[common::fmt_bucket(T0), 5]])
    );
    let (s, v) = api
        .get(
            "/api/v1/metrics?metric=count&granularity=1m&tenant=globex",
            Some(read),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("globex"), "{v}");
    assert_eq!(
        api.get("/api/v1/metrics?metric=count&tenant=acme", Some(read))
            .await
            .0,
        200,
        "naming its own tenant is fine"
    );
    assert_eq!(
        api.get("/api/v1/metrics?metric=count", Some(ingest))
            .await
            .0,
        403
    );
    for path in [
        "/api/v1/dlq?kind=malformed&tenant=globex",
        "/api/v1/sessions?tenant=globex",
        "/api/v1/alerts?tenant=globex",
        "/api/v1/alerts/history?tenant=globex",
    ] {
        assert_eq!(api.get(path, Some(read)).await.0, 403, "{path}");
    }
    let (s, v) = api
        .get(
            &format!("/api/v1/sessions?start={T0}&end={}", T0 + MIN),
            Some(read),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["sessions"][0]["events"], 2,
        "a1 and a2 (a3 has no user): {v}"
    );
    let (s, v) = api.get("/api/v1/dlq?kind=malformed", Some(read)).await;
    assert_eq!(s, 200);
    assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        api.get("/api/v1/dlq?kind=malformed", Some(globex)).await.1["entries"],
        json!([])
    );

    // SQL: the key's tenant, whatever the SQL says.
    let (s, v) = api
        .sql(
            read,
            "SELECT tenant, count(*) AS n FROM events GROUP BY tenant",
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rows"], json!([["acme", 3]]));
    for hostile in [
        "SELECT count(*) AS n FROM events WHERE tenant = 'globex'",
        "SELECT count(*) AS n FROM (SELECT * FROM events UNION ALL SELECT * FROM events WHERE tenant <> 'acme') t WHERE tenant = 'globex'",
    ] {
        let (s, v) = api.sql(read, hostile).await;
        assert_eq!(s, 200, "{hostile}: {v}");
        assert_eq!(v["rows"], json!([[0]]), "{hostile}");
    }
    let (s, v) = api
        .post(
            "/api/v1/query",
            Some(read),
            json!({"sql": "SELECT count(*) FROM events", "tenant": "globex"}).to_string(),
        )
        .await;
    assert_eq!(s, 403, "{v}");

    // Alerts: changes need admin; each tenant sees its own rules.
    let rule = json!({"name": "many-clicks", "metric": "count", "granularity": "1m",
        "detector": {"kind": "threshold", "op": ">", "value": 1000}});
    assert_eq!(
        api.post("/api/v1/alerts", Some(read), rule.to_string())
            .await
            .0,
        403
    );
    let (s, v) = api
        .post("/api/v1/alerts", Some(admin), rule.to_string())
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["tenant"], "acme", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (s, v) = api.get("/api/v1/alerts", Some(read)).await;
    assert_eq!(s, 200);
    assert_eq!(v["alerts"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        api.get("/api/v1/alerts", Some(globex)).await.1["alerts"],
        json!([])
    );
    assert_eq!(
        api.get(&format!("/api/v1/alerts/{id}"), Some(globex))
            .await
            .0,
        404,
        "another tenant's rule does not exist for this key"
    );
    let (s, _, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/alerts/{id}"),
            Some(read),
            None,
        )
        .await;
    assert_eq!(s, 403);

    // A late event sent with a key has no tenant field; its replay still
    // corrects the key's tenant.
    let (s, _) = api
        .post(
            "/api/v1/events",
            Some(ingest),
            common::ndjson(&[ev("a-later", T0 + 30 * MIN)]),
        )
        .await;
    assert_eq!(s, 200);
    settle(&api, admin, 9).await;
    let (s, _) = api
        .post(
            "/api/v1/events",
            Some(ingest),
            common::ndjson(&[ev("a-late", T0 + 3000)]),
        )
        .await;
    assert_eq!(s, 200);
    for _ in 0..250 {
        if api.get("/api/v1/status", Some(admin)).await.1["events"]["late"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, v) = api.get("/api/v1/dlq?kind=late", Some(read)).await;
    assert_eq!(s, 200);
    assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        api.post("/api/v1/dlq/replay?kind=late", Some(read), String::new())
            .await
            .0,
        403
    );
    assert_eq!(
        api.post(
            "/api/v1/dlq/replay?kind=late&tenant=globex",
            Some(admin),
            String::new()
        )
        .await
        .0,
        403
    );
    let (s, v) = api
        .post("/api/v1/dlq/replay?kind=late", Some(admin), String::new())
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["applied"].clone(), v["tenant"].clone()),
        (json!(1), json!("acme")),
        "{v}"
    );
    let counts = api.counts(read).await;
    assert_eq!(counts[0], json!([common::fmt_bucket(T0), 4]), "{counts}");
    api.wait_rows(admin, 5).await; // a1 a2 a3 a-later a-late
    let (_, v) = api.sql(globex, "SELECT count(*) FROM events").await;
    assert_eq!(v["rows"], json!([[5]]));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_gets_429_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = tally_types::Clock::manual(T0);
    let server = common::start_server_at(dir.path(), clock.clone(), |cfg| {
        cfg.auth.cors_origins = vec!["https://shop.example".into()];
        cfg.quotas.events_per_second = 100;
        cfg.quotas.tenants.insert(
            "big".into(),
            QuotaSection {
                events_per_second: 100_000,
                burst_events: 0,
            },
        );
    })
    .await;
    let api = Api {
        c: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
    };
    let batch = |tenant: &str, from: usize, n: usize| {
        let evs: Vec<Value> = (from..from + n)
            .map(|i| {
                let mut e = ev(&format!("e{i}"), T0 + i as i64);
                e["tenant"] = json!(tenant);
                e
            })
            .collect();
        common::ndjson(&evs)
    };
    assert_eq!(
        api.post("/api/v1/events", None, batch("small", 0, 100))
            .await
            .0,
        200
    );
    let (s, v, h) = api
        .call(
            reqwest::Method::POST,
            "/api/v1/events",
            None,
            Some(batch("small", 100, 10)),
        )
        .await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(h["retry-after"], "1");
    // Only the configured origin gets CORS headers.
    for (origin, allowed) in [
        ("https://shop.example", true),
        ("https://evil.example", false),
    ] {
        let r = api
            .c
            .get(format!("{}/healthz", api.base))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string()),
            allowed.then(|| origin.to_string()),
            "{origin}"
        );
    }
    assert!(v["error"].as_str().unwrap().contains("\"small\""), "{v}");
    // Another tenant has its own bucket (and here its own limit); a batch
    // mixing the two is refused whole while one of them is over.
    assert_eq!(
        api.post("/api/v1/events", None, batch("big", 0, 5000))
            .await
            .0,
        200
    );
    let both = batch("big", 5000, 10) + &batch("small", 200, 1);
    assert_eq!(api.post("/api/v1/events", None, both).await.0, 429);
    // A second later the bucket holds 100 again.
    clock.advance(1000);
    assert_eq!(
        api.post("/api/v1/events", None, batch("small", 100, 10))
            .await
            .0,
        200
    );
    let prom = common::prom(&api.c, &api.base).await;
    assert!(prom.contains("tally_ingest_over_quota_total 2"), "{prom}");
    let (_, v) = api.get("/api/v1/status", None).await;
    let want = 100 + 5000 + 10;
    for _ in 0..250 {
        if api.get("/api/v1/status", None).await.1["events"]["counted"] == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, v2) = api.get("/api/v1/status", None).await;
    assert_eq!(
        v2["events"]["counted"], want,
        "refused requests stored nothing; before: {v}"
    );
    server.stop().await.unwrap();
}
