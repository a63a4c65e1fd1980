use super::*;
use proptest::prelude::*;
use tally_store::{Granularity, Metric, MetricQuery, Value};
use tally_types::BatchWriter;

const T0: Millis = 1_793_534_400_000; // 2026-11-01T12:00:00Z

fn batch(events: &[(&str, Millis)]) -> Vec<u8> {
    let mut w = BatchWriter::new();
    for (id, ts) in events {
        let at = w.begin_event("default", id, "click", *ts, Some("u"), None);
        w.finish_event(at, 0);
    }
    w.finish()
}

struct Harness {
    p: Processor,
    store: Arc<RwLock<RollupStore>>,
    dlq: Arc<Mutex<Dlq>>,
    lsn: u64,
}

impl Harness {
    fn new(partitions: u32) -> Self {
        let store = Arc::new(RwLock::new(RollupStore::new()));
        let dlq = Arc::new(Mutex::new(Dlq::new(1000)));
        let cfg = StreamConfig {
            partitions,
            ..StreamConfig::default()
        };
        Harness {
            p: Processor::new(cfg, store.clone(), dlq.clone()),
            store,
            dlq,
            lsn: 0,
        }
    }

    fn feed(&mut self, partition: u32, append_ms: Millis, events: &[(&str, Millis)]) -> Applied {
        self.feed_payload(partition, append_ms, &batch(events))
    }

    fn feed_payload(&mut self, partition: u32, append_ms: Millis, payload: &[u8]) -> Applied {
        self.lsn += 1;
        self.p
            .apply(RecordRef {
                partition,
                offset: self.lsn * 100,
                next_offset: self.lsn * 100 + 100,
                lsn: self.lsn,
                append_ms,
                payload,
            })
            .unwrap()
    }

    fn count(&self, minute: Millis) -> u64 {
        let q = MetricQuery {
            tenant: "default".into(),
            metric: Metric::Count,
            start: minute,
            end: minute + MINUTE_MS,
            granularity: Granularity::M1,
            event_types: vec![],
            group_by: vec![],
            filters: vec![],
            window: None,
            over: None,
        };
        match self.store.read().query(&q).unwrap()[0].points.first() {
            Some((_, Value::Int(c))) => *c,
            _ => 0,
        }
    }
}

#[test]
fn duplicates_in_one_batch_and_across_batches_count_once() {
    let mut h = Harness::new(1);
    let a = h.feed(0, 0, &[("a", T0), ("a", T0), ("b", T0 + 1)]);
    assert_eq!((a.counted, a.duplicates), (2, 1));
    let a = h.feed(0, 10, &[("b", T0 + 1), ("c", T0 + 2)]);
    assert_eq!((a.counted, a.duplicates), (1, 1));
    assert_eq!(h.count(T0), 3);
}

#[test]
fn lateness_updates_closed_windows_then_dead_letters() {
    let mut h = Harness::new(1);
    h.feed(0, 0, &[("a", T0 + 10_000)]);
    // Watermark far ahead: T0+10min-5s. Window T0 ends at T0+1m; +5m lateness = T0+6m < wm.
    h.feed(0, 1, &[("b", T0 + 10 * MINUTE_MS)]);
    let a = h.feed(0, 2, &[("late", T0 + 30_000)]);
    assert_eq!((a.counted, a.late), (0, 1));
    // Window T0+6m: end T0+7m, + 5m = T0+12m > wm: closed but mutable → counted as correction.
    let a = h.feed(0, 3, &[("corr", T0 + 6 * MINUTE_MS)]);
    assert_eq!((a.counted, a.corrections, a.late), (1, 1, 0));
    assert_eq!(h.count(T0), 1);
    let late = h.dlq.lock().list("default", DlqKind::Late, 10);
    assert_eq!(late.len(), 1);
    assert!(
        late[0].reason.contains("2026-11-01T12:00:00Z"),
        "{}",
        late[0].reason
    );
    assert!(matches!(&late[0].body, DlqBody::Event(j) if j.contains("\"late\"")));
}

#[test]
fn slowest_partition_holds_watermark_until_idle() {
    let mut h = Harness::new(2);
    h.feed(0, 0, &[("a", T0)]);
    h.feed(1, 0, &[("b", T0 + 20 * MINUTE_MS)]);
    // Partition 0 holds the watermark back at T0 - 5s: an old event is not late.
    assert_eq!(h.p.watermark(), Some(T0 - 5_000));
    let a = h.feed(1, 1_000, &[("c", T0 + 1_000)]);
    assert_eq!(a.late, 0);
    // 31 s of append time later partition 0 is idle: partition 1 alone sets the watermark.
    let a = h.feed(1, 32_000, &[("d", T0 + 2_000)]);
    assert_eq!(a.late, 1);
    assert_eq!(h.p.watermark(), Some(T0 + 20 * MINUTE_MS - 5_000));
}

