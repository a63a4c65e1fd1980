//! Hostile and careless input against the real server over HTTP: one
//! tenant's event time never judges another's, the ingest answer says what
//! went late, the late DLQ never drops an acknowledged event, history goes
//! in as a backfill beside live traffic, junk costs bounded memory,
//! invented event types and property names cost bounded work, low
//! priority events are shed first, and no SQL query takes the server down.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use tally_server::config::KeySection;
use tally_types::time::{MINUTE_MS, format_rfc3339};

const HOUR: i64 = 3_600_000;

fn now_ms() -> i64 {
    tally_types::Clock::system().now_ms()
}

fn ev(id: &str, ts: i64, tenant: &str) -> Value {
    json!({"event_id": id, "event_type": "page_view", "timestamp": ts, "tenant": tenant, "user_id": "u1"})
}

struct Api {
    c: reqwest::Client,
    base: String,
}

impl Api {
    fn of(server: &tally_server::Server) -> Api {
        Api {
            c: reqwest::Client::new(),
            base: format!("http://{}", server.addr),
        }
    }

    async fn send(&self, path: &str, key: Option<&str>, body: String) -> (u16, Value) {
        let mut r = self
            .c
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-ndjson")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn events(&self, evs: &[Value]) -> Value {
        let (s, v) = self.send("/api/v1/events", None, common::ndjson(evs)).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .c
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn count(&self, tenant: &str, from: i64, to: i64) -> f64 {
        let (s, v) = self
            .get(&format!(
                "/api/v1/metrics?metric=count&start={from}&end={to}&granularity=1d&tenant={tenant}"
            ))
            .await;
        assert_eq!(s, 200, "{v}");
        v["series"][0]["points"]
            .as_array()
            .map_or(0.0, |p| p.iter().map(|x| x[1].as_f64().unwrap()).sum())
    }

    /// The status once it shows `tenant`'s watermark: the processor
    /// publishes tenant clocks at most every 100 ms, not per record.
    async fn status_showing(&self, tenant: &str) -> Value {
        let mut st = Value::Null;
        for _ in 0..250 {
            st = self.get("/api/v1/status").await.1;
            if st["watermarks"][tenant].is_string() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        st
    }

    /// The count once the processor applied what was acknowledged (an
    /// answer means durable; the rollups follow within milliseconds).
    async fn count_settled(&self, tenant: &str, from: i64, to: i64, want: f64) -> f64 {
        let mut got = 0.0;
        for _ in 0..250 {
            got = self.count(tenant, from, to).await;
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        got
    }

    /// Sends `evs` (tenant `acme`, all in the minute at `t`), waits until
    /// they are all counted, and answers the metrics query `q` over that
    /// minute.
    async fn minute_of(&self, evs: &[Value], t: i64, q: &str) -> Value {
        self.events(evs).await;
        let n = evs.len() as f64;
        assert_eq!(self.count_settled("acme", t, t + MINUTE_MS, n).await, n);
        let (s, v) = self
            .get(&format!(
                "/api/v1/metrics?{q}&granularity=1m&start={t}&end={}&tenant=acme",
                t + MINUTE_MS
            ))
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    async fn healthy(&self) -> bool {
        matches!(self.get("/healthz").await, (200, _))
    }
}

/// The probe that blinded every tenant: one event of tenant `evil` in the
/// year 2100 (accepted here only because the skew limit is lifted), then
/// tenant `good`'s events of today. They all count, the answer says none
/// was late, the status shows two clocks, and all of it after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_in_the_year_2100_never_judges_another_tenants_events() {
    let dir = tempfile::tempdir().unwrap();
    let tweak = |cfg: &mut tally_server::Config| cfg.ingest.max_future_skew = "36500d".into();
    let server = common::start_server(dir.path(), tweak).await;
    let api = Api::of(&server);
    let y2100 = 4_102_444_800_000;
    let v = api.events(&[ev("f", y2100, "evil")]).await;
    assert_eq!(
        (v["accepted"].as_u64(), v["late"].as_u64()),
        (Some(1), Some(0))
    );
    let now = now_ms();
    let good: Vec<Value> = (0..50)
        .map(|i| ev(&format!("g{i}"), now - i * 1000, "good"))
        .collect();
    let v = api.events(&good).await;
    assert_eq!(
        (v["accepted"].as_u64(), v["late"].as_u64()),
        (Some(50), Some(0)),
        "{v}"
    );
    let from = now - 2 * HOUR;
    assert_eq!(
        api.count_settled("good", from, now + HOUR, 50.0).await,
        50.0
    );
    let st = api.status_showing("good").await;
    assert_eq!(st["watermarks"]["evil"], format_rfc3339(y2100 - 5000));
    let good_wm = st["watermarks"]["good"].as_str().unwrap();
    assert!(good_wm < "2100", "{st}");
    let (_, late) = api.get("/api/v1/dlq?kind=late&tenant=good").await;
    assert_eq!(late["entries"].as_array().unwrap().len(), 0);
    server.stop().await.unwrap();

    let server = common::start_server(dir.path(), tweak).await;
    let api = Api::of(&server);
    assert_eq!(
        api.count_settled("good", from, now + HOUR, 50.0).await,
        50.0
    );
    let more: Vec<Value> = (50..60)
        .map(|i| ev(&format!("g{i}"), now - i * 1000, "good"))
        .collect();
    let v = api.events(&more).await;
    assert_eq!(v["late"].as_u64(), Some(0), "{v}");
    assert_eq!(
        api.count_settled("good", from, now + HOUR, 60.0).await,
        60.0
    );
    server.stop().await.unwrap();
}

/// With the default skew (10 minutes) the same event is rejected, with a
/// message naming the timestamp, the server's clock and the setting; and an
/// ingest-only key of one tenant cannot name another with `?tenant=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_the_future_are_rejected_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.auth.keys = vec![KeySection {
            key: "evil-ingest".into(),
            tenant: "evil".into(),
            scopes: vec!["ingest".into()],
            ..KeySection::default()
        }];
    })
    .await;
    let api = Api::of(&server);
    let now = now_ms();
    let body = common::ndjson(&[
        json!({"event_id": "f", "event_type": "x", "timestamp": "2100-01-01T00:00:00Z"}),
        json!({"event_id": "soon", "event_type": "x", "timestamp": now + 5 * MINUTE_MS}),
        json!({"event_id": "later", "event_type": "x", "timestamp": now + 20 * MINUTE_MS}),
    ]);
    let (s, v) = api
        .send("/api/v1/events", Some("evil-ingest"), body.clone())
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(1), Some(2)),
        "{v}"
    );
    let e = v["errors"][0]["error"].as_str().unwrap();
    assert!(
        e.starts_with("timestamp: 2100-01-01T00:00:00Z is ")
            && e.contains("ahead of the server's clock (")
            && e.contains("ingest.max-future-skew"),
        "{e}"
    );
    assert_eq!(v["errors"][1]["index"], 2);
    let (s, v) = api
        .send("/api/v1/events?tenant=good", Some("evil-ingest"), body)
        .await;
    assert_eq!(s, 403, "{v}");
    server.stop().await.unwrap();
}

