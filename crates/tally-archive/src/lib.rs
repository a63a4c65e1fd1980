//! The raw event store: every accepted, deduplicated event (late ones
//! included) in columnar form.
//!
//! ```text
//! processor ──(record, dropped ranges)──▶ RawWriter ─ builders per tenant
//!                                             │ flush (when idle or 8k rows)
//!                                             ▼
//!                                         hot: Arrow batches per tenant  ◀── SQL
//!                                             │ seal (interval / rows / shutdown)
//!                                             ▼
//!     archive/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/part-….parquet      ◀── SQL, DuckDB, Spark
//!     state/archive.manifest (which files are live, how far the log is sealed)
//! ```
//!
//! # Exactly once, through crashes
//!
//! The processor decides which events of a record are kept (first sight of a
//! `(tenant, event_id)`); the raw store only ever sees records with those
//! decisions, as *dropped ranges*. A seal writes its Parquet files first and
//! then appends one manifest entry naming the files and the log position it
//! covers (per-partition offsets and the last lsn). The manifest is the
//! truth: files it does not name are leftovers of a crash and are deleted on
//! start. After a crash the hot data is rebuilt from the log, starting at the
//! sealed position, with the dropped ranges the processor's checkpoint kept
//! for records it had already applied.

mod archive;
mod encode;
mod manifest;
mod schema;
pub(crate) mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed},
};

use arrow::record_batch::RecordBatch;
use parking_lot::RwLock;
use tally_types::Millis;

pub use archive::{Archive, ArchiveTarget, S3Config};
pub use manifest::ArchiveFile;
#[doc(hidden)]
pub use manifest::fuzzing;
pub use schema::{events_schema, hive_dir, to_events_schema, version_i32};
pub use writer::{
    CompactReport, PUBLISH_INTERVAL, RawConfig, RawWriter, SealReport, compaction_groups,
    merge_parquet,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("archive I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("{path}: {what}")]
    Manifest { path: String, what: String },
    #[error("archive config: {0}")]
    Config(String),
    #[error("record lsn {lsn}: {what}")]
    Record { lsn: u64, what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One batch of hot (not yet sealed) rows of one tenant.
#[derive(Debug, Clone)]
pub struct HotBatch {
    /// Increasing per store: a seal removes the batches up to its snapshot.
    pub seq: u64,
    pub batch: RecordBatch,
    pub min_ts: Millis,
    pub max_ts: Millis,
}

/// Hot rows per tenant.
#[derive(Debug, Default)]
pub struct Hot {
    pub tenants: HashMap<Arc<str>, Vec<HotBatch>>,
    pub rows: usize,
    pub bytes: usize,
    /// Batches up to this seq belong to the seal in flight: they are never
    /// merged with newer ones (the seal removes them by seq when it lands).
    pub sealing_through: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RawStats {
    pub rows_appended: AtomicU64,
    pub rows_sealed: AtomicU64,
    pub files_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub seals: AtomicU64,
    pub seal_errors: AtomicU64,
    pub seal_us_total: AtomicU64,
    pub files_deleted: AtomicU64,
    pub rows_deleted: AtomicU64,
    /// Small files merged away by compaction.
    pub files_compacted: AtomicU64,
}

/// What queries read: hot batches and the live archive files.
pub struct RawShared {
    pub archive: Archive,
    pub hot: RwLock<Hot>,
    pub files: RwLock<Vec<Arc<ArchiveFile>>>,
    /// One past the last lsn whose kept events are all in archive files.
    pub sealed_lsn: AtomicU64,
    /// Per partition, where the log continues after the sealed records
    /// (what recovery of the raw store replays from).
    pub sealed_offsets: parking_lot::Mutex<Vec<u64>>,
    /// One past the last lsn whose kept events queries see (hot batches or
    /// files). The raw thread publishes at most every
    /// [`PUBLISH_INTERVAL`] while records keep coming; a reader that
    /// must see every record up to some lsn waits for this
    /// ([`RawShared::wait_published`]).
    pub published_lsn: AtomicU64,
    /// Bumped whenever data visible to queries changes (for result caches).
    pub version: AtomicU64,
    pub stats: RawStats,
}

impl std::fmt::Debug for RawShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawShared")
            .field("archive", &self.archive)
            .field("sealed_lsn", &self.sealed_lsn)
            .finish_non_exhaustive()
    }
}

impl RawShared {
    /// The hot batches and archive files of one tenant whose time range
    /// overlaps `[from, to)`. Both lists are read under both locks (files,
    /// then hot — the order a seal commits in), so a row moving from hot to
    /// a file is seen exactly once.
    pub fn snapshot(&self, tenant: &str, from: Millis, to: Millis) -> Snapshot {
        let files_g = self.files.read();
        let hot = self.hot.read();
        let files = files_g
            .iter()
            .filter(|f| &*f.tenant == tenant && f.max_ts >= from && f.min_ts < to)
            .cloned()
            .collect();
        let batches = hot
            .tenants
            .get(tenant)
            .map(|v| {
                v.iter()
                    .filter(|b| b.max_ts >= from && b.min_ts < to)
                    .map(|b| b.batch.clone())
                    .collect()
            })
            .unwrap_or_default();
        Snapshot { files, batches }
    }

    /// Waits (polling) until queries see every record before `lsn`.
    /// Answers false if that did not happen within `timeout`.
    pub async fn wait_published(&self, lsn: u64, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.published_lsn.load(Acquire) < lsn {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        true
    }

    pub fn bump_version(&self) {
        self.version.fetch_add(1, Relaxed);
    }
}

/// The sealed log position `(next lsn, per-partition offsets)` a manifest
/// records, without opening the archive (`None`: no manifest yet).
pub fn sealed_position(
    manifest: &std::path::Path,
    partitions: usize,
) -> Result<Option<(u64, Vec<u64>)>> {
    manifest::Manifest::read_position(manifest, partitions)
}

/// What one query reads.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub files: Vec<Arc<ArchiveFile>>,
    pub batches: Vec<RecordBatch>,
}

#[cfg(test)]
mod tests;
