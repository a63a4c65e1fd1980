//! Every node's view of the whole cluster: the aggregates topic, read
//! `read_committed` from the beginning, into the node's rollup store.
//!
//! Per source partition it keeps the last value of every key and the last
//! partition state. A partition's aggregates are held back until the
//! partition state that closes their transaction arrives, then applied
//! together, so the store (and a new owner restoring the partition) always
//! sees whole transactions. The store's aggregate of a (tenant, minute,
//! event type) is the merge of that key's values over source partitions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_store::{Agg, RollupStore};
use tally_types::time::{HOUR_MS, Millis, align_down};

use crate::codec::{self, AggKey, Key, PartitionState};
use crate::{Error, Settings};

type BucketKey = (Box<str>, Millis, Box<str>);

/// How an aggregate record changes a partition's value of its bucket.
#[derive(Clone, Copy)]
enum Apply {
    /// The whole value: replaces it (and the deltas it covers).
    Whole,
    /// A delta (at, seq): adds to it.
    Delta(u64, u32),
}

/// A source partition's committed value of one bucket.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub agg: Agg,
    /// The deltas (at, seq) published since the bucket's last whole value:
    /// what its next whole value replaces.
    pub deltas: Vec<(u64, u32)>,
}

#[derive(Default)]
struct PartView {
    state: Option<PartitionState>,
    values: HashMap<BucketKey, Published>,
    /// Aggregates read since the last state of this partition.
    pending: Vec<(BucketKey, Agg, Apply)>,
    /// Sealed files read since the last state of this partition.
    pending_files: Vec<codec::Sealed>,
    /// Replaced files read since the last state of this partition.
    pending_replaced: Vec<codec::Replaced>,
    /// Session changes read since the last state of this partition.
    pending_sessions: Vec<codec::SessionChanges>,
    /// The partition's archive files as committed: `[from, to)` and file.
    files: Vec<(u64, u64, codec::SealedFile)>,
    /// The (at, seq) of the last replaced-files record committed.
    last_replace: Option<(u64, u32)>,
}

#[derive(Default)]
struct Inner {
    parts: HashMap<u32, PartView>,
    /// The store's fold horizon as this view last moved it.
    folded_to: Option<Millis>,
    /// Records applied, and records skipped as unreadable.
    applied: u64,
    unreadable: u64,
}

/// What a new owner of a partition restores from.
pub struct Restore {
    pub state: PartitionState,
    /// The partition's aggregates at that state whose minute is at or after
    /// the cutoff the caller gave for their tenant.
    pub values: Vec<(BucketKey, Published)>,
    /// The key (offset, sequence number) of the partition's last
    /// replaced-files record.
    pub last_replace: Option<(u64, u32)>,
}

/// What [`Materialized::restore`] found for a partition.
pub enum Restored {
    /// The state that committed the group's offset, and its aggregates.
    Ready(Restore),
    /// No offset is committed and no state was ever written: the
    /// partition starts from its beginning.
    Fresh,
    /// The view has not yet read the state of the committed offset; `at`
    /// is the next offset of the last state it read.
    Behind { at: Option<u64> },
}

/// Called with the archive files of a committed seal.
pub type FilesFn = Box<dyn Fn(&codec::Sealed) + Send + Sync>;

/// Called with archive files committed as replaced (compaction) or
/// removed (retention).
pub type ReplaceFn = Box<dyn Fn(&codec::Replaced) + Send + Sync>;

/// The materialized aggregates topic, shared by the reader thread, the
/// partition workers and the HTTP layer.
pub struct Materialized {
    inner: Mutex<Inner>,
    changed: Condvar,
    store: Arc<RwLock<RollupStore>>,
    on_files: Mutex<Option<FilesFn>>,
    on_replace: Mutex<Option<ReplaceFn>>,
    /// Wall time from a partition state's commit (as its writer stamped
    /// it) to its application here.
    pub visible_delay: tally_types::histogram::Histogram,
}

impl Materialized {
    pub fn new(store: Arc<RwLock<RollupStore>>) -> Arc<Materialized> {
        Arc::new(Materialized {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            store,
            on_files: Mutex::new(None),
            on_replace: Mutex::new(None),
            visible_delay: tally_types::histogram::Histogram::latency(),
        })
    }