#[test]
fn replay_is_deterministic() {
    type Input = (u32, Millis, Vec<(String, Millis)>);
    let inputs: Vec<Input> = (0..50)
        .map(|i| {
            let evs = (0..20)
                .map(|j| {
                    (
                        format!("e{}", (i * 7 + j * 13) % 300),
                        T0 + ((i * 37 + j * 11) % 900) as Millis * 1000,
                    )
                })
                .collect();
            ((i % 3) as u32, i as Millis * 500, evs)
        })
        .collect();
    let run = || {
        let mut h = Harness::new(3);
        for (p, t, evs) in &inputs {
            let evs: Vec<(&str, Millis)> = evs.iter().map(|(a, b)| (a.as_str(), *b)).collect();
            h.feed(*p, *t, &evs);
        }
        let counts: Vec<u64> = (0..16).map(|m| h.count(T0 + m * MINUTE_MS)).collect();
        (
            counts,
            h.p.totals(),
            h.dlq.lock().list("default", DlqKind::Late, 1000),
        )
    };
    assert_eq!(run(), run());
}

proptest! {
    // Model test: against an independent model of the rules, every event is
    // counted, dropped as duplicate or dead-lettered exactly as the spec says.
    #[test]
    fn counts_match_model(evs in proptest::collection::vec((0u32..40, 0i64..1200, 0u32..2), 1..300), chunk in 1usize..20) {
        let mut h = Harness::new(2);
        let mut seen: std::collections::HashMap<String, Millis> = Default::default();
        let mut late_seen: std::collections::HashMap<String, Millis> = Default::default();
        let mut max_ts: [Option<Millis>; 2] = [None, None];
        let mut wm: Option<Millis> = None;
        let mut model: std::collections::BTreeMap<Millis, u64> = Default::default();
        let mut late = 0u64;
        let mut lsn_time = 0;
        for group in evs.chunks(chunk) {
            let part = group[0].2;
            let items: Vec<(String, Millis)> = group.iter().map(|(id, s, _)| (format!("id{id}"), T0 + s * 1000)).collect();
            lsn_time += 1;
            for (id, ts) in &items {
                if let Some(orig) = seen.get(id)
                    && wm.is_none_or(|w| orig + MINUTE_MS + 300_000 > w) { continue; }
                // A late event is remembered from the watermark's minute at arrival.
                if let Some(at) = late_seen.get(id)
                    && wm.is_none_or(|w| at + MINUTE_MS + 300_000 > w) { continue; }
                let minute = align_down(*ts, MINUTE_MS);
                if let Some(w) = wm && minute + MINUTE_MS + 300_000 <= w {
                    late += 1;
                    late_seen.insert(id.clone(), align_down(w, MINUTE_MS));
                    continue;
                }
                seen.insert(id.clone(), minute);
                *model.entry(minute).or_default() += 1;
                let m = &mut max_ts[part as usize];
                if m.is_none_or(|x| *ts > x) { *m = Some(*ts); }
                let overall = max_ts.iter().flatten().min().map(|m| m - 5000);
                if let Some(o) = overall { wm = Some(wm.map_or(o, |w: Millis| w.max(o))); }
            }
            let refs: Vec<(&str, Millis)> = items.iter().map(|(a, b)| (a.as_str(), *b)).collect();
            h.feed(part, lsn_time, &refs);
        }
        prop_assert_eq!(h.p.totals().late, late);
        for (m, c) in model {
            prop_assert_eq!(h.count(m), c);
        }
    }
}

fn tenant_batch(tenant: &str, events: &[(&str, Millis)], backfill: bool) -> Vec<u8> {
    let mut w = BatchWriter::new();
    for (id, ts) in events {
        let at = w.begin_event(tenant, id, "click", *ts, Some("u"), None);
        w.finish_event(at, 0);
    }
    if backfill {
        w.finish_backfill()
    } else {
        w.finish()
    }
}

impl Harness {
    fn feed_tenant(
        &mut self,
        partition: u32,
        append_ms: Millis,
        tenant: &str,
        events: &[(&str, Millis)],
        backfill: bool,
    ) -> Applied {
        self.feed_payload(
            partition,
            append_ms,
            &tenant_batch(tenant, events, backfill),
        )
    }