/// `late` in the ingest answer counts the accepted events that went to the
/// late DLQ, and each entry names the watermark that judged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_answer_says_how_many_events_went_late() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let api = Api::of(&server);
    let now = now_ms();
    let v = api.events(&[ev("now", now, "acme")]).await;
    assert_eq!(v["late"], 0);
    let v = api
        .events(&[
            ev("old1", now - HOUR, "acme"),
            ev("ok", now - MINUTE_MS, "acme"),
            ev("old2", now - 2 * HOUR, "acme"),
        ])
        .await;
    assert_eq!(
        (v["accepted"].as_u64(), v["late"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    // Another tenant's history is its own business.
    let v = api.events(&[ev("old1", now - HOUR, "globex")]).await;
    assert_eq!(v["late"], 0, "{v}");
    let (_, dlq) = api.get("/api/v1/dlq?kind=late&tenant=acme").await;
    let entries = dlq["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let reason = entries[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("tenant \"acme\"'s watermark is 20"),
        "{reason}"
    );
    server.stop().await.unwrap();
}

/// A new tenant's three hours of history, and then a live tenant's own
/// history sent with `?backfill=true`, both while the live tenant keeps
/// sending: every event counts once, nothing goes late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_goes_in_beside_a_live_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let api = Api::of(&server);
    let now = now_ms();
    let start = now - 3 * HOUR;
    let mut live_n = 0;
    let mut hist_n = 0;
    // 36 requests of 5 minutes of history each, a live request between.
    for step in 0..36 {
        let live = ev(&format!("live{step}"), now_ms(), "live");
        let v = api.events(&[live]).await;
        assert_eq!(v["late"], 0);
        live_n += 1;
        let hist: Vec<Value> = (0..50)
            .map(|i| {
                let ts = start + step * 5 * MINUTE_MS + i * 6000;
                ev(&format!("h{step}_{i}"), ts, "newco")
            })
            .collect();
        hist_n += hist.len();
        let v = api.events(&hist).await;
        assert_eq!(v["late"], 0, "step {step}: {v}");
    }
    let day = (now - 86_400_000, now + HOUR);
    assert_eq!(
        api.count_settled("newco", day.0, day.1, hist_n as f64)
            .await,
        hist_n as f64
    );
    // The live tenant's own history: late on the live path ...
    let v = api.events(&[ev("mine0", start, "live")]).await;
    assert_eq!(v["late"], 1, "{v}");
    // ... counted as a backfill, once, with a duplicate of a live event in it.
    for step in 0..12 {
        let mut hist: Vec<Value> = (0..20)
            .map(|i| {
                ev(
                    &format!("mine{step}_{i}"),
                    start + step * 15 * MINUTE_MS + i * 1000,
                    "live",
                )
            })
            .collect();
        hist.push(ev("live0", 0, "live"));
        let last = hist.len() - 1;
        hist[last]["timestamp"] = json!(start + step * 15 * MINUTE_MS);
        let (s, v) = api
            .send("/api/v1/events?backfill=true", None, common::ndjson(&hist))
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["late"], 0, "backfill step {step}: {v}");
        let v = api
            .events(&[ev(&format!("live_b{step}"), now_ms(), "live")])
            .await;
        assert_eq!(v["late"], 0);
        live_n += 1;
    }
    let st = api.status_showing("live").await;
    assert!(st["watermarks"]["live"].is_string(), "{st}");
    let want = (live_n + 12 * 20) as f64;
    assert_eq!(api.count_settled("live", day.0, day.1, want).await, want);
    server.stop().await.unwrap();
}

