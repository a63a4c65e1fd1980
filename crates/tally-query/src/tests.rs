use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tally_archive::{Archive, ArchiveTarget, RawConfig, RawWriter};
use tally_types::BatchWriter;
use tally_types::codec::PropValue;

use super::*;

const T0: i64 = 1_793_534_400_000; // 2026-11-01T12:00:00Z

struct Fixture {
    _dir: tempfile::TempDir,
    writer: RawWriter,
    engine: Arc<QueryEngine>,
    version: Arc<AtomicU64>,
}

fn fixture(cfg: QueryConfig, n: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open(&ArchiveTarget::Local(dir.path().join("archive"))).unwrap();
    let (mut writer, raw) = RawWriter::open(
        archive,
        RawConfig::new(dir.path().join("raw/manifest"), 1),
        (0, &[0]),
    )
    .unwrap();
    let mut w = BatchWriter::new();
    for i in 0..n {
        let tenant = if i % 2 == 0 { "a" } else { "b" };
        let at = w.begin_event(
            tenant,
            &format!("e{i}"),
            "click",
            T0 + i as i64 * 1000,
            Some(&format!("u{}", i % 7)),
            None,
        );
        w.prop("ms", PropValue::Int(i as i64));
        w.finish_event(at, 1);
    }
    writer.append(0, 1, 0, T0, &w.finish(), &[]).unwrap();
    writer.flush().unwrap();
    let version = Arc::new(AtomicU64::new(0));
    let v = version.clone();
    let engine = Arc::new(QueryEngine::new(
        raw,
        Arc::new(RwLock::new(RollupStore::new())),
        cfg,
        Arc::new(move || v.load(Relaxed)),
    ));
    Fixture {
        _dir: dir,
        writer,
        engine,
        version,
    }
}

fn ints(r: &QueryResult) -> Vec<Vec<serde_json::Value>> {
    format::rows(r)
}

#[tokio::test]
async fn a_tenant_sees_its_rows_only_hot_or_sealed() {
    let mut f = fixture(QueryConfig::default(), 100);
    let q = "SELECT count(*), min(event_id), sum(json_get_int(properties, 'ms')) FROM events";
    let a = f.engine.sql("a", q).await.unwrap();
    assert_eq!(
        ints(&a),
        vec![vec![
            serde_json::json!(50),
            serde_json::json!("e0"),
            serde_json::json!(2450)
        ]]
    );
    let b = f.engine.sql("b", q).await.unwrap();
    assert_eq!(ints(&b)[0][0], serde_json::json!(50));
    let nobody = f.engine.sql("c", q).await.unwrap();
    assert_eq!(ints(&nobody)[0][0], serde_json::json!(0));
    // The same after sealing into Parquet.
    f.writer.seal_now().unwrap();
    f.version.fetch_add(1, Relaxed);
    let a2 = f.engine.sql("a", q).await.unwrap();
    assert!(!a2.cached);
    assert_eq!(ints(&a2), ints(&a));
    // Time filters: only rows in range, whichever side of the seal.
    let r = f
        .engine
        .sql(
            "a",
            "SELECT count(*) FROM events WHERE ts >= '2026-11-01T12:00:10Z' AND ts < '2026-11-01T12:00:20Z'",
        )
        .await
        .unwrap();
    assert_eq!(ints(&r)[0][0], serde_json::json!(5));
}

#[tokio::test]
async fn cached_answers_last_until_data_changes() {
    let f = fixture(QueryConfig::default(), 10);
    let q = "SELECT count(*) FROM events";
    assert!(!f.engine.sql("a", q).await.unwrap().cached);
    assert!(f.engine.sql("a", q).await.unwrap().cached);
    // Another tenant, another entry.
    assert!(!f.engine.sql("b", q).await.unwrap().cached);
    f.version.fetch_add(1, Relaxed);
    assert!(!f.engine.sql("a", q).await.unwrap().cached);
}

