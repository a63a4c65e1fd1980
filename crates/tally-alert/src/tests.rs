//! Engine tests with injected time: a series is a map from bucket to value,
//! buckets are closed one at a time, and every test asserts the exact
//! notifications the receiver would get.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};
use tally_types::Millis;

use crate::engine::{Engine, EngineConfig, Outcome, Source, State};
use crate::progress::Progress;
use crate::rule::Rule;

/// 2026-11-01T12:00:00Z.
const T0: Millis = 1_793_534_400_000;
const M: Millis = 60_000;

struct Series(BTreeMap<Millis, f64>);

impl Series {
    fn of(vals: &[Option<f64>]) -> Series {
        Series(
            vals.iter()
                .enumerate()
                .filter_map(|(i, v)| Some((T0 + i as i64 * M, (*v)?)))
                .collect(),
        )
    }
}

impl Source for Series {
    fn values(&self, _: &Rule, from: Millis, to: Millis) -> Vec<(Millis, f64)> {
        self.0.range(from..to).map(|(&b, &v)| (b, v)).collect()
    }

    fn first_minute(&self, _: &str) -> Option<Millis> {
        self.0.keys().next().copied()
    }
}

fn rule(detector: Json, extra: Json) -> Json {
    let mut r = json!({
        "name": "r1", "metric": "count", "event_type": ["error"], "granularity": "1m",
        "detector": detector,
        "notify": [{"webhook": "http://127.0.0.1:9/hook"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

fn engine_with(body: Json) -> (Engine, String) {
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    let (r, created) = e.upsert(&body, "acme", T0, Some(T0)).unwrap();
    assert!(created);
    (e, r.id)
}

/// What the receiver gets: (status, value, bucket index, episode index).
type Got = (String, Json, i64, i64);

fn drain(e: &mut Engine) -> Vec<Got> {
    let mut out = Vec::new();
    for d in e.take_due(i64::MAX, usize::MAX) {
        let b: Json = serde_json::from_str(&d.body).unwrap();
        let idx =
            |k: &str| (tally_types::time::parse_rfc3339(b[k].as_str().unwrap()).unwrap() - T0) / M;
        assert_eq!(b["dedupe_key"], json!(d.dedupe_key));
        out.push((
            b["status"].as_str().unwrap().to_string(),
            b["value"].clone(),
            idx("bucket_start"),
            idx("episode_start"),
        ));
        e.finish(d.id, Outcome::Delivered, 0);
    }
    out
}

/// Registers the rule at T0, then closes buckets 0..n one by one.
fn run(e: &mut Engine, s: &Series, n: i64) -> Vec<Got> {
    e.advance(T0, T0, None, s);
    let mut got = Vec::new();
    for i in 0..n {
        e.advance(T0 + (i + 1) * M, T0 + (i + 1) * M, None, s);
        got.extend(drain(e));
    }
    got
}

fn got(status: &str, v: Json, b: i64, ep: i64) -> Got {
    (status.into(), v, b, ep)
}

#[test]
fn threshold_spike_fires_once_and_resolves() {
    let (mut e, _) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 100}),
        json!({}),
    ));
    let s = Series::of(&[Some(10.0), Some(131.0), Some(150.0), Some(20.0), Some(5.0)]);
    assert_eq!(
        run(&mut e, &s, 5),
        vec![
            got("firing", json!(131), 1, 1),
            got("resolved", json!(20), 3, 1)
        ]
    );
}

#[test]
fn flapping_series_sends_one_firing_and_one_resolved() {
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 100}),
        json!({"for": "2m", "resolve_after": "3m"}),
    ));
    let v = |x: f64| Some(x);
    let s = Series::of(&[
        v(50.),
        v(150.),
        v(50.),
        v(150.),
        v(150.),
        v(50.),
        v(150.),
        v(50.),
        v(50.),
        v(150.),
        v(50.),
        v(50.),
        v(50.),
        v(50.),
    ]);
    assert_eq!(
        run(&mut e, &s, 14),
        vec![
            got("firing", json!(150), 4, 3),
            got("resolved", json!(50), 12, 3)
        ]
    );
    // The history has every transition, pending ones included.
    let h: Vec<(String, String)> = e
        .history("acme", Some(&id), 100)
        .iter()
        .rev()
        .filter(|h| h.kind == "state")
        .map(|h| (h.from.clone().unwrap(), h.to.clone()))
        .collect();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        h,
        pairs(&[
            ("ok", "pending"),
            ("pending", "ok"),
            ("ok", "pending"),
            ("pending", "firing"),
            ("firing", "resolved")
        ])
    );
}

#[test]
fn absence_of_data_fires_count_below_one() {
    let (mut e, _) = engine_with(rule(
        json!({"kind": "threshold", "op": "<", "value": 1}),
        json!({}),
    ));
    let s = Series::of(&[Some(5.0), Some(4.0), None, None, Some(3.0)]);
    assert_eq!(
        run(&mut e, &s, 5),
        vec![
            got("firing", json!(0), 2, 2),
            got("resolved", json!(3), 4, 2)
        ]
    );
}

