//! The node's member of the consumer group over the events topic.
//!
//! One thread: it polls the consumer, applies each message to the
//! processor of its partition, and every commit interval writes one Kafka
//! transaction holding, per partition that moved, what its events added to
//! each minute (deltas; a final minute's whole value, replacing them), the
//! late events, and the partition's state
//! (next offset, clocks, where a new owner re-reads from), together with
//! the consumed offsets (`send_offsets_to_transaction`, which also fences a
//! member the group has moved on from).
//!
//! Failure handling is crash-only: a revoke aborts the open transaction
//! and drops every partition processor; any error of the consumer or the
//! transactional producer ends the session (the consumer leaves the group,
//! the open transaction is aborted by the broker or fenced by the next
//! `init_transactions` of the same transactional id) and a new session
//! restores each assigned partition from the last committed transaction,
//! exactly as a different node would.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, error::KafkaError};
use tally_ingest::{BodyError, Format, Parsed, Parser, Tenancy};
use tally_store::Agg;
use tally_stream::{Dlq, DlqBody, DlqEntry, DlqKind, Processor, RecordRef, StreamConfig};
use tally_types::bin::{Dec, Enc};
use tally_types::time::{HOUR_MS, MINUTE_MS, Millis, align_down};

use crate::codec::{self, AggKey, PartitionState};
use crate::materialize::{Materialized, Published, Restored};
use crate::raw::{RawBuf, RawSink};
use crate::{BACKFILL_HEADER, Error, Settings};

/// What the worker needs from the node that runs it.
#[derive(Clone)]
pub struct Hooks {
    /// Event-time settings of every partition processor.
    pub stream: StreamConfig,
    /// A parser for one message, given the message's timestamp (the
    /// future-skew limit is judged against it, so a re-read decides the
    /// same).
    pub make_parser: Arc<dyn Fn(Millis) -> Parser + Send + Sync>,
    /// Messages (or events in them) that failed validation, once the
    /// transaction that wrote them to the malformed topic committed.
    pub on_malformed: Arc<dyn Fn(Vec<DlqEntry>) + Send + Sync>,
    /// The wall clock (lag in seconds).
    pub now_ms: Arc<dyn Fn() -> Millis + Send + Sync>,
    /// Where raw events are sealed (None: raw events are not kept).
    pub raw: Option<crate::raw::RawSink>,
    /// Minutes older than this (wall clock) are published as deltas only
    /// and folded into hours by readers (0: minutes are kept).
    pub minute_retention_ms: Millis,
    /// Turns a binary message value (first byte 0: Confluent-framed Avro)
    /// into NDJSON events (None: such values are malformed).
    pub decode_binary: Option<DecodeFn>,
    /// Each partition processor builds its sessions (gap, most sessions
    /// held) and publishes the closed ones its events change (None: off).
    pub sessions: Option<(Millis, usize)>,
}

/// See [`Hooks::decode_binary`].
pub type DecodeFn = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, String> + Send + Sync>;

/// One owned partition, as `/metrics` and `/api/v1/status` show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartStatus {
    pub next_offset: u64,
    /// The partition's end (high watermark) when last asked.
    pub end_offset: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
    /// Still re-reading events to rebuild dedupe entries.
    pub restoring: bool,
}

/// The worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub parts: Mutex<BTreeMap<u32, PartStatus>>,
    pub rebalances: AtomicU64,
    pub commits: AtomicU64,
    pub aborts: AtomicU64,
    pub sessions: AtomicU64,
    pub messages: AtomicU64,
    pub counted: AtomicU64,
    pub duplicates: AtomicU64,
    pub late: AtomicU64,
    pub malformed: AtomicU64,
    pub aggregates_produced: AtomicU64,
    pub restored_events: AtomicU64,
    /// Archive files written by seals of raw events.
    pub raw_files: AtomicU64,
    /// Archive files merged away by compaction, and removed by retention.
    pub files_compacted: AtomicU64,
    pub files_expired: AtomicU64,
    /// Archive files no transaction listed, deleted by sweeps.
    pub files_swept: AtomicU64,
    /// Aggregate records written as further parts of a value too large
    /// for one record ([`MAX_VALUE_BYTES`]).
    pub aggregate_parts: AtomicU64,
    /// Wall time from a message's timestamp to its handling here.
    pub consume_delay: tally_types::histogram::Histogram,
    /// From the start of a transaction's records to the worker seeing it
    /// committed.
    pub commit_latency: tally_types::histogram::Histogram,
    /// The last session error, if the worker is between sessions.
    pub last_error: Mutex<Option<String>>,
}

/// Runs sessions until `stop`.
pub fn run(
    settings: Settings,
    hooks: Hooks,
    view: Arc<Materialized>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(500);
    while !stop.load(Relaxed) {
        stats.sessions.fetch_add(1, Relaxed);
        match session(&settings, &hooks, &view, &stats, &stop) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "kafka worker session ended; restoring from the last committed transaction");
                *stats.last_error.lock() = Some(e.to_string());
                stats.parts.lock().clear();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

enum Rebal {
    Assigned(Vec<Part>),
    Revoked,
}

struct Ctx {
    settings: Settings,
    hooks: Hooks,
    view: Arc<Materialized>,
    events: Mutex<Vec<Rebal>>,
    /// The transaction commit under way, if any.
    committing: Mutex<Committing>,
}

/// A transaction's commit runs on a thread of its own while the worker
/// goes on reading and applying messages (it produces nothing until the
/// commit is settled): on a broker where a commit takes 100 ms, the worker
/// used to stand still for it every commit interval.
#[derive(Default)]
struct Committing {
    thread: Option<std::thread::JoinHandle<Result<Duration, KafkaError>>>,
    /// How the commit ended, once waited for (its time, or the error).
    result: Option<Result<Duration, KafkaError>>,
}

impl Committing {
    /// Waits for the commit under way (if `block`, or if it is done).
    fn wait(&mut self, block: bool) {
        if !block && !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        if let Some(t) = self.thread.take() {
            self.result = Some(t.join().unwrap_or(Err(KafkaError::Canceled)));
        }
    }
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(&self, c: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        // Partitions are given up (and offsets read for new ones) only
        // once this node's last commit has ended: a new owner must restore
        // from it, not from the one before.
        self.committing.lock().wait(true);
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                tracing::warn!(?err, "rebalance error");
            }
            self.events.lock().push(Rebal::Revoked);
            let _ = c.unassign();
            return;
        }
        let committed = c
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .ok();
        let topic = self.settings.topic_events.clone();
        let ids: Vec<i32> = tpl
            .elements_for_topic(&topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let mut parts = Vec::new();
        for p in ids {
            let c_off = committed
                .as_ref()
                .and_then(|l| l.find_partition(&topic, p))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o as u64),
                    _ => None,
                });
            let part = Part::restore(p as u32, c_off, &self.hooks, &self.view, RESTORE_WAIT);
            let start = match &part.waiting {
                Some(w) => Offset::Offset(w.committed as i64),
                None if part.start == 0 => Offset::Beginning,
                None => Offset::Offset(part.start as i64),
            };
            let _ = tpl.set_partition_offset(&topic, p, start);
            parts.push(part);
        }
        if let Err(e) = c.assign(tpl) {
            tracing::warn!(error = %e, "assigning partitions failed");
        }
        // A waiting partition fetches nothing until it is restored (and one
        // paused in an earlier assignment fetches again).
        let (mut waiting, mut going) = (TopicPartitionList::new(), TopicPartitionList::new());
        for part in &parts {
            match part.waiting {
                Some(_) => waiting.add_partition(&topic, part.id as i32),
                None => going.add_partition(&topic, part.id as i32),
            };
        }
        if waiting.count() > 0
            && let Err(e) = c.pause(&waiting)
        {
            tracing::warn!(error = %e, "pausing waiting partitions failed");
        }
        if going.count() > 0
            && let Err(e) = c.resume(&going)
        {
            tracing::warn!(error = %e, "resuming assigned partitions failed");
        }
        self.events.lock().push(Rebal::Assigned(parts));
    }
}

