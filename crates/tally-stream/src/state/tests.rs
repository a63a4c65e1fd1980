//! Golden tests of checkpoints: the same records processed without a break,
//! crashed and recovered from a checkpoint at any point, and with a corrupt
//! newest checkpoint, end in identical state (rollups bit for bit, totals,
//! dead letters).

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use proptest::prelude::*;
use tally_store::RollupStore;
use tally_types::BatchWriter;
use tally_types::time::{MINUTE_MS, Millis};

use super::StateStore;
use crate::{Dlq, DlqKind, Processor, RecordRef, StreamConfig, Totals};

const T0: Millis = 1_793_534_400_000;

/// One log record: partition, offset, lsn, append time, payload.
type Rec = (u32, u64, u64, Millis, Vec<u8>);

/// A deterministic messy stream: 3 partitions, duplicates, disorder, late
/// events, numeric properties, and two correction records.
fn records(seed: u64, n: usize) -> Vec<Rec> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rnd = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m.max(1)
    };
    let mut out = Vec::new();
    let mut offsets = [0u64; 3];
    let mut t = T0;
    let mut late_ids: Vec<(String, Millis)> = Vec::new();
    let mut recent: Vec<(String, Millis)> = Vec::new();
    for lsn in 0..n as u64 {
        let part = rnd(3) as u32;
        let mut w = BatchWriter::new();
        let correction = lsn > 0 && lsn % 97 == 0 && !late_ids.is_empty();
        if correction {
            for (id, ts) in late_ids.drain(..) {
                let at = w.begin_event("acme", &id, "click", ts, Some("u1"), None);
                w.prop("ms", tally_types::PropValue::Int(7));
                w.finish_event(at, 1);
            }
        } else {
            for _ in 0..1 + rnd(8) {
                t += rnd(4000) as Millis;
                let (id, ts) = match rnd(20) {
                    0 => {
                        // Far too late: goes to the DLQ.
                        let ts = t - 30 * MINUTE_MS;
                        let id = format!("late{}", rnd(1_000_000));
                        late_ids.push((id.clone(), ts));
                        (id, ts)
                    }
                    1 | 2 if !recent.is_empty() => {
                        // A retry: an exact copy of a recent event.
                        let i = rnd(recent.len() as u64) as usize;
                        recent[i].clone()
                    }
                    3 | 4 => (format!("d{lsn}_{}", rnd(1000)), t - rnd(4000) as Millis),
                    // Closed window, within the allowed lateness: a correction.
                    5 => (format!("c{lsn}_{}", rnd(1000)), t - 2 * MINUTE_MS),
                    _ => (format!("e{}_{}", lsn, rnd(1 << 30)), t),
                };
                recent.push((id.clone(), ts));
                if recent.len() > 50 {
                    recent.remove(0);
                }
                let tenant = if id.len() % 4 == 0 { "globex" } else { "acme" };
                let ty = ["page_view", "click", "error"][rnd(3) as usize];
                let user = format!("u{}", rnd(50));
                // Sessions: explicit ids, and users' events without one.
                let sid = (lsn % 3 != 0).then(|| format!("s{}", lsn % 17));
                let at = w.begin_event(tenant, &id, ty, ts, Some(&user), sid.as_deref());
                w.prop(
                    "ms",
                    tally_types::PropValue::Float(rnd(10_000) as f64 / 7.0),
                );
                w.finish_event(at, 1);
            }
        }
        // Now and then a backfill: history of one tenant, a retry of a
        // recent live event among it, judged by the backfill clock.
        let backfill = !correction && lsn % 53 == 26;
        if backfill {
            w = BatchWriter::new();
            for k in 0..1 + rnd(5) {
                let ts = T0 - 3 * 3_600_000 + lsn as Millis * 20_000 + rnd(3000) as Millis;
                let at = w.begin_event(
                    "acme",
                    &format!("bf{lsn}_{k}"),
                    "click",
                    ts,
                    Some("u9"),
                    None,
                );
                w.finish_event(at, 0);
            }
            if let Some((id, ts)) = recent.last() {
                let at = w.begin_event("acme", id, "click", *ts, Some("u9"), None);
                w.finish_event(at, 0);
            }
        }
        let payload = if correction {
            w.finish_correction()
        } else if backfill {
            w.finish_backfill()
        } else {
            w.finish()
        };
        let off = offsets[part as usize];
        offsets[part as usize] += payload.len() as u64 + 24;
        out.push((part, off, lsn, lsn as Millis * 100, payload));
    }
    out
}

