//! Dimensions in the rollup store, against an independent computation:
//! every (bucket, combination) count and sum exact for any `group_by` and
//! `where`, the cap folding into `__other__` the same way after a round
//! trip through the encoding, and the encoding of older aggregates still
//! read.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_store::dims::OTHER;
use tally_store::{
    Agg, Dimensions, Granularity, Metric, MetricQuery, MinuteBucket, RollupStore, Value,
};
use tally_types::bin::{Dec, Enc};
use tally_types::codec::PropValue;
use tally_types::time::{HOUR_MS, MINUTE_MS};
use tally_types::{BatchReader, BatchWriter, Millis};

const T0: Millis = 1_793_534_400_000; // 2026-11-01T12:00:00Z

/// One generated event, as the oracle sees it.
#[derive(Clone, Debug)]
struct Ev {
    ts: Millis,
    ty: &'static str,
    user: String,
    country: Option<String>,
    device: Option<&'static str>,
    /// `page` as a number (a dimension value need not be a string).
    page: Option<i64>,
    amount: f64,
}

fn write(events: &[Ev], tenant: &str) -> Vec<u8> {
    let mut w = BatchWriter::new();
    for (i, e) in events.iter().enumerate() {
        let at = w.begin_event(tenant, &format!("e{i}"), e.ty, e.ts, Some(&e.user), None);
        let mut n = 1;
        w.prop("amount", PropValue::Float(e.amount));
        if let Some(c) = &e.country {
            w.prop("country", PropValue::Str(c));
            n += 1;
        }
        if let Some(d) = e.device {
            w.prop("device", PropValue::Str(d));
            n += 1;
        }
        if let Some(p) = e.page {
            w.prop("page", PropValue::Int(p));
            n += 1;
        }
        w.finish_event(at, n);
    }
    w.finish()
}

fn generate(rng: &mut StdRng, n: usize) -> Vec<Ev> {
    const TYPES: [&str; 3] = ["page_view", "click", "error"];
    const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
    (0..n)
        .map(|_| Ev {
            ts: T0 + rng.random_range(0..30 * MINUTE_MS),
            ty: TYPES[rng.random_range(0..3)],
            user: format!("u{}", rng.random_range(0..50)),
            country: rng
                .random_bool(0.9)
                .then(|| format!("C{}", rng.random_range(0..8))),
            device: rng
                .random_bool(0.8)
                .then(|| DEVICES[rng.random_range(0..3)]),
            page: rng.random_bool(0.7).then(|| rng.random_range(0..5)),
            amount: rng.random_range(0..1000) as f64 / 4.0,
        })
        .collect()
}

fn store_with(events: &[Ev], dims: Dimensions) -> RollupStore {
    let mut s = RollupStore::new();
    s.set_dimensions(dims);
    let bytes = write(events, "acme");
    for ev in BatchReader::new(&bytes).unwrap() {
        s.add(&ev.unwrap());
    }
    s.commit();
    s
}

fn dims(max_values: usize) -> Dimensions {
    Dimensions::new(
        &["country".into(), "device".into(), "page".into()],
        &[],
        max_values,
        64,
    )
    .unwrap()
}

fn query(metric: Metric, group_by: &[&str], wheres: &[(&str, &str)]) -> MetricQuery {
    let mut q = MetricQuery {
        tenant: "acme".into(),
        metric,
        start: T0,
        end: T0 + 30 * MINUTE_MS,
        granularity: Granularity::M5,
        event_types: Vec::new(),
        group_by: group_by.iter().map(|g| g.to_string()).collect(),
        filters: Vec::new(),
        window: None,
        over: None,
    };
    for (d, v) in wheres {
        q.add_filter(d, v);
    }
    q
}

/// The value of dimension `d` of an event, as the store names it.
fn label(e: &Ev, d: &str) -> Option<String> {
    match d {
        "event_type" => Some(e.ty.to_string()),
        "country" => e.country.clone(),
        "device" => e.device.map(String::from),
        "page" => e.page.map(|p| p.to_string()),
        _ => unreachable!(),
    }
}

type Answer = BTreeMap<Vec<Option<String>>, BTreeMap<Millis, f64>>;

