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
        let payload = batch(events);
        self.lsn += 1;
        self.p
            .apply(RecordRef {
                partition,
                offset: self.lsn * 100,
                next_offset: self.lsn * 100 + 100,
                lsn: self.lsn,
                append_ms,
                payload: &payload,
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
            group_by_event_type: false,
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
