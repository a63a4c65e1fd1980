use std::fs::File;
use std::sync::atomic::Ordering::SeqCst;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMillisecondType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_types::BatchWriter;
use tally_types::codec::PropValue;

use super::*;

const T0: Millis = 1_793_534_400_000; // 2026-11-01T12:00:00Z

fn batch(events: &[(&str, &str, Millis)]) -> Vec<u8> {
    let mut w = BatchWriter::new();
    for (tenant, id, ts) in events {
        let at = w.begin_event(tenant, id, "click", *ts, Some("u1"), None);
        w.prop("n", PropValue::Int(7));
        w.finish_event(at, 1);
    }
    w.finish()
}

fn open(dir: &std::path::Path) -> (RawWriter, Arc<RawShared>) {
    let archive = Archive::open(&ArchiveTarget::Local(dir.join("archive"))).unwrap();
    RawWriter::open(
        archive,
        RawConfig::new(dir.join("raw/manifest"), 2),
        (0, &[0, 0]),
    )
    .unwrap()
}

/// A one-partition raw store in `dir` with compaction settings, and its
/// archive and config (to reopen it).
fn open_compacting(
    dir: &std::path::Path,
    files: usize,
    grace_ms: u64,
) -> (RawWriter, Arc<RawShared>, Archive, RawConfig) {
    let archive = Archive::open(&ArchiveTarget::Local(dir.join("archive"))).unwrap();
    let mut cfg = RawConfig::new(dir.join("raw/manifest"), 1);
    cfg.compact_files = files;
    cfg.compact_grace_ms = grace_ms;
    let (w, shared) = RawWriter::open(archive.clone(), cfg.clone(), (0, &[0])).unwrap();
    (w, shared, archive, cfg)
}

/// A deterministic pseudo-random sequence (a 64-bit LCG's high bits).
fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    }
}

/// The Parquet files under `root`, at any depth.
fn parquet_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out
}

