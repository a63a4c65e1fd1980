//! Appending kept events to hot Arrow batches, and sealing them into
//! Parquet files (on a helper thread, one seal at a time).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::builder::{Int32Builder, NullBufferBuilder};
use arrow::array::{Array, AsArray};
use arrow::array::{ArrayRef, BinaryArray, StringArray, TimestampMillisecondArray};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow::compute::{concat_batches, interleave_record_batch};
use arrow::datatypes::TimestampMillisecondType;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parking_lot::RwLock;
use parquet::basic::{Compression, ZstdLevel};
use parquet::bloom_filter::Sbbf;
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use tally_types::time::HOUR_MS;
use tally_types::{BatchReader, Millis};

use crate::encode::{FileEncoder, push_text, same_text};
use crate::manifest::{Entry, Manifest};
use crate::schema::{col, events_schema, hive_dir};
use crate::{Archive, ArchiveFile, Error, Hot, HotBatch, RawShared, RawStats, Result};

/// Raw store settings.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// Hot rows are sealed at least this often (ms).
    pub seal_interval_ms: u64,
    /// ... or once this many rows are hot.
    pub seal_rows: usize,
    /// Appends block (backpressure) while this many rows are hot and a
    /// seal is running.
    pub max_hot_rows: usize,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    pub zstd_level: i32,
    pub partitions: usize,
    /// `<data-dir>/state/archive.manifest`.
    pub manifest_path: PathBuf,
    /// Compaction merges the files of one (tenant, hour) once there are
    /// this many of them, or two once the hour is over; files with more
    /// rows than `compact_rows` are left alone.
    pub compact_files: usize,
    pub compact_rows: u64,
    /// Files replaced by compaction are deleted this long after (queries
    /// that started before may still be reading them).
    pub compact_grace_ms: u64,
}

impl RawConfig {
    pub fn new(manifest_path: PathBuf, partitions: usize) -> RawConfig {
        RawConfig {
            seal_interval_ms: 60_000,
            seal_rows: 1_000_000,
            max_hot_rows: 8_000_000,
            row_group_rows: 128 * 1024,
            zstd_level: 1,
            partitions,
            manifest_path,
            compact_files: 8,
            compact_rows: 4_000_000,
            compact_grace_ms: 60_000,
        }
    }
}

/// What one compaction round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Files merged away, and the files written in their place.
    pub files_in: usize,
    pub files_out: usize,
    pub rows: u64,
    /// Replaced files deleted in this round (after their grace period).
    pub deleted: usize,
}

/// Column builders of one tenant. Texts are appended as the log batch
/// holds them and checked as UTF-8 once per column when the batch is
/// finished (one pass over a long buffer instead of a check per value).
struct Builders {
    event_id: TextBuilder,
    event_type: TextBuilder,
    user_id: TextBuilder,
    session_id: TextBuilder,
    ts: Vec<Millis>,
    /// The properties as JSON text, written straight from the batch bytes.
    props: TextBuilder,
    received_at: Vec<Millis>,
    schema_version: Int32Builder,
    min_ts: Millis,
    max_ts: Millis,
    /// The tenant's name repeated (at least as many rows as the last
    /// batch): a batch's tenant column is a slice of it, not built anew.
    tenant_col: Option<StringArray>,
}

impl Builders {
    /// Builders sized like `like` (the batch a tenant finished last) with
    /// room to spare, so a steady stream whose batches vary a little does
    /// not regrow (and copy) them. Room not written is never touched.
    fn with_capacity(like: Option<&Builders>) -> Builders {
        let roomy = |n: usize| n + n / 4;
        let rows = roomy(like.map_or(0, Builders::rows));
        let text = |b: Option<&TextBuilder>| {
            TextBuilder::with_capacity(rows, roomy(b.map_or(0, |b| b.data.len())))
        };
        Builders {
            event_id: text(like.map(|l| &l.event_id)),
            event_type: text(like.map(|l| &l.event_type)),
            user_id: text(like.map(|l| &l.user_id)),
            session_id: text(like.map(|l| &l.session_id)),
            ts: Vec::with_capacity(rows),
            props: text(like.map(|l| &l.props)),
            received_at: Vec::with_capacity(rows),
            schema_version: Int32Builder::with_capacity(rows),
            min_ts: Millis::MAX,
            max_ts: Millis::MIN,
            tenant_col: None,
        }
    }

    /// `n` rows of `tenant`: a slice of the repeated name kept for the
    /// next batches (rebuilt, twice as long, when `n` outgrows it).
    fn tenant_column(&mut self, tenant: &str, n: usize) -> ArrayRef {
        let col = match &self.tenant_col {
            Some(c) if c.len() >= n => c,
            _ => self
                .tenant_col
                .insert(StringArray::from_iter_values(std::iter::repeat_n(
                    tenant,
                    n.max(512).next_power_of_two(),
                ))),
        };
        Arc::new(col.slice(0, n))
    }

    fn rows(&self) -> usize {
        self.ts.len()
    }

    /// The rows built so far as a hot batch; the builders start over,
    /// sized like this batch.
    fn finish(&mut self, tenant: &str) -> Result<HotBatch> {
        let n = self.rows();
        let mut fresh = Builders::with_capacity(Some(self));
        fresh.tenant_col = self.tenant_col.take();
        let mut b = std::mem::replace(self, fresh);
        let ts = |v: Vec<Millis>| TimestampMillisecondArray::from(v).with_timezone("UTC");
        let cols: Vec<ArrayRef> = vec![
            utf8(b.event_id.finish()?, "event_id"),
            self.tenant_column(tenant, n),
            utf8(b.event_type.finish()?, "event_type"),
            utf8(b.user_id.finish()?, "user_id"),
            utf8(b.session_id.finish()?, "session_id"),
            Arc::new(ts(b.ts)),
            utf8(b.props.finish()?, "properties"),
            Arc::new(ts(b.received_at)),
            Arc::new(b.schema_version.finish()),
        ];
        Ok(HotBatch {
            seq: 0,
            batch: RecordBatch::try_new(events_schema(), cols)?,
            min_ts: b.min_ts,
            max_ts: b.max_ts,
        })
    }
}

/// A text column being built: value bytes, offsets, validity (kept as a
/// count until a row is null). Cheaper per value than arrow's
/// `BinaryBuilder`: a short text is copied from its record as a fixed 16
/// bytes (see [`push_text`]).
struct TextBuilder {
    data: Vec<u8>,
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
}