#[test]
fn zscore_needs_its_window_then_fires_on_a_spike() {
    let (mut e, _) = engine_with(rule(
        json!({"kind": "zscore", "window": 5, "z": 3}),
        json!({}),
    ));
    // Empty buckets before the series starts are not history; the spike at
    // index 4 comes before the window is full and must not fire.
    let v = |x: f64| Some(x);
    let s = Series::of(&[
        None,
        None,
        v(10.),
        v(11.),
        v(90.),
        v(9.),
        v(10.),
        v(11.),
        v(10.),
        v(10.),
        v(60.),
        v(10.),
    ]);
    let g = run(&mut e, &s, 12);
    // Checked against an independent computation of the sample z-score.
    let expect = {
        let vals = [10., 11., 90., 9., 10., 11., 10., 10., 60., 10.];
        let mut out = Vec::new();
        let mut firing = false;
        for i in 5..vals.len() {
            let w = &vals[i - 5..i];
            let mean = w.iter().sum::<f64>() / 5.0;
            let sd = (w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
            let anomalous = (vals[i] - mean).abs() / sd > 3.0;
            if anomalous && !firing {
                out.push(got(
                    "firing",
                    json!(vals[i] as i64),
                    i as i64 + 2,
                    i as i64 + 2,
                ));
                firing = true;
            } else if !anomalous && firing {
                out.push(got(
                    "resolved",
                    json!(vals[i] as i64),
                    i as i64 + 2,
                    out.last().unwrap().3,
                ));
                firing = false;
            }
        }
        out
    };
    assert_eq!(g, expect);
    // And a plain series that the window learnt does fire on a clear spike.
    let (mut e, _) = engine_with(rule(
        json!({"kind": "zscore", "window": 5, "z": 3}),
        json!({}),
    ));
    let s = Series::of(&[
        v(10.),
        v(11.),
        v(9.),
        v(10.),
        v(11.),
        v(10.),
        v(45.),
        v(10.),
    ]);
    assert_eq!(
        run(&mut e, &s, 8),
        vec![
            got("firing", json!(45), 6, 6),
            got("resolved", json!(10), 7, 6)
        ]
    );
}

#[test]
fn ewma_tracks_a_drift_and_fires_on_a_jump() {
    let (mut e, _) = engine_with(rule(
        json!({"kind": "ewma", "alpha": 0.3, "k": 4, "window": 6, "direction": "up"}),
        json!({"resolve_after": "2m"}),
    ));
    // A slow upward drift stays inside the band; a jump fires; a drop does
    // not (direction up); two normal buckets resolve.
    let vals: Vec<Option<f64>> = [
        100., 102., 101., 104., 103., 106., 105., 108., 180., 107., 50., 109.,
    ]
    .iter()
    .map(|&x| Some(x))
    .collect();
    let s = Series::of(&vals);
    assert_eq!(
        run(&mut e, &s, 12),
        vec![
            got("firing", json!(180), 8, 8),
            got("resolved", json!(50), 10, 8)
        ]
    );
}

#[test]
fn a_new_rule_learns_its_window_from_the_store() {
    // Ten buckets of history exist before the rule is created at T0 + 10m.
    let mut vals: Vec<Option<f64>> = (0..10).map(|i| Some(100.0 + (i % 3) as f64)).collect();
    vals.push(Some(400.0));
    let s = Series::of(&vals);
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    e.upsert(
        &rule(json!({"kind": "zscore", "window": 10, "z": 3}), json!({})),
        "acme",
        T0,
        Some(T0 + 10 * M),
    )
    .unwrap();
    e.advance(T0 + 10 * M, T0, None, &s);
    assert!(drain(&mut e).is_empty());
    e.advance(T0 + 11 * M, T0, None, &s);
    assert_eq!(drain(&mut e), vec![got("firing", json!(400), 10, 10)]);
}

#[test]
fn a_rule_created_before_any_data_judges_from_the_first_data() {
    // Data arrives in one go after the rule exists: the watermark jumps
    // straight past the spike, which must still be judged.
    let v = |x: f64| Some(x);
    let mut vals = vec![None; 3];
    vals.extend([v(2.), v(10.), v(1.)]);
    let s = Series::of(&vals);
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    e.upsert(
        &rule(
            json!({"kind": "threshold", "op": ">", "value": 5}),
            json!({}),
        ),
        "acme",
        T0,
        None,
    )
    .unwrap();
    e.advance(T0 + 6 * M, T0, None, &s);
    assert_eq!(
        drain(&mut e),
        vec![
            got("firing", json!(10), 4, 4),
            got("resolved", json!(1), 5, 4)
        ]
    );
}

#[test]
fn restart_in_the_middle_of_an_episode_sends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.json");
    let body = rule(
        json!({"kind": "threshold", "op": ">=", "value": 100}),
        json!({"resolve_after": "2m"}),
    );
    let s = Series::of(&[
        Some(1.),
        Some(100.),
        Some(120.),
        Some(1.),
        Some(130.),
        Some(1.),
        Some(1.),
        Some(1.),
    ]);
    let mut e = Engine::open(Some(path.clone()), EngineConfig::default()).unwrap();
    e.upsert(&body, "acme", T0, Some(T0)).unwrap();
    e.advance(T0, T0, None, &s);
    let mut all = Vec::new();
    for i in 0..4 {
        e.advance(T0 + (i + 1) * M, T0, None, &s);
        all.extend(drain(&mut e));
    }
    // Bucket 4 is evaluated (still firing) just before the restart.
    e.advance(T0 + 5 * M, T0, None, &s);
    e.persist().unwrap();
    drop(e);
    let mut e = Engine::open(Some(path.clone()), EngineConfig::default()).unwrap();
    assert_eq!(e.rules(Some("acme")).next().unwrap().1.state, State::Firing);
    // The same watermark again (recovery) evaluates nothing twice.
    e.advance(T0 + 5 * M, T0, None, &s);
    for i in 5..8 {
        e.advance(T0 + (i + 1) * M, T0, None, &s);
        all.extend(drain(&mut e));
    }
    assert_eq!(
        all,
        vec![
            got("firing", json!(100), 1, 1),
            got("resolved", json!(1), 6, 1)
        ]
    );
}

#[test]
fn silence_holds_notifications_until_it_ends() {
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 10}),
        json!({}),
    ));
    e.silence("acme", &id, Some(T0 + 3 * M)).unwrap();
    let s = Series::of(&[
        Some(50.),
        Some(50.),
        Some(50.),
        Some(50.),
        Some(1.),
        Some(50.),
        Some(1.),
    ]);
    e.advance(T0, T0, None, &s);
    let mut all = Vec::new();
    for i in 0..7 {
        // Wall time runs with event time here.
        e.advance(T0 + (i + 1) * M, T0 + (i + 1) * M, None, &s);
        all.extend(drain(&mut e));
    }
    // The episode began under the silence (bucket 0); its firing goes out
    // when the silence ends at T0+3m, its resolved after it. The episode at
    // bucket 5 began unsilenced.
    assert_eq!(
        all,
        vec![
            got("firing", json!(50), 2, 0),
            got("resolved", json!(1), 4, 0),
            got("firing", json!(50), 5, 5),
            got("resolved", json!(1), 6, 5),
        ]
    );
    // An episode wholly inside a silence is never sent.
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 10}),
        json!({}),
    ));
    e.silence("acme", &id, Some(T0 + 60 * M)).unwrap();
    assert!(run(&mut e, &Series::of(&[Some(50.), Some(1.)]), 2).is_empty());
}