/// Every row of the local archive, read with the parquet crate directly:
/// (path, event_id, ts).
fn read_archive(root: &std::path::Path) -> Vec<(String, String, Millis)> {
    let mut out = Vec::new();
    for p in parquet_files(root) {
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b: RecordBatch = b.unwrap();
            let ids = b.column(0).as_string::<i32>();
            let ts = b.column(5).as_primitive::<TimestampMillisecondType>();
            for i in 0..b.num_rows() {
                out.push((rel.clone(), ids.value(i).to_string(), ts.value(i)));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn drops_are_skipped_and_seals_are_hive_partitioned_and_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    let h = 3_600_000;
    let p1 = batch(&[
        ("a", "e1", T0 + 5),
        ("a", "dup", T0 + 1),
        ("b", "e2", T0 + h + 3),
        ("a", "e3", T0 + 2),
    ]);
    w.append(0, 100, 0, T0, &p1, &[(1, 1)]).unwrap();
    let p2 = batch(&[("a", "e4", T0 + h - 1), ("a", "e5", T0)]);
    w.append(1, 50, 1, T0, &p2, &[]).unwrap();
    w.flush().unwrap();
    assert_eq!(shared.hot.read().rows, 5);
    let snap = shared.snapshot("a", Millis::MIN, Millis::MAX);
    assert_eq!(snap.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 4);
    assert!(snap.files.is_empty());

    let r = w.seal_now().unwrap();
    assert_eq!(r.rows, 5);
    assert_eq!(r.next_lsn, 2);
    assert_eq!(shared.hot.read().rows, 0);
    assert_eq!(shared.sealed_lsn.load(Relaxed), 2);
    let rows = read_archive(&dir.path().join("archive"));
    let a_dir = "tenant=a/date=2026-11-01/hour=12/";
    let b_dir = "tenant=b/date=2026-11-01/hour=13/";
    let mut got: Vec<(bool, &str, Millis)> = rows
        .iter()
        .map(|(p, id, ts)| (p.starts_with(a_dir), id.as_str(), *ts))
        .collect();
    got.sort_by_key(|r| r.1);
    assert_eq!(
        got,
        vec![
            (true, "e1", T0 + 5),
            (false, "e2", T0 + h + 3),
            (true, "e3", T0 + 2),
            (true, "e4", T0 + h - 1),
            (true, "e5", T0),
        ]
    );
    assert!(rows.iter().any(|(p, _, _)| p.starts_with(b_dir)));
    // Sorted by time inside the file.
    let in_a: Vec<Millis> = {
        let f = shared.files.read();
        let path = &f.iter().find(|f| &*f.tenant == "a").unwrap().path;
        let r = ParquetRecordBatchReaderBuilder::try_new(
            File::open(dir.path().join("archive").join(path)).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        r.flat_map(|b| {
            let b = b.unwrap();
            let ts = b
                .column(5)
                .as_primitive::<TimestampMillisecondType>()
                .clone();
            ts.values().to_vec()
        })
        .collect()
    };
    assert_eq!(in_a, vec![T0, T0 + 2, T0 + 5, T0 + h - 1]);
    let snap = shared.snapshot("a", T0, T0 + 1);
    assert_eq!(snap.files.len(), 1);
    assert!(shared.snapshot("a", T0 + h, T0 + 2 * h).files.is_empty());
    w.close().unwrap();

    // Reopen: the manifest names the files and the position; an orphan
    // (a file no entry names, as after a crash mid-seal) is deleted.
    let orphan = dir
        .path()
        .join("archive/tenant=a/date=2026-11-01/hour=12/part-x.parquet");
    std::fs::write(&orphan, b"junk").unwrap();
    let (w, shared) = open(dir.path());
    assert!(!orphan.exists());
    assert_eq!(w.offsets(), &[100, 50]);
    assert!(!w.wants(0, 99));
    assert!(w.wants(0, 100));
    assert_eq!(shared.files.read().len(), 2);
    assert_eq!(shared.sealed_lsn.load(Relaxed), 2);
    assert_eq!(read_archive(&dir.path().join("archive")).len(), 5);
}

#[test]
fn correction_records_add_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    let mut bw = BatchWriter::new();
    let at = bw.begin_event("a", "late1", "click", T0, None, None);
    bw.finish_event(at, 0);
    w.append(0, 10, 0, T0, &bw.finish_correction(), &[])
        .unwrap();
    w.flush().unwrap();
    assert_eq!(shared.hot.read().rows, 0);
    assert_eq!(w.offsets(), &[10, 0]);
}

/// What readers may rely on: `published_lsn` moves only when rows are
/// visible, past records that kept nothing (all duplicates, corrections)
/// and past records that cannot be read at all.
#[test]
fn published_lsn_follows_what_queries_see() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    assert_eq!(shared.published_lsn.load(SeqCst), 0);
    assert_eq!(w.publish_wait(), None);
    w.append(0, 10, 0, T0, &batch(&[("a", "e1", T0)]), &[])
        .unwrap();
    // Appended, not visible yet: a reader waiting for lsn 1 must wait.
    assert_eq!(shared.published_lsn.load(SeqCst), 0);
    assert!(w.publish_wait().is_some_and(|d| d <= PUBLISH_INTERVAL));
    w.flush().unwrap();
    assert_eq!(shared.published_lsn.load(SeqCst), 1);
    assert_eq!(shared.hot.read().rows, 1);
    assert_eq!(w.publish_wait(), None);
    // Every event dropped as a duplicate: nothing to show, the lsn moves.
    w.append(1, 20, 1, T0, &batch(&[("a", "e1", T0)]), &[(0, 1)])
        .unwrap();
    assert!(w.publish_wait().is_some());
    w.flush().unwrap();
    assert_eq!(shared.published_lsn.load(SeqCst), 2);
    // An unreadable record is an error, and still passed over.
    assert!(w.append(0, 30, 2, T0, &[1, 2], &[]).is_err());
    assert_eq!(w.offsets(), &[30, 20]);
    w.flush().unwrap();
    assert_eq!(shared.published_lsn.load(SeqCst), 3);
    assert_eq!(shared.hot.read().rows, 1);
}

#[test]
fn manifest_survives_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _) = open(dir.path());
    w.append(0, 10, 0, T0, &batch(&[("a", "x", T0)]), &[])
        .unwrap();
    w.seal_now().unwrap();
    w.append(0, 20, 1, T0, &batch(&[("a", "y", T0 + 1)]), &[])
        .unwrap();
    w.close().unwrap();
    let m = dir.path().join("raw/manifest");
    let len = std::fs::metadata(&m).unwrap().len();
    // Tear the last entry: the second seal is forgotten, its file is an
    // orphan and goes; the log position is the first seal's.
    let f = std::fs::OpenOptions::new().write(true).open(&m).unwrap();
    f.set_len(len - 3).unwrap();
    let (w, shared) = open(dir.path());
    assert_eq!(w.offsets(), &[10, 0]);
    assert_eq!(shared.files.read().len(), 1);
    let rows = read_archive(&dir.path().join("archive"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "x");
}

#[test]
fn a_new_archive_starts_at_its_genesis_and_leaves_foreign_files_alone() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir
        .path()
        .join("archive/tenant=a/date=2026-11-01/hour=12/old.parquet");
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    std::fs::write(&foreign, b"not ours").unwrap();
    let archive = Archive::open(&ArchiveTarget::Local(dir.path().join("archive"))).unwrap();
    let cfg = RawConfig::new(dir.path().join("raw/manifest"), 2);
    let (w, shared) = RawWriter::open(archive.clone(), cfg.clone(), (7, &[300, 400])).unwrap();
    assert_eq!(w.offsets(), &[300, 400]);
    assert_eq!(shared.sealed_lsn.load(Relaxed), 7);
    assert!(foreign.exists());
    drop(w);
    // The genesis is durable: a second start (before any seal) keeps it,
    // and the manifest now exists, so the foreign file counts as an orphan.
    let (w, _) = RawWriter::open(archive, cfg, (0, &[0, 0])).unwrap();
    assert_eq!(w.offsets(), &[300, 400]);
    assert!(!foreign.exists());
}

