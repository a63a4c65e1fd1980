//! Breakdowns by declared dimensions over HTTP, against an independent
//! computation over messy generated input (duplicates, disorder, late and
//! malformed events): every (bucket, event type, country) count exact,
//! sums under `where` filters exact, distinct users per country within the
//! sketch bound, error rates per country, rolling windows per country,
//! the `rollups_1m` dimension columns, and the cardinality cap folding into
//! `__other__` with every event still counted.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{Expected, T0, expected, fmt_bucket, get, ts_of};
use serde_json::{Value, json};
use tally_cli::generator::{GenConfig, Generator, Kind};
use tally_types::time::{HOUR_MS, MINUTE_MS};

/// `(labels in group_by order, bucket) → value` of an answer.
fn points(v: &Value, group_by: &[&str]) -> BTreeMap<(Vec<Option<String>>, String), f64> {
    let mut out = BTreeMap::new();
    for s in v["series"].as_array().expect("series") {
        let labels = s["labels"].as_object().unwrap();
        assert_eq!(labels.len(), group_by.len(), "{s}");
        let key: Vec<Option<String>> = group_by
            .iter()
            .map(|g| labels[*g].as_str().map(String::from))
            .collect();
        for p in s["points"].as_array().unwrap() {
            out.insert(
                (key.clone(), p[0].as_str().unwrap().to_string()),
                p[1].as_f64().unwrap(),
            );
        }
    }
    out
}

fn prop(e: &Value, name: &str) -> Option<String> {
    match name {
        "event_type" => e["event_type"].as_str().map(String::from),
        _ => e["properties"][name].as_str().map(String::from),
    }
}

