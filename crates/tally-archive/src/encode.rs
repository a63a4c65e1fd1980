//! Our own Parquet page encoder for the `events` schema.
//!
//! The schema is fixed, so each column's pages are written in one pass
//! straight from the Arrow buffers of the hot batches. parquet-rs's general
//! `ArrowWriter` path turns every value into a `ByteArray`, runs generic
//! encoders and compares each value for statistics; for this schema that
//! cost about as much as zstd itself (`examples/seal_cost` under callgrind).
//! parquet-rs still does the file: page headers (`SerializedPageWriter`),
//! row groups, footer, page index (`SerializedRowGroupWriter::append_column`,
//! the same splice compaction uses) and the Arrow schema in the footer.
//!
//! Encodings, chosen for what zstd (over half of a seal) then has to chew,
//! measured with `examples/seal_cost` under callgrind:
//! - `event_id`, `user_id`: `DELTA_BYTE_ARRAY` (prefix + suffix). Ids
//!   written close in time share long prefixes (counters, ULIDs, `u_…`),
//!   so zstd sees a few bytes a row; random UUIDs cost about what `PLAIN`
//!   does. No dictionary on user ids: interning 100k distinct ids cost more
//!   than zstd on the suffixes.
//! - `tenant`, `event_type`: dictionary (`RLE_DICTIONARY`). A page of one
//!   value (a tenant, always: a file holds one) is a single RLE run,
//!   nothing per row. Past [`DICT_MAX_VALUES`] values or [`DICT_MAX_BYTES`]
//!   bytes a row group falls back to `PLAIN`.
//! - `session_id`: `DELTA_LENGTH_BYTE_ARRAY`: the lengths (a byte or so a
//!   row packed) instead of `PLAIN`'s 4 bytes before each value, which zstd
//!   would have to chew (session ids seldom share a prefix with the row
//!   before, so `DELTA_BYTE_ARRAY` costs more than it saves).
//! - `properties`: `DELTA_LENGTH_BYTE_ARRAY`: the JSON texts back to back
//!   (the hot buffer, copied whole) with their lengths apart, so zstd's
//!   matches run across rows.
//! - `ts`, `received_at`: `DELTA_BINARY_PACKED`, a byte or two per sorted
//!   value.
//! - `schema_version` (nullable INT32): `DELTA_BINARY_PACKED` over the
//!   values present. Nearly always one value or none in a page, which packs
//!   to nothing per row.
//!
//! DuckDB, chDB (ClickHouse) and DataFusion read all of these
//! (`tally-cli/tests/sql.rs` reads the archive with DuckDB;
//! `scripts/bench_sql.sh` with DuckDB and chDB).
//!
//! Data pages are format v1 (definition levels RLE, with their length in
//! front), zstd-compressed page by page. Statistics (column chunk min/max
//! and the column index) are written for `ts`, `received_at` and `tenant`,
//! the columns filters prune on; every column has an offset index.

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{Int32Type, TimestampMillisecondType};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{BoundaryOrder, Compression, Encoding, EncodingMask, ZstdLevel};
use parquet::column::page::{CompressedPage, Page, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::data_type::ByteArray;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ColumnChunkMetaData, ColumnIndexBuilder, OffsetIndexBuilder};
use parquet::file::properties::WriterProperties;
use parquet::file::statistics::Statistics;
use parquet::file::writer::{SerializedFileWriter, SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

use crate::Result;
use crate::schema::events_schema;

/// A data page ends at this many rows ...
pub(crate) const PAGE_ROWS: usize = 16 * 1024;
/// ... or once its values hold this many bytes (before encoding).
pub(crate) const PAGE_BYTES: usize = 1 << 20;
/// A dictionary column falls back to `PLAIN` for a row group with more
/// distinct values than this, or with more dictionary bytes.
pub(crate) const DICT_MAX_VALUES: usize = 1 << 16;
pub(crate) const DICT_MAX_BYTES: usize = 1 << 20;

/// How a column is encoded, in [`events_schema`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Texts as `DELTA_BYTE_ARRAY` (prefix shared with the value before).
    PrefixDelta,
    /// Texts as `PLAIN` (length, bytes).
    Plain,
    /// Texts as `DELTA_LENGTH_BYTE_ARRAY` (lengths, then the bytes).
    LengthDelta,
    /// Texts as a dictionary (`PLAIN` on fallback).
    Dict,
    /// Timestamps as `DELTA_BINARY_PACKED`.
    Int,
    /// Nullable 32-bit integers as `DELTA_BINARY_PACKED` (values present
    /// only, after the definition levels).
    Int32,
}

impl Kind {
    fn is_text(self) -> bool {
        !matches!(self, Kind::Int | Kind::Int32)
    }
}

const KINDS: [Kind; 9] = [
    Kind::PrefixDelta, // event_id
    Kind::Dict,        // tenant
    Kind::Dict,        // event_type
    Kind::PrefixDelta, // user_id
    Kind::LengthDelta, // session_id
    Kind::Int,         // ts
    Kind::LengthDelta, // properties
    Kind::Int,         // received_at
    Kind::Int32,       // schema_version
];

/// Columns with statistics (min/max, column index): what filters prune on.
const STATS: [bool; 9] = [false, true, false, false, false, true, false, true, false];

/// Rows `start..start + len` of one batch.
#[derive(Clone)]
struct Seg {
    batch: RecordBatch,
    start: usize,
    len: usize,
}

/// Writes one Parquet file of `events` rows, row group by row group.
pub(crate) struct FileEncoder {
    file: SerializedFileWriter<Vec<u8>>,
    columns: Vec<ColumnDescPtr>,
    level: i32,
    row_group_rows: usize,
    /// Rows waiting for the row group they belong to.
    pending: Vec<Seg>,
    pending_rows: usize,
    zstd: zstd::bulk::Compressor<'static>,
    scratch: Scratch,
}