fn oracle(events: &[Ev], group_by: &[&str], wheres: &[(&str, &str)], sum: bool) -> Answer {
    let mut out = Answer::new();
    for e in events {
        let admitted = group_dims(wheres)
            .iter()
            .all(|(d, vals)| label(e, d).is_some_and(|v| vals.contains(&v.as_str())));
        if !admitted {
            continue;
        }
        let key = group_by.iter().map(|g| label(e, g)).collect();
        let b = T0 + (e.ts - T0) / (5 * MINUTE_MS) * 5 * MINUTE_MS;
        *out.entry(key).or_default().entry(b).or_default() += if sum { e.amount } else { 1.0 };
    }
    out
}

fn group_dims<'a>(wheres: &[(&'a str, &'a str)]) -> Vec<(&'a str, Vec<&'a str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
    for &(d, v) in wheres {
        match out.iter_mut().find(|(x, _)| *x == d) {
            Some((_, vals)) => vals.push(v),
            None => out.push((d, vec![v])),
        }
    }
    out
}

fn answer(store: &RollupStore, q: &MetricQuery) -> Answer {
    store
        .query(q)
        .unwrap()
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .map(|s| {
            (
                s.labels.into_iter().map(|(_, v)| v).collect(),
                s.points.into_iter().map(|(b, v)| (b, v.as_f64())).collect(),
            )
        })
        .collect()
}

#[test]
fn every_breakdown_and_filter_matches_the_oracle() {
    let mut rng = StdRng::seed_from_u64(27);
    let events = generate(&mut rng, 4000);
    let store = store_with(&events, dims(1000));
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        (vec![], vec![]),
        (vec!["event_type"], vec![]),
        (vec!["country"], vec![]),
        (vec!["event_type", "country"], vec![]),
        (vec!["device", "page"], vec![("event_type", "click")]),
        (
            vec!["country"],
            vec![("device", "mobile"), ("device", "tablet")],
        ),
        (vec![], vec![("country", "C3"), ("page", "2")]),
        (
            vec!["page"],
            vec![
                ("event_type", "error"),
                ("event_type", "click"),
                ("country", "C1"),
            ],
        ),
        (vec!["country"], vec![("country", "nowhere")]),
        // One dimension named (grouped, filtered or both): answered from
        // the buckets' totals per value, not their combinations.
        (vec!["device"], vec![("event_type", "click")]),
        (vec![], vec![("page", "2"), ("page", "4")]),
        (
            vec!["event_type", "country"],
            vec![("country", "C1"), ("country", "C3")],
        ),
        (vec!["page", "event_type"], vec![]),
    ];
    for (group_by, wheres) in cases {
        for (metric, sum) in [(Metric::Count, false), (Metric::Sum("amount".into()), true)] {
            let q = query(metric, &group_by, &wheres);
            let want = oracle(&events, &group_by, &wheres, sum);
            assert_eq!(
                answer(&store, &q),
                want,
                "group_by {group_by:?} where {wheres:?}"
            );
        }
    }
    // Averages, extremes and quantiles per breakdown, from the amounts
    // each (labels, bucket) holds.
    for (group_by, wheres) in [
        (vec!["country"], vec![]),
        (vec!["event_type", "device"], vec![("device", "mobile")]),
        (vec!["country", "page"], vec![("event_type", "click")]),
    ] {
        let mut amounts: BTreeMap<Vec<Option<String>>, BTreeMap<Millis, Vec<f64>>> =
            BTreeMap::new();
        for e in &events {
            let admitted = group_dims(&wheres)
                .iter()
                .all(|(d, vals)| label(e, d).is_some_and(|v| vals.contains(&v.as_str())));
            if admitted {
                let key = group_by.iter().map(|g| label(e, g)).collect();
                let b = T0 + (e.ts - T0) / (5 * MINUTE_MS) * 5 * MINUTE_MS;
                amounts
                    .entry(key)
                    .or_default()
                    .entry(b)
                    .or_default()
                    .push(e.amount);
            }
        }
        type Stat = fn(&mut Vec<f64>) -> f64;
        let stats: [(Metric, Stat); 3] = [
            (Metric::Avg("amount".into()), |v| {
                v.iter().sum::<f64>() / v.len() as f64
            }),
            (Metric::Min("amount".into()), |v| {
                v.iter().copied().fold(f64::MAX, f64::min)
            }),
            (Metric::Max("amount".into()), |v| {
                v.iter().copied().fold(f64::MIN, f64::max)
            }),
        ];
        for (metric, stat) in stats {
            let name = format!("{metric:?}");
            let got = answer(&store, &query(metric, &group_by, &wheres));
            let mut want = Answer::new();
            for (k, points) in &amounts {
                for (b, v) in points {
                    want.entry(k.clone())
                        .or_default()
                        .insert(*b, stat(&mut v.clone()));
                }
            }
            assert_eq!(got.len(), want.len(), "{name} {group_by:?} {wheres:?}");
            for (k, points) in &want {
                for (b, w) in points {
                    let g = got[k][b];
                    assert!((g - w).abs() < 1e-9, "{name} {k:?} at {b}: {g} vs {w}");
                }
            }
        }
        // The median within the sketch's relative accuracy of a value
        // ranked near the middle.
        let got = answer(
            &store,
            &query(Metric::Quantile(0.5, "amount".into()), &group_by, &wheres),
        );
        for (k, points) in &amounts {
            for (b, v) in points {
                let mut v = v.clone();
                v.sort_by(f64::total_cmp);
                let n = v.len() - 1;
                let (lo, hi) = (v[n * 2 / 5], v[(n * 3).div_ceil(5).min(n)]);
                let g = got[k][b];
                assert!(
                    g >= lo * 0.98 - 1e-9 && g <= hi * 1.02 + 1e-9,
                    "median {k:?} at {b}: {g} outside [{lo}, {hi}]"
                );
            }
        }
    }
    // Distinct users per country stay exact while small (sparse sketches).
    let q = query(Metric::UniqueUsers, &["country"], &[]);
    for s in store.query(&q).unwrap() {
        let c = s.label("country").map(String::from);
        for (b, v) in s.points {
            let mut users: Vec<&str> = events
                .iter()
                .filter(|e| e.country == c && (e.ts - b) >= 0 && e.ts - b < 5 * MINUTE_MS)
                .map(|e| e.user.as_str())
                .collect();
            users.sort_unstable();
            users.dedup();
            assert_eq!(v, Value::Int(users.len() as u64), "{c:?} at {b}");
        }
    }
}

