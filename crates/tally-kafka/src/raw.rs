//! Raw events in Kafka mode: every owned partition keeps the events it
//! kept (everything but duplicates, late events included) since its last
//! seal, and seals them into the shared archive as Parquet files, one per
//! tenant and hour, named by the cluster, the partition and the offset
//! range they cover (`kafka-<topic>-g<group>-p<partition>-<from>-<to>.parquet`
//! in the usual `tenant=/date=/hour=` layout; `<group>` is eight hex
//! digits of the group id's hash, so clusters on one topic never write the
//! same name).
//!
//! A seal happens at a commit: the files are written first, then the
//! transaction that lists them (a `codec::Key::Files` record) and moves
//! the partition's *raw-from* offset to the seal's end commits with the
//! consumed offsets. Files no committed record lists (a crash between the
//! write and the commit, a fenced zombie) are never read, and the same
//! range written again holds the same rows under the same name: the
//! decisions are a function of the partition's messages. A new owner
//! rebuilds the unsealed rows by re-reading from raw-from.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, Int32Builder, StringArray, StringBuilder, TimestampMillisecondArray,
    UInt32Array,
};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tally_types::BatchReader;
use tally_types::time::{HOUR_MS, Millis, align_down};

use crate::Error;
use crate::codec::SealedFile;

/// Where and how often owned partitions seal their raw events.
#[derive(Clone)]
pub struct RawSink {
    pub archive: tally_archive::Archive,
    /// Rows are sealed at least this often...
    pub seal_interval: Duration,
    /// ... or once a partition holds this many.
    pub seal_rows: usize,
    pub zstd_level: i32,
    /// Compaction merges a partition's files of one (tenant, hour) once
    /// there are this many, or two once the hour is over; files of more
    /// rows than `compact_rows` are left alone.
    pub compact_files: usize,
    pub compact_rows: u64,
    /// Replaced files are deleted this long after the transaction that
    /// replaced them (queries that listed them may still be reading).
    pub grace: Duration,
    /// Files whose newest event is older than this go (0: kept).
    pub retention_ms: Millis,
    /// Files of a partition no transaction lists are deleted by its owner
    /// once unchanged this long (see [`orphans`]).
    pub orphan_age: Duration,
}

impl RawSink {
    /// How often an owner sweeps a partition for orphans, and how long it
    /// owns one before its first sweep: a sixth of the orphan age (a sweep
    /// lists the whole archive: a longer age lists less often), and at
    /// least the grace, so that what an earlier owner replaced is no
    /// longer read by any query.
    pub(crate) fn sweep_every(&self) -> Duration {
        (self.orphan_age / 6).max(self.grace)
    }
}

/// A committed archive file of a partition: the offsets `[from, to)` it
/// covers, and the file.
pub(crate) type Listed = (u64, u64, SealedFile);

/// What one compaction round of a partition does.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Plan {
    /// Groups of files of one (tenant, hour), in offset order, to merge.
    pub merges: Vec<Vec<Listed>>,
    /// Files past the archive retention.
    pub expired: Vec<String>,
}

/// Merges per round at most (a commit waits for them).
const MERGES_PER_ROUND: usize = 8;

/// The compaction round for a partition's committed files at wall time
/// `now`.
pub(crate) fn plan(files: &[Listed], sink: &RawSink, now: Millis) -> Plan {
    let mut out = Plan::default();
    let expire_before = if sink.retention_ms > 0 {
        now.saturating_sub(sink.retention_ms)
    } else {
        Millis::MIN
    };
    let mut live = Vec::with_capacity(files.len());
    for entry in files {
        if entry.2.max_ts < expire_before {
            out.expired.push(entry.2.path.clone());
        } else {
            live.push(entry);
        }
    }
    fn describe<'b>(e: &'b &Listed) -> (&'b str, Millis, u64) {
        (&e.2.tenant, align_down(e.2.min_ts, HOUR_MS), e.2.rows)
    }
    // In offset order: the merged file is named by the range it covers.
    out.merges = tally_archive::compaction_groups(
        &live,
        describe,
        |a, b| a.0.cmp(&b.0),
        sink.compact_files,
        sink.compact_rows,
    )
    .into_iter()
    .take(MERGES_PER_ROUND)
    .map(|g| g.into_iter().map(|e| (*e).clone()).collect())
    .collect();
    out
}