#[test]
fn failed_deliveries_back_off_then_give_up() {
    let cfg = EngineConfig {
        max_attempts: 3,
        backoff_ms: 1000,
        ..EngineConfig::default()
    };
    let mut e = Engine::open(None, cfg).unwrap();
    e.upsert(
        &rule(
            json!({"kind": "threshold", "op": ">", "value": 1}),
            json!({}),
        ),
        "acme",
        T0,
        Some(T0),
    )
    .unwrap();
    let s = Series::of(&[Some(5.)]);
    e.advance(T0, T0, None, &s);
    e.advance(T0 + M, T0, None, &s);
    let d = e.take_due(T0, 10);
    assert_eq!(d.len(), 1);
    let key = d[0].dedupe_key.clone();
    assert!(
        e.take_due(T0, 10).is_empty(),
        "in flight is not handed out twice"
    );
    e.finish(d[0].id, Outcome::Failed("HTTP 500".into()), T0);
    assert!(e.take_due(T0 + 999, 10).is_empty());
    let d = e.take_due(T0 + 1000, 10);
    assert_eq!(d[0].dedupe_key, key, "the key is stable across retries");
    e.finish(d[0].id, Outcome::Failed("timed out".into()), T0 + 1000);
    assert!(
        e.take_due(T0 + 2999, 10).is_empty(),
        "second backoff doubles"
    );
    let d = e.take_due(T0 + 3000, 10);
    e.finish(d[0].id, Outcome::Failed("HTTP 503".into()), T0 + 3000);
    assert_eq!(e.outbox_len(), 0);
    assert_eq!(e.stats.gave_up, 1);
    let h: Vec<String> = e
        .history("acme", None, 10)
        .iter()
        .filter(|h| h.kind == "delivery")
        .map(|h| h.to.clone())
        .collect();
    assert_eq!(h, vec!["failed", "retrying", "retrying"]);
}

#[test]
fn invalid_rules_name_the_field() {
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    let cases = [
        (
            json!({"metric": "count", "detector": {"kind": "threshold", "op": ">", "value": 1}}),
            "name",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": "=>", "value": 1}),
                json!({}),
            ),
            "detector.op",
        ),
        (
            rule(json!({"kind": "threshold", "op": ">"}), json!({})),
            "detector.value",
        ),
        (rule(json!({"kind": "median"}), json!({})), "detector.kind"),
        (
            rule(json!({"kind": "zscore", "z": 3}), json!({})),
            "detector.window",
        ),
        (
            rule(json!({"kind": "ewma", "alpha": 1.5, "k": 3}), json!({})),
            "detector.alpha",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"metric": "p100:x"}),
            ),
            "metric",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"granularity": "2m"}),
            ),
            "granularity",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"for": "soon"}),
            ),
            "for",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"notify": [{"webhook": "ftp://x/"}]}),
            ),
            "notify[0].webhook",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"notify": [{"webhook": "http://x/", "format": "pagerduty"}]}),
            ),
            "notify[0].routing_key",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"thresh": 3}),
            ),
            "thresh",
        ),
        (
            rule(
                json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"event_type": [""]}),
            ),
            "event_type[0]",
        ),
    ];
    for (body, field) in cases {
        match e.upsert(&body, "acme", T0, Some(T0)) {
            Err(crate::AlertError::Rule(r)) => assert_eq!(r.field, field, "{body}: {r}"),
            other => panic!(
                "{body}: expected an error on {field}, got {:?}",
                other.map(|r| r.0.id)
            ),
        }
    }
}

#[test]
fn posting_the_same_name_updates_the_rule() {
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 1}),
        json!({}),
    ));
    let (r, created) = e
        .upsert(
            &rule(
                json!({"kind": "threshold", "op": ">", "value": 9}),
                json!({}),
            ),
            "acme",
            T0 + 1,
            Some(T0),
        )
        .unwrap();
    assert!(!created);
    assert_eq!(r.id, id);
    assert_eq!(e.rules(Some("acme")).count(), 1);
    // Another tenant's rule of the same name is its own.
    let (r2, created) = e
        .upsert(
            &rule(
                json!({"kind": "threshold", "op": ">", "value": 9}),
                json!({}),
            ),
            "other",
            T0,
            Some(T0),
        )
        .unwrap();
    assert!(created && r2.id != id);
    assert!(
        e.delete("acme", &r2.id).is_err(),
        "a tenant cannot delete another's rule"
    );
}

#[test]
fn payload_shapes() {
    let body = rule(
        json!({"kind": "threshold", "op": ">", "value": 100}),
        json!({"notify": [
            {"webhook": "http://127.0.0.1:9/a"},
            {"webhook": "http://127.0.0.1:9/b", "format": "pagerduty", "routing_key": "R0UT1NG"},
            {"webhook": "http://127.0.0.1:9/c", "format": "slack"}
        ]}),
    );
    let (mut e, id) = engine_with(body);
    let s = Series::of(&[Some(131.)]);
    e.advance(T0, T0, None, &s);
    e.advance(T0 + M, T0 + M + 250, None, &s);
    let d = e.take_due(i64::MAX, 10);
    assert_eq!(d.len(), 3);
    let b: Vec<Json> = d
        .iter()
        .map(|d| serde_json::from_str(&d.body).unwrap())
        .collect();
    assert_eq!(
        b[0],
        json!({"rule": "r1", "rule_id": id, "tenant": "acme", "status": "firing", "value": 131,
               "metric": "count", "event_type": ["error"], "granularity": "1m",
               "detector": {"kind": "threshold", "op": ">", "value": 100.0},
               "bucket_start": "2026-11-01T12:00:00Z", "bucket_end": "2026-11-01T12:01:00Z",
               "episode_start": "2026-11-01T12:00:00Z", "at": "2026-11-01T12:01:00.250Z",
               "dedupe_key": format!("{id}:{T0}:firing"), "labels": {}})
    );
    assert_eq!(b[1]["event_action"], "trigger");
    assert_eq!(b[1]["routing_key"], "R0UT1NG");
    assert_eq!(b[1]["dedup_key"], json!(format!("{id}:{T0}")));
    assert_eq!(b[1]["payload"]["severity"], "error");
    assert!(b[1]["payload"]["summary"].as_str().unwrap().contains("r1"));
    assert!(b[2]["text"].as_str().unwrap().contains("FIRING"));
}