/// The processor of one owned partition.
struct Part {
    id: u32,
    proc: Processor,
    /// Where consumption starts (the replay-from offset of the state).
    start: u64,
    /// Events before this offset were applied by the last committed
    /// transaction: they only rebuild dedupe entries.
    restore_until: u64,
    /// The next offset to handle.
    next_offset: u64,
    /// Per clock (live, then backfill) and tenant: the first offset that
    /// wrote a dedupe entry in each minute (what a new owner must re-read).
    lows: [HashMap<Box<str>, BTreeMap<Millis, u64>>; 2],
    /// Handled anything since the last commit.
    dirty: bool,
    last_ts: Millis,
    counts: (u64, u64, u64),
    /// Raw events kept since the last seal, and the offset they start at
    /// (every kept event before it is in committed archive files).
    raw: RawBuf,
    raw_from: u64,
    /// Where the rows in `raw` start: the end of the seal in flight, if
    /// any, else `raw_from`.
    buf_from: u64,
    /// Raw rows being written as archive files on a thread of their own
    /// (the worker goes on meanwhile); the transaction after it ended
    /// lists the files and moves `raw_from` past them.
    sealing: Option<Sealing>,
    /// A compaction round under way, off the worker thread.
    compacting: Option<Compacting>,
    /// The key (offset, sequence number) of the last replaced-files record
    /// this partition's owners sent: the next one at the same offset (an
    /// idle partition) takes the next number.
    last_replace: Option<(u64, u32)>,
    /// Malformed-DLQ entries of messages since the last commit.
    malformed: Vec<DlqEntry>,
    /// Replayed late events since the last commit: late-topic key and
    /// the record saying how it went.
    replayed: Vec<(String, String)>,
    /// The events of the correction message being applied.
    pending_replays: Vec<(String, String)>,
    /// Final minutes evicted at a commit (the commit's next offset, and
    /// their buckets), kept until the view has applied that commit: a
    /// backfill or a correction that reopens one adds to this value, which
    /// the view may not have yet.
    evicted: VecDeque<(u64, HashMap<BucketKey, Agg>)>,
    /// Minutes before this are published as deltas only (see
    /// `codec::PartitionState::cut`).
    cut: Millis,
    /// Per bucket held from the cut on: the deltas (at, seq) published
    /// since its last whole value, which its next whole value replaces
    /// (tombstones; see [`Part::publish`]).
    outstanding: HashMap<BucketKey, Outstanding>,
    /// The next offset of this owner's last committed state.
    committed: Option<u64>,
    /// When the partition's archive files were last looked at for
    /// compaction and retention.
    last_compact: Instant,
    /// The last sweep for orphaned files (or when the partition came to
    /// this owner).
    last_sweep: Instant,
    /// Raw events are kept (an archive is configured).
    raw_enabled: bool,
    /// The processor store's version up to which its session changes
    /// were published.
    sessions_told: u64,
    /// The group's committed offset the view has not reached yet: the
    /// partition is not processed until it has.
    waiting: Option<Waiting>,
}

/// A partition waiting for the view to read the state that committed the
/// group's offset.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    committed: u64,
    /// The partition's state in the view when last seen, and since when it
    /// has not moved.
    view_at: Option<u64>,
    still_since: Instant,
}

/// What a waiting partition does next.
#[derive(Debug, PartialEq, Eq)]
enum WaitOutcome {
    /// The view holds the committed state: restore from it.
    Ready,
    /// Wait on (the view is still reading towards it).
    Wait,
    /// The view's state of the partition stood still for [`WAIT_LIMIT`]
    /// short of the committed offset: the state that committed it is not
    /// coming (the aggregates topic lost it), restore from what there is.
    GiveUp,
}

impl Waiting {
    fn new(committed: u64, view_at: Option<u64>, now: Instant) -> Waiting {
        Waiting {
            committed,
            view_at,
            still_since: now,
        }
    }

    /// Judges the wait given where the view's state of the partition is
    /// now. A view that moves, however slowly (reading a long backlog of
    /// the aggregates topic), restarts the clock: giving up on it would
    /// publish the work between its state and the committed one twice,
    /// once by the old owner's transactions the view has still to read
    /// and once by this node processing it again.
    fn judge(&mut self, view_at: Option<u64>, now: Instant) -> WaitOutcome {
        if view_at.is_some_and(|a| a >= self.committed) {
            return WaitOutcome::Ready;
        }
        if view_at != self.view_at {
            self.view_at = view_at;
            self.still_since = now;
            return WaitOutcome::Wait;
        }
        if now.duration_since(self.still_since) >= WAIT_LIMIT {
            WaitOutcome::GiveUp
        } else {
            WaitOutcome::Wait
        }
    }
}

type BucketKey = (Box<str>, Millis, Box<str>);

/// Records for the aggregates topic: key, and value (`None`: a tombstone).
type Records = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A bucket is published whole rather than as a delta while its whole
/// value holds at most this many times the delta's events (in a backlog
/// a minute spans few commits: a larger ratio rewrites more than it
/// saves)...
const WHOLE_OVER_DELTA: u64 = 2;

/// ... or at most this many events: a small whole value costs no more
/// than a delta and the tombstone it needs later.
const SMALL_WHOLE: u64 = 32;

/// A bucket is published whole once this many deltas wait for a whole
/// value (the worker and every view remember them; its whole value
/// tombstones them).
const MAX_DELTAS: usize = 64;

/// The largest value of one aggregate record, uncompressed. An aggregate
/// past it (many dimension combinations, each with its users' hashes) is
/// written as several records split by combination
/// ([`codec::agg_values`]): brokers refuse a record batch past their
/// `max.message.bytes` (1 MB by default, compressed), and a refused record
/// aborts the transaction, every retry of it the same — the partition
/// would stop for good.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// The deltas a bucket's next whole value replaces.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outstanding {
    /// Their keys (at, seq), in the order written.
    keys: Vec<(u64, u32)>,
    /// The commits that wrote them ([`MAX_DELTAS`] counts these: one
    /// commit's delta split into parts is one delta).
    commits: usize,
}

impl Outstanding {
    /// Deltas as a view holds them (see [`Materialized::value_of`]).
    fn restored(keys: Vec<(u64, u32)>) -> Outstanding {
        let mut ats: Vec<u64> = keys.iter().map(|k| k.0).collect();
        ats.sort_unstable();
        ats.dedup();
        Outstanding {
            commits: ats.len(),
            keys,
        }
    }

    /// Deltas `seqs` of the commit at `at`.
    fn add(&mut self, at: u64, seqs: std::ops::Range<u32>) {
        if seqs.is_empty() {
            return;
        }
        if self.keys.last().is_none_or(|k| k.0 != at) {
            self.commits += 1;
        }
        self.keys.extend(seqs.map(|s| (at, s)));
    }
}

/// Writes `values` as deltas of bucket `k` in the commit at `at`, keyed
/// after `seq`; answers their sequence numbers.
fn delta_records(
    out: &mut Records,
    partition: u32,
    at: u64,
    seq: &mut u32,
    k: &BucketKey,
    values: impl IntoIterator<Item = Vec<u8>>,
) -> std::ops::Range<u32> {
    let first = *seq + 1;
    for v in values {
        *seq += 1;
        out.push((delta_key(partition, at, *seq, k), Some(v)));
    }
    first..*seq + 1
}

/// A bucket's whole value, and tombstones for the deltas `outstanding`
/// holds for it (which it replaces). A value too large for one record
/// continues in deltas of this commit (`at`, after `seq`), which the
/// bucket's next whole value replaces in turn. Answers how many records
/// past the first the value took.
#[allow(clippy::too_many_arguments)]
fn whole_record(
    out: &mut Records,
    outstanding: &mut HashMap<BucketKey, Outstanding>,
    partition: u32,
    at: u64,
    seq: &mut u32,
    k: &BucketKey,
    agg: &Agg,
) -> u64 {
    let mut values = codec::agg_values(agg, MAX_VALUE_BYTES).into_iter();
    out.push((
        codec::agg_key(&AggKey {
            partition,
            minute: k.1,
            tenant: k.0.clone(),
            event_type: k.2.clone(),
        }),
        values.next(),
    ));
    for (a, s) in outstanding.remove(k).map(|o| o.keys).unwrap_or_default() {
        out.push((delta_key(partition, a, s, k), None));
    }
    let rest = delta_records(out, partition, at, seq, k, values);
    let extra = rest.len() as u64;
    if extra > 0 {
        outstanding.entry(k.clone()).or_default().add(at, rest);
    }
    extra
}

/// The key of the next replaced-files record of a partition at offset `at`
/// after the record keyed `last`: keys must be new, or compaction of the
/// topic would drop an earlier record, and an idle partition's offset
/// stays the same from one round of archive retention to the next.
fn next_replace_key(last: Option<(u64, u32)>, at: u64) -> (u64, u32) {
    match last {
        Some((a, seq)) if a == at => (at, seq + 1),
        _ => (at, 0),
    }
}

/// The key of delta `seq` of bucket `k` in the commit at `at`.
fn delta_key(partition: u32, at: u64, seq: u32, k: &BucketKey) -> Vec<u8> {
    codec::delta_key(&codec::DeltaKey {
        partition,
        at,
        seq,
        minute: k.1,
        tenant: k.0.clone(),
        event_type: k.2.clone(),
    })
}

/// Archive work of a partition on a thread of its own (with a tokio
/// runtime for the object store), which the worker collects at a commit.
struct ArchiveJob<T> {
    /// The archive written to, and what the job does (for errors).
    archive: String,
    what: &'static str,
    thread: std::thread::JoinHandle<Result<T, Error>>,
}

impl<T: Send + 'static> ArchiveJob<T> {
    fn spawn(
        name: &str,
        what: &'static str,
        sink: &RawSink,
        work: impl FnOnce(&tokio::runtime::Runtime) -> Result<T, Error> + Send + 'static,
    ) -> Result<ArchiveJob<T>, Error> {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::Thread)?;
                work(&rt)
            })
            .map_err(Error::Thread)?;
        Ok(ArchiveJob {
            archive: sink.archive.describe.clone(),
            what,
            thread,
        })
    }

    /// Whether the job is to be collected now: it ended, or the caller
    /// waits for it.
    fn ready(&self, wait: bool) -> bool {
        wait || self.thread.is_finished()
    }

    /// Its outcome, once it ends.
    fn join(self) -> Result<T, Error> {
        let (archive, what) = (self.archive, self.what);
        self.thread.join().map_err(|_| Error::Archive {
            archive,
            what: format!("the thread {what} panicked"),
        })?
    }
}