/// `dlq.capacity` unreplayed late events fill a tenant's late DLQ: then its
/// possibly late events are refused (429 for them, the rest of the batch
/// taken), nothing is dropped, and a replay makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_late_dlq_refuses_instead_of_dropping() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| cfg.dlq.capacity = 5).await;
    let api = Api::of(&server);
    let now = now_ms();
    api.events(&[ev("now", now, "acme")]).await;
    let late: Vec<Value> = (0..5)
        .map(|i| ev(&format!("l{i}"), now - HOUR - i, "acme"))
        .collect();
    let v = api.events(&late).await;
    assert_eq!(v["late"], 5, "{v}");
    // Full: a late event alone is a 429; beside an on-time one, refused alone.
    let (s, v) = api
        .send(
            "/api/v1/events",
            None,
            common::ndjson(&[ev("l5", now - HOUR, "acme")]),
        )
        .await;
    assert_eq!(s, 429, "{v}");
    assert!(
        v["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("dlq.capacity"),
        "{v}"
    );
    let v = api
        .events(&[ev("l5", now - HOUR, "acme"), ev("ok", now, "acme")])
        .await;
    assert_eq!(
        (v["accepted"].as_u64(), v["refused"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(v["errors"][0]["status"], 429);
    // Other tenants are not affected.
    let v = api
        .events(&[ev("x", now, "globex"), ev("y", now - HOUR, "globex")])
        .await;
    assert_eq!(v["accepted"], 2);
    let prom = common::prom(&api.c, &api.base).await;
    assert!(prom.contains("tally_dlq_late_full_tenants 1"), "{prom}");
    assert!(
        prom.contains("tally_events_refused_late_dlq_full_total 2"),
        "{prom}"
    );
    let (_, dlq) = api.get("/api/v1/dlq?kind=late&tenant=acme").await;
    assert_eq!(dlq["entries"].as_array().unwrap().len(), 5);
    // A replay applies them and makes room.
    let r = api
        .c
        .post(format!(
            "{}/api/v1/dlq/replay?kind=late&tenant=acme",
            api.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = api.events(&[ev("l5", now - HOUR, "acme")]).await;
    assert_eq!(
        (v["accepted"].as_u64(), v["late"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    server.stop().await.unwrap();
}

/// 300,000 `{}` lines: the answer lists 100 errors and counts the rest, the
/// malformed DLQ keeps the first thousand, and the server's memory does not
/// grow with the junk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_lines_cost_memory_bounded_by_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| cfg.dlq.capacity = 100_000).await;
    let api = Api::of(&server);
    let body = "{}\n".repeat(300_000);
    let (s, v) = api.send("/api/v1/events", None, body).await;
    assert_eq!(s, 200);
    assert_eq!(v["rejected"], 300_000);
    assert_eq!(v["errors"].as_array().unwrap().len(), 100);
    assert_eq!(v["errors_omitted"], 300_000 - 100);
    assert!(v.to_string().len() < 20_000);
    let (_, dlq) = api.get("/api/v1/dlq?kind=malformed&limit=100000").await;
    assert_eq!(dlq["entries"].as_array().unwrap().len(), 1000);
    server.stop().await.unwrap();
}

/// A client inventing an event type per event (a user id pasted into the
/// type) cannot make each event a new aggregate: past the cap the
/// rollups count them under `__other__`, every event still counted, and
/// the raw events keep their types for SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_event_types_are_folded_past_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| cfg.dimensions.max_event_types = 50).await;
    let api = Api::of(&server);
    let t = align(now_ms()) - 2 * MINUTE_MS;
    let evs: Vec<Value> = (0..3000)
        .map(|i| {
            let mut e = ev(&format!("e{i}"), t + i % 1000, "acme");
            e["event_type"] = json!(format!("type-{i}"));
            e
        })
        .collect();
    let v = api
        .minute_of(&evs, t, "metric=count&group_by=event_type")
        .await;
    let series = v["series"].as_array().unwrap();
    assert_eq!(series.len(), 51, "50 types and __other__");
    let other = series
        .iter()
        .find(|x| x["labels"]["event_type"] == "__other__")
        .expect("an __other__ series");
    assert_eq!(other["points"][0][1], 2950);
    let prom = common::prom(&api.c, &api.base).await;
    assert!(
        prom.contains("tally_event_types_folded_total 2950"),
        "{prom}"
    );
    // The events themselves keep their types.
    common::wait_events(&api.c, &api.base, "acme", 3000).await;
    let rows = common::rows(
        &api.c,
        &api.base,
        "acme",
        "SELECT count(DISTINCT event_type) FROM events",
    )
    .await;
    assert_eq!(rows[0][0], 3000);
    server.stop().await.unwrap();
}

/// Numeric property names invented per event (ids pasted into names): an
/// aggregate keeps the first 128 properties, every event is counted, the
/// sums of the kept ones stay exact, and the values left out are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_property_names_cost_bounded_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let api = Api::of(&server);
    let t = align(now_ms()) - 2 * MINUTE_MS;
    let evs: Vec<Value> = (0..3000)
        .map(|i| {
            let mut e = ev(&format!("e{i}"), t + i % 1000, "acme");
            let mut props = serde_json::Map::new();
            props.insert("revenue".into(), json!(2));
            for j in 0..50 {
                props.insert(format!("m{i}_{j}"), json!(j));
            }
            e["properties"] = Value::Object(props);
            e
        })
        .collect();
    let v = api.minute_of(&evs, t, "metric=sum:revenue").await;
    assert_eq!(v["series"][0]["points"][0][1], 6000, "{v}");
    let prom = common::prom(&api.c, &api.base).await;
    // 3000 events of 50 invented values each; 127 of them were kept.
    assert!(
        prom.contains("tally_properties_dropped_total 149873"),
        "{prom}"
    );
    server.stop().await.unwrap();
}

fn align(t: i64) -> i64 {
    t - t.rem_euclid(MINUTE_MS)
}

/// Under overload (here: a tiny in-flight budget, so every request counts
/// as one) the low-priority types are refused with 429 and counted; the
/// others in the same batch are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_priority_events_are_shed_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.ingest.max_inflight_bytes = 1000;
        cfg.shedding.low_priority = vec!["ping".into()];
    })
    .await;
    let api = Api::of(&server);
    let now = now_ms();
    let mut evs = Vec::new();
    for i in 0..4 {
        evs.push(json!({"event_id": format!("p{i}"), "event_type": "ping", "timestamp": now}));
        evs.push(json!({"event_id": format!("b{i}"), "event_type": "purchase", "timestamp": now}));
    }
    let v = api.events(&evs).await;
    assert_eq!(
        (v["accepted"].as_u64(), v["refused"].as_u64()),
        (Some(4), Some(4)),
        "{v}"
    );
    assert!(
        v["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("shedding.low-priority")
    );
    let prom = common::prom(&api.c, &api.base).await;
    assert!(prom.contains("tally_events_shed_total 4"), "{prom}");
    server.stop().await.unwrap();
}

/// The queries that killed or bloated the server answer 4xx naming the
/// limit, and the server keeps answering health checks and ingest; then a
/// few hundred random queries over the same table leave it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sql_query_takes_the_server_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.query.memory_limit = 64 << 20;
        cfg.query.timeout = "2s".into();
    })
    .await;
    let api = Api::of(&server);
    let now = now_ms();
    for chunk in 0..10 {
        let evs: Vec<Value> = (0..2000)
            .map(|i| {
                let mut e = ev(&format!("e{chunk}_{i}"), now - i, "default");
                e["properties"] = json!({"page": format!("/p/{i}"), "ms": i, "text": "x".repeat((i % 300) as usize)});
                e
            })
            .collect();
        api.events(&evs).await;
    }
    // The raw store publishes within 20 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for q in [
        "SELECT max(length(repeat(properties, 100000))) FROM events",
        "SELECT length(repeat('x', 1500000000))",
        "SELECT cardinality(range(1, 1000000000))",
        "SELECT length(lpad('x', 2000000000, 'y'))",
        "SELECT cardinality(array_repeat(properties, 100000)) FROM events",
        "SELECT count(*) FROM events WHERE length(rpad(event_id, 50000000)) > 0",
    ] {
        let (s, v) = common::post_sql(&api.c, &api.base, "default", q).await;
        assert!((400..500).contains(&s), "{q}: {s} {v}");
        assert!(
            v["error"].as_str().unwrap().contains("query.memory-limit"),
            "{q}: {v}"
        );
        assert!(api.healthy().await, "{q}");
    }
    // Random queries from a small grammar of functions and arguments.
    let funcs = [
        "repeat(event_id, {n})",
        "lpad(event_type, {n})",
        "rpad(properties, {n}, 'ab')",
        "replace(properties, '\"', repeat('q', {n}))",
        "regexp_replace(event_id, '', repeat('z', {n}), 'g')",
        "cardinality(range(0, {n}))",
        "cardinality(generate_series(1, {n}, 3))",
        "array_repeat(event_id, {n})",
        "concat(properties, properties, properties)",
        "string_agg(properties, ',')",
        "array_agg(repeat(event_id, {n}))",
        "json_get_str(properties, 'page')",
        "to_hex({n})",
        "substr(properties, {n})",
    ];
    let sizes = [0i64, 1, 7, 1000, 100_000, 10_000_000, 3_000_000_000, -5];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    let mut server_errors = 0;
    for i in 0..200 {
        let f = funcs[rnd(funcs.len())].replace("{n}", &sizes[rnd(sizes.len())].to_string());
        let q = match rnd(4) {
            0 => format!("SELECT {f} FROM events LIMIT 3"),
            1 => format!("SELECT count(*) FROM events WHERE {f} IS NOT NULL"),
            2 => format!("SELECT event_type, max({f}) FROM events GROUP BY 1"),
            _ => format!("SELECT {f}"),
        };
        let (s, v) = common::post_sql(&api.c, &api.base, "default", &q).await;
        if s >= 500 {
            server_errors += 1;
            eprintln!("{i}: {q}: {s} {v}");
        }
        assert!(api.healthy().await, "server down after {q}");
    }
    assert_eq!(server_errors, 0);
    // And ingest still works.
    let v = api.events(&[ev("after", now_ms(), "default")]).await;
    assert_eq!(v["accepted"], 1);
    server.stop().await.unwrap();
}