struct Run {
    p: Processor,
    store: Arc<RwLock<RollupStore>>,
    dlq: Arc<Mutex<Dlq>>,
}

fn fresh() -> Run {
    let store = Arc::new(RwLock::new(RollupStore::new()));
    store
        .write()
        .sessions_mut()
        .enable(tally_store::DEFAULT_SESSION_GAP_MS, 1_000_000);
    let dlq = Arc::new(Mutex::new(Dlq::new(10_000)));
    let cfg = StreamConfig {
        partitions: 3,
        ..StreamConfig::default()
    };
    Run {
        p: Processor::new(cfg, store.clone(), dlq.clone()),
        store,
        dlq,
    }
}

fn apply(p: &mut Processor, r: &Rec) {
    p.apply(RecordRef {
        partition: r.0,
        offset: r.1,
        next_offset: r.1 + r.4.len() as u64 + 24,
        lsn: r.2,
        append_ms: r.3,
        payload: &r.4,
    })
    .unwrap();
}

/// Applies every record the processor's offsets do not cover (the log replay).
fn replay_tail(p: &mut Processor, recs: &[Rec]) {
    let from = p.offsets().to_vec();
    // A resume offset is a record boundary: a record's start or the partition's end.
    for (part, &o) in from.iter().enumerate() {
        let mut bounds = vec![0];
        bounds.extend(
            recs.iter()
                .filter(|r| r.0 as usize == part)
                .map(|r| r.1 + r.4.len() as u64 + 24),
        );
        assert!(
            bounds.contains(&o),
            "partition {part}: resume offset {o} is mid-record"
        );
    }
    for r in recs.iter().filter(|r| r.1 >= from[r.0 as usize]) {
        apply(p, r);
    }
}

type Outcome = (
    RollupStore,
    Totals,
    Vec<String>,
    usize,
    Vec<tally_store::Session>,
);

fn outcome(run: &Run) -> Outcome {
    let dlq = run.dlq.lock();
    let mut late: Vec<String> = ["acme", "globex"]
        .iter()
        .flat_map(|t| dlq.list(t, DlqKind::Late, 100_000))
        .map(|e| format!("{}|{}|{:?}|{}", e.tenant, e.reason, e.body, e.replayed))
        .collect();
    late.sort();
    (
        run.store.read().clone(),
        run.p.totals(),
        late,
        run.p.dedupe_len(),
        sessions(run),
    )
}

/// Every session of both tenants the index holds.
fn sessions(run: &Run) -> Vec<tally_store::Session> {
    let store = run.store.read();
    ["acme", "globex"]
        .iter()
        .flat_map(|t| {
            store
                .sessions()
                .sessions(t, None, Millis::MIN, Millis::MAX, false, usize::MAX)
        })
        .collect()
}

fn uninterrupted(recs: &[Rec]) -> Outcome {
    let mut r = fresh();
    for rec in recs {
        apply(&mut r.p, rec);
    }
    outcome(&r)
}

/// Runs to `crash_at` with a checkpoint every `every` records, drops all
/// memory, recovers from the state dir and replays the tail.
fn crashed(recs: &[Rec], crash_at: usize, every: usize, compact: u64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let mut r = fresh();
    let (mut st, rep) = StateStore::open(dir.path(), &mut r.p).unwrap();
    assert_eq!(rep.checkpoint, None);
    st.set_compact_bytes(compact);
    for (i, rec) in recs[..crash_at].iter().enumerate() {
        apply(&mut r.p, rec);
        if (i + 1) % every == 0 {
            st.checkpoint(&mut r.p).unwrap();
        }
    }
    drop((r, st));
    recover(dir.path(), recs).0
}

/// A fresh process recovering from `dir`: the checkpoint, then the log tail.
fn recover(dir: &std::path::Path, recs: &[Rec]) -> (Outcome, super::RecoveryReport) {
    let mut r = fresh();
    let (_st, rep) = StateStore::open(dir, &mut r.p).unwrap();
    replay_tail(&mut r.p, recs);
    (outcome(&r), rep)
}

