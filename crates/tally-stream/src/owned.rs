//! A processor that owns one partition of an external log (Kafka mode).
//!
//! In Kafka mode every node runs one [`Processor`] per partition of the
//! events topic it is assigned. Such a processor keeps only the minutes
//! that can still change (final ones are published and then forgotten),
//! hands its late events to the caller instead of the node's late DLQ,
//! notes which buckets changed so they can be published, and can export
//! and import its event clocks, which is how the next owner of the
//! partition continues where the last one committed:
//!
//! 1. the clocks of the last committed point are imported
//!    ([`Processor::import_clocks`]),
//! 2. the aggregates of that point that can still change are loaded into
//!    its store,
//! 3. the events of the partition from the earliest one whose dedupe entry
//!    may still be live up to the committed point are *remembered*
//!    ([`Processor::remember`]): their dedupe entries are rebuilt, nothing
//!    is counted again.
//!
//! Everything a processor decides is a function of its log, so the new
//! owner then makes exactly the decisions the old one would have.

use tally_store::MinuteBucket;
use tally_types::bin::{Dec, DecodeError, Enc};
use tally_types::time::{MINUTE_MS, Millis, align_down};
use tally_types::{BatchReader, dedupe_key};

use crate::state::ClockState;
use crate::{Clock, DlqEntry, Error, LATE_MARK, Processor, RecordRef, live};

impl Processor {
    /// Set up for one partition of an external log: no checkpoint
    /// journals, late entries collected for [`Processor::take_late`],
    /// what events add to each bucket kept in the store as deltas.
    pub fn own_partition(&mut self) {
        self.set_journaling(false);
        self.collected_late = Some(Vec::new());
        self.store.write().track_deltas();
    }

    /// Late entries produced since the last call (with
    /// [`Processor::own_partition`]).
    pub fn take_late(&mut self) -> Vec<DlqEntry> {
        self.collected_late
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Every event clock (live and backfill), for [`Processor::import_clocks`].
    pub fn export_clocks(&self, e: &mut Enc) {
        for map in [&self.clocks, &self.backfills] {
            let list: Vec<ClockState> = map.iter().map(|(t, c)| ClockState::of(t, c)).collect();
            ClockState::encode_list(e, &list);
        }
        e.i64(self.log_ms);
    }

    /// Replaces every event clock with exported ones (dedupe entries are
    /// rebuilt separately by [`Processor::remember`]).
    pub fn import_clocks(&mut self, d: &mut Dec<'_>) -> Result<(), DecodeError> {
        let n = self.offsets.len();
        let live = ClockState::decode_list(d, n)?;
        let backfill = ClockState::decode_list(d, n)?;
        let log_ms = d.i64()?;
        self.clocks.clear();
        self.backfills.clear();
        for c in live {
            self.clocks.insert(c.tenant().into(), c.into_clock());
        }
        for c in backfill {
            self.backfills.insert(c.tenant().into(), c.into_clock());
        }
        self.log_ms = log_ms;
        self.watermark = self.clocks.values().filter_map(|c| c.watermark).max();
        Ok(())
    }

    /// Minutes of `tenant` before this can no longer change by any of its
    /// clocks (live or backfill).
    pub fn mutable_from(&self, tenant: &str) -> Millis {
        let lateness = self.cfg.allowed_lateness_ms;
        [self.clocks.get(tenant), self.backfills.get(tenant)]
            .into_iter()
            .flatten()
            .map(|c| c.final_before(lateness))
            .min()
            .unwrap_or(Millis::MIN)
    }

    /// Forgets minutes no clock can change any more (they were published
    /// while they could). Answers how many minutes went.
    pub fn evict_final(&mut self) -> usize {
        self.take_final().len()
    }

    /// As [`Processor::evict_final`], handing the minutes over: (tenant,
    /// minute, bucket). A backfill clock that appears later may reopen
    /// such a minute; its events must then add to what was published.
    pub fn take_final(&mut self) -> Vec<(Box<str>, Millis, MinuteBucket)> {
        let tenants: Vec<Box<str>> = self.clocks.keys().cloned().collect();
        let mut store = self.store.write();
        let mut gone = Vec::new();
        for t in tenants {
            let cutoff = self.mutable_from(&t);
            if cutoff > Millis::MIN {
                for (m, b) in store.take_minutes_before(&t, cutoff) {
                    gone.push((t.clone(), m, b));
                }
            }
        }
        store.commit();
        gone
    }

    /// Rebuilds the dedupe entries of an already applied record without
    /// counting anything: an event whose window can still change is
    /// remembered in it, any other as a late event at the watermark's
    /// minute (so a retry is a duplicate either way). Answers the events;
    /// [`Processor::last_drops`] then says which were duplicates, as
    /// `apply` judged them, for a raw store rebuilt alongside.
    pub fn remember(&mut self, rec: RecordRef<'_>) -> Result<usize, Error> {
        let codec = |source| Error::Codec {
            partition: rec.partition,
            lsn: rec.lsn,
            source,
        };
        let reader = BatchReader::new(rec.payload).map_err(codec)?;
        if reader.is_correction() {
            return Ok(0);
        }
        let lateness = self.cfg.allowed_lateness_ms;
        let n = self.offsets.len();
        let (map, twin) = if reader.is_backfill() {
            (&mut self.backfills, &self.clocks)
        } else {
            (&mut self.clocks, &self.backfills)
        };
        self.last_drops.clear();
        let mut count = 0;
        for (i, ev) in reader.enumerate() {
            let ev = ev.map_err(codec)?;
            let c = map.entry_ref(ev.tenant).or_insert_with(|| Clock::new(n));
            let minute = align_down(ev.ts, MINUTE_MS);
            let value = if live(minute, c.watermark, lateness) {
                minute
            } else {
                let w = c.watermark.unwrap_or(minute);
                align_down(w.max(minute), MINUTE_MS) | LATE_MARK
            };
            let key = dedupe_key(ev.tenant, ev.event_id);
            // A duplicate as `apply` judged it: a live entry in either clock.
            let seen = c
                .dedupe
                .get(&key)
                .is_some_and(|v| live(v, c.watermark, lateness))
                || twin.get(ev.tenant).is_some_and(|t| {
                    t.dedupe
                        .get(&key)
                        .is_some_and(|v| live(v, t.watermark, lateness))
                });
            if seen {
                super::push_drop(&mut self.last_drops, i as u32);
            }
            c.dedupe.insert_if_absent(key, value);
            count += 1;
        }
        if let Some(p) = self.offsets.get_mut(rec.partition as usize) {
            *p = (*p).max(rec.next_offset);
        }
        Ok(count)
    }
}