    /// Where the archive files of committed seals go (the node's raw store).
    pub fn on_files(&self, f: FilesFn) {
        *self.on_files.lock() = Some(f);
    }

    /// Where replaced and removed archive files go (the node's raw store).
    pub fn on_replace(&self, f: ReplaceFn) {
        *self.on_replace.lock() = Some(f);
    }

    /// A source partition's archive files as committed: `[from, to)` of
    /// the offsets each covers, and the file.
    pub fn files_of(&self, partition: u32) -> Vec<(u64, u64, codec::SealedFile)> {
        self.inner
            .lock()
            .parts
            .get(&partition)
            .map(|v| v.files.clone())
            .unwrap_or_default()
    }

    /// Every partition's last committed state.
    pub fn states(&self) -> Vec<(u32, PartitionState)> {
        let inner = self.inner.lock();
        let mut out: Vec<_> = inner
            .parts
            .iter()
            .filter_map(|(p, v)| v.state.clone().map(|s| (*p, s)))
            .collect();
        out.sort_by_key(|(p, _)| *p);
        out
    }

    /// A source partition's committed value of one bucket.
    pub fn value_of(
        &self,
        partition: u32,
        tenant: &str,
        minute: Millis,
        event_type: &str,
    ) -> Option<Published> {
        let k: BucketKey = (tenant.into(), minute, event_type.into());
        self.inner
            .lock()
            .parts
            .get(&partition)?
            .values
            .get(&k)
            .cloned()
    }

    /// `f` of a source partition's last state applied.
    fn state_of<T>(&self, partition: u32, f: impl FnOnce(&PartitionState) -> T) -> Option<T> {
        self.inner
            .lock()
            .parts
            .get(&partition)?
            .state
            .as_ref()
            .map(f)
    }

    /// The next offset of a source partition's last state applied.
    pub fn next_offset_of(&self, partition: u32) -> Option<u64> {
        self.state_of(partition, |s| s.next_offset)
    }

    /// The raw-from offset of a source partition's last state applied:
    /// everything before it is sealed and listed.
    pub fn raw_from_of(&self, partition: u32) -> Option<u64> {
        self.state_of(partition, |s| s.raw_from)
    }

    /// Hour retention at wall time `now`: buckets older than `keep_ms`
    /// are dropped (0: kept). Answers how many buckets went.
    pub fn enforce_hour_retention(&self, now: Millis, keep_ms: Millis) -> usize {
        if keep_ms <= 0 {
            return 0;
        }
        let cutoff = align_down(now.saturating_sub(keep_ms), HOUR_MS);
        let mut inner = self.inner.lock();
        let mut store = self.store.write();
        let gone = store.drop_hours_before(cutoff);
        if gone > 0 {
            store.commit();
        }
        let from = store.hours_from();
        drop(store);
        for v in inner.parts.values_mut() {
            v.values.retain(|k, _| k.1 >= from);
        }
        gone
    }

    /// The rollup horizons: minutes from the first, hours from the second.
    pub fn horizons(&self) -> (Millis, Millis) {
        let st = self.store.read();
        (st.downsampled_to(), st.hours_from())
    }

    /// Records applied and records skipped as unreadable.
    pub fn counters(&self) -> (u64, u64) {
        let i = self.inner.lock();
        (i.applied, i.unreadable)
    }

    /// Waits (up to `timeout`) until the state of `partition` has reached
    /// `committed` (the group's committed offset for it), then hands the
    /// state and the partition's aggregates from `cutoff(state)[tenant]` on
    /// to `take`, under the lock (nothing of the partition changes
    /// meanwhile).
    ///
    /// [`Restored::Behind`]: the view has not read the transaction that
    /// committed that offset (a read_committed reader waits behind any
    /// open transaction on the same aggregates partition, e.g. one of a
    /// node killed mid-commit, until the broker aborts it). Restoring from
    /// an older state would seal raw rows and publish deltas a second
    /// time, so the caller waits and asks again.
    pub fn restore(
        &self,
        partition: u32,
        committed: Option<u64>,
        timeout: Duration,
        cutoff: impl FnOnce(&PartitionState) -> HashMap<String, Millis>,
    ) -> Restored {
        let deadline = Instant::now() + timeout;
        let mut inner = self.inner.lock();
        let at = loop {
            let at = inner
                .parts
                .get(&partition)
                .and_then(|v| v.state.as_ref())
                .map(|s| s.next_offset);
            let reached = match (committed, at) {
                (None, _) => true,
                (Some(c), Some(a)) => a >= c,
                (Some(_), None) => false,
            };
            if reached {
                break at;
            }
            if self.changed.wait_until(&mut inner, deadline).timed_out() {
                return Restored::Behind { at };
            }
        };
        if at.is_none() {
            return Restored::Fresh;
        }
        let Some(view) = inner.parts.get(&partition) else {
            return Restored::Fresh;
        };
        let Some(state) = view.state.clone() else {
            return Restored::Fresh;
        };
        Restored::Ready(Self::take(view, state, cutoff))
    }