/// Open mode lets no other web page drive the server: no CORS answer
/// unless `auth.cors-origins` names the page's origin, the live WebSocket
/// refuses foreign `Origin`s (its own pages and configured origins pass),
/// and open mode refuses to listen beyond loopback without
/// `--insecure-open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_answers_no_foreign_web_page() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let api = Api::of(&server);
    let r = api
        .c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/query", api.base),
        )
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = api
        .c
        .post(format!("{}/api/v1/query", api.base))
        .header("origin", "https://evil.example")
        .body(r#"{"sql": "SELECT 1"}"#)
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let ws = |origin: &str| {
        let mut req = format!("ws://{}/api/v1/live", server.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let err = ws("https://evil.example").await.expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    let own = format!("http://{}", server.addr);
    assert!(ws(&own).await.is_ok(), "the server's own page");
    server.stop().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.auth.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let api = Api::of(&server);
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let r = api
            .c
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/v1/events", api.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers().get("access-control-allow-origin").is_some(),
            allowed,
            "{origin}"
        );
    }
    let mut req = format!("ws://{}/api/v1/live", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    server.stop().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = tally_server::Config {
        listen: "0.0.0.0:0".into(),
        data_dir: dir.path().to_path_buf(),
        ..tally_server::Config::default()
    };
    let err = tally_server::Server::start(cfg, tally_types::Clock::system())
        .await
        .err()
        .expect("open mode beyond loopback is refused");
    assert!(err.to_string().contains("--insecure-open"), "{err}");
}

/// In keyed mode (tenants are not trusted) a rule's webhook cannot point
/// at internal addresses in any spelling, carry credentials, or come in
/// unbounded numbers; `alerts.allow-targets` opens what an operator chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_never_reach_internal_addresses_in_keyed_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.auth.keys = vec![KeySection {
            key: "acme-admin".into(),
            tenant: "acme".into(),
            scopes: vec!["admin".into()],
            ..KeySection::default()
        }];
        cfg.alerts.allow_targets = vec!["127.0.0.2".into()];
        cfg.alerts.max_rules_per_tenant = 3;
    })
    .await;
    let api = Api::of(&server);
    let rule = |name: &str, urls: &[String]| {
        let notify: Vec<Value> = urls.iter().map(|u| json!({"webhook": u})).collect();
        json!({"name": name, "metric": "count", "granularity": "1m",
            "detector": {"kind": "threshold", "op": "<", "value": 1}, "notify": notify})
        .to_string()
    };
    let create = |body: String| {
        api.c
            .post(format!("{}/api/v1/alerts", api.base))
            .bearer_auth("acme-admin")
            .body(body)
            .send()
    };
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:7070/api/v1/query",
        "http://[::1]:9000/hook",
        "http://2130706433/hook",
        "http://localhost:9000/hook",
        "http://10.0.0.5/hook",
        "http://user:pw@hooks.example/x",
    ] {
        let r = create(rule("r", &[url.to_string()])).await.unwrap();
        assert_eq!(r.status(), 400, "{url}");
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("notify[0].webhook"),
            "{url}: {v}"
        );
    }
    let long = format!("https://hooks.example/{}", "a".repeat(3000));
    assert_eq!(create(rule("r", &[long])).await.unwrap().status(), 400);
    let many: Vec<String> = (0..11)
        .map(|i| format!("https://hooks.example/{i}"))
        .collect();
    assert_eq!(create(rule("r", &many)).await.unwrap().status(), 400);
    // Allowed by the operator; and at most three rules.
    for i in 0..3 {
        let r = create(rule(&format!("ok{i}"), &["http://127.0.0.2:9/hook".into()]))
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let r = create(rule("one-too-many", &["https://hooks.example/x".into()]))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("delete one first"));
    server.stop().await.unwrap();
}