#[test]
fn retention_deletes_whole_hours_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    let h = 3_600_000;
    let p = batch(&[
        ("a", "old", T0),
        ("a", "new", T0 + h),
        ("b", "old-b", T0 + 10),
    ]);
    w.append(0, 10, 0, T0, &p, &[]).unwrap();
    w.seal_now().unwrap();
    assert_eq!(shared.files.read().len(), 3);
    // Hour 12 ends at T0 + h: a cutoff just before keeps it.
    assert_eq!(w.retain(T0 + h - 1).unwrap(), (0, 0));
    assert_eq!(w.retain(T0 + h).unwrap(), (2, 2));
    let left: Vec<String> = read_archive(&dir.path().join("archive"))
        .into_iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(left, vec!["new"]);
    assert_eq!(shared.stats.rows_deleted.load(Relaxed), 2);
    w.close().unwrap();
    let (_, shared) = open(dir.path());
    assert_eq!(shared.files.read().len(), 1);
}

#[test]
fn merging_hot_batches_never_takes_rows_of_the_seal_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    for i in 0..4u32 {
        w.append(
            0,
            (i + 1) as u64,
            i as u64,
            T0,
            &batch(&[("a", &format!("e{i}"), T0)]),
            &[],
        )
        .unwrap();
        w.flush().unwrap();
    }
    let mut v = shared.hot.read().tenants["a"].clone();
    assert_eq!(
        v.iter().map(|b| b.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    writer::coalesce(&mut v, 2).unwrap();
    assert_eq!(v.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![1, 2, 4]);
    assert_eq!(v[2].batch.num_rows(), 2);
    // What a seal through seq 2 leaves behind holds no row it sealed.
    v.retain(|b| b.seq > 2);
    assert_eq!(v.iter().map(|b| b.batch.num_rows()).sum::<usize>(), 2);
}

#[test]
fn many_small_flushes_during_seals_archive_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open(&ArchiveTarget::Local(dir.path().join("archive"))).unwrap();
    let mut cfg = RawConfig::new(dir.path().join("raw/manifest"), 1);
    cfg.seal_rows = 150;
    let (mut w, _shared) = RawWriter::open(archive, cfg, (0, &[0])).unwrap();
    let n = 3000u32;
    for i in 0..n {
        w.append(
            0,
            (i + 1) as u64,
            i as u64,
            T0,
            &batch(&[("a", &format!("e{i:05}"), T0 + i as i64)]),
            &[],
        )
        .unwrap();
        w.flush().unwrap();
        w.maybe_seal().unwrap();
    }
    w.close().unwrap();
    let rows = read_archive(&dir.path().join("archive"));
    let mut ids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n as usize);
    assert_eq!(rows.len(), n as usize, "a row was sealed twice");
}

/// Several seals into one hour leave small files; compaction merges each
/// (tenant, hour) into one time-sorted file with exactly the same rows,
/// the manifest agrees after a restart, and the replaced files go after
/// their grace period.
#[test]
fn compaction_merges_small_files_and_keeps_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared, archive, cfg) = open_compacting(dir.path(), 3, 0);
    let h = 3_600_000;
    let mut lsn = 0u64;
    let mut seal = |w: &mut RawWriter, events: &[(&str, &str, Millis)]| {
        lsn += 1;
        w.append(0, lsn * 10, lsn, T0, &batch(events), &[]).unwrap();
        w.seal_now().unwrap();
    };
    // Tenant a: hour 12 gets two seals, then hour 13 one (so 12 is over).
    // Tenant b: hour 12 gets three seals (enough files while still open).
    seal(&mut w, &[("a", "a1", T0 + 50), ("b", "b1", T0 + 7)]);
    seal(&mut w, &[("a", "a2", T0 + 10), ("b", "b2", T0 + 3)]);
    seal(&mut w, &[("b", "b3", T0 + 5)]);
    let before = read_archive(&dir.path().join("archive"));
    let ids = |rows: &[(String, String, Millis)]| {
        let mut v: Vec<(String, Millis)> = rows.iter().map(|r| (r.1.clone(), r.2)).collect();
        v.sort();
        v
    };
    // Hour 12 of a has two files but is not over yet: only b is merged.
    let r = w.compact_now().unwrap();
    assert_eq!((r.files_in, r.files_out, r.rows), (3, 1, 3));
    seal(&mut w, &[("a", "a3", T0 + h + 1)]);
    let r = w.compact_now().unwrap();
    assert_eq!((r.files_in, r.files_out, r.rows), (2, 1, 2));
    // Nothing left to merge.
    assert_eq!(w.compact_now().unwrap().files_in, 0);
    let after = read_archive(&dir.path().join("archive"));
    let mut want = ids(&before);
    want.push(("a3".into(), T0 + h + 1));
    want.sort();
    assert_eq!(ids(&after), want);
    let files: std::collections::BTreeSet<String> = after.iter().map(|r| r.0.clone()).collect();
    assert_eq!(files.len(), 3, "one file per (tenant, hour): {files:?}");
    // Each merged file is sorted by time.
    for f in &files {
        let ts: Vec<Millis> = {
            let r = ParquetRecordBatchReaderBuilder::try_new(
                File::open(dir.path().join("archive").join(f)).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            r.flat_map(|b| {
                let b = b.unwrap();
                b.column(5)
                    .as_primitive::<TimestampMillisecondType>()
                    .values()
                    .to_vec()
            })
            .collect()
        };
        assert!(ts.windows(2).all(|p| p[0] <= p[1]), "{f}: {ts:?}");
    }
    let live: std::collections::BTreeSet<String> =
        shared.files.read().iter().map(|f| f.path.clone()).collect();
    assert_eq!(live, files);
    assert_eq!(shared.stats.files_compacted.load(Relaxed), 5);
    w.close().unwrap();
    // The manifest names exactly the merged files after a restart.
    let (_, shared) = RawWriter::open(archive, cfg, (0, &[0])).unwrap();
    let reopened: std::collections::BTreeSet<String> =
        shared.files.read().iter().map(|f| f.path.clone()).collect();
    assert_eq!(reopened, files);
    let rows: u64 = shared.files.read().iter().map(|f| f.rows).sum();
    assert_eq!(rows, 6);
}