    /// Like [`Materialized::restore`] without waiting, from whatever state
    /// the view holds (`None`: none): for a caller that waited long enough
    /// and goes on regardless.
    pub fn restore_stale(
        &self,
        partition: u32,
        cutoff: impl FnOnce(&PartitionState) -> HashMap<String, Millis>,
    ) -> Option<Restore> {
        let inner = self.inner.lock();
        let view = inner.parts.get(&partition)?;
        let state = view.state.clone()?;
        Some(Self::take(view, state, cutoff))
    }

    fn take(
        view: &PartView,
        state: PartitionState,
        cutoff: impl FnOnce(&PartitionState) -> HashMap<String, Millis>,
    ) -> Restore {
        let cut = cutoff(&state);
        let values = view
            .values
            .iter()
            .filter(|((t, m, _), _)| *m >= cut.get(&**t).copied().unwrap_or(Millis::MIN))
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        Restore {
            state,
            values,
            last_replace: view.last_replace,
        }
    }

    /// Applies one record of the aggregates topic.
    fn apply(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), codec::CodecError> {
        let key = codec::decode_key(key)?;
        let mut inner = self.inner.lock();
        inner.applied += 1;
        match key {
            Key::Agg(AggKey {
                partition,
                minute,
                tenant,
                event_type,
            }) => {
                let agg = match value {
                    Some(v) => codec::decode_agg(v)?,
                    None => Agg::default(),
                };
                inner.parts.entry(partition).or_default().pending.push((
                    (tenant, minute, event_type),
                    agg,
                    Apply::Whole,
                ));
            }
            Key::Delta(codec::DeltaKey {
                partition,
                at,
                seq,
                minute,
                tenant,
                event_type,
            }) => {
                // A tombstone follows the whole value that replaced it.
                let Some(v) = value else { return Ok(()) };
                let agg = codec::decode_agg(v)?;
                inner.parts.entry(partition).or_default().pending.push((
                    (tenant, minute, event_type),
                    agg,
                    Apply::Delta(at, seq),
                ));
            }
            Key::Files(partition, from) => {
                let Some(v) = value else { return Ok(()) };
                let sealed = codec::decode_files(partition, from, v)?;
                inner
                    .parts
                    .entry(partition)
                    .or_default()
                    .pending_files
                    .push(sealed);
            }
            Key::Sessions(partition, ..) => {
                let Some(v) = value else { return Ok(()) };
                let c = codec::decode_sessions(v)?;
                inner
                    .parts
                    .entry(partition)
                    .or_default()
                    .pending_sessions
                    .push(c);
            }
            Key::Replace(partition, at, seq) => {
                let Some(v) = value else { return Ok(()) };
                let r = codec::decode_replace(partition, at, seq, v)?;
                inner
                    .parts
                    .entry(partition)
                    .or_default()
                    .pending_replaced
                    .push(r);
            }
            Key::State(partition) => {
                let Some(v) = value else { return Ok(()) };
                let state = codec::decode_state(v)?;
                let committed_at = state.committed_at;
                let delay = tally_types::Clock::system().now_ms() - committed_at;
                // (A writer's clock far off, or an injected one: not a delay.)
                if (0..HOUR_MS).contains(&delay) {
                    self.visible_delay.observe_ms(delay as u64);
                }
                let (pending, files, replaced, sessions, closed) = {
                    let view = inner.parts.entry(partition).or_default();
                    tracing::debug!(
                        partition,
                        next_offset = state.next_offset,
                        "view: partition state applied"
                    );
                    // What the partition had closed before this
                    // transaction: a new value of a published bucket there
                    // is a correction (GET /api/v1/changes).
                    let closed: HashMap<String, Millis> = match &view.state {
                        // Most states carry no aggregates: nothing to judge.
                        Some(s) if !view.pending.is_empty() => s
                            .watermarks
                            .iter()
                            .filter_map(|(t, w)| Some((t.clone(), (*w)?)))
                            .collect(),
                        _ => HashMap::new(),
                    };
                    view.state = Some(state);
                    for sealed in &view.pending_files {
                        for f in &sealed.files {
                            view.files.push((sealed.from, sealed.to, f.clone()));
                        }
                    }
                    for r in &view.pending_replaced {
                        view.files.retain(|(_, _, f)| !r.removed.contains(&f.path));
                        if let Some(a) = &r.added {
                            view.files.push(a.clone());
                        }
                        view.last_replace = view.last_replace.max(Some((r.at, r.seq)));
                    }
                    (
                        std::mem::take(&mut view.pending),
                        std::mem::take(&mut view.pending_files),
                        std::mem::take(&mut view.pending_replaced),
                        std::mem::take(&mut view.pending_sessions),
                        closed,
                    )
                };
                if !files.is_empty()
                    && let Some(f) = self.on_files.lock().as_ref()
                {
                    for sealed in &files {
                        f(sealed);
                    }
                }
                if !replaced.is_empty()
                    && let Some(f) = self.on_replace.lock().as_ref()
                {
                    for r in &replaced {
                        f(r);
                    }
                }
                // Every partition writes whole minutes only from its cut
                // on: behind the lowest cut (less an hour, for clocks that
                // disagree) no whole value can come any more, so those
                // minutes fold into hours, here as on every node.
                let fold = inner
                    .parts
                    .values()
                    .filter_map(|v| v.state.as_ref().map(|s| s.cut))
                    .min()
                    .map_or(Millis::MIN, |lowest| lowest.saturating_sub(HOUR_MS));
                if pending.is_empty()
                    && sessions.is_empty()
                    && fold <= inner.folded_to.unwrap_or(Millis::MIN)
                {
                    // Most states: nothing for the store.
                    self.changed.notify_all();
                    return Ok(());
                }
                let mut store = self.store.write();
                let (folded_to, hours_from) = (store.downsampled_to(), store.hours_from());
                for (k, agg, how) in pending {
                    if k.1 < hours_from {
                        // Past the hour retention: gone everywhere.
                        continue;
                    }
                    if k.1 < folded_to {
                        // Folded into its hour: only a delta can come for
                        // it (the partition's cut is past it), added there.
                        if matches!(how, Apply::Whole) {
                            tracing::warn!(partition, tenant = %k.0, minute = k.1, "whole aggregate for a minute already folded into its hour; added to the hour");
                        }
                        store.agg_mut(&k.0, k.1, &k.2).merge(&agg);
                        continue;
                    }
                    if closed
                        .get(&*k.0)
                        .is_some_and(|&w| k.1 + tally_types::time::MINUTE_MS <= w)
                        && store.agg(&k.0, k.1, &k.2).is_some()
                    {
                        store.note_correction(&k.0, k.1, &k.2, committed_at);
                    }
                    let view = inner.parts.entry(partition).or_default();
                    match how {
                        Apply::Delta(at, seq) => {
                            // The store's value is the merge over
                            // partitions: a delta adds to both.
                            store.agg_mut(&k.0, k.1, &k.2).merge(&agg);
                            let p = view.values.entry(k).or_default();
                            p.agg.merge(&agg);
                            p.deltas.push((at, seq));
                        }
                        Apply::Whole => {
                            view.values.insert(
                                k.clone(),
                                Published {
                                    agg,
                                    deltas: Vec::new(),
                                },
                            );
                            let mut merged = Agg::default();
                            for v in inner.parts.values() {
                                if let Some(p) = v.values.get(&k) {
                                    merged.merge(&p.agg);
                                }
                            }
                            store.set_agg(&k.0, k.1, &k.2, merged);
                        }
                    }
                }
                // Session changes the partition's owner told, in its order.
                for c in sessions {
                    store.push_session_changes(&c.tenant, c.at, c.changes);
                }
                if fold > store.downsampled_to() {
                    store.downsample(fold);
                    let horizon = store.downsampled_to();
                    inner.folded_to = Some(horizon);
                    for v in inner.parts.values_mut() {
                        v.values.retain(|k, _| k.1 >= horizon);
                    }
                }
                store.commit();
                drop(store);
                self.changed.notify_all();
            }
        }
        Ok(())
    }
}