/// Totals per value of one dimension are derived from a bucket on first
/// use: a bucket that changes afterwards (late events, a bucket replaced by
/// a view) must answer with the change, never with the totals kept.
#[test]
fn totals_per_value_follow_later_events() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut events = generate(&mut rng, 1500);
    let mut store = store_with(&events, dims(1000));
    let metrics = || [(Metric::Count, false), (Metric::Sum("amount".into()), true)];
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let single: [Case; 5] = [
        (&["country"], &[]),
        (&["event_type", "device"], &[]),
        (&[], &[("page", "3")]),
        (&["device", "country"], &[]),
        (&["page"], &[("country", "C1"), ("event_type", "click")]),
    ];
    for (group_by, wheres) in single {
        for (metric, sum) in metrics() {
            let q = query(metric, group_by, wheres);
            assert_eq!(answer(&store, &q), oracle(&events, group_by, wheres, sum));
        }
    }
    // More events into the same buckets, some with values not seen yet.
    let mut later = generate(&mut rng, 700);
    for e in later.iter_mut().step_by(5) {
        e.country = Some("C9".into());
    }
    let bytes = write(&later, "acme");
    for ev in BatchReader::new(&bytes).unwrap() {
        store.add(&ev.unwrap());
    }
    store.commit();
    events.extend(later);
    for (group_by, wheres) in single {
        for (metric, sum) in metrics() {
            let q = query(metric, group_by, wheres);
            assert_eq!(
                answer(&store, &q),
                oracle(&events, group_by, wheres, sum),
                "after later events: group_by {group_by:?} where {wheres:?}"
            );
        }
    }
    // A bucket replaced whole (as a materialized view does) answers anew.
    let minute = events[0].ts - events[0].ts % MINUTE_MS;
    let ty = events[0].ty;
    let q = query(Metric::Count, &["country"], &[]);
    let before = answer(&store, &q);
    store.set_agg("acme", minute, ty, Default::default());
    store.commit();
    let gone: Vec<Ev> = events
        .iter()
        .filter(|e| !(e.ts - e.ts % MINUTE_MS == minute && e.ty == ty))
        .cloned()
        .collect();
    let after = answer(&store, &q);
    assert_ne!(before, after);
    assert_eq!(after, oracle(&gone, &["country"], &[], false));
}