#[test]
fn wall_clock_carries_a_live_stream_forward_but_not_a_backfill() {
    let mut p = Progress::new(2000, 600_000);
    assert_eq!(p.closed_through(T0), None);
    // Live: the watermark is 5 s behind the wall clock, then stops.
    p.observe(Some(T0 - 5000), T0);
    assert_eq!(p.closed_through(T0 + 1000), Some(T0 - 5000));
    assert_eq!(p.closed_through(T0 + 62_000), Some(T0 + 55_000));
    // Never goes back.
    p.observe(Some(T0 - 1000), T0 + 63_000);
    assert_eq!(p.closed_through(T0 + 63_000), Some(T0 + 55_000));
    // A backfill a day behind: only its watermark counts.
    let mut p = Progress::new(2000, 600_000);
    p.observe(Some(T0 - 86_400_000), T0);
    assert_eq!(p.closed_through(T0 + 3_600_000), Some(T0 - 86_400_000));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However a threshold series flaps, notifications alternate
        /// firing/resolved starting with firing, every firing comes after
        /// `for` true buckets in a row and every resolved after
        /// `resolve_after` false ones, and every dedupe key is distinct.
        #[test]
        fn episodes_alternate(vals in proptest::collection::vec(0u8..3, 1..80), f in 1i64..4, r in 1i64..4) {
            let body = rule(json!({"kind": "threshold", "op": ">", "value": 1}),
                json!({"for": format!("{f}m"), "resolve_after": format!("{r}m")}));
            let (mut e, _) = engine_with(body);
            let s = Series::of(&vals.iter().map(|&v| Some(v as f64)).collect::<Vec<_>>());
            let mut keys = std::collections::HashSet::new();
            e.advance(T0, T0, None, &s);
            let mut expect_firing = true;
            for i in 0..vals.len() as i64 {
                e.advance(T0 + (i + 1) * M, T0, None, &s);
                for d in e.take_due(i64::MAX, usize::MAX) {
                    prop_assert!(keys.insert(d.dedupe_key.clone()));
                    let want = if expect_firing { "firing" } else { "resolved" };
                    prop_assert_eq!(d.status.as_str(), want);
                    let run = if expect_firing { f } else { r };
                    let i = i as usize;
                    prop_assert!(i + 1 >= run as usize);
                    for v in &vals[i + 1 - run as usize..=i] {
                        prop_assert_eq!(*v > 1, expect_firing);
                    }
                    expect_firing = !expect_firing;
                    e.finish(d.id, Outcome::Delivered, 0);
                }
            }
        }
    }
}

/// The alert state file as committed in `tests/fixtures/alerts-v1.json`
/// (a z-score rule that learned a window, a silenced threshold rule, one
/// pending delivery): today's code loads it with every rule, state and
/// delivery.
#[test]
fn the_committed_alert_state_file_loads() {
    let fixture = std::path::Path::new(&*manifest_dir()).join("tests/fixtures/alerts-v1.json");
    // v1 was written whole on every change; today's code writes a journal
    // beside the snapshot (v2 below), so v1 cannot be written again.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.json");
    std::fs::copy(&fixture, &path).unwrap();
    let mut e = Engine::open(Some(path), EngineConfig::default()).unwrap();
    let pending = e.take_due(i64::MAX, 10);
    assert_eq!(pending.len(), 1);
    assert!(
        pending[0].body.contains("\"firing\""),
        "{}",
        pending[0].body
    );
    let rules: Vec<_> = e.rules(None).collect();
    assert_eq!(rules.len(), 2);
    let (z, zs) = rules.iter().find(|(r, _)| r.name == "z").unwrap();
    assert_eq!(z.tenant, "acme");
    assert!(zs.next_bucket.is_some());
    let (t, _) = rules.iter().find(|(r, _)| r.name == "t").unwrap();
    assert_eq!(t.tenant, "globex");
    assert!(t.silenced(T0 + 60_000));
    assert_eq!(t.notify[0].webhook, "http://127.0.0.1:9/hook");
}