/// A compaction round of a partition's archive files under way: the
/// files each merge replaced and the merged file, and the files past
/// retention (nothing added).
type Compacting = ArchiveJob<Round>;

/// What one compaction round did: files replaced (merged or expired), and
/// orphans deleted.
#[derive(Default)]
struct Round {
    replaced: Vec<Replacement>,
    swept: u64,
}

/// Files removed from a partition's listing, and the file added in their
/// place (none: they expired).
type Replacement = (Vec<String>, Option<crate::raw::Listed>);

/// A seal of the raw rows of offsets `[from, to)` under way.
struct Sealing {
    from: u64,
    to: u64,
    job: ArchiveJob<Vec<codec::SealedFile>>,
}

impl Part {
    /// A partition this node was just given: restored from the state that
    /// committed the group's offset `committed`, waiting at most `wait`
    /// for the view to read it. If it has not, the partition waits
    /// ([`Part::waiting`]): nothing of it is processed or committed until
    /// the view catches up (see [`Session::resume_waiting`]).
    fn restore(
        id: u32,
        committed: Option<u64>,
        hooks: &Hooks,
        view: &Materialized,
        wait: Duration,
    ) -> Part {
        let mut part = Part::empty(id, hooks);
        let mut clocks_ok = true;
        // The clocks are imported under the view's lock, where they decide
        // which of the partition's minutes can still change and are loaded.
        let restored = view.restore(id, committed, wait, |state| {
            part.import_clocks(state, &mut clocks_ok)
        });
        match restored {
            Restored::Ready(r) if clocks_ok => part.load(r),
            Restored::Ready(_) => {}
            Restored::Fresh => {}
            Restored::Behind { at } => {
                let c = committed.unwrap_or(0);
                tracing::info!(
                    partition = id,
                    committed = c,
                    view_at = at,
                    "the aggregates topic has not caught up with the committed offset (an open transaction of a stopped node holds it back until the broker aborts it); the partition waits for it"
                );
                part.waiting = Some(Waiting::new(c, at, Instant::now()));
            }
        }
        part
    }

    /// A waiting partition whose wait ran out: restored from the last
    /// state the view read, at the risk of work done twice.
    fn restore_stale(id: u32, hooks: &Hooks, view: &Materialized) -> Part {
        let mut part = Part::empty(id, hooks);
        let mut clocks_ok = true;
        let restored = view.restore_stale(id, |state| part.import_clocks(state, &mut clocks_ok));
        match restored {
            Some(r) if clocks_ok => part.load(r),
            _ => {}
        }
        part
    }

    fn empty(id: u32, hooks: &Hooks) -> Part {
        let mut cfg = hooks.stream.clone();
        cfg.partitions = 1;
        let mut proc = Processor::new(cfg, Arc::default(), Arc::new(Mutex::new(Dlq::new(1))));
        proc.own_partition();
        proc.set_capture(hooks.raw.is_some());
        if let Some((gap, most)) = hooks.sessions {
            proc.store().write().sessions_mut().enable(gap, most);
        }
        Part {
            id,
            proc,
            start: 0,
            restore_until: 0,
            next_offset: 0,
            lows: Default::default(),
            dirty: false,
            last_ts: Millis::MIN,
            counts: (0, 0, 0),
            raw: RawBuf::default(),
            raw_from: 0,
            buf_from: 0,
            sealing: None,
            compacting: None,
            last_replace: None,
            raw_enabled: hooks.raw.is_some(),
            sessions_told: 0,
            malformed: Vec::new(),
            replayed: Vec::new(),
            pending_replays: Vec::new(),
            evicted: VecDeque::new(),
            cut: Millis::MIN,
            outstanding: HashMap::new(),
            committed: None,
            last_compact: Instant::now(),
            last_sweep: Instant::now(),
            waiting: None,
        }
    }

    /// Imports a state's clocks; answers, per tenant, the first minute
    /// whose aggregates are loaded (minutes behind the cut are not held:
    /// what comes for them is published as a delta).
    fn import_clocks(&mut self, state: &PartitionState, ok: &mut bool) -> HashMap<String, Millis> {
        if let Err(e) = self.proc.import_clocks(&mut Dec::new(&state.clocks)) {
            tracing::error!(partition = self.id, error = %e, "partition state unreadable; processing the partition again from its start");
            *ok = false;
            return HashMap::new();
        }
        state
            .watermarks
            .iter()
            .map(|(t, _)| (t.clone(), self.proc.mutable_from(t).max(state.cut)))
            .collect()
    }

    fn load(&mut self, r: crate::materialize::Restore) {
        {
            let mut st = self.proc.store().write();
            for (k, p) in r.values {
                st.set_agg(&k.0, k.1, &k.2, p.agg);
                if !p.deltas.is_empty() {
                    self.outstanding.insert(k, Outstanding::restored(p.deltas));
                }
            }
            // Sessions are rebuilt from the events handled from here on:
            // the earlier ones (replayed for dedupe only) are not in them,
            // so no change is told for sessions before each clock.
            for (t, w) in &r.state.watermarks {
                if let Some(w) = w {
                    st.sessions_mut().raise_floor(t, *w);
                }
            }
            st.commit();
            st.take_deltas();
        }
        self.start = r.state.replay_from.min(r.state.next_offset);
        self.raw_from = r.state.raw_from.min(r.state.next_offset);
        self.buf_from = self.raw_from;
        if self.raw_enabled {
            // The unsealed raw events are rebuilt too.
            self.start = self.start.min(self.raw_from);
        }
        self.restore_until = r.state.next_offset;
        self.next_offset = self.start;
        self.counts = (r.state.counted, r.state.duplicates, r.state.late);
        self.cut = r.state.cut;
        self.last_replace = r.last_replace;
        self.committed = Some(r.state.next_offset);
        tracing::info!(
            partition = self.id,
            next_offset = r.state.next_offset,
            replay_from = self.start,
            from_node = %r.state.node,
            raw_from = self.raw_from,
            "restoring partition"
        );
    }

    /// Hands the raw rows to a thread that writes them as archive files
    /// (Parquet and zstd take a while: half a second for 5 s of 100k
    /// events/s, which held up every event behind them on the worker).
    fn start_seal(&mut self, sink: &RawSink, files_as: &str) -> Result<(), Error> {
        let mut buf = std::mem::take(&mut self.raw);
        let (from, to) = (self.buf_from, self.next_offset);
        self.buf_from = to;
        let (files_as, id, owned) = (files_as.to_string(), self.id, sink.clone());
        let job = ArchiveJob::spawn("tally-kafka-seal", "sealing raw events", sink, move |rt| {
            buf.seal(&owned, rt, &files_as, id, from, to)
        })?;
        self.sealing = Some(Sealing { from, to, job });
        Ok(())
    }

    /// The seal under way once it ended (or, if `wait`, when it ends):
    /// the files to list in the next transaction.
    fn finish_seal(&mut self, wait: bool) -> Result<Option<codec::Sealed>, Error> {
        let Some(s) = self.sealing.take_if(|s| s.job.ready(wait)) else {
            return Ok(None);
        };
        let files = s.job.join()?;
        self.raw_from = s.to;
        Ok(Some(codec::Sealed {
            partition: self.id,
            from: s.from,
            to: s.to,
            files,
        }))
    }

    /// Starts a round of compaction and retention of the partition's
    /// committed archive files on a thread of its own (merging takes
    /// seconds at times, and the worker would hold its transaction open,
    /// and every event behind it, meanwhile). Planned from the view's
    /// listing once the view has this owner's last commit, so nothing in
    /// flight is merged or removed twice; the next round starts only after
    /// this one's records are committed and read back. A sweep for
    /// orphaned files goes with the round when one is due; `keep`: the
    /// files this owner replaced and has still to delete.
    fn start_compaction(
        &mut self,
        sink: &RawSink,
        view: &Materialized,
        files_as: &str,
        now: Millis,
        keep: impl FnOnce() -> std::collections::HashSet<String>,
    ) -> Result<(), Error> {
        // The view has read this owner's last commit: its listing is the
        // partition's, whole.
        if self
            .committed
            .is_some_and(|c| view.next_offset_of(self.id) != Some(c))
        {
            return Ok(());
        }
        let files = view.files_of(self.id);
        let plan = crate::raw::plan(&files, sink, now);
        let sweep = match view.raw_from_of(self.id) {
            Some(raw_from) if self.last_sweep.elapsed() >= sink.sweep_every() => {
                self.last_sweep = Instant::now();
                Some(crate::raw::Sweep {
                    listed: files.into_iter().map(|(_, _, f)| f.path).collect(),
                    keep: keep(),
                    raw_from,
                    changed_before: tally_types::Clock::system()
                        .now_ms()
                        .saturating_sub(sink.orphan_age.as_millis() as Millis),
                })
            }
            _ => None,
        };
        if plan.merges.is_empty() && plan.expired.is_empty() && sweep.is_none() {
            return Ok(());
        }
        let (files_as, id, owned) = (files_as.to_string(), self.id, sink.clone());
        let job = ArchiveJob::spawn(
            "tally-kafka-compact",
            "compacting archive files",
            sink,
            move |rt| {
                let mut out = Round::default();
                for group in &plan.merges {
                    match crate::raw::merge(&owned, rt, &files_as, id, group) {
                        Ok(added) => out.replaced.push((
                            group.iter().map(|e| e.2.path.clone()).collect(),
                            Some(added),
                        )),
                        Err(e) => tracing::warn!(
                            partition = id,
                            error = %e,
                            "compaction of archive files failed; retrying later"
                        ),
                    }
                }
                if !plan.expired.is_empty() {
                    out.replaced.push((plan.expired, None));
                }
                if let Some(sweep) = &sweep {
                    match crate::raw::sweep(&owned, rt, &files_as, id, sweep) {
                        Ok(n) => out.swept = n,
                        Err(e) => tracing::warn!(
                            partition = id,
                            error = %e,
                            "sweeping the archive for orphaned files failed; retrying later"
                        ),
                    }
                }
                Ok(out)
            },
        )?;
        self.compacting = Some(job);
        Ok(())
    }