#[test]
fn a_ratio_divides_by_the_same_labels_without_the_filter() {
    let mut rng = StdRng::seed_from_u64(7);
    let events = generate(&mut rng, 2000);
    let store = store_with(&events, dims(1000));
    let mut q = query(Metric::Count, &["country"], &[("event_type", "error")]);
    q.over = Some(Metric::Count);
    let num = oracle(&events, &["country"], &[("event_type", "error")], false);
    let den = oracle(&events, &["country"], &[], false);
    for (labels, points) in answer(&store, &q) {
        for (b, v) in points {
            let n = num
                .get(&labels)
                .and_then(|p| p.get(&b))
                .copied()
                .unwrap_or(0.0);
            let d = den[&labels][&b];
            assert!(
                (v - n / d).abs() < 1e-12,
                "{labels:?} at {b}: {v} vs {n}/{d}"
            );
        }
    }
}

#[test]
fn undeclared_dimensions_are_refused_naming_the_declared_ones() {
    let store = store_with(&[], dims(1000));
    for q in [
        query(Metric::Count, &["plan"], &[]),
        query(Metric::Count, &[], &[("plan", "pro")]),
    ] {
        let e = store.query(&q).unwrap_err().to_string();
        assert!(
            e.contains("\"plan\"") && e.contains("event_type, country, device, page"),
            "{e}"
        );
    }
}

/// Values past the cap fold into `__other__` per minute, every event still
/// counted; a bucket decoded from its encoding folds later events the same
/// way (recovery replays decide as the first run did).
#[test]
fn values_past_the_cap_fold_into_other_and_decide_the_same_after_a_round_trip() {
    let minute = |i: usize, c: usize| Ev {
        ts: T0 + (i as Millis % 2) * MINUTE_MS,
        ty: "click",
        user: format!("u{i}"),
        country: Some(format!("C{c}")),
        device: None,
        page: None,
        amount: 1.0,
    };
    // Minute 0 sees C0..C9 in order, minute 1 the same.
    let first: Vec<Ev> = (0..20).map(|i| minute(i, i / 2)).collect();
    let later: Vec<Ev> = (0..20).map(|i| minute(i, 9 - i / 2)).collect();
    let mut whole = first.clone();
    whole.extend(later.iter().cloned());
    let straight = store_with(&whole, dims(3));
    assert_eq!(straight.values_folded(), 4 * 7);

    // The same, with both minutes encoded and decoded between the halves.
    let half = store_with(&first, dims(3));
    let mut again = RollupStore::new();
    again.set_dimensions(dims(3));
    for m in [T0, T0 + MINUTE_MS] {
        let mut e = Enc::new();
        half.minute("acme", m).unwrap().encode(&mut e);
        let b = MinuteBucket::decode(&mut Dec::new(&e.buf)).unwrap();
        again.set_minute("acme", m, b);
    }
    let bytes = write(&later, "acme");
    for ev in BatchReader::new(&bytes).unwrap() {
        again.add(&ev.unwrap());
    }
    again.commit();
    assert_eq!(again, straight);

    let q = query(Metric::Count, &["country"], &[]);
    let got = answer(&straight, &q);
    let mut want = Answer::new();
    for (c, n) in [("C0", 4.0), ("C1", 4.0), ("C2", 4.0), (OTHER, 28.0)] {
        want.insert(vec![Some(c.to_string())], BTreeMap::from([(T0, n)]));
    }
    assert_eq!(got, want);
}

/// Values longer than the limit fold too, whatever the cap.
#[test]
fn long_values_fold_into_other() {
    let e = Ev {
        ts: T0,
        ty: "click",
        user: "u".into(),
        country: Some("x".repeat(65)),
        device: None,
        page: None,
        amount: 1.0,
    };
    let s = store_with(&[e], dims(1000));
    let got = answer(&s, &query(Metric::Count, &["country"], &[]));
    assert_eq!(got.keys().next().unwrap(), &vec![Some(OTHER.to_string())]);
    assert_eq!(s.values_folded(), 1);
}

