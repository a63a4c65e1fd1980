//! `state/archive.manifest`: which archive files are live and how far the
//! log is sealed. Append-only frames (`len crc payload`), fsynced per entry;
//! a torn tail is ignored; rewritten whole (temp + rename) when it grows.
//!
//! ```text
//! entry := tag:u8 body
//!   1 Seal     next_lsn:u64 n:u32 offset:u64*n files     files added by a seal
//!   2 Replace  removed:(str)* files                       compaction / retention
//!   3 Snapshot next_lsn:u64 n:u32 offset:u64*n files     the whole state (rewrite)
//! files := n:u32 (path:str tenant:str min_ts:i64 max_ts:i64 rows:u64 bytes:u64)*
//! ```

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tally_types::Millis;
use tally_types::bin::{Dec, DecodeError, Enc, frame, unframe};

use crate::{Error, Result};

/// One live Parquet file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFile {
    /// Relative to the archive root.
    pub path: String,
    pub tenant: Arc<str>,
    pub min_ts: Millis,
    pub max_ts: Millis,
    pub rows: u64,
    pub bytes: u64,
}

impl ArchiveFile {
    /// Start of the hour the file belongs to.
    pub fn hour(&self) -> Millis {
        tally_types::time::align_down(self.min_ts, tally_types::time::HOUR_MS)
    }
}

/// The state the manifest describes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ManifestState {
    pub(crate) files: BTreeMap<String, Arc<ArchiveFile>>,
    /// One past the last lsn whose kept events are in archive files.
    pub(crate) next_lsn: u64,
    /// Per partition: where the log continues after the sealed records.
    pub(crate) offsets: Vec<u64>,
}

pub(crate) enum Entry<'a> {
    Seal {
        next_lsn: u64,
        offsets: &'a [u64],
        add: &'a [ArchiveFile],
    },
    Replace {
        remove: &'a [String],
        add: &'a [ArchiveFile],
    },
}

const REWRITE_BYTES: u64 = 8 << 20;

pub(crate) struct Manifest {
    path: PathBuf,
    file: File,
    len: u64,
    pub(crate) state: ManifestState,
    /// Whether the file existed (false: a new archive).
    pub(crate) existed: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn enc_files(e: &mut Enc, files: &[ArchiveFile]) {
    e.u32(files.len() as u32);
    for f in files {
        e.str(&f.path);
        e.str(&f.tenant);
        e.i64(f.min_ts);
        e.i64(f.max_ts);
        e.u64(f.rows);
        e.u64(f.bytes);
    }
}

fn dec_files(d: &mut Dec<'_>) -> Result<Vec<ArchiveFile>, DecodeError> {
    let n = d.count(40)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(ArchiveFile {
            path: d.str()?.to_string(),
            tenant: d.str()?.into(),
            min_ts: d.i64()?,
            max_ts: d.i64()?,
            rows: d.u64()?,
            bytes: d.u64()?,
        });
    }
    Ok(out)
}

fn dec_offsets(d: &mut Dec<'_>) -> Result<Vec<u64>, DecodeError> {
    let n = d.count(8)?;
    (0..n).map(|_| d.u64()).collect()
}

fn apply(state: &mut ManifestState, payload: &[u8]) -> Result<(), DecodeError> {
    let mut d = Dec::new(payload);
    match d.u8()? {
        1 | 3 => {
            let snapshot = payload[0] == 3;
            let next_lsn = d.u64()?;
            let offsets = dec_offsets(&mut d)?;
            let files = dec_files(&mut d)?;
            if snapshot {
                state.files.clear();
            }
            state.next_lsn = next_lsn;
            state.offsets = offsets;
            for f in files {
                state.files.insert(f.path.clone(), Arc::new(f));
            }
        }
        2 => {
            let n = d.count(4)?;
            for _ in 0..n {
                state.files.remove(d.str()?);
            }
            for f in dec_files(&mut d)? {
                state.files.insert(f.path.clone(), Arc::new(f));
            }
        }
        _ => return d.err("manifest entry tag"),
    }
    if !d.is_empty() {
        return d.err("trailing bytes in manifest entry");
    }
    Ok(())
}