impl TextBuilder {
    fn with_capacity(rows: usize, bytes: usize) -> TextBuilder {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        TextBuilder {
            data: Vec::with_capacity(bytes),
            offsets,
            nulls: NullBufferBuilder::new(rows),
        }
    }

    /// Appends `v`, a slice of `record` (the log record being read).
    #[inline(always)]
    fn push(&mut self, v: &[u8], record: &[u8]) {
        match offset_in(record, v) {
            Some(at) => push_text(&mut self.data, record, at, v.len()),
            None => self.data.extend_from_slice(v),
        }
        self.offsets.push(self.data.len() as i32);
        self.nulls.append_non_null();
    }

    #[inline(always)]
    fn push_opt(&mut self, v: Option<&[u8]>, record: &[u8]) {
        match v {
            Some(v) => self.push(v, record),
            None => {
                self.offsets.push(self.data.len() as i32);
                self.nulls.append_null();
            }
        }
    }

    fn finish(mut self) -> Result<BinaryArray> {
        Ok(BinaryArray::try_new(
            OffsetBuffer::new(ScalarBuffer::from(self.offsets)),
            Buffer::from_vec(self.data),
            self.nulls.finish(),
        )?)
    }
}

/// Where `v` starts in `buf`, when it is a slice of it.
#[inline(always)]
fn offset_in(buf: &[u8], v: &[u8]) -> Option<usize> {
    let at = (v.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    (at.checked_add(v.len())? <= buf.len()).then_some(at)
}

/// A text column as UTF-8, checked in one pass ([`checked_utf8`]). Only a
/// damaged record (past its log checksum) can fail the check; its texts are
/// then kept with replacement characters rather than failing the whole batch.
fn utf8(b: BinaryArray, column: &str) -> ArrayRef {
    match checked_utf8(&b) {
        Some(s) => Arc::new(s),
        None => {
            let e = StringArray::try_from_binary(b.clone()).err();
            tracing::warn!(column, error = ?e, "raw store: text that is not UTF-8 kept with replacement characters");
            Arc::new(
                b.iter()
                    .map(|v| v.map(String::from_utf8_lossy))
                    .collect::<StringArray>(),
            )
        }
    }
}

/// `b` as a `StringArray` when its texts are UTF-8: the check arrow's
/// `StringArray::try_new` makes (the value buffer as a whole is UTF-8 and
/// every offset falls on a character boundary), with `simdutf8`'s
/// validator, which on these buffers is several times faster than
/// `std::str::from_utf8` (arrow's; over a tenth of the raw thread's time).
#[allow(unsafe_code)]
pub(crate) fn checked_utf8(b: &BinaryArray) -> Option<StringArray> {
    let text = simdutf8::basic::from_utf8(b.values()).ok()?;
    if !b
        .value_offsets()
        .iter()
        .all(|&o| text.is_char_boundary(o as usize))
    {
        return None;
    }
    let (offsets, values, nulls) = b.clone().into_parts();
    // SAFETY: `values` is UTF-8 and every offset is a character boundary
    // inside it (checked above); the offsets are monotonic and in bounds and
    // `nulls` has their length (`BinaryArray` checked both when built). That
    // is all `StringArray::new_unchecked` asks beyond `BinaryArray`.
    Some(unsafe { StringArray::new_unchecked(offsets, values, nulls) })
}

/// Builders are published at this many rows, or once the raw thread has
/// caught up and [`PUBLISH_INTERVAL`] has passed since the last publish ...
const FLUSH_ROWS: usize = 8192;
/// ... so under a steady load rows become visible within this time of
/// being appended, in a few large batches rather than one per record (a
/// publish per record cost more than building the rows, and its small
/// batches were copied again to be merged).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(20);
/// ... or once their properties text reaches this size (offsets are i32).
const FLUSH_PROPS_BYTES: usize = 64 << 20;

/// What one seal wrote.
#[derive(Debug, Clone, Default)]
pub struct SealReport {
    pub rows: u64,
    pub files: usize,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub next_lsn: u64,
}

enum Job {
    Seal(SealJob),
    /// Delete archive files whose hour ended at or before `cutoff`.
    Retain {
        cutoff: Millis,
        done: Option<SyncSender<Result<(u64, u64)>>>,
    },
    /// Merge small files of one (tenant, hour) into one.
    Compact {
        done: Option<SyncSender<Result<CompactReport>>>,
    },
}

struct SealJob {
    /// Per tenant, the batches to seal.
    tenants: Vec<(Arc<str>, Vec<RecordBatch>)>,
    /// Hot batches up to this seq are removed once the files are committed.
    through_seq: u64,
    next_lsn: u64,
    offsets: Vec<u64>,
    done: Option<SyncSender<Result<SealReport>>>,
}

/// The single writer of the raw store (lives on the raw thread).
pub struct RawWriter {
    shared: Arc<RawShared>,
    cfg: RawConfig,
    /// Per tenant (by its bytes in the log batch): its name and builders.
    builders: hashbrown::HashMap<Box<[u8]>, (Arc<str>, Builders)>,
    building_rows: usize,
    /// A tenant's properties text reached [`FLUSH_PROPS_BYTES`].
    props_full: bool,
    /// The properties of the event being appended, as JSON text.
    json: Vec<u8>,
    next_seq: u64,
    /// Log position after every record appended (or passed over) so far.
    offsets: Vec<u64>,
    next_lsn: u64,
    last_seal: Instant,
    last_publish: Instant,
    seal_tx: Option<SyncSender<Job>>,
    in_flight: Arc<AtomicBool>,
    seal_thread: Option<JoinHandle<()>>,
}

impl RawWriter {
    /// Opens the manifest, deletes archive files it does not name (left by a
    /// crash between a Parquet write and its manifest entry), and starts the
    /// seal thread. The caller feeds the log from [`RawWriter::offsets`].
    ///
    /// A new archive (no manifest yet) starts at `genesis` = (next lsn,
    /// per-partition offsets): a data dir whose processor state predates
    /// the archive cannot tell older records from their duplicates any more.
    pub fn open(
        archive: Archive,
        cfg: RawConfig,
        genesis: (u64, &[u64]),
    ) -> Result<(RawWriter, Arc<RawShared>)> {
        let mut manifest = Manifest::open(&cfg.manifest_path, cfg.partitions, genesis)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                path: "seal runtime".into(),
                source,
            })?;
        // Startup I/O runs on a thread of its own: `open` may be called from
        // inside an async runtime, where blocking on another one panics.
        std::thread::scope(|sc| {
            sc.spawn(|| {
                promote_at_start(&rt, &archive, &mut manifest)?;
                remove_orphans(&rt, &archive, &manifest, &cfg)
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Config("orphan cleanup panicked".into())))
        })?;
        let files: Vec<Arc<ArchiveFile>> = manifest.state.files.values().cloned().collect();
        let shared = Arc::new(RawShared {
            archive: archive.clone(),
            hot: RwLock::new(Hot::default()),
            files: RwLock::new(files),
            sealed_lsn: manifest.state.next_lsn.into(),
            published_lsn: manifest.state.next_lsn.into(),
            sealed_offsets: parking_lot::Mutex::new(manifest.state.offsets.clone()),
            version: 0.into(),
            stats: RawStats::default(),
        });
        let (seal_tx, seal_rx) = sync_channel::<Job>(1);
        let in_flight = Arc::new(AtomicBool::new(false));
        let sh = shared.clone();
        let flight = in_flight.clone();
        let c = cfg.clone();
        let offsets = manifest.state.offsets.clone();
        let next_lsn = manifest.state.next_lsn;
        let seal_thread = std::thread::Builder::new()
            .name("tally-seal".into())
            .spawn(move || seal_loop(rt, manifest, seal_rx, sh, flight, c))
            .map_err(|source| Error::Io {
                path: "seal thread".into(),
                source,
            })?;
        Ok((
            RawWriter {
                shared: shared.clone(),
                cfg,
                builders: hashbrown::HashMap::new(),
                building_rows: 0,
                props_full: false,
                json: Vec::with_capacity(1024),
                next_seq: 1,
                offsets,
                next_lsn,
                last_seal: Instant::now(),
                last_publish: Instant::now(),
                seal_tx: Some(seal_tx),
                in_flight,
                seal_thread: Some(seal_thread),
            },
            shared,
        ))
    }

    pub fn shared(&self) -> &Arc<RawShared> {
        &self.shared
    }

    /// Where the raw store continues in each partition.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// Whether the record at `offset` of `partition` is still to be appended.
    pub fn wants(&self, partition: u32, offset: u64) -> bool {
        self.offsets
            .get(partition as usize)
            .is_some_and(|&o| offset >= o)
    }

    /// Appends the kept events of one record: every event except those in
    /// `dropped` (sorted, non-overlapping `(start, len)` index ranges).
    /// Correction records (late events re-applied from the DLQ) add nothing:
    /// those events were kept when they first arrived.
    pub fn append(
        &mut self,
        partition: u32,
        next_offset: u64,
        lsn: u64,
        append_ms: Millis,
        payload: &[u8],
        dropped: &[(u32, u32)],
    ) -> Result<()> {
        let kept = self.append_kept(lsn, append_ms, payload, dropped);
        // Passed over even when it cannot be read: the position moves on.
        if let Some(o) = self.offsets.get_mut(partition as usize) {
            *o = (*o).max(next_offset);
        }
        self.next_lsn = self.next_lsn.max(lsn + 1);
        if self.building_rows >= FLUSH_ROWS || self.props_full {
            self.flush()?;
        }
        kept
    }

    fn append_kept(
        &mut self,
        lsn: u64,
        append_ms: Millis,
        payload: &[u8],
        dropped: &[(u32, u32)],
    ) -> Result<()> {
        let mut reader = BatchReader::new(payload).map_err(|e| Error::Record {
            lsn,
            what: e.to_string(),
        })?;
        if !reader.is_correction() {
            let mut drops = dropped.iter().peekable();
            let mut next = 0u32;
            let mut cur: Option<(&[u8], &mut Builders)> = None;
            while let Some(ev) = reader.next_raw_rendered(&mut self.json) {
                let ev = ev.map_err(|e| Error::Record {
                    lsn,
                    what: e.to_string(),
                })?;
                let i = next;
                next += 1;
                while drops.peek().is_some_and(|&&(s, l)| s + l <= i) {
                    drops.next();
                }
                if drops.peek().is_some_and(|&&(s, _)| s <= i) {
                    continue;
                }
                // Records nearly always hold one tenant: the builders of
                // the event before are reused without hashing the name.
                let b = match cur.take() {
                    Some((t, b)) if same_text(t, ev.tenant) => b,
                    _ => match self.builders.get_mut(ev.tenant) {
                        Some((_, b)) => b,
                        None => {
                            &mut self
                                .builders
                                .entry(Box::from(ev.tenant))
                                .or_insert_with(|| {
                                    let name = String::from_utf8_lossy(ev.tenant);
                                    (Arc::from(name.as_ref()), Builders::with_capacity(None))
                                })
                                .1
                        }
                    },
                };
                b.event_id.push(ev.event_id, payload);
                b.event_type.push(ev.event_type, payload);
                b.user_id.push_opt(ev.user_id, payload);
                b.session_id.push_opt(ev.session_id, payload);
                b.ts.push(ev.ts);
                b.props.push(ev.props_text().unwrap_or(&self.json), payload);
                b.received_at.push(append_ms);
                b.schema_version
                    .append_option(ev.schema_version.map(crate::schema::version_i32));
                b.min_ts = b.min_ts.min(ev.ts);
                b.max_ts = b.max_ts.max(ev.ts);
                self.building_rows += 1;
                if b.props.data.len() >= FLUSH_PROPS_BYTES {
                    self.props_full = true;
                }
                cur = Some((ev.tenant, b));
            }
        }
        Ok(())
    }

    /// How long until built rows are due to be published ([`Self::flush`]):
    /// `None` when everything appended is visible.
    pub fn publish_wait(&self) -> Option<Duration> {
        let behind = self.shared.published_lsn.load(Relaxed) < self.next_lsn;
        (self.building_rows > 0 || behind)
            .then(|| PUBLISH_INTERVAL.saturating_sub(self.last_publish.elapsed()))
    }

    /// Moves built rows into the hot batches queries read; then queries
    /// see every record appended so far (`published_lsn`).
    pub fn flush(&mut self) -> Result<()> {
        self.last_publish = Instant::now();
        if self.building_rows > 0 {
            self.publish_built()?;
        }
        self.shared.published_lsn.fetch_max(self.next_lsn, Release);
        Ok(())
    }

    fn publish_built(&mut self) -> Result<()> {
        // Tenants silent since the last flush give their buffers back.
        self.builders.retain(|_, (_, b)| b.rows() > 0);
        let mut done = Vec::new();
        for (t, b) in self.builders.values_mut() {
            let mut hb = b.finish(t)?;
            hb.seq = self.next_seq;
            self.next_seq += 1;
            done.push((t.clone(), hb));
        }
        self.props_full = false;
        self.shared
            .stats
            .rows_appended
            .fetch_add(self.building_rows as u64, Relaxed);
        self.building_rows = 0;
        {
            let mut hot = self.shared.hot.write();
            for (t, hb) in done {
                hot.rows += hb.batch.num_rows();
                hot.bytes += batch_memory(&hb.batch);
                hot.tenants.entry(t).or_default().push(hb);
            }
            // Many tiny batches (one per small request) are merged, so a
            // scan does not pay per batch.
            let pinned = hot.sealing_through;
            for v in hot.tenants.values_mut() {
                if v.iter().filter(|b| mergeable(b, pinned)).count() > 256 {
                    coalesce(v, pinned)?;
                }
            }
        }
        self.shared.bump_version();
        Ok(())
    }

    /// Rows hot (in memory, not yet in archive files).
    pub fn hot_rows(&self) -> usize {
        self.shared.hot.read().rows + self.building_rows
    }

    /// Starts a seal if one is due (interval or rows) and none is running.
    /// Blocks while too many rows are hot (backpressure).
    pub fn maybe_seal(&mut self) -> Result<()> {
        let hot = self.hot_rows();
        let due = hot > 0
            && (hot >= self.cfg.seal_rows
                || self.last_seal.elapsed() >= Duration::from_millis(self.cfg.seal_interval_ms));
        if due && !self.in_flight.load(SeqCst) {
            self.start_seal(None)?;
        }
        while self.hot_rows() > self.cfg.max_hot_rows && self.in_flight.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn start_seal(&mut self, done: Option<SyncSender<Result<SealReport>>>) -> Result<()> {
        self.flush()?;
        self.last_seal = Instant::now();
        let through_seq = self.next_seq - 1;
        let mut hot = self.shared.hot.write();
        hot.sealing_through = through_seq;
        let tenants: Vec<(Arc<str>, Vec<RecordBatch>)> = hot
            .tenants
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(t, v)| (t.clone(), v.iter().map(|b| b.batch.clone()).collect()))
            .collect();
        drop(hot);
        let job = SealJob {
            tenants,
            through_seq,
            next_lsn: self.next_lsn,
            offsets: self.offsets.clone(),
            done,
        };
        self.in_flight.store(true, SeqCst);
        if let Some(tx) = &self.seal_tx
            && tx.send(Job::Seal(job)).is_ok()
        {
            return Ok(());
        }
        self.in_flight.store(false, SeqCst);
        Err(Error::Config("the seal thread is gone".into()))
    }

    /// Seals everything now and waits for it (shutdown, tests).
    pub fn seal_now(&mut self) -> Result<SealReport> {
        while self.in_flight.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let (tx, rx) = sync_channel(1);
        self.start_seal(Some(tx))?;
        rx.recv()
            .map_err(|_| Error::Config("the seal thread is gone".into()))?
    }

    /// Deletes archive files whose hour ended at or before `cutoff` (on
    /// the seal thread, after the seal in flight). Returns (files, rows).
    pub fn retain(&mut self, cutoff: Millis) -> Result<(u64, u64)> {
        let (tx, rx) = sync_channel(1);
        match &self.seal_tx {
            Some(t)
                if t.send(Job::Retain {
                    cutoff,
                    done: Some(tx),
                })
                .is_ok() => {}
            _ => return Err(Error::Config("the seal thread is gone".into())),
        }
        rx.recv()
            .map_err(|_| Error::Config("the seal thread is gone".into()))?
    }

    /// Starts a compaction round on the seal thread unless a job is
    /// already waiting (it never blocks the caller).
    pub fn compact_soon(&mut self) {
        if let Some(t) = &self.seal_tx {
            let _ = t.try_send(Job::Compact { done: None });
        }
    }

    /// Runs a compaction round and waits for it (tests, tools).
    pub fn compact_now(&mut self) -> Result<CompactReport> {
        let (tx, rx) = sync_channel(1);
        match &self.seal_tx {
            Some(t) if t.send(Job::Compact { done: Some(tx) }).is_ok() => {}
            _ => return Err(Error::Config("the seal thread is gone".into())),
        }
        rx.recv()
            .map_err(|_| Error::Config("the seal thread is gone".into()))?
    }

    /// Seals what is hot and stops the seal thread.
    pub fn close(mut self) -> Result<SealReport> {
        let r = self.seal_now();
        self.seal_tx = None;
        if let Some(t) = self.seal_thread.take() {
            let _ = t.join();
        }
        r
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        self.seal_tx = None;
        if let Some(t) = self.seal_thread.take() {
            let _ = t.join();
        }
    }
}