/// An aggregate encoded before dimensions existed (no dimension section)
/// still decodes; one with a section nested in a section is refused.
#[test]
fn older_aggregates_decode_and_nested_sections_are_refused() {
    let mut plain = Agg {
        count: 2,
        ..Agg::default()
    };
    plain.users.insert(1);
    let mut e = Enc::new();
    plain.encode(&mut e);
    // The pre-dimension layout: count, two sketches, a property count of 0.
    let mut old = Enc::new();
    old.u64(2);
    plain.users.encode(&mut old);
    plain.sessions.encode(&mut old);
    old.u32(0);
    assert_eq!(
        e.buf, old.buf,
        "an aggregate without dimensions encodes as before"
    );
    assert_eq!(Agg::decode(&mut Dec::new(&old.buf)).unwrap(), plain);

    let mut inner = plain.clone();
    inner.by.insert("country=DE".into(), plain.clone());
    let mut outer = plain.clone();
    outer.by.insert("country=AT".into(), inner);
    let mut e = Enc::new();
    outer.encode(&mut e);
    assert!(Agg::decode(&mut Dec::new(&e.buf)).is_err());
}

/// The encoding of a bucket with dimensions, as committed: decoding the
/// fixture gives the bucket, and encoding the bucket gives the fixture.
#[test]
fn the_dimension_encoding_matches_its_fixture() {
    let events = vec![
        Ev {
            ts: T0,
            ty: "click",
            user: "u1".into(),
            country: Some("DE".into()),
            device: Some("mobile"),
            page: Some(3),
            amount: 2.5,
        },
        Ev {
            ts: T0 + 1000,
            ty: "click",
            user: "u2".into(),
            country: None,
            device: Some("desktop"),
            page: None,
            amount: 4.0,
        },
    ];
    let s = store_with(&events, dims(1000));
    let bucket = s.minute("acme", T0).unwrap();
    let mut e = Enc::new();
    bucket.encode(&mut e);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bucket-dims-v1.bin"
    );
    if std::env::var_os("TALLY_WRITE_FIXTURES").is_some() {
        std::fs::write(path, &e.buf).unwrap();
    }
    let fixture = std::fs::read(path).expect("fixture (TALLY_WRITE_FIXTURES=1 writes it)");
    assert_eq!(
        e.buf, fixture,
        "the encoding changed: add a new version and keep this one readable"
    );
    let back = MinuteBucket::decode(&mut Dec::new(&fixture)).unwrap();
    assert_eq!(&back, bucket);
    let agg = &back.types[0].1;
    let mut keys: Vec<&str> = agg.by.keys().map(|k| &**k).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec!["country=DE\x1fdevice=mobile\x1fpage=3", "device=desktop"]
    );
}

/// Every event of a minute with its own combination (hostile input that
/// respects the value cap: 1000 countries × 1000 pages × 3 devices).
fn hostile(n: usize, seed: u64) -> Vec<Ev> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| Ev {
            ts: T0 + rng.random_range(0..MINUTE_MS),
            ty: ["click", "view"][i % 2],
            user: format!("u{i}"),
            country: Some(format!("C{}", rng.random_range(0..1000))),
            device: Some(["a", "b", "c"][rng.random_range(0..3)]),
            page: Some(rng.random_range(0..1000)),
            amount: rng.random_range(0..1000) as f64,
        })
        .collect()
}