/// The v2 alert state (`tests/fixtures/alerts-v2/`: a snapshot of
/// generation 1 and its journal): the snapshot holds two rules and a
/// pending delivery, the journal a silence lifted, a rule deleted and a
/// delivery done. Today's code loads both. `TALLY_WRITE_ALERTS_FIXTURE=1`
/// writes it again (only when the format changes, as a new directory).
#[test]
fn the_committed_alert_state_v2_loads() {
    let fixture = std::path::Path::new(&*manifest_dir()).join("tests/fixtures/alerts-v2");
    if std::env::var_os("TALLY_WRITE_ALERTS_FIXTURE").is_some() {
        let _ = std::fs::remove_dir_all(&fixture);
        std::fs::create_dir_all(&fixture).unwrap();
        let mut e =
            Engine::open(Some(fixture.join("alerts.json")), EngineConfig::default()).unwrap();
        let z = rule(
            json!({"kind": "zscore", "window": 3, "z": 2.0}),
            json!({"name": "z"}),
        );
        e.upsert(&z, "acme", T0, Some(T0)).unwrap();
        let t = rule(
            json!({"kind": "threshold", "op": ">", "value": 5}),
            json!({"name": "t", "silenced_until": T0 + 3_600_000}),
        );
        let (t, _) = e.upsert(&t, "globex", T0, Some(T0)).unwrap();
        let o = rule(
            json!({"kind": "threshold", "op": ">", "value": 5}),
            json!({"name": "old"}),
        );
        let (o, _) = e.upsert(&o, "globex", T0, Some(T0)).unwrap();
        let src = Series::of(&[Some(1.0), Some(2.0), Some(1.0), Some(50.0)]);
        e.advance(T0 + 4 * M, T0 + 4 * M, None, &src);
        e.persist().unwrap();
        e.fold_now().unwrap();
        e.silence("globex", &t.id, None).unwrap();
        e.delete("globex", &o.id).unwrap();
        let due = e.take_due(i64::MAX, 10);
        let z_delivery = due.iter().find(|d| d.rule == "z").unwrap().id;
        e.finish(z_delivery, Outcome::Delivered, T0 + 5 * M);
        e.persist().unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for f in ["alerts.json", "alerts.journal"] {
        std::fs::copy(fixture.join(f), dir.path().join(f)).unwrap();
    }
    let mut e = Engine::open(
        Some(dir.path().join("alerts.json")),
        EngineConfig::default(),
    )
    .unwrap();
    let rules: Vec<_> = e.rules(None).collect();
    assert_eq!(rules.len(), 2, "the journal deleted one of three");
    let (t, _) = rules.iter().find(|(r, _)| r.name == "t").unwrap();
    assert!(!t.silenced(T0 + 60_000), "the journal lifted the silence");
    let (_, zs) = rules.iter().find(|(r, _)| r.name == "z").unwrap();
    assert!(zs.next_bucket.is_some());
    let due = e.take_due(i64::MAX, 10);
    assert!(
        due.iter().all(|d| d.rule != "z"),
        "the journal delivered it"
    );
    assert!(
        e.history("acme", None, 10)
            .iter()
            .any(|h| h.to == "delivered"),
        "the journal's history entry"
    );
}

/// A change costs its own size: with 60 rules of long webhook URLs, one
/// silence appends a record a small fraction of the state's size.
#[test]
fn a_change_appends_its_own_size_not_the_whole_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.json");
    let mut e = Engine::open(Some(path.clone()), EngineConfig::default()).unwrap();
    let mut ids = Vec::new();
    for i in 0..60 {
        let url = format!("http://127.0.0.1:9/{}", "x".repeat(2000));
        let body = json!({"name": format!("r{i}"), "metric": "count", "granularity": "1m",
            "detector": {"kind": "threshold", "op": ">", "value": 1},
            "notify": [{"webhook": url}]});
        ids.push(e.upsert(&body, "acme", T0, Some(T0)).unwrap().0.id);
    }
    e.persist().unwrap();
    e.fold_now().unwrap();
    let (snapshot, before) = e.persisted_bytes();
    assert!(snapshot > 120_000, "{snapshot}");
    e.silence("acme", &ids[7], Some(T0 + M)).unwrap();
    e.persist().unwrap();
    let (_, after) = e.persisted_bytes();
    assert!(
        after - before < 6_000,
        "{} bytes for one silence",
        after - before
    );
    drop(e);
    let e = Engine::open(Some(path), EngineConfig::default()).unwrap();
    assert!(e.rule(&ids[7]).unwrap().0.silenced(T0));
}

mod journal_model {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Model test of the snapshot and journal: random rule changes,
        /// evaluations and deliveries, persists, forced folds, crashes
        /// (unpersisted changes lost, junk torn onto the journal), and a
        /// crash between a fold's snapshot and its new journal (the old
        /// journal left in place). After every reopen the engine equals
        /// the one at the last persist.
        #[test]
        fn reopened_engine_equals_the_last_persisted_one(
            ops in proptest::collection::vec((0u8..9, 0u8..4, 0u8..50), 1..60)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("alerts.json");
            let jpath = dir.path().join("alerts.journal");
            let cfg = || EngineConfig { max_queue: 5, history: 8, max_attempts: 2, ..EngineConfig::default() };
            let mut e = Engine::open(Some(path.clone()), cfg()).unwrap();
            let mut persisted = e.state_json();
            let vals: Vec<Option<f64>> = ops.iter().map(|o| Some(f64::from(o.2))).collect();
            let src = Series::of(&vals);
            let mut minute = 0i64;
            for (op, n, x) in ops {
                let id = e.rules(None).nth(n as usize % 3).map(|(r, _)| r.id.clone());
                match op {
                    0 | 1 => {
                        let body = rule(
                            json!({"kind": "threshold", "op": ">", "value": x % 20}),
                            json!({"name": format!("r{}", n % 3)}),
                        );
                        e.upsert(&body, "acme", T0, Some(T0)).unwrap();
                    }
                    2 => if let Some(id) = id { e.delete("acme", &id).unwrap(); },
                    3 => if let Some(id) = id {
                        e.silence("acme", &id, (x % 2 == 0).then_some(T0 + i64::from(x) * M)).unwrap();
                    },
                    4 => {
                        minute += 1;
                        e.advance(T0 + minute * M, T0 + minute * M, None, &src);
                    }
                    5 => for d in e.take_due(i64::MAX, 3) {
                        let outcome = if x % 3 == 0 { Outcome::Failed("500".into()) } else { Outcome::Delivered };
                        e.finish(d.id, outcome, T0 + minute * M);
                    },
                    6 => {
                        e.persist().unwrap();
                        persisted = e.state_json();
                    }
                    7 => {
                        e.persist().unwrap();
                        if x % 2 == 0 {
                            // The fold's snapshot is renamed in place, then
                            // the crash: the old journal is still there.
                            let old = std::fs::read(&jpath).ok();
                            e.fold_now().unwrap();
                            if let Some(old) = old {
                                std::fs::write(&jpath, old).unwrap();
                            }
                        } else {
                            e.fold_now().unwrap();
                        }
                        persisted = e.state_json();
                        drop(e);
                        e = Engine::open(Some(path.clone()), cfg()).unwrap();
                        prop_assert_eq!(e.state_json(), persisted.clone());
                    }
                    _ => {
                        // Crash: what was not persisted is gone; maybe a
                        // torn append at the journal's end.
                        drop(e);
                        if x % 2 == 0 && jpath.exists() {
                            let mut f = std::fs::OpenOptions::new().append(true).open(&jpath).unwrap();
                            std::io::Write::write_all(&mut f, &[0x20, 0, 0, 0, 1, 2, 3][..(x as usize % 7)]).unwrap();
                        }
                        e = Engine::open(Some(path.clone()), cfg()).unwrap();
                        prop_assert_eq!(e.state_json(), persisted.clone());
                    }
                }
            }
            e.persist().unwrap();
            let last = e.state_json();
            drop(e);
            let e = Engine::open(Some(path), cfg()).unwrap();
            prop_assert_eq!(e.state_json(), last);
        }
    }
}