/// Deletes Parquet objects the manifest does not name, left by a crash
/// between a file write and its manifest entry. Without a manifest nothing
/// is deleted: the files are someone else's.
fn remove_orphans(
    rt: &tokio::runtime::Runtime,
    archive: &Archive,
    manifest: &Manifest,
    cfg: &RawConfig,
) -> Result<()> {
    let listed = rt.block_on(archive.list())?;
    let untracked: Vec<&String> = listed
        .iter()
        .map(|(p, _)| p)
        .filter(|p| p.ends_with(".parquet") || p.ends_with(".tmp") || p.ends_with(MERGING))
        .filter(|p| !manifest.state.files.contains_key(*p))
        .collect();
    if manifest.existed {
        for path in &untracked {
            rt.block_on(archive.delete(path))?;
        }
        if !untracked.is_empty() {
            tracing::warn!(orphans = untracked.len(), archive = %archive.describe, "deleted archive files no manifest entry names (left by a crash)");
        }
    } else if !untracked.is_empty() {
        tracing::warn!(
            files = untracked.len(),
            archive = %archive.describe,
            manifest = %cfg.manifest_path.display(),
            "the archive holds Parquet files but there is no manifest: they are not queried and not deleted; move them away if they are not wanted"
        );
    }
    Ok(())
}