/// How a cluster's files of `topic` begin: `kafka-<topic>-g<group>`,
/// `<group>` the low 32 bits of the group id's stable hash as hex.
pub fn files_as(topic: &str, group_id: &str) -> String {
    format!(
        "kafka-{}-g{:08x}",
        file_topic(topic),
        tally_types::stable_hash(&[group_id.as_bytes()]) as u32
    )
}

/// The name of a file of `partition`'s offsets `[from, to)` in the
/// directory of `tenant` and `min_ts`.
fn file_path(
    files_as: &str,
    tenant: &str,
    min_ts: Millis,
    partition: u32,
    from: u64,
    to: u64,
) -> String {
    format!(
        "{}/{files_as}-p{partition}-{from:020}-{to:020}.parquet",
        tally_archive::hive_dir(tenant, min_ts)
    )
}

/// A topic name as it goes into file names.
fn file_topic(topic: &str) -> String {
    topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The partition and offset range `[from, to)` in the name of a sealed or
/// merged file named as [`files_as`] says
/// (`…/<files_as>-p<partition>-<from>-<to>.parquet`), or of what an
/// interrupted local write of one left (`.<files_as>-….parquet.tmp`).
pub(crate) fn parse_file_name(path: &str, files_as: &str) -> Option<(u32, u64, u64)> {
    let name = path.rsplit('/').next()?;
    let name = match name.strip_prefix('.') {
        Some(tmp) => tmp.strip_suffix(".tmp")?,
        None => name,
    };
    let stem = name.strip_suffix(".parquet")?;
    let mut parts = stem.rsplitn(3, '-');
    let to = parts.next()?.parse().ok()?;
    let from = parts.next()?.parse().ok()?;
    let head = parts.next()?;
    let partition = head
        .strip_prefix(files_as)?
        .strip_prefix("-p")?
        .parse()
        .ok()?;
    Some((partition, from, to))
}

/// What a sweep of a partition's archive files may delete.
pub(crate) struct Sweep {
    /// Every file the partition's committed records list.
    pub listed: std::collections::HashSet<String>,
    /// Files replaced by this owner, deleted by it after their grace.
    pub keep: std::collections::HashSet<String>,
    /// The partition's committed raw-from offset: no seal of it or of a
    /// later owner writes a range ending at or below it again.
    pub raw_from: u64,
    /// Files changed at or after this (ms since the epoch) are left.
    pub changed_before: Millis,
}

/// The files of `partition` in `objects` (path, size, last modified) that
/// no committed record lists and none ever will: the range ends at or
/// below the committed raw-from, the file is not one this owner replaced
/// and is still to delete, and it has not changed since
/// `sweep.changed_before`. Such files were left by a seal or a merge
/// interrupted before its transaction committed, or by an owner that
/// stopped before deleting what it had replaced.
pub(crate) fn orphans(
    objects: &[(String, u64, Millis)],
    files_as: &str,
    partition: u32,
    sweep: &Sweep,
) -> Vec<String> {
    objects
        .iter()
        .filter(|(path, _, modified)| {
            *modified < sweep.changed_before
                && !sweep.listed.contains(path)
                && !sweep.keep.contains(path)
                && parse_file_name(path, files_as)
                    .is_some_and(|(p, _, to)| p == partition && to <= sweep.raw_from)
        })
        .map(|(path, _, _)| path.clone())
        .collect()
}

/// Deletes the [`orphans`] of `partition`, each only if it has still not
/// changed (an owner writing the same name again makes it new). Answers
/// how many went.
pub(crate) fn sweep(
    sink: &RawSink,
    rt: &tokio::runtime::Runtime,
    files_as: &str,
    partition: u32,
    sweep: &Sweep,
) -> Result<u64, Error> {
    let err = |what: String| Error::Archive {
        archive: sink.archive.describe.clone(),
        what,
    };
    let objects = rt
        .block_on(sink.archive.list_modified())
        .map_err(|e| err(e.to_string()))?;
    let mut gone = 0;
    for path in orphans(&objects, files_as, partition, sweep) {
        let still = rt
            .block_on(sink.archive.modified(&path))
            .map_err(|e| err(e.to_string()))?;
        if still.is_some_and(|m| m < sweep.changed_before) {
            rt.block_on(sink.archive.delete(&path))
                .map_err(|e| err(e.to_string()))?;
            gone += 1;
        }
    }
    if gone > 0 {
        tracing::info!(
            partition,
            files = gone,
            archive = %sink.archive.describe,
            "deleted archive files no transaction lists (left by an interrupted seal or merge, or by an owner that stopped)"
        );
    }
    Ok(gone)
}

/// Merges one group of [`plan`] into one file named by the offset range
/// it covers (the same group merged again, after a failover, is the same
/// file under the same name). Answers its range and listing.
pub(crate) fn merge(
    sink: &RawSink,
    rt: &tokio::runtime::Runtime,
    files_as: &str,
    partition: u32,
    group: &[Listed],
) -> Result<Listed, Error> {
    let err = |what: String| Error::Archive {
        archive: sink.archive.describe.clone(),
        what,
    };
    let (Some(first), Some(last)) = (group.first(), group.last()) else {
        return Err(err("nothing to merge".into()));
    };
    let (from, to) = (first.0, last.1);
    let mut inputs = Vec::with_capacity(group.len());
    for (_, _, f) in group {
        inputs.push(
            rt.block_on(sink.archive.get(&f.path))
                .map_err(|e| err(e.to_string()))?,
        );
    }
    let (rows, bytes) = tally_archive::merge_parquet(&inputs, sink.zstd_level)
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("nothing to merge".into()))?;
    let tenant = first.2.tenant.clone();
    let min_ts = group
        .iter()
        .map(|e| e.2.min_ts)
        .min()
        .unwrap_or(first.2.min_ts);
    let max_ts = group
        .iter()
        .map(|e| e.2.max_ts)
        .max()
        .unwrap_or(first.2.max_ts);
    let path = file_path(files_as, &tenant, min_ts, partition, from, to);
    let size = bytes.len() as u64;
    rt.block_on(sink.archive.put(&path, bytes))
        .map_err(|e| err(e.to_string()))?;
    Ok((
        from,
        to,
        SealedFile {
            path,
            tenant,
            min_ts,
            max_ts,
            rows,
            bytes: size,
        },
    ))
}