    /// The compaction round under way once it ended (or, if `wait`, when
    /// it ends): the replaced-files records for the next transaction, keyed
    /// by its offset, and how many orphans the round deleted.
    fn finish_compaction(&mut self, wait: bool) -> Result<(Vec<codec::Replaced>, u64), Error> {
        let Some(job) = self.compacting.take_if(|j| j.ready(wait)) else {
            return Ok((Vec::new(), 0));
        };
        let done = job.join()?;
        let mut out = Vec::with_capacity(done.replaced.len());
        for (removed, added) in done.replaced {
            let (at, seq) = next_replace_key(self.last_replace, self.next_offset);
            self.last_replace = Some((at, seq));
            out.push(codec::Replaced {
                partition: self.id,
                at,
                seq,
                removed,
                added,
            });
        }
        Ok((out, done.swept))
    }

    /// Rebuilding from a committed state (or waiting to): nothing of the
    /// partition is committed meanwhile.
    fn restoring(&self) -> bool {
        self.waiting.is_some() || self.next_offset < self.restore_until
    }

    /// Before events that may land in final minutes (a backfill, a
    /// correction) are applied: each bucket they touch that the processor
    /// no longer holds is loaded with its published value (evicted here
    /// and not yet in the view, else the view's), so the value published
    /// next holds the old events and the new ones.
    fn reopen(&mut self, view: &Materialized, payload: &[u8]) {
        let Ok(events) = tally_types::BatchReader::new(payload) else {
            return;
        };
        let mut seen = std::collections::HashSet::new();
        let mut st = self.proc.store().write();
        for e in events.filter_map(Result::ok) {
            let m = align_down(e.ts, MINUTE_MS);
            // Behind the cut a bucket starts empty: it is published as a
            // delta to what readers hold.
            if m < self.cut
                || !seen.insert((e.tenant, m, e.event_type))
                || st.agg(e.tenant, m, e.event_type).is_some()
            {
                continue;
            }
            let k: BucketKey = (e.tenant.into(), m, e.event_type.into());
            // Evicted here: no delta waits for a whole value (the eviction
            // published it), or none ever will (behind the cut).
            let published = self
                .evicted
                .iter()
                .rev()
                .find_map(|(_, b)| {
                    b.get(&k).map(|a| Published {
                        agg: a.clone(),
                        deltas: Vec::new(),
                    })
                })
                .or_else(|| view.value_of(self.id, e.tenant, m, e.event_type));
            if let Some(p) = published {
                st.set_agg(e.tenant, m, e.event_type, p.agg);
                if !p.deltas.is_empty() {
                    self.outstanding.insert(k, Outstanding::restored(p.deltas));
                }
            }
        }
        st.commit();
    }

    /// The cut for a commit at wall time `now`: the start of the hour
    /// `minute_retention` ago, never lower than the last one.
    fn next_cut(&self, now: Millis, minute_retention: Millis) -> Millis {
        if minute_retention <= 0 {
            return self.cut;
        }
        self.cut
            .max(align_down(now.saturating_sub(minute_retention), HOUR_MS))
    }

    /// Moves the cut: the minutes behind it leave the processor (they were
    /// published whole, or as this commit's deltas), so what comes for
    /// them later is a delta.
    fn advance_cut(&mut self, cut: Millis) {
        // Behind the cut a bucket gets no whole value any more: its
        // deltas stay.
        if cut > self.cut {
            self.outstanding.retain(|k, _| k.1 >= cut);
        }
        self.cut = cut;
        let mut st = self.proc.store().write();
        if st.drop_all_minutes_before(cut) > 0 {
            st.commit();
        }
    }

    /// Takes the minutes final at this commit out of the processor (from
    /// the cut on; the caller keeps them in `evicted`), and forgets those
    /// of commits the view has applied.
    fn evict(&mut self, view: &Materialized) -> HashMap<BucketKey, Agg> {
        let seen = view.next_offset_of(self.id).unwrap_or(0);
        while self.evicted.front().is_some_and(|(at, _)| *at <= seen) {
            self.evicted.pop_front();
        }
        let mut buckets = HashMap::new();
        for (t, m, b) in self.proc.take_final() {
            if m < self.cut {
                continue;
            }
            for (ty, agg) in b.types {
                buckets.insert((t.clone(), m, ty), agg);
            }
        }
        buckets
    }

    /// The aggregate records of a commit at `next_offset`. Per bucket its
    /// events changed, what they added since the last commit (a delta,
    /// under a key unique to this commit) or, from `behind` on, its whole
    /// value with tombstones for the deltas since its last whole value:
    ///
    /// - when the bucket is final (`finals`, taken by [`Part::evict`]);
    /// - when the whole value is small ([`SMALL_WHOLE`] events) or small
    ///   beside the delta ([`WHOLE_OVER_DELTA`] times its events: a
    ///   bucket's first commits), where one record does what a delta and
    ///   its tombstone would;
    /// - when [`MAX_DELTAS`] deltas wait for one, which bounds what
    ///   readers and the worker remember per bucket and what compaction
    ///   keeps.
    ///
    /// A reader keeping the last value per key (tombstones delete) and
    /// merging a bucket's keys has its exact value after every
    /// transaction, and compaction leaves one record per final bucket.
    /// Values are `None` for tombstones. Also answers how many records
    /// past the first the values too large for one took.
    fn publish(
        &mut self,
        deltas: Vec<(BucketKey, Agg)>,
        finals: &HashMap<BucketKey, Agg>,
        behind: Millis,
    ) -> (Records, u64) {
        let at = self.next_offset;
        let store = self.proc.store().read();
        let outstanding = &mut self.outstanding;
        let id = self.id;
        let mut out = Vec::with_capacity(deltas.len());
        let (mut seq, mut split) = (0, 0);
        for (k, delta) in deltas {
            if k.1 >= behind {
                let last = finals.get(&k);
                if let Some(agg) = last.or_else(|| store.agg(&k.0, k.1, &k.2)) {
                    let waiting = outstanding.get(&k).map_or(0, |o| o.commits);
                    if last.is_some()
                        || agg.count <= SMALL_WHOLE
                        || agg.count <= WHOLE_OVER_DELTA * delta.count.max(1)
                        || waiting + 1 >= MAX_DELTAS
                    {
                        split += whole_record(&mut out, outstanding, id, at, &mut seq, &k, agg);
                        continue;
                    }
                }
            }
            let values = codec::agg_values(&delta, MAX_VALUE_BYTES);
            let seqs = delta_records(&mut out, id, at, &mut seq, &k, values);
            split += seqs.len() as u64 - 1;
            if k.1 >= behind {
                outstanding.entry(k).or_default().add(at, seqs);
            }
        }
        // Final buckets this commit did not change, with deltas waiting.
        let mut rest: Vec<&BucketKey> = finals
            .keys()
            .filter(|k| k.1 >= behind && outstanding.contains_key(*k))
            .collect();
        rest.sort_unstable();
        for k in rest {
            split += whole_record(&mut out, outstanding, id, at, &mut seq, k, &finals[k]);
        }
        (out, split)
    }

    /// The session changes the processor logged since the last call, per
    /// tenant and time told, in the order told.
    fn take_session_changes(&mut self) -> Vec<codec::SessionChanges> {
        let st = self.proc.store().read();
        let mut out: Vec<codec::SessionChanges> = Vec::new();
        for c in st.all_changes_since(self.sessions_told, usize::MAX) {
            let tally_store::Changed::Session(sc) = &c.what else {
                continue;
            };
            match out.last_mut() {
                Some(o) if *o.tenant == *c.tenant && o.at == c.at => o.changes.push((**sc).clone()),
                _ => out.push(codec::SessionChanges {
                    tenant: c.tenant.to_string(),
                    at: c.at,
                    changes: vec![(**sc).clone()],
                }),
            }
        }
        self.sessions_told = st.version();
        out
    }