/// Memory `b` holds for itself: its tenant column is a slice of a longer
/// array shared with the tenant's other batches, so only the slice counts.
pub(crate) fn batch_memory(b: &RecordBatch) -> usize {
    let tenant = b.column(col::TENANT);
    let slice = tenant.to_data().get_slice_memory_size().unwrap_or(0);
    b.get_array_memory_size() - tenant.get_array_memory_size() + slice
}

/// Hot batches of at least this many rows are left as they are by
/// [`coalesce`], so a row is copied once on its way to a seal, not again
/// each time more small batches arrive.
const COALESCED_ROWS: usize = 64 * 1024;

/// Whether [`coalesce`] merges `b`: small, and newer than `pinned`.
fn mergeable(b: &HotBatch, pinned: u64) -> bool {
    b.seq > pinned && b.batch.num_rows() < COALESCED_ROWS
}

/// Merges a tenant's small hot batches newer than `pinned` into one.
/// Batches a seal in flight holds (seq ≤ `pinned`) stay as they are: merged
/// into a newer batch they would survive the seal's removal and be sealed
/// twice.
pub(crate) fn coalesce(v: &mut Vec<HotBatch>, pinned: u64) -> Result<()> {
    let (merge, keep): (Vec<HotBatch>, Vec<HotBatch>) =
        v.drain(..).partition(|b| mergeable(b, pinned));
    *v = keep;
    if merge.is_empty() {
        return Ok(());
    }
    let batches: Vec<RecordBatch> = merge.iter().map(|b| b.batch.clone()).collect();
    v.push(HotBatch {
        seq: merge.last().map_or(0, |b| b.seq),
        batch: concat_batches(&events_schema(), &batches)?,
        min_ts: merge.iter().map(|b| b.min_ts).min().unwrap_or(Millis::MAX),
        max_ts: merge.iter().map(|b| b.max_ts).max().unwrap_or(Millis::MIN),
    });
    Ok(())
}