/// The combination cap, against an oracle that replays the rule: a new
/// combination is kept while the minute holds fewer than the cap, else
/// its events count under the same dimensions all `__other__`. Totals
/// stay exact, and a minute decoded mid-way decides the same.
#[test]
fn combinations_past_the_cap_fold_into_all_other() {
    let events = hostile(3000, 9);
    let cap = 40;
    let dims_capped = || dims(1000).with_max_combinations(cap).unwrap();
    let store = store_with(&events, dims_capped());
    let mut held: Vec<(&str, String)> = Vec::new();
    let mut want = Answer::new();
    let mut folded = 0;
    for e in &events {
        let raw = format!("{:?}|{:?}|{:?}", e.country, e.device, e.page);
        let known = held.iter().any(|(t, k)| *t == e.ty && *k == raw);
        let key = if known || held.len() < cap {
            if !known {
                held.push((e.ty, raw));
            }
            vec![label(e, "country"), label(e, "device"), label(e, "page")]
        } else {
            folded += 1;
            let other = "other".to_string();
            if !held.iter().any(|(t, k)| *t == e.ty && *k == other) {
                held.push((e.ty, other));
            }
            vec![Some(OTHER.to_string()); 3]
        };
        *want.entry(key).or_default().entry(T0).or_default() += 1.0;
    }
    let q = query(Metric::Count, &["country", "device", "page"], &[]);
    assert_eq!(answer(&store, &q), want);
    assert_eq!(store.combinations_folded(), folded);
    let b = store.minute("acme", T0).unwrap();
    assert!(b.combinations() <= cap + 2, "{}", b.combinations());
    let total: u64 = b.types.iter().map(|(_, a)| a.count).sum();
    assert_eq!(total, events.len() as u64);
    // Single-dimension totals (the per-value path) agree too.
    let q = query(Metric::Count, &["country"], &[]);
    let mut by_country = Answer::new();
    for (k, p) in &want {
        *by_country
            .entry(vec![k[0].clone()])
            .or_default()
            .entry(T0)
            .or_default() += p[&T0];
    }
    assert_eq!(answer(&store, &q), by_country);

    // Half the events, a round trip through the encoding, the other half.
    let (first, later) = events.split_at(1500);
    let half = store_with(first, dims_capped());
    let mut e = Enc::new();
    half.minute("acme", T0).unwrap().encode(&mut e);
    let mut again = RollupStore::new();
    again.set_dimensions(dims_capped());
    again.set_minute(
        "acme",
        T0,
        MinuteBucket::decode(&mut Dec::new(&e.buf)).unwrap(),
    );
    let bytes = write(later, "acme");
    for ev in BatchReader::new(&bytes).unwrap() {
        again.add(&ev.unwrap());
    }
    again.commit();
    assert_eq!(again, store);
}

/// Hours built by downsampling hold at most the cap too, their counts
/// exact.
#[test]
fn downsampled_hours_keep_the_combination_cap() {
    let mut events = Vec::new();
    for m in 0..5 {
        for mut e in hostile(400, m) {
            e.ts = e.ts - e.ts % MINUTE_MS + m as Millis * MINUTE_MS;
            events.push(e);
        }
    }
    let mut store = store_with(&events, dims(1000).with_max_combinations(300).unwrap());
    let before = store.combinations_folded();
    store.downsample(T0 + 2 * HOUR_MS);
    let mut q = query(Metric::Count, &[], &[]);
    q.granularity = Granularity::H1;
    q.start = T0;
    q.end = T0 + HOUR_MS;
    let got = answer(&store, &q);
    assert_eq!(got[&vec![]][&T0], events.len() as f64);
    let h = store
        .tenant_buckets("acme", T0, T0 + HOUR_MS, HOUR_MS)
        .next()
        .unwrap()
        .1;
    assert!(h.combinations() <= 302, "{}", h.combinations());
    assert!(store.combinations_folded() > before);
    q.group_by = vec!["device".into()];
    let sum: f64 = answer(&store, &q).values().map(|p| p[&T0]).sum();
    assert_eq!(sum, events.len() as f64);
}

/// What one tenant-minute costs at the caps (printed for the docs): every
/// event a new combination, far more events than the cap.
#[test]
fn a_hostile_minute_stays_within_its_memory_bound() {
    let events = hostile(40_000, 5);
    let store = store_with(&events, dims(1000));
    let b = store.minute("acme", T0).unwrap();
    let combos = b.combinations();
    let heap: usize = b.types.iter().map(|(_, a)| a.heap_bytes()).sum();
    println!(
        "{} events, {combos} combinations, {heap} bytes ({} per combination)",
        events.len(),
        heap / combos.max(1)
    );
    assert!(combos <= tally_store::dims::MAX_COMBINATIONS + 2);
    assert!(heap < 8 << 20, "{heap} bytes");
}