#[tokio::test]
async fn limits_answer_with_errors_that_name_the_setting() {
    let f = fixture(
        QueryConfig {
            memory_limit: 64 << 10,
            cache_entries: 0,
            ..QueryConfig::default()
        },
        20_000,
    );
    let e = f
        .engine
        .sql(
            "a",
            "SELECT array_agg(properties) FROM events GROUP BY user_id",
        )
        .await
        .unwrap_err();
    assert!(matches!(e, QueryError::Memory { .. }), "{e}");
    assert!(e.to_string().contains("query.memory-limit"), "{e}");

    let f = fixture(
        QueryConfig {
            timeout_ms: 1,
            cache_entries: 0,
            ..QueryConfig::default()
        },
        20_000,
    );
    let e = f
        .engine
        .sql(
            "a",
            "SELECT count(*) FROM events x, events y, events z WHERE x.ts < y.ts AND y.ts < z.ts",
        )
        .await
        .unwrap_err();
    assert!(matches!(e, QueryError::Timeout(1)), "{e}");
    assert!(e.to_string().contains("query.timeout"));
}

#[tokio::test]
async fn max_rows_truncates_and_says_so() {
    let f = fixture(
        QueryConfig {
            max_rows: 7,
            ..QueryConfig::default()
        },
        100,
    );
    let r = f
        .engine
        .sql("a", "SELECT event_id FROM events")
        .await
        .unwrap();
    assert_eq!(r.rows, 7);
    assert!(r.truncated);
    let body: serde_json::Value =
        serde_json::from_slice(&format::encode(&r, format::Format::Json).unwrap()).unwrap();
    assert_eq!(body["truncated"], true);
    assert_eq!(body["rows"].as_array().unwrap().len(), 7);
}

#[test]
fn time_bounds_read_ts_filters() {
    use datafusion::prelude::{col, lit};
    let ts = |v: i64| {
        lit(datafusion::scalar::ScalarValue::TimestampMillisecond(
            Some(v),
            None,
        ))
    };
    let (f, t) = provider::time_bounds(
        &[
            col("ts").gt_eq(ts(10)).and(col("ts").lt(ts(20))),
            col("event_type").eq(lit("x")),
        ],
        "ts",
    );
    assert_eq!((f, t), (10, 20));
    let (f, t) = provider::time_bounds(&[ts(5).lt_eq(col("ts")), col("ts").lt_eq(ts(9))], "ts");
    assert_eq!((f, t), (5, 10));
    // OR is not understood: everything.
    let (f, t) = provider::time_bounds(&[col("ts").lt(ts(3)).or(col("ts").gt(ts(50)))], "ts");
    assert_eq!((f, t), (i64::MIN, i64::MAX));
    // Another column's bounds are not the asked one's.
    let (f, t) = provider::time_bounds(&[col("bucket").gt_eq(ts(60))], "ts");
    assert_eq!((f, t), (i64::MIN, i64::MAX));
    assert_eq!(
        provider::time_bounds(&[col("bucket").gt_eq(ts(60))], "bucket"),
        (60, i64::MAX)
    );
}

/// The UTC fast path of `date_trunc` answers exactly what DataFusion's own
/// function does, for every fixed granularity, before and after 1970, with
/// nulls, and the other granularities still go through DataFusion's.
#[tokio::test]
async fn utc_date_trunc_matches_datafusion() {
    use arrow::array::{Array, TimestampMillisecondArray};
    use datafusion::datasource::MemTable;
    let mut values: Vec<Option<i64>> = vec![None, Some(0), Some(-1), Some(-86_400_001)];
    let mut x: i64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        values.push(Some(x.rem_euclid(4_000_000_000_000) - 1_000_000_000_000));
    }
    let mut batches = Vec::new();
    for tz in [Some("UTC"), Some("+00:00"), None] {
        let a = TimestampMillisecondArray::from(values.clone()).with_timezone_opt(tz);
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("ts", a.data_type().clone(), true),
        ]));
        batches.push((
            schema.clone(),
            RecordBatch::try_new(schema, vec![Arc::new(a)]).unwrap(),
        ));
    }
    for (schema, batch) in batches {
        let plain = SessionContext::new();
        let fast = SessionContext::new();
        fast.register_udf(udf::UtcDateTrunc::udf());
        for ctx in [&plain, &fast] {
            let t = MemTable::try_new(schema.clone(), vec![vec![batch.clone()]]).unwrap();
            ctx.register_table("t", Arc::new(t)).unwrap();
        }
        for g in ["second", "minute", "hour", "day", "week", "month", "year"] {
            let sql = format!("SELECT date_trunc('{g}', ts) AS d FROM t");
            let a = plain.sql(&sql).await.unwrap().collect().await.unwrap();
            let b = fast.sql(&sql).await.unwrap().collect().await.unwrap();
            assert_eq!(a, b, "{g} on {:?}", schema.field(0).data_type());
        }
    }
}