fn seal_loop(
    rt: tokio::runtime::Runtime,
    mut manifest: Manifest,
    rx: Receiver<Job>,
    shared: Arc<RawShared>,
    in_flight: Arc<AtomicBool>,
    cfg: RawConfig,
) {
    let mut attempt = 0u64;
    // Files compaction replaced, deleted once their grace period is over.
    let mut graveyard: Vec<Buried> = Vec::new();
    for job in rx {
        let mut job = match job {
            Job::Seal(j) => j,
            Job::Compact { done } => {
                attempt += 1;
                let r = rt.block_on(compact(
                    &shared,
                    &mut manifest,
                    &cfg,
                    attempt,
                    &mut graveyard,
                ));
                match &r {
                    Ok(c) if c.files_in > 0 => tracing::info!(
                        files_in = c.files_in,
                        files_out = c.files_out,
                        rows = c.rows,
                        "archive compaction merged small files"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "archive compaction failed; retried on the next round")
                    }
                }
                if let Some(d) = done {
                    let _ = d.send(r);
                }
                continue;
            }
            Job::Retain { cutoff, done } => {
                let r = rt.block_on(retain(&shared, &mut manifest, cutoff));
                if let Err(e) = &r {
                    tracing::error!(error = %e, "archive retention failed; retried on the next round");
                }
                if let Some(d) = done {
                    let _ = d.send(r);
                }
                continue;
            }
        };
        attempt += 1;
        let started = Instant::now();
        let r = rt.block_on(seal(&shared.archive, &mut manifest, &job, &cfg, attempt));
        let r = r.map(|files| {
            let rows: u64 = files.iter().map(|f| f.rows).sum();
            let bytes: u64 = files.iter().map(|f| f.bytes).sum();
            let n_files = files.len();
            commit(&shared, files, &job);
            let ms = started.elapsed().as_millis() as u64;
            let st = &shared.stats;
            st.seals.fetch_add(1, Relaxed);
            st.rows_sealed.fetch_add(rows, Relaxed);
            st.bytes_written.fetch_add(bytes, Relaxed);
            st.seal_us_total
                .fetch_add(started.elapsed().as_micros() as u64, Relaxed);
            tracing::debug!(
                rows,
                bytes,
                ms,
                next_lsn = job.next_lsn,
                "sealed raw events"
            );
            SealReport {
                rows,
                files: n_files,
                bytes,
                elapsed_ms: ms,
                next_lsn: job.next_lsn,
            }
        });
        if let Err(e) = &r {
            shared.stats.seal_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "sealing raw events failed; they stay in memory and the seal is retried");
        }
        in_flight.store(false, SeqCst);
        if let Some(done) = job.done.take() {
            let _ = done.send(r);
        }
    }
}

/// Archive retention: the manifest forgets the files first (so a crash
/// leaves orphans, deleted on the next start, never dangling entries), then
/// queries stop seeing them, then they are deleted.
async fn retain(shared: &RawShared, manifest: &mut Manifest, cutoff: Millis) -> Result<(u64, u64)> {
    let old: Vec<Arc<ArchiveFile>> = shared
        .files
        .read()
        .iter()
        .filter(|f| f.hour() + HOUR_MS <= cutoff)
        .cloned()
        .collect();
    if old.is_empty() {
        return Ok((0, 0));
    }
    let paths: Vec<String> = old.iter().map(|f| f.path.clone()).collect();
    manifest.append(Entry::Replace {
        remove: &paths,
        add: &[],
    })?;
    shared.files.write().retain(|f| f.hour() + HOUR_MS > cutoff);
    shared.bump_version();
    let rows: u64 = old.iter().map(|f| f.rows).sum();
    for p in &paths {
        if let Err(e) = shared.archive.delete(p).await {
            tracing::warn!(path = %p, error = %e, "archive retention: could not delete a file (deleted on the next start)");
        }
    }
    shared
        .stats
        .files_deleted
        .fetch_add(old.len() as u64, Relaxed);
    shared.stats.rows_deleted.fetch_add(rows, Relaxed);
    tracing::info!(files = old.len(), rows, cutoff = %tally_types::time::format_rfc3339(cutoff), "archive retention deleted files");
    Ok((old.len() as u64, rows))
}