/// Files of large row groups are merged by copying their column chunks:
/// the merged file holds the same rows, one row group per sealed one (each
/// sorted by time, with statistics that match it and a page index), the
/// same column types, and about the bytes of its inputs.
#[test]
fn compaction_splices_large_row_groups_without_reencoding() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared, _archive, _cfg) = open_compacting(dir.path(), 3, 0);
    let per_seal = crate::writer::SPLICE_ROWS as usize + 3000;
    let mut next = lcg(7);
    let mut want = Vec::new();
    for s in 0..3u64 {
        let mut bw = BatchWriter::new();
        for j in 0..per_seal {
            let id = format!("e{s}-{j}");
            // Seals overlap in time (late rows), all within hour 12.
            let ts = T0 + (s as Millis * 1_000_000) + (next() % 1_500_000) as Millis;
            let at = bw.begin_event("a", &id, "click", ts, Some("u1"), None);
            bw.prop("n", PropValue::Int(j as i64));
            bw.finish_event(at, 1);
            want.push((id, ts));
        }
        w.append(0, s + 1, s, T0, &bw.finish(), &[]).unwrap();
        w.seal_now().unwrap();
    }
    let inputs: u64 = shared.files.read().iter().map(|f| f.bytes).sum();
    let r = w.compact_now().unwrap();
    assert_eq!(
        (r.files_in, r.files_out, r.rows),
        (3, 1, 3 * per_seal as u64)
    );
    let files = shared.files.read().clone();
    assert_eq!(files.len(), 1);
    let f = &files[0];
    assert!(
        f.bytes <= inputs && f.bytes + 4096 >= inputs,
        "merged {} bytes from {inputs}",
        f.bytes
    );
    let path = dir.path().join("archive").join(&f.path);
    let b = ParquetRecordBatchReaderBuilder::try_new_with_options(
        File::open(&path).unwrap(),
        parquet::arrow::arrow_reader::ArrowReaderOptions::new()
            .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required),
    )
    .unwrap();
    assert_eq!(b.schema().as_ref(), crate::schema::events_schema().as_ref());
    let meta = b.metadata().clone();
    assert_eq!(meta.num_row_groups(), 3);
    assert!(meta.column_index().is_some() && meta.offset_index().is_some());
    let mut got = Vec::new();
    let mut rg_rows = meta.row_groups().iter().map(|g| g.num_rows() as usize);
    let mut left = rg_rows.next().unwrap();
    let mut group_ts: Vec<Millis> = Vec::new();
    let mut groups: Vec<Vec<Millis>> = Vec::new();
    for batch in b.build().unwrap() {
        let batch = batch.unwrap();
        let ids = batch.column(0).as_string::<i32>();
        let ts = batch.column(5).as_primitive::<TimestampMillisecondType>();
        for i in 0..batch.num_rows() {
            got.push((ids.value(i).to_string(), ts.value(i)));
            group_ts.push(ts.value(i));
            left -= 1;
            if left == 0 {
                groups.push(std::mem::take(&mut group_ts));
                left = rg_rows.next().unwrap_or(usize::MAX);
            }
        }
    }
    for (g, ts) in groups.iter().enumerate() {
        assert!(ts.windows(2).all(|p| p[0] <= p[1]), "row group {g} sorted");
        let st = meta.row_group(g).column(5).statistics().unwrap();
        let parquet::file::statistics::Statistics::Int64(st) = st else {
            panic!("ts statistics type");
        };
        assert_eq!(st.min_opt(), ts.first());
        assert_eq!(st.max_opt(), ts.last());
        // Tenant filters prune on the row group's tenant range too.
        let st = meta.row_group(g).column(1).statistics().unwrap();
        let parquet::file::statistics::Statistics::ByteArray(st) = st else {
            panic!("tenant statistics type");
        };
        assert_eq!(st.min_bytes_opt(), Some(&b"a"[..]));
        assert_eq!(st.max_bytes_opt(), Some(&b"a"[..]));
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
    w.close().unwrap();
}

