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
//! # Watermarks: one event clock per tenant
//!
//! Every tenant has its own event clock ([`Clock`]), so one tenant's event
//! time never judges another's events (a client stamping the year 2100, or a
//! backfill of last week beside a live tenant). Per (tenant, partition): max
//! event time seen − `watermark_bound`. A tenant's watermark: the minimum
//! over its partitions that have data and are not idle; a partition whose
//! last record of that tenant was appended more than `idle_timeout` before
//! the current one stops holding it back. Within a record, events are taken
//! in order, so the watermark can advance between two events of one batch.
//! Dedupe entries, sealing and lateness are all judged by the event's own
//! tenant's clock.
//!
//! # Backfills
//!
//! A record flagged as a backfill (`?backfill=true` on ingest: history of a
//! tenant that is live at the same time) is judged by the tenant's second,
//! *backfill* clock, which advances with the history as it is sent. Dedupe
//! looks in both clocks (an event is counted once whichever way it came);
//! both clocks of a tenant share one seal horizon, and a change to a minute
//! already sealed is sealed again, so the live clock and the backfill never
//! undo each other's work.
//!
//! # Windows
//!
//! One-minute tumbling windows per (tenant, event type); coarser buckets are
//! merged from minutes at query time. A window `[s, s+1m)` is *open* while the
//! watermark is below `s+1m`, *closed but mutable* until `s+1m+allowed_lateness`,
//! and *final* afterwards: an event for a final window goes to the late DLQ.

mod dedupe;
pub mod dlq;
pub mod owned;
pub mod state;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tally_store::RollupStore;
use tally_store::sketch::{HashSet64, HashSet128, IdentityHasher};
use tally_types::time::{HOUR_MS, MINUTE_MS, Millis, align_down, format_rfc3339};
use tally_types::{BatchReader, CodecError, EventView, dedupe_key, dedupe_key64};

pub use dlq::{Dlq, DlqBody, DlqEntry, DlqKind};
pub use state::{CheckpointJob, CheckpointReport, RecoveryReport, StateError, StateStore};

use dedupe::DedupeMap;
/// Dedupe entries of format 3 and before (64-bit keys).
type DedupeMap64 = hashbrown::HashMap<u64, Millis, std::hash::BuildHasherDefault<IdentityHasher>>;

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
    /// The properties rollups are split by (given to the store).
    pub dimensions: tally_store::Dimensions,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            partitions: 4,
            watermark_bound_ms: 5_000,
            idle_timeout_ms: 30_000,
            allowed_lateness_ms: 5 * MINUTE_MS,
            dimensions: tally_store::Dimensions::default(),
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

/// One tenant's event time: its watermark (per partition, idle partitions
/// aside), how far its minutes are sealed, and its dedupe entries.
#[derive(Debug, Clone)]
struct Clock {
    parts: Vec<PartState>,
    watermark: Option<Millis>,
    /// Minutes before this are final and written to the sealed journal.
    sealed_to: Millis,
    /// Dedupe entries of minutes before this are evicted on the next sweep.
    swept_to: Millis,
    dedupe: DedupeMap,
    /// Dedupe entries inserted since the last checkpoint, in order.
    journal: Vec<(u128, Millis)>,
    /// Events of this clock counted, dropped as duplicates, sent late.
    counts: TenantCounts,
}

/// One tenant's running totals (its share of [`Totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantCounts {
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
}

impl Clock {
    fn new(partitions: usize) -> Clock {
        Clock {
            parts: vec![PartState::default(); partitions],
            watermark: None,
            sealed_to: Millis::MIN,
            swept_to: Millis::MIN,
            dedupe: DedupeMap::default(),
            journal: Vec::new(),
            counts: TenantCounts::default(),
        }
    }

    fn final_before(&self, lateness: Millis) -> Millis {
        match self.watermark {
            None => Millis::MIN,
            Some(w) => align_down(w - lateness, MINUTE_MS),
        }
    }

