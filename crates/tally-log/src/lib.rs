//! The embedded, partitioned, append-only log.
//!
//! # On-disk format
//!
//! ```text
//! <dir>/p<NNN>/<base:020>.seg      one directory per partition, segments named
//!                                  by the partition offset of their first byte
//! record := len:u32 crc:u32 lsn:u64 append_ms:i64 payload[len]
//! ```
//!
//! All integers are little-endian. `crc` is CRC-32 (IEEE) over `lsn`,
//! `append_ms` and `payload`. A record's *offset* is the byte position of its
//! header in the partition's logical stream (segment base + position in the
//! file), so seeking to an offset needs no index. `lsn` is a log-wide sequence
//! number assigned by the single writer in commit order; replaying the
//! partitions merged by `lsn` reproduces the exact order the processor saw.
//!
//! # Invariants
//!
//! - Only [`Log::sync`] makes appended records durable; the caller acknowledges
//!   nothing before it returns `Ok`.
//! - On open, the tail of the newest segment of every partition is scanned and
//!   a torn or corrupt tail (short header, length past the end, bad checksum)
//!   is cut off, so appends always follow a valid record.
//! - A corrupt record inside an older segment is reported by the reader with
//!   its partition and offset; the reader skips the rest of that segment.
//! - Retention deletes whole segments only, never the active one, and never
//!   one holding records recovery would still replay (the caller passes the
//!   oldest offset per partition it needs).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub const HEADER_LEN: usize = 24;
/// Upper bound on one record's payload; a larger length field means corruption.
pub const MAX_PAYLOAD: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt record in partition {partition} at offset {offset}: {what}")]
    Corrupt {
        partition: u32,
        offset: u64,
        what: &'static str,
    },
    #[error("record of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("no such partition {0}")]
    NoPartition(u32),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings of the embedded log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub dir: PathBuf,
    pub partitions: u32,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Segments whose newest write is older than this are deleted (0 = keep).
    pub retention_ms: i64,
    /// Oldest segments are deleted while a partition is larger than this (0 = no limit).
    pub retention_bytes: u64,
    /// `false` skips fsync (benchmarks of the CPU path only; never the default).
    pub fsync: bool,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>, partitions: u32) -> Self {
        LogConfig {
            dir: dir.into(),
            partitions: partitions.max(1),
            segment_bytes: 128 << 20,
            retention_ms: 7 * 86_400_000,
            retention_bytes: 0,
            fsync: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    pub lsn: u64,
    pub append_ms: i64,
    pub payload: Vec<u8>,
}

impl Record {
    /// Offset of the record after this one in its partition.
    pub fn next_offset(&self) -> u64 {
        self.offset + (HEADER_LEN + self.payload.len()) as u64
    }
}

/// What opening the log found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Next lsn to assign (one past the largest found).
    pub next_lsn: u64,
    /// Bytes cut from torn tails, per partition.
    pub truncated: Vec<(u32, u64)>,
    /// End offset of every partition.
    pub end_offsets: Vec<u64>,
}

/// What a retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    /// Partitions where a segment past the limits was kept because
    /// recovery still needs it.
    pub segments_kept: usize,
}

struct Segment {
    base: u64,
    path: PathBuf,
}

struct Partition {
    id: u32,
    dir: PathBuf,
    /// Closed segments, oldest first.
    closed: Vec<Segment>,
    active: Segment,
    file: File,
    /// Bytes in the active segment, including `pending`.
    active_len: u64,
    pending: Vec<u8>,
    dirty: bool,
    /// A failed write may have left bytes past `active_len - pending`: cut
    /// them before writing again.
    repair: bool,
}

impl Partition {
    fn end_offset(&self) -> u64 {
        self.active.base + self.active_len
    }
}

