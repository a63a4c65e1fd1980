//! Checkpoints: the processor's state and the log offsets it covers, written
//! together, atomically, so recovery is "load the newest valid checkpoint,
//! replay the log from its offsets" instead of replaying the whole log.
//!
//! # Files (`<data-dir>/state/`)
//!
//! ```text
//! checkpoint-<seq:020>.ckpt  "TALLYCK3" frame(checkpoint)      newest two kept
//! sealed-<gen:06>.bin        frame(kind, tenant, time, bucket)* final minutes, hours
//! dedupe-<gen:06>.bin        frame((key, minute)*)*            dedupe journal
//! late-<gen:06>.bin          frame(late DLQ entry)*            late DLQ journal
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

use crate::{DlqBody, DlqEntry, DlqKind, LATE_MARK, PartState, Processor, Totals};

/// Version 2 added the raw store's dropped ranges; version 3 the rollup
/// horizons and kinds in the sealed journal. A version-1 checkpoint is
/// ignored (the state is rebuilt from the log); version 2 is read.
const MAGIC: &[u8; 8] = b"TALLYCK3";
const MAGIC_V2: &[u8; 8] = b"TALLYCK2";
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
}

/// A checkpoint prepared on the processor thread, to be written by
/// [`StateStore::write`] (possibly on another thread).
pub struct CheckpointJob {
    seq: u64,
    prev_sealed_to: Millis,
    seal_to: Millis,
    sealed_buf: Vec<u8>,
    sealed_buckets: usize,
    /// `sealed_buf` holds every sealed bucket: it starts a new generation.
    sealed_rewrite: bool,
    downsampled_to: Millis,
    hours_from: Millis,
    open: Enc,
    open_buckets: usize,
    /// The processor's journal, taken; given back by `restore` on failure.
    dedupe: Vec<(u64, Millis)>,
    /// Every live dedupe entry, when the journal is rewritten.
    dedupe_all: Option<Vec<(u64, Millis)>>,
    late: Vec<DlqEntry>,
    /// Every held late entry, when the journal is rewritten.
    late_all: Option<Vec<DlqEntry>>,
    reseal: BTreeSet<(Box<str>, Millis)>,
    rehour: BTreeSet<(Box<str>, Millis)>,
    offsets: Vec<u64>,
    parts: Vec<PartState>,
    watermark: Option<Millis>,
    swept_to: Millis,
    totals: Totals,
    corrected: Vec<u64>,
    raw_drops: Vec<(u64, Vec<(u32, u32)>)>,
}

