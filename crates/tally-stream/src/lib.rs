//! Event-time processing: watermarks, allowed lateness, dedupe, the late
//! dead-letter queue, and applying accepted events to the rollup store.
//!
//! # Architecture invariant: decisions are a function of the log
//!
//! The processor consumes committed log records in lsn order. Every decision
//! it makes — duplicate or not, late or not, which window — depends only on
//! the records it has seen (event times, partition ids and the append times
//! the writer stamped), never on the wall clock. Replaying the same stretch of
//! the log therefore reproduces the same rollups and the same late DLQ.
//!
//! # Watermarks
//!
//! Per partition: max event time seen − `watermark_bound`. Overall: the
//! minimum over partitions that have data and are not idle; a partition whose
//! last record was appended more than `idle_timeout` before the current one
//! stops holding the watermark back. Within a record, events are taken in
//! order, so the watermark can advance between two events of one batch.
//!
//! # Windows
//!
//! One-minute tumbling windows per (tenant, event type); coarser buckets are
//! merged from minutes at query time. A window `[s, s+1m)` is *open* while the
//! watermark is below `s+1m`, *closed but mutable* until `s+1m+allowed_lateness`,
//! and *final* afterwards: an event for a final window goes to the late DLQ.

pub mod dlq;
pub mod state;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tally_store::RollupStore;
use tally_store::sketch::{HashSet64, IdentityHasher};
use tally_types::time::{HOUR_MS, MINUTE_MS, Millis, align_down, format_rfc3339};
use tally_types::{BatchReader, CodecError, EventView, dedupe_key};

pub use dlq::{Dlq, DlqBody, DlqEntry, DlqKind};
pub use state::{CheckpointJob, CheckpointReport, RecoveryReport, StateError, StateStore};

type DedupeMap = hashbrown::HashMap<u64, Millis, std::hash::BuildHasherDefault<IdentityHasher>>;

/// Dedupe values are the minute of the event's window (a multiple of 60 000,
/// so even); a value with this bit set marks an event that went to the late
/// DLQ, remembered (from the watermark's minute at arrival) so that a retried
/// late event is a duplicate, not a second DLQ entry.
const LATE_MARK: Millis = 1;

/// Event-time settings.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub partitions: u32,
    /// Bounded out-of-orderness: watermark = max event time − this.
    pub watermark_bound_ms: Millis,
    /// A partition with no appends for this long stops holding the watermark back.
    pub idle_timeout_ms: Millis,
    /// Closed windows still accept events for this long (in event time).
    pub allowed_lateness_ms: Millis,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            partitions: 4,
            watermark_bound_ms: 5_000,
            idle_timeout_ms: 30_000,
            allowed_lateness_ms: 5 * MINUTE_MS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("record lsn {lsn} in partition {partition}: {source}")]
    Codec {
        partition: u32,
        lsn: u64,
        source: CodecError,
    },
    #[error("record names partition {0}, but the processor has {1}")]
    Partition(u32, u32),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A committed log record as the processor sees it.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub partition: u32,
    pub offset: u64,
    /// Offset of the record after this one in its partition (where a
    /// replay resumes once this record is applied).
    pub next_offset: u64,
    pub lsn: u64,
    pub append_ms: Millis,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PartState {
    max_ts: Option<Millis>,
    last_append_ms: Millis,
}

/// What applying one record did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    /// Events that updated a window already closed (within allowed lateness).
    pub corrections: u64,
    /// Late events re-applied from the DLQ (a correction record).
    pub replayed: u64,
    /// Whether the record was a correction record.
    pub correction_record: bool,
}

/// What one rollup retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupRetention {
    /// Minute buckets folded into hours.
    pub minutes_folded: usize,
    /// Hour buckets created or grown by the fold.
    pub hours_written: usize,
    /// Buckets (hours, and minutes past the hour retention) deleted.
    pub buckets_dropped: usize,
    pub downsampled_to: Millis,
    pub hours_from: Millis,
}

/// Running totals, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub records: u64,
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub corrections: u64,
    pub replayed: u64,
    pub last_lsn: Option<u64>,
}

impl Totals {
    /// The lsn after the last record applied (0 before any).
    pub fn applied_lsn(&self) -> u64 {
        self.last_lsn.map_or(0, |l| l + 1)
    }
}

/// What changed since the last checkpoint (written out incrementally).
#[derive(Debug, Default)]
struct Journal {
    /// Dedupe entries inserted, in order.
    dedupe: Vec<(u64, Millis)>,
    /// Late DLQ entries produced, in order.
    late: Vec<DlqEntry>,
    /// Final minutes changed by corrections: they are sealed again.
    reseal: BTreeSet<(Box<str>, Millis)>,
    /// Downsampled hours written by retention or changed by corrections.
    rehour: BTreeSet<(Box<str>, Millis)>,
    /// Anything at all applied since the last checkpoint.
    dirty: bool,
}