/// Reads the aggregates topic into `view` until `stop`.
pub fn run(
    settings: Settings,
    view: Arc<Materialized>,
    stop: Arc<AtomicBool>,
) -> Result<(), Error> {
    let topic = settings.topic_aggregates.clone();
    read_committed(
        &settings,
        &topic,
        "view",
        VIEW_PAUSE,
        &stop,
        &mut |key, value| {
            view.apply(key, value).map_err(|e| {
                view.inner.lock().unreadable += 1;
                e.to_string()
            })
        },
    )
}

/// How long the aggregates reader rests when it has read everything: a
/// bound on what it adds to freshness.
pub const VIEW_PAUSE: Duration = Duration::from_millis(50);

/// How a reader that has read everything rests: it stops fetching for
/// `pause`. Kafka brokers hold an empty fetch for `fetch.wait.max.ms`, but
/// a broker that answers at once (the test broker does) would have the
/// client fetch in a loop, a core's worth per idle reader. "Everything" is
/// judged on the partition ends the client cached from its last fetches
/// and the ends the last wake-up found: every partition at most one offset
/// (a transaction marker) short of its end. A reader with a backlog never
/// rests.
///
/// Resuming alone does not end the rest: librdkafka's broker thread, with
/// none of its partitions fetchable, sleeps up to a second
/// (`rd_kafka_max_block_ms`) and a resume does not wake it, so a reader
/// that pauses again soon after resuming may not fetch for seconds. A
/// request does wake it: after each resume, [`Rest`] asks the partitions'
/// leaders for their ends (one request per leader), and the fetch follows
/// at once. On a broker that holds empty fetches the request waits behind
/// the held fetch, which makes it the reader's wait for new records.
///
/// The readers poll with [`Rest::poll_timeout`]: briefly right after a rest
/// that found nothing new, so an idle reader spends little of its time
/// fetching in a loop; for as long as the usual poll when the ends show
/// records to read, and the reader does not rest before it has read them
/// (a loaded broker may take longer than the brief poll to answer).
pub(crate) struct Rest {
    pause: Duration,
    woke: bool,
    /// The ends the last wake-up found: topic, partition, end.
    ends: Vec<(String, i32, i64)>,
}