/// Each tenant's malformed events go to its own file (one tenant's flood
/// cannot rotate another's evidence away), an invalid UTF-8 line is kept
/// (invalid bytes as U+FFFD), and both come back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_evidence_is_kept_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let api = Api::of(&server);
    let mut body = b"{\"tenant\":\"acme\",\"event_id\":\"x\"}\n".to_vec();
    body.extend_from_slice(b"{\"tenant\":\"globex\",\"event_id\":\"caf\xe9\"}\n");
    body.extend_from_slice(b"{\"tenant\":\"globex\",\"event_type\":\"t\"}\n");
    common::post_ndjson(&api.c, &api.base, body).await;
    let files = dir.path().join("dlq/malformed");
    assert!(files.join("acme.ndjson").exists());
    assert!(files.join("globex.ndjson").exists());
    let check = |api: Api| async move {
        let (_, v) = api.get("/api/v1/dlq?kind=malformed&tenant=default").await;
        let kept = v["entries"][0].to_string();
        assert!(kept.contains("caf\u{fffd}"), "{v}");
        let (_, v) = api.get("/api/v1/dlq?kind=malformed&tenant=globex").await;
        assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");
        let (_, v) = api.get("/api/v1/dlq?kind=malformed&tenant=acme").await;
        assert_eq!(v["entries"].as_array().unwrap().len(), 1, "{v}");
    };
    check(Api::of(&server)).await;
    server.stop().await.unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    check(Api::of(&server)).await;
    server.stop().await.unwrap();
}