/// One compaction round: first deletes files replaced by earlier rounds
/// whose grace period is over, then merges, per (tenant, hour), small files
/// into one file ([`merge_files`]). Crash-safe like a seal: the new file is written
/// first (an orphan if the manifest entry never lands), then one Replace
/// entry swaps the files, then queries see the swap, and the old files go
/// only after the grace period (or as orphans on the next start).
async fn compact(
    shared: &RawShared,
    manifest: &mut Manifest,
    cfg: &RawConfig,
    attempt: u64,
    graveyard: &mut Vec<Buried>,
) -> Result<CompactReport> {
    let mut report = CompactReport::default();
    let grace = Duration::from_millis(cfg.compact_grace_ms);
    report.deleted += bury(shared, manifest, graveyard, grace).await?;
    let files: Vec<Arc<ArchiveFile>> = shared.files.read().clone();
    fn describe(f: &Arc<ArchiveFile>) -> (&str, Millis, u64) {
        (&f.tenant, f.hour(), f.rows)
    }
    // Oldest first: paths carry the seal's lsn.
    let groups = compaction_groups(
        &files,
        describe,
        |a, b| a.path.cmp(&b.path),
        cfg.compact_files,
        cfg.compact_rows,
    );
    for group in groups {
        let (tenant, hour) = (group[0].tenant.clone(), group[0].hour());
        let mut inputs = Vec::with_capacity(group.len());
        for f in &group {
            let bytes = shared.archive.get(&f.path).await?;
            let meta = ParquetMetaDataReader::new()
                .with_page_index_policy(PageIndexPolicy::Optional)
                .parse_and_finish(&bytes)?;
            inputs.push((bytes, meta));
        }
        let Some((merged_rows, bytes)) = merge_files(&inputs, cfg)? else {
            continue;
        };
        let last = group.iter().map(|f| f.path.as_str()).max().unwrap_or("");
        let stem = last
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_prefix("part-"))
            .and_then(|n| n.get(..20))
            .unwrap_or("00000000000000000000");
        // Named `.merging` (not `*.parquet`) until the replaced files go,
        // so a reader globbing the directory never sees both.
        let path = format!(
            "{}/part-{stem}-c{attempt:04}{MERGING}",
            hive_dir(&tenant, hour)
        );
        let merged = ArchiveFile {
            path: path.clone(),
            tenant: tenant.clone(),
            min_ts: group.iter().map(|f| f.min_ts).min().unwrap_or(hour),
            max_ts: group.iter().map(|f| f.max_ts).max().unwrap_or(hour),
            rows: merged_rows,
            bytes: bytes.len() as u64,
        };
        shared.archive.put(&path, bytes).await?;
        let removed: Vec<String> = group.iter().map(|f| f.path.clone()).collect();
        if let Err(e) = manifest.append(Entry::Replace {
            remove: &removed,
            add: std::slice::from_ref(&merged),
        }) {
            let _ = shared.archive.delete(&path).await;
            return Err(e);
        }
        {
            let mut fl = shared.files.write();
            fl.retain(|f| !removed.contains(&f.path));
            fl.push(Arc::new(merged));
        }
        shared.bump_version();
        report.files_in += removed.len();
        report.files_out += 1;
        report.rows += merged_rows;
        let st = &shared.stats;
        st.files_compacted.fetch_add(removed.len() as u64, Relaxed);
        graveyard.push(Buried {
            at: Instant::now(),
            old: removed,
            merging: Some(path),
        });
    }
    report.deleted += bury(shared, manifest, graveyard, grace).await?;
    Ok(report)
}

/// Which files compaction merges: small files (under `compact_rows`
/// rows) of one (tenant, hour), once there are `compact_files` of them,
/// or two once the tenant has files of a later hour; each group in
/// `order`, cut where its rows would pass `compact_rows`. `describe`
/// answers a file's tenant, hour and rows. Shared by the embedded store's
/// compaction and Kafka mode's, which keep their listings differently.
pub fn compaction_groups<'a, F>(
    files: &'a [F],
    describe: impl for<'b> Fn(&'b F) -> (&'b str, Millis, u64),
    order: impl Fn(&F, &F) -> std::cmp::Ordering,
    compact_files: usize,
    compact_rows: u64,
) -> Vec<Vec<&'a F>> {
    let mut groups: BTreeMap<(&str, Millis), Vec<&F>> = BTreeMap::new();
    let mut newest: HashMap<&str, Millis> = HashMap::new();
    for f in files {
        let (tenant, hour, rows) = describe(f);
        let n = newest.entry(tenant).or_insert(hour);
        *n = (*n).max(hour);
        if rows < compact_rows {
            groups.entry((tenant, hour)).or_default().push(f);
        }
    }
    let mut out = Vec::new();
    for ((tenant, hour), mut group) in groups {
        let over = newest.get(tenant).is_some_and(|&n| n > hour);
        if !(group.len() >= compact_files.max(2) || (over && group.len() >= 2)) {
            continue;
        }
        group.sort_by(|a, b| order(a, b));
        let mut rows = 0;
        group.retain(|f| {
            rows += describe(f).2;
            rows <= compact_rows
        });
        if group.len() >= 2 {
            out.push(group);
        }
    }
    out
}

/// Row groups of the files to merge averaging at least this many rows are
/// copied into the merged file as they are encoded; smaller ones are
/// decoded, sorted and encoded again.
pub(crate) const SPLICE_ROWS: u64 = 16 * 1024;

/// The files of one (tenant, hour) as one Parquet file. Files of large row
/// groups (a busy tenant's seals) are spliced: their column chunks are
/// copied byte for byte, row group after row group in seal order, so
/// merging costs I/O and no re-encoding; each row group stays sorted by
/// time and keeps its statistics, so time filters prune as before. Files
/// of small row groups (a quiet tenant's) are decoded and written again as
/// one sorted file: cheap, since they are small, and a file of many tiny
/// row groups would cost every scan. Answers the rows and the file.
fn merge_files(
    inputs: &[(Bytes, ParquetMetaData)],
    cfg: &RawConfig,
) -> Result<Option<(u64, Bytes)>> {
    let Some((_, first)) = inputs.first() else {
        return Ok(None);
    };
    let fm = first.file_metadata();
    let groups: usize = inputs.iter().map(|(_, m)| m.num_row_groups()).sum();
    let rows: u64 = inputs
        .iter()
        .map(|(_, m)| m.file_metadata().num_rows().max(0) as u64)
        .sum();
    let same_schema = inputs
        .iter()
        .all(|(_, m)| m.file_metadata().schema_descr() == fm.schema_descr());
    if groups == 0 || rows / (groups as u64) < SPLICE_ROWS || !same_schema {
        // Files of older formats (fewer columns) merge with newer ones:
        // each batch is read into today's schema.
        let mut batches = Vec::new();
        for (bytes, _) in inputs {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                bytes.clone(),
            )?
            .build()?;
            for b in reader {
                batches.push(crate::schema::to_events_schema(&b?)?);
            }
        }
        // All in one hour: one part.
        return Ok(sorted_parts(&batches, cfg)?
            .into_iter()
            .next()
            .map(|p| (p.rows, p.bytes)));
    }
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(
        &mut buf,
        fm.schema_descr().root_schema_ptr(),
        Arc::new(writer_props(cfg)),
    )?;
    // The Arrow schema (time zones) readers take the column types from.
    for kv in fm.key_value_metadata().into_iter().flatten() {
        w.append_key_value_metadata(kv.clone());
    }
    for (bytes, meta) in inputs {
        let (cols, offs) = (meta.column_index(), meta.offset_index());
        for (g, rg) in meta.row_groups().iter().enumerate() {
            let mut out = w.next_row_group()?;
            for (c, column) in rg.columns().iter().enumerate() {
                out.append_column(
                    bytes,
                    ColumnCloseResult {
                        bytes_written: column.compressed_size() as u64,
                        rows_written: rg.num_rows() as u64,
                        metadata: column.clone(),
                        bloom_filter: Sbbf::read_from_column_chunk(column, bytes).ok().flatten(),
                        column_index: cols.and_then(|i| i.get(g)?.get(c).cloned()),
                        offset_index: offs.and_then(|i| i.get(g)?.get(c).cloned()),
                    },
                )?;
            }
            out.close()?;
        }
    }
    w.close()?;
    Ok(Some((rows, Bytes::from(buf))))
}