/// How long a wake-up request may take: librdkafka's default
/// `fetch.wait.max.ms`, the longest a broker holds the fetch ahead of it (a
/// broker that does not answer is noticed by the fetches, not here).
const WAKE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long the readers wait in a poll, and right after a rest that found
/// nothing new.
const POLL: Duration = Duration::from_millis(20);
const POLL_AFTER_REST: Duration = Duration::from_millis(2);

impl Rest {
    pub(crate) fn new(pause: Duration) -> Rest {
        Rest {
            pause,
            woke: false,
            ends: Vec::new(),
        }
    }

    /// Rests if `consumer` has read everything of `tpl`'s partitions, then
    /// resumes them and wakes their brokers.
    pub(crate) fn idle<C: rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) {
        if self.pause.is_zero()
            || tpl.count() == 0
            || !caught_up(consumer, &self.ends)
            || consumer.pause(tpl).is_err()
        {
            return;
        }
        std::thread::sleep(self.pause);
        if consumer.resume(tpl).is_err() {
            return;
        }
        let mut ask = TopicPartitionList::new();
        for e in tpl.elements() {
            // A timestamp of -1 (`Offset::End`) asks for the end: the last
            // stable offset for a read_committed reader.
            let _ = ask.add_partition_offset(e.topic(), e.partition(), Offset::End);
        }
        self.ends.clear();
        if let Ok(ends) = consumer.offsets_for_times(ask, WAKE_TIMEOUT) {
            for e in ends.elements() {
                if let Offset::Offset(o) = e.offset() {
                    self.ends.push((e.topic().to_string(), e.partition(), o));
                }
            }
        }
        self.woke = true;
    }

    /// How long the next poll waits.
    pub(crate) fn poll_timeout<C: rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Duration {
        if std::mem::take(&mut self.woke) && caught_up(consumer, &self.ends) {
            POLL_AFTER_REST
        } else {
            POLL
        }
    }
}