/// Buffers reused from page to page.
#[derive(Default)]
struct Scratch {
    page: Vec<u8>,
    /// A page's definition levels, 8 a byte.
    level_bits: Vec<u8>,
    ints: Vec<i64>,
    ints2: Vec<i64>,
    /// `(start, len)` in their batch's value bytes.
    suffixes: Vec<(usize, usize)>,
    idx: Vec<u32>,
}

impl FileEncoder {
    /// `props` gives the file-level settings (created-by, key-value
    /// metadata); pages are encoded as the module doc says.
    pub(crate) fn new(props: WriterProperties, level: i32, row_group_rows: usize) -> Result<Self> {
        let (file, _) = ArrowWriter::try_new(Vec::new(), events_schema(), Some(props))?
            .into_serialized_writer()?;
        let columns = file.schema_descr().columns().to_vec();
        let zstd = zstd::bulk::Compressor::new(level).map_err(ParquetError::from)?;
        Ok(FileEncoder {
            file,
            columns,
            level,
            row_group_rows: row_group_rows.max(1),
            pending: Vec::new(),
            pending_rows: 0,
            zstd,
            scratch: Scratch::default(),
        })
    }

    /// Appends the rows of `batch` (in [`events_schema`]); row groups are
    /// cut every `row_group_rows` rows.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut start = 0;
        let n = batch.num_rows();
        while start < n {
            let take = (self.row_group_rows - self.pending_rows).min(n - start);
            self.pending.push(Seg {
                batch: batch.clone(),
                start,
                len: take,
            });
            self.pending_rows += take;
            start += take;
            if self.pending_rows == self.row_group_rows {
                self.flush_row_group()?;
            }
        }
        Ok(())
    }

    /// Writes the rows still pending and the footer; the file's bytes.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>> {
        self.flush_row_group()?;
        Ok(self.file.into_inner()?)
    }

    fn flush_row_group(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let segs = std::mem::take(&mut self.pending);
        let rows = std::mem::take(&mut self.pending_rows);
        let mut chunks = Vec::with_capacity(KINDS.len());
        for c in 0..KINDS.len() {
            chunks.push(self.column_chunk(c, &segs, rows)?);
        }
        let mut rg = self.file.next_row_group()?;
        for (bytes, close) in chunks {
            rg.append_column(&bytes, close)?;
        }
        rg.close()?;
        Ok(())
    }

    /// One column of the pending row group as a column chunk (its bytes,
    /// with offsets from 0) and its metadata.
    fn column_chunk(
        &mut self,
        c: usize,
        segs: &[Seg],
        rows: usize,
    ) -> Result<(Bytes, ColumnCloseResult)> {
        let descr = self.columns[c].clone();
        let nullable = descr.max_def_level() > 0;
        let stats = STATS[c];
        let mut kind = KINDS[c];
        let mut sink = TrackedWrite::new(Vec::new());
        let mut pages = SerializedPageWriter::new(&mut sink);
        let s = &mut self.scratch;

        // A dictionary: every value's index for the whole row group, and
        // for statistics each entry's rank in byte order.
        let mut dict: Vec<&[u8]> = Vec::new();
        let mut rank: Vec<u32> = Vec::new();
        let mut order: Vec<u32> = Vec::new();
        let mut dict_offset = None;
        let mut uncompressed = 0u64;
        if kind == Kind::Dict {
            s.idx.clear();
            if intern(segs, c, &mut dict, &mut s.idx) {
                s.page.clear();
                for v in &dict {
                    s.page.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    s.page.extend_from_slice(v);
                }
                let spec = pages.write_page(CompressedPage::new(
                    Page::DictionaryPage {
                        buf: compress(&mut self.zstd, &s.page)?,
                        num_values: dict.len() as u32,
                        encoding: Encoding::PLAIN,
                        is_sorted: false,
                    },
                    s.page.len(),
                ))?;
                uncompressed += spec.uncompressed_size as u64;
                dict_offset = Some(spec.offset as i64);
                if stats {
                    order = (0..dict.len() as u32).collect();
                    order.sort_unstable_by_key(|&i| dict[i as usize]);
                    rank = vec![0; dict.len()];
                    for (r, &i) in order.iter().enumerate() {
                        rank[i as usize] = r as u32;
                    }
                }
            } else {
                kind = Kind::Plain;
            }
        }
        let data_encoding = match kind {
            Kind::PrefixDelta => Encoding::DELTA_BYTE_ARRAY,
            Kind::Plain => Encoding::PLAIN,
            Kind::LengthDelta => Encoding::DELTA_LENGTH_BYTE_ARRAY,
            Kind::Dict => Encoding::RLE_DICTIONARY,
            Kind::Int | Kind::Int32 => Encoding::DELTA_BINARY_PACKED,
        };

        let mut col_index = stats.then(|| ColumnIndexBuilder::new(descr.physical_type()));
        let mut offsets = OffsetIndexBuilder::new();
        let mut page_bounds: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut data_offset = None;
        let mut next_idx = 0usize;
        let mut cursor = Cursor::default();
        while let Some(page) = cursor.next_page(segs, c, kind) {
            s.page.clear();
            let page_rows: usize = page.iter().map(|p| p.len).sum();
            let valid: usize = page.iter().map(|p| valid_count(p, c)).sum();
            if nullable {
                def_levels(&page, c, valid, &mut s.page, &mut s.level_bits);
            }
            // Page min/max for statistics, as the column index holds them.
            let mut bounds: Option<(Vec<u8>, Vec<u8>)> = None;
            match kind {
                Kind::Int => {
                    s.ints.clear();
                    for p in &page {
                        let a = p.batch.column(c).as_primitive::<TimestampMillisecondType>();
                        s.ints
                            .extend_from_slice(&a.values()[p.start..p.start + p.len]);
                    }
                    delta_pack(&mut s.page, &s.ints, false);
                    if stats && !s.ints.is_empty() {
                        let (lo, hi) = s
                            .ints
                            .iter()
                            .fold((i64::MAX, i64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                        bounds = Some((lo.to_le_bytes().to_vec(), hi.to_le_bytes().to_vec()));
                    }
                }
                Kind::Int32 => {
                    s.ints.clear();
                    for p in &page {
                        let a = p.batch.column(c).as_primitive::<Int32Type>();
                        // The values present (nulls are in the levels).
                        let rows = a.slice(p.start, p.len);
                        s.ints.extend(rows.iter().flatten().map(i64::from));
                    }
                    delta_pack(&mut s.page, &s.ints, true);
                }
                Kind::Dict => {
                    let idx = &s.idx[next_idx..next_idx + valid];
                    next_idx += valid;
                    let width = bit_width(dict.len().saturating_sub(1) as u64).max(1);
                    s.page.push(width as u8);
                    hybrid(&mut s.page, idx, width);
                    if stats && !idx.is_empty() {
                        let (lo, hi) = idx.iter().fold((u32::MAX, 0), |(lo, hi), &i| {
                            let r = rank[i as usize];
                            (lo.min(r), hi.max(r))
                        });
                        let by_rank = |r: u32| dict[order[r as usize] as usize].to_vec();
                        bounds = Some((by_rank(lo), by_rank(hi)));
                    }
                }
                Kind::Plain | Kind::PrefixDelta | Kind::LengthDelta => {
                    let texts: Vec<Texts<'_>> = page.iter().map(|p| Texts::of(p, c)).collect();
                    match kind {
                        Kind::Plain => {
                            for t in &texts {
                                t.for_each(|d, start, len| {
                                    s.page.extend_from_slice(&(len as u32).to_le_bytes());
                                    push_text(&mut s.page, d, start, len);
                                });
                            }
                        }
                        Kind::PrefixDelta => prefix_delta(&texts, s),
                        _ => {
                            s.ints.clear();
                            for t in &texts {
                                t.for_each(|_, _, len| s.ints.push(len as i64));
                            }
                            delta_pack(&mut s.page, &s.ints, true);
                            for t in &texts {
                                if t.nulls {
                                    t.for_each(|d, start, len| {
                                        push_text(&mut s.page, d, start, len)
                                    });
                                } else {
                                    // Values back to back already.
                                    let (o, d) = (t.offsets, t.data);
                                    s.page.extend_from_slice(
                                        &d[o[0] as usize..o[o.len() - 1] as usize],
                                    );
                                }
                            }
                        }
                    }
                    if stats {
                        let mut lo: Option<&[u8]> = None;
                        let mut hi: Option<&[u8]> = None;
                        for t in &texts {
                            t.for_each(|d, start, len| {
                                let v = &d[start..start + len];
                                if lo.is_none_or(|l| v < l) {
                                    lo = Some(v);
                                }
                                if hi.is_none_or(|h| v > h) {
                                    hi = Some(v);
                                }
                            });
                        }
                        bounds = lo.zip(hi).map(|(l, h)| (l.to_vec(), h.to_vec()));
                    }
                }
            }
            let spec = pages.write_page(CompressedPage::new(
                Page::DataPage {
                    buf: compress(&mut self.zstd, &s.page)?,
                    num_values: page_rows as u32,
                    encoding: data_encoding,
                    def_level_encoding: Encoding::RLE,
                    rep_level_encoding: Encoding::RLE,
                    statistics: None,
                },
                s.page.len(),
            ))?;
            uncompressed += spec.uncompressed_size as u64;
            data_offset.get_or_insert(spec.offset as i64);
            offsets.append_offset_and_size(spec.offset as i64, spec.compressed_size as i32);
            offsets.append_row_count(page_rows as i64);
            if let Some(ci) = col_index.as_mut() {
                let nulls = page_rows - valid;
                match bounds {
                    Some((lo, hi)) => {
                        ci.append(false, lo.clone(), hi.clone(), nulls as i64);
                        page_bounds.push((lo, hi));
                    }
                    None => ci.append(true, Vec::new(), Vec::new(), nulls as i64),
                }
            }
        }
        pages.close()?;
        let buf = Bytes::from(sink.into_inner()?);

        let mut encodings = vec![data_encoding];
        if nullable {
            encodings.push(Encoding::RLE);
        }
        if dict_offset.is_some() {
            encodings.push(Encoding::PLAIN);
        }
        let mut meta = ColumnChunkMetaData::builder(descr.clone())
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(self.level).unwrap_or_default(),
            ))
            .set_encodings_mask(EncodingMask::new_from_encodings(encodings.iter()))
            .set_num_values(rows as i64)
            .set_total_compressed_size(buf.len() as i64)
            .set_total_uncompressed_size(uncompressed as i64)
            .set_data_page_offset(data_offset.unwrap_or(0))
            .set_dictionary_page_offset(dict_offset);
        let mut column_index = None;
        if let Some(mut ci) = col_index {
            let nulls = rows as u64 - segs.iter().map(|p| valid_count(p, c) as u64).sum::<u64>();
            // The chunk's min/max: the least page min and greatest page max
            // (pages of nulls only have none).
            let int = kind == Kind::Int;
            let lo = page_bounds.iter().map(|b| bound_key(&b.0, int)).min();
            let hi = page_bounds.iter().map(|b| bound_key(&b.1, int)).max();
            let chunk_stats = lo.zip(hi).map(|((lo_i, lo), (hi_i, hi))| match kind {
                Kind::Int => Statistics::int64(Some(lo_i), Some(hi_i), None, Some(nulls), false),
                _ => Statistics::byte_array(
                    Some(ByteArray::from(lo.to_vec())),
                    Some(ByteArray::from(hi.to_vec())),
                    None,
                    Some(nulls),
                    false,
                ),
            });
            if let Some(st) = chunk_stats {
                meta = meta.set_statistics(st);
            }
            ci.set_boundary_order(boundary_order(&page_bounds, int));
            column_index = Some(ci.build()?);
        }
        let close = ColumnCloseResult {
            bytes_written: buf.len() as u64,
            rows_written: rows as u64,
            metadata: meta.build()?,
            bloom_filter: None,
            column_index,
            offset_index: Some(offsets.build()),
        };
        Ok((buf, close))
    }
}