    /// Minimum over active partitions other than `skip` of their watermark.
    fn others_min(&self, skip: usize, now: Millis, cfg: &StreamConfig) -> Option<Millis> {
        self.parts
            .iter()
            .enumerate()
            .filter(|&(i, p)| i != skip && now - p.last_append_ms <= cfg.idle_timeout_ms)
            .filter_map(|(_, p)| p.max_ts)
            .min()
            .map(|m| m - cfg.watermark_bound_ms)
    }

    /// A record of this tenant appended at `append_ms` to partition `p`:
    /// partitions that went idle since stop holding the watermark back.
    /// Answers the minimum of the other partitions for [`Clock::advance`].
    fn enter(&mut self, p: usize, append_ms: Millis, cfg: &StreamConfig) -> Option<Millis> {
        self.parts[p].last_append_ms = self.parts[p].last_append_ms.max(append_ms);
        let others = self.others_min(p, append_ms, cfg);
        if let Some(mine) = self.parts[p].max_ts.map(|m| m - cfg.watermark_bound_ms) {
            self.raise(others.map_or(mine, |o| o.min(mine)));
        }
        others
    }

    /// Log time moved to `now`: partitions of this tenant silent for longer
    /// than the idle timeout stop holding its watermark back (all of them
    /// silent: the tenant's latest event sets it), even while the tenant
    /// sends nothing. Tells whether the watermark crossed a minute.
    fn idle_refresh(&mut self, now: Millis, cfg: &StreamConfig) -> bool {
        let was = self.watermark.map(|w| align_down(w, MINUTE_MS));
        let active = self
            .parts
            .iter()
            .filter(|p| now - p.last_append_ms <= cfg.idle_timeout_ms)
            .filter_map(|p| p.max_ts)
            .min();
        let Some(m) = active.or_else(|| self.parts.iter().filter_map(|p| p.max_ts).max()) else {
            return false;
        };
        self.raise(m - cfg.watermark_bound_ms);
        self.watermark.map(|w| align_down(w, MINUTE_MS)) > was
    }

    /// A counted event at `ts` in partition `p`.
    #[inline]
    fn advance(&mut self, p: usize, ts: Millis, others: Option<Millis>, bound: Millis) {
        let part = &mut self.parts[p];
        if part.max_ts.is_none_or(|m| ts > m) {
            part.max_ts = Some(ts);
            let mine = ts - bound;
            self.raise(others.map_or(mine, |o| o.min(mine)));
        }
    }

    #[inline]
    fn raise(&mut self, w: Millis) {
        self.watermark = Some(self.watermark.map_or(w, |x| x.max(w)));
    }

    /// Forgets dedupe entries of windows that can no longer change: a
    /// duplicate of such an event would be late and go to the DLQ anyway.
    fn sweep(&mut self, lateness: Millis) {
        let Some(w) = self.watermark else { return };
        let horizon = align_down(w - lateness, MINUTE_MS) - MINUTE_MS;
        if horizon <= self.swept_to {
            return;
        }
        self.swept_to = horizon;
        self.dedupe
            .retain(|_, v| (v & !LATE_MARK) + MINUTE_MS + lateness > w);
    }
}

/// Dedupe state recovered from format 3 and before (64-bit keys).
#[derive(Default)]
struct Legacy {
    dedupe: DedupeMap64,
    corrected: HashSet64,
}

impl Legacy {
    /// Whether a recovered entry (or applied correction) holds the event:
    /// with `counted`, only one that was counted, not sent to the late
    /// DLQ. Costs nothing once those are gone.
    #[inline]
    fn seen(
        &self,
        ev: &EventView<'_>,
        wm: Option<Millis>,
        lateness: Millis,
        counted: bool,
    ) -> bool {
        if self.dedupe.is_empty() && self.corrected.is_empty() {
            return false;
        }
        let key = dedupe_key64(ev.tenant, ev.event_id);
        self.dedupe
            .get(&key)
            .is_some_and(|&v| (!counted || v & LATE_MARK == 0) && live(v, wm, lateness))
            || self.corrected.contains(&key)
    }
}