/// The oracle: `f` of the counted events, grouped and bucketed.
fn oracle(
    events: &[Value],
    group_by: &[&str],
    wheres: &[(&str, &str)],
    step: i64,
    f: impl Fn(&Value) -> f64,
) -> BTreeMap<(Vec<Option<String>>, String), f64> {
    let mut out = BTreeMap::new();
    for e in events {
        let mut dims: Vec<&str> = wheres.iter().map(|(d, _)| *d).collect();
        dims.dedup();
        let admitted = dims.iter().all(|d| {
            let v = prop(e, d);
            wheres
                .iter()
                .any(|(x, want)| x == d && v.as_deref() == Some(*want))
        });
        if !admitted {
            continue;
        }
        let key: Vec<Option<String>> = group_by.iter().map(|g| prop(e, g)).collect();
        let b = fmt_bucket(ts_of(e).div_euclid(step) * step);
        *out.entry((key, b)).or_default() += f(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdowns_filters_and_ratios_match_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    // The defaults declare country, device and page.
    let server = common::start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let mut g = Generator::new(GenConfig {
        seed: 27,
        tenants: 1,
        users: 200,
        start_ms: Some(T0),
        events_per_sec: 3.0,
        disorder: 0.10,
        late: 0.02,
        duplicate: 0.05,
        malformed: 0.02,
    });
    let lines: Vec<(String, Kind)> = (0..6000).map(|_| g.next_line()).collect();
    let Expected {
        counted,
        counted_events: events,
        ..
    } = expected(&lines);
    for ch in lines.chunks(500) {
        let body: String = ch.iter().map(|(l, _)| format!("{l}\n")).collect();
        common::post_ndjson(&c, &base, body).await;
    }
    assert!(
        tally_server::http::wait_applied(&server.shared, counted, Duration::from_secs(30)).await,
        "processor did not catch up"
    );
    let first = events.iter().map(ts_of).min().unwrap();
    let last = events.iter().map(ts_of).max().unwrap();
    let range = format!(
        "start={}&end={}&tenant=default",
        first.div_euclid(HOUR_MS) * HOUR_MS,
        (last.div_euclid(HOUR_MS) + 1) * HOUR_MS
    );
    let count = |_: &Value| 1.0;
    let duration = |e: &Value| e["properties"]["duration_ms"].as_f64().unwrap();

    // Exact counts and sums for several breakdowns and filters, by the
    // minute and by the hour.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        ("count", &["event_type", "country"], &[]),
        ("count", &["country"], &[("event_type", "page_view")]),
        (
            "sum:duration_ms",
            &["device"],
            &[("country", "US"), ("country", "DE")],
        ),
        (
            "sum:duration_ms",
            &["page", "device"],
            &[("event_type", "click"), ("country", "US")],
        ),
        ("count", &[], &[("device", "mobile"), ("country", "IN")]),
    ];
    for (metric, group_by, wheres) in cases {
        for (gran, step) in [("1m", MINUTE_MS), ("1h", HOUR_MS)] {
            let mut url = format!(
                "{base}/api/v1/metrics?metric={metric}&granularity={gran}&{range}&group_by={}",
                group_by.join(",")
            );
            for (d, v) in wheres {
                url.push_str(&format!("&where={d}:{v}"));
            }
            let got = points(&get(&c, url.clone()).await, group_by);
            let f: &dyn Fn(&Value) -> f64 = if metric == "count" { &count } else { &duration };
            let want = oracle(&events, group_by, wheres, step, f);
            assert!(!want.is_empty(), "{url}: the input has such events");
            assert_eq!(got, want, "{url}");
        }
    }

    // Distinct users per country and hour, within the sketch bound.
    let got = points(
        &get(
            &c,
            format!(
                "{base}/api/v1/metrics?metric=unique_users&granularity=1h&group_by=country&{range}"
            ),
        )
        .await,
        &["country"],
    );
    let mut users: BTreeMap<(Vec<Option<String>>, String), HashSet<String>> = BTreeMap::new();
    for e in &events {
        let b = fmt_bucket(ts_of(e).div_euclid(HOUR_MS) * HOUR_MS);
        users
            .entry((vec![prop(e, "country")], b))
            .or_default()
            .insert(e["user_id"].as_str().unwrap().to_string());
    }
    assert_eq!(got.len(), users.len());
    for (k, u) in &users {
        let want = u.len() as f64;
        assert!(
            (got[k] - want).abs() <= want * 0.02,
            "{k:?}: {} vs {want}",
            got[k]
        );
    }

    // The error rate per country: errors over all events of the country.
    let got = points(
        &get(&c, format!("{base}/api/v1/metrics?metric=count&where=event_type:error&over=count&group_by=country&granularity=1h&{range}")).await,
        &["country"],
    );
    let errors = oracle(
        &events,
        &["country"],
        &[("event_type", "error")],
        HOUR_MS,
        count,
    );
    let all = oracle(&events, &["country"], &[], HOUR_MS, count);
    assert_eq!(
        got.len(),
        all.len(),
        "a point wherever the country has events"
    );
    for (k, n) in &all {
        let want = errors.get(k).copied().unwrap_or(0.0) / n;
        assert!((got[k] - want).abs() < 1e-12, "{k:?}: {} vs {want}", got[k]);
    }

    // Page views per country over the last 5 minutes, every minute.
    let got = points(
        &get(&c, format!("{base}/api/v1/metrics?metric=count&where=event_type:page_view&group_by=country&granularity=1m&window=5m&{range}")).await,
        &["country"],
    );
    let per_minute = oracle(
        &events,
        &["country"],
        &[("event_type", "page_view")],
        MINUTE_MS,
        count,
    );
    let mut checked = 0;
    for ((k, b), v) in &got {
        let end = tally_types::time::parse_rfc3339(b).unwrap();
        let want: f64 = (0..5)
            .filter_map(|i| per_minute.get(&(k.clone(), fmt_bucket(end - i * MINUTE_MS))))
            .sum();
        assert_eq!(*v, want, "{k:?} window ending {b}");
        checked += 1;
    }
    assert!(checked > 100);

    // SQL: the rollup tables carry the dimension columns.
    let r = c
        .post(format!("{base}/api/v1/query?tenant=default"))
        .header("content-type", "application/json")
        .body(json!({"sql": "SELECT country, CAST(sum(count) AS BIGINT) AS n FROM rollups_1m GROUP BY country ORDER BY country"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for e in &events {
        *want.entry(prop(e, "country").unwrap()).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "{v}");
}

/// Past `max-values` distinct values of a dimension in a minute, new values
/// count under `__other__`: totals stay exact, `/metrics` counts the folds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_past_the_cap_fold_into_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_server(dir.path(), |c| {
        c.dimensions.max_values = 3;
        c.dimensions.tenants.insert(
            "acme".into(),
            tally_server::config::Names(vec!["plan".into()]),
        );
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let mut body = String::new();
    for i in 0..40 {
        // Ten countries in one minute, four events each, in turns.
        body.push_str(&format!(
            "{}\n",
            json!({"event_id": format!("e{i}"), "event_type": "click", "timestamp": T0 + i,
                   "tenant": "default", "user_id": "u", "properties": {"country": format!("C{}", i % 10)}})
        ));
    }
    // A tenant with its own list: `plan`, not `country`.
    body.push_str(&format!(
        "{}\n",
        json!({"event_id": "p1", "event_type": "click", "timestamp": T0,
               "tenant": "acme", "properties": {"plan": "pro", "country": "DE"}})
    ));
    common::post_ndjson(&c, &base, body).await;
    assert!(tally_server::http::wait_applied(&server.shared, 41, Duration::from_secs(30)).await);
    let range = format!("start={T0}&end={}", T0 + MINUTE_MS);
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=count&group_by=country&{range}&tenant=default"),
    )
    .await;
    let got = points(&v, &["country"]);
    let at = fmt_bucket(T0);
    let mut want = BTreeMap::new();
    for k in ["C0", "C1", "C2"] {
        want.insert((vec![Some(k.to_string())], at.clone()), 4.0);
    }
    want.insert((vec![Some("__other__".to_string())], at.clone()), 28.0);
    assert_eq!(got, want);
    let prom = common::prom(&c, &base).await;
    assert!(
        prom.contains("tally_dimension_values_folded_total 28"),
        "{prom}"
    );
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=count&group_by=plan&{range}&tenant=acme"),
    )
    .await;
    assert_eq!(v["series"][0]["labels"], json!({"plan": "pro"}), "{v}");
    let r = c
        .get(format!(
            "{base}/api/v1/metrics?metric=count&group_by=country&{range}&tenant=acme"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let msg = r.text().await.unwrap();
    assert!(msg.contains("event_type, plan"), "{msg}");

    // The catalog says what is there: types, distinct values (all ten
    // countries, not the capped rollups), which properties are dimensions.
    common::wait_events(&c, &base, "default", 40).await;
    common::wait_events(&c, &base, "acme", 1).await;
    let cat = get(
        &c,
        format!("{base}/api/v1/catalog?tenant=default&start=2026-11-01&end=2026-11-02"),
    )
    .await;
    assert_eq!(cat["events_read"], 40, "{cat}");
    assert_eq!(cat["complete"], true);
    assert_eq!(cat["first"], fmt_bucket(T0));
    assert_eq!(cat["dimensions"], json!(["country", "device", "page"]));
    let click = &cat["event_types"][0];
    assert_eq!(
        (click["event_type"].as_str(), click["events"].as_u64()),
        (Some("click"), Some(40))
    );
    assert_eq!(
        click["properties"],
        json!([{"name": "country", "types": ["string"], "present": 40, "distinct": 10,
            "distinct_at_least": false, "numeric": false, "min": null, "max": null, "dimension": true}])
    );
    let cat = get(
        &c,
        format!("{base}/api/v1/catalog?tenant=acme&start=now-60d"),
    )
    .await;
    let props = &cat["event_types"][0]["properties"];
    assert_eq!(props[0]["name"], "country");
    assert_eq!(props[0]["dimension"], false);
    assert_eq!(props[1]["name"], "plan");
    assert_eq!(props[1]["dimension"], true);
    let r = c
        .get(format!("{base}/api/v1/catalog?tenant=acme&country=DE"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A sum over a property that is never a number says so.
    let v = get(
        &c,
        format!("{base}/api/v1/metrics?metric=sum:country&{range}&tenant=default"),
    )
    .await;
    assert!(v["note"].as_str().unwrap().contains("catalog"), "{v}");
}