fn compress(z: &mut zstd::bulk::Compressor<'static>, data: &[u8]) -> Result<Bytes> {
    Ok(Bytes::from(z.compress(data).map_err(ParquetError::from)?))
}

/// Non-null values of rows `p` in column `c`.
fn valid_count(p: &Seg, c: usize) -> usize {
    match p.batch.column(c).nulls() {
        Some(n) if n.null_count() > 0 => p.len - n.slice(p.start, p.len).null_count(),
        _ => p.len,
    }
}

/// Interns the texts of column `c` over `segs` into `dict`, each non-null
/// value's index into `idx`; false when the dictionary grows past its limits.
///
/// Short texts (tenants and event types nearly always are) go through a
/// small direct-mapped cache keyed by [`ShortKey`]: a hit is two word loads
/// and a compare, no hash of the bytes and no `memcmp` call.
fn intern<'a>(segs: &'a [Seg], c: usize, dict: &mut Vec<&'a [u8]>, idx: &mut Vec<u32>) -> bool {
    let mut map: hashbrown::HashMap<&'a [u8], u32> = hashbrown::HashMap::new();
    let mut bytes = 0usize;
    let mut cache = [(ShortKey::NONE, 0u32); 64];
    let mut lookup = |v: &'a [u8]| -> Option<u32> {
        if let Some(&k) = map.get(v) {
            return Some(k);
        }
        let k = dict.len() as u32;
        bytes += v.len() + 4;
        if dict.len() >= DICT_MAX_VALUES || bytes > DICT_MAX_BYTES {
            return None;
        }
        dict.push(v);
        map.insert(v, k);
        Some(k)
    };
    for p in segs {
        let a = p.batch.column(c).as_string::<i32>();
        let (offsets, data) = (a.value_offsets(), a.value_data());
        let nulls = a.nulls().filter(|n| n.null_count() > 0);
        for i in p.start..p.start + p.len {
            if nulls.is_some_and(|n| n.is_null(i)) {
                continue;
            }
            let v = &data[offsets[i] as usize..offsets[i + 1] as usize];
            let k = match ShortKey::of(v) {
                Some(key) => {
                    let slot = &mut cache[key.slot()];
                    if slot.0 == key {
                        Some(slot.1)
                    } else {
                        let k = lookup(v);
                        if let Some(k) = k {
                            *slot = (key, k);
                        }
                        k
                    }
                }
                None => lookup(v),
            };
            match k {
                Some(k) => idx.push(k),
                None => {
                    dict.clear();
                    idx.clear();
                    return false;
                }
            }
        }
    }
    true
}