/// Same rollups (every sketch, bit for bit), totals, late DLQ and dedupe size.
fn assert_same(got: &Outcome, want: &Outcome, ctx: &str) {
    assert!(got.0 == want.0, "rollups differ: {ctx}");
    assert_eq!(got.1, want.1, "totals: {ctx}");
    assert_eq!(got.2, want.2, "late DLQ: {ctx}");
    assert_eq!(got.3, want.3, "dedupe: {ctx}");
    assert_eq!(got.4, want.4, "sessions: {ctx}");
}

#[test]
fn the_stream_is_messy_enough() {
    let recs = records(1, 400);
    let (store, totals, late, _, sessions) = uninterrupted(&recs);
    // Explicit sessions, users' sessions split by the gap, both tenants.
    assert!(sessions.iter().filter(|s| s.derived).count() > 5);
    assert!(sessions.iter().filter(|s| !s.derived).count() > 5);
    assert!(sessions.iter().any(|s| s.events > 3));
    assert!(totals.duplicates > 20, "{totals:?}");
    assert!(totals.late > 20, "{totals:?}");
    assert!(totals.replayed > 10, "{totals:?}");
    assert!(totals.corrections > 20, "{totals:?}");
    assert!(late.iter().any(|l| l.ends_with("|true")));
    assert!(store.bucket_count() > 10);
}

#[test]
fn crash_and_recover_equals_uninterrupted_at_many_points() {
    let recs = records(2, 400);
    let want = uninterrupted(&recs);
    for crash_at in [0, 1, 5, 50, 97, 98, 150, 233, 399, 400] {
        for every in [1, 7, 64] {
            let got = crashed(&recs, crash_at, every, 64 << 20);
            assert_same(&got, &want, &format!("crash at {crash_at}, every {every}"));
        }
    }
}