/// The writable log. One writer owns it; readers open files independently.
pub struct Log {
    cfg: LogConfig,
    parts: Vec<Partition>,
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name
            .strip_suffix(".seg")
            .and_then(|b| b.parse::<u64>().ok())
        {
            segs.push(Segment {
                base,
                path: entry.path(),
            });
        }
    }
    segs.sort_by_key(|s| s.base);
    Ok(segs)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Decodes the record header at the start of `buf`: (payload len, crc, lsn, append_ms).
fn header(buf: &[u8; HEADER_LEN]) -> (usize, u32, u64, i64) {
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&buf[i..i + 8]);
        u64::from_le_bytes(a)
    };
    (u32_at(0) as usize, u32_at(4), u64_at(8), u64_at(16) as i64)
}

fn checksum(lsn: u64, append_ms: i64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(&append_ms.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Scans a segment; returns (valid length, largest lsn, whether the tail was bad).
fn scan_segment(path: &Path) -> Result<(u64, Option<u64>, bool)> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut pos = 0u64;
    let mut max_lsn = None;
    let mut payload = Vec::new();
    loop {
        let mut h = [0u8; HEADER_LEN];
        match read_full(&mut r, &mut h).map_err(io_err(path))? {
            0 => return Ok((pos, max_lsn, false)),
            n if n < HEADER_LEN => return Ok((pos, max_lsn, true)),
            _ => {}
        }
        let (len, crc, lsn, append_ms) = header(&h);
        if len > MAX_PAYLOAD {
            return Ok((pos, max_lsn, true));
        }
        if read_payload(&mut r, len, &mut payload).map_err(io_err(path))? < len
            || checksum(lsn, append_ms, &payload) != crc
        {
            return Ok((pos, max_lsn, true));
        }
        max_lsn = Some(max_lsn.map_or(lsn, |m: u64| m.max(lsn)));
        pos += (HEADER_LEN + len) as u64;
    }
}

/// Reads a payload of `len` bytes into `buf` (cleared first); returns the
/// bytes read, fewer at EOF. The buffer grows with the bytes that actually
/// arrive, so a corrupt length field (up to [`MAX_PAYLOAD`]) in a short file
/// costs what the file holds, not the length it claims.
fn read_payload(r: &mut impl Read, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    buf.reserve(len.min(1 << 20));
    r.take(len as u64).read_to_end(buf)
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Log {
    /// Opens (creating if needed) the log, cutting torn tails.
    pub fn open(cfg: LogConfig) -> Result<(Log, OpenReport)> {
        fs::create_dir_all(&cfg.dir).map_err(io_err(&cfg.dir))?;
        let mut report = OpenReport::default();
        let mut parts = Vec::with_capacity(cfg.partitions as usize);
        let mut next_lsn = 0u64;
        for id in 0..cfg.partitions {
            let dir = cfg.dir.join(format!("p{id:03}"));
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let mut segs = list_segments(&dir)?;
            // Older segments may hold the largest lsn if the newest is empty.
            for s in segs.iter().rev().skip(1).take(1) {
                if let (_, Some(l), _) = scan_segment(&s.path)? {
                    next_lsn = next_lsn.max(l + 1);
                }
            }
            let active = match segs.pop() {
                Some(s) => s,
                None => {
                    let s = Segment {
                        base: 0,
                        path: segment_path(&dir, 0),
                    };
                    File::create(&s.path).map_err(io_err(&s.path))?;
                    sync_dir(&dir)?;
                    s
                }
            };
            let (valid, max_lsn, bad) = scan_segment(&active.path)?;
            if let Some(l) = max_lsn {
                next_lsn = next_lsn.max(l + 1);
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&active.path)
                .map_err(io_err(&active.path))?;
            let len = file.metadata().map_err(io_err(&active.path))?.len();
            if bad || len > valid {
                tracing::warn!(
                    partition = id,
                    segment = %active.path.display(),
                    cut_bytes = len - valid,
                    "log: cutting a torn or corrupt tail"
                );
                file.set_len(valid).map_err(io_err(&active.path))?;
                file.sync_all().map_err(io_err(&active.path))?;
                report.truncated.push((id, len - valid));
            }
            let mut file = file;
            file.seek(SeekFrom::End(0)).map_err(io_err(&active.path))?;
            report.end_offsets.push(active.base + valid);
            parts.push(Partition {
                id,
                dir,
                closed: segs,
                active,
                file,
                active_len: valid,
                pending: Vec::new(),
                dirty: false,
                repair: false,
            });
        }
        report.next_lsn = next_lsn;
        Ok((Log { cfg, parts }, report))
    }

    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    pub fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    /// Buffers one record; returns its offset. Durable only after [`Log::sync`].
    pub fn append(
        &mut self,
        partition: u32,
        lsn: u64,
        append_ms: i64,
        payload: &[u8],
    ) -> Result<u64> {
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::TooLarge(payload.len()));
        }
        let p = self
            .parts
            .get_mut(partition as usize)
            .ok_or(Error::NoPartition(partition))?;
        let offset = p.end_offset();
        let crc = checksum(lsn, append_ms, payload);
        p.pending
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        p.pending.extend_from_slice(&crc.to_le_bytes());
        p.pending.extend_from_slice(&lsn.to_le_bytes());
        p.pending.extend_from_slice(&append_ms.to_le_bytes());
        p.pending.extend_from_slice(payload);
        p.active_len += (HEADER_LEN + payload.len()) as u64;
        p.dirty = true;
        Ok(offset)
    }

    /// Cuts the active segment back to its durable length after a failed
    /// write, so no record that was not acknowledged stays in the file.
    fn repair(p: &mut Partition) -> io::Result<()> {
        let durable = p.active_len;
        p.file.set_len(durable)?;
        p.file.sync_all()?;
        p.file.seek(SeekFrom::Start(durable))?;
        p.repair = false;
        Ok(())
    }

    fn roll(p: &mut Partition, fsync: bool) -> Result<()> {
        let base = p.end_offset();
        let path = segment_path(&p.dir, base);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if fsync {
            sync_dir(&p.dir)?;
        }
        let old = std::mem::replace(&mut p.active, Segment { base, path });
        p.closed.push(old);
        p.file = file;
        p.active_len = 0;
        Ok(())
    }

    /// Writes all buffered records and makes them durable (one fsync per
    /// partition touched since the last sync).
    ///
    /// All or nothing: if writing or syncing any partition fails, every
    /// partition touched is cut back to its length before this call, so the
    /// caller fails every request whose records were buffered and no record
    /// of those requests survives a restart. A partition whose cut itself
    /// failed is cut again before its next write.
    pub fn sync(&mut self) -> Result<()> {
        let fsync = self.cfg.fsync;
        let mut first_err = None;
        for p in self.parts.iter_mut().filter(|p| p.dirty) {
            let durable = p.active_len - p.pending.len() as u64;
            let r = (|| -> io::Result<()> {
                if p.repair {
                    let pending = std::mem::take(&mut p.pending);
                    p.active_len = durable;
                    let r = Self::repair(p);
                    p.active_len = durable + pending.len() as u64;
                    p.pending = pending;
                    r?;
                }
                p.file.write_all(&p.pending)?;
                if fsync {
                    p.file.sync_data()?;
                }
                Ok(())
            })();
            if let Err(e) = r {
                first_err = Some(Error::Io {
                    path: p.active.path.clone(),
                    source: e,
                });
                break;
            }
        }
        if let Some(e) = first_err {
            for p in self.parts.iter_mut().filter(|p| p.dirty) {
                p.active_len -= p.pending.len() as u64;
                p.pending.clear();
                p.dirty = false;
                p.repair = true;
                if let Err(e2) = Self::repair(p) {
                    tracing::error!(partition = p.id, error = %e2, "log: cannot cut back a failed write yet; will retry before the next write");
                }
            }
            return Err(e);
        }
        let seg_bytes = self.cfg.segment_bytes;
        for p in self.parts.iter_mut().filter(|p| p.dirty) {
            p.pending.clear();
            p.dirty = false;
            if p.active_len >= seg_bytes
                && let Err(e) = Self::roll(p, fsync)
            {
                // Harmless: the active segment simply grows; retried next sync.
                tracing::warn!(partition = p.id, error = %e, "log: cannot start a new segment");
            }
        }
        Ok(())
    }

    /// Discards records buffered since the last sync (the requests that
    /// buffered them are failed by the caller).
    pub fn discard_pending(&mut self) {
        for p in &mut self.parts {
            p.active_len -= p.pending.len() as u64;
            p.pending.clear();
            p.dirty = false;
        }
    }

    pub fn end_offsets(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.end_offset()).collect()
    }

    /// Total bytes on disk per partition.
    pub fn sizes(&self) -> Vec<u64> {
        self.parts
            .iter()
            .map(|p| p.end_offset() - p.closed.first().map_or(p.active.base, |s| s.base))
            .collect()
    }

    /// Deletes closed segments past the age or size limits, but never one
    /// holding a record at or after `keep_from[partition]` (where recovery
    /// would have to replay from: records not yet covered by a checkpoint
    /// or not yet sealed into the archive). An empty `keep_from` keeps
    /// nothing back.
    pub fn enforce_retention(&mut self, now_ms: i64, keep_from: &[u64]) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        for p in &mut self.parts {
            let keep = keep_from.get(p.id as usize).copied().unwrap_or(u64::MAX);
            while let Some(oldest) = p.closed.first() {
                let next_base = p.closed.get(1).map_or(p.active.base, |s| s.base);
                let seg_len = next_base - oldest.base;
                let total = p.end_offset() - oldest.base;
                let too_big = self.cfg.retention_bytes > 0 && total > self.cfg.retention_bytes;
                let too_old = self.cfg.retention_ms > 0 && {
                    let modified = fs::metadata(&oldest.path)
                        .and_then(|m| m.modified())
                        .map_err(io_err(&oldest.path))?;
                    let ms = modified
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    ms < now_ms - self.cfg.retention_ms
                };
                if !(too_big || too_old) {
                    break;
                }
                if next_base > keep {
                    report.segments_kept += 1;
                    break;
                }
                fs::remove_file(&oldest.path).map_err(io_err(&oldest.path))?;
                tracing::info!(partition = p.id, segment = %oldest.path.display(), "log retention: deleted segment");
                report.segments_deleted += 1;
                report.bytes_deleted += seg_len;
                p.closed.remove(0);
            }
        }
        Ok(report)
    }
}

