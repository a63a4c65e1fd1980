//! Oracle test: generated input with duplicates, disorder, late and malformed
//! events goes through the real server over HTTP; every minute bucket of every
//! metric is compared with an independent computation done here. Then the
//! server is restarted on the same data dir (state recovered from its last
//! checkpoint and the log after it) and must answer identically.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Expected, T0, expected, fetch, fmt_bucket, get};
use serde_json::Value;
use tally_cli::generator::{GenConfig, Generator, Kind};
use tally_server::Server;
use tally_types::time::MINUTE_MS;

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    if lo + 1 < sorted.len() {
        sorted[lo] + (sorted[lo + 1] - sorted[lo]) * frac
    } else {
        sorted[lo]
    }
}

async fn start(dir: &std::path::Path) -> Server {
    common::start_server(dir, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_match_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();

    let mut g = Generator::new(GenConfig {
        seed: 7,
        tenants: 2,
        users: 300,
        start_ms: Some(T0),
        events_per_sec: 20.0,
        disorder: 0.10,
        late: 0.02,
        duplicate: 0.05,
        malformed: 0.02,
    });
    let lines: Vec<(String, Kind)> = std::iter::once(common::warmup())
        .chain((0..12_000).map(|_| g.next_line()))
        .collect();

    // Independent computation.
    let Expected {
        buckets,
        late: expect_late,
        rejected: expect_rejected,
        counted: expect_counted,
        ..
    } = expected(&lines);
    // The input really holds every kind of mess.
    for k in [
        Kind::Late,
        Kind::Duplicate,
        Kind::Disordered,
        Kind::Malformed,
    ] {
        assert!(
            lines.iter().filter(|(_, kind)| *kind == k).count() > 50,
            "{k:?}"
        );
    }
    assert!(expect_late.values().sum::<u64>() > 100 && expect_counted > 10_000);

    // Feed: NDJSON batches of 400 over 4 concurrent connections.
    let mut accepted = 0u64;
    let mut rejected = 0u64;
    let r = c
        .post(format!("{base}/api/v1/events"))
        .body(lines[0].0.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    accepted += 1;
    let chunks: Vec<String> = lines[1..]
        .chunks(400)
        .map(|ch| ch.iter().map(|(l, _)| format!("{l}\n")).collect::<String>())
        .collect();
    for group in chunks.chunks(4) {
        let futs = group.iter().map(|body| {
            c.post(format!("{base}/api/v1/events"))
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
        });
        for r in futures_join(futs).await {
            let r = r.unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            accepted += v["accepted"].as_u64().unwrap();
            rejected += v["rejected"].as_u64().unwrap();
            for e in v["errors"].as_array().unwrap() {
                assert!(e["index"].as_u64().unwrap() < 400);
                let msg = e["error"].as_str().unwrap();
                let field = msg.split(':').next().unwrap();
                assert!(
                    [
                        "event_id",
                        "event_type",
                        "timestamp",
                        "properties",
                        "json",
                        "event"
                    ]
                    .contains(&field),
                    "error names no field: {msg}"
                );
            }
        }
    }
    assert_eq!(rejected, expect_rejected);
    assert_eq!(accepted + rejected, lines.len() as u64);
    assert!(
        tally_server::http::wait_applied(&server.shared, expect_counted, Duration::from_secs(30))
            .await,
        "processor did not catch up"
    );

    let (buckets, expect_late) = (&buckets, &expect_late);
    let check = |base: String| {
        let c = c.clone();
        async move {
            for tenant in ["tenant0", "tenant1"] {
                let count = fetch(&c, &base, tenant, "count", "1m").await;
                let users = fetch(&c, &base, tenant, "unique_users", "1m").await;
                let sessions = fetch(&c, &base, tenant, "unique_sessions", "1m").await;
                let sum = fetch(&c, &base, tenant, "sum:duration_ms", "1m").await;
                let min = fetch(&c, &base, tenant, "min:duration_ms", "1m").await;
                let max = fetch(&c, &base, tenant, "max:duration_ms", "1m").await;
                let avg = fetch(&c, &base, tenant, "avg:revenue", "1m").await;
                let p95 = fetch(&c, &base, tenant, "p95:duration_ms", "1m").await;
                let p50 = fetch(&c, &base, tenant, "p50:duration_ms", "1m").await;
                let mine: Vec<_> = buckets
                    .iter()
                    .filter(|((t, _, _), _)| t == tenant)
                    .collect();
                assert_eq!(count.len(), mine.len(), "{tenant}: number of buckets");
                for ((_, minute, ty), b) in mine {
                    let key = (ty.clone(), fmt_bucket(*minute));
                    assert_eq!(count[&key], b.count as f64, "{tenant} {key:?} count");
                    // Small sets are exact; bound is 2 %.
                    let u = b.users.len() as f64;
                    assert!(
                        (users.get(&key).copied().unwrap_or(0.0) - u).abs() <= u * 0.02,
                        "{key:?} users"
                    );
                    let s = b.sessions.len() as f64;
                    assert!(
                        (sessions.get(&key).copied().unwrap_or(0.0) - s).abs() <= s * 0.02,
                        "{key:?} sessions"
                    );
                    let d = &b.props["duration_ms"];
                    let total: f64 = d.iter().sum();
                    assert!(
                        (sum[&key] - total).abs() <= total.abs() * 1e-12,
                        "{key:?} sum"
                    );
                    assert_eq!(min[&key], d.iter().cloned().fold(f64::INFINITY, f64::min));
                    assert_eq!(
                        max[&key],
                        d.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
                    );
                    let mut sorted = d.clone();
                    sorted.sort_by(f64::total_cmp);
                    for (q, got) in [(0.95, &p95), (0.5, &p50)] {
                        let want = quantile(&sorted, q);
                        assert!(
                            (got[&key] - want).abs() <= want.abs() * 0.01 + 1e-9,
                            "{key:?} p{q}: {} vs {want}",
                            got[&key]
                        );
                    }
                    match b.props.get("revenue") {
                        Some(r) => {
                            let want = r.iter().sum::<f64>() / r.len() as f64;
                            assert!(
                                (avg[&key] - want).abs() <= want.abs() * 1e-12,
                                "{key:?} avg revenue"
                            );
                        }
                        None => assert!(!avg.contains_key(&key), "{key:?}: avg without values"),
                    }
                }
                // Coarser granularities are merges of the same minutes.
                for (gran, step) in [("5m", 5 * MINUTE_MS), ("1h", 60 * MINUTE_MS)] {
                    let got = fetch(&c, &base, tenant, "count", gran).await;
                    let got_u = fetch(&c, &base, tenant, "unique_users", gran).await;
                    let mut want: BTreeMap<(String, String), (u64, BTreeSet<String>)> =
                        BTreeMap::new();
                    for ((t, minute, ty), b) in buckets.iter() {
                        if t == tenant {
                            let e = want
                                .entry((ty.clone(), fmt_bucket(minute.div_euclid(step) * step)))
                                .or_default();
                            e.0 += b.count;
                            e.1.extend(b.users.iter().cloned());
                        }
                    }
                    assert_eq!(got.len(), want.len());
                    for (k, (n, us)) in want {
                        assert_eq!(got[&k], n as f64, "{gran} {k:?}");
                        let u = us.len() as f64;
                        assert!((got_u[&k] - u).abs() <= u * 0.02, "{gran} {k:?} users");
                    }
                }
                // Dead letters: every late event is there, per tenant.
                let dlq = get(
                    &c,
                    format!("{base}/api/v1/dlq?kind=late&limit=10000&tenant={tenant}"),
                )
                .await;
                let entries = dlq["entries"].as_array().unwrap();
                assert_eq!(
                    entries.len() as u64,
                    expect_late.get(tenant).copied().unwrap_or(0),
                    "{tenant} late"
                );
                for e in entries {
                    assert_eq!(e["kind"], "late");
                    assert!(e["event"]["event_id"].is_string());
                    assert!(e["received_at"].as_str().unwrap().ends_with('Z'));
                }
            }
            let dlq = get(&c, format!("{base}/api/v1/dlq?kind=malformed&limit=10000")).await;
            assert_eq!(
                dlq["entries"].as_array().unwrap().len() as u64,
                expect_rejected
            );
        }
    };
    check(base.clone()).await;

    let prom = common::prom(&c, &base).await;
    assert!(
        prom.contains(&format!("tally_events_counted_total {expect_counted}")),
        "{prom}"
    );
    assert!(prom.contains(&format!("tally_events_rejected_total {expect_rejected}")));
    assert!(prom.contains("tally_ingest_ack_latency_seconds_bucket"));

    // Restart on the same data dir: state recovered from the checkpoint, identically.
    server.stop().await.unwrap();
    let server = start(dir.path()).await;
    assert_eq!(
        server.shared.processor.lock().totals.counted,
        expect_counted
    );
    check(format!("http://{}", server.addr)).await;

    // Late-data corrections: tenant0's late events go back into their
    // windows, once; tenant1's stay in the DLQ.
    let base = format!("http://{}", server.addr);
    let mut want_counts: BTreeMap<(String, String), f64> = buckets
        .iter()
        .filter(|((t, _, _), _)| t == "tenant0")
        .map(|((_, m, ty), b)| ((ty.clone(), fmt_bucket(*m)), b.count as f64))
        .collect();
    let mut late_seen = std::collections::HashSet::new();
    for (line, kind) in &lines {
        let v: Value = match kind {
            Kind::Late => serde_json::from_str(line).unwrap(),
            _ => continue,
        };
        if v["tenant"] != "tenant0" || !late_seen.insert(v["event_id"].to_string()) {
            continue;
        }
        let minute = common::ts_of(&v).div_euclid(MINUTE_MS) * MINUTE_MS;
        let ty = v["event_type"].as_str().unwrap().to_string();
        *want_counts.entry((ty, fmt_bucket(minute))).or_default() += 1.0;
    }
    let replay = |tenant: &'static str| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let r = c
                .post(format!(
                    "{base}/api/v1/dlq/replay?kind=late&tenant={tenant}"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()
        }
    };
    let first = replay("tenant0").await;
    assert_eq!(first["applied"], expect_late["tenant0"], "{first}");
    let second = replay("tenant0").await;
    assert_eq!(
        second["applied"], 0,
        "a second call applies nothing new: {second}"
    );
    assert_eq!(
        fetch(&c, &base, "tenant0", "count", "1m").await,
        want_counts
    );
    let late0 = get(
        &c,
        format!("{base}/api/v1/dlq?kind=late&limit=10000&tenant=tenant0"),
    )
    .await;
    assert!(
        late0["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["replayed"] == true)
    );
    let late1 = get(
        &c,
        format!("{base}/api/v1/dlq?kind=late&limit=10000&tenant=tenant1"),
    )
    .await;
    assert!(
        late1["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["replayed"] == false)
    );
    // Corrections survive a restart (they are in the log and the checkpoint).
    server.stop().await.unwrap();
    let server = start(dir.path()).await;
    let base = format!("http://{}", server.addr);
    assert_eq!(
        fetch(&c, &base, "tenant0", "count", "1m").await,
        want_counts
    );
    let r = c
        .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=tenant0"))
        .send()
        .await
        .unwrap();
    let again: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(again["applied"], 0, "{again}");
    server.stop().await.unwrap();
}

async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