/// Whether a dedupe value still blocks its key at watermark `wm`.
#[inline]
fn live(value: Millis, wm: Option<Millis>, lateness: Millis) -> bool {
    wm.is_none_or(|w| (value & !LATE_MARK) + MINUTE_MS + lateness > w)
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
    /// Whether some tenant's watermark crossed a minute (buckets closed).
    pub closed_minute: bool,
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
    /// Each tenant's event clock and dedupe entries.
    clocks: hashbrown::HashMap<Box<str>, Clock>,
    /// Each backfilling tenant's backfill clock.
    backfills: hashbrown::HashMap<Box<str>, Clock>,
    /// Dedupe entries recovered from a checkpoint older than per-tenant
    /// clocks (no tenant recorded): checked for every tenant, swept by the
    /// slowest clock.
    legacy: Legacy,
    /// Dedupe keys of late events applied from the DLQ (each applies once).
    corrected: HashSet128,
    store: Arc<RwLock<RollupStore>>,
    dlq: Arc<Mutex<Dlq>>,
    totals: Totals,
    /// Next offset to read per partition (the record after the last applied one).
    offsets: Vec<u64>,
    /// The furthest tenant watermark (what `/metrics` shows as the watermark).
    watermark: Option<Millis>,
    /// The latest append time of a record with events (log time; restored
    /// from the clocks). Each new second of it refreshes every clock's idle
    /// partitions.
    log_ms: Millis,
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
    /// Late entries kept for the caller to take ([`Processor::take_late`])
    /// instead of the shared late DLQ (a processor owning one Kafka
    /// partition publishes them).
    collected_late: Option<Vec<DlqEntry>>,
}

