//! Raw events in Kafka mode: every owned partition keeps the events it
//! kept (everything but duplicates, late events included) since its last
//! seal, and seals them into the shared archive as Parquet files, one per
//! tenant and hour, named by the partition and the offset range they
//! cover (`kafka-<topic>-p<partition>-<from>-<to>.parquet` in the usual
//! `tenant=/date=/hour=` layout).
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

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
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
}

#[derive(Default)]
struct Rows {
    event_id: Vec<String>,
    event_type: Vec<String>,
    user_id: Vec<Option<String>>,
    session_id: Vec<Option<String>>,
    ts: Vec<Millis>,
    props: Vec<String>,
    received_at: Vec<Millis>,
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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
            r.event_id.push(text(ev.event_id));
            r.event_type.push(text(ev.event_type));
            r.user_id.push(ev.user_id.map(text));
            r.session_id.push(ev.session_id.map(text));
            r.ts.push(ev.ts);
            r.props.push(text(ev.props_text().unwrap_or(&self.json)));
            r.received_at.push(received_at);
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
    /// forgets them. Nothing is forgotten when a write fails.
    pub(crate) fn seal(
        &mut self,
        sink: &RawSink,
        rt: &tokio::runtime::Runtime,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<Vec<SealedFile>, Error> {
        let err = |what: String| Error::Archive {
            archive: sink.archive.describe.clone(),
            what,
        };
        let topic: String = topic
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(sink.zstd_level).unwrap_or_default(),
            ))
            .build();
        let mut tenants: Vec<&String> = self.tenants.keys().collect();
        tenants.sort();
        let mut out = Vec::new();
        for tenant in tenants {
            let r = &self.tenants[tenant];
            let mut order: Vec<usize> = (0..r.ts.len()).collect();
            order.sort_by_key(|&i| r.ts[i]);
            for hour in order
                .chunk_by(|&a, &b| align_down(r.ts[a], HOUR_MS) == align_down(r.ts[b], HOUR_MS))
            {
                let pick = |v: &Vec<String>| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(
                        hour.iter().map(|&i| v[i].as_str()),
                    ))
                };
                let pick_opt = |v: &Vec<Option<String>>| -> ArrayRef {
                    Arc::new(StringArray::from_iter(
                        hour.iter().map(|&i| v[i].as_deref()),
                    ))
                };
                let times = |v: &Vec<Millis>| -> ArrayRef {
                    Arc::new(
                        TimestampMillisecondArray::from_iter_values(hour.iter().map(|&i| v[i]))
                            .with_timezone("UTC"),
                    )
                };
                let columns: Vec<ArrayRef> = vec![
                    pick(&r.event_id),
                    Arc::new(StringArray::from_iter_values(
                        hour.iter().map(|_| tenant.as_str()),
                    )),
                    pick(&r.event_type),
                    pick_opt(&r.user_id),
                    pick_opt(&r.session_id),
                    times(&r.ts),
                    pick(&r.props),
                    times(&r.received_at),
                ];
                let batch = RecordBatch::try_new(tally_archive::events_schema(), columns)
                    .map_err(|e| err(e.to_string()))?;
                let mut buf = Vec::new();
                let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props.clone()))
                    .map_err(|e| err(e.to_string()))?;
                w.write(&batch).map_err(|e| err(e.to_string()))?;
                w.close().map_err(|e| err(e.to_string()))?;
                let min_ts = r.ts[hour[0]];
                let max_ts = r.ts[hour[hour.len() - 1]];
                let path = format!(
                    "{}/kafka-{topic}-p{partition}-{from:020}-{to:020}.parquet",
                    tally_archive::hive_dir(tenant, min_ts)
                );
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