/// Within the grace period a reader globbing `*.parquet` sees the replaced
/// files only (the merged one is still `.merging`), never both; a restart
/// inside the grace period finishes the swap.
#[test]
fn a_directory_reader_never_sees_merged_rows_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared, archive, cfg) = open_compacting(dir.path(), 2, 3_600_000);
    for lsn in 1..=3u64 {
        let id = format!("e{lsn}");
        w.append(
            0,
            lsn * 10,
            lsn,
            T0,
            &batch(&[("a", &id, T0 + lsn as i64)]),
            &[],
        )
        .unwrap();
        w.seal_now().unwrap();
    }
    let root = dir.path().join("archive");
    let before = read_archive(&root);
    assert_eq!(before.len(), 3);
    let r = w.compact_now().unwrap();
    assert_eq!((r.files_in, r.files_out, r.deleted), (3, 1, 0));
    // The directory: the three old files, the same rows, nothing twice.
    assert_eq!(read_archive(&root), before);
    // Tally's own list: the merged file only.
    let live: Vec<String> = shared.files.read().iter().map(|f| f.path.clone()).collect();
    assert_eq!(live.len(), 1);
    assert!(live[0].ends_with(".merging"), "{live:?}");
    w.close().unwrap();
    let (_w, shared) = RawWriter::open(archive, cfg, (0, &[0])).unwrap();
    let live: Vec<String> = shared.files.read().iter().map(|f| f.path.clone()).collect();
    assert_eq!(live.len(), 1);
    assert!(live[0].ends_with(".parquet"), "{live:?}");
    let after = read_archive(&root);
    let ids = |v: &[(String, String, Millis)]| v.iter().map(|r| r.1.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&after), ids(&before));
    assert!(after.iter().all(|r| r.0 == live[0]));
    let merging = std::fs::read_dir(root.join("tenant=a/date=2026-11-01/hour=12"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".merging")
        })
        .count();
    assert_eq!(merging, 0);
}

/// Many flushed batches with times in random order over three hours: every
/// file holds one hour, sorted by time, cut into row groups of the
/// configured size, and every column of every row reads back as written
/// (properties with escapes and non-ASCII text included).
#[test]
fn seals_gather_rows_from_many_batches_sorted_into_row_groups() {
    // Times in random order (rows gathered a row group at a time) and in
    // arrival order (rows written as slices of their batches).
    seal_and_check(false);
    seal_and_check(true);
}