/// Event types past the cap count under `__other__`, with and without
/// dimensions declared, every event still counted; downsampled hours keep
/// the cap as minutes merge in.
#[test]
fn event_types_past_the_cap_fold_into_other() {
    for declared in [true, false] {
        let mut events = hostile(3000, 3);
        for (i, e) in events.iter_mut().enumerate() {
            e.ty = Box::leak(format!("type-{i}").into_boxed_str());
            e.ts = T0 + (i as Millis % 3) * MINUTE_MS;
        }
        let d = if declared {
            dims(1000)
        } else {
            Dimensions::new(&[], &[], 1000, 64).unwrap()
        };
        let mut store = store_with(&events, d.with_max_event_types(40).unwrap());
        assert_eq!(store.event_types_folded(), 3000 - 3 * 40);
        for m in 0..3 {
            let b = store.minute("acme", T0 + m * MINUTE_MS).unwrap();
            assert_eq!(b.types.len(), 41, "{declared}");
            let other = b.types.iter().find(|(t, _)| &**t == OTHER).unwrap();
            assert_eq!(other.1.count, 1000 - 40);
            assert!(b.types.iter().all(|(t, a)| &**t == OTHER || a.count == 1));
        }
        let mut q = query(Metric::Count, &["event_type"], &[]);
        q.granularity = Granularity::M1;
        let got = answer(&store, &q);
        let total: f64 = got.values().flat_map(|p| p.values()).sum();
        assert_eq!(total, 3000.0);
        store.downsample(T0 + 2 * HOUR_MS);
        let h = store
            .tenant_buckets("acme", T0, T0 + HOUR_MS, HOUR_MS)
            .next()
            .unwrap()
            .1;
        assert_eq!(h.types.len(), 41);
        assert_eq!(h.types.iter().map(|(_, a)| a.count).sum::<u64>(), 3000);
        assert_eq!(store.event_types_folded(), 3000 - 40);
    }
}

/// Property names invented per event: an aggregate keeps at most
/// `MAX_PROPERTIES` of them (the first ones met), its combinations only
/// those, every event still counted, and the values of the kept ones
/// exact; the values left out are counted.
#[test]
fn invented_property_names_stop_at_the_cap() {
    use tally_store::rollup::MAX_PROPERTIES;
    for declared in [true, false] {
        let d = if declared {
            dims(1000)
        } else {
            Dimensions::new(&[], &[], 1000, 64).unwrap()
        };
        let mut s = RollupStore::new();
        s.set_dimensions(d);
        let mut w = BatchWriter::new();
        let (events, per) = (400usize, 30usize);
        let mut names: Vec<Vec<String>> = Vec::new();
        for i in 0..events {
            let at = w.begin_event(
                "acme",
                &format!("e{i}"),
                "click",
                T0 + i as Millis,
                Some("u"),
                None,
            );
            w.prop("country", PropValue::Str(["DE", "FR"][i % 2]));
            // Half the properties are shared by every event, half invented;
            // one event carries more than the fast path takes.
            let n = if i == 7 { 40 } else { per };
            let props: Vec<String> = (0..n)
                .map(|j| {
                    if j % 2 == 0 {
                        format!("shared{j}")
                    } else {
                        format!("p{i}_{j}")
                    }
                })
                .collect();
            for p in &props {
                w.prop(p, PropValue::Int(1));
            }
            w.finish_event(at, 1 + props.len() as u16);
            names.push(props);
        }
        let bytes = w.finish();
        for ev in BatchReader::new(&bytes).unwrap() {
            s.add(&ev.unwrap());
        }
        s.commit();
        let agg = s
            .minute("acme", T0)
            .unwrap()
            .types
            .iter()
            .find(|(t, _)| &**t == "click")
            .unwrap()
            .1
            .clone();
        assert_eq!(agg.count, events as u64);
        assert_eq!(agg.props.len(), MAX_PROPERTIES);
        // The shared properties were met first: exact over every event.
        let shared = agg.prop("shared0").unwrap();
        assert_eq!(shared.count, events as u64);
        assert_eq!(shared.sum.value(), events as f64);
        let values: usize = names.iter().map(Vec::len).sum();
        let kept: u64 = agg.props.iter().map(|(_, n)| n.count).sum();
        assert_eq!(s.properties_dropped(), values as u64 - kept, "{declared}");
        for (_, c) in &agg.by {
            assert!(c.props.iter().all(|(k, _)| agg.prop(k).is_some()));
        }
        if declared {
            let by: u64 = agg
                .by
                .values()
                .map(|c| c.prop("shared0").unwrap().count)
                .sum();
            assert_eq!(by, events as u64);
        }
    }
}