impl Processor {
    pub fn new(cfg: StreamConfig, store: Arc<RwLock<RollupStore>>, dlq: Arc<Mutex<Dlq>>) -> Self {
        let n = cfg.partitions.max(1) as usize;
        {
            let mut st = store.write();
            st.set_dimensions(cfg.dimensions.clone());
            st.sessions_mut().set_journaling(true);
        }
        Processor {
            cfg,
            clocks: hashbrown::HashMap::new(),
            backfills: hashbrown::HashMap::new(),
            legacy: Legacy::default(),
            corrected: HashSet128::default(),
            store,
            dlq,
            totals: Totals::default(),
            offsets: vec![0; n],
            watermark: None,
            log_ms: Millis::MIN,
            journal: Journal::default(),
            journaling: true,
            capture: false,
            last_drops: Vec::new(),
            raw_drops: VecDeque::new(),
            collected_late: None,
        }
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// The furthest tenant watermark after the last applied event.
    pub fn watermark(&self) -> Option<Millis> {
        self.watermark
    }

    /// One tenant's watermark (its own event clock).
    pub fn tenant_watermark(&self, tenant: &str) -> Option<Millis> {
        self.clocks.get(tenant).and_then(|c| c.watermark)
    }

    /// Every tenant's watermark.
    pub fn watermarks(&self) -> impl Iterator<Item = (&str, Option<Millis>)> {
        self.clocks.iter().map(|(t, c)| (&**t, c.watermark))
    }

    /// A tenant's totals (live and backfill clocks together).
    pub fn tenant_counts(&self, tenant: &str) -> TenantCounts {
        let mut out = TenantCounts::default();
        for c in [self.clocks.get(tenant), self.backfills.get(tenant)]
            .into_iter()
            .flatten()
        {
            out.counted += c.counts.counted;
            out.duplicates += c.counts.duplicates;
            out.late += c.counts.late;
        }
        out
    }

    /// A tenant's backfill watermark (None: no backfill sent).
    pub fn backfill_watermark(&self, tenant: &str) -> Option<Millis> {
        self.backfills.get(tenant).and_then(|c| c.watermark)
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    pub fn dedupe_len(&self) -> usize {
        self.legacy.dedupe.len()
            + self
                .clocks
                .values()
                .chain(self.backfills.values())
                .map(|c| c.dedupe.len())
                .sum::<usize>()
    }

    pub fn store(&self) -> &Arc<RwLock<RollupStore>> {
        &self.store
    }

    /// Turns journaling for checkpoints on or off (off: nothing is kept for
    /// a checkpoint that will never be written).
    pub fn set_journaling(&mut self, on: bool) {
        self.journaling = on;
        self.store.write().sessions_mut().set_journaling(on);
        if !on {
            self.journal = Journal::default();
            for c in self.clocks.values_mut().chain(self.backfills.values_mut()) {
                c.journal = Vec::new();
            }
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

    /// Minutes of `tenant` before this boundary can no longer change
    /// through the stream (only through DLQ corrections).
    pub fn final_before(&self, tenant: &str) -> Millis {
        self.clocks.get(tenant).map_or(Millis::MIN, |c| {
            c.final_before(self.cfg.allowed_lateness_ms)
        })
    }

    /// Applies one committed record (all its events, in order).
    pub fn apply(&mut self, rec: RecordRef<'_>) -> Result<Applied> {
        let p = rec.partition as usize;
        if p >= self.offsets.len() {
            return Err(Error::Partition(rec.partition, self.offsets.len() as u32));
        }
        let codec = |source| Error::Codec {
            partition: rec.partition,
            lsn: rec.lsn,
            source,
        };
        let reader = BatchReader::new(rec.payload).map_err(codec)?;
        self.last_drops.clear();
        let out = if reader.is_correction() {
            self.apply_correction(reader, rec.append_ms)
                .map_err(codec)?
        } else {
            let backfill = reader.is_backfill();
            self.apply_events(p, rec.append_ms, reader, backfill)
                .map_err(codec)?
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
        Ok(out)
    }

    fn apply_events(
        &mut self,
        p: usize,
        append_ms: Millis,
        reader: BatchReader<'_>,
        backfill: bool,
    ) -> Result<Applied, CodecError> {
        let mut out = Applied::default();
        // A new second of log time: tenants that went quiet get their idle
        // partitions released (deterministic: a function of the log).
        if append_ms.div_euclid(1000) > self.log_ms.div_euclid(1000) {
            let lateness = self.cfg.allowed_lateness_ms;
            for c in self.clocks.values_mut() {
                if c.idle_refresh(append_ms, &self.cfg) {
                    out.closed_minute = true;
                    c.sweep(lateness);
                }
            }
            for c in self.backfills.values_mut() {
                if c.idle_refresh(append_ms, &self.cfg) {
                    c.sweep(lateness);
                }
            }
        }
        self.log_ms = self.log_ms.max(append_ms);
        let cfg = &self.cfg;
        // A backfill is judged by the backfill clocks, and checks the live
        // ones for duplicates; live events the other way round.
        let (own, other) = if backfill {
            (&mut self.backfills, &self.clocks)
        } else {
            (&mut self.clocks, &self.backfills)
        };
        let bound = cfg.watermark_bound_ms;
        let lateness = cfg.allowed_lateness_ms;
        let n_parts = self.offsets.len();
        let journaling = self.journaling;
        let capture = self.capture;
        let mut store = self.store.write();
        let downsampled_to = store.downsampled_to();
        let hours_from = store.hours_from();
        let mut late_entries = Vec::new();
        // Closed sessions the record's events changed, per tenant.
        let mut session_fixes = Vec::new();
        let mut told: Vec<(Box<str>, Vec<tally_store::SessionCorrection>)> = Vec::new();
        // The clock of the tenant of the event before (a record nearly
        // always holds one tenant), its other clock, the minimum of its
        // other partitions, and its watermark's minute when the record
        // entered it.
        type Cur<'c, 't> = (
            &'t str,
            &'c mut Clock,
            Option<&'c Clock>,
            Option<Millis>,
            Option<Millis>,
        );
        let mut cur: Option<Cur<'_, '_>> = None;
        for (i, ev) in reader.enumerate() {
            let ev = ev?;
            if cur.as_ref().is_none_or(|(t, ..)| *t != ev.tenant) {
                if let Some((_, c, _, _, was)) = cur.take() {
                    out.closed_minute |= leave(c, was, lateness) && !backfill;
                }
                let c = own
                    .entry_ref(ev.tenant)
                    .or_insert_with(|| Clock::new(n_parts));
                let was = c.watermark.map(|w| align_down(w, MINUTE_MS));
                let others = c.enter(p, append_ms, cfg);
                // Both clocks of a tenant seal together (the other one may
                // have sealed further since this one was made).
                let twin = other.get(ev.tenant);
                if let Some(t) = twin {
                    c.sealed_to = c.sealed_to.max(t.sealed_to);
                }
                cur = Some((ev.tenant, c, twin, others, was));
            }
            let Some((_, c, twin, others, _)) = cur.as_mut() else {
                unreachable!("set above")
            };
            let wm = c.watermark;
            let minute = align_down(ev.ts, MINUTE_MS);
            let key = dedupe_key(ev.tenant, ev.event_id);
            // An entry counts while the window of the original can still
            // change (by the clock that holds it).
            let seen = |m: &DedupeMap, wm| m.get(&key).is_some_and(|v| live(v, wm, lateness));
            if seen(&c.dedupe, wm)
                || twin.is_some_and(|t| seen(&t.dedupe, t.watermark))
                || self.corrected.contains(&key)
                || self.legacy.seen(&ev, wm, lateness, false)
            {
                out.duplicates += 1;
                c.counts.duplicates += 1;
                if capture {
                    push_drop(&mut self.last_drops, i as u32);
                }
                continue;
            }
            // Sessions take every event the raw store keeps, late ones too,
            // and tell the closed ones a live event changes.
            let live_wm = if backfill { None } else { wm };
            store
                .sessions_mut()
                .add_telling(&ev, live_wm, &mut session_fixes);
            if !session_fixes.is_empty() {
                match told.last_mut() {
                    Some((t, v)) if **t == *ev.tenant => v.append(&mut session_fixes),
                    _ => told.push((ev.tenant.into(), std::mem::take(&mut session_fixes))),
                }
            }
            let too_late = wm.filter(|&w| minute + MINUTE_MS + lateness <= w);
            // Past the rollup retention there is no bucket to count it in.
            let expired = minute < hours_from;
            if too_late.is_some() || expired {
                out.late += 1;
                c.counts.late += 1;
                let w = wm.unwrap_or(minute);
                let mark = align_down(w.max(minute), MINUTE_MS) | LATE_MARK;
                c.dedupe.insert(key, mark);
                if journaling {
                    c.journal.push((key, mark));
                }
                let reason = match too_late {
                    Some(w) => late_reason(ev.tenant, backfill, minute, w, lateness),
                    None => format!(
                        "window {} is past the rollup retention (hours kept from {}): nothing counts it any more",
                        format_rfc3339(minute),
                        format_rfc3339(hours_from)
                    ),
                };
                late_entries.push(late_entry(&ev, key, reason, append_ms));
                continue;
            }
            // A window already closed (by this clock or the tenant's
            // other one) changes after it was published: say so.
            let closed_by = wm.max(twin.and_then(|t| t.watermark));
            if wm.is_some_and(|w| minute + MINUTE_MS <= w) {
                out.corrections += 1;
            }
            if closed_by.is_some_and(|w| minute + MINUTE_MS <= w) {
                let ty = store.rollup_type(ev.tenant, minute, ev.event_type);
                store.note_correction(ev.tenant, minute, ty, append_ms);
            }
            c.dedupe.insert(key, minute);
            if journaling {
                c.journal.push((key, minute));
                // A minute already folded or sealed (a clock that starts
                // behind what retention or an older checkpoint did) is
                // written again at the next checkpoint.
                if minute < downsampled_to {
                    self.journal
                        .rehour
                        .insert((ev.tenant.into(), align_down(minute, HOUR_MS)));
                } else if minute < c.sealed_to {
                    self.journal.reseal.insert((ev.tenant.into(), minute));
                }
            }
            store.add(&ev);
            // Behind the watermark it may extend or join sessions already
            // closed: the session corrections task looks.
            if !backfill && let Some(w) = wm.filter(|&w| ev.ts < w) {
                note_touch(&mut store, &ev, w, append_ms);
            }
            out.counted += 1;
            c.counts.counted += 1;
            c.advance(p, ev.ts, *others, bound);
        }
        if let Some((_, c, _, _, was)) = cur.take() {
            out.closed_minute |= leave(c, was, lateness) && !backfill;
        }
        for (tenant, fixes) in told {
            store.push_session_changes(&tenant, append_ms, fixes);
        }
        store.commit();
        drop(store);
        let furthest = self.clocks.values().filter_map(|c| c.watermark).max();
        self.watermark = self.watermark.max(furthest);
        if let Some(out) = self.collected_late.as_mut() {
            out.append(&mut late_entries);
        }
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
    fn apply_correction(
        &mut self,
        reader: BatchReader<'_>,
        append_ms: Millis,
    ) -> Result<Applied, CodecError> {
        let mut out = Applied {
            correction_record: true,
            ..Applied::default()
        };
        let lateness = self.cfg.allowed_lateness_ms;
        let mut store = self.store.write();
        let mut applied_keys = Vec::new();
        for ev in reader {
            let ev = ev?;
            let key = dedupe_key(ev.tenant, ev.event_id);
            let clock = self.clocks.get(ev.tenant);
            let twin = self.backfills.get(ev.tenant);
            let wm = clock.and_then(|c| c.watermark);
            let counted_in = |m: &DedupeMap, wm| {
                m.get(&key)
                    .is_some_and(|v| v & LATE_MARK == 0 && live(v, wm, lateness))
            };
            let counted = clock.is_some_and(|c| counted_in(&c.dedupe, c.watermark))
                || twin.is_some_and(|c| counted_in(&c.dedupe, c.watermark))
                || self.legacy.seen(&ev, wm, lateness, true);
            let sealed_to = clock
                .into_iter()
                .chain(twin)
                .map(|c| c.sealed_to)
                .max()
                .unwrap_or(Millis::MIN);
            if counted || self.corrected.contains(&key) {
                out.duplicates += 1;
                applied_keys.push((ev.tenant.to_string(), key));
                continue;
            }
            let minute = align_down(ev.ts, MINUTE_MS);
            let ty = store.rollup_type(ev.tenant, minute, ev.event_type);
            store.note_correction(ev.tenant, minute, ty, append_ms);
            store.add(&ev);
            note_touch(&mut store, &ev, wm.unwrap_or(Millis::MAX), append_ms);
            self.corrected.insert(key);
            if minute < store.downsampled_to() {
                if self.journaling {
                    let hour = align_down(minute, HOUR_MS);
                    self.journal.rehour.insert((ev.tenant.into(), hour));
                }
            } else if minute < sealed_to && self.journaling {
                self.journal.reseal.insert((ev.tenant.into(), minute));
            }
            applied_keys.push((ev.tenant.to_string(), key));
            out.counted += 1;
            out.replayed += 1;
            if let Some(c) = self.clocks.get_mut(ev.tenant) {
                c.counts.counted += 1;
            }
        }
        store.commit();
        drop(store);
        let mut dlq = self.dlq.lock();
        for (tenant, key) in applied_keys {
            dlq.mark_replayed(&tenant, key);
        }
        Ok(out)
    }

    /// Rollup retention at wall-clock time `now`: final minutes older than
    /// `minutes_ms` are folded into hour buckets, and buckets older than
    /// `hours_ms` are dropped (0 keeps a tier forever). Final: before the
    /// seal horizon of every tenant still sending; a tenant silent for
    /// longer than the idle timeout (log time) does not hold the others
    /// back, and an event
    /// that lands in one of its folded minutes later is added to the hour,
    /// which is written again (one before the hours kept goes to the late
    /// DLQ). The next checkpoint writes the hours and the new horizons.
    pub fn enforce_rollup_retention(
        &mut self,
        now: Millis,
        minutes_ms: Millis,
        hours_ms: Millis,
    ) -> RollupRetention {
        let mut out = RollupRetention::default();
        self.sweep_legacy_dedupe();
        // Only final minutes of the tenants still sending (an append within
        // the idle timeout of the newest, in log time); a tenant gone quiet
        // holds nothing back, and an event that reaches one of its folded
        // minutes later lands in the hour, written again.
        let horizon = self.cfg.idle_timeout_ms;
        let lateness = self.cfg.allowed_lateness_ms;
        // Backfill clocks hold nothing back either: history lands in its
        // hours as well as in its minutes.
        let clocks = || self.clocks.values();
        let last_append = |c: &Clock| {
            c.parts
                .iter()
                .map(|p| p.last_append_ms)
                .max()
                .unwrap_or(Millis::MIN)
        };
        let Some(newest) = clocks().map(last_append).max() else {
            return out;
        };
        let fin = clocks()
            .filter(|c| c.watermark.is_some() && last_append(c).saturating_add(horizon) >= newest)
            .map(|c| c.final_before(lateness).max(c.sealed_to))
            .min();
        let Some(fin) = fin.filter(|&f| f > Millis::MIN) else {
            return out;
        };
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

    /// Legacy dedupe entries (no tenant recorded) go once the slowest
    /// tenant's clock has passed them.
    fn sweep_legacy_dedupe(&mut self) {
        if self.legacy.dedupe.is_empty() {
            return;
        }
        let Some(w) = self.clocks.values().map(|c| c.watermark).min().flatten() else {
            return;
        };
        let lateness = self.cfg.allowed_lateness_ms;
        self.legacy
            .dedupe
            .retain(|_, &mut v| live(v, Some(w), lateness));
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

/// Leaving a tenant's clock after a run of its events: sweeps its dedupe
/// entries and tells whether its watermark crossed a minute.
fn leave(c: &mut Clock, was: Option<Millis>, lateness: Millis) -> bool {
    c.sweep(lateness);
    c.watermark.map(|w| align_down(w, MINUTE_MS)) > was
}

fn late_reason(
    tenant: &str,
    backfill: bool,
    minute: Millis,
    w: Millis,
    lateness: Millis,
) -> String {
    let clock = if backfill {
        "backfill watermark"
    } else {
        "watermark"
    };
    format!(
        "window {} closed for good: tenant {tenant:?}'s {clock} is {}, more than the allowed lateness ({}) past the window's end; \
         apply it to its window with POST /api/v1/dlq/replay?kind=late",
        format_rfc3339(minute),
        format_rfc3339(w),
        human_ms(lateness)
    )
}

fn late_entry(ev: &EventView<'_>, key: u128, reason: String, append_ms: Millis) -> DlqEntry {
    DlqEntry {
        kind: DlqKind::Late,
        tenant: ev.tenant.into(),
        reason,
        received_at: append_ms,
        body: DlqBody::Event(ev.to_json()),
        key,
        replayed: false,
    }
}

pub use tally_types::time::human_ms;

#[cfg(test)]
mod tests;

/// Notes an event applied behind its tenant's watermark `wm` for the
/// session corrections (events with neither a session nor a user belong
/// to no session).
fn note_touch(store: &mut RollupStore, ev: &EventView<'_>, wm: Millis, at: Millis) {
    // Nothing to build when nobody takes them (Kafka mode's partitions).
    if !store.tracks_session_touches() || (ev.session_id.is_none() && ev.user_id.is_none()) {
        return;
    }
    store.note_session_touch(tally_store::SessionTouch {
        tenant: ev.tenant.into(),
        session_id: ev.session_id.map(Into::into),
        user_id: ev.user_id.map(Into::into),
        event_id: ev.event_id.into(),
        ts: ev.ts,
        watermark: wm,
        at,
    });
}