    /// Notes that the record at `offset` wrote dedupe entries of a
    /// tenant's live or backfill clock from `minute` on.
    fn note_low(&mut self, backfill: bool, tenant: &str, minute: Millis, offset: u64) {
        let lows = &mut self.lows[backfill as usize];
        match lows.get_mut(tenant) {
            Some(m) => {
                m.entry(minute).or_insert(offset);
            }
            None => {
                lows.insert(tenant.into(), BTreeMap::from([(minute, offset)]));
            }
        }
    }

    /// The watermark of a tenant's live or backfill clock.
    fn watermark(&self, backfill: bool, tenant: &str) -> Option<Millis> {
        if backfill {
            self.proc.backfill_watermark(tenant)
        } else {
            self.proc.tenant_watermark(tenant)
        }
    }

    /// The earliest offset a new owner must re-read: entries of minutes no
    /// clock can change any more are dropped first.
    fn replay_from(&mut self, lateness: Millis) -> u64 {
        for backfill in [false, true] {
            let mut lows = std::mem::take(&mut self.lows[backfill as usize]);
            lows.retain(|tenant, minutes| {
                if let Some(w) = self.watermark(backfill, tenant) {
                    *minutes =
                        minutes.split_off(&(align_down(w - lateness, MINUTE_MS) - MINUTE_MS));
                }
                !minutes.is_empty()
            });
            self.lows[backfill as usize] = lows;
        }
        self.lows
            .iter()
            .flat_map(|l| l.values())
            .flat_map(|m| m.values().copied())
            .min()
            .unwrap_or(self.next_offset)
            .min(self.next_offset)
    }
}

/// A malformed-DLQ entry for something read from the events topic.
fn malformed(tenant: &str, reason: String, received_at: Millis, body: DlqBody) -> DlqEntry {
    DlqEntry {
        kind: DlqKind::Malformed,
        tenant: tenant.into(),
        reason,
        received_at,
        body,
        key: 0,
        replayed: false,
    }
}

struct Session<'a> {
    settings: &'a Settings,
    view: &'a Materialized,
    hooks: &'a Hooks,
    stats: &'a WorkerStats,
    producer: Arc<BaseProducer>,
    parts: HashMap<u32, Part>,
    /// A transaction is open: begun, and not yet committed or aborted.
    in_txn: bool,
    /// What the commit under way settles when it succeeds.
    pending: Option<Pending>,
    agg_partitions: u32,
    /// Runs the archive's writes (raw events kept).
    rt: Option<tokio::runtime::Runtime>,
    /// Files replaced by the open transaction, and by committed ones
    /// (since when): deleted once their grace has passed.
    replacing: Vec<String>,
    graves: VecDeque<(Instant, Vec<String>)>,
    /// One parser for every message (its scratch space reused), moved to
    /// each message's timestamp.
    parser: Parser,
    /// How this cluster's archive files of the events topic are named
    /// ([`crate::raw::files_as`]).
    files_as: String,
    /// How the worker rests when it has read everything.
    rest: crate::materialize::Rest,
}

/// What a transaction's commit settles once it succeeded: the partitions
/// it committed (and their next offsets), the archive files it replaced,
/// and the malformed events it wrote.
struct Pending {
    /// When the commit began (its records sent from here on), how long
    /// sending the records took, and then the offsets.
    started: Instant,
    sending: Duration,
    offsets: Duration,
    done: Vec<(u32, u64)>,
    replacing: Vec<String>,
    bad: Vec<DlqEntry>,
}

/// How often a partition's archive files are looked at for compaction
/// and retention.
const COMPACT_EVERY: Duration = Duration::from_secs(10);

fn client_err(what: &'static str) -> impl FnOnce(KafkaError) -> Error {
    move |source| Error::Client { what, source }
}

/// A failed commit: one the brokers refused for a record's size says
/// what to raise (every retry would be refused the same way).
fn commit_err(source: KafkaError, aggregates: &str) -> Error {
    if source.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
        Error::RecordTooLarge {
            aggregates: aggregates.to_string(),
            source,
        }
    } else {
        client_err("commit transaction")(source)
    }
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// Records behind a partition's end past which the worker works through a
/// backlog: freshness is lost anyway, so it commits every
/// [`BACKLOG_COMMIT_INTERVAL`] (when longer than the configured interval)
/// and spends less of its time waiting for commits.
const BACKLOG_RECORDS: u64 = 20_000;
const BACKLOG_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a caught-up worker stops fetching (added to freshness at most).
const IDLE_PAUSE: Duration = Duration::from_millis(20);

/// How long a new owner waits, inside the rebalance callback, for the
/// aggregates topic to reach the partition's committed offset; past it
/// the partition waits paused while the session goes on.
const RESTORE_WAIT: Duration = Duration::from_secs(3);

/// How long a waiting partition's state in the view may stand still short
/// of its committed offset before the partition is restored from that
/// older state. A broker aborts a dead producer's transaction, which holds
/// back read_committed readers, after `transaction.timeout.ms` (10 s
/// here), so a state that has not moved for nine times that is not coming.
const WAIT_LIMIT: Duration = Duration::from_secs(90);

fn session(
    settings: &Settings,
    hooks: &Hooks,
    view: &Arc<Materialized>,
    stats: &WorkerStats,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let pcfg = settings.client_config(&[
        (
            "transactional.id",
            format!("{}-{}", settings.group_id, settings.node_id),
        ),
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        ("linger.ms", "5".into()),
        // Aggregates carry a sketch per dimension combination: mostly
        // empty registers, which lz4 shrinks many times over; allow values
        // past librdkafka's 1 MB default (the broker's limit applies to
        // the compressed batch).
        ("compression.type", "lz4".into()),
        ("message.max.bytes", "67108864".into()),
        // A node killed mid-transaction blocks read_committed readers of
        // the partitions it wrote until the broker aborts it (or the node,
        // back with the same transactional id, fences it): keep it short.
        ("transaction.timeout.ms", "10000".into()),
    ]);
    let producer: Arc<BaseProducer> = Arc::new(
        pcfg.create()
            .map_err(client_err("transactional producer"))?,
    );
    producer
        .init_transactions(TXN_TIMEOUT)
        .map_err(client_err("init transactions"))?;
    let agg_partitions = crate::partition_count(producer.client(), &settings.topic_aggregates)?;

    let ccfg = settings.client_config(&[
        ("group.id", settings.group_id.clone()),
        // Static membership: a node back after a crash takes its old place
        // in the group at once instead of a rebalance that waits for the
        // dead member to time out. The price: a node stopped for good
        // keeps its partitions until session.timeout.ms has passed.
        ("group.instance.id", settings.node_id.clone()),
        ("isolation.level", "read_committed".into()),
        ("enable.auto.commit", "false".into()),
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", "earliest".into()),
        ("partition.assignment.strategy", "roundrobin".into()),
        ("session.timeout.ms", "10000".into()),
        // Also the rebalance timeout: how long the group waits for a member
        // that stopped (some brokers expire dead members only by it). The
        // loop polls every 20 ms; restoring a partition inside the
        // rebalance callback waits at most RESTORE_WAIT.
        ("max.poll.interval.ms", "30000".into()),
        ("heartbeat.interval.ms", "1000".into()),
        ("enable.partition.eof", "false".into()),
    ]);
    let consumer: BaseConsumer<Ctx> = ccfg
        .create_with_context(Ctx {
            settings: settings.clone(),
            hooks: hooks.clone(),
            view: view.clone(),
            events: Mutex::new(Vec::new()),
            committing: Mutex::new(Committing::default()),
        })
        .map_err(client_err("consumer"))?;
    consumer
        .subscribe(&[&settings.topic_events])
        .map_err(client_err("subscribe"))?;
    let mut s = Session {
        settings,
        view,
        hooks,
        stats,
        producer,
        parts: HashMap::new(),
        in_txn: false,
        pending: None,
        agg_partitions,
        rt: match hooks.raw {
            Some(_) => Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::Thread)?,
            ),
            None => None,
        },
        replacing: Vec::new(),
        graves: VecDeque::new(),
        rest: crate::materialize::Rest::new(IDLE_PAUSE),
        parser: (hooks.make_parser)(0),
        files_as: crate::raw::files_as(&settings.topic_events, &settings.group_id),
    };
    *stats.last_error.lock() = None;
    let result = s.run(&consumer, stop);
    // Leaving: a commit under way ends first, an open transaction is
    // aborted (what it held is processed again by the next owner), then
    // the group is left.
    let _ = s.settle(&consumer, true);
    if s.in_txn {
        let _ = s.producer.abort_transaction(TXN_TIMEOUT);
        stats.aborts.fetch_add(1, Relaxed);
    }
    s.parts.clear();
    stats.parts.lock().clear();
    consumer.unsubscribe();
    result
}

