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

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tally_store::RollupStore;
use tally_store::sketch::IdentityHasher;
use tally_types::time::{MINUTE_MS, Millis, align_down, format_rfc3339};
use tally_types::{BatchReader, CodecError, dedupe_key};

pub use dlq::{Dlq, DlqBody, DlqEntry, DlqKind};

type DedupeMap = hashbrown::HashMap<u64, Millis, std::hash::BuildHasherDefault<IdentityHasher>>;

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
    pub lsn: u64,
    pub append_ms: Millis,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, Default)]
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
}

/// Running totals, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub records: u64,
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub corrections: u64,
    pub last_lsn: Option<u64>,
}

/// The processor: owns watermark and dedupe state, writes rollups and late entries.
pub struct Processor {
    cfg: StreamConfig,
    parts: Vec<PartState>,
    dedupe: DedupeMap,
    /// Dedupe entries of minutes before this are evicted on the next sweep.
    swept_to: Millis,
    store: Arc<RwLock<RollupStore>>,
    dlq: Arc<Mutex<Dlq>>,
    totals: Totals,
    /// Next offset to read per partition (one past the last applied record).
    offsets: Vec<u64>,
    watermark: Option<Millis>,
}

impl Processor {
    pub fn new(cfg: StreamConfig, store: Arc<RwLock<RollupStore>>, dlq: Arc<Mutex<Dlq>>) -> Self {
        let n = cfg.partitions.max(1) as usize;
        Processor {
            cfg,
            parts: vec![PartState::default(); n],
            dedupe: DedupeMap::default(),
            swept_to: Millis::MIN,
            store,
            dlq,
            totals: Totals::default(),
            offsets: vec![0; n],
            watermark: None,
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
        self.parts[p].last_append_ms = self.parts[p].last_append_ms.max(rec.append_ms);
        let others = self.others_min(p, rec.append_ms);
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
        for ev in reader {
            let ev = ev.map_err(codec)?;
            let minute = align_down(ev.ts, MINUTE_MS);
            let key = dedupe_key(ev.tenant, ev.event_id);
            // An entry counts while the window of the original can still change.
            if let Some(&orig) = self.dedupe.get(&key)
                && wm.is_none_or(|w| orig + MINUTE_MS + lateness > w)
            {
                out.duplicates += 1;
                continue;
            }
            if let Some(w) = wm {
                if minute + MINUTE_MS + lateness <= w {
                    out.late += 1;
                    late_entries.push(DlqEntry {
                        kind: DlqKind::Late,
                        tenant: ev.tenant.into(),
                        reason: format!(
                            "window {} closed for good: the watermark is {}, more than the allowed lateness ({}) past the window's end",
                            format_rfc3339(minute),
                            format_rfc3339(w),
                            human_ms(lateness)
                        ),
                        received_at: rec.append_ms,
                        body: DlqBody::Event(ev.to_json()),
                    });
                    continue;
                }
                if minute + MINUTE_MS <= w {
                    out.corrections += 1;
                }
            }
            self.dedupe.insert(key, minute);
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
        drop(store);
        self.watermark = wm;
        if !late_entries.is_empty() {
            let mut dlq = self.dlq.lock();
            for e in late_entries {
                dlq.push(e);
            }
        }
        self.offsets[p] = self.offsets[p].max(rec.offset + 1);
        self.totals.records += 1;
        self.totals.counted += out.counted;
        self.totals.duplicates += out.duplicates;
        self.totals.late += out.late;
        self.totals.corrections += out.corrections;
        self.totals.last_lsn = Some(rec.lsn);
        self.sweep_dedupe();
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
            .retain(|_, &mut minute| minute + MINUTE_MS + lateness > w);
    }
}

/// `300000` → `5m`, `5000` → `5s`.
pub fn human_ms(ms: Millis) -> String {
    if ms % 3_600_000 == 0 && ms > 0 {
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
