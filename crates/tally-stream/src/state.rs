//! Checkpoints: the processor's state and the log offsets it covers, written
//! together, atomically, so recovery is "load the newest valid checkpoint,
//! replay the log from its offsets" instead of replaying the whole log.
//!
//! # Files (`<data-dir>/state/`)
//!
//! ```text
//! checkpoint-<seq:020>.ckpt  "TALLYCK4" frame(checkpoint)      newest two kept
//! sealed-<gen:06>.bin        frame(kind, tenant, time, bucket)* final minutes, hours
//! dedupe-<gen:06>.bin        frame(tenant, (key, minute)*)*    dedupe journal
//! late-<gen:06>.bin          frame(late DLQ entry)*            late DLQ journal
//! sessions-<gen:06>.bin      frame(floor | gone | session)*    session index journal
//! ```
//!
//! Frames are `len:u32 crc32:u32 payload` ([`tally_types::bin`]). The three
//! journals are append-only between checkpoints; a checkpoint names the
//! generation and the length of each. Recovery cuts every journal back to the
//! length its checkpoint names, so anything written after that checkpoint
//! (which the log replay will write again) is dropped: the sinks are
//! idempotent by position. Sealed buckets are keyed by (kind, tenant, time)
//! and the last one wins, so re-sealing a minute changed by a correction is
//! an append, not a rewrite.
//!
//! # Downsampling in the sealed journal
//!
//! Kind 0 is a minute, kind 1 a downsampled hour. Rollup retention folds old
//! minutes into hours and appends the hours; the checkpoint names the two
//! horizons (minutes before `downsampled_to` were folded, hours before
//! `hours_from` dropped), and recovery skips frames behind them. The journal
//! is rewritten into a new generation holding only live buckets once it has
//! doubled since its last rewrite (and passed the compaction size), so its
//! size stays within twice what it holds. A version-2 checkpoint (frames
//! without a kind) is read as minutes and its journal rewritten at the next
//! checkpoint.
//!
//! # Event clocks per tenant (version 4)
//!
//! A checkpoint holds one clock per tenant (its partitions' max event and
//! append times, watermark, sweep and seal horizons), and each dedupe frame
//! names its tenant, so every tenant's dedupe entries are swept by its own
//! watermark. A version-3 (or 2) checkpoint had one clock for all tenants:
//! recovery gives that clock to each tenant with open minutes (the tenants
//! that were live), the seal horizon to every tenant, and keeps the dedupe
//! entries, which name no tenant, in a legacy set checked for all tenants;
//! the next checkpoint rewrites the dedupe journal in the version-4 form.
//!
//! # Sessions (version 5)
//!
//! The session index (`tally_store::SessionIndex`) journals what changed
//! since the last checkpoint: floors raised, sessions gone (merged away,
//! re-keyed, dropped for the cap) and sessions as they are now, in that
//! order; recovery applies the frames in order. The journal is rewritten
//! whole once it has doubled since its last rewrite (and passed the
//! compaction size). A checkpoint says whether the index was on; one that
//! had none (older versions, or the index off) leaves each tenant's floor
//! past its newest event, so only ranges after it are answered from the
//! index.
//!
//! # Invariants
//!
//! - A checkpoint is written to a temporary file, fsynced, renamed into place
//!   and the directory fsynced: it is whole or absent. A checkpoint whose
//!   checksum fails is ignored and the previous one is used.
//! - Journals are fsynced before the checkpoint that covers them is renamed.
//! - On any I/O error a checkpoint attempt changes nothing: journals are cut
//!   back, the processor's journal is kept, and the next attempt retries.
//! - A journal is rewritten (compacted) into a new generation; the files of a
//!   generation are deleted only when no kept checkpoint names it.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tally_store::MinuteBucket;
use tally_types::Millis;
use tally_types::bin::{Dec, DecodeError, Enc, frame, unframe};

use crate::{Clock, DedupeMap, DlqBody, DlqEntry, DlqKind, PartState, Processor, Totals, live};