/// A text of at most 16 bytes, held exactly in two words: its first and
/// last 8 bytes (4 and 4 below 8 bytes, single bytes below 4), overlapping
/// when shorter than 16, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShortKey {
    head: u64,
    tail: u64,
    len: u32,
}

impl ShortKey {
    /// No text has this key (lengths stop at 16).
    const NONE: ShortKey = ShortKey {
        head: 0,
        tail: 0,
        len: u32::MAX,
    };

    #[inline(always)]
    pub(crate) fn of(v: &[u8]) -> Option<ShortKey> {
        let n = v.len();
        let word = |at: usize, w: usize| -> u64 {
            let mut b = [0u8; 8];
            b[..w].copy_from_slice(&v[at..at + w]);
            u64::from_le_bytes(b)
        };
        let (head, tail) = match n {
            0 => (0, 0),
            1..=3 => (
                u64::from(v[0]) | u64::from(v[n / 2]) << 8,
                u64::from(v[n - 1]),
            ),
            4..=7 => (word(0, 4), word(n - 4, 4)),
            8..=16 => (word(0, 8), word(n - 8, 8)),
            _ => return None,
        };
        Some(ShortKey {
            head,
            tail,
            len: n as u32,
        })
    }

    /// A slot of a 64-entry cache.
    #[inline(always)]
    fn slot(&self) -> usize {
        let h = (self.head ^ self.tail.rotate_left(29) ^ u64::from(self.len))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 58) as usize
    }
}