/// The processor: owns watermark and dedupe state, writes rollups and late entries.
pub struct Processor {
    cfg: StreamConfig,
    parts: Vec<PartState>,
    dedupe: DedupeMap,
    /// Dedupe entries of minutes before this are evicted on the next sweep.
    swept_to: Millis,
    /// Dedupe keys of late events applied from the DLQ (each applies once).
    corrected: HashSet64,
    /// Minutes before this are final and written to the sealed rollup file.
    sealed_to: Millis,
    store: Arc<RwLock<RollupStore>>,
    dlq: Arc<Mutex<Dlq>>,
    totals: Totals,
    /// Next offset to read per partition (the record after the last applied one).
    offsets: Vec<u64>,
    watermark: Option<Millis>,
    journal: Journal,
    /// Whether changes are journaled for checkpoints (off when checkpoints are).
    journaling: bool,
    /// Whether the raw store is fed: then the dropped (duplicate) events of
    /// each record are kept for it.
    capture: bool,
    /// Dropped event ranges of the last applied record.
    last_drops: Vec<(u32, u32)>,
    /// Dropped ranges of records the raw store has not sealed yet, by lsn
    /// (only records with drops), checkpointed so that recovery can rebuild
    /// the raw store's hot rows exactly.
    raw_drops: VecDeque<(u64, Vec<(u32, u32)>)>,
}

