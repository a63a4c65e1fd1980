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
use tally_types::time::MINUTE_MS;
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
