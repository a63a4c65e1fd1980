//! Rollup retention with an injected clock: minutes older than the minute
//! retention become hours (hour answers unchanged, 1m answers say where
//! minutes start), hours older than the hour retention are deleted, both
//! survive restarts, and the metrics cache never serves what retention
//! changed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{T0, counter, fmt_bucket, get, points, post_ndjson, prom};
use serde_json::{Value, json};
use tally_types::Clock;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
const TYPES: [&str; 3] = ["page_view", "click", "error"];

/// Three hours of acme traffic (1–3 events a minute) and a globex event
/// every ten minutes; returns what the 1h counts per type must be.
fn traffic() -> (Vec<Value>, BTreeMap<(String, String), f64>) {
    let mut events = Vec::new();
    let mut want = BTreeMap::new();
    for m in 0..180i64 {
        for k in 0..(m % 3 + 1) {
            let ty = TYPES[((m + k) % 3) as usize];
            let ts = T0 + m * MIN + k * 1000;
            events.push(json!({"event_id": format!("e{m}_{k}"), "event_type": ty,
                "timestamp": ts, "tenant": "acme", "user_id": format!("u{}", m % 7)}));
            *want
                .entry((ty.to_string(), fmt_bucket(ts - ts.rem_euclid(HOUR))))
                .or_insert(0.0) += 1.0;
        }
        if m % 10 == 0 {
            events.push(json!({"event_id": format!("g{m}"), "event_type": "click",
                "timestamp": T0 + m * MIN, "tenant": "globex"}));
        }
    }
    (events, want)
}