impl Session<'_> {
    fn run(&mut self, consumer: &BaseConsumer<Ctx>, stop: &AtomicBool) -> Result<(), Error> {
        let mut last_commit = Instant::now();
        let mut last_lag = Instant::now();
        let mut polls = 0u32;
        let mut interval = self.settings.commit_interval;
        while !stop.load(Relaxed) {
            let polled = consumer.poll(self.rest.poll_timeout(consumer));
            self.settle(consumer, false)?;
            self.rebalanced(consumer)?;
            self.resume_waiting(consumer)?;
            let busy = polled.is_some();
            match polled {
                Some(m) => {
                    let m = m.map_err(client_err("consume"))?;
                    self.handle(&m)?;
                }
                // Caught up: rest a little rather than fetch in a loop
                // from a broker that answers empty fetches at once.
                // Partitions waiting for their state stay paused.
                None => {
                    let mut active = TopicPartitionList::new();
                    for (id, p) in &self.parts {
                        if p.waiting.is_none() {
                            active.add_partition(&self.settings.topic_events, *id as i32);
                        }
                    }
                    self.rest.idle(consumer, &active);
                }
            }
            // While messages stream in, the clock and the producer's events
            // every few messages rather than after each one.
            polls += 1;
            if busy && polls < 16 {
                continue;
            }
            polls = 0;
            // A transaction at most every interval, and one at a time;
            // changes after a quiet spell are committed at once.
            let now = Instant::now();
            if self.pending.is_none()
                && now.duration_since(last_commit) >= interval
                && self.commit(consumer)?
            {
                last_commit = now;
            }
            if now.duration_since(last_lag) >= Duration::from_secs(1) {
                let behind = self.refresh_lag(consumer);
                interval = if behind > BACKLOG_RECORDS {
                    self.settings.commit_interval.max(BACKLOG_COMMIT_INTERVAL)
                } else {
                    self.settings.commit_interval
                };
                last_lag = Instant::now();
            }
            self.producer.poll(Duration::ZERO);
        }
        // A clean stop commits what was processed, and the seals under way.
        self.commit_with(consumer, true)?;
        self.settle(consumer, true)
    }

    /// Ends the commit under way if it is done (or waits for it, if
    /// `block`): a success marks its partitions committed, a failure ends
    /// the session.
    fn settle(&mut self, consumer: &BaseConsumer<Ctx>, block: bool) -> Result<(), Error> {
        if self.pending.is_none() {
            return Ok(());
        }
        let result = {
            let mut c = consumer.context().committing.lock();
            c.wait(block);
            c.result.take()
        };
        let Some(result) = result else {
            return Ok(());
        };
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let took = result.map_err(|e| commit_err(e, &self.settings.topic_aggregates))?;
        self.in_txn = false;
        self.stats.commits.fetch_add(1, Relaxed);
        self.stats
            .commit_latency
            .observe_us(p.started.elapsed().as_micros() as u64);
        for &(id, next) in &p.done {
            if let Some(part) = self.parts.get_mut(&id) {
                part.committed = Some(next);
            }
        }
        if !p.replacing.is_empty() {
            self.graves.push_back((Instant::now(), p.replacing));
        }
        if !p.bad.is_empty() {
            (self.hooks.on_malformed)(p.bad);
        }
        tracing::debug!(
            partitions = p.done.len(),
            sending_ms = p.sending.as_millis() as u64,
            offsets_ms = p.offsets.as_millis() as u64,
            commit_ms = took.as_millis() as u64,
            total_ms = p.started.elapsed().as_millis() as u64,
            "transaction committed"
        );
        Ok(())
    }

    fn rebalanced(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), Error> {
        let events = std::mem::take(&mut *consumer.context().events.lock());
        for ev in events {
            self.stats.rebalances.fetch_add(1, Relaxed);
            match ev {
                Rebal::Revoked => {
                    // The callback waited for the commit under way.
                    self.settle(consumer, true)?;
                    if self.in_txn {
                        self.producer
                            .abort_transaction(TXN_TIMEOUT)
                            .map_err(client_err("abort transaction"))?;
                        self.in_txn = false;
                        self.stats.aborts.fetch_add(1, Relaxed);
                    }
                    self.parts.clear();
                    self.stats.parts.lock().clear();
                }
                Rebal::Assigned(parts) => {
                    let mut st = self.stats.parts.lock();
                    for p in parts {
                        st.insert(
                            p.id,
                            PartStatus {
                                next_offset: p.restore_until,
                                restoring: p.restoring(),
                                ..PartStatus::default()
                            },
                        );
                        self.parts.insert(p.id, p);
                    }
                }
            }
        }
        Ok(())
    }

    /// Restores each waiting partition the view has caught up with (or
    /// whose state in the view stood still for [`WAIT_LIMIT`]), and starts
    /// it where its state says.
    fn resume_waiting(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<(), Error> {
        let now = Instant::now();
        let mut ready = Vec::new();
        for p in self.parts.values_mut() {
            let Some(w) = &mut p.waiting else { continue };
            match w.judge(self.view.next_offset_of(p.id), now) {
                WaitOutcome::Wait => {}
                WaitOutcome::Ready => ready.push((p.id, w.committed, true)),
                WaitOutcome::GiveUp => ready.push((p.id, w.committed, false)),
            }
        }
        for (id, committed, caught_up) in ready {
            let restored = caught_up
                .then(|| Part::restore(id, Some(committed), self.hooks, self.view, Duration::ZERO))
                .filter(|p| p.waiting.is_none());
            let part = match restored {
                Some(p) => p,
                None => {
                    tracing::error!(
                        partition = id,
                        committed,
                        view_at = self.view.next_offset_of(id),
                        "the aggregates topic holds no state of this partition at its committed offset, and the partition's state there has not moved for {WAIT_LIMIT:?} (was the topic deleted or truncated?); restoring from the last state it holds: the work since that state is processed again, and what the topic still brings of it later is counted twice"
                    );
                    Part::restore_stale(id, self.hooks, self.view)
                }
            };
            let start = if part.start == 0 {
                Offset::Beginning
            } else {
                Offset::Offset(part.start as i64)
            };
            let topic = &self.settings.topic_events;
            consumer
                .seek(topic, id as i32, start, Duration::from_secs(10))
                .map_err(client_err("seek a restored partition"))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, id as i32);
            consumer
                .resume(&tpl)
                .map_err(client_err("resume a restored partition"))?;
            if let Some(st) = self.stats.parts.lock().get_mut(&id) {
                st.next_offset = part.restore_until;
                st.restoring = part.restoring();
            }
            self.parts.insert(id, part);
        }
        Ok(())
    }

    fn begin(&mut self) -> Result<(), Error> {
        if !self.in_txn {
            self.producer
                .begin_transaction()
                .map_err(client_err("begin transaction"))?;
            self.in_txn = true;
        }
        Ok(())
    }

    fn handle(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Result<(), Error> {
        let id = m.partition() as u32;
        let offset = m.offset() as u64;
        let Some(part) = self.parts.get(&id) else {
            return Ok(());
        };
        // Already handled (or before the replay-from offset: no live entry),
        // or fetched before the partition was paused to wait.
        if offset < part.next_offset || part.waiting.is_some() {
            return Ok(());
        }
        let restoring = offset < part.restore_until;
        let Some(part) = self.parts.get_mut(&id) else {
            return Ok(());
        };
        let now = (self.hooks.now_ms)();
        let ts = m.timestamp().to_millis().unwrap_or(now);
        if !restoring {
            self.stats
                .consume_delay
                .observe_ms(now.saturating_sub(ts).max(0) as u64);
        }
        let flag = |name: &str| {
            m.headers().is_some_and(|h| {
                h.iter()
                    .any(|x| x.key == name && x.value == Some(b"1".as_slice()))
            })
        };
        let backfill = flag(BACKFILL_HEADER);
        let correction = flag(crate::CORRECTION_HEADER);
        let value = m.payload().unwrap_or_default();
        let where_ = || {
            format!(
                "kafka message {}/{}/{}",
                self.settings.topic_events, id, offset
            )
        };
        self.parser.set_now(ts);
        let parsed = parse_message(&mut self.parser, value, self.hooks.decode_binary.as_ref());
        self.stats.messages.fetch_add(1, Relaxed);
        let mut parsed = match parsed {
            Ok(p) => p,
            Err(e) => {
                if !restoring {
                    self.stats.malformed.fetch_add(1, Relaxed);
                    let raw = String::from_utf8_lossy(&value[..value.len().min(4096)]);
                    let entry = malformed(
                        "default",
                        format!("{}: {e}", where_()),
                        ts,
                        DlqBody::Raw(raw.into()),
                    );
                    part.malformed.push(entry);
                }
                part.next_offset = offset + 1;
                part.dirty |= !restoring;
                return Ok(());
            }
        };
        if !restoring && !parsed.rejected.is_empty() {
            self.stats
                .malformed
                .fetch_add(parsed.rejected_total as u64, Relaxed);
            let at = where_();
            part.malformed.extend(parsed.rejected.iter().map(|r| {
                let body = if r.is_object {
                    DlqBody::Event(r.raw.clone())
                } else {
                    DlqBody::Raw(r.raw.clone())
                };
                let reason = format!("{at}, event {}: {}", r.index, r.error);
                malformed(&r.tenant, reason, ts, body)
            }));
        }
        if let Some((_, batch)) = parsed.partitions.first_mut() {
            let batch = std::mem::take(batch);
            let payload = if correction {
                batch.finish_correction()
            } else if backfill {
                batch.finish_backfill()
            } else {
                batch.finish()
            };
            if (correction || backfill) && !restoring {
                // The buckets a correction or a backfill changes may be
                // final, so gone from the processor's store: back first,
                // or the published value would hold the new events alone.
                part.reopen(self.view, &payload);
                if correction {
                    part.pending_replays = tally_types::BatchReader::new(&payload)
                        .map(|r| {
                            r.filter_map(Result::ok)
                                .map(|e| (e.tenant.to_string(), e.event_id.to_string()))
                                .collect()
                        })
                        .unwrap_or_default();
                }
            }
            let rec = RecordRef {
                partition: 0,
                offset,
                next_offset: offset + 1,
                lsn: offset,
                append_ms: ts,
                payload: &payload,
            };
            if restoring {
                let n = part.proc.remember(rec).map_err(|source| Error::Process {
                    partition: id,
                    source,
                })?;
                self.stats.restored_events.fetch_add(n as u64, Relaxed);
            } else {
                let applied = part.proc.apply(rec).map_err(|source| Error::Process {
                    partition: id,
                    source,
                })?;
                // The late topic learns how each replayed event went (the
                // replay request sends one event per message).
                for (t, event_id) in std::mem::take(&mut part.pending_replays) {
                    let key = format!("{t}/{:032x}", tally_types::dedupe_key(&t, &event_id));
                    let value = codec::replayed_value(&t, &event_id, applied.replayed > 0);
                    part.replayed.push((key, value));
                }
                self.stats.counted.fetch_add(applied.counted, Relaxed);
                self.stats.duplicates.fetch_add(applied.duplicates, Relaxed);
                self.stats.late.fetch_add(applied.late, Relaxed);
                part.counts.0 += applied.counted;
                part.counts.1 += applied.duplicates;
                part.counts.2 += applied.late;
                if applied.late > 0 {
                    // Late events are remembered at the watermark's minute.
                    for (t, _) in &parsed.tenants {
                        if let Some(w) = part.watermark(backfill, t) {
                            part.note_low(backfill, t, align_down(w, MINUTE_MS), offset);
                        }
                    }
                }
            }
            for ((t, _), &(lo, _)) in parsed.tenants.iter().zip(&parsed.spans) {
                part.note_low(backfill, t, align_down(lo, MINUTE_MS), offset);
            }
            if self.hooks.raw.is_some() {
                // A replayed late event was kept when it first arrived.
                if offset >= part.raw_from && !correction {
                    part.raw
                        .append(&payload, ts, part.proc.last_drops())
                        .map_err(|e| Error::Process {
                            partition: id,
                            source: tally_stream::Error::Codec {
                                partition: 0,
                                lsn: offset,
                                source: e,
                            },
                        })?;
                }
                part.proc.raw_sealed(offset + 1);
            }
        }
        part.next_offset = offset + 1;
        part.last_ts = ts;
        part.dirty |= !restoring;
        if restoring && !part.restoring() {
            tracing::info!(partition = id, offset, "partition restored; processing");
            if let Some(st) = self.stats.parts.lock().get_mut(&id) {
                st.restoring = false;
            }
        }
        Ok(())
    }

    fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), Error> {
        self.send_opt(topic, partition, key, Some(value))
    }

    /// [`Session::send`], or a tombstone (no value).
    fn send_opt(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), Error> {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        let deadline = Instant::now() + TXN_TIMEOUT;
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    self.producer.poll(Duration::from_millis(10));
                    rec = back;
                }
                Err((e, _)) => return Err(client_err("produce")(e)),
            }
        }
    }

    /// Deletes the files committed transactions replaced, once their
    /// grace has passed (a file whose transaction aborted was never
    /// replaced: the list of the open one is dropped with it).
    fn bury(&mut self) {
        let (Some(sink), Some(rt)) = (self.hooks.raw.as_ref(), self.rt.as_ref()) else {
            return;
        };
        while self
            .graves
            .front()
            .is_some_and(|(at, _)| at.elapsed() >= sink.grace)
        {
            let Some((_, paths)) = self.graves.pop_front() else {
                break;
            };
            for p in paths {
                if let Err(e) = rt.block_on(sink.archive.delete(&p)) {
                    tracing::warn!(file = %p, error = %e, "cannot delete a replaced archive file; it stays, unlisted");
                }
            }
        }
    }

    /// One transaction: every moved partition's changed aggregates, late
    /// events and state, with the consumed offsets. Its commit is started
    /// on a thread of its own ([`Session::settle`] ends it). Answers
    /// whether there was anything to commit.
    fn commit(&mut self, consumer: &BaseConsumer<Ctx>) -> Result<bool, Error> {
        self.commit_with(consumer, false)
    }

    /// [`Session::commit`]; `last`: the session ends, so seals under way
    /// are waited for and listed.
    fn commit_with(&mut self, consumer: &BaseConsumer<Ctx>, last: bool) -> Result<bool, Error> {
        // One transaction at a time: the last one's commit ends first.
        self.settle(consumer, true)?;
        let now = (self.hooks.now_ms)();
        // Archive work starts on threads of its own; what ended is
        // collected below.
        if let Some(sink) = self.hooks.raw.as_ref() {
            let files_as = &self.files_as;
            for p in self.parts.values_mut().filter(|p| !p.restoring()) {
                if p.sealing.is_none() && p.raw.due(sink) {
                    p.start_seal(sink, files_as)?;
                }
                if p.compacting.is_none() && p.last_compact.elapsed() >= COMPACT_EVERY {
                    p.last_compact = Instant::now();
                    let (graves, replacing) = (&self.graves, &self.replacing);
                    p.start_compaction(sink, self.view, files_as, now, || {
                        graves
                            .iter()
                            .flat_map(|(_, paths)| paths)
                            .chain(replacing)
                            .cloned()
                            .collect()
                    })?;
                }
            }
        }
        let due = |p: &Part| p.sealing.as_ref().is_some_and(|s| s.job.ready(last));
        let compacted = |p: &Part| p.compacting.as_ref().is_some_and(|j| j.ready(last));
        let retention = self.hooks.minute_retention_ms;
        let cut_moves = |p: &Part| !p.restoring() && p.next_cut(now, retention) > p.cut;
        self.bury();
        if !self
            .parts
            .values()
            .any(|p| p.dirty || due(p) || cut_moves(p) || compacted(p))
        {
            return Ok(false);
        }
        let started = Instant::now();
        self.begin()?;
        let lateness = self.hooks.stream.allowed_lateness_ms;
        let mut offsets = TopicPartitionList::new();
        let ids: Vec<u32> = self.parts.keys().copied().collect();
        let mut committed_bad = Vec::new();
        // Partitions in this transaction and the next offset each commits.
        let mut done: Vec<(u32, u64)> = Vec::new();
        for id in ids {
            let Some(part) = self.parts.get_mut(&id) else {
                continue;
            };
            if part.restoring() {
                continue;
            }
            let seal = due(part);
            let cut = part.next_cut(now, retention);
            // Compaction and retention of the partition's archive files.
            let (replaced, swept) = part.finish_compaction(last)?;
            self.stats.files_swept.fetch_add(swept, Relaxed);
            if !(part.dirty || seal || cut > part.cut || !replaced.is_empty()) {
                continue;
            }
            let sealed = if seal { part.finish_seal(last)? } else { None };
            if let Some(f) = &sealed {
                self.stats
                    .raw_files
                    .fetch_add(f.files.len() as u64, Relaxed);
            }
            if part.raw.rows() == 0 && part.sealing.is_none() {
                // Nothing kept since: no event before here waits for a seal.
                part.raw_from = part.next_offset;
                part.buf_from = part.next_offset;
            }
            let ap = (id % self.agg_partitions) as i32;
            let deltas = part.proc.store().write().take_deltas();
            let late = part.proc.take_late();
            let sessions = part.take_session_changes();
            let replay_from = part.replay_from(lateness);
            // Whole values only from the cut of the last state on: behind
            // it buckets started empty when the cut passed them. A
            // partition that never committed has published nothing, so
            // every bucket is new: behind this commit's cut, deltas only
            // too (a whole value there could reach a reader that has
            // already folded that minute, before this partition's first
            // state counts in its horizon).
            let behind = if part.committed.is_none() {
                cut
            } else {
                part.cut
            };
            let finals = part.evict(self.view);
            let (out, split) = part.publish(deltas, &finals, behind);
            if !finals.is_empty() {
                part.evicted.push_back((part.next_offset, finals));
            }
            part.advance_cut(cut);
            let mut clocks = Enc::new();
            part.proc.export_clocks(&mut clocks);
            let state = PartitionState {
                next_offset: part.next_offset,
                replay_from,
                node: self.settings.node_id.clone(),
                committed_at: now,
                watermarks: part
                    .proc
                    .watermarks()
                    .map(|(t, w)| (t.to_string(), w))
                    .collect(),
                counted: part.counts.0,
                duplicates: part.counts.1,
                late: part.counts.2,
                clocks: clocks.buf,
                raw_from: part.raw_from,
                last_message_ms: (part.last_ts > Millis::MIN).then_some(part.last_ts),
                cut: part.cut,
            };
            part.dirty = false;
            let next = part.next_offset;
            let bad = std::mem::take(&mut part.malformed);
            let replayed = std::mem::take(&mut part.replayed);
            let n_out = out.len() as u64;
            for (k, v) in &out {
                self.send_opt(&self.settings.topic_aggregates, Some(ap), k, v.as_deref())?;
            }
            if let Some(f) = &sealed {
                self.send(
                    &self.settings.topic_aggregates,
                    Some(ap),
                    &codec::files_key(id, f.from),
                    &codec::files_value(f),
                )?;
            }
            for r in &replaced {
                self.send(
                    &self.settings.topic_aggregates,
                    Some(ap),
                    &codec::replace_key(r),
                    &codec::replace_value(r),
                )?;
                self.replacing.extend(r.removed.iter().cloned());
                let n = r.removed.len() as u64;
                match r.added {
                    Some(_) => self.stats.files_compacted.fetch_add(n, Relaxed),
                    None => self.stats.files_expired.fetch_add(n, Relaxed),
                };
            }
            for e in &late {
                let key = codec::dlq_key(e);
                let value = codec::dlq_value(e);
                self.send(
                    &self.settings.topic_late,
                    None,
                    key.as_bytes(),
                    value.as_bytes(),
                )?;
            }
            for e in &bad {
                let key = codec::dlq_key(e);
                let value = codec::dlq_value(e);
                self.send(
                    &self.settings.topic_malformed,
                    None,
                    key.as_bytes(),
                    value.as_bytes(),
                )?;
            }
            committed_bad.extend(bad);
            for (k, v) in &replayed {
                self.send(&self.settings.topic_late, None, k.as_bytes(), v.as_bytes())?;
            }
            let values = sessions
                .iter()
                .flat_map(|c| codec::sessions_values(c, MAX_VALUE_BYTES));
            for (seq, v) in values.enumerate() {
                self.send(
                    &self.settings.topic_aggregates,
                    Some(ap),
                    &codec::sessions_key(id, next, seq as u32),
                    &v,
                )?;
            }
            self.send(
                &self.settings.topic_aggregates,
                Some(ap),
                &codec::state_key(id),
                &codec::state_value(&state),
            )?;
            self.stats.aggregates_produced.fetch_add(n_out, Relaxed);
            self.stats.aggregate_parts.fetch_add(split, Relaxed);
            done.push((id, next));
            offsets
                .add_partition_offset(
                    &self.settings.topic_events,
                    id as i32,
                    Offset::Offset(next as i64),
                )
                .map_err(client_err("offsets"))?;
        }
        let sending = started.elapsed();
        let meta = consumer
            .group_metadata()
            .ok_or_else(|| client_err("group metadata")(KafkaError::NoMessageReceived))?;
        if offsets.count() > 0 {
            self.producer
                .send_offsets_to_transaction(&offsets, &meta, TXN_TIMEOUT)
                .map_err(client_err("send offsets to transaction"))?;
        }
        let offsets_took = started.elapsed() - sending;
        let producer = self.producer.clone();
        let thread = std::thread::Builder::new()
            .name("tally-kafka-commit".into())
            .spawn(move || {
                let t = Instant::now();
                deliver(&producer, TXN_TIMEOUT)?;
                producer
                    .commit_transaction(TXN_TIMEOUT)
                    .map(|()| t.elapsed())
            })
            .map_err(Error::Thread)?;
        consumer.context().committing.lock().thread = Some(thread);
        self.pending = Some(Pending {
            started,
            sending,
            offsets: offsets_took,
            done,
            replacing: std::mem::take(&mut self.replacing),
            bad: committed_bad,
        });
        Ok(true)
    }

    /// Lag per owned partition: records behind the partition's end, and
    /// how old the last handled message is while behind. Answers the
    /// largest lag in records.
    fn refresh_lag(&mut self, consumer: &BaseConsumer<Ctx>) -> u64 {
        let mut most = 0;
        let now = (self.hooks.now_ms)();
        let topic = &self.settings.topic_events;
        // Asked of the brokers before the status lock is taken, so a
        // status request never waits for them.
        let ends: Vec<(u32, u64)> = self
            .parts
            .iter()
            .map(|(id, part)| {
                let end = consumer
                    .fetch_watermarks(topic, *id as i32, Duration::from_millis(500))
                    .map(|(_, hi)| hi.max(0) as u64)
                    .unwrap_or(part.next_offset);
                (*id, end)
            })
            .collect();
        let mut st = self.stats.parts.lock();
        for (id, end) in ends {
            let Some(part) = self.parts.get(&id) else {
                continue;
            };
            let lag = end.saturating_sub(part.next_offset);
            most = most.max(lag);
            let secs = if lag > 0 && part.last_ts > Millis::MIN {
                (now - part.last_ts).max(0) as f64 / 1000.0
            } else {
                0.0
            };
            st.insert(
                id,
                PartStatus {
                    next_offset: part.next_offset,
                    end_offset: end,
                    lag_records: lag,
                    lag_seconds: secs,
                    restoring: part.restoring(),
                },
            );
        }
        most
    }
}

