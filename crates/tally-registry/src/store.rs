//! The registry's durable form: one append-only file of JSON lines in the
//! data directory, a header line then one record per change, each synced
//! before the change is answered. A torn last line (a crash mid-append)
//! is cut off at open; a damaged line before it is an error naming the
//! line, never a silent loss of registrations.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Level, RegistryError, SchemaType};

/// The format of the file this version writes.
pub(crate) const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    tally_registry: u32,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Record {
    Register {
        tenant: String,
        subject: String,
        version: u32,
        id: u32,
        #[serde(rename = "type")]
        schema_type: SchemaType,
        schema: String,
    },
    Delete {
        tenant: String,
        subject: String,
        version: u32,
        permanent: bool,
    },
    Config {
        tenant: String,
        subject: Option<String>,
        level: Option<Level>,
    },
}

pub(crate) struct Log {
    file: File,
    path: PathBuf,
}

fn io(path: &Path, what: &str, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(format!("{what} {}: {e}", path.display()))
}

impl Log {
    /// Opens (or creates) the log in `dir`; answers it and its records.
    pub(crate) fn open(dir: &Path) -> Result<(Log, Vec<Record>), RegistryError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "creating", e))?;
        let path = dir.join("registry.jsonl");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io(&path, "opening", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io(&path, "reading", e))?;
        let (records, good) = parse(&bytes).map_err(|e| {
            RegistryError::Storage(format!(
                "{} {e}: the file is damaged; restore it from a backup, or move it away to start with an empty registry",
                path.display()
            ))
        })?;
        let mut log = Log { file, path };
        if good < bytes.len() {
            tracing::warn!(
                file = %log.path.display(),
                cut = bytes.len() - good,
                "registry log: cut off a torn last line (a crash during a change that was never answered)"
            );
            log.file
                .set_len(good as u64)
                .map_err(|e| io(&log.path, "truncating", e))?;
            log.file
                .seek(SeekFrom::End(0))
                .map_err(|e| io(&log.path, "seeking", e))?;
        }
        if good == 0 {
            let header = serde_json::to_string(&Header {
                tally_registry: FORMAT,
            })
            .expect("a header serializes");
            log.write_line(&header)?;
        }
        Ok((log, records))
    }

    fn write_line(&mut self, line: &str) -> Result<(), RegistryError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| io(&self.path, "writing", e))
    }

    /// Appends one record, durable when this returns.
    pub(crate) fn append(&mut self, r: &Record) -> Result<(), RegistryError> {
        let line = serde_json::to_string(r).expect("a record serializes");
        self.write_line(&line)
    }
}

/// The records of a log file's bytes and how many bytes are good (a torn
/// last line, without its newline, is left out). An error names the line.
pub(crate) fn parse(bytes: &[u8]) -> Result<(Vec<Record>, usize), String> {
    let mut records = Vec::new();
    let mut at = 0;
    let mut line_no = 0;
    while at < bytes.len() {
        let Some(end) = bytes[at..].iter().position(|&b| b == b'\n') else {
            // No newline: the append never finished.
            break;
        };
        line_no += 1;
        let line = &bytes[at..at + end];
        if line_no == 1 {
            let h: Header = serde_json::from_slice(line)
                .map_err(|e| format!("line 1: not a Tally registry header ({e})"))?;
            if h.tally_registry > FORMAT {
                return Err(format!(
                    "line 1: registry format {} is newer than this Tally reads ({FORMAT}); run a newer Tally",
                    h.tally_registry
                ));
            }
        } else {
            let r: Record =
                serde_json::from_slice(line).map_err(|e| format!("line {line_no}: {e}"))?;
            records.push(r);
        }
        at += end + 1;
    }
    Ok((records, at))
}