fn seal_and_check(in_order: bool) {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open(&ArchiveTarget::Local(dir.path().join("archive"))).unwrap();
    let mut cfg = RawConfig::new(dir.path().join("raw/manifest"), 1);
    cfg.row_group_rows = 7;
    let (mut w, _shared) = RawWriter::open(archive, cfg, (0, &[0])).unwrap();
    let mut next = lcg(42);
    let mut want: Vec<(String, Millis, Option<String>, String)> = Vec::new();
    let mut offset = 0;
    for rec in 0..40u64 {
        let mut bw = BatchWriter::new();
        let n = if in_order { 100 } else { 1 + next() % 9 };
        for j in 0..n {
            let id = format!("r{rec}-{j}");
            let ts = if in_order {
                T0 + (rec * 100 + j) as Millis * 1000
            } else {
                T0 + (next() % (3 * 3_600_000)) as Millis
            };
            let user = (!next().is_multiple_of(3)).then(|| format!("u{}", next() % 5));
            let text = [
                "plain",
                "quote \" back \\ slash",
                "tab\there\nnl",
                "é€😀",
                "\u{1}",
            ][(next() % 5) as usize];
            let at = bw.begin_event("t", &id, "click", ts, user.as_deref(), None);
            bw.prop("s", PropValue::Str(text));
            bw.prop("n", PropValue::Int(-(next() as i64)));
            bw.prop("f", PropValue::Float(0.25));
            bw.prop("j", PropValue::Json("{\"a\":[1,2]}"));
            bw.finish_event(at, 4);
            want.push((id, ts, user, serde_json::Value::from(text).to_string()));
        }
        let payload = bw.finish();
        offset += payload.len() as u64;
        w.append(0, offset, rec, T0, &payload, &[]).unwrap();
        if rec % 3 == 0 {
            w.flush().unwrap();
        }
    }
    w.seal_now().unwrap();
    let mut got = Vec::new();
    for p in parquet_files(&dir.path().join("archive")) {
        let b = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap()).unwrap();
        let rows = b.metadata().file_metadata().num_rows() as usize;
        assert_eq!(b.metadata().num_row_groups(), rows.div_ceil(7), "{p:?}");
        let mut last = Millis::MIN;
        let mut hour = None;
        for batch in b.build().unwrap() {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_string::<i32>();
            let users = batch.column(3).as_string::<i32>();
            let ts = batch.column(5).as_primitive::<TimestampMillisecondType>();
            let props = batch.column(6).as_string::<i32>();
            for i in 0..batch.num_rows() {
                let t = ts.value(i);
                assert!(t >= last, "sorted by time in {p:?}");
                last = t;
                let h = t - t.rem_euclid(3_600_000);
                assert_eq!(*hour.get_or_insert(h), h, "one hour per file");
                let v: serde_json::Value = serde_json::from_str(props.value(i)).unwrap();
                assert!(v["n"].as_i64().is_some_and(|n| n <= 0));
                assert_eq!(v["f"], 0.25);
                assert_eq!(v["j"], serde_json::json!({"a": [1, 2]}));
                got.push((
                    ids.value(i).to_string(),
                    t,
                    users.is_valid(i).then(|| users.value(i).to_string()),
                    v["s"].to_string(),
                ));
            }
        }
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

/// A record whose texts are not UTF-8 (damaged past its log checksum) does
/// not fail the batch it is built into: its texts are kept with replacement
/// characters and the other rows are untouched.
#[test]
fn text_that_is_not_utf8_is_kept_with_replacement_characters() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    let mut bw = BatchWriter::new();
    let at = bw.begin_event("a", "bad\u{e9}", "click", T0, Some("u\u{e9}"), None);
    bw.prop("k\u{e9}", PropValue::Str("v"));
    bw.finish_event(at, 1);
    let mut bad = bw.finish();
    // Every "é" (C3 A9) loses its second byte.
    for i in 0..bad.len() - 1 {
        if bad[i..i + 2] == [0xC3, 0xA9] {
            bad[i + 1] = b'!';
        }
    }
    w.append(0, 10, 0, T0, &batch(&[("a", "good", T0 + 1)]), &[])
        .unwrap();
    w.append(1, 10, 1, T0, &bad, &[]).unwrap();
    w.flush().unwrap();
    let snap = shared.snapshot("a", Millis::MIN, Millis::MAX);
    let rows: Vec<(String, String, String)> = snap
        .batches
        .iter()
        .flat_map(|b| {
            let ids = b.column(0).as_string::<i32>().clone();
            let users = b.column(3).as_string::<i32>().clone();
            let props = b.column(6).as_string::<i32>().clone();
            (0..b.num_rows()).map(move |i| {
                (
                    ids.value(i).to_string(),
                    users.value(i).to_string(),
                    props.value(i).to_string(),
                )
            })
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("good".into(), "u1".into(), r#"{"n":7}"#.into()),
            (
                "bad\u{fffd}!".into(),
                "u\u{fffd}!".into(),
                "{\"k\u{fffd}!\":\"v\"}".into()
            ),
        ]
    );
    assert_eq!(w.seal_now().unwrap().rows, 2);
}

#[test]
fn tenant_columns_are_slices_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, shared) = open(dir.path());
    // Batches of varying size for one tenant (and a few rows of another),
    // each published on its own.
    for (lsn, n) in [3usize, 700, 40, 1500, 1].into_iter().enumerate() {
        let lsn = lsn as u64;
        let ids: Vec<String> = (0..n).map(|i| format!("e{lsn}-{i}")).collect();
        let mut evs: Vec<(&str, &str, Millis)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| ("acme", id.as_str(), T0 + i as Millis))
            .collect();
        evs.push(("zeta", "z", T0));
        w.append(0, lsn + 1, lsn, T0, &batch(&evs), &[]).unwrap();
        w.flush().unwrap();
    }
    let hot = shared.hot.read();
    let mut bytes = 0;
    for (tenant, v) in &hot.tenants {
        for hb in v {
            let t = hb.batch.column(1).as_string::<i32>();
            assert_eq!(t.len(), hb.batch.num_rows());
            assert!(t.iter().all(|v| v == Some(&**tenant)), "{tenant}");
            bytes += super::writer::batch_memory(&hb.batch);
        }
    }
    assert_eq!(hot.bytes, bytes);
    // A batch of 3 rows does not count the 512 names its slice is cut from.
    let small = &hot.tenants["acme"][0].batch;
    assert_eq!(small.num_rows(), 3);
    assert!(
        super::writer::batch_memory(small) + 512 * 4 < small.get_array_memory_size(),
        "{} vs {}",
        super::writer::batch_memory(small),
        small.get_array_memory_size()
    );
    drop(hot);
    assert_eq!(w.seal_now().unwrap().rows, 2244 + 5);
    let rows = read_archive(&dir.path().join("archive"));
    assert_eq!(rows.len(), 2249);
    assert_eq!(
        rows.iter()
            .filter(|(p, _, _)| p.starts_with("tenant=acme/"))
            .count(),
        2244
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// `time_order` is a stable sort by time, in both of its ways: a
    /// counting sort over narrow spans, a merge sort over wide ones
    /// (extreme timestamps included).
    #[test]
    fn time_order_is_a_stable_sort(
        batches in proptest::collection::vec(
            proptest::collection::vec(
                proptest::prop_oneof![
                    4 => 0i64..50,
                    1 => 0i64..200_000,
                    1 => proptest::prelude::any::<i64>(),
                ],
                0..40,
            ),
            0..6,
        ),
        base in proptest::prelude::any::<i32>(),
    ) {
        let batches: Vec<Vec<Millis>> = batches
            .into_iter()
            .map(|b| b.into_iter().map(|v| v.saturating_add(i64::from(base))).collect())
            .collect();
        let ts: Vec<&[Millis]> = batches.iter().map(|b| b.as_slice()).collect();
        let mut want: Vec<(Millis, u32, u32)> = Vec::new();
        for (b, t) in batches.iter().enumerate() {
            want.extend(t.iter().enumerate().map(|(r, &v)| (v, b as u32, r as u32)));
        }
        want.sort_by_key(|k| k.0);
        proptest::prop_assert_eq!(super::writer::time_order(&ts), want);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// `checked_utf8` accepts exactly what arrow's own check accepts, with
    /// the same texts: values cut inside a character (the buffer as a whole
    /// UTF-8, an offset not on a boundary), bytes that are not UTF-8, nulls.
    #[test]
    fn checked_utf8_agrees_with_arrow(
        text in "[a-zé€😀\\x00]{0,40}",
        junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..6),
        cuts in proptest::collection::vec(0usize..60, 0..8),
        nulls in proptest::collection::vec(proptest::prelude::any::<bool>(), 0..9),
        with_junk in proptest::prelude::any::<bool>(),
    ) {
        let mut bytes = text.into_bytes();
        if with_junk {
            let at = cuts.first().map_or(0, |&c| c.min(bytes.len()));
            bytes.splice(at..at, junk);
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let values: Vec<Option<&[u8]>> = cuts
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let null = nulls.get(i).copied().unwrap_or(false) && w[0] == w[1];
                (!null).then_some(&bytes[w[0]..w[1]])
            })
            .collect();
        let b = arrow::array::BinaryArray::from(values);
        let ours = super::writer::checked_utf8(&b);
        let arrows = arrow::array::StringArray::try_from_binary(b.clone()).ok();
        proptest::prop_assert_eq!(ours, arrows);
    }
}