/// Reads one partition from an offset, record by record.
pub struct PartitionReader {
    partition: u32,
    segments: Vec<Segment>,
    seg_idx: usize,
    reader: Option<BufReader<File>>,
    pos: u64,
    /// Stop at this offset (the end offset when the reader was made).
    end: u64,
}

impl PartitionReader {
    /// Opens partition `partition` of the log in `dir` to read from `from`
    /// (an earlier offset than the oldest segment starts at the oldest).
    pub fn open(dir: &Path, partition: u32, from: u64, end: u64) -> Result<Self> {
        let pdir = dir.join(format!("p{partition:03}"));
        let segments = if pdir.exists() {
            list_segments(&pdir)?
        } else {
            Vec::new()
        };
        let seg_idx = segments.iter().rposition(|s| s.base <= from).unwrap_or(0);
        let pos = segments.get(seg_idx).map_or(from, |s| s.base.max(from));
        let mut r = PartitionReader {
            partition,
            segments,
            seg_idx,
            reader: None,
            pos,
            end,
        };
        r.open_current()?;
        Ok(r)
    }

    fn open_current(&mut self) -> Result<()> {
        self.reader = None;
        let Some(seg) = self.segments.get(self.seg_idx) else {
            return Ok(());
        };
        let mut f = File::open(&seg.path).map_err(io_err(&seg.path))?;
        f.seek(SeekFrom::Start(self.pos - seg.base))
            .map_err(io_err(&seg.path))?;
        self.reader = Some(BufReader::with_capacity(1 << 20, f));
        Ok(())
    }