    fn tenant_count(&self, tenant: &str, from: Millis, to: Millis) -> i64 {
        let q = MetricQuery {
            tenant: tenant.into(),
            metric: Metric::Count,
            start: from,
            end: to,
            granularity: Granularity::D1,
            event_types: vec![],
            group_by: vec![],
            filters: vec![],
            window: None,
            over: None,
        };
        self.store
            .read()
            .query(&q)
            .unwrap()
            .iter()
            .flat_map(|s| &s.points)
            .map(|(_, v)| match v {
                Value::Int(c) => *c as i64,
                Value::Float(f) => *f as i64,
            })
            .sum()
    }
}

/// One tenant's events stamped in the year 2100 move its own watermark
/// only: another tenant's events of today (same partition) all count.
#[test]
fn one_tenants_future_never_judges_another_tenants_events() {
    let mut h = Harness::new(1);
    const Y2100: Millis = 4_102_444_800_000;
    let a = h.feed_tenant(0, 0, "evil", &[("f", Y2100)], false);
    assert_eq!(a.counted, 1);
    assert_eq!(h.p.tenant_watermark("evil"), Some(Y2100 - 5_000));
    let a = h.feed_tenant(0, 10, "good", &[("g1", T0), ("g2", T0 + 1_000)], false);
    assert_eq!((a.counted, a.late), (2, 0));
    assert_eq!(h.p.tenant_watermark("good"), Some(T0 + 1_000 - 5_000));
    assert_eq!(h.tenant_count("good", T0 - 86_400_000, T0 + 86_400_000), 2);
    assert!(h.dlq.lock().list("good", DlqKind::Late, 10).is_empty());
    // The furthest watermark is what the overall gauge shows.
    assert_eq!(h.p.watermark(), Some(Y2100 - 5_000));
}

/// A new tenant's three hours of history, sent while another tenant is
/// live in the same partitions, count whole; late entries name the tenant.
#[test]
fn a_new_tenants_backfill_beside_a_live_tenant_counts_whole() {
    let mut h = Harness::new(2);
    let live_now = T0 + 3 * 3_600_000;
    let mut n = 0;
    for step in 0..180 {
        let t = T0 + step * MINUTE_MS;
        let id_live = format!("l{step}");
        h.feed_tenant(
            (step % 2) as u32,
            step * 100,
            "live",
            &[(&id_live, live_now + step * 1000)],
            false,
        );
        let id = format!("b{step}");
        let a = h.feed_tenant((step % 2) as u32, step * 100 + 1, "new", &[(&id, t)], false);
        assert_eq!(a.late, 0, "step {step}");
        n += 1;
    }
    assert_eq!(h.tenant_count("new", T0, T0 + 86_400_000), n);
    // Far behind its own clock now: late, and the entry says whose clock judged it.
    let a = h.feed_tenant(0, 20_000, "new", &[("old", T0)], false);
    assert_eq!(a.late, 1);
    let late = h.dlq.lock().list("new", DlqKind::Late, 10);
    assert!(
        late[0].reason.contains("tenant \"new\"'s watermark"),
        "{}",
        late[0].reason
    );
}

/// History of a live tenant sent as a backfill is judged by its backfill
/// clock: counted, deduplicated against the live stream both ways, and late
/// only by the backfill's own progress.
#[test]
fn a_backfill_of_a_live_tenant_counts_once() {
    let mut h = Harness::new(1);
    let now = T0 + 5 * 3_600_000;
    h.feed_tenant(0, 0, "acme", &[("live1", now), ("dup", now - 1000)], false);
    // Live clock at now-5s: this history would be late on the live path.
    let a = h.feed_tenant(0, 1, "acme", &[("h0", T0)], false);
    assert_eq!(a.late, 1);
    let a = h.feed_tenant(
        0,
        2,
        "acme",
        &[
            ("h1", T0),
            ("h2", T0 + MINUTE_MS),
            ("h3", T0 + 2 * 3_600_000),
            ("dup", now - 1000),
        ],
        true,
    );
    assert_eq!((a.counted, a.duplicates, a.late), (3, 1, 0));
    // The backfill's own clock: an hour behind it is late for the backfill.
    let a = h.feed_tenant(0, 3, "acme", &[("h4", T0 + 30 * MINUTE_MS)], true);
    assert_eq!(a.late, 1);
    let late = h.dlq.lock().list("acme", DlqKind::Late, 10);
    assert!(
        late.last().unwrap().reason.contains("backfill watermark"),
        "{}",
        late.last().unwrap().reason
    );
    // A backfilled event re-sent live is a duplicate too.
    let a = h.feed_tenant(0, 4, "acme", &[("h3", T0 + 2 * 3_600_000)], false);
    assert_eq!(a.counted, 0);
    assert_eq!(
        h.p.backfill_watermark("acme"),
        Some(T0 + 2 * 3_600_000 - 5_000)
    );
    assert_eq!(h.tenant_count("acme", T0 - 86_400_000, T0 + 86_400_000), 5);
}