/// Version 2 added the raw store's dropped ranges; version 3 the rollup
/// horizons and kinds in the sealed journal; version 4 an event clock per
/// tenant and tenant-named dedupe frames; version 5 the sessions journal.
/// A version-1 checkpoint is ignored (the state is rebuilt from the log);
/// versions 2 to 4 are read.
const MAGIC: &[u8; 8] = b"TALLYCK5";
const MAGIC_V4: &[u8; 8] = b"TALLYCK4";
const MAGIC_V3: &[u8; 8] = b"TALLYCK3";
const MAGIC_V2: &[u8; 8] = b"TALLYCK2";
/// The tenant name legacy dedupe entries are written under (not a valid
/// tenant name).
const LEGACY_TENANT: &str = "";
/// Dedupe frames of a backfill clock name its tenant after this byte (which
/// no tenant name holds).
const BACKFILL_PREFIX: char = '\u{1}';
/// Sealed journal frame kinds.
const KIND_MINUTE: u8 = 0;
const KIND_HOUR: u8 = 1;
/// A journal is compacted into a new generation past this many bytes when
/// most of it is dead.
const COMPACT_BYTES: u64 = 64 << 20;
/// Dedupe entries per frame when a journal is rewritten.
const DEDUPE_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Decode { path: PathBuf, source: DecodeError },
    #[error(
        "{path} holds {have} valid bytes but checkpoint {seq} needs {need}: the state directory is damaged; \
         move it away and rebuild it from the log with `tally replay --from 0`"
    )]
    Damaged {
        path: PathBuf,
        seq: u64,
        have: u64,
        need: u64,
    },
    #[error(
        "checkpoint {seq} covers {have} log partitions but the log has {want}; rebuild the state with `tally replay --from 0`"
    )]
    Partitions { seq: u64, have: usize, want: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// One append-only journal file of a given generation.
struct Journal {
    dir: PathBuf,
    prefix: &'static str,
    gen_: u64,
    file: File,
    len: u64,
}

impl Journal {
    fn path(dir: &Path, prefix: &str, gen_: u64) -> PathBuf {
        dir.join(format!("{prefix}-{gen_:06}.bin"))
    }

    /// Creates (or empties) generation `gen_`.
    fn create(dir: &Path, prefix: &'static str, gen_: u64) -> Result<Journal, StateError> {
        let path = Self::path(dir, prefix, gen_);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            prefix,
            gen_,
            file,
            len: 0,
        })
    }

    /// Opens generation `gen_` cut to `len` bytes; returns it and its contents.
    fn open_at(
        dir: &Path,
        prefix: &'static str,
        gen_: u64,
        len: u64,
        seq: u64,
    ) -> Result<(Journal, Vec<u8>), StateError> {
        let path = Self::path(dir, prefix, gen_);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_err(&path))?;
        let (_, valid) = unframe(&data[..data.len().min(len as usize)]);
        if (valid as u64) < len {
            return Err(StateError::Damaged {
                path,
                seq,
                have: valid as u64,
                need: len,
            });
        }
        if data.len() as u64 > len {
            file.set_len(len).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            data.truncate(len as usize);
        }
        // Appends continue at `len`, not where reading stopped.
        file.seek(SeekFrom::Start(len)).map_err(io_err(&path))?;
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                prefix,
                gen_,
                file,
                len,
            },
            data,
        ))
    }

    /// Appends and fsyncs; on error cuts the file back to its length before.
    fn append(&mut self, data: &[u8]) -> Result<(), StateError> {
        if data.is_empty() {
            return Ok(());
        }
        let path = Self::path(&self.dir, self.prefix, self.gen_);
        let r = self
            .file
            .write_all(data)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            self.rollback(self.len);
            return Err(StateError::Io { path, source: e });
        }
        self.len += data.len() as u64;
        Ok(())
    }

    /// Appends `data`, or with `rewrite` writes it as the whole of the
    /// next generation, returned to take this one's place once a
    /// checkpoint names it.
    fn write(&mut self, data: &[u8], rewrite: bool) -> Result<Option<Journal>, StateError> {
        if !rewrite {
            self.append(data)?;
            return Ok(None);
        }
        let mut j = Journal::create(&self.dir, self.prefix, self.gen_ + 1)?;
        j.append(data)?;
        Ok(Some(j))
    }

    fn rollback(&mut self, len: u64) {
        let _ = self.file.set_len(len);
        let _ = self.file.sync_data();
        self.len = len;
        // Appends go to the end; O_APPEND is not used, so move the cursor.
        let _ = self.file.seek(SeekFrom::Start(len));
    }

    /// Deletes the files of this journal whose generation is not in `keep`.
    fn cleanup(&self, keep: &[u64]) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(g) = name
                .to_str()
                .and_then(|n| n.strip_prefix(self.prefix))
                .and_then(|n| n.strip_prefix('-'))
                .and_then(|n| n.strip_suffix(".bin"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if !keep.contains(&g) && g != self.gen_ {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// The position of one journal a checkpoint covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct JournalRef {
    gen_: u64,
    len: u64,
}

/// What recovery loaded.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Sequence number of the checkpoint used (`None`: no checkpoint, fresh state).
    pub checkpoint: Option<u64>,
    /// Newer checkpoints that were invalid and skipped.
    pub skipped: Vec<String>,
    pub sealed_buckets: usize,
    pub open_buckets: usize,
    pub dedupe_entries: usize,
    pub late_entries: usize,
    /// Sessions the index holds after recovery.
    pub sessions: usize,
    pub elapsed_ms: u64,
}

/// What one checkpoint wrote.
#[derive(Debug, Clone, Default)]
pub struct CheckpointReport {
    pub seq: u64,
    pub sealed_buckets: usize,
    pub open_buckets: usize,
    pub dedupe_entries: usize,
    pub late_entries: usize,
    pub bytes: u64,
    pub elapsed_us: u64,
    /// Whether the sealed journal was rewritten into a new generation.
    pub sealed_rewritten: bool,
    /// Session index frames written, and whether the journal was rewritten.
    pub session_frames: usize,
    pub sessions_rewritten: bool,
}

/// A checkpoint prepared on the processor thread, to be written by
/// [`StateStore::write`] (possibly on another thread).
pub struct CheckpointJob {
    seq: u64,
    /// Each clock's seal horizon before this job (restored on failure;
    /// true: a backfill clock).
    prev_sealed: Vec<(bool, Box<str>, Millis)>,
    sealed_buf: Vec<u8>,
    sealed_buckets: usize,
    /// `sealed_buf` holds every sealed bucket: it starts a new generation.
    sealed_rewrite: bool,
    downsampled_to: Millis,
    hours_from: Millis,
    open: Enc,
    open_buckets: usize,
    /// The processor's dedupe journal per tenant, taken; given back by
    /// `restore` on failure.
    dedupe: TenantEntries,
    /// Every live dedupe entry, when the journal is rewritten.
    dedupe_all: Option<TenantEntries>,
    late: Vec<DlqEntry>,
    /// Every held late entry, when the journal is rewritten.
    late_all: Option<Vec<DlqEntry>>,
    reseal: BTreeSet<(Box<str>, Millis)>,
    rehour: BTreeSet<(Box<str>, Millis)>,
    offsets: Vec<u64>,
    /// Every tenant's clock, with its new seal horizon.
    clocks: Vec<ClockState>,
    /// Every backfill clock.
    backfills: Vec<ClockState>,
    totals: Totals,
    corrected: Vec<u128>,
    legacy_corrected: Vec<u64>,
    raw_drops: Vec<(u64, Vec<(u32, u32)>)>,
    /// Whether the session index is on, its frames, and whether they are
    /// every session (a new generation).
    sessions_on: bool,
    sessions_buf: Vec<u8>,
    session_frames: usize,
    sessions_rewrite: bool,
}

/// Dedupe entries per clock name (a backfill clock's after [`BACKFILL_PREFIX`]).
type TenantEntries = Vec<(Box<str>, Vec<(u128, Millis)>)>;

/// A tenant's clock as a checkpoint holds it.
#[derive(Debug, Clone)]
pub(crate) struct ClockState {
    tenant: Box<str>,
    parts: Vec<PartState>,
    watermark: Option<Millis>,
    swept_to: Millis,
    sealed_to: Millis,
    counts: crate::TenantCounts,
}

impl ClockState {
    fn encode(&self, e: &mut Enc) {
        e.str(&self.tenant);
        for s in &self.parts {
            e.opt_i64(s.max_ts);
            e.i64(s.last_append_ms);
        }
        e.opt_i64(self.watermark);
        e.i64(self.swept_to);
        e.i64(self.sealed_to);
        e.u64(self.counts.counted);
        e.u64(self.counts.duplicates);
        e.u64(self.counts.late);
    }

    fn decode_parts(d: &mut Dec<'_>, n: usize) -> Result<Vec<PartState>, DecodeError> {
        let mut parts = Vec::with_capacity(n);
        for _ in 0..n {
            parts.push(PartState {
                max_ts: d.opt_i64()?,
                last_append_ms: d.i64()?,
            });
        }
        Ok(parts)
    }

    /// One clock of a processor as it is now (what a checkpoint holds).
    pub(crate) fn of(tenant: &str, c: &Clock) -> ClockState {
        ClockState {
            tenant: tenant.into(),
            parts: c.parts.clone(),
            watermark: c.watermark,
            swept_to: c.swept_to,
            sealed_to: c.sealed_to,
            counts: c.counts,
        }
    }

    pub(crate) fn encode_list(e: &mut Enc, list: &[ClockState]) {
        e.u32(list.len() as u32);
        for c in list {
            c.encode(e);
        }
    }

    pub(crate) fn decode_list(d: &mut Dec<'_>, n: usize) -> Result<Vec<ClockState>, DecodeError> {
        let nt = d.count(4 + n * 9 + 41)?;
        let mut list = Vec::with_capacity(nt);
        for _ in 0..nt {
            let tenant = d.str()?.into();
            let parts = ClockState::decode_parts(d, n)?;
            list.push(ClockState {
                tenant,
                parts,
                watermark: d.opt_i64()?,
                swept_to: d.i64()?,
                sealed_to: d.i64()?,
                counts: crate::TenantCounts {
                    counted: d.u64()?,
                    duplicates: d.u64()?,
                    late: d.u64()?,
                },
            });
        }
        Ok(list)
    }

    pub(crate) fn tenant(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn into_clock(self) -> Clock {
        Clock {
            parts: self.parts,
            watermark: self.watermark,
            sealed_to: self.sealed_to,
            swept_to: self.swept_to,
            dedupe: DedupeMap::default(),
            journal: Vec::new(),
            counts: self.counts,
        }
    }
}

impl CheckpointJob {
    /// The log offsets this checkpoint covers: recovery replays from them.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// After a failed write: gives `p` back what this job took, ahead of
    /// what `p` journaled since, so the next checkpoint writes it all.
    pub fn restore(self, p: &mut Processor) {
        let n = p.offsets.len();
        for (t, mut entries) in self.dedupe {
            let c = match t.strip_prefix(BACKFILL_PREFIX) {
                Some(t) => p.backfills.entry_ref(t).or_insert_with(|| Clock::new(n)),
                None => p.clocks.entry_ref(&*t).or_insert_with(|| Clock::new(n)),
            };
            entries.append(&mut c.journal);
            c.journal = entries;
        }
        let mut late = self.late;
        late.append(&mut p.journal.late);
        p.journal.late = late;
        p.journal.reseal.extend(self.reseal);
        p.journal.rehour.extend(self.rehour);
        if self.sessions_on {
            p.store
                .write()
                .sessions_mut()
                .give_back(self.sessions_buf, self.sessions_rewrite);
        }
        for (backfill, t, prev) in self.prev_sealed {
            let map = if backfill {
                &mut p.backfills
            } else {
                &mut p.clocks
            };
            if let Some(c) = map.get_mut(&*t) {
                c.sealed_to = c.sealed_to.min(prev);
            }
        }
        p.journal.dirty = true;
    }
}

/// The checkpoint directory of one processor.
pub struct StateStore {
    dir: PathBuf,
    seq: u64,
    sealed: Journal,
    dedupe: Journal,
    late: Journal,
    sessions: Journal,
    /// Size of the sessions journal when last written whole.
    sessions_base: u64,
    /// Dedupe entries in the current dedupe generation (live and dead).
    dedupe_written: u64,
    /// Journal generations named by the previous checkpoint (kept for fallback).
    prev: [u64; 4],
    /// Journals past this size are considered for compaction.
    compact_bytes: u64,
    /// Size of the sealed journal's generation when it was last written
    /// whole (it is rewritten once it has doubled).
    sealed_base: u64,
    /// The sealed journal holds version-2 frames: rewrite it next time.
    sealed_legacy: bool,
    /// The dedupe and late journals are of format 3 (frames without
    /// tenants, 64-bit keys): rewrite both next time.
    dedupe_legacy: bool,
}

fn ckpt_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("checkpoint-{seq:020}.ckpt"))
}