/// The archive manifest as committed in `tests/fixtures/manifest-v1` (two
/// seals, then a compaction replacing two files by one): today's code
/// replays it into the live files and the sealed log position.
/// `TALLY_WRITE_MANIFEST_FIXTURE=1` writes it again (only when the format
/// changes, as a new file).
#[test]
fn the_committed_manifest_replays() {
    use crate::manifest::{ArchiveFile, Entry, Manifest};
    let fixture = std::path::Path::new(&*manifest_dir()).join("tests/fixtures/manifest-v1");
    let file = |path: &str, tenant: &str, min_ts: i64, rows: u64| ArchiveFile {
        path: path.to_string(),
        tenant: tenant.into(),
        min_ts,
        max_ts: min_ts + 59_000,
        rows,
        bytes: rows * 40,
    };
    const H: i64 = 1_793_534_400_000;
    if std::env::var_os("TALLY_WRITE_MANIFEST_FIXTURE").is_some() {
        let _ = std::fs::remove_file(&fixture);
        std::fs::create_dir_all(fixture.parent().unwrap()).unwrap();
        let mut m = Manifest::open(&fixture, 2, (0, &[0, 0])).unwrap();
        let a = file(
            "tenant=acme/date=2026-11-01/hour=12/part-10-0.parquet",
            "acme",
            H,
            10,
        );
        let g = file(
            "tenant=globex/date=2026-11-01/hour=12/part-10-1.parquet",
            "globex",
            H,
            3,
        );
        m.append(Entry::Seal {
            next_lsn: 10,
            offsets: &[400, 380],
            add: &[a, g],
        })
        .unwrap();
        let b = file(
            "tenant=acme/date=2026-11-01/hour=12/part-20-0.parquet",
            "acme",
            H + 60_000,
            7,
        );
        m.append(Entry::Seal {
            next_lsn: 20,
            offsets: &[800, 700],
            add: &[b],
        })
        .unwrap();
        let merged = file(
            "tenant=acme/date=2026-11-01/hour=12/part-20-m.parquet",
            "acme",
            H,
            17,
        );
        m.append(Entry::Replace {
            remove: &[
                "tenant=acme/date=2026-11-01/hour=12/part-10-0.parquet".into(),
                "tenant=acme/date=2026-11-01/hour=12/part-20-0.parquet".into(),
            ],
            add: &[merged],
        })
        .unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.manifest");
    std::fs::copy(&fixture, &path).unwrap();
    let m = Manifest::open(&path, 2, (0, &[0, 0])).unwrap();
    assert!(m.existed);
    assert_eq!(m.state.next_lsn, 20);
    assert_eq!(m.state.offsets, vec![800, 700]);
    let files: Vec<(&str, &str, u64)> = m
        .state
        .files
        .values()
        .map(|f| (f.path.as_str(), &*f.tenant, f.rows))
        .collect();
    assert_eq!(
        files,
        vec![
            (
                "tenant=acme/date=2026-11-01/hour=12/part-20-m.parquet",
                "acme",
                17
            ),
            (
                "tenant=globex/date=2026-11-01/hour=12/part-10-1.parquet",
                "globex",
                3
            ),
        ]
    );
}

/// The crate's directory: cargo's at run time (a test executable reused
/// from a shared target dir may have been built from another checkout),
/// else where it was built.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}

/// Rows of `events` files as (event_id, user_id, schema_version), in
/// file order, each batch read into today's schema.
fn ids_users_versions(file: &[u8]) -> Vec<(String, Option<String>, Option<i32>)> {
    let r = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(file))
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in r {
        let b = crate::to_events_schema(&b.unwrap()).unwrap();
        let ids = b.column(0).as_string::<i32>();
        let users = b.column(3).as_string::<i32>();
        let v = b.column(8).as_primitive::<arrow::datatypes::Int32Type>();
        for i in 0..b.num_rows() {
            out.push((
                ids.value(i).to_string(),
                users.is_valid(i).then(|| users.value(i).to_string()),
                v.is_valid(i).then(|| v.value(i)),
            ));
        }
    }
    out
}