/// An aggregate as a reader sees it: the same for values built in any
/// order (exact sums and sketches keep order-dependent innards).
fn seen(a: &Agg) -> String {
    let mut props: Vec<String> = a
        .props
        .iter()
        .map(|(k, n)| {
            let qs: Vec<Option<f64>> = [0.0, 0.5, 0.9, 1.0]
                .iter()
                .map(|&q| n.sketch.quantile(q))
                .collect();
            format!(
                "{k}:{}:{}:{}:{}:{qs:?}",
                n.count,
                n.min,
                n.max,
                n.sum.value()
            )
        })
        .collect();
    props.sort();
    let mut by: Vec<String> =
        a.by.iter()
            .map(|(k, c)| format!("{k}=>{}", seen(c)))
            .collect();
    by.sort();
    format!(
        "{} u{} s{} {props:?} {by:?}",
        a.count,
        hll(&a.users),
        hll(&a.sessions)
    )
}

fn hll(h: &tally_store::sketch::Hll) -> String {
    match h {
        tally_store::sketch::Hll::Sparse(s) => {
            let mut v: Vec<u64> = s.iter().copied().collect();
            v.sort_unstable();
            format!("{v:?}")
        }
        tally_store::sketch::Hll::Dense(r) => format!("{r:?}"),
    }
}

#[test]
fn deltas_merged_into_earlier_values_give_the_values() {
    // Kafka mode publishes what each interval's events added to a bucket:
    // a reader merging those deltas in order must hold the store's value,
    // whatever the caps folded (event types, values, combinations) and
    // whatever properties a full aggregate dropped.
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = Dimensions::new(
            &["country".into(), "device".into(), "page".into()],
            &[("plain".into(), Vec::new())],
            3,
            64,
        )
        .unwrap()
        .with_max_combinations(6)
        .unwrap()
        .with_max_event_types(2)
        .unwrap();
        let mut store = RollupStore::new();
        store.set_dimensions(d);
        store.track_deltas();
        let mut published: std::collections::HashMap<(Box<str>, Millis, Box<str>), Agg> =
            Default::default();
        let mut keys = std::collections::BTreeSet::new();
        for _round in 0..8 {
            let mut w = BatchWriter::new();
            for i in 0..rng.random_range(0..200) {
                let tenant = if rng.random_bool(0.3) {
                    "plain"
                } else {
                    "acme"
                };
                let ty = ["page_view", "click", "error", "buy"][rng.random_range(0..4)];
                let ts = T0 + rng.random_range(0..4 * MINUTE_MS);
                let user = format!("u{}", rng.random_range(0..300));
                let at = w.begin_event(tenant, &format!("e{i}"), ty, ts, Some(&user), Some(&user));
                let mut n = 0;
                if rng.random_bool(0.8) {
                    w.prop(
                        "country",
                        PropValue::Str(&format!("C{}", rng.random_range(0..6))),
                    );
                    n += 1;
                }
                if rng.random_bool(0.5) {
                    w.prop("page", PropValue::Int(rng.random_range(0..4)));
                    n += 1;
                }
                w.prop(
                    "amount",
                    PropValue::Float(rng.random_range(0..1000) as f64 / 8.0),
                );
                n += 1;
                // Now and then an event inventing properties, so some
                // aggregates fill up and drop values.
                if rng.random_bool(0.3) {
                    for p in 0..60 {
                        let name = format!("x{}", rng.random_range(0..400) + p);
                        w.prop(&name, PropValue::Int(p));
                        n += 1;
                    }
                }
                w.finish_event(at, n);
                for t in [ty, OTHER] {
                    keys.insert((tenant.to_string(), align(ts), t.to_string()));
                }
            }
            let bytes = w.finish();
            for ev in BatchReader::new(&bytes).unwrap() {
                store.add(&ev.unwrap());
            }
            for (k, delta) in store.take_deltas() {
                published.entry(k).or_default().merge(&delta);
            }
            for (t, m, ty) in &keys {
                let have = store.agg(t, *m, ty).map(seen);
                let got = published
                    .get(&(t.as_str().into(), *m, ty.as_str().into()))
                    .map(seen);
                assert_eq!(got, have, "seed {seed}: {t} {m} {ty}");
            }
        }
        assert!(store.take_deltas().is_empty());
    }
}

fn align(ts: Millis) -> Millis {
    ts - ts.rem_euclid(MINUTE_MS)
}