/// The low and high watermarks the client cached from its last fetch of a
/// partition (librdkafka's `rd_kafka_get_watermark_offsets`, which rdkafka
/// does not wrap): no request to the broker, unlike `fetch_watermarks`.
#[allow(unsafe_code)]
fn cached_watermarks<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut lo, mut hi) = (-1i64, -1i64);
    // SAFETY: the handle is valid while `client` lives (borrowed for the
    // call); `topic` is NUL-terminated and outlives the call; `lo` and `hi`
    // are valid for writes. The function only reads cached partition state.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut lo,
            &mut hi,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && hi >= 0)
        .then_some((lo, hi))
}

/// Every partition of `consumer` read to its end: the end it cached, or a
/// later one in `ends`.
fn caught_up<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    ends: &[(String, i32, i64)],
) -> bool {
    let Ok(pos) = consumer.position() else {
        return false;
    };
    pos.elements().iter().all(|e| {
        let Some((lo, cached)) = cached_watermarks(consumer.client(), e.topic(), e.partition())
        else {
            return false;
        };
        let hi = ends
            .iter()
            .find(|(t, p, _)| t == e.topic() && *p == e.partition())
            .map_or(cached, |&(_, _, end)| end.max(cached));
        match e.offset() {
            Offset::Offset(o) => o >= hi - 1,
            // Nothing read yet: caught up only when there is nothing.
            _ => hi <= lo,
        }
    })
}

/// Applies one record (key, value); an error is logged and the record
/// skipped.
pub type ApplyRecord<'a> = dyn FnMut(&[u8], Option<&[u8]>) -> Result<(), String> + 'a;