/// Slow clients cannot hold the server: connections that never finish
/// their headers are closed after `http.header-timeout` (so a request
/// waiting behind the connection cap gets in), and a body that stalls is
/// answered 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_the_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.http.max_connections = 3;
        cfg.http.header_timeout = "500ms".into();
        cfg.http.body_timeout = "500ms".into();
    })
    .await;
    let api = Api::of(&server);
    let mut slow = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // All three slots are taken: this one is served once they are cut.
    assert!(api.healthy().await);
    for mut s in slow {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the slow connection is closed")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"POST /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: 1000\r\n\r\n{\"event_id\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("a stalled body is answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    server.stop().await.unwrap();
}

/// `tally replay` from a later point than 0 shrinks the state to what was
/// appended since: without `--yes` (and no terminal to ask) it refuses and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_replay_asks_before_it_shrinks_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let api = Api::of(&server);
    api.events(&[ev("a", now_ms(), "acme")]).await;
    server.stop().await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["replay", "--from", "1", "--data-dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--yes"), "{err}");
    assert!(
        !std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("state.old-")),
        "nothing was swapped"
    );
}

/// A key's status shows its tenant's counts and clock, not the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_status_counts_only_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.auth.keys = ["acme", "globex"]
            .iter()
            .map(|t| KeySection {
                key: format!("{t}-admin"),
                tenant: t.to_string(),
                scopes: vec!["admin".into()],
                ..KeySection::default()
            })
            .collect();
    })
    .await;
    let api = Api::of(&server);
    let now = now_ms();
    for (t, n) in [("acme", 3), ("globex", 5)] {
        let evs: Vec<Value> = (0..n)
            .map(
                |i| json!({"event_id": format!("{t}{i}"), "event_type": "x", "timestamp": now - i}),
            )
            .collect();
        let key = format!("{t}-admin");
        let (s, v) = api
            .send("/api/v1/events", Some(&key), common::ndjson(&evs))
            .await;
        assert_eq!(s, 200, "{v}");
    }
    for (t, n) in [("acme", 3), ("globex", 5)] {
        let mut counted = 0;
        for _ in 0..200 {
            let r = api
                .c
                .get(format!("{}/api/v1/status", api.base))
                .bearer_auth(format!("{t}-admin"))
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            counted = v["events"]["counted"].as_u64().unwrap();
            if counted == n {
                assert_eq!(v["watermarks"].as_object().unwrap().len(), 1, "{v}");
                assert!(v["events"].get("corrections").is_none());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(counted, n, "{t}");
    }
    server.stop().await.unwrap();
}

/// No answer shows where the server keeps its data: archive files deleted
/// behind the server's back make SQL fail, and the error names the file
/// relative to the data dir, never by its absolute path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_never_show_absolute_paths() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |cfg| {
        cfg.archive.seal_interval = "1s".into();
    })
    .await;
    let api = Api::of(&server);
    let now = now_ms();
    let evs: Vec<Value> = (0..20)
        .map(|i| ev(&format!("p{i}"), now - i * 100, "acme"))
        .collect();
    api.events(&evs).await;
    let parquet = |d: &std::path::Path| {
        common::files_under(d)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
            .collect::<Vec<_>>()
    };
    let mut files = Vec::new();
    for _ in 0..200 {
        files = parquet(&dir.path().join("archive"));
        if !files.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!files.is_empty(), "the archive sealed nothing");
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    // The sealed file can still be shadowed by its hot rows for a moment
    // (they are dropped once the manifest names the file): ask until the
    // query reads the archive.
    let (mut status, mut v) = (0, serde_json::Value::Null);
    for _ in 0..100 {
        (status, v) = common::post_sql(&api.c, &api.base, "acme", "SELECT * FROM events").await;
        if status >= 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(status >= 400, "{status} {v}");
    let text = v.to_string();
    let abs = dir.path().display().to_string();
    assert!(!text.contains(&abs), "absolute path in {text}");
    let canon = dir.path().canonicalize().unwrap().display().to_string();
    assert!(!text.contains(&canon), "absolute path in {text}");
    server.stop().await.unwrap();
}