impl CheckpointJob {
    /// The log offsets this checkpoint covers: recovery replays from them.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// After a failed write: gives `p` back what this job took, ahead of
    /// what `p` journaled since, so the next checkpoint writes it all.
    pub fn restore(self, p: &mut Processor) {
        let mut dedupe = self.dedupe;
        dedupe.append(&mut p.journal.dedupe);
        p.journal.dedupe = dedupe;
        let mut late = self.late;
        late.append(&mut p.journal.late);
        p.journal.late = late;
        p.journal.reseal.extend(self.reseal);
        p.journal.rehour.extend(self.rehour);
        p.sealed_to = p.sealed_to.min(self.prev_sealed_to);
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
    /// Dedupe entries in the current dedupe generation (live and dead).
    dedupe_written: u64,
    /// Journal generations named by the previous checkpoint (kept for fallback).
    prev: [u64; 3],
    /// Journals past this size are considered for compaction.
    compact_bytes: u64,
    /// Size of the sealed journal's generation when it was last written
    /// whole (it is rewritten once it has doubled).
    sealed_base: u64,
    /// The sealed journal holds version-2 frames: rewrite it next time.
    sealed_legacy: bool,
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
    offsets: Vec<u64>,
    parts: Vec<PartState>,
    watermark: Option<Millis>,
    swept_to: Millis,
    sealed_to: Millis,
    totals: Totals,
    journals: [JournalRef; 3],
    dedupe_written: u64,
    corrected: Vec<u64>,
    open: Vec<(String, Millis, MinuteBucket)>,
    raw_drops: VecDeque<(u64, Vec<(u32, u32)>)>,
    /// Version 2: sealed frames carry no kind and there are no horizons.
    legacy: bool,
    downsampled_to: Millis,
    hours_from: Millis,
    sealed_base: u64,
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
    let legacy = bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] == MAGIC_V2;
    if bytes.len() < MAGIC.len() || (&bytes[..MAGIC.len()] != MAGIC && !legacy) {
        return Err(DecodeError {
            at: 0,
            what: "not a checkpoint (magic)",
        });
    }
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
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        parts.push(PartState {
            max_ts: d.opt_i64()?,
            last_append_ms: d.i64()?,
        });
    }
    let watermark = d.opt_i64()?;
    let swept_to = d.i64()?;
    let sealed_to = d.i64()?;
    let totals = decode_totals(&mut d)?;
    let mut journals = [JournalRef::default(); 3];
    for j in &mut journals {
        j.gen_ = d.u64()?;
        j.len = d.u64()?;
    }
    let dedupe_written = d.u64()?;
    let nc = d.count(8)?;
    let mut corrected = Vec::with_capacity(nc);
    for _ in 0..nc {
        corrected.push(d.u64()?);
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
    let (downsampled_to, hours_from, sealed_base) = if legacy {
        (Millis::MIN, Millis::MIN, 0)
    } else {
        (d.i64()?, d.i64()?, d.u64()?)
    };
    if !d.is_empty() {
        return d.err("trailing bytes");
    }
    Ok(Checkpoint {
        seq,
        offsets,
        parts,
        watermark,
        swept_to,
        sealed_to,
        totals,
        journals,
        dedupe_written,
        corrected,
        open,
        raw_drops,
        legacy,
        downsampled_to,
        hours_from,
        sealed_base,
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
    e.u64(x.key);
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

fn decode_late(p: &[u8]) -> Result<DlqEntry, DecodeError> {
    let mut d = Dec::new(p);
    let key = d.u64()?;
    let tenant = d.str()?.to_string();
    let reason = d.str()?.to_string();
    let received_at = d.i64()?;
    let body = match d.u8()? {
        0 => DlqBody::Event(d.str()?.to_string()),
        1 => DlqBody::Raw(d.str()?.to_string()),
        _ => return d.err("DLQ body tag"),
    };
    Ok(DlqEntry {
        kind: DlqKind::Late,
        tenant,
        reason,
        received_at,
        body,
        key,
        replayed: false,
    })
}

fn encode_dedupe(out: &mut Vec<u8>, entries: &[(u64, Millis)]) {
    for chunk in entries.chunks(DEDUPE_FRAME) {
        let mut e = Enc::new();
        e.buf.reserve(chunk.len() * 16);
        for &(k, v) in chunk {
            e.u64(k);
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
                dedupe_written: 0,
                prev: [0; 3],
                compact_bytes: COMPACT_BYTES,
                sealed_base: 0,
                sealed_legacy: false,
            };
            store.cleanup();
            report.elapsed_ms = started.elapsed().as_millis() as u64;
            return Ok((store, report));
        };
        let [js, jd, jl] = c.journals;
        let (sealed, sealed_data) = Journal::open_at(dir, "sealed", js.gen_, js.len, c.seq)?;
        let (dedupe, dedupe_data) = Journal::open_at(dir, "dedupe", jd.gen_, jd.len, c.seq)?;
        let (late, late_data) = Journal::open_at(dir, "late", jl.gen_, jl.len, c.seq)?;
        let decode_err = |prefix: &str, g: u64| {
            let path = Journal::path(dir, prefix, g);
            move |source| StateError::Decode { path, source }
        };

        // Processor scalars.
        p.offsets = c.offsets;
        p.parts = c.parts;
        p.watermark = c.watermark;
        p.swept_to = c.swept_to;
        p.sealed_to = c.sealed_to;
        p.totals = c.totals;
        p.corrected = c.corrected.into_iter().collect();
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
                let kind = if c.legacy {
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
            for (t, m, b) in c.open {
                store.set_minute(&t, m, b);
            }
            store.commit();
        }

        // Dedupe: entries that still block their key at the checkpoint's watermark.
        let lateness = p.cfg.allowed_lateness_ms;
        for payload in unframe(&dedupe_data).0 {
            if payload.len() % 16 != 0 {
                return Err(StateError::Decode {
                    path: Journal::path(dir, "dedupe", jd.gen_),
                    source: DecodeError {
                        at: 0,
                        what: "dedupe frame length",
                    },
                });
            }
            for ch in payload.chunks_exact(16) {
                let k = u64::from_le_bytes(ch[..8].try_into().expect("8 bytes"));
                let v = i64::from_le_bytes(ch[8..].try_into().expect("8 bytes"));
                if c.watermark
                    .is_none_or(|w| (v & !LATE_MARK) + tally_types::time::MINUTE_MS + lateness > w)
                {
                    p.dedupe.insert(k, v);
                } else {
                    p.dedupe.remove(&k);
                }
            }
        }
        report.dedupe_entries = p.dedupe.len();

        // Late DLQ.
        {
            let mut dlq = p.dlq.lock();
            for payload in unframe(&late_data).0 {
                let mut e = decode_late(payload).map_err(decode_err("late", jl.gen_))?;
                e.replayed = p.corrected.contains(&e.key);
                dlq.push_held(e);
                report.late_entries += 1;
            }
            dlq.set_total(DlqKind::Late, p.totals.late);
        }
        report.checkpoint = Some(c.seq);
        let store = StateStore {
            dir: dir.to_path_buf(),
            seq: c.seq,
            sealed,
            dedupe,
            late,
            dedupe_written: c.dedupe_written,
            prev: [js.gen_, jd.gen_, jl.gen_],
            compact_bytes: COMPACT_BYTES,
            sealed_base: c.sealed_base,
            sealed_legacy: c.legacy,
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
        let seal_to = p.final_before().max(p.sealed_to);
        let sealed_rewrite =
            self.sealed_legacy || self.sealed.len > self.compact_bytes.max(2 * self.sealed_base);
        let mut job = CheckpointJob {
            seq: self.seq + 1,
            prev_sealed_to: p.sealed_to,
            seal_to,
            sealed_buf: Vec::new(),
            sealed_buckets: 0,
            sealed_rewrite,
            downsampled_to: Millis::MIN,
            hours_from: Millis::MIN,
            open: Enc::new(),
            open_buckets: 0,
            dedupe: std::mem::take(&mut p.journal.dedupe),
            dedupe_all: None,
            late: std::mem::take(&mut p.journal.late),
            late_all: None,
            reseal: std::mem::take(&mut p.journal.reseal),
            rehour: std::mem::take(&mut p.journal.rehour),
            offsets: p.offsets.clone(),
            parts: p.parts.clone(),
            watermark: p.watermark,
            swept_to: p.swept_to,
            totals: p.totals,
            corrected: p.corrected.iter().copied().collect(),
            raw_drops: p.raw_drops.iter().cloned().collect(),
        };
        {
            let store = p.store.read();
            job.downsampled_to = store.downsampled_to();
            job.hours_from = store.hours_from();
            if sealed_rewrite {
                // Every live sealed bucket, into a new generation.
                for (t, h, b) in store.hours_in(Millis::MIN, Millis::MAX) {
                    encode_sealed(&mut job.sealed_buf, KIND_HOUR, t, h, b);
                    job.sealed_buckets += 1;
                }
                for (t, m, b) in store.minutes_in(Millis::MIN, seal_to) {
                    encode_sealed(&mut job.sealed_buf, KIND_MINUTE, t, m, b);
                    job.sealed_buckets += 1;
                }
            } else {
                for (t, m, b) in store.minutes_in(p.sealed_to, seal_to) {
                    encode_sealed(&mut job.sealed_buf, KIND_MINUTE, t, m, b);
                    job.sealed_buckets += 1;
                }
                for (t, m) in &job.reseal {
                    if *m < p.sealed_to
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
            for (t, m, b) in store.minutes_in(seal_to, Millis::MAX) {
                job.open.str(t);
                job.open.i64(m);
                b.encode(&mut job.open);
                job.open_buckets += 1;
            }
        }
        // Journals past the size limit and mostly dead are rewritten whole.
        let live = p.dedupe.len() as u64;
        if self.dedupe.len > self.compact_bytes
            && (self.dedupe_written + job.dedupe.len() as u64) > 4 * live.max(1)
        {
            job.dedupe_all = Some(p.dedupe.iter().map(|(&k, &v)| (k, v)).collect());
        }
        if self.late.len > self.compact_bytes {
            let dlq = p.dlq.lock();
            job.late_all = Some(dlq.held_entries(DlqKind::Late).cloned().collect());
        }
        p.sealed_to = seal_to;
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
            ..CheckpointReport::default()
        };
        let mut dedupe_buf = Vec::new();
        match &job.dedupe_all {
            Some(all) => {
                encode_dedupe(&mut dedupe_buf, all);
                report.dedupe_entries = all.len();
            }
            None => {
                encode_dedupe(&mut dedupe_buf, &job.dedupe);
                report.dedupe_entries = job.dedupe.len();
            }
        }
        let mut late_buf = Vec::new();
        for e in job.late_all.as_ref().unwrap_or(&job.late) {
            encode_late(&mut late_buf, e);
            report.late_entries += 1;
        }

        // 1. The journals (new generations where rewritten).
        let before = [self.sealed.len, self.dedupe.len, self.late.len];
        let mut new_sealed_j = None;
        let mut new_dedupe_j = None;
        let mut new_late_j = None;
        let result = (|| -> Result<(), StateError> {
            if job.sealed_rewrite {
                let mut j = Journal::create(&self.dir, "sealed", self.sealed.gen_ + 1)?;
                j.append(&job.sealed_buf)?;
                new_sealed_j = Some(j);
            } else {
                self.sealed.append(&job.sealed_buf)?;
            }
            if job.dedupe_all.is_some() {
                let mut j = Journal::create(&self.dir, "dedupe", self.dedupe.gen_ + 1)?;
                j.append(&dedupe_buf)?;
                new_dedupe_j = Some(j);
            } else {
                self.dedupe.append(&dedupe_buf)?;
            }
            if job.late_all.is_some() {
                let mut j = Journal::create(&self.dir, "late", self.late.gen_ + 1)?;
                j.append(&late_buf)?;
                new_late_j = Some(j);
            } else {
                self.late.append(&late_buf)?;
            }
            if new_sealed_j.is_some() || new_dedupe_j.is_some() || new_late_j.is_some() {
                sync_dir(&self.dir)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.sealed.rollback(before[0]);
            self.dedupe.rollback(before[1]);
            self.late.rollback(before[2]);
            return Err(e);
        }
        let sealed_ref = new_sealed_j.as_ref().unwrap_or(&self.sealed);
        let dedupe_ref = new_dedupe_j.as_ref().unwrap_or(&self.dedupe);
        let late_ref = new_late_j.as_ref().unwrap_or(&self.late);
        let dedupe_written = match &job.dedupe_all {
            Some(all) => all.len() as u64,
            None => self.dedupe_written + job.dedupe.len() as u64,
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
        for s in &job.parts {
            e.opt_i64(s.max_ts);
            e.i64(s.last_append_ms);
        }
        e.opt_i64(job.watermark);
        e.i64(job.swept_to);
        e.i64(job.seal_to);
        encode_totals(&mut e, &job.totals);
        for j in &journals {
            e.u64(j.gen_);
            e.u64(j.len);
        }
        e.u64(dedupe_written);
        e.u32(job.corrected.len() as u32);
        for &k in &job.corrected {
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
            self.sealed.rollback(before[0]);
            self.dedupe.rollback(before[1]);
            self.late.rollback(before[2]);
            return Err(e);
        }

        // 3. Committed: switch generations, clean up.
        let prev_gens = [self.sealed.gen_, self.dedupe.gen_, self.late.gen_];
        if let Some(j) = new_sealed_j {
            self.sealed = j;
            self.sealed_base = sealed_base;
            self.sealed_legacy = false;
        }
        if let Some(j) = new_dedupe_j {
            self.dedupe = j;
        }
        if let Some(j) = new_late_j {
            self.late = j;
        }
        self.dedupe_written = dedupe_written;
        self.prev = prev_gens;
        self.seq = job.seq;
        report.bytes =
            (job.sealed_buf.len() + dedupe_buf.len() + late_buf.len() + file_bytes.len()) as u64;
        self.cleanup();
        report.elapsed_us = started.elapsed().as_micros() as u64;
        Ok(report)
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
    }
}

#[cfg(test)]
mod tests;