/// Reads every partition of `topic` from the beginning, `read_committed`,
/// into `apply`, until `stop`; survives broker outages and the stalls
/// described at [`STALL`]. `what` names the reader in its group id and logs.
pub fn read_committed(
    settings: &Settings,
    topic: &str,
    what: &'static str,
    pause: Duration,
    stop: &AtomicBool,
    apply: &mut ApplyRecord<'_>,
) -> Result<(), Error> {
    let mut at = Positions::default();
    while !stop.load(Relaxed) {
        match session(settings, topic, what, pause, apply, stop, &mut at) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(topic, error = %e, "{what} reader failed; starting again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

/// A partition whose readable end moved past the reader's position but
/// that delivered nothing for this long is read on by a new consumer from
/// that position: a transaction left open by a crashed producer holds
/// read_committed readers until it is aborted, and a reader that polled
/// meanwhile was seen (on a test broker) never to move again. Transaction
/// markers also take offsets, so a caught-up reader sits below the end:
/// one new consumer per end offset, not a loop.
const STALL: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_secs(10);

/// Where a reader stands, kept across its sessions: the next offset per
/// partition, and per partition where and when it last found itself
/// stalled.
#[derive(Default)]
struct Positions {
    next: HashMap<i32, i64>,
    stalled_at: HashMap<i32, (i64, i64, Instant)>,
}

fn session(
    settings: &Settings,
    topic: &str,
    what: &'static str,
    pause: Duration,
    apply: &mut ApplyRecord<'_>,
    stop: &AtomicBool,
    reader: &mut Positions,
) -> Result<(), Error> {
    let Positions {
        next: positions,
        stalled_at,
    } = reader;
    let cfg = settings.client_config(&[
        (
            "group.id",
            format!("{}-{what}-{}", settings.group_id, settings.node_id),
        ),
        ("isolation.level", "read_committed".into()),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        ("enable.partition.eof", "false".into()),
    ]);
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|source| Error::Client { what, source })?;
    let n = crate::partition_count(consumer.client(), topic)?;
    let mut tpl = TopicPartitionList::new();
    // Always from the beginning: a reader placed in the middle of a
    // partition after an aborted transaction was seen (on a test broker)
    // to stay stuck; records already applied are skipped below.
    for p in 0..n as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|source| Error::Client { what, source })?;
    }
    consumer
        .assign(&tpl)
        .map_err(|source| Error::Client { what, source })?;
    // A new session reads from the beginning; what an earlier one applied
    // is skipped by position (a delta applied twice would count twice).
    let mut last_progress: HashMap<i32, Instant> = HashMap::new();
    let mut last_check = Instant::now();
    let mut rest = Rest::new(pause);
    while !stop.load(Relaxed) {
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            for p in 0..n as i32 {
                let at = positions.get(&p).copied().unwrap_or(0);
                let since = *last_progress.entry(p).or_insert_with(Instant::now);
                if since.elapsed() < STALL {
                    continue;
                }
                // Quiet for a while below the readable end: once per
                // position, and again every RETRY while the end moves, read
                // the topic again with a new consumer.
                let Ok((_, hi)) = consumer.fetch_watermarks(topic, p, Duration::from_millis(500))
                else {
                    continue;
                };
                let again = stalled_at
                    .get(&p)
                    .is_none_or(|(a, h, t)| *a != at || (*h != hi && t.elapsed() >= RETRY));
                let more = hi > at && again;
                if more {
                    stalled_at.insert(p, (at, hi, Instant::now()));
                }
                if more {
                    tracing::debug!(
                        topic,
                        partition = p,
                        at,
                        "{what} reader quiet below the end; reading on with a new consumer"
                    );
                    return Ok(());
                }
            }
        }
        let Some(msg) = consumer.poll(rest.poll_timeout(&consumer)) else {
            rest.idle(&consumer, &tpl);
            continue;
        };
        let msg = msg.map_err(|source| Error::Client { what, source })?;
        let p = msg.partition();
        if msg.offset() < positions.get(&p).copied().unwrap_or(0) {
            continue;
        }
        positions.insert(p, msg.offset() + 1);
        last_progress.insert(p, Instant::now());
        let Some(key) = msg.key() else { continue };
        if let Err(e) = apply(key, msg.payload()) {
            tracing::warn!(
                topic,
                partition = msg.partition(),
                offset = msg.offset(),
                error = %e,
                "{what} reader: skipped an unreadable record"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(next_offset: u64) -> PartitionState {
        PartitionState {
            next_offset,
            replay_from: 0,
            node: "n1".into(),
            committed_at: 0,
            watermarks: Vec::new(),
            counted: 0,
            duplicates: 0,
            late: 0,
            clocks: Vec::new(),
            raw_from: next_offset,
            last_message_ms: None,
            cut: Millis::MIN,
        }
    }

    fn replaced(at: u64, seq: u32, path: &str) -> codec::Replaced {
        codec::Replaced {
            partition: 3,
            at,
            seq,
            removed: vec![path.into()],
            added: None,
        }
    }

    /// Commits `records` of partition 3 as one transaction at `at`.
    fn commit(view: &Materialized, at: u64, records: &[codec::Replaced]) {
        for r in records {
            view.apply(&codec::replace_key(r), Some(&codec::replace_value(r)))
                .unwrap();
        }
        view.apply(&codec::state_key(3), Some(&codec::state_value(&state(at))))
            .unwrap();
    }

    #[test]
    fn restores_carry_the_last_replaced_files_key() {
        // A new owner numbers its replaced-files records on from the last
        // one committed (an idle partition's records share an offset).
        let view = Materialized::new(Arc::new(RwLock::new(RollupStore::new())));
        let last = |p: u32| {
            view.restore_stale(p, |_| HashMap::new())
                .and_then(|r| r.last_replace)
        };
        assert_eq!(last(3), None);
        commit(&view, 10, &[replaced(10, 0, "a"), replaced(10, 1, "b")]);
        assert_eq!(last(3), Some((10, 1)));
        assert_eq!(last(4), None, "another partition");
        commit(&view, 10, &[replaced(10, 2, "c")]);
        assert_eq!(last(3), Some((10, 2)));
        // Records read but not yet committed by a state do not count.
        view.apply(
            &codec::replace_key(&replaced(10, 3, "d")),
            Some(&codec::replace_value(&replaced(10, 3, "d"))),
        )
        .unwrap();
        assert_eq!(last(3), Some((10, 2)));
    }
}