/// The state `data` describes (its valid frames) and how many bytes are valid.
fn replay(path: &Path, data: &[u8], partitions: usize) -> Result<(ManifestState, usize)> {
    let (frames, valid) = unframe(data);
    let mut state = ManifestState {
        offsets: vec![0; partitions],
        ..ManifestState::default()
    };
    for f in frames {
        apply(&mut state, f).map_err(|e| Error::Manifest {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
    }
    Ok((state, valid))
}

/// `next_lsn:u64 n:u32 offset:u64*n files` (the body of Seal and Snapshot).
fn enc_position(e: &mut Enc, next_lsn: u64, offsets: &[u64], files: &[ArchiveFile]) {
    e.u64(next_lsn);
    e.u32(offsets.len() as u32);
    for &o in offsets {
        e.u64(o);
    }
    enc_files(e, files);
}

impl Manifest {
    /// Opens (or creates) a manifest. A new one starts at `genesis` (the
    /// log position from which records are to be archived).
    pub(crate) fn open(path: &Path, partitions: usize, genesis: (u64, &[u64])) -> Result<Manifest> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io(path))?;
        let (state, valid) = replay(path, &data, partitions)?;
        if state.offsets.len() != partitions {
            return Err(Error::Manifest {
                path: path.display().to_string(),
                what: format!(
                    "covers {} log partitions but the log has {partitions}; move the archive manifest and archive away to start a new archive",
                    state.offsets.len()
                ),
            });
        }
        if (valid as u64) < data.len() as u64 {
            tracing::warn!(manifest = %path.display(), valid, len = data.len(), "cutting a torn manifest tail");
            file.set_len(valid as u64).map_err(io(path))?;
        }
        file.seek(SeekFrom::Start(valid as u64)).map_err(io(path))?;
        let mut m = Manifest {
            path: path.to_path_buf(),
            file,
            len: valid as u64,
            state,
            existed,
        };
        if !existed {
            // A first, empty entry: from now on the file names every file.
            let mut offsets = m.state.offsets.clone();
            for (o, g) in offsets.iter_mut().zip(genesis.1) {
                *o = *g;
            }
            m.append(Entry::Seal {
                next_lsn: genesis.0,
                offsets: &offsets,
                add: &[],
            })?;
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
            }
        }
        Ok(m)
    }

    /// The sealed log position a manifest file records (`None`: no file).
    pub(crate) fn read_position(path: &Path, partitions: usize) -> Result<Option<(u64, Vec<u64>)>> {
        if !path.exists() {
            return Ok(None);
        }
        let data = std::fs::read(path).map_err(io(path))?;
        let (state, _) = replay(path, &data, partitions)?;
        Ok(Some((state.next_lsn, state.offsets)))
    }

    /// Appends one entry durably and applies it to the state.
    pub(crate) fn append(&mut self, entry: Entry<'_>) -> Result<()> {
        let mut e = Enc::new();
        match entry {
            Entry::Seal {
                next_lsn,
                offsets,
                add,
            } => {
                e.u8(1);
                enc_position(&mut e, next_lsn, offsets, add);
            }
            Entry::Replace { remove, add } => {
                e.u8(2);
                e.u32(remove.len() as u32);
                for r in remove {
                    e.str(r);
                }
                enc_files(&mut e, add);
            }
        }
        let mut buf = Vec::with_capacity(e.buf.len() + 8);
        frame(&mut buf, &e.buf);
        let path = self.path.clone();
        let res = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data());
        if let Err(source) = res {
            // Cut back so the next entry does not follow a torn one.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(Error::Io {
                path: path.display().to_string(),
                source,
            });
        }
        self.len += buf.len() as u64;
        apply(&mut self.state, &e.buf).map_err(|e| Error::Manifest {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
        if self.len > REWRITE_BYTES {
            self.rewrite()?;
        }
        Ok(())
    }

    /// Writes the whole state as one snapshot entry into a new file.
    fn rewrite(&mut self) -> Result<()> {
        let mut e = Enc::new();
        e.u8(3);
        let files: Vec<ArchiveFile> = self.state.files.values().map(|f| (**f).clone()).collect();
        enc_position(&mut e, self.state.next_lsn, &self.state.offsets, &files);
        let mut buf = Vec::new();
        frame(&mut buf, &e.buf);
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&buf).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io(&self.path))?;
        file.seek(SeekFrom::End(0)).map_err(io(&self.path))?;
        self.file = file;
        self.len = buf.len() as u64;
        Ok(())
    }
}