/// `a == b` for texts, without a `memcmp` call when they are short (a
/// tenant compared with the one of the event before).
#[inline(always)]
pub(crate) fn same_text(a: &[u8], b: &[u8]) -> bool {
    match (ShortKey::of(a), ShortKey::of(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Pages of one column: runs of rows no longer than [`PAGE_ROWS`], whose
/// texts hold at most [`PAGE_BYTES`] (at least one row).
#[derive(Default)]
struct Cursor {
    seg: usize,
    pos: usize,
}

impl Cursor {
    fn next_page(&mut self, segs: &[Seg], c: usize, kind: Kind) -> Option<Vec<Seg>> {
        let mut out = Vec::new();
        let (mut rows, mut bytes) = (0usize, 0usize);
        while self.seg < segs.len() && rows < PAGE_ROWS && bytes < PAGE_BYTES {
            let p = &segs[self.seg];
            let start = p.start + self.pos;
            let left = p.len - self.pos;
            let mut take = left.min(PAGE_ROWS - rows);
            if kind.is_text() {
                let a = p.batch.column(c).as_string::<i32>();
                let o = &a.value_offsets()[start..=start + take];
                let budget = (PAGE_BYTES - bytes) as i64;
                // Rows whose bytes fit the budget (offsets are sorted).
                let fit = o
                    .partition_point(|&x| (x - o[0]) as i64 <= budget)
                    .saturating_sub(1);
                take = fit.max(usize::from(rows == 0)).min(take);
                if take == 0 {
                    break;
                }
                bytes += (o[take] - o[0]) as usize;
            }
            out.push(Seg {
                batch: p.batch.clone(),
                start,
                len: take,
            });
            rows += take;
            self.pos += take;
            if self.pos == p.len {
                self.seg += 1;
                self.pos = 0;
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// Definition levels of a page (v1: their byte length, then the
/// RLE/bit-packed hybrid at bit width 1).
fn def_levels(page: &[Seg], c: usize, valid: usize, out: &mut Vec<u8>, bits: &mut Vec<u8>) {
    let rows: usize = page.iter().map(|p| p.len).sum();
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    if valid == rows {
        put_uleb(out, (rows as u64) << 1);
        out.push(1);
    } else {
        // One bit-packed run: 8 levels a byte, least significant bit first.
        bits.clear();
        bits.resize(rows.div_ceil(8), 0);
        let mut r = 0;
        for p in page {
            let a = p.batch.column(c);
            for i in p.start..p.start + p.len {
                if a.is_valid(i) {
                    bits[r / 8] |= 1 << (r % 8);
                }
                r += 1;
            }
        }
        put_uleb(out, ((bits.len() as u64) << 1) | 1);
        out.extend_from_slice(bits);
    }
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Dictionary indices as the RLE/bit-packed hybrid at `width` bits: one RLE
/// run when they are all equal, else one bit-packed run.
fn hybrid(out: &mut Vec<u8>, idx: &[u32], width: u32) {
    let Some(&first) = idx.first() else {
        return;
    };
    if idx.iter().all(|&i| i == first) {
        put_uleb(out, (idx.len() as u64) << 1);
        out.extend_from_slice(&first.to_le_bytes()[..width.div_ceil(8) as usize]);
        return;
    }
    let groups = idx.len().div_ceil(8);
    put_uleb(out, ((groups as u64) << 1) | 1);
    let pad = groups * 8 - idx.len();
    pack(
        out,
        idx.iter()
            .map(|&i| i as u64)
            .chain(std::iter::repeat_n(0, pad)),
        width,
    );
}

/// Packs `vals` at `width` bits each, least significant bit first. Their
/// bits fill whole bytes: 8 values (a hybrid run's group) or 32 (a
/// miniblock).
#[inline]
fn pack(out: &mut Vec<u8>, vals: impl Iterator<Item = u64>, width: u32) {
    if width == 0 {
        return;
    }
    let mut acc = 0u64;
    let mut n = 0u32;
    for v in vals {
        acc |= v << n;
        n += width;
        if n >= 64 {
            out.extend_from_slice(&acc.to_le_bytes());
            n -= 64;
            // The bits of `v` that did not fit.
            acc = if n == 0 { 0 } else { v >> (width - n) };
        }
    }
    out.extend_from_slice(&acc.to_le_bytes()[..(n / 8) as usize]);
}

/// Bits needed for `v`.
fn bit_width(v: u64) -> u32 {
    64 - v.leading_zeros()
}

fn put_uleb(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

const BLOCK: usize = 128;
const MINIBLOCKS: usize = 4;
const MINI: usize = BLOCK / MINIBLOCKS;

/// `vals` as `DELTA_BINARY_PACKED` (blocks of 128 values, 4 miniblocks).
/// `int32`: the values are INT32 (lengths), so deltas wrap at 32 bits as
/// readers compute them.
pub(crate) fn delta_pack(out: &mut Vec<u8>, vals: &[i64], int32: bool) {
    put_uleb(out, BLOCK as u64);
    put_uleb(out, MINIBLOCKS as u64);
    put_uleb(out, vals.len() as u64);
    let Some((&first, rest)) = vals.split_first() else {
        put_uleb(out, 0);
        return;
    };
    put_uleb(out, zigzag(first));
    let mut deltas = [0i64; BLOCK];
    let mut packed = [0u64; BLOCK];
    let mut prev = first;
    for block in rest.chunks(BLOCK) {
        let mut min = i64::MAX;
        for (d, &v) in deltas.iter_mut().zip(block) {
            *d = if int32 {
                (v as i32).wrapping_sub(prev as i32) as i64
            } else {
                v.wrapping_sub(prev)
            };
            min = min.min(*d);
            prev = v;
        }
        put_uleb(out, zigzag(min));
        let n = block.len();
        for (p, &d) in packed.iter_mut().zip(&deltas[..n]) {
            *p = if int32 {
                (d as i32).wrapping_sub(min as i32) as u32 as u64
            } else {
                d.wrapping_sub(min) as u64
            };
        }
        packed[n..].fill(0);
        let used = n.div_ceil(MINI);
        let mut widths = [0u8; MINIBLOCKS];
        for (w, mini) in widths.iter_mut().zip(packed.chunks_exact(MINI)).take(used) {
            *w = bit_width(mini.iter().fold(0, |a, &v| a | v)) as u8;
        }
        out.extend_from_slice(&widths);
        for (&w, mini) in widths.iter().zip(packed.chunks_exact(MINI)).take(used) {
            pack(out, mini.iter().copied(), w as u32);
        }
    }
}

/// The texts of one page segment: its offsets (one more than rows) and
/// value bytes, and whether any row is null.
struct Texts<'a> {
    array: &'a StringArray,
    offsets: &'a [i32],
    data: &'a [u8],
    start: usize,
    nulls: bool,
    /// Non-null values.
    valid: usize,
}

impl<'a> Texts<'a> {
    fn of(p: &'a Seg, c: usize) -> Texts<'a> {
        let array = p.batch.column(c).as_string::<i32>();
        Texts {
            array,
            offsets: &array.value_offsets()[p.start..=p.start + p.len],
            data: array.value_data(),
            start: p.start,
            nulls: array.null_count() > 0,
            valid: valid_count(p, c),
        }
    }

    /// Calls `f(data, start, len)` for each non-null value in row order.
    #[inline(always)]
    fn for_each(&self, mut f: impl FnMut(&'a [u8], usize, usize)) {
        let d = self.data;
        for (i, w) in self.offsets.windows(2).enumerate() {
            if self.nulls && self.array.is_null(self.start + i) {
                continue;
            }
            f(d, w[0] as usize, (w[1] - w[0]) as usize);
        }
    }
}

/// Appends `data[start..start + len]`. Short texts (ids, a few bytes of
/// suffix) are copied as a fixed 16 bytes and cut back, which compiles to
/// two moves instead of a call to `memcpy`.
#[inline(always)]
pub(crate) fn push_text(out: &mut Vec<u8>, data: &[u8], start: usize, len: usize) {
    if len <= 16 && start + 16 <= data.len() {
        let at = out.len();
        out.extend_from_slice(&data[start..start + 16]);
        out.truncate(at + len);
    } else {
        out.extend_from_slice(&data[start..start + len]);
    }
}

/// Texts as `DELTA_BYTE_ARRAY` into `s.page`: the length each shares with
/// the text before (the first with none), then the rest as
/// `DELTA_LENGTH_BYTE_ARRAY`.
fn prefix_delta(texts: &[Texts<'_>], s: &mut Scratch) {
    s.ints.clear();
    s.ints2.clear();
    s.suffixes.clear();
    // The text before: its buffer, start and length.
    let mut prev: (&[u8], usize, usize) = (&[], 0, 0);
    for t in texts {
        t.for_each(|d, start, len| {
            let p = common_prefix(prev.0, prev.1, d, start, len.min(prev.2));
            s.ints.push(p as i64);
            s.ints2.push((len - p) as i64);
            s.suffixes.push((start + p, len - p));
            prev = (d, start, len);
        });
    }
    delta_pack(&mut s.page, &s.ints, true);
    delta_pack(&mut s.page, &s.ints2, true);
    let mut k = 0;
    for t in texts {
        for &(start, len) in &s.suffixes[k..k + t.valid] {
            push_text(&mut s.page, t.data, start, len);
        }
        k += t.valid;
    }
}

/// Length of the common prefix of `a[ai..ai + n]` and `b[bi..bi + n]`,
/// compared 8 bytes at a time: reading on past `n` inside the buffers
/// where they allow, so short texts (ids) take one or two compares.
fn common_prefix(a: &[u8], ai: usize, b: &[u8], bi: usize, n: usize) -> usize {
    let mut i = 0;
    while i < n {
        let (x, y) = (ai + i, bi + i);
        let (Some(p), Some(q)) = (a.get(x..x + 8), b.get(y..y + 8)) else {
            while i < n && a[ai + i] == b[bi + i] {
                i += 1;
            }
            return i;
        };
        let d = u64::from_le_bytes(p.try_into().unwrap_or_default())
            ^ u64::from_le_bytes(q.try_into().unwrap_or_default());
        if d != 0 {
            return (i + (d.trailing_zeros() / 8) as usize).min(n);
        }
        i += 8;
    }
    n
}

/// A page bound as it orders: little-endian i64 (`int`) or bytes.
fn bound_key(b: &[u8], int: bool) -> (i64, &[u8]) {
    if int {
        (i64::from_le_bytes(b.try_into().unwrap_or_default()), &[])
    } else {
        (0, b)
    }
}

/// The column index's boundary order: pages ascending (or descending) by
/// both min and max, else unordered. `int`: bounds are little-endian i64.
fn boundary_order(bounds: &[(Vec<u8>, Vec<u8>)], int: bool) -> BoundaryOrder {
    let keys: Vec<_> = bounds
        .iter()
        .map(|(lo, hi)| (bound_key(lo, int), bound_key(hi, int)))
        .collect();
    if keys
        .windows(2)
        .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
    {
        BoundaryOrder::ASCENDING
    } else if keys
        .windows(2)
        .all(|w| w[0].0 >= w[1].0 && w[0].1 >= w[1].1)
    {
        BoundaryOrder::DESCENDING
    } else {
        BoundaryOrder::UNORDERED
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
    use arrow::compute::concat_batches;
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    use parquet::file::metadata::PageIndexPolicy;
    use parquet::file::page_index::column_index::ColumnIndexMetaData;
    use proptest::prelude::*;

    use super::*;

    /// Rows as the hot store builds them; `None` texts are nulls.
    #[derive(Debug, Clone)]
    struct Row {
        event_id: String,
        tenant: String,
        event_type: String,
        user_id: Option<String>,
        session_id: Option<String>,
        ts: i64,
        props: String,
        received_at: i64,
        schema_version: Option<i32>,
    }

    fn to_batch(rows: &[Row]) -> RecordBatch {
        let ts = |f: &dyn Fn(&Row) -> i64| -> ArrayRef {
            Arc::new(
                TimestampMillisecondArray::from(rows.iter().map(f).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            )
        };
        let text = |f: &dyn Fn(&Row) -> Option<&str>| -> ArrayRef {
            Arc::new(rows.iter().map(f).collect::<StringArray>())
        };
        RecordBatch::try_new(
            events_schema(),
            vec![
                text(&|r| Some(&r.event_id)),
                text(&|r| Some(&r.tenant)),
                text(&|r| Some(&r.event_type)),
                text(&|r| r.user_id.as_deref()),
                text(&|r| r.session_id.as_deref()),
                ts(&|r| r.ts),
                text(&|r| Some(&r.props)),
                ts(&|r| r.received_at),
                Arc::new(
                    rows.iter()
                        .map(|r| r.schema_version)
                        .collect::<arrow::array::Int32Array>(),
                ),
            ],
        )
        .unwrap()
    }

    /// Writes `batches` (each sliced at `cut`) with [`FileEncoder`], reads
    /// the file back with parquet-rs's Arrow reader and checks the rows,
    /// the statistics and the page index against the input.
    fn roundtrip(batches: &[RecordBatch], row_group_rows: usize, cut: usize) {
        let props = WriterProperties::builder().build();
        let mut w = FileEncoder::new(props, 1, row_group_rows).unwrap();
        for b in batches {
            let mut at = 0;
            while at < b.num_rows() {
                let n = cut.max(1).min(b.num_rows() - at);
                w.write(&b.slice(at, n)).unwrap();
                at += n;
            }
        }
        let file = Bytes::from(w.finish().unwrap());
        let want = concat_batches(&events_schema(), batches).unwrap();

        let opts = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let reader =
            ParquetRecordBatchReaderBuilder::try_new_with_options(file.clone(), opts).unwrap();
        let meta = reader.metadata().clone();
        let got: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let got = concat_batches(&events_schema(), &got).unwrap();
        assert_eq!(got, want, "rows read back");
        assert_eq!(meta.file_metadata().num_rows() as usize, want.num_rows());

        // Row group by row group: statistics and page index bracket the
        // values they describe.
        let mut first = 0usize;
        for (g, rg) in meta.row_groups().iter().enumerate() {
            let n = rg.num_rows() as usize;
            assert!(n <= row_group_rows);
            let rows = want.slice(first, n);
            for (c, &stats) in STATS.iter().enumerate() {
                let col = rg.column(c);
                let locs = &meta.offset_index().unwrap()[g][c].page_locations;
                assert_eq!(locs[0].first_row_index, 0);
                let index = &meta.column_index().unwrap()[g][c];
                if !stats {
                    assert!(col.statistics().is_none(), "column {c}");
                    assert!(matches!(index, ColumnIndexMetaData::NONE), "column {c}");
                    continue;
                }
                let st = col.statistics().expect("statistics");
                assert_eq!(st.null_count_opt(), Some(0));
                for (p, loc) in locs.iter().enumerate() {
                    let end = locs.get(p + 1).map_or(n, |l| l.first_row_index as usize);
                    let page = rows.slice(
                        loc.first_row_index as usize,
                        end - loc.first_row_index as usize,
                    );
                    match index {
                        ColumnIndexMetaData::INT64(ix) => {
                            let v = page.column(c).as_primitive::<TimestampMillisecondType>();
                            let lo = v.values().iter().min().copied();
                            let hi = v.values().iter().max().copied();
                            assert_eq!(ix.min_value(p).copied(), lo, "page {p} min, column {c}");
                            assert_eq!(ix.max_value(p).copied(), hi, "page {p} max, column {c}");
                        }
                        ColumnIndexMetaData::BYTE_ARRAY(ix) => {
                            let v = page.column(c).as_string::<i32>();
                            let lo = v.iter().flatten().min().map(str::as_bytes);
                            let hi = v.iter().flatten().max().map(str::as_bytes);
                            assert_eq!(ix.min_value(p), lo, "page {p} min, column {c}");
                            assert_eq!(ix.max_value(p), hi, "page {p} max, column {c}");
                        }
                        other => panic!("column {c}: unexpected index {other:?}"),
                    }
                }
                match st {
                    Statistics::Int64(s) => {
                        let v = rows.column(c).as_primitive::<TimestampMillisecondType>();
                        assert_eq!(s.min_opt(), v.values().iter().min());
                        assert_eq!(s.max_opt(), v.values().iter().max());
                    }
                    Statistics::ByteArray(s) => {
                        let v = rows.column(c).as_string::<i32>();
                        let lo = v.iter().flatten().min().unwrap();
                        let hi = v.iter().flatten().max().unwrap();
                        assert_eq!(s.min_opt().map(|b| b.data()), Some(lo.as_bytes()));
                        assert_eq!(s.max_opt().map(|b| b.data()), Some(hi.as_bytes()));
                    }
                    other => panic!("column {c}: unexpected statistics {other:?}"),
                }
            }
            first += n;
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-c]{0,3}",
            "ev-10[0-9]{2}-[0-9]{1,4}",
            "[\\PC]{0,20}",
            "é€😀\"\\\\\n{0,2}",
        ]
    }

    fn row() -> impl Strategy<Value = Row> {
        (
            (text(), "t[0-2]", "(click|view|buy|[a-z]{1,12})"),
            (proptest::option::of(text()), proptest::option::of(text())),
            (
                prop_oneof![any::<i64>(), 1_700_000_000_000i64..1_700_000_100_000],
                text(),
                0i64..3,
            ),
            proptest::option::of(prop_oneof![1i32..4, any::<i32>()]),
        )
            .prop_map(
                |(
                    (event_id, tenant, event_type),
                    (user_id, session_id),
                    (ts, props, r),
                    schema_version,
                )| Row {
                    event_id,
                    tenant,
                    event_type,
                    user_id,
                    session_id,
                    received_at: ts.wrapping_add(r),
                    ts,
                    props,
                    schema_version,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any rows (nulls, empty and multi-byte texts, extreme times whose
        /// deltas wrap, several tenants), cut into any row groups and
        /// batch slices, read back as they were written.
        #[test]
        fn rows_read_back_as_written(
            batches in proptest::collection::vec(proptest::collection::vec(row(), 0..300), 1..4),
            row_group_rows in 1usize..700,
            cut in 1usize..400,
        ) {
            let batches: Vec<RecordBatch> = batches.iter().map(|r| to_batch(r)).collect();
            roundtrip(&batches, row_group_rows, cut);
        }

        /// The 8-bytes-at-a-time prefix is the longest common prefix, also
        /// where the texts sit at the end of their buffers.
        #[test]
        fn common_prefix_is_the_longest(
            a in proptest::collection::vec(0u8..3, 0..40),
            b in proptest::collection::vec(0u8..3, 0..40),
            ai in 0usize..40,
            bi in 0usize..40,
            n in 0usize..40,
        ) {
            let (ai, bi) = (ai.min(a.len()), bi.min(b.len()));
            let n = n.min(a.len() - ai).min(b.len() - bi);
            let want = a[ai..ai + n].iter().zip(&b[bi..bi + n]).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(common_prefix(&a, ai, &b, bi, n), want);
        }

        /// Texts of up to 16 bytes are told apart by their [`ShortKey`]
        /// exactly (over a small alphabet, so near misses are common), and
        /// the dictionary built through the key cache is the one a plain
        /// map builds.
        #[test]
        fn short_keys_tell_texts_apart(
            texts in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..20), 1..60),
        ) {
            for a in &texts {
                for b in &texts {
                    prop_assert_eq!(same_text(a, b), a == b);
                    if let (Some(x), Some(y)) = (ShortKey::of(a), ShortKey::of(b)) {
                        prop_assert_eq!(x == y, a == b);
                    }
                }
            }
            let strs: Vec<String> = texts
                .iter()
                .map(|t| t.iter().map(|&c| char::from(b'a' + c)).collect())
                .collect();
            let array = StringArray::from(strs.clone());
            let batch = RecordBatch::try_from_iter([("t", Arc::new(array) as ArrayRef)]).unwrap();
            let segs = [Seg { batch, start: 0, len: strs.len() }];
            let (mut dict, mut idx) = (Vec::new(), Vec::new());
            prop_assert!(intern(&segs, 0, &mut dict, &mut idx));
            let mut want: Vec<&str> = Vec::new();
            for (i, s) in strs.iter().enumerate() {
                let k = want.iter().position(|w| w == s).unwrap_or_else(|| {
                    want.push(s);
                    want.len() - 1
                });
                prop_assert_eq!(idx[i] as usize, k);
            }
            let got: Vec<&[u8]> = want.iter().map(|w| w.as_bytes()).collect();
            prop_assert_eq!(dict, got);
        }
    }

    /// Pages cut by rows and by bytes, a dictionary that falls back to
    /// PLAIN, a column of nulls only, sorted times (ascending page index).
    #[test]
    fn large_row_groups_cut_pages_and_fall_back_from_the_dictionary() {
        let n = DICT_MAX_VALUES + PAGE_ROWS + 17;
        let mut rows: Vec<Row> = (0..n)
            .map(|i| Row {
                event_id: format!("ev-{i:08}"),
                tenant: "acme".into(),
                event_type: format!("type-{i}"),
                user_id: None,
                session_id: (i % 3 == 0).then(|| format!("s_{}", i / 7)),
                ts: 1_700_000_000_000 + i as i64 * 10,
                props: format!("{{\"n\":{i}}}"),
                received_at: 1_700_000_000_000,
                schema_version: (i % 5 != 0).then_some(1 + (i / 4000) as i32),
            })
            .collect();
        // Three texts past a page's byte limit.
        for r in rows.iter_mut().skip(100).step_by(1000).take(3) {
            r.props = "x".repeat(PAGE_BYTES + 3);
        }
        let b = to_batch(&rows);
        roundtrip(std::slice::from_ref(&b), n, n);
        roundtrip(&[b.slice(0, 5000), b.slice(5000, n - 5000)], 9000, 777);

        let file = {
            let mut w = FileEncoder::new(WriterProperties::builder().build(), 1, n).unwrap();
            w.write(&b).unwrap();
            Bytes::from(w.finish().unwrap())
        };
        let opts = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let meta = ParquetRecordBatchReaderBuilder::try_new_with_options(file, opts)
            .unwrap()
            .metadata()
            .clone();
        let rg = meta.row_group(0);
        let pages = |c: usize| meta.offset_index().unwrap()[0][c].page_locations.len();
        assert!(pages(5) >= n.div_ceil(PAGE_ROWS), "ts pages by rows");
        assert!(pages(6) > pages(5), "properties pages also cut by bytes");
        assert!(
            rg.column(2).dictionary_page_offset().is_none(),
            "event_type fell back"
        );
        assert!(
            rg.column(1).dictionary_page_offset().is_some(),
            "tenant has a dictionary"
        );
        assert!(matches!(
            &meta.column_index().unwrap()[0][5],
            ColumnIndexMetaData::INT64(_)
        ));
    }

    #[test]
    fn boundary_order_follows_page_bounds() {
        let i = |lo: i64, hi: i64| (lo.to_le_bytes().to_vec(), hi.to_le_bytes().to_vec());
        let t = |lo: &str, hi: &str| (lo.as_bytes().to_vec(), hi.as_bytes().to_vec());
        assert_eq!(
            boundary_order(&[i(-5, 1), i(1, 1), i(2, 9)], true),
            BoundaryOrder::ASCENDING
        );
        assert_eq!(
            boundary_order(&[i(2, 9), i(-5, 1)], true),
            BoundaryOrder::DESCENDING
        );
        assert_eq!(
            boundary_order(&[i(0, 9), i(1, 5)], true),
            BoundaryOrder::UNORDERED
        );
        // Signed, not byte order: -1 is below 0.
        assert_eq!(
            boundary_order(&[i(-1, -1), i(0, 0)], true),
            BoundaryOrder::ASCENDING
        );
        assert_eq!(
            boundary_order(&[t("a", "b"), t("b", "c")], false),
            BoundaryOrder::ASCENDING
        );
        assert_eq!(
            boundary_order(&[t("b", "b"), t("a", "c")], false),
            BoundaryOrder::UNORDERED
        );
    }

    #[test]
    fn delta_packing_matches_what_readers_expect() {
        // Values a reader decodes through parquet-rs's own decoder (via a
        // file): wraps at 64 and 32 bits, zero widths, partial blocks.
        let cases: Vec<Vec<i64>> = vec![
            vec![],
            vec![5],
            vec![i64::MIN, i64::MAX, 0, -1, i64::MIN],
            (0..129).collect(),
            (0..1000).map(|i| (i * 7919) % 1013 - 500).collect(),
            vec![3; 300],
        ];
        for vals in cases {
            let rows: Vec<Row> = vals
                .iter()
                .map(|&t| Row {
                    event_id: String::new(),
                    tenant: String::new(),
                    event_type: String::new(),
                    user_id: None,
                    session_id: None,
                    ts: t,
                    props: "p".repeat((t.unsigned_abs() % 40) as usize),
                    received_at: t,
                    schema_version: Some(t as i32),
                })
                .collect();
            roundtrip(&[to_batch(&rows)], 1 << 20, 1 << 20);
        }
    }
}