/// One tenant's rows, column by column (texts in one buffer each: no
/// allocation per row).
#[derive(Default)]
struct Rows {
    event_id: StringBuilder,
    event_type: StringBuilder,
    user_id: StringBuilder,
    session_id: StringBuilder,
    ts: Vec<Millis>,
    props: StringBuilder,
    received_at: Vec<Millis>,
    schema_version: Int32Builder,
}

/// The unsealed raw rows of one partition.
#[derive(Default)]
pub(crate) struct RawBuf {
    tenants: HashMap<String, Rows>,
    rows: usize,
    /// When the oldest unsealed row arrived.
    since: Option<Instant>,
    json: Vec<u8>,
}

fn text(b: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

impl RawBuf {
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Keeps every event of a batch except those in `drops` (sorted
    /// `(start, len)` index ranges: the duplicates).
    pub(crate) fn append(
        &mut self,
        payload: &[u8],
        received_at: Millis,
        drops: &[(u32, u32)],
    ) -> Result<(), tally_types::CodecError> {
        let mut reader = BatchReader::new(payload)?;
        let mut drops = drops.iter().peekable();
        let mut i = 0u32;
        while let Some(ev) = reader.next_raw_rendered(&mut self.json) {
            let ev = ev?;
            let at = i;
            i += 1;
            while drops.peek().is_some_and(|&&(s, l)| s + l <= at) {
                drops.next();
            }
            if drops.peek().is_some_and(|&&(s, _)| s <= at) {
                continue;
            }
            let tenant = std::str::from_utf8(ev.tenant).unwrap_or("default");
            let r = match self.tenants.get_mut(tenant) {
                Some(r) => r,
                None => self.tenants.entry(tenant.to_string()).or_default(),
            };
            r.event_id.append_value(text(ev.event_id));
            r.event_type.append_value(text(ev.event_type));
            r.user_id.append_option(ev.user_id.map(text));
            r.session_id.append_option(ev.session_id.map(text));
            r.ts.push(ev.ts);
            r.props
                .append_value(text(ev.props_text().unwrap_or(&self.json)));
            r.received_at.push(received_at);
            r.schema_version
                .append_option(ev.schema_version.map(tally_archive::version_i32));
            self.rows += 1;
            self.since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Whether the rows are due for a seal.
    pub(crate) fn due(&self, sink: &RawSink) -> bool {
        self.rows > 0
            && (self.rows >= sink.seal_rows.max(1)
                || self
                    .since
                    .is_some_and(|t| t.elapsed() >= sink.seal_interval))
    }

    /// Writes every row as Parquet files (one per tenant and hour, rows in
    /// time order) covering offsets `[from, to)` of `partition`, and
    /// forgets them. A failed write ends the worker's session (the next
    /// owner rebuilds the rows from raw-from), so what was taken is not
    /// kept.
    pub(crate) fn seal(
        &mut self,
        sink: &RawSink,
        rt: &tokio::runtime::Runtime,
        files_as: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<SealedFile>, Error> {
        let err = |what: String| Error::Archive {
            archive: sink.archive.describe.clone(),
            what,
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(sink.zstd_level).unwrap_or_default(),
            ))
            .build();
        let mut tenants: Vec<String> = self.tenants.keys().cloned().collect();
        tenants.sort();
        let mut out = Vec::new();
        for tenant in tenants {
            let Some(mut r) = self.tenants.remove(&tenant) else {
                continue;
            };
            let n = r.ts.len();
            let all: [ArrayRef; 6] = [
                Arc::new(r.event_id.finish()),
                Arc::new(r.event_type.finish()),
                Arc::new(r.user_id.finish()),
                Arc::new(r.session_id.finish()),
                Arc::new(r.props.finish()),
                Arc::new(r.schema_version.finish()),
            ];
            let ts: ArrayRef = Arc::new(
                TimestampMillisecondArray::from(std::mem::take(&mut r.ts)).with_timezone("UTC"),
            );
            let received: ArrayRef = Arc::new(
                TimestampMillisecondArray::from(std::mem::take(&mut r.received_at))
                    .with_timezone("UTC"),
            );
            let times = ts
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .expect("built above")
                .values()
                .clone();
            // Time order (stable), then one file per hour.
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by_key(|&i| times[i as usize]);
            for hour in order.chunk_by(|&a, &b| {
                align_down(times[a as usize], HOUR_MS) == align_down(times[b as usize], HOUR_MS)
            }) {
                let idx = UInt32Array::from(hour.to_vec());
                let take = |a: &ArrayRef| {
                    arrow::compute::take(a.as_ref(), &idx, None).map_err(|e| err(e.to_string()))
                };
                let columns: Vec<ArrayRef> = vec![
                    take(&all[0])?,
                    Arc::new(StringArray::from_iter_values(
                        hour.iter().map(|_| tenant.as_str()),
                    )),
                    take(&all[1])?,
                    take(&all[2])?,
                    take(&all[3])?,
                    take(&ts)?,
                    take(&all[4])?,
                    take(&received)?,
                    take(&all[5])?,
                ];
                let batch = RecordBatch::try_new(tally_archive::events_schema(), columns)
                    .map_err(|e| err(e.to_string()))?;
                let mut buf = Vec::new();
                let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props.clone()))
                    .map_err(|e| err(e.to_string()))?;
                w.write(&batch).map_err(|e| err(e.to_string()))?;
                w.close().map_err(|e| err(e.to_string()))?;
                let min_ts = times[hour[0] as usize];
                let max_ts = times[hour[hour.len() - 1] as usize];
                let path = file_path(files_as, &tenant, min_ts, partition, from, to);
                let bytes = buf.len() as u64;
                rt.block_on(sink.archive.put(&path, bytes::Bytes::from(buf)))
                    .map_err(|e| err(e.to_string()))?;
                out.push(SealedFile {
                    path,
                    tenant: tenant.clone(),
                    min_ts,
                    max_ts,
                    rows: hour.len() as u64,
                    bytes,
                });
            }
        }
        self.tenants.clear();
        self.rows = 0;
        self.since = None;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Millis = HOUR_MS;

    fn file(tenant: &str, hour: Millis, rows: u64, path: &str) -> SealedFile {
        SealedFile {
            path: path.into(),
            tenant: tenant.into(),
            min_ts: hour + 1,
            max_ts: hour + 2,
            rows,
            bytes: 10,
        }
    }

    fn sink(retention_ms: Millis) -> RawSink {
        RawSink {
            archive: tally_archive::Archive::open(&tally_archive::ArchiveTarget::Local(
                std::env::temp_dir(),
            ))
            .unwrap(),
            seal_interval: Duration::from_secs(1),
            seal_rows: 10,
            zstd_level: 1,
            compact_files: 3,
            compact_rows: 100,
            grace: Duration::ZERO,
            retention_ms,
            orphan_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn file_names_give_partition_and_range() {
        let at = files_as("user-events.v2", "tally");
        assert!(at.starts_with("kafka-user-events.v2-g"), "{at}");
        assert_eq!(at.len(), "kafka-user-events.v2-g".len() + 8);
        let name = |at: &str, p: u32, from: u64, to: u64| {
            format!("tenant=a/date=2026-12-07/hour=10/{at}-p{p}-{from:020}-{to:020}.parquet")
        };
        assert_eq!(
            parse_file_name(&name(&at, 3, 10, 20), &at),
            Some((3, 10, 20))
        );
        assert_eq!(
            file_path(&at, "a", 10 * H, 3, 10, 20).rsplit('/').next(),
            name(&at, 3, 10, 20).rsplit('/').next()
        );
        // An interrupted local write leaves a hidden temporary file.
        let tmp = format!(
            "tenant=a/date=2026-12-07/hour=10/.{at}-p3-00000000000000000010-00000000000000000020.parquet.tmp"
        );
        assert_eq!(parse_file_name(&tmp, &at), Some((3, 10, 20)));
        // Another cluster on the same topic, another topic, names of
        // before groups were in them, embedded-mode files, other objects.
        let other = files_as("user-events.v2", "staging");
        assert_ne!(other, at);
        assert_eq!(parse_file_name(&name(&other, 3, 10, 20), &at), None);
        assert_eq!(
            parse_file_name(&name(&at, 3, 10, 20), &files_as("user", "tally")),
            None
        );
        assert_eq!(
            parse_file_name(&name("kafka-user-events.v2", 3, 10, 20), &at),
            None
        );
        assert_eq!(
            parse_file_name(
                "tenant=a/date=2026-12-07/hour=10/p0-00000000000000000001-00000000000000000002.parquet",
                &at
            ),
            None
        );
        assert_eq!(parse_file_name("manifest.json", &at), None);
        // Topic characters that do not go into names are written as `_`.
        assert!(files_as("a/b", "g").starts_with("kafka-a_b-g"));
    }

    #[test]
    fn orphans_are_unlisted_old_files_below_raw_from() {
        let t = &files_as("ev", "g");
        let path = |p: u32, from: u64, to: u64| {
            format!("tenant=a/date=2026-12-07/hour=10/{t}-p{p}-{from:020}-{to:020}.parquet")
        };
        let sweep = Sweep {
            listed: [path(1, 0, 10)].into_iter().collect(),
            keep: [path(1, 10, 20)].into_iter().collect(),
            raw_from: 40,
            changed_before: 1_000,
        };
        let objects = vec![
            (path(1, 0, 10), 5, 10),    // listed
            (path(1, 10, 20), 5, 10),   // replaced by this owner: its grace runs
            (path(1, 20, 30), 5, 10),   // orphan
            (path(1, 30, 40), 5, 10),   // orphan, ends at raw-from
            (path(1, 30, 50), 5, 10),   // past raw-from: a seal may write it again
            (path(1, 0, 30), 5, 1_000), // changed too lately
            (path(2, 20, 30), 5, 10),   // another partition
            ("manifest.json".into(), 5, 10),
        ];
        assert_eq!(
            orphans(&objects, t, 1, &sweep),
            vec![path(1, 20, 30), path(1, 30, 40)]
        );
    }

    #[test]
    fn plans_merges_per_tenant_and_hour_and_expiry() {
        let files = vec![
            (0, 10, file("a", 10 * H, 5, "a1")),
            (10, 20, file("a", 10 * H, 5, "a2")),
            (20, 30, file("b", 10 * H, 5, "b1")),
            // The open hour of a: two files wait for a third.
            (20, 30, file("a", 11 * H, 5, "a3")),
            (30, 40, file("a", 11 * H, 5, "a4")),
            // Too big to merge.
            (40, 50, file("a", 10 * H, 500, "big")),
            (50, 60, file("b", 2 * H, 5, "old")),
        ];
        let p = plan(&files, &sink(0), 100 * H);
        let paths: Vec<Vec<&str>> = p
            .merges
            .iter()
            .map(|g| g.iter().map(|e| e.2.path.as_str()).collect())
            .collect();
        // a's hour 10 is over (a has hour 11): its two small files merge;
        // b's hour 2 is over too; b's hour 10 is its newest, with one file.
        assert_eq!(paths, vec![vec!["a1", "a2"]]);
        assert!(p.expired.is_empty());
        // Retention: what ended more than 90 hours ago goes.
        let p = plan(&files, &sink(90 * H), 100 * H);
        assert_eq!(p.expired, vec!["old".to_string()]);
    }
}