/// The files of one (tenant, hour), in order, as one Parquet file (as
/// compaction merges them: spliced, or sorted and written again when
/// small): the rows and the bytes; None without input. For a writer that
/// keeps its own listing (Kafka mode).
pub fn merge_parquet(files: &[Bytes], zstd_level: i32) -> Result<Option<(u64, Bytes)>> {
    let mut inputs = Vec::with_capacity(files.len());
    for bytes in files {
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .parse_and_finish(bytes)?;
        inputs.push((bytes.clone(), meta));
    }
    let mut cfg = RawConfig::new(PathBuf::new(), 1);
    cfg.zstd_level = zstd_level;
    merge_files(&inputs, &cfg)
}

/// A merged file still named `.merging` at start (stopped within its grace
/// period): no query is running, so it gets its `.parquet` name now; the
/// files it replaced are orphans and go with them.
fn promote_at_start(
    rt: &tokio::runtime::Runtime,
    archive: &Archive,
    manifest: &mut Manifest,
) -> Result<()> {
    let merging: Vec<Arc<ArchiveFile>> = manifest
        .state
        .files
        .values()
        .filter(|f| f.path.ends_with(MERGING))
        .cloned()
        .collect();
    for f in merging {
        rt.block_on(rename_merged(archive, manifest, &f))?;
    }
    Ok(())
}

/// A `.merging` file under its `.parquet` name: a copy (a hard link
/// locally), then one Replace entry. Answers the renamed file.
async fn rename_merged(
    archive: &Archive,
    manifest: &mut Manifest,
    file: &ArchiveFile,
) -> Result<ArchiveFile> {
    let renamed = ArchiveFile {
        path: format!("{}.parquet", file.path.trim_end_matches(MERGING)),
        ..file.clone()
    };
    archive.copy(&file.path, &renamed.path).await?;
    manifest.append(Entry::Replace {
        remove: std::slice::from_ref(&file.path),
        add: std::slice::from_ref(&renamed),
    })?;
    Ok(renamed)
}

/// Suffix of a merged file while the files it replaces still exist.
const MERGING: &str = ".merging";

/// Files compaction replaced, waiting out their grace period (queries that
/// started before the swap may still read them).
pub(crate) struct Buried {
    at: Instant,
    old: Vec<String>,
    /// The merged file, still under its `.merging` name.
    merging: Option<String>,
}

/// Gives a live merged file its `.parquet` name ([`rename_merged`]) and
/// swaps it in the list queries read.
async fn promote(shared: &RawShared, manifest: &mut Manifest, merging: &str) -> Result<()> {
    let Some(file) = shared
        .files
        .read()
        .iter()
        .find(|f| f.path == merging)
        .cloned()
    else {
        return Ok(());
    };
    let renamed = rename_merged(&shared.archive, manifest, &file).await?;
    {
        let mut fl = shared.files.write();
        fl.retain(|f| f.path != merging);
        fl.push(Arc::new(renamed));
    }
    shared.bump_version();
    Ok(())
}

/// For each compaction whose grace period is over: the merged file gets its
/// `.parquet` name, then the replaced files are deleted (a reader globbing
/// the directory sees both for that moment only), and the `.merging` name
/// waits out a grace period of its own. Answers how many files went.
async fn bury(
    shared: &RawShared,
    manifest: &mut Manifest,
    graveyard: &mut Vec<Buried>,
    grace: Duration,
) -> Result<usize> {
    let mut n = 0;
    while let Some(i) = graveyard.iter().position(|b| b.at.elapsed() >= grace) {
        let b = graveyard.swap_remove(i);
        if let Some(m) = &b.merging
            && let Err(e) = promote(shared, manifest, m).await
        {
            graveyard.push(b);
            return Err(e);
        }
        for p in &b.old {
            if let Err(e) = shared.archive.delete(p).await {
                tracing::warn!(path = %p, error = %e, "archive compaction: could not delete a replaced file (deleted on the next start)");
            }
            n += 1;
        }
        if let Some(m) = b.merging {
            graveyard.push(Buried {
                at: Instant::now(),
                old: vec![m],
                merging: None,
            });
        }
    }
    Ok(n)
}

/// Makes a seal visible: files in, sealed hot batches out, in that order
/// and under both locks (see [`RawShared::snapshot`]).
fn commit(shared: &RawShared, files: Vec<ArchiveFile>, job: &SealJob) {
    let (through_seq, next_lsn) = (job.through_seq, job.next_lsn);
    let mut fl = shared.files.write();
    let mut hot = shared.hot.write();
    shared
        .stats
        .files_written
        .fetch_add(files.len() as u64, Relaxed);
    fl.extend(files.into_iter().map(Arc::new));
    let mut rows = 0;
    let mut bytes = 0;
    for v in hot.tenants.values_mut() {
        v.retain(|b| b.seq > through_seq);
        for b in v.iter() {
            rows += b.batch.num_rows();
            bytes += batch_memory(&b.batch);
        }
    }
    hot.tenants.retain(|_, v| !v.is_empty());
    hot.rows = rows;
    hot.bytes = bytes;
    shared.sealed_lsn.store(next_lsn, Relaxed);
    *shared.sealed_offsets.lock() = job.offsets.clone();
    drop(hot);
    drop(fl);
    shared.bump_version();
}