/// The crate's directory: cargo's at run time (a test executable reused
/// from a shared target dir may have been built from another checkout),
/// else where it was built.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

/// Applies `changes` to `to` as the replicated log would.
fn ship(changes: &[crate::Change], to: &mut Engine) {
    for c in changes {
        to.apply_change(&c.key, c.value.as_deref()).unwrap();
    }
}

#[test]
fn a_replica_takes_over_mid_episode_and_sends_nothing_twice() {
    let cfg = || EngineConfig {
        history: 3,
        ..EngineConfig::default()
    };
    let open = || Engine::open(None, cfg()).unwrap().replicated();
    let mut a = open();
    let mut b = open();
    // Neither evaluates before it holds the lease.
    let body = rule(
        json!({"kind": "threshold", "op": ">=", "value": 100}),
        json!({"resolve_after": "2m"}),
    );
    // The rule is made on the follower: every node answers the API.
    b.upsert(&body, "acme", T0, Some(T0)).unwrap();
    let mut log = b.take_changes();
    assert!(log.iter().any(|c| c.key.starts_with("rule/")));
    let s = Series::of(&[
        Some(1.),
        Some(100.),
        Some(120.),
        Some(1.),
        Some(130.),
        Some(1.),
        Some(1.),
        Some(1.),
    ]);
    assert_eq!(
        b.advance(T0 + M, T0, None, &s),
        0,
        "a follower evaluates nothing"
    );
    ship(&log, &mut a);
    a.set_leader(true);
    a.advance(T0, T0, None, &s);
    let mut all = Vec::new();
    for i in 0..4 {
        a.advance(T0 + (i + 1) * M, T0, None, &s);
        all.extend(drain(&mut a));
        let c = a.take_changes();
        ship(&c, &mut b);
        log.extend(c);
    }
    // Bucket 4 is evaluated, its state shipped, then the leader dies.
    a.advance(T0 + 5 * M, T0, None, &s);
    let c = a.take_changes();
    ship(&c, &mut b);
    log.extend(c);
    drop(a);
    assert!(
        b.take_due(i64::MAX, usize::MAX).is_empty(),
        "not the leader yet"
    );
    b.set_leader(true);
    assert_eq!(b.rules(Some("acme")).next().unwrap().1.state, State::Firing);
    b.advance(T0 + 5 * M, T0, None, &s);
    for i in 5..8 {
        b.advance(T0 + (i + 1) * M, T0, None, &s);
        all.extend(drain(&mut b));
        log.extend(b.take_changes());
    }
    assert_eq!(
        all,
        vec![
            got("firing", json!(100), 1, 1),
            got("resolved", json!(1), 6, 1)
        ]
    );
    // A node that starts later rebuilds the same engine from the log as
    // compaction leaves it: the last value per key, in log order.
    let mut last: Vec<&crate::Change> = Vec::new();
    for c in &log {
        last.retain(|x| x.key != c.key);
        last.push(c);
    }
    let mut c = open();
    for x in last {
        c.apply_change(&x.key, x.value.as_deref()).unwrap();
    }
    assert_eq!(c.state_json(), b.state_json());
    assert_eq!(
        c.history("acme", None, 100).len(),
        3,
        "history keeps its cap"
    );
    assert!(
        log.iter()
            .any(|c| c.key.starts_with("history/") && c.value.is_none()),
        "aged-out history entries are tombstoned"
    );
}

/// `consumer_lag_seconds > 30` for 5 minutes: the buckets are wall-clock
/// minutes, closed as the clock passes them even while no tenant's event
/// time moves (a stuck consumer is exactly when it does not).
#[test]
fn a_node_metric_rule_judges_wall_clock_buckets_without_event_time() {
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    let body = json!({
        "name": "lagging", "metric": "consumer_lag_seconds", "granularity": "1m",
        "detector": {"kind": "threshold", "op": ">", "value": 30},
        "for": "5m", "resolve_after": "2m",
        "notify": [{"webhook": "http://127.0.0.1:9/hook"}],
    });
    // Created at T0 while the tenant's event time is far behind: judged
    // from the wall clock's bucket on.
    let (r, _) = e.upsert(&body, "acme", T0, Some(T0 - 86_400_000)).unwrap();
    assert!(r.node_metric() && !r.zero_when_empty());
    let mut lag: Vec<Option<f64>> = vec![Some(2.0), Some(45.0)];
    lag.extend([
        Some(60.0),
        Some(90.0),
        Some(100.0),
        Some(120.0),
        Some(150.0),
    ]);
    lag.extend([Some(0.0), Some(0.0), Some(0.0)]);
    let s = Series::of(&lag);
    let mut got_all = Vec::new();
    for i in 0..lag.len() as i64 {
        // No tenant's clock has closed anything: only the wall clock moves.
        let now = T0 + (i + 1) * M;
        e.advance_tenants(&|_| None, now, None, &s);
        got_all.extend(drain(&mut e));
    }
    // Above 30 from bucket 1: the fifth such bucket (5) fires the episode
    // that began at 1; two calm buckets resolve it at 8.
    assert_eq!(
        got_all,
        vec![
            got("firing", json!(120), 5, 1),
            got("resolved", json!(0), 8, 1)
        ]
    );
    // Events of the tenant do not judge it either.
    assert_eq!(e.rule(&r.id).unwrap().1.state, State::Ok);
}

