//! Sliding windows, `where` filters and `over` ratios on the metrics API,
//! against an independent computation over messy generated input
//! (duplicates, disorder, late and malformed events): a rolling count is
//! the sum of its minutes, a rolling distinct count is the distinct users
//! of its minutes (within the sketch bound), an error rate is errors over
//! all events of the same minute; undeclared dimensions and windows that
//! do not fit the granularity are 400s that name the fix.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{Expected, T0, expected, fmt_bucket, get};
use serde_json::Value;
use tally_cli::generator::{GenConfig, Generator, Kind};
use tally_types::time::MINUTE_MS;

/// `bucket → value` of an ungrouped answer.
fn single(v: &Value) -> BTreeMap<String, f64> {
    let series = v["series"].as_array().expect("series");
    assert_eq!(series.len(), 1, "{v}");
    series[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_filters_and_ratios_match_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let mut g = Generator::new(GenConfig {
        seed: 17,
        tenants: 1,
        users: 150,
        start_ms: Some(T0),
        events_per_sec: 2.0,
        disorder: 0.10,
        late: 0.02,
        duplicate: 0.05,
        malformed: 0.02,
    });
    let lines: Vec<(String, Kind)> = (0..6000).map(|_| g.next_line()).collect();
    let Expected {
        buckets, counted, ..
    } = expected(&lines);
    for ch in lines.chunks(500) {
        let body: String = ch.iter().map(|(l, _)| format!("{l}\n")).collect();
        common::post_ndjson(&c, &base, body).await;
    }
    assert!(
        tally_server::http::wait_applied(&server.shared, counted, Duration::from_secs(30)).await,
        "processor did not catch up"
    );

    // The oracle per minute: all events, errors, users.
    let mut all: BTreeMap<i64, u64> = BTreeMap::new();
    let mut errors: BTreeMap<i64, u64> = BTreeMap::new();
    let mut users: BTreeMap<i64, HashSet<String>> = BTreeMap::new();
    for ((_, m, ty), b) in &buckets {
        *all.entry(*m).or_default() += b.count;
        if ty == "error" {
            *errors.entry(*m).or_default() += b.count;
        }
        users.entry(*m).or_default().extend(b.users.iter().cloned());
    }
    let (first, last) = (*all.keys().next().unwrap(), *all.keys().last().unwrap());
    assert!(last - first > 30 * MINUTE_MS, "a stream of many minutes");
    let range = format!(
        "start={}&end={}&tenant=default",
        fmt_bucket(first),
        fmt_bucket(last + MINUTE_MS)
    );

    // A rolling five minutes, every minute: the sum of the five minutes
    // ending at each point's end.
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=count&granularity=1m&window=5m&{range}"),
    )
    .await;
    let got = single(&v);
    let mut b = first;
    let mut checked = 0;
    while b <= last {
        let want: u64 = all.range(b - 4 * MINUTE_MS..=b).map(|(_, n)| n).sum();
        assert_eq!(
            got.get(&fmt_bucket(b)).copied().unwrap_or(0.0),
            want as f64,
            "window ending {}",
            fmt_bucket(b + MINUTE_MS)
        );
        checked += 1;
        b += MINUTE_MS;
    }
    assert!(checked > 30);
    // Distinct users of a window: of its events, not a sum of minutes.
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=unique_users&granularity=1m&window=10m&{range}"),
    )
    .await;
    let got = single(&v);
    let mut summed_would_differ = false;
    for (bucket, n) in &got {
        let b = tally_types::time::parse_rfc3339(bucket).unwrap();
        let mut set = HashSet::new();
        let mut sum = 0;
        for (_, u) in users.range(b - 9 * MINUTE_MS..=b) {
            set.extend(u.iter().cloned());
            sum += u.len();
        }
        let want = set.len() as f64;
        assert!((n - want).abs() <= want * 0.02, "{bucket}: {n} vs {want}");
        summed_would_differ |= sum as f64 > want * 1.05;
    }
    assert!(
        summed_would_differ,
        "users recur across minutes in this input"
    );

    // Error rate: errors over all events of the same minute.
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=count&where=event_type:error&over=count&granularity=1m&{range}"),
    )
    .await;
    let got = single(&v);
    assert!(!got.is_empty());
    // A minute with events but no error has a rate of 0; a minute
    // without events has no point.
    let mut zeros = 0;
    for (m, n) in &all {
        let key = fmt_bucket(*m);
        let want = errors.get(m).copied().unwrap_or(0) as f64 / *n as f64;
        zeros += usize::from(want == 0.0);
        assert!(
            (got[&key] - want).abs() < 1e-12,
            "{key}: {} vs {want}",
            got[&key]
        );
    }
    assert_eq!(got.len(), all.len());
    assert!(zeros > 0, "some minutes have no error");
    // Grouped: each type over its own total is 1 where it has events.
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=count&group_by=event_type&where=event_type:error&where=event_type:click&over=count&granularity=1h&{range}"),
    )
    .await;
    let series = v["series"].as_array().unwrap();
    let labels: Vec<&str> = series
        .iter()
        .map(|s| s["labels"]["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["click", "error"], "{v}");
    for s in series {
        for p in s["points"].as_array().unwrap() {
            assert_eq!(p[1].as_f64(), Some(1.0), "{v}");
        }
    }

    // What cannot be answered says why and what would be.
    for (q, names) in [
        (
            "metric=count&group_by=plan",
            &["group_by", "plan", "event_type, country, device, page"][..],
        ),
        (
            "metric=count&where=plan:pro",
            &["where", "plan", "event_type, country, device, page"][..],
        ),
        (
            "metric=count&where=event_type",
            &["where", "event_type:error"][..],
        ),
        (
            "metric=count&granularity=1m&window=90s",
            &["window", "granularity"][..],
        ),
        ("metric=count&window=soon", &["window", "5m"][..]),
        ("metric=count&over=ratio", &["over"][..]),
    ] {
        let r = c
            .get(format!("{base}/api/v1/metrics?{q}&{range}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let body = r.text().await.unwrap();
        for n in names {
            assert!(body.contains(n), "{q}: {body} should name {n}");
        }
    }
}