/// Writes the job's rows as Parquet (one file per tenant and hour, sorted
/// by time) and appends the manifest entry. Returns the files written.
async fn seal(
    archive: &Archive,
    manifest: &mut Manifest,
    job: &SealJob,
    cfg: &RawConfig,
    attempt: u64,
) -> Result<Vec<ArchiveFile>> {
    let mut written: Vec<ArchiveFile> = Vec::new();
    let result: Result<()> = async {
        for (tenant, batches) in &job.tenants {
            for part in sorted_parts(batches, cfg)? {
                let path = format!(
                    "{}/part-{:020}-{attempt:04}.parquet",
                    hive_dir(tenant, part.hour),
                    job.next_lsn
                );
                written.push(ArchiveFile {
                    path: path.clone(),
                    tenant: tenant.clone(),
                    min_ts: part.min_ts,
                    max_ts: part.max_ts,
                    rows: part.rows,
                    bytes: part.bytes.len() as u64,
                });
                archive.put(&path, part.bytes).await?;
            }
        }
        manifest.append(Entry::Seal {
            next_lsn: job.next_lsn,
            offsets: &job.offsets,
            add: &written,
        })
    }
    .await;
    if let Err(e) = result {
        for f in &written {
            let _ = archive.delete(&f.path).await;
        }
        return Err(e);
    }
    Ok(written)
}

/// One hour of rows as a Parquet file.
pub(crate) struct Part {
    pub(crate) hour: Millis,
    pub(crate) min_ts: Millis,
    pub(crate) max_ts: Millis,
    pub(crate) rows: u64,
    pub(crate) bytes: Bytes,
}

/// The rows of `batches` sorted by `ts` and cut at hour boundaries, one
/// Parquet file per hour. Only the timestamps are sorted ([`time_order`],
/// stable: rows of one millisecond keep their arrival order); the rows then go to the
/// Parquet writer as slices of their batches where they arrived in order
/// (long runs), otherwise gathered from the batches a row group at a time:
/// never concatenated and then reordered whole.
pub(crate) fn sorted_parts(batches: &[RecordBatch], cfg: &RawConfig) -> Result<Vec<Part>> {
    let mut ts: Vec<&[Millis]> = Vec::with_capacity(batches.len());
    for b in batches {
        let a = b
            .column(col::TS)
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| Error::Config("ts column type".into()))?;
        ts.push(a.values());
    }
    let keys = time_order(&ts);
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    let mut parts = Vec::new();
    let mut idx: Vec<(usize, usize)> = Vec::new();
    let mut start = 0;
    while start < keys.len() {
        let hour = tally_types::time::align_down(keys[start].0, HOUR_MS);
        let end = start + keys[start..].partition_point(|k| k.0 < hour + HOUR_MS);
        let mut w = FileEncoder::new(writer_props(cfg), cfg.zstd_level, cfg.row_group_rows)?;
        let hour_keys = &keys[start..end];
        let runs = sorted_runs(hour_keys);
        if hour_keys.len() >= MIN_RUN_ROWS * runs.len() {
            // Long runs of consecutive rows of one batch (rows that arrived
            // in order): written as slices, without gathering them first.
            for (b, r, n) in runs {
                w.write(&batches[b].slice(r, n))?;
            }
        } else {
            for chunk in hour_keys.chunks(cfg.row_group_rows.max(1)) {
                idx.clear();
                idx.extend(chunk.iter().map(|&(_, b, r)| (b as usize, r as usize)));
                w.write(&interleave_record_batch(&refs, &idx)?)?;
            }
        }
        let buf = w.finish()?;
        parts.push(Part {
            hour,
            min_ts: keys[start].0,
            max_ts: keys[end - 1].0,
            rows: (end - start) as u64,
            bytes: Bytes::from(buf),
        });
        start = end;
    }
    Ok(parts)
}

/// A counting sort needs a counter per millisecond between the least and
/// the greatest timestamp: used while there are at most this many per row.
const COUNTING_SPAN_PER_ROW: usize = 2;

/// `(ts, batch, row)` of every row, sorted by `ts`; rows of equal `ts` in
/// batch, then row order (a stable sort).
///
/// A seal's rows span minutes of event time at millisecond resolution, so
/// nearly always there are fewer milliseconds than rows: then a counting
/// sort (two linear passes, no comparisons), else a merge sort.
pub(crate) fn time_order(ts: &[&[Millis]]) -> Vec<(Millis, u32, u32)> {
    let n: usize = ts.iter().map(|t| t.len()).sum();
    let (lo, hi) = ts
        .iter()
        .flat_map(|t| t.iter())
        .fold((Millis::MAX, Millis::MIN), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let mut keys: Vec<(Millis, u32, u32)> = Vec::with_capacity(n);
    let span = (i128::from(hi) - i128::from(lo) + 1).max(0) as u128;
    let counting = n > 0 && n < u32::MAX as usize && span <= (COUNTING_SPAN_PER_ROW * n) as u128;
    if !counting {
        for (b, t) in ts.iter().enumerate() {
            keys.extend(t.iter().enumerate().map(|(r, &v)| (v, b as u32, r as u32)));
        }
        keys.sort_by_key(|k| k.0);
        return keys;
    }
    // next[d]: where the next row of millisecond `lo + d` goes.
    let mut next = vec![0u32; span as usize + 1];
    for t in ts {
        for &v in t.iter() {
            next[(v - lo) as usize + 1] += 1;
        }
    }
    for d in 1..next.len() {
        next[d] += next[d - 1];
    }
    keys.resize(n, (0, 0, 0));
    for (b, t) in ts.iter().enumerate() {
        for (r, &v) in t.iter().enumerate() {
            let at = &mut next[(v - lo) as usize];
            keys[*at as usize] = (v, b as u32, r as u32);
            *at += 1;
        }
    }
    keys
}

/// Sorted rows are written as slices of their batches when runs of
/// consecutive rows average at least this many rows.
const MIN_RUN_ROWS: usize = 64;

/// Sorted `(ts, batch, row)` keys as runs `(batch, first row, rows)` of
/// consecutive rows of one batch.
fn sorted_runs(keys: &[(Millis, u32, u32)]) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for &(_, b, r) in keys {
        match runs.last_mut() {
            Some((rb, rr, n)) if *rb == b as usize && *rr + *n == r as usize => *n += 1,
            _ => runs.push((b as usize, r as usize, 1)),
        }
    }
    runs
}

/// File-level settings of the archive's files: created-by and the codec
/// named in the footer. Pages themselves are encoded by
/// [`FileEncoder`] (see `encode.rs` for the encodings and statistics);
/// compaction's splice copies them as they are.
fn writer_props(cfg: &RawConfig) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(cfg.zstd_level).unwrap_or_default(),
        ))
        .set_max_row_group_row_count(Some(cfg.row_group_rows))
        .set_created_by("tally".into())
        .build()
}