#[test]
fn node_metric_rules_refuse_an_event_type() {
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    let body = json!({
        "name": "lagging", "metric": "consumer_lag_records", "event_type": ["error"],
        "detector": {"kind": "threshold", "op": ">", "value": 1000},
    });
    let err = e.upsert(&body, "acme", T0, None).unwrap_err().to_string();
    assert!(
        err.contains("event_type") && err.contains("node metric"),
        "{err}"
    );
    let body = json!({"name": "x", "metric": "lag", "detector": {"kind": "threshold", "op": ">", "value": 1}});
    let err = e.upsert(&body, "acme", T0, None).unwrap_err().to_string();
    assert!(err.contains("consumer_lag_seconds"), "{err}");
}

/// `window`, `where`, `over` and `group_by` as on the metrics API.
#[test]
fn windows_filters_and_ratios_parse_and_refuse_by_field() {
    let mut e = Engine::open(None, EngineConfig::default()).unwrap();
    let body = json!({
        "name": "error-rate", "metric": "count", "where": ["event_type:error"],
        "over": "count", "granularity": "1m", "window": "5m",
        "detector": {"kind": "threshold", "op": ">", "value": 0.05},
    });
    let (r, _) = e.upsert(&body, "acme", T0, None).unwrap();
    assert_eq!(r.event_type, vec!["error".to_string()]);
    assert_eq!(r.window_ms, Some(5 * M));
    assert_eq!(r.over.as_deref(), Some("count"));
    assert!(
        !r.zero_when_empty(),
        "a ratio has no value without a denominator"
    );
    let shown = r.to_json();
    assert_eq!(
        (shown["window"].as_str(), shown["over"].as_str()),
        (Some("5m"), Some("count"))
    );
    // A filter on another dimension is kept as such (the HTTP layer checks
    // that the tenant declared it).
    let mut b = body.clone();
    b["name"] = json!("de-errors");
    b["where"] = json!(["event_type:error", "country:DE", "country:AT"]);
    let (de, _) = e.upsert(&b, "acme", T0, None).unwrap();
    assert_eq!(de.event_type, vec!["error".to_string()]);
    assert_eq!(
        de.filters,
        vec![
            ("country".into(), "DE".into()),
            ("country".into(), "AT".into())
        ]
    );
    assert_eq!(de.to_json()["where"], json!(["country:DE", "country:AT"]));
    let q = de.query(0, M);
    assert_eq!(
        q.filters,
        vec![(
            "country".to_string(),
            vec!["DE".to_string(), "AT".to_string()]
        )]
    );
    // Changing the window is a new definition (the state starts again).
    let mut other = r.clone();
    other.window_ms = Some(10 * M);
    assert!(!r.same_definition(&other));
    for (extra, field, says) in [
        (json!({"where": "event_type"}), "where", "event_type:error"),
        (
            json!({"group_by": ["country", 3]}),
            "group_by",
            "dimension name",
        ),
        (json!({"window": "90s"}), "window", "granularity"),
        (json!({"window": "soon"}), "window", "5m"),
        (json!({"over": "ratio"}), "over", "count"),
    ] {
        let mut b = json!({"name": "x", "metric": "count",
            "detector": {"kind": "threshold", "op": ">", "value": 1}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let msg = e.upsert(&b, "acme", T0, None).unwrap_err();
        let crate::AlertError::Rule(re) = &msg else {
            panic!("{extra}: {msg}");
        };
        assert_eq!(re.field, field, "{extra}: {msg}");
        assert!(msg.to_string().contains(says), "{extra}: {msg}");
    }
}

/// Several label combinations, each a map from bucket to value.
struct Grouped(Vec<(&'static str, BTreeMap<Millis, f64>)>);

impl Source for Grouped {
    fn values(&self, _: &Rule, _: Millis, _: Millis) -> Vec<(Millis, f64)> {
        unreachable!("a grouped rule asks for series")
    }

    fn series(
        &self,
        r: &Rule,
        from: Millis,
        to: Millis,
    ) -> Vec<(crate::engine::Labels, Vec<(Millis, f64)>)> {
        assert_eq!(r.group_by, vec!["country".to_string()]);
        self.0
            .iter()
            .map(|(c, m)| {
                (
                    vec![("country".to_string(), Some(c.to_string()))],
                    m.range(from..to).map(|(&b, &v)| (b, v)).collect(),
                )
            })
            .filter(|(_, p): &(_, Vec<_>)| !p.is_empty())
            .collect()
    }

    fn first_minute(&self, _: &str) -> Option<Millis> {
        Some(T0)
    }
}

/// "Errors by country > 100" pages once per country and episode: each
/// label combination has its own state, its own dedupe key, and the
/// webhook body carries its labels; a country that goes quiet resolves.
#[test]
fn a_grouped_rule_pages_once_per_label_combination_and_episode() {
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 100}),
        json!({"group_by": "country", "resolve_after": "2m"}),
    ));
    let of = |vals: &[Option<f64>]| -> BTreeMap<Millis, f64> {
        vals.iter()
            .enumerate()
            .filter_map(|(i, v)| Some((T0 + i as i64 * M, (*v)?)))
            .collect()
    };
    let s = Grouped(vec![
        // DE spikes twice: two episodes.
        (
            "DE",
            of(&[
                Some(5.),
                Some(150.),
                Some(160.),
                Some(1.),
                Some(1.),
                Some(200.),
                Some(1.),
                Some(1.),
            ]),
        ),
        // US spikes once, overlapping DE's first episode, then goes quiet
        // (no events: 0 for a count).
        ("US", of(&[Some(120.), Some(130.), Some(10.)])),
        // FR never crosses.
        ("FR", of(&[Some(99.), Some(100.), Some(50.)])),
    ]);
    e.advance(T0, T0, None, &s);
    let mut sent = Vec::new();
    for i in 0..8 {
        e.advance(T0 + (i + 1) * M, T0 + (i + 1) * M, None, &s);
        for d in e.take_due(i64::MAX, usize::MAX) {
            let b: Json = serde_json::from_str(&d.body).unwrap();
            let at = (tally_types::time::parse_rfc3339(b["bucket_start"].as_str().unwrap())
                .unwrap()
                - T0)
                / M;
            sent.push((
                b["labels"]["country"].as_str().unwrap().to_string(),
                b["status"].as_str().unwrap().to_string(),
                at,
                d.dedupe_key.clone(),
            ));
            e.finish(d.id, Outcome::Delivered, 0);
        }
        if i == 1 {
            let (_, st) = e.rule(&id).unwrap();
            assert_eq!(
                st.state,
                State::Firing,
                "the rule fires while any series does"
            );
            assert_eq!(e.firing(), 2, "DE and US");
        }
    }
    let plain: Vec<(&str, &str, i64)> = sent
        .iter()
        .map(|(c, s, b, _)| (c.as_str(), s.as_str(), *b))
        .collect();
    assert_eq!(
        plain,
        vec![
            ("US", "firing", 0),
            ("DE", "firing", 1),
            ("US", "resolved", 3),
            ("DE", "resolved", 4),
            ("DE", "firing", 5),
            ("DE", "resolved", 7),
        ]
    );
    let keys: std::collections::HashSet<&str> =
        sent.iter().map(|(_, _, _, k)| k.as_str()).collect();
    assert_eq!(
        keys.len(),
        sent.len(),
        "every notification has its own dedupe key"
    );
    let (_, st) = e.rule(&id).unwrap();
    assert_eq!(st.state, State::Ok);
    // The history names the series of each transition.
    let h = e.history("acme", Some(&id), 100);
    assert!(
        h.iter()
            .any(|x| x.to == "firing" && x.labels == Some(json!({"country": "US"})))
    );
}