#[test]
fn compacted_journals_recover_the_same_state() {
    let recs = records(3, 300);
    let want = uninterrupted(&recs);
    for crash_at in [100, 211, 300] {
        let got = crashed(&recs, crash_at, 3, 256);
        assert_same(&got, &want, &format!("crash at {crash_at}"));
    }
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
    let recs = records(4, 300);
    let want = uninterrupted(&recs);
    let dir = tempfile::tempdir().unwrap();
    let mut r = fresh();
    let (mut st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
    for (i, rec) in recs[..200].iter().enumerate() {
        apply(&mut r.p, rec);
        if i % 50 == 49 {
            st.checkpoint(&mut r.p).unwrap();
        }
    }
    drop((r, st));
    let newest = super::ckpt_path(dir.path(), 4);
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let (got, rep) = recover(dir.path(), &recs);
    assert_eq!(rep.checkpoint, Some(3));
    assert_eq!(rep.skipped.len(), 1, "{:?}", rep.skipped);
    assert_same(&got, &want, "fallback to checkpoint 3");
}

/// A kill after the journals of a checkpoint were appended but before its
/// file was renamed into place: recovery cuts the journals back, and the
/// appends after that recovery must land right after the cut.
#[test]
fn a_crash_between_journal_append_and_rename_recovers_twice() {
    let recs = records(6, 300);
    let want = uninterrupted(&recs);
    let dir = tempfile::tempdir().unwrap();
    let mut r = fresh();
    let (mut st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
    for (i, rec) in recs[..120].iter().enumerate() {
        apply(&mut r.p, rec);
        if i % 20 == 19 {
            st.checkpoint(&mut r.p).unwrap();
        }
    }
    let last = st.seq();
    drop((r, st));
    // The newest checkpoint never made it: its journal appends are orphans.
    std::fs::remove_file(super::ckpt_path(dir.path(), last)).unwrap();
    let mut r = fresh();
    let (mut st, rep) = StateStore::open(dir.path(), &mut r.p).unwrap();
    assert_eq!(rep.checkpoint, Some(last - 1));
    let from = r.p.offsets().to_vec();
    for rec in recs[..200].iter().filter(|x| x.1 >= from[x.0 as usize]) {
        apply(&mut r.p, rec);
    }
    st.checkpoint(&mut r.p).unwrap();
    drop((r, st));
    assert_same(&recover(dir.path(), &recs).0, &want, "second recovery");
}

/// A checkpoint prepared while records keep arriving (as when it is written
/// on another thread) whose write fails: `restore` gives the journal back in
/// order, and the next checkpoint carries everything.
#[test]
fn a_failed_background_write_loses_nothing() {
    let recs = records(7, 300);
    let want = uninterrupted(&recs);
    let dir = tempfile::tempdir().unwrap();
    let mut r = fresh();
    let (mut st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
    let mut failing = None;
    let mut succeeding = None;
    for (i, rec) in recs[..240].iter().enumerate() {
        apply(&mut r.p, rec);
        match i % 30 {
            // Prepared; records keep arriving; then the write fails.
            29 => failing = Some(st.prepare(&mut r.p)),
            4 => {
                if let Some(j) = failing.take() {
                    j.restore(&mut r.p);
                }
            }
            // Prepared; records keep arriving; then the write succeeds.
            14 => succeeding = Some(st.prepare(&mut r.p)),
            19 => {
                if let Some(j) = succeeding.take() {
                    st.write(&j).unwrap();
                }
            }
            _ => {}
        }
    }
    drop((r, st));
    assert_same(&recover(dir.path(), &recs).0, &want, "after a failed write");
}

#[test]
fn a_damaged_journal_is_an_error_that_names_the_fix() {
    let recs = records(5, 100);
    let dir = tempfile::tempdir().unwrap();
    let mut r = fresh();
    let (mut st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
    for rec in &recs {
        apply(&mut r.p, rec);
    }
    st.checkpoint(&mut r.p).unwrap();
    drop((r, st));
    let dedupe = dir.path().join("dedupe-000000.bin");
    let len = std::fs::metadata(&dedupe).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dedupe)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut r = fresh();
    let err = StateStore::open(dir.path(), &mut r.p).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("dedupe-000000.bin") && msg.contains("tally replay --from 0"),
        "{msg}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn recovery_is_exact_for_any_crash_point(seed in 0u64..1000, crash_frac in 0.0f64..1.0, every in 1usize..40) {
        let recs = records(seed, 150);
        let want = uninterrupted(&recs);
        let got = crashed(&recs, (crash_frac * 150.0) as usize, every, 4096);
        prop_assert!(got.0 == want.0);
        prop_assert_eq!(got.1, want.1);
        prop_assert_eq!(got.2, want.2);
        prop_assert_eq!(got.3, want.3);
        prop_assert_eq!(got.4, want.4);
    }
}

/// Rollup retention at two points of the stream: at lsn 700 minutes before
/// T0+2h are folded into hours; at lsn 1100 everything before T0+1h is
/// dropped (and final minutes up to then folded). Late corrections land in
/// folded hours.
fn retention_hook(p: &mut Processor, lsn: u64) {
    const DAY: Millis = 86_400_000;
    const HOUR: Millis = 3_600_000;
    match lsn {
        700 => {
            p.enforce_rollup_retention(T0 + 2 * HOUR + DAY, DAY, 2 * DAY);
        }
        1100 => {
            p.enforce_rollup_retention(T0 + HOUR + 2 * DAY, DAY, 2 * DAY);
        }
        _ => {}
    }
}

fn apply_with_retention(p: &mut Processor, r: &Rec) {
    apply(p, r);
    retention_hook(p, r.2);
}

#[test]
fn downsampling_and_retention_recover_the_same_state() {
    let recs = records(8, 1400);
    let mut want = fresh();
    for rec in &recs {
        apply_with_retention(&mut want.p, rec);
    }
    let want = outcome(&want);
    {
        let s = &want.0;
        assert_eq!(s.hours_from(), T0 + 3_600_000, "hours dropped before T0+1h");
        assert_eq!(s.downsampled_to(), T0 + 2 * 3_600_000);
        assert!(s.hours_in(i64::MIN, i64::MAX).count() >= 2);
        assert!(s.minutes_in(i64::MIN, i64::MAX).count() > 10);
    }
    for crash_at in [650, 701, 900, 1101, 1400] {
        for (every, compact) in [(7, 256), (50, 64 << 20)] {
            let dir = tempfile::tempdir().unwrap();
            let mut r = fresh();
            let (mut st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
            st.set_compact_bytes(compact);
            let mut rewritten = false;
            for (i, rec) in recs[..crash_at].iter().enumerate() {
                apply_with_retention(&mut r.p, rec);
                if (i + 1) % every == 0 {
                    rewritten |= st.checkpoint(&mut r.p).unwrap().sealed_rewritten;
                }
            }
            drop((r, st));
            let mut r = fresh();
            let (_st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
            let from = r.p.offsets().to_vec();
            for rec in recs.iter().filter(|x| x.1 >= from[x.0 as usize]) {
                apply_with_retention(&mut r.p, rec);
            }
            let ctx = format!("crash at {crash_at}, every {every}, compact {compact}");
            assert_same(&outcome(&r), &want, &ctx);
            if compact == 256 && crash_at > 700 {
                assert!(rewritten, "the sealed journal was never rewritten: {ctx}");
            }
        }
    }
}

/// Hour answers are the same with and without downsampling, for every
/// metric (sketches merge exactly), and 1m answers stop at the horizon.
#[test]
fn downsampled_hours_answer_like_the_minutes_they_replace() {
    use tally_store::{Granularity, Metric, MetricQuery};
    let recs = records(9, 900);
    let mut plain = fresh();
    let mut folded = fresh();
    for rec in &recs {
        apply(&mut plain.p, rec);
        apply(&mut folded.p, rec);
    }
    let r = folded
        .p
        .enforce_rollup_retention(T0 + 2 * 3_600_000 + 86_400_000, 86_400_000, 0);
    assert!(r.minutes_folded > 60, "{r:?}");
    assert_eq!(r.downsampled_to, T0 + 2 * 3_600_000);
    let (a, b) = (plain.store.read(), folded.store.read());
    for metric in [
        Metric::Count,
        Metric::UniqueUsers,
        Metric::UniqueSessions,
        Metric::Sum("ms".into()),
        Metric::Max("ms".into()),
        Metric::Quantile(0.95, "ms".into()),
    ] {
        for (g, start) in [(Granularity::H1, T0 - 3_600_000), (Granularity::D1, T0)] {
            let q = MetricQuery {
                tenant: "acme".into(),
                metric: metric.clone(),
                start,
                end: T0 + 6 * 3_600_000,
                granularity: g,
                event_types: vec![],
                group_by: vec!["event_type".into()],
                filters: vec![],
                window: None,
                over: None,
            };
            let (x, y) = (a.query(&q).unwrap(), b.query(&q).unwrap());
            assert!(!x.is_empty() && !x[0].points.is_empty());
            assert_eq!(x, y, "{metric:?} at {g:?}");
        }
    }
    let q = MetricQuery {
        tenant: "acme".into(),
        metric: Metric::Count,
        start: T0,
        end: T0 + 6 * 3_600_000,
        granularity: Granularity::M1,
        event_types: vec![],
        group_by: vec![],
        filters: vec![],
        window: None,
        over: None,
    };
    let x = a.query(&q).unwrap();
    let y = b.query(&q).unwrap();
    let after = |s: &Vec<tally_store::Series>| -> Vec<_> {
        s[0].points
            .iter()
            .filter(|(t, _)| *t >= T0 + 2 * 3_600_000)
            .cloned()
            .collect()
    };
    assert_eq!(after(&x), after(&y));
    assert!(y[0].points.iter().all(|(t, _)| *t >= T0 + 2 * 3_600_000));
    assert!(x[0].points.iter().any(|(t, _)| *t < T0 + 2 * 3_600_000));
}

/// What a state directory holds after recovery, as text: totals, every
/// minute and hour bucket (a hash of its encoding) and the late DLQ size.
fn state_dump(r: &Run) -> String {
    use std::fmt::Write as _;
    let store = r.store.read();
    let mut out = String::new();
    let t = r.p.totals();
    writeln!(
        out,
        "totals records={} counted={} duplicates={} late={} corrections={} replayed={} last_lsn={:?}",
        t.records, t.counted, t.duplicates, t.late, t.corrections, t.replayed, t.last_lsn
    )
    .unwrap();
    let mut rows: Vec<String> = Vec::new();
    // What the bucket answers (not its encoding, which versions change).
    let hash = |b: &tally_store::MinuteBucket| {
        let mut text = String::new();
        for (ty, agg) in &b.types {
            write!(
                text,
                "{ty} {} {} {};",
                agg.count,
                agg.users.estimate(),
                agg.sessions.estimate()
            )
            .unwrap();
            for (k, n) in &agg.props {
                write!(
                    text,
                    "{k} {} {} {} {} {:?} {:?};",
                    n.count,
                    n.sum.value(),
                    n.min,
                    n.max,
                    n.sketch.quantile(0.5),
                    n.sketch.quantile(0.99)
                )
                .unwrap();
            }
        }
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    };
    for (tn, m, b) in store.minutes_in(Millis::MIN, Millis::MAX) {
        rows.push(format!("minute {tn} {m} {:016x}", hash(b)));
    }
    for (tn, h, b) in store.hours_in(Millis::MIN, Millis::MAX) {
        rows.push(format!("hour {tn} {h} {:016x}", hash(b)));
    }
    rows.sort();
    for row in rows {
        writeln!(out, "{row}").unwrap();
    }
    let dlq = r.dlq.lock();
    writeln!(out, "late_held {}", dlq.held(DlqKind::Late)).unwrap();
    out
}

/// Writes the on-disk fixture of the current checkpoint format into
/// `TALLY_WRITE_STATE_FIXTURE` (run by hand when the format changes).
#[test]
fn write_state_fixture() {
    let Ok(out) = std::env::var("TALLY_WRITE_STATE_FIXTURE") else {
        return;
    };
    let out = std::path::Path::new(&out);
    std::fs::create_dir_all(out).unwrap();
    let recs = records(9, 300);
    let mut r = fresh();
    let (mut st, _) = StateStore::open(out, &mut r.p).unwrap();
    for (i, rec) in recs[..200].iter().enumerate() {
        apply(&mut r.p, rec);
        if i % 50 == 49 {
            st.checkpoint(&mut r.p).unwrap();
        }
    }
    drop((r, st));
    let mut r = fresh();
    StateStore::open(out, &mut r.p).unwrap();
    std::fs::write(out.join("expected.txt"), state_dump(&r)).unwrap();
    std::fs::write(out.join("expected-sessions.txt"), sessions_dump(&r)).unwrap();
}

/// The index's sessions and floors, one line each.
fn sessions_dump(r: &Run) -> String {
    let mut out = String::new();
    for t in ["acme", "globex"] {
        out.push_str(&format!(
            "floor {t} {}\n",
            r.store.read().sessions().floor(t)
        ));
    }
    for s in sessions(r) {
        out.push_str(&format!("{s:?}\n"));
    }
    out
}

/// Copies a committed fixture directory into a temporary one.
fn fixture(name: &str) -> tempfile::TempDir {
    let src = std::path::Path::new(&*manifest_dir())
        .join("tests/fixtures")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// A state directory written by the version-3 format (one clock for all
/// tenants, dedupe frames without tenants) loads into exactly what that
/// version recovered (`expected.txt`, written by it), and the first
/// checkpoint after it (version 4, dedupe journal rewritten) recovers the
/// same state again.
#[test]
fn a_version_3_state_dir_loads_and_upgrades() {
    let dir = fixture("state-v3");
    let want = std::fs::read_to_string(dir.path().join("expected.txt")).unwrap();
    let mut r = fresh();
    let (mut st, rep) = StateStore::open(dir.path(), &mut r.p).unwrap();
    assert!(rep.checkpoint.is_some());
    assert_eq!(state_dump(&r), want);
    // Both tenants had open minutes: each took the shared clock over.
    let wm_acme = r.p.tenant_watermark("acme");
    assert!(wm_acme.is_some());
    assert_eq!(wm_acme, r.p.tenant_watermark("globex"));
    let dedupe = r.p.dedupe_len();
    assert!(dedupe > 0);
    let replayed = |r: &Run| {
        let dlq = r.dlq.lock();
        let all: Vec<_> = dlq.held_entries(DlqKind::Late).collect();
        (all.len(), all.iter().filter(|e| e.replayed).count())
    };
    let late = replayed(&r);
    assert!(late.1 > 0, "{late:?}");
    // Upgrade: the next checkpoint is version 4 and holds the same state.
    st.checkpoint(&mut r.p).unwrap();
    let newest = super::ckpt_path(dir.path(), st.seq());
    assert_eq!(&std::fs::read(&newest).unwrap()[..8], super::MAGIC);
    drop(st);
    let mut again = fresh();
    StateStore::open(dir.path(), &mut again.p).unwrap();
    assert_eq!(state_dump(&again), want);
    assert_eq!(again.p.dedupe_len(), dedupe);
    assert_eq!(replayed(&again), late);
    assert_eq!(again.p.tenant_watermark("acme"), wm_acme);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// A checkpoint file of any bytes, or a real one with bytes flipped,
    /// cut or appended, decodes or is refused: never a panic, never a
    /// huge allocation (counts are checked against the bytes left).
    #[test]
    fn checkpoint_decoding_never_panics(
        seed in 0u64..50,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = super::decode_checkpoint(&noise);
        let recs = records(seed, 60);
        let dir = tempfile::tempdir().unwrap();
        let mut r = fresh();
        let (mut st, _) = StateStore::open(dir.path(), &mut r.p).unwrap();
        for rec in &recs {
            apply(&mut r.p, rec);
        }
        st.checkpoint(&mut r.p).unwrap();
        let mut bytes = std::fs::read(super::ckpt_path(dir.path(), st.seq())).unwrap();
        prop_assert!(super::decode_checkpoint(&bytes).is_ok());
        // Past the frame's checksum: mutate the payload and re-frame it,
        // so the decoder itself (not only the CRC) meets the damage.
        let payload_at = super::MAGIC.len() + 8;
        let mut payload = bytes[payload_at..].to_vec();
        for &(at, x) in &flips {
            if !payload.is_empty() {
                let i = at % payload.len();
                payload[i] ^= x;
            }
        }
        payload.truncate(cut % (payload.len() + 1));
        payload.extend_from_slice(&noise);
        let mut reframed = super::MAGIC.to_vec();
        tally_types::bin::frame(&mut reframed, &payload);
        let _ = super::decode_checkpoint(&reframed);
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = super::decode_checkpoint(&bytes);
    }
}

/// The committed version 4 state (`tests/fixtures/state-v4`: per-tenant
/// clocks, 128-bit dedupe keys in tenant-named frames) loads into exactly
/// the state it was written from, and a checkpoint of it loads the same.
#[test]
fn a_version_4_state_dir_loads() {
    let dir = fixture("state-v4");
    let want = std::fs::read_to_string(dir.path().join("expected.txt")).unwrap();
    let mut r = fresh();
    let (mut st, rep) = StateStore::open(dir.path(), &mut r.p).unwrap();
    assert!(rep.checkpoint.is_some());
    assert_eq!(state_dump(&r), want);
    assert!(r.p.tenant_watermark("acme").is_some());
    let dedupe = r.p.dedupe_len();
    assert!(dedupe > 0);
    // No session index then: each tenant's floor is past its newest event,
    // so its earlier ranges are read from the raw events.
    let floor = r.store.read().sessions().floor("acme");
    assert!(floor > T0, "{floor}");
    assert_eq!(r.store.read().sessions().len(), 0);
    st.checkpoint(&mut r.p).unwrap();
    drop(st);
    let mut again = fresh();
    StateStore::open(dir.path(), &mut again.p).unwrap();
    assert_eq!(state_dump(&again), want);
    assert_eq!(again.p.dedupe_len(), dedupe);
    // The upgraded checkpoint keeps the floors.
    assert_eq!(again.store.read().sessions().floor("acme"), floor);
}

/// The committed version 5 state (`tests/fixtures/state-v5`: the sessions
/// journal) loads into exactly the state and sessions it was written from,
/// and a checkpoint of it loads the same.
#[test]
fn a_version_5_state_dir_loads() {
    let dir = fixture("state-v5");
    let want = std::fs::read_to_string(dir.path().join("expected.txt")).unwrap();
    let want_sessions = std::fs::read_to_string(dir.path().join("expected-sessions.txt")).unwrap();
    let mut r = fresh();
    let (mut st, rep) = StateStore::open(dir.path(), &mut r.p).unwrap();
    assert!(rep.checkpoint.is_some());
    assert!(rep.sessions > 10, "{}", rep.sessions);
    assert_eq!(state_dump(&r), want);
    assert_eq!(sessions_dump(&r), want_sessions);
    st.checkpoint(&mut r.p).unwrap();
    drop(st);
    let mut again = fresh();
    StateStore::open(dir.path(), &mut again.p).unwrap();
    assert_eq!(state_dump(&again), want);
    assert_eq!(sessions_dump(&again), want_sessions);
}

/// The crate's directory: cargo's at run time (a test executable reused
/// from a shared target dir may have been built from another checkout),
/// else where it was built.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