fn list_checkpoints(dir: &Path) -> Result<Vec<u64>, StateError> {
    let mut seqs = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.strip_suffix(".ckpt"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// The decoded body of a checkpoint file.
struct Checkpoint {
    seq: u64,
    /// 2 to 5 (see [`MAGIC`]).
    version: u8,
    offsets: Vec<u64>,
    /// Version 4: one clock per tenant.
    clocks: Vec<ClockState>,
    /// Version 4: backfill clocks.
    backfills: Vec<ClockState>,
    /// Versions 2 and 3: the one clock all tenants shared (tenant empty).
    shared_clock: Option<ClockState>,
    totals: Totals,
    journals: [JournalRef; 3],
    dedupe_written: u64,
    corrected: Vec<u128>,
    /// Format 3 and before: 64-bit keys.
    legacy_corrected: Vec<u64>,
    open: Vec<(String, Millis, MinuteBucket)>,
    raw_drops: VecDeque<(u64, Vec<(u32, u32)>)>,
    downsampled_to: Millis,
    hours_from: Millis,
    sealed_base: u64,
    /// Version 5: whether the session index was on, its journal, and the
    /// journal's size when last written whole.
    sessions: Option<(bool, JournalRef, u64)>,
}

fn encode_totals(e: &mut Enc, t: &Totals) {
    for v in [
        t.records,
        t.counted,
        t.duplicates,
        t.late,
        t.corrections,
        t.replayed,
    ] {
        e.u64(v);
    }
    e.opt_i64(t.last_lsn.map(|l| l as i64));
}

fn decode_totals(d: &mut Dec<'_>) -> Result<Totals, DecodeError> {
    Ok(Totals {
        records: d.u64()?,
        counted: d.u64()?,
        duplicates: d.u64()?,
        late: d.u64()?,
        corrections: d.u64()?,
        replayed: d.u64()?,
        last_lsn: d.opt_i64()?.map(|l| l as u64),
    })
}

fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, DecodeError> {
    let version = match bytes.get(..MAGIC.len()) {
        Some(m) if m == MAGIC => 5,
        Some(m) if m == MAGIC_V4 => 4,
        Some(m) if m == MAGIC_V3 => 3,
        Some(m) if m == MAGIC_V2 => 2,
        _ => {
            return Err(DecodeError {
                at: 0,
                what: "not a checkpoint (magic)",
            });
        }
    };
    let body = &bytes[MAGIC.len()..];
    let (frames, valid) = unframe(body);
    if frames.len() != 1 || valid != body.len() {
        return Err(DecodeError {
            at: MAGIC.len(),
            what: "checksum mismatch or torn file",
        });
    }
    let mut d = Dec::new(frames[0]);
    let seq = d.u64()?;
    let n = d.count(8)?;
    let mut offsets = Vec::with_capacity(n);
    for _ in 0..n {
        offsets.push(d.u64()?);
    }
    let mut clocks = Vec::new();
    let mut backfills = Vec::new();
    let mut shared_clock = None;
    if version >= 4 {
        for list in [&mut clocks, &mut backfills] {
            *list = ClockState::decode_list(&mut d, n)?;
        }
    } else {
        let parts = ClockState::decode_parts(&mut d, n)?;
        shared_clock = Some(ClockState {
            tenant: LEGACY_TENANT.into(),
            parts,
            watermark: d.opt_i64()?,
            swept_to: d.i64()?,
            sealed_to: d.i64()?,
            counts: crate::TenantCounts::default(),
        });
    }
    let totals = decode_totals(&mut d)?;
    let mut journals = [JournalRef::default(); 3];
    for j in &mut journals {
        j.gen_ = d.u64()?;
        j.len = d.u64()?;
    }
    let dedupe_written = d.u64()?;
    let mut corrected = Vec::new();
    let mut legacy_corrected = Vec::new();
    if version >= 4 {
        let nc = d.count(16)?;
        for _ in 0..nc {
            corrected.push(d.u64()? as u128 | (d.u64()? as u128) << 64);
        }
    }
    let nc = d.count(8)?;
    for _ in 0..nc {
        legacy_corrected.push(d.u64()?);
    }
    let nb = d.count(12)?;
    let mut open = Vec::with_capacity(nb);
    for _ in 0..nb {
        let t = d.str()?.to_string();
        let m = d.i64()?;
        open.push((t, m, MinuteBucket::decode(&mut d)?));
    }
    let nd = d.count(12)?;
    let mut raw_drops = VecDeque::with_capacity(nd);
    for _ in 0..nd {
        let lsn = d.u64()?;
        let nr = d.count(8)?;
        let mut ranges = Vec::with_capacity(nr);
        for _ in 0..nr {
            ranges.push((d.u32()?, d.u32()?));
        }
        raw_drops.push_back((lsn, ranges));
    }
    let (downsampled_to, hours_from, sealed_base) = if version == 2 {
        (Millis::MIN, Millis::MIN, 0)
    } else {
        (d.i64()?, d.i64()?, d.u64()?)
    };
    let sessions = if version >= 5 {
        let indexed = match d.u8()? {
            0 => false,
            1 => true,
            _ => return d.err("sessions flag"),
        };
        let j = JournalRef {
            gen_: d.u64()?,
            len: d.u64()?,
        };
        Some((indexed, j, d.u64()?))
    } else {
        None
    };
    if !d.is_empty() {
        return d.err("trailing bytes");
    }
    Ok(Checkpoint {
        seq,
        version,
        offsets,
        clocks,
        backfills,
        shared_clock,
        totals,
        journals,
        dedupe_written,
        corrected,
        legacy_corrected,
        open,
        raw_drops,
        downsampled_to,
        hours_from,
        sealed_base,
        sessions,
    })
}

fn encode_sealed(out: &mut Vec<u8>, kind: u8, tenant: &str, time: Millis, b: &MinuteBucket) {
    let mut e = Enc::new();
    e.u8(kind);
    e.str(tenant);
    e.i64(time);
    b.encode(&mut e);
    frame(out, &e.buf);
}

fn encode_late(out: &mut Vec<u8>, x: &DlqEntry) {
    let mut e = Enc::new();
    e.u64(x.key as u64);
    e.u64((x.key >> 64) as u64);
    e.str(&x.tenant);
    e.str(&x.reason);
    e.i64(x.received_at);
    match &x.body {
        DlqBody::Event(j) => {
            e.u8(0);
            e.str(j);
        }
        DlqBody::Raw(r) => {
            e.u8(1);
            e.str(r);
        }
    }
    frame(out, &e.buf);
}

/// A late DLQ entry; before format 4 its key had 64 bits (returned beside
/// it, the entry's own key recomputed from its event).
fn decode_late(p: &[u8], version: u8) -> Result<(DlqEntry, Option<u64>), DecodeError> {
    let mut d = Dec::new(p);
    let (mut key, key64) = if version >= 4 {
        (d.u64()? as u128 | (d.u64()? as u128) << 64, None)
    } else {
        (0, Some(d.u64()?))
    };
    let tenant = d.str()?.to_string();
    let reason = d.str()?.to_string();
    let received_at = d.i64()?;
    let body = match d.u8()? {
        0 => DlqBody::Event(d.str()?.to_string()),
        1 => DlqBody::Raw(d.str()?.to_string()),
        _ => return d.err("DLQ body tag"),
    };
    if key64.is_some()
        && let DlqBody::Event(j) = &body
        && let Some(id) = serde_json::from_str::<serde_json::Value>(j)
            .ok()
            .and_then(|v| Some(v.get("event_id")?.as_str()?.to_string()))
    {
        key = tally_types::dedupe_key(&tenant, &id);
    }
    Ok((
        DlqEntry {
            kind: DlqKind::Late,
            tenant,
            reason,
            received_at,
            body,
            key,
            replayed: false,
        },
        key64,
    ))
}

fn encode_dedupe(out: &mut Vec<u8>, tenant: &str, entries: &[(u128, Millis)]) {
    for chunk in entries.chunks(DEDUPE_FRAME) {
        let mut e = Enc::new();
        e.buf.reserve(chunk.len() * 24 + tenant.len() + 4);
        e.str(tenant);
        for &(k, v) in chunk {
            e.u64(k as u64);
            e.u64((k >> 64) as u64);
            e.i64(v);
        }
        frame(out, &e.buf);
    }
}

impl StateStore {
    /// Opens `dir` and loads the newest valid checkpoint into `p` (whose
    /// store and DLQ must be empty). The caller then replays the log from
    /// `p.offsets()`.
    pub fn open(dir: &Path, p: &mut Processor) -> Result<(StateStore, RecoveryReport), StateError> {
        let started = Instant::now();
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut report = RecoveryReport::default();
        let mut chosen = None;
        for seq in list_checkpoints(dir)?.into_iter().rev() {
            let path = ckpt_path(dir, seq);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            match decode_checkpoint(&bytes) {
                Ok(c) if c.offsets.len() != p.offsets.len() => {
                    return Err(StateError::Partitions {
                        seq,
                        have: c.offsets.len(),
                        want: p.offsets.len(),
                    });
                }
                Ok(c) => {
                    chosen = Some(c);
                    break;
                }
                Err(e) => {
                    tracing::error!(checkpoint = %path.display(), error = %e, "ignoring an invalid checkpoint");
                    report.skipped.push(format!("{}: {e}", path.display()));
                }
            }
        }
        let Some(c) = chosen else {
            // No checkpoint: whatever journals exist were written before the
            // first checkpoint and are covered by replaying the whole log.
            let store = StateStore {
                dir: dir.to_path_buf(),
                seq: 0,
                sealed: Journal::create(dir, "sealed", 0)?,
                dedupe: Journal::create(dir, "dedupe", 0)?,
                late: Journal::create(dir, "late", 0)?,
                sessions: Journal::create(dir, "sessions", 0)?,
                sessions_base: 0,
                dedupe_written: 0,
                prev: [0; 4],
                compact_bytes: COMPACT_BYTES,
                sealed_base: 0,
                sealed_legacy: false,
                dedupe_legacy: false,
            };
            store.cleanup();
            report.elapsed_ms = started.elapsed().as_millis() as u64;
            return Ok((store, report));
        };
        let [js, jd, jl] = c.journals;
        let (sealed, sealed_data) = Journal::open_at(dir, "sealed", js.gen_, js.len, c.seq)?;
        let (dedupe, dedupe_data) = Journal::open_at(dir, "dedupe", jd.gen_, jd.len, c.seq)?;
        let (late, late_data) = Journal::open_at(dir, "late", jl.gen_, jl.len, c.seq)?;
        let (sessions, sessions_data, sessions_base, indexed) = match c.sessions {
            Some((indexed, j, base)) => {
                let (journal, data) = Journal::open_at(dir, "sessions", j.gen_, j.len, c.seq)?;
                (journal, data, base, indexed)
            }
            None => (Journal::create(dir, "sessions", 0)?, Vec::new(), 0, false),
        };
        let decode_err = |prefix: &str, g: u64| {
            let path = Journal::path(dir, prefix, g);
            move |source| StateError::Decode { path, source }
        };

        // Processor scalars.
        let n = c.offsets.len();
        p.offsets = c.offsets;
        for cs in c.clocks {
            p.clocks.insert(cs.tenant.clone(), cs.into_clock());
        }
        for cs in c.backfills {
            p.backfills.insert(cs.tenant.clone(), cs.into_clock());
        }
        p.totals = c.totals;
        p.corrected = c.corrected.into_iter().collect();
        p.legacy.corrected = c.legacy_corrected.into_iter().collect();
        p.raw_drops = c.raw_drops;

        // Rollups: sealed minutes and hours (the last copy of a bucket wins;
        // buckets behind the horizons were folded or dropped), then open ones.
        {
            let mut store = p.store.write();
            let sealed_path = Journal::path(dir, "sealed", js.gen_);
            let err = |source| StateError::Decode {
                path: sealed_path.clone(),
                source,
            };
            for payload in unframe(&sealed_data).0 {
                let mut d = Dec::new(payload);
                let kind = if c.version == 2 {
                    KIND_MINUTE
                } else {
                    d.u8().map_err(err)?
                };
                let t = d.str().map_err(err)?;
                let time = d.i64().map_err(err)?;
                let b = MinuteBucket::decode(&mut d).map_err(err)?;
                match kind {
                    KIND_MINUTE if time >= c.downsampled_to => store.set_minute(t, time, b),
                    KIND_HOUR if time >= c.hours_from => store.set_hour(t, time, b),
                    KIND_MINUTE | KIND_HOUR => continue,
                    _ => {
                        return Err(err(DecodeError {
                            at: 0,
                            what: "sealed bucket kind",
                        }));
                    }
                }
                report.sealed_buckets += 1;
            }
            store.set_horizons(c.downsampled_to, c.hours_from);
            report.open_buckets = c.open.len();
            // A checkpoint of one shared clock: the tenants with open
            // minutes were live and take it over; every tenant keeps the
            // seal horizon.
            if let Some(shared) = &c.shared_clock {
                for (t, _, _) in &c.open {
                    if !p.clocks.contains_key(t.as_str()) {
                        let mut cs = shared.clone();
                        cs.tenant = t.as_str().into();
                        p.clocks.insert(cs.tenant.clone(), cs.into_clock());
                    }
                }
                let quiet: Vec<Box<str>> = store
                    .tenants()
                    .filter(|t| !p.clocks.contains_key(*t))
                    .map(Box::from)
                    .collect();
                for t in quiet {
                    let mut clock = Clock::new(n);
                    clock.sealed_to = shared.sealed_to;
                    clock.swept_to = shared.swept_to;
                    p.clocks.insert(t, clock);
                }
            }
            for (t, m, b) in c.open {
                store.set_minute(&t, m, b);
            }
            store.commit();
        }

        // Dedupe: entries that still block their key at their tenant's
        // watermark (the shared one for a version-3 journal).
        let lateness = p.cfg.allowed_lateness_ms;
        let dedupe_path = || Journal::path(dir, "dedupe", jd.gen_);
        let shared_wm = c.shared_clock.as_ref().and_then(|s| s.watermark);
        for payload in unframe(&dedupe_data).0 {
            let mut d = Dec::new(payload);
            let tenant = if c.version >= 4 {
                d.str().map_err(|source| StateError::Decode {
                    path: dedupe_path(),
                    source,
                })?
            } else {
                LEGACY_TENANT
            };
            let entries = &payload[payload.len() - d.remaining()..];
            // Format 4: (key: u128, value) entries; before: (key: u64, value).
            let width = if c.version >= 4 { 24 } else { 16 };
            if entries.len() % width != 0 {
                return Err(StateError::Decode {
                    path: dedupe_path(),
                    source: DecodeError {
                        at: 0,
                        what: "dedupe frame length",
                    },
                });
            }
            let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
            if tenant == LEGACY_TENANT {
                // 64-bit keys of format 3 (zero-extended in format 4).
                for ch in entries.chunks_exact(width) {
                    let (k, v) = (word(&ch[..8]), word(&ch[width - 8..]) as i64);
                    if live(v, shared_wm, lateness) {
                        p.legacy.dedupe.insert(k, v);
                    } else {
                        p.legacy.dedupe.remove(&k);
                    }
                }
                continue;
            }
            let clock = match tenant.strip_prefix(BACKFILL_PREFIX) {
                Some(t) => p.backfills.entry_ref(t).or_insert_with(|| Clock::new(n)),
                None => p.clocks.entry_ref(tenant).or_insert_with(|| Clock::new(n)),
            };
            let wm = clock.watermark;
            for ch in entries.chunks_exact(24) {
                let k = word(&ch[..8]) as u128 | (word(&ch[8..16]) as u128) << 64;
                let v = word(&ch[16..]) as i64;
                if live(v, wm, lateness) {
                    clock.dedupe.insert(k, v);
                } else {
                    clock.dedupe.remove(&k);
                }
            }
        }
        report.dedupe_entries = p.dedupe_len();
        p.log_ms = p
            .clocks
            .values()
            .chain(p.backfills.values())
            .flat_map(|c| c.parts.iter().map(|s| s.last_append_ms))
            .max()
            .unwrap_or(Millis::MIN);
        let furthest = p.clocks.values().filter_map(|c| c.watermark).max();
        p.watermark = furthest.max(shared_wm);

        // Late DLQ.
        {
            let mut dlq = p.dlq.lock();
            for payload in unframe(&late_data).0 {
                let (mut e, key64) =
                    decode_late(payload, c.version).map_err(decode_err("late", jl.gen_))?;
                e.replayed = p.corrected.contains(&e.key);
                // Format 3: applied under its 64-bit key; remembered under
                // its own from now on.
                if key64.is_some_and(|k| p.legacy.corrected.contains(&k)) {
                    e.replayed = true;
                    if e.key != 0 {
                        p.corrected.insert(e.key);
                    }
                }
                dlq.push_held(e);
                report.late_entries += 1;
            }
            dlq.set_total(DlqKind::Late, p.totals.late);
        }
        // Sessions: the journal when the index was on; else each tenant's
        // events so far are not in it.
        {
            let mut store = p.store.write();
            if store.sessions().is_on() {
                let ix = store.sessions_mut();
                if indexed {
                    for payload in unframe(&sessions_data).0 {
                        ix.apply_frame(payload)
                            .map_err(decode_err("sessions", sessions.gen_))?;
                    }
                    ix.recovered();
                } else {
                    for (t, c) in p.clocks.iter().chain(p.backfills.iter()) {
                        let newest = c.parts.iter().filter_map(|s| s.max_ts).max();
                        ix.raise_floor(t, newest.map_or(Millis::MAX, |m| m.saturating_add(1)));
                    }
                }
                report.sessions = ix.len();
            }
        }
        report.checkpoint = Some(c.seq);
        let sessions_gen = sessions.gen_;
        let store = StateStore {
            dir: dir.to_path_buf(),
            seq: c.seq,
            sealed,
            dedupe,
            late,
            sessions,
            sessions_base,
            dedupe_written: c.dedupe_written,
            prev: [js.gen_, jd.gen_, jl.gen_, sessions_gen],
            compact_bytes: COMPACT_BYTES,
            sealed_base: c.sealed_base,
            sealed_legacy: c.version == 2,
            dedupe_legacy: c.version < 4,
        };
        store.cleanup();
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok((store, report))
    }

    /// Sets the size past which journals are compacted (tests use tiny values).
    pub fn set_compact_bytes(&mut self, bytes: u64) {
        self.compact_bytes = bytes;
    }

    /// Sequence number of the last checkpoint written or loaded.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Writes a checkpoint of `p` (prepare and write on this thread). On
    /// error nothing changed on disk and `p` keeps what it would have
    /// written; the next call retries.
    pub fn checkpoint(&mut self, p: &mut Processor) -> Result<CheckpointReport, StateError> {
        let job = self.prepare(p);
        match self.write(&job) {
            Ok(r) => Ok(r),
            Err(e) => {
                job.restore(p);
                Err(e)
            }
        }
    }

    /// The part of a checkpoint that needs the processor: takes its journal
    /// and snapshots its state and open minutes. Cheap next to [`write`],
    /// which can then run on another thread while `p` keeps applying
    /// records. If the write fails, [`CheckpointJob::restore`] gives the
    /// journal back.
    ///
    /// [`write`]: StateStore::write
    pub fn prepare(&self, p: &mut Processor) -> CheckpointJob {
        let lateness = p.cfg.allowed_lateness_ms;
        // Each tenant seals up to its own final minute (the further of its
        // live and backfill clocks: a change below it is sealed again).
        let mut seal: hashbrown::HashMap<Box<str>, (Millis, Millis)> = hashbrown::HashMap::new();
        for (t, c) in p.clocks.iter().chain(p.backfills.iter()) {
            let e = seal.entry_ref(&**t).or_insert((Millis::MIN, Millis::MIN));
            e.0 = e.0.max(c.sealed_to);
            e.1 = e.1.max(c.final_before(lateness).max(c.sealed_to));
        }
        let snapshot = |map: &hashbrown::HashMap<Box<str>, Clock>| -> Vec<ClockState> {
            map.iter()
                .map(|(t, c)| ClockState {
                    tenant: t.clone(),
                    parts: c.parts.clone(),
                    watermark: c.watermark,
                    swept_to: c.swept_to,
                    sealed_to: seal[&**t].1,
                    counts: c.counts,
                })
                .collect()
        };
        let prev_sealed = p
            .clocks
            .iter()
            .map(|(t, c)| (false, t.clone(), c.sealed_to))
            .chain(
                p.backfills
                    .iter()
                    .map(|(t, c)| (true, t.clone(), c.sealed_to)),
            )
            .collect();
        let sealed_rewrite =
            self.sealed_legacy || self.sealed.len > self.compact_bytes.max(2 * self.sealed_base);
        let mut job = CheckpointJob {
            seq: self.seq + 1,
            prev_sealed,
            sealed_buf: Vec::new(),
            sealed_buckets: 0,
            sealed_rewrite,
            downsampled_to: Millis::MIN,
            hours_from: Millis::MIN,
            open: Enc::new(),
            open_buckets: 0,
            dedupe: Vec::new(),
            dedupe_all: None,
            late: std::mem::take(&mut p.journal.late),
            late_all: None,
            reseal: std::mem::take(&mut p.journal.reseal),
            rehour: std::mem::take(&mut p.journal.rehour),
            offsets: p.offsets.clone(),
            clocks: snapshot(&p.clocks),
            backfills: snapshot(&p.backfills),
            totals: p.totals,
            corrected: p.corrected.iter().copied().collect(),
            legacy_corrected: p.legacy.corrected.iter().copied().collect(),
            raw_drops: p.raw_drops.iter().cloned().collect(),
            sessions_on: false,
            sessions_buf: Vec::new(),
            session_frames: 0,
            sessions_rewrite: false,
        };
        {
            let mut store = p.store.write();
            let ix = store.sessions_mut();
            if ix.is_on() {
                job.sessions_on = true;
                job.sessions_rewrite = ix.needs_rewrite()
                    || self.sessions.len > self.compact_bytes.max(2 * self.sessions_base);
                job.session_frames = if job.sessions_rewrite {
                    ix.encode_all(&mut job.sessions_buf)
                } else {
                    ix.take_delta(&mut job.sessions_buf)
                };
            }
        }
        {
            let store = p.store.read();
            job.downsampled_to = store.downsampled_to();
            job.hours_from = store.hours_from();
            let tenants: Vec<&str> = store.tenants().collect();
            for t in &tenants {
                // A tenant without a clock has sealed nothing.
                seal.entry_ref(*t).or_insert((Millis::MIN, Millis::MIN));
            }
            if sealed_rewrite {
                // Every live sealed bucket, into a new generation.
                for (t, h, b) in store.hours_in(Millis::MIN, Millis::MAX) {
                    encode_sealed(&mut job.sealed_buf, KIND_HOUR, t, h, b);
                    job.sealed_buckets += 1;
                }
                for t in &tenants {
                    for (m, b) in store.tenant_minutes(t, Millis::MIN, seal[*t].1) {
                        encode_sealed(&mut job.sealed_buf, KIND_MINUTE, t, m, b);
                        job.sealed_buckets += 1;
                    }
                }
            } else {
                for t in &tenants {
                    let (from, to) = seal[*t];
                    for (m, b) in store.tenant_minutes(t, from, to) {
                        encode_sealed(&mut job.sealed_buf, KIND_MINUTE, t, m, b);
                        job.sealed_buckets += 1;
                    }
                }
                for (t, m) in &job.reseal {
                    let prev = seal.get(&**t).map_or(Millis::MIN, |s| s.0);
                    if *m < prev
                        && let Some(b) = store.minute(t, *m)
                    {
                        encode_sealed(&mut job.sealed_buf, KIND_MINUTE, t, *m, b);
                        job.sealed_buckets += 1;
                    }
                }
                for (t, h) in &job.rehour {
                    if let Some(b) = store.hour(t, *h) {
                        encode_sealed(&mut job.sealed_buf, KIND_HOUR, t, *h, b);
                        job.sealed_buckets += 1;
                    }
                }
            }
            for t in &tenants {
                for (m, b) in store.tenant_minutes(t, seal[*t].1, Millis::MAX) {
                    job.open.str(t);
                    job.open.i64(m);
                    b.encode(&mut job.open);
                    job.open_buckets += 1;
                }
            }
        }
        let horizons: Vec<(Box<str>, Millis)> =
            seal.into_iter().map(|(t, (_, to))| (t, to)).collect();
        // The dedupe journal of each clock, taken.
        let mut journaled = 0u64;
        for (t, c) in &mut p.clocks {
            if !c.journal.is_empty() {
                journaled += c.journal.len() as u64;
                job.dedupe.push((t.clone(), std::mem::take(&mut c.journal)));
            }
        }
        for (t, c) in &mut p.backfills {
            if !c.journal.is_empty() {
                journaled += c.journal.len() as u64;
                let name = format!("{BACKFILL_PREFIX}{t}").into();
                job.dedupe.push((name, std::mem::take(&mut c.journal)));
            }
        }
        // Journals past the size limit and mostly dead are rewritten whole
        // (and one without tenants in its frames at once).
        let live = p.dedupe_len() as u64;
        if self.dedupe_legacy
            || (self.dedupe.len > self.compact_bytes
                && (self.dedupe_written + journaled) > 4 * live.max(1))
        {
            let entries = |c: &Clock| c.dedupe.iter().collect();
            let mut all: TenantEntries = p
                .clocks
                .iter()
                .filter(|(_, c)| !c.dedupe.is_empty())
                .map(|(t, c)| (t.clone(), entries(c)))
                .collect();
            all.extend(
                p.backfills
                    .iter()
                    .filter(|(_, c)| !c.dedupe.is_empty())
                    .map(|(t, c)| (format!("{BACKFILL_PREFIX}{t}").into(), entries(c))),
            );
            if !p.legacy.dedupe.is_empty() {
                all.push((
                    LEGACY_TENANT.into(),
                    p.legacy
                        .dedupe
                        .iter()
                        .map(|(&k, &v)| (k as u128, v))
                        .collect(),
                ));
            }
            job.dedupe_all = Some(all);
        }
        // A journal of format 3 (64-bit keys) is rewritten whole at once.
        if self.dedupe_legacy || self.late.len > self.compact_bytes {
            let dlq = p.dlq.lock();
            job.late_all = Some(dlq.held_entries(DlqKind::Late).cloned().collect());
        }
        for (t, to) in horizons {
            for map in [&mut p.clocks, &mut p.backfills] {
                if let Some(c) = map.get_mut(&t) {
                    c.sealed_to = to;
                }
            }
        }
        p.journal.dirty = false;
        job
    }

    /// Writes a prepared checkpoint: journals first (fsynced), then the
    /// checkpoint file (temp, fsync, rename, fsync the directory). On error
    /// every journal is cut back and nothing changed.
    pub fn write(&mut self, job: &CheckpointJob) -> Result<CheckpointReport, StateError> {
        let started = Instant::now();
        let mut report = CheckpointReport {
            seq: job.seq,
            sealed_buckets: job.sealed_buckets,
            open_buckets: job.open_buckets,
            sealed_rewritten: job.sealed_rewrite,
            session_frames: job.session_frames,
            sessions_rewritten: job.sessions_rewrite,
            ..CheckpointReport::default()
        };
        let mut dedupe_buf = Vec::new();
        for (t, entries) in job.dedupe_all.as_ref().unwrap_or(&job.dedupe) {
            encode_dedupe(&mut dedupe_buf, t, entries);
            report.dedupe_entries += entries.len();
        }
        let mut late_buf = Vec::new();
        for e in job.late_all.as_ref().unwrap_or(&job.late) {
            encode_late(&mut late_buf, e);
            report.late_entries += 1;
        }

        // 1. The journals (new generations where rewritten).
        let before = [
            self.sealed.len,
            self.dedupe.len,
            self.late.len,
            self.sessions.len,
        ];
        let mut new_sessions_j = None;
        let mut new_sealed_j = None;
        let mut new_dedupe_j = None;
        let mut new_late_j = None;
        let result = (|| -> Result<(), StateError> {
            new_sealed_j = self.sealed.write(&job.sealed_buf, job.sealed_rewrite)?;
            new_dedupe_j = self.dedupe.write(&dedupe_buf, job.dedupe_all.is_some())?;
            new_late_j = self.late.write(&late_buf, job.late_all.is_some())?;
            new_sessions_j = self
                .sessions
                .write(&job.sessions_buf, job.sessions_rewrite)?;
            if new_sealed_j.is_some()
                || new_dedupe_j.is_some()
                || new_late_j.is_some()
                || new_sessions_j.is_some()
            {
                sync_dir(&self.dir)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.rollback(before);
            return Err(e);
        }
        let sealed_ref = new_sealed_j.as_ref().unwrap_or(&self.sealed);
        let dedupe_ref = new_dedupe_j.as_ref().unwrap_or(&self.dedupe);
        let late_ref = new_late_j.as_ref().unwrap_or(&self.late);
        let sessions_ref = new_sessions_j.as_ref().unwrap_or(&self.sessions);
        let sessions_base = if job.sessions_rewrite {
            sessions_ref.len
        } else {
            self.sessions_base
        };
        let count = |v: &TenantEntries| v.iter().map(|(_, e)| e.len() as u64).sum::<u64>();
        let dedupe_written = match &job.dedupe_all {
            Some(all) => count(all),
            None => self.dedupe_written + count(&job.dedupe),
        };
        let sealed_base = if job.sealed_rewrite {
            sealed_ref.len
        } else {
            self.sealed_base
        };
        let journals = [
            JournalRef {
                gen_: sealed_ref.gen_,
                len: sealed_ref.len,
            },
            JournalRef {
                gen_: dedupe_ref.gen_,
                len: dedupe_ref.len,
            },
            JournalRef {
                gen_: late_ref.gen_,
                len: late_ref.len,
            },
        ];

        // 2. The checkpoint itself.
        let mut e = Enc::new();
        e.u64(job.seq);
        e.u32(job.offsets.len() as u32);
        for &o in &job.offsets {
            e.u64(o);
        }
        for list in [&job.clocks, &job.backfills] {
            e.u32(list.len() as u32);
            for c in list {
                c.encode(&mut e);
            }
        }
        encode_totals(&mut e, &job.totals);
        for j in &journals {
            e.u64(j.gen_);
            e.u64(j.len);
        }
        e.u64(dedupe_written);
        e.u32(job.corrected.len() as u32);
        for &k in &job.corrected {
            e.u64(k as u64);
            e.u64((k >> 64) as u64);
        }
        e.u32(job.legacy_corrected.len() as u32);
        for &k in &job.legacy_corrected {
            e.u64(k);
        }
        e.u32(job.open_buckets as u32);
        e.buf.extend_from_slice(&job.open.buf);
        e.u32(job.raw_drops.len() as u32);
        for (lsn, ranges) in &job.raw_drops {
            e.u64(*lsn);
            e.u32(ranges.len() as u32);
            for &(s, l) in ranges {
                e.u32(s);
                e.u32(l);
            }
        }
        e.i64(job.downsampled_to);
        e.i64(job.hours_from);
        e.u64(sealed_base);
        e.u8(u8::from(job.sessions_on));
        e.u64(sessions_ref.gen_);
        e.u64(sessions_ref.len);
        e.u64(sessions_base);
        let mut file_bytes = MAGIC.to_vec();
        frame(&mut file_bytes, &e.buf);
        let tmp = self.dir.join(format!("checkpoint-{:020}.tmp", job.seq));
        let path = ckpt_path(&self.dir, job.seq);
        let write = (|| -> Result<(), StateError> {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&file_bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = write {
            let _ = fs::remove_file(&tmp);
            self.rollback(before);
            return Err(e);
        }

        // 3. Committed: switch generations, clean up.
        let prev_gens = [
            self.sealed.gen_,
            self.dedupe.gen_,
            self.late.gen_,
            self.sessions.gen_,
        ];
        if let Some(j) = new_sessions_j {
            self.sessions = j;
            self.sessions_base = sessions_base;
        }
        if let Some(j) = new_sealed_j {
            self.sealed = j;
            self.sealed_base = sealed_base;
            self.sealed_legacy = false;
        }
        if let Some(j) = new_dedupe_j {
            self.dedupe = j;
            self.dedupe_legacy = false;
        }
        if let Some(j) = new_late_j {
            self.late = j;
        }
        self.dedupe_written = dedupe_written;
        self.prev = prev_gens;
        self.seq = job.seq;
        report.bytes = (job.sealed_buf.len()
            + dedupe_buf.len()
            + late_buf.len()
            + job.sessions_buf.len()
            + file_bytes.len()) as u64;
        self.cleanup();
        report.elapsed_us = started.elapsed().as_micros() as u64;
        Ok(report)
    }

    /// Cuts every journal back to its length before a failed checkpoint.
    fn rollback(&mut self, before: [u64; 4]) {
        self.sealed.rollback(before[0]);
        self.dedupe.rollback(before[1]);
        self.late.rollback(before[2]);
        self.sessions.rollback(before[3]);
    }

    /// Keeps the newest two checkpoints and the journal generations they name.
    fn cleanup(&self) {
        if let Ok(seqs) = list_checkpoints(&self.dir) {
            for &s in seqs.iter().filter(|&&s| s + 1 < self.seq) {
                let _ = fs::remove_file(ckpt_path(&self.dir, s));
            }
        }
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                if e.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        self.sealed.cleanup(&[self.prev[0]]);
        self.dedupe.cleanup(&[self.prev[1]]);
        self.late.cleanup(&[self.prev[2]]);
        self.sessions.cleanup(&[self.prev[3]]);
    }
}

/// Entry points for the fuzz targets in `fuzz/` (not an API): the decoders
/// of on-disk state, fed any bytes, answer `Ok` or `Err` and never panic.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes a checkpoint file's bytes.
    pub fn checkpoint(bytes: &[u8]) -> bool {
        super::decode_checkpoint(bytes).is_ok()
    }

    /// Applies a sessions journal (its frames) and the bytes as one frame
    /// to a session index.
    pub fn sessions_journal(bytes: &[u8]) -> bool {
        let mut ix = tally_store::SessionIndex::default();
        ix.enable(tally_store::DEFAULT_SESSION_GAP_MS, 1000);
        let mut ok = ix.apply_frame(bytes).is_ok();
        for f in tally_types::bin::unframe(bytes).0 {
            ok &= ix.apply_frame(f).is_ok();
        }
        ix.recovered();
        let _ = ix.sessions("t", None, i64::MIN, i64::MAX, true, 100);
        ok
    }

    /// Decodes one late-journal entry of a format version.
    pub fn late_entry(bytes: &[u8], version: u8) -> bool {
        super::decode_late(bytes, version).is_ok()
    }
}

#[cfg(test)]
mod tests;