/// A bucket corrected after it was judged (late events, a replay) is
/// judged again: when the correction would have changed a notification,
/// the history says so, once, and nothing is sent for the past.
#[test]
fn a_corrected_bucket_is_judged_again_and_the_history_says_what_it_would_change() {
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 100}),
        json!({}),
    ));
    let mut s = Series::of(&[Some(10.0), Some(90.0), Some(20.0), Some(131.0), Some(5.0)]);
    assert_eq!(
        run(&mut e, &s, 5),
        vec![
            got("firing", json!(131), 3, 3),
            got("resolved", json!(5), 4, 3)
        ]
    );
    let corrections = |e: &Engine| -> Vec<(String, i64, Option<f64>)> {
        e.history("acme", Some(&id), 100)
            .into_iter()
            .filter(|h| h.kind == "correction")
            .map(|h| (h.to.clone(), (h.bucket_start.unwrap() - T0) / M, h.value))
            .collect()
    };
    let now = T0 + 10 * M;

    // A value that changes and a condition that does not: nothing to say.
    s.0.insert(T0 + 2 * M, 40.0);
    assert_eq!(e.rejudge(&[("acme".into(), T0 + 2 * M)], now, &s), 0);
    // Another tenant's correction is not this rule's.
    s.0.insert(T0 + M, 150.0);
    assert_eq!(e.rejudge(&[("other".into(), T0 + M)], now, &s), 0);

    // Bucket 1 goes over the threshold: an episode the rule never had.
    assert_eq!(e.rejudge(&[("acme".into(), T0 + M + 5_000)], now, &s), 1);
    assert_eq!(corrections(&e), vec![("would_fire".into(), 1, Some(150.0))]);
    let h = e.history("acme", Some(&id), 100);
    let last = h.iter().rev().find(|h| h.kind == "correction").unwrap();
    let detail = last.detail.as_deref().unwrap();
    assert!(detail.contains("from 90 to 150"), "{detail}");
    assert!(detail.contains("would have fired"), "{detail}");
    assert!(drain(&mut e).is_empty(), "nothing is sent for the past");
    assert_eq!(
        e.rule(&id).unwrap().1.state,
        State::Ok,
        "the live state goes on"
    );

    // The same correction seen again says nothing new.
    assert_eq!(e.rejudge(&[("acme".into(), T0 + M)], now, &s), 0);

    // Bucket 3, the one that fired, falls under the threshold: judged
    // against the corrected run (an episode from bucket 1 resolved at 2),
    // it no longer starts one.
    s.0.insert(T0 + 3 * M, 70.0);
    assert_eq!(e.rejudge(&[("acme".into(), T0 + 3 * M)], now, &s), 1);
    let c = corrections(&e);
    assert_eq!(c.len(), 2);
    assert!(
        c.contains(&("would_not_fire".into(), 3, Some(70.0))),
        "{c:?}"
    );

    // A bucket not judged yet is judged with its corrected value when it
    // closes, not here.
    s.0.insert(T0 + 7 * M, 500.0);
    assert_eq!(e.rejudge(&[("acme".into(), T0 + 7 * M)], now, &s), 0);
    assert!(drain(&mut e).is_empty());
}

/// For a series that fires only after several true buckets (`for`), a
/// correction that breaks the run moves the episode, which the history
/// tells as the firing that would not have happened.
#[test]
fn a_correction_that_breaks_a_for_run_is_told() {
    let (mut e, id) = engine_with(rule(
        json!({"kind": "threshold", "op": ">", "value": 100}),
        json!({"for": "2m"}),
    ));
    let mut s = Series::of(&[Some(120.0), Some(130.0), Some(140.0), Some(10.0)]);
    assert_eq!(
        run(&mut e, &s, 4),
        vec![
            got("firing", json!(130), 1, 0),
            got("resolved", json!(10), 3, 0)
        ]
    );
    s.0.insert(T0, 50.0);
    assert_eq!(e.rejudge(&[("acme".into(), T0)], T0 + 10 * M, &s), 1);
    let h = e.history("acme", Some(&id), 100);
    let c = h.iter().find(|h| h.kind == "correction").unwrap();
    assert_eq!(c.to, "would_not_fire");
    assert_eq!(c.bucket_start, Some(T0 + M));
    assert_eq!(c.to_json()["kind"], json!("correction"));
}