    fn next_segment(&mut self) -> Result<bool> {
        self.seg_idx += 1;
        match self.segments.get(self.seg_idx) {
            Some(s) => {
                self.pos = s.base;
                self.open_current()?;
                Ok(true)
            }
            None => {
                self.reader = None;
                Ok(false)
            }
        }
    }

    /// The next record, `None` at the end. A corrupt record is returned as an
    /// error once; reading then continues with the next segment.
    pub fn next_record(&mut self) -> Option<Result<Record>> {
        loop {
            if self.pos >= self.end {
                return None;
            }
            let reader = self.reader.as_mut()?;
            let mut h = [0u8; HEADER_LEN];
            let n = match read_full(reader, &mut h) {
                Ok(n) => n,
                Err(e) => {
                    let path = self.segments[self.seg_idx].path.clone();
                    self.reader = None;
                    return Some(Err(Error::Io { path, source: e }));
                }
            };
            if n == 0 {
                match self.next_segment() {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
            let offset = self.pos;
            let corrupt = |r: &mut Self, what| {
                let e = Error::Corrupt {
                    partition: r.partition,
                    offset,
                    what,
                };
                if let Err(e2) = r.next_segment() {
                    tracing::warn!(error = %e2, "log reader: cannot open next segment");
                }
                Some(Err(e))
            };
            if n < HEADER_LEN {
                return corrupt(self, "truncated header");
            }
            let (len, crc, lsn, append_ms) = header(&h);
            if len > MAX_PAYLOAD {
                return corrupt(self, "length out of range");
            }
            let mut payload = Vec::new();
            match read_payload(reader, len, &mut payload) {
                Ok(k) if k == len => {}
                Ok(_) => return corrupt(self, "truncated payload"),
                Err(_) => return corrupt(self, "unreadable payload"),
            }
            if checksum(lsn, append_ms, &payload) != crc {
                return corrupt(self, "checksum mismatch");
            }
            self.pos += (HEADER_LEN + len) as u64;
            return Some(Ok(Record {
                partition: self.partition,
                offset,
                lsn,
                append_ms,
                payload,
            }));
        }
    }
}

/// Reads every partition from the given offsets, merged into lsn order (the
/// order the single writer committed them in).
pub struct MergedReader {
    readers: Vec<PartitionReader>,
    heads: Vec<Option<Record>>,
    /// Corruption found while reading, reported and skipped.
    pub errors: Vec<Error>,
}

impl MergedReader {
    pub fn open(dir: &Path, from: &[u64], end: &[u64]) -> Result<Self> {
        let mut readers = Vec::new();
        for (p, (&f, &e)) in from.iter().zip(end).enumerate() {
            readers.push(PartitionReader::open(dir, p as u32, f, e)?);
        }
        let heads = readers.iter().map(|_| None).collect();
        let mut m = MergedReader {
            readers,
            heads,
            errors: Vec::new(),
        };
        for i in 0..m.readers.len() {
            m.fill(i);
        }
        Ok(m)
    }

    fn fill(&mut self, i: usize) {
        loop {
            match self.readers[i].next_record() {
                None => {
                    self.heads[i] = None;
                    return;
                }
                Some(Ok(r)) => {
                    self.heads[i] = Some(r);
                    return;
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "log replay: skipping corrupt data");
                    self.errors.push(e);
                }
            }
        }
    }
}

impl Iterator for MergedReader {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        let i = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|r| (r.lsn, i)))
            .min()?
            .1;
        let r = self.heads[i].take();
        self.fill(i);
        r
    }
}

#[cfg(test)]
mod tests;