/// Waits until every message `producer` holds is delivered (and its
/// delivery report served), up to `timeout`.
///
/// `commit_transaction` flushes first, but rdkafka's flush serves delivery
/// reports in slices of 100 ms that always run to their end: a commit with
/// a single message in flight took 100 ms more than the broker did. Here
/// the reports are served in 1 ms slices, so the flush inside the commit
/// finds nothing left.
fn deliver(producer: &BaseProducer, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        // A flush with no wait: done if nothing is in flight, and it wakes
        // batches still lingering so they go now.
        match producer.flush(Duration::ZERO) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => producer.poll(Duration::from_millis(1)),
        }
    }
}

/// A message value: one event object, a JSON array of them, or NDJSON.
fn parse_message(
    parser: &mut Parser,
    value: &[u8],
    decode: Option<&DecodeFn>,
) -> Result<Parsed, BodyError> {
    if value.first() == Some(&0) {
        let Some(decode) = decode else {
            return Err(BodyError::NotJson(
                "a binary value (first byte 0) and no schema registry to decode it".into(),
            ));
        };
        let lines =
            decode(value).map_err(|e| BodyError::NotJson(format!("Confluent-framed Avro: {e}")))?;
        return parser.parse(&lines, Format::Ndjson, Tenancy::Open);
    }
    let first = value.iter().copied().find(|c| !c.is_ascii_whitespace());
    match first {
        Some(b'[') => parser.parse(value, Format::Json, Tenancy::Open),
        _ => match parser.parse(value, Format::Json, Tenancy::Open) {
            Ok(p) => Ok(p),
            Err(BodyError::NotJson(_)) => parser.parse(value, Format::Ndjson, Tenancy::Open),
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_refused_for_size_names_the_setting_to_raise() {
        let e = commit_err(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "aggregates",
        );
        let msg = e.to_string();
        assert!(
            msg.contains("max.message.bytes") && msg.contains("\"aggregates\""),
            "{msg}"
        );
        let other = commit_err(
            KafkaError::MessageProduction(RDKafkaErrorCode::BrokerTransportFailure),
            "aggregates",
        );
        assert!(matches!(other, Error::Client { .. }), "{other}");
    }

    #[test]
    fn replaced_files_keys_stay_new_while_the_partition_idles() {
        assert_eq!(next_replace_key(None, 10), (10, 0));
        assert_eq!(next_replace_key(Some((10, 0)), 10), (10, 1));
        assert_eq!(next_replace_key(Some((10, 7)), 10), (10, 8));
        // Events moved the partition on: a new offset starts at 0.
        assert_eq!(next_replace_key(Some((10, 7)), 11), (11, 0));
    }

    #[test]
    fn a_waiting_partition_waits_while_the_view_moves_and_gives_up_when_it_stands_still() {
        let t0 = Instant::now();
        let mut w = Waiting::new(1_000, Some(100), t0);
        assert_eq!(
            w.judge(Some(100), t0 + Duration::from_secs(5)),
            WaitOutcome::Wait
        );
        // A slow view: it moves every 80 s, so the limit never runs out.
        let mut at = t0;
        for step in 1..=5u64 {
            at += Duration::from_secs(80);
            assert_eq!(w.judge(Some(100 + step * 100), at), WaitOutcome::Wait);
        }
        assert_eq!(
            w.judge(Some(600), at + WAIT_LIMIT - Duration::from_millis(1)),
            WaitOutcome::Wait
        );
        // It stood still for the whole limit.
        assert_eq!(w.judge(Some(600), at + WAIT_LIMIT), WaitOutcome::GiveUp);
        // Reaching the committed offset is ready whatever the clock says.
        let mut w = Waiting::new(1_000, None, t0);
        assert_eq!(w.judge(None, t0 + WAIT_LIMIT), WaitOutcome::GiveUp);
        assert_eq!(
            w.judge(Some(1_000), t0 + WAIT_LIMIT * 3),
            WaitOutcome::Ready
        );
        // A view that had no state of the partition and gets one started
        // moving.
        let mut w = Waiting::new(1_000, None, t0);
        assert_eq!(w.judge(Some(10), t0 + WAIT_LIMIT), WaitOutcome::Wait);
        assert_eq!(w.judge(Some(10), t0 + WAIT_LIMIT * 2), WaitOutcome::GiveUp);
    }
}