impl Processor {
    pub fn new(cfg: StreamConfig, store: Arc<RwLock<RollupStore>>, dlq: Arc<Mutex<Dlq>>) -> Self {
        let n = cfg.partitions.max(1) as usize;
        Processor {
            cfg,
            parts: vec![PartState::default(); n],
            dedupe: DedupeMap::default(),
            swept_to: Millis::MIN,
            corrected: HashSet64::default(),
            sealed_to: Millis::MIN,
            store,
            dlq,
            totals: Totals::default(),
            offsets: vec![0; n],
            watermark: None,
            journal: Journal::default(),
            journaling: true,
            capture: false,
            last_drops: Vec::new(),
            raw_drops: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// The overall watermark after the last applied event.
    pub fn watermark(&self) -> Option<Millis> {
        self.watermark
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    pub fn dedupe_len(&self) -> usize {
        self.dedupe.len()
    }

    pub fn store(&self) -> &Arc<RwLock<RollupStore>> {
        &self.store
    }

    /// Turns journaling for checkpoints on or off (off: nothing is kept for
    /// a checkpoint that will never be written).
    pub fn set_journaling(&mut self, on: bool) {
        self.journaling = on;
        if !on {
            self.journal = Journal::default();
        }
    }

    /// Keeps the dropped events of each record for a raw store.
    pub fn set_capture(&mut self, on: bool) {
        self.capture = on;
        if !on {
            self.raw_drops.clear();
        }
    }

    /// Dropped (duplicate) events of the last applied record as sorted
    /// `(start, len)` index ranges; everything else in it was kept.
    pub fn last_drops(&self) -> &[(u32, u32)] {
        &self.last_drops
    }

    /// The dropped ranges recorded for an already applied record (recovery
    /// feeding the raw store the records before the checkpoint).
    pub fn drops_of(&self, lsn: u64) -> &[(u32, u32)] {
        let i = self.raw_drops.partition_point(|(l, _)| *l < lsn);
        match self.raw_drops.get(i) {
            Some((l, d)) if *l == lsn => d,
            _ => &[],
        }
    }

    /// The raw store sealed every record before `next_lsn`: their drops are
    /// no longer needed.
    pub fn raw_sealed(&mut self, next_lsn: u64) {
        while self.raw_drops.front().is_some_and(|(l, _)| *l < next_lsn) {
            self.raw_drops.pop_front();
        }
    }

    /// Whether anything was applied since the last checkpoint.
    pub fn dirty(&self) -> bool {
        self.journal.dirty
    }

    /// Minutes before this boundary can no longer change through the stream
    /// (only through DLQ corrections).
    pub fn final_before(&self) -> Millis {
        match self.watermark {
            None => Millis::MIN,
            Some(w) => align_down(w - self.cfg.allowed_lateness_ms, MINUTE_MS),
        }
    }

    /// Whether a dedupe value still blocks its key at watermark `wm`.
    #[inline]
    fn live(&self, value: Millis, wm: Option<Millis>) -> bool {
        wm.is_none_or(|w| (value & !LATE_MARK) + MINUTE_MS + self.cfg.allowed_lateness_ms > w)
    }

    /// Minimum over active partitions other than `skip` of their watermark.
    fn others_min(&self, skip: usize, now: Millis) -> Option<Millis> {
        self.parts
            .iter()
            .enumerate()
            .filter(|&(i, p)| i != skip && now - p.last_append_ms <= self.cfg.idle_timeout_ms)
            .filter_map(|(_, p)| p.max_ts)
            .min()
            .map(|m| m - self.cfg.watermark_bound_ms)
    }

    /// Applies one committed record (all its events, in order).
    pub fn apply(&mut self, rec: RecordRef<'_>) -> Result<Applied> {
        let p = rec.partition as usize;
        if p >= self.parts.len() {
            return Err(Error::Partition(rec.partition, self.parts.len() as u32));
        }
        let codec = |source| Error::Codec {
            partition: rec.partition,
            lsn: rec.lsn,
            source,
        };
        let reader = BatchReader::new(rec.payload).map_err(codec)?;
        self.last_drops.clear();
        let out = if reader.is_correction() {
            self.apply_correction(reader).map_err(codec)?
        } else {
            self.apply_events(p, rec.append_ms, reader).map_err(codec)?
        };
        self.offsets[p] = self.offsets[p].max(rec.next_offset);
        self.totals.records += 1;
        self.totals.counted += out.counted;
        self.totals.duplicates += out.duplicates;
        self.totals.late += out.late;
        self.totals.corrections += out.corrections;
        self.totals.replayed += out.replayed;
        self.totals.last_lsn = Some(rec.lsn);
        self.journal.dirty = true;
        if self.capture && !self.last_drops.is_empty() && !out.correction_record {
            self.raw_drops.push_back((rec.lsn, self.last_drops.clone()));
        }
        self.sweep_dedupe();
        Ok(out)
    }

    fn apply_events(
        &mut self,
        p: usize,
        append_ms: Millis,
        reader: BatchReader<'_>,
    ) -> Result<Applied, CodecError> {
        self.parts[p].last_append_ms = self.parts[p].last_append_ms.max(append_ms);
        let others = self.others_min(p, append_ms);
        let bound = self.cfg.watermark_bound_ms;
        let lateness = self.cfg.allowed_lateness_ms;
        let mut out = Applied::default();
        let mut store = self.store.write();
        let mut late_entries = Vec::new();
        // Partitions that went idle since the last record stop holding it back.
        let mut wm = self.watermark;
        if let Some(mine) = self.parts[p].max_ts.map(|m| m - bound) {
            let overall = others.map_or(mine, |o| o.min(mine));
            wm = Some(wm.map_or(overall, |w| w.max(overall)));
        }
        for (i, ev) in reader.enumerate() {
            let ev = ev?;
            let minute = align_down(ev.ts, MINUTE_MS);
            let key = dedupe_key(ev.tenant, ev.event_id);
            // An entry counts while the window of the original can still change.
            if self.dedupe.get(&key).is_some_and(|&v| self.live(v, wm))
                || self.corrected.contains(&key)
            {
                out.duplicates += 1;
                if self.capture {
                    push_drop(&mut self.last_drops, i as u32);
                }
                continue;
            }
            if let Some(w) = wm {
                if minute + MINUTE_MS + lateness <= w {
                    out.late += 1;
                    let mark = align_down(w, MINUTE_MS) | LATE_MARK;
                    self.dedupe.insert(key, mark);
                    if self.journaling {
                        self.journal.dedupe.push((key, mark));
                    }
                    late_entries.push(late_entry(&ev, key, minute, w, lateness, append_ms));
                    continue;
                }
                if minute + MINUTE_MS <= w {
                    out.corrections += 1;
                }
            }
            self.dedupe.insert(key, minute);
            if self.journaling {
                self.journal.dedupe.push((key, minute));
            }
            store.add(&ev);
            out.counted += 1;
            // Advance this partition's watermark, then the overall one.
            let part = &mut self.parts[p];
            if part.max_ts.is_none_or(|m| ev.ts > m) {
                part.max_ts = Some(ev.ts);
                let mine = ev.ts - bound;
                let overall = others.map_or(mine, |o| o.min(mine));
                wm = Some(wm.map_or(overall, |w| w.max(overall)));
            }
        }
        store.commit();
        drop(store);
        self.watermark = wm;
        if !late_entries.is_empty() {
            let mut dlq = self.dlq.lock();
            for e in &late_entries {
                dlq.push(e.clone());
            }
            if self.journaling {
                self.journal.late.extend(late_entries);
            }
        }
        Ok(out)
    }

    /// A correction record: late events from the DLQ, applied to their
    /// windows whatever the watermark, each (tenant, event_id) at most once
    /// and never on top of an event already counted.
    fn apply_correction(&mut self, reader: BatchReader<'_>) -> Result<Applied, CodecError> {
        let mut out = Applied {
            correction_record: true,
            ..Applied::default()
        };
        let wm = self.watermark;
        let mut store = self.store.write();
        let mut applied_keys = Vec::new();
        for ev in reader {
            let ev = ev?;
            let key = dedupe_key(ev.tenant, ev.event_id);
            let counted = self
                .dedupe
                .get(&key)
                .is_some_and(|&v| v & LATE_MARK == 0 && self.live(v, wm));
            if counted || self.corrected.contains(&key) {
                out.duplicates += 1;
                applied_keys.push((ev.tenant.to_string(), key));
                continue;
            }
            let minute = align_down(ev.ts, MINUTE_MS);
            store.add(&ev);
            self.corrected.insert(key);
            if minute < store.downsampled_to() {
                if self.journaling {
                    let hour = align_down(minute, HOUR_MS);
                    self.journal.rehour.insert((ev.tenant.into(), hour));
                }
            } else if minute < self.sealed_to && self.journaling {
                self.journal.reseal.insert((ev.tenant.into(), minute));
            }
            applied_keys.push((ev.tenant.to_string(), key));
            out.counted += 1;
            out.replayed += 1;
        }
        store.commit();
        drop(store);
        let mut dlq = self.dlq.lock();
        for (tenant, key) in applied_keys {
            dlq.mark_replayed(&tenant, key);
        }
        Ok(out)
    }

    /// Forgets dedupe entries of windows that can no longer change: a
    /// duplicate of such an event would be late and go to the DLQ anyway.
    fn sweep_dedupe(&mut self) {
        let Some(w) = self.watermark else { return };
        let horizon = align_down(w - self.cfg.allowed_lateness_ms, MINUTE_MS) - MINUTE_MS;
        if horizon <= self.swept_to {
            return;
        }
        self.swept_to = horizon;
        // Keep entries whose window end + lateness is still above the watermark.
        let lateness = self.cfg.allowed_lateness_ms;
        self.dedupe
            .retain(|_, &mut v| (v & !LATE_MARK) + MINUTE_MS + lateness > w);
    }

    /// Rollup retention at wall-clock time `now`: final minutes older than
    /// `minutes_ms` are folded into hour buckets, and buckets older than
    /// `hours_ms` are dropped (0 keeps a tier forever). Only final minutes
    /// are touched, so an open or still-mutable window never is.
    /// The next checkpoint writes the hours and the new horizons.
    pub fn enforce_rollup_retention(
        &mut self,
        now: Millis,
        minutes_ms: Millis,
        hours_ms: Millis,
    ) -> RollupRetention {
        let mut out = RollupRetention::default();
        let fin = self.final_before().max(self.sealed_to);
        if fin == Millis::MIN {
            return out;
        }
        // Only final minutes (the stream can no longer change them).
        let sealed = align_down(fin, HOUR_MS);
        let mut store = self.store.write();
        if minutes_ms > 0 {
            let d = store.downsample(now.saturating_sub(minutes_ms).min(sealed));
            out.minutes_folded = d.minutes_folded;
            out.hours_written = d.hours.len();
            if self.journaling {
                self.journal.rehour.extend(d.hours);
            }
        }
        if hours_ms > 0 {
            out.buckets_dropped = store.drop_hours_before(now.saturating_sub(hours_ms).min(sealed));
        }
        store.commit();
        out.downsampled_to = store.downsampled_to();
        out.hours_from = store.hours_from();
        if out.minutes_folded + out.buckets_dropped > 0 {
            self.journal.dirty = true;
        }
        out
    }

    /// Moves past a record without applying it (a replay that starts later
    /// than the beginning of the log).
    pub fn skip(&mut self, partition: u32, next_offset: u64) {
        if let Some(o) = self.offsets.get_mut(partition as usize) {
            *o = (*o).max(next_offset);
        }
    }
}

/// Adds event `i` to sorted `(start, len)` ranges (indexes only grow).
fn push_drop(ranges: &mut Vec<(u32, u32)>, i: u32) {
    match ranges.last_mut() {
        Some((s, l)) if *s + *l == i => *l += 1,
        _ => ranges.push((i, 1)),
    }
}

fn late_entry(
    ev: &EventView<'_>,
    key: u64,
    minute: Millis,
    w: Millis,
    lateness: Millis,
    append_ms: Millis,
) -> DlqEntry {
    DlqEntry {
        kind: DlqKind::Late,
        tenant: ev.tenant.into(),
        reason: format!(
            "window {} closed for good: the watermark is {}, more than the allowed lateness ({}) past the window's end",
            format_rfc3339(minute),
            format_rfc3339(w),
            human_ms(lateness)
        ),
        received_at: append_ms,
        body: DlqBody::Event(ev.to_json()),
        key,
        replayed: false,
    }
}

/// `86400000` → `1d`, `300000` → `5m`, `5000` → `5s`.
pub fn human_ms(ms: Millis) -> String {
    if ms % 86_400_000 == 0 && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % MINUTE_MS == 0 && ms > 0 {
        format!("{}m", ms / MINUTE_MS)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests;