/// The archive file formats as committed in `tests/fixtures`:
/// `events-v1.parquet` (before `schema_version`) and `events-v2.parquet`.
/// Today's code reads both (v1's versions as nulls) and compaction merges
/// one of each into today's format. `TALLY_WRITE_ARCHIVE_FIXTURE=1` writes
/// the current version again (only when the format changes, as a new
/// file; never over an old one).
#[test]
fn the_committed_archive_files_read_back_and_merge() {
    let dir = std::path::Path::new(&*manifest_dir()).join("tests/fixtures");
    if std::env::var_os("TALLY_WRITE_ARCHIVE_FIXTURE").is_some() {
        use arrow::array::{ArrayRef, Int32Array, StringArray, TimestampMillisecondArray};
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMillisecondArray::from(v).with_timezone("UTC"))
        };
        let text =
            |v: Vec<Option<&str>>| -> ArrayRef { Arc::new(v.into_iter().collect::<StringArray>()) };
        let batch = RecordBatch::try_new(
            crate::events_schema(),
            vec![
                text(vec![Some("e4"), Some("e5"), Some("e6")]),
                text(vec![Some("acme"); 3]),
                text(vec![Some("purchase"), Some("page_view"), Some("purchase")]),
                text(vec![Some("u3"), None, Some("u1")]),
                text(vec![Some("s3"), None, Some("s1")]),
                ts(vec![T0 + 3_000, T0 + 4_000, T0 + 5_000]),
                text(vec![
                    Some(r#"{"plan":"team","amount":40}"#),
                    Some(r#"{"page":"/pricing"}"#),
                    Some(r#"{"amount":7,"coupon":"X"}"#),
                ]),
                ts(vec![T0 + 3_005, T0 + 4_005, T0 + 5_005]),
                Arc::new(Int32Array::from(vec![Some(2), None, Some(3)])),
            ],
        )
        .unwrap();
        let cfg = RawConfig::new(std::path::PathBuf::new(), 1);
        let parts = crate::writer::sorted_parts(&[batch], &cfg).unwrap();
        std::fs::write(dir.join("events-v2.parquet"), &parts[0].bytes).unwrap();
        return;
    }
    let v1 = std::fs::read(dir.join("events-v1.parquet")).unwrap();
    let v2 = std::fs::read(dir.join("events-v2.parquet")).unwrap();
    let s = |v: &str| Some(v.to_string());
    let old = vec![
        ("e1".to_string(), s("u1"), None),
        ("e2".to_string(), None, None),
        ("e3".to_string(), s("u2"), None),
    ];
    let new = vec![
        ("e4".to_string(), s("u3"), Some(2)),
        ("e5".to_string(), None, None),
        ("e6".to_string(), s("u1"), Some(3)),
    ];
    assert_eq!(ids_users_versions(&v1), old);
    assert_eq!(ids_users_versions(&v2), new);
    let (rows, merged) = crate::merge_parquet(&[v1.into(), v2.into()], 1)
        .unwrap()
        .unwrap();
    assert_eq!(rows, 6);
    let r = ParquetRecordBatchReaderBuilder::try_new(merged.clone()).unwrap();
    assert_eq!(r.schema().fields(), crate::events_schema().fields());
    assert_eq!(ids_users_versions(&merged), [old, new].concat());
}

#[test]
fn schema_versions_go_from_the_log_record_to_the_sealed_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, _shared) = open(dir.path());
    let mut b = BatchWriter::new();
    for (i, v) in [Some(1u32), None, Some(2), Some(u32::MAX)]
        .into_iter()
        .enumerate()
    {
        let at = b.begin_event("a", &format!("e{i}"), "buy", T0 + i as Millis, None, None);
        if let Some(v) = v {
            b.schema_version(at, v);
        }
        b.prop("n", PropValue::Int(i as i64));
        b.finish_event(at, 1);
    }
    w.append(0, 1, 0, T0, &b.finish(), &[]).unwrap();
    w.flush().unwrap();
    w.seal_now().unwrap();
    let mut got = Vec::new();
    for p in parquet_files(&dir.path().join("archive")) {
        got.extend(ids_users_versions(&std::fs::read(&p).unwrap()));
    }
    let versions: Vec<(String, Option<i32>)> = got.into_iter().map(|(id, _, v)| (id, v)).collect();
    assert_eq!(
        versions,
        [
            ("e0".to_string(), Some(1)),
            ("e1".to_string(), None),
            ("e2".to_string(), Some(2)),
            // Past INT32: held at its largest, never wrapped.
            ("e3".to_string(), Some(i32::MAX)),
        ]
    );
}