/// Entry point for the fuzz target in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    /// Replays a manifest file's bytes: `Ok` (how many bytes are valid) or
    /// an error naming the file; never a panic.
    pub fn manifest(bytes: &[u8]) -> Result<usize, String> {
        super::replay(std::path::Path::new("manifest"), bytes, 2)
            .map(|(_, valid)| valid)
            .map_err(|e| e.to_string())
    }
}

/// Fuzzing of the manifest decoder (the property-test side; the
/// coverage-guided side is `fuzz/fuzz_targets/manifest.rs`): any bytes,
/// framed with a valid CRC so they reach the decoder, or a real manifest
/// mutated, are either replayed or refused with an error — never a panic,
/// never an allocation sized by a corrupt count.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn file(i: u8) -> ArchiveFile {
        ArchiveFile {
            path: format!("tenant=t{i}/part-{i}.parquet"),
            tenant: format!("t{i}").into(),
            min_ts: i64::from(i) * 1000,
            max_ts: i64::from(i) * 1000 + 999,
            rows: u64::from(i) + 1,
            bytes: 100,
        }
    }

    /// A valid manifest body: a seal, a replace, a snapshot.
    fn valid_manifest() -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Enc::default();
        e.u8(1);
        enc_position(&mut e, 10, &[4, 6], &[file(1), file(2)]);
        frame(&mut out, &e.buf);
        let mut e = Enc::default();
        e.u8(2);
        e.u32(1);
        e.str(&file(1).path);
        enc_files(&mut e, &[file(3)]);
        frame(&mut out, &e.buf);
        let mut e = Enc::default();
        e.u8(3);
        enc_position(&mut e, 20, &[9, 9], &[file(2), file(3)]);
        frame(&mut out, &e.buf);
        out
    }

    #[test]
    fn the_valid_manifest_replays() {
        let (state, valid) = replay(Path::new("m"), &valid_manifest(), 2).unwrap();
        assert_eq!(valid, valid_manifest().len());
        assert_eq!(state.next_lsn, 20);
        assert_eq!(state.files.len(), 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn framed_junk_never_panics(payloads in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..200), 0..6)) {
            let mut data = Vec::new();
            for p in &payloads {
                frame(&mut data, p);
            }
            let _ = replay(Path::new("m"), &data, 2);
        }

        #[test]
        fn a_mutated_manifest_never_panics(
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<proptest::sample::Index>(),
            refresh_crc in any::<bool>(),
        ) {
            let mut data = valid_manifest();
            for (at, b) in &flips {
                let i = at.index(data.len());
                data[i] ^= b | 1;
            }
            data.truncate(cut.index(data.len() + 1).max(1));
            if refresh_crc {
                // Re-frame what is left so the decoder sees the mutations.
                let original = valid_manifest();
                let (frames, _) = unframe(&original);
                let mut out = Vec::new();
                for f in frames {
                    let mut f = f.to_vec();
                    for (at, b) in &flips {
                        let i = at.index(f.len().max(1));
                        if i < f.len() {
                            f[i] ^= b | 1;
                        }
                    }
                    frame(&mut out, &f);
                }
                data = out;
            }
            match replay(Path::new("m"), &data, 2) {
                Ok((state, valid)) => prop_assert!(valid <= data.len() && state.files.len() <= 3),
                // Refused naming the file.
                Err(e) => prop_assert!(e.to_string().starts_with("m: "), "{e}"),
            }
        }
    }
}