async fn metrics(c: &reqwest::Client, base: &str, gran: &str) -> (Value, String) {
    let r = c
        .get(format!(
            "{base}/api/v1/metrics?metric=count&start={}&end={}&granularity={gran}&group_by=event_type&tenant=acme",
            T0 - HOUR,
            T0 + 4 * HOUR
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cache = r.headers()["x-tally-cache"].to_str().unwrap().to_string();
    (
        serde_json::from_str(&r.text().await.unwrap()).unwrap(),
        cache,
    )
}

/// Waits until `/api/v1/status` shows the rollup horizons.
async fn wait_horizons(c: &reqwest::Client, base: &str, minutes: i64, hours: i64) -> Value {
    let want_hours = json!(fmt_bucket(hours));
    for _ in 0..200 {
        let st = get(c, format!("{base}/api/v1/status")).await;
        let r = &st["retention"]["rollups"];
        if r["minutes_from"] == json!(fmt_bucket(minutes)) && r["hours_from"] == want_hours {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = get(c, format!("{base}/api/v1/status")).await;
    panic!(
        "retention never reached minutes_from {}: {st}",
        fmt_bucket(minutes)
    );
}

/// Waits until the processor counted `n` events.
async fn wait_counted(c: &reqwest::Client, base: &str, n: u64) {
    for _ in 0..200 {
        if get(c, format!("{base}/api/v1/status")).await["events"]["counted"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the processor never counted {n} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minutes_become_hours_then_hours_expire_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(T0 + 4 * HOUR);
    let tweak = |cfg: &mut tally_server::Config| {
        cfg.retention.interval = "50ms".into();
        cfg.retention.minute_rollups = "1d".into();
        cfg.retention.hour_rollups = "3d".into();
    };
    let c = reqwest::Client::new();
    let (events, want) = traffic();
    let server = common::start_server_at(dir.path(), clock.clone(), tweak).await;
    let base = format!("http://{}", server.addr);
    // In event-time order, two minutes per request: a request's events are
    // split over partitions, and a request spanning more than the allowed
    // lateness could make one partition's events late behind another's.
    let mut chunk = Vec::new();
    for e in &events {
        let ts = e["timestamp"].as_i64().unwrap();
        if chunk
            .first()
            .is_some_and(|f: &Value| ts - f["timestamp"].as_i64().unwrap() >= 2 * MIN)
        {
            post_ndjson(&c, &base, common::ndjson(&chunk)).await;
            chunk.clear();
        }
        chunk.push(e.clone());
    }
    post_ndjson(&c, &base, common::ndjson(&chunk)).await;
    // Later traffic makes the three hours final: the other partitions go
    // idle (wall clock) and the watermark passes them by the lateness.
    clock.advance(MIN);
    post_ndjson(
        &c,
        &base,
        common::ndjson(&[json!({"event_id": "late-enough", "event_type": "click",
            "timestamp": T0 + 3 * HOUR + 10 * MIN, "tenant": "acme"})]),
    )
    .await;
    let mut want = want;
    want.insert(("click".into(), fmt_bucket(T0 + 3 * HOUR)), 1.0);
    wait_counted(&c, &base, events.len() as u64 + 1).await;
    let (before, cache) = metrics(&c, &base, "1h").await;
    assert_eq!(points(&before), want);
    assert_eq!(cache, "miss");
    let (again, cache) = metrics(&c, &base, "1h").await;
    assert_eq!((again, cache.as_str()), (before.clone(), "hit"));
    let (minutes_before, _) = metrics(&c, &base, "1m").await;
    assert!(minutes_before.get("downsampled_before").is_none());

    // A day later: minutes before T0+2h (a whole hour, final) become hours;
    // hours are kept from three days back (there are none that old).
    clock.set(T0 + DAY + 2 * HOUR + 30 * MIN);
    let st = wait_horizons(&c, &base, T0 + 2 * HOUR, T0 + 2 * HOUR - 2 * DAY).await;
    // 120 acme minutes and 12 globex minutes were folded.
    assert_eq!(st["retention"]["rollups"]["minutes_downsampled"], 132);
    assert_eq!(st["retention"]["rollups"]["minute_retention"], "1d");
    let (after, cache) = metrics(&c, &base, "1h").await;
    assert_eq!(cache, "miss", "retention changed the data under the entry");
    assert_eq!(points(&after), want, "hour answers are unchanged");
    let (minutes, _) = metrics(&c, &base, "1m").await;
    assert_eq!(minutes["downsampled_before"], fmt_bucket(T0 + 2 * HOUR));
    let kept: BTreeMap<_, _> = points(&minutes_before)
        .into_iter()
        .filter(|((_, t), _)| *t >= fmt_bucket(T0 + 2 * HOUR))
        .collect();
    assert_eq!(points(&minutes), kept);
    // The SQL rollup table reads the hours too.
    let (status, v) = common::post_sql(
        &c,
        &base,
        "acme",
        "SELECT CAST(sum(count) AS BIGINT) AS n FROM rollups_1h",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rows"][0][0], want.values().sum::<f64>() as i64);
    let text = prom(&c, &base).await;
    assert_eq!(
        counter(&text, "tally_rollup_minutes_downsampled_total"),
        132
    );
    server.stop().await.unwrap();

    // Restart: the hours and the horizon come back from the checkpoint.
    let server = common::start_server_at(dir.path(), clock.clone(), tweak).await;
    let base = format!("http://{}", server.addr);
    wait_horizons(&c, &base, T0 + 2 * HOUR, T0 + 2 * HOUR - 2 * DAY).await;
    assert_eq!(points(&metrics(&c, &base, "1h").await.0), want);
    assert_eq!(metrics(&c, &base, "1m").await.0, minutes);

    // Three days after T0+1h: the first hour is deleted (and the third
    // hour, final and now two days old, is folded too).
    clock.set(T0 + 3 * DAY + HOUR + 30 * MIN);
    wait_horizons(&c, &base, T0 + 3 * HOUR, T0 + HOUR).await;
    let first = fmt_bucket(T0);
    let want_later: BTreeMap<_, _> = want
        .iter()
        .filter(|((_, t), _)| *t != first)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(points(&metrics(&c, &base, "1h").await.0), want_later);
    let text = prom(&c, &base).await;
    // The first hour: one acme bucket and one globex bucket.
    assert_eq!(counter(&text, "tally_rollup_buckets_deleted_total"), 2);
    server.stop().await.unwrap();
    let server = common::start_server_at(dir.path(), clock.clone(), tweak).await;
    let base = format!("http://{}", server.addr);
    wait_horizons(&c, &base, T0 + 3 * HOUR, T0 + HOUR).await;
    assert_eq!(points(&metrics(&c, &base, "1h").await.0), want_later);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_answer_is_recomputed_when_an_event_lands_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let ev = |id: &str, ts: i64| json!({"event_id": id, "event_type": "click", "timestamp": ts, "tenant": "acme"});
    // The watermark ends just past T0+1h: the window of T0+59m is closed
    // but still within the allowed lateness (5m).
    post_ndjson(
        &c,
        &base,
        common::ndjson(&[ev("a", T0), ev("b", T0 + HOUR + 2 * MIN)]),
    )
    .await;
    let url = format!(
        "{base}/api/v1/metrics?metric=count&start={T0}&end={}&granularity=1h&tenant=acme",
        T0 + HOUR
    );
    let fetch = |url: String| {
        let c = c.clone();
        async move {
            let r = c.get(url).send().await.unwrap();
            let cache = r.headers()["x-tally-cache"].to_str().unwrap().to_string();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (v["series"][0]["points"].clone(), cache)
        }
    };
    wait_counted(&c, &base, 2).await;
    assert_eq!(
        fetch(url.clone()).await,
        (json!([[fmt_bucket(T0), 1]]), "miss".into())
    );
    assert_eq!(
        fetch(url.clone()).await,
        (json!([[fmt_bucket(T0), 1]]), "hit".into())
    );
    // After the range: still served from the cache, still exact.
    post_ndjson(
        &c,
        &base,
        common::ndjson(&[ev("c", T0 + HOUR + 2 * MIN + 1)]),
    )
    .await;
    wait_counted(&c, &base, 3).await;
    assert_eq!(
        fetch(url.clone()).await,
        (json!([[fmt_bucket(T0), 1]]), "hit".into())
    );
    // Inside the range (a correction of a closed window): recomputed at once.
    post_ndjson(&c, &base, common::ndjson(&[ev("d", T0 + HOUR - 1)])).await;
    let mut got = fetch(url.clone()).await;
    for _ in 0..100 {
        if got.0 == json!([[fmt_bucket(T0), 2]]) {
            break;
        }
        assert_eq!(got.0, json!([[fmt_bucket(T0), 1]]), "never anything else");
        tokio::time::sleep(Duration::from_millis(20)).await;
        got = fetch(url.clone()).await;
    }
    assert_eq!(got.0, json!([[fmt_bucket(T0), 2]]));
    let text = prom(&c, &base).await;
    assert!(counter(&text, "tally_metrics_cache_hits_total") >= 2);
    server.stop().await.unwrap();
}
