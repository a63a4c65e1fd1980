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
    fixture_with(cfg, w.finish())
}

/// An engine over a raw store holding one appended `batch`.
fn fixture_with(cfg: QueryConfig, batch: Vec<u8>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open(&ArchiveTarget::Local(dir.path().join("archive"))).unwrap();
    let (mut writer, raw) = RawWriter::open(
        archive,
        RawConfig::new(dir.path().join("raw/manifest"), 1),
        (0, &[0]),
    )
    .unwrap();
    writer.append(0, 1, 0, T0, &batch, &[]).unwrap();
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

/// `properties.country` is a query's mistake, answered with the fix.
#[tokio::test]
async fn a_property_read_as_a_column_names_the_json_function() {
    let f = fixture(QueryConfig::default(), 10);
    let e = f
        .engine
        .sql(
            "a",
            "SELECT properties.country, count(*) FROM events GROUP BY 1",
        )
        .await
        .unwrap_err();
    assert!(matches!(e, QueryError::Sql(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("json_get_str(properties, 'country')")
            && msg.contains("properties->>'country'"),
        "{msg}"
    );
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

/// Properties of arbitrary JSON: leaves of every kind (strings with quotes,
/// escapes and any Unicode, extreme integers), nested up to three levels.
fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
        "[\"\\\\/\\n\\t{}\\[\\]:,]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z\"\\\\]{1,3}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `events` over one tenant whose event `e<i>` has properties
/// `{"k": values[i], "o": {"x": values[i]}}`.
fn json_fixture(values: &[serde_json::Value]) -> Fixture {
    let mut w = BatchWriter::new();
    for (i, v) in values.iter().enumerate() {
        let at = w.begin_event("a", &format!("e{i:03}"), "t", T0, None, None);
        let text = v.to_string();
        let nested = serde_json::json!({ "x": v }).to_string();
        let k = match v {
            serde_json::Value::Null => PropValue::Null,
            serde_json::Value::Bool(b) => PropValue::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => PropValue::Int(i),
                None => PropValue::Float(n.as_f64().unwrap()),
            },
            serde_json::Value::String(s) => PropValue::Str(s),
            _ => PropValue::Json(&text),
        };
        w.prop("k", k);
        w.prop("o", PropValue::Json(&nested));
        w.finish_event(at, 2);
    }
    fixture_with(QueryConfig::default(), w.finish())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Fuzzing of `json_get_*` through SQL over the stored `properties`
    /// text, hot and sealed into Parquet, against serde_json as the
    /// oracle: a string reads back as sent (any Unicode, escapes), an
    /// integer as itself (and as its text), a boolean as true/false (1/0),
    /// an object or array as its JSON text, null as NULL — top level and
    /// nested — and no value makes a query fail.
    #[test]
    fn json_get_agrees_with_serde_json(values in proptest::collection::vec(json_value(), 1..12)) {
        use serde_json::Value;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut f = json_fixture(&values);
        let q = "SELECT event_id, json_get_str(properties, 'k'), json_get_int(properties, 'k'), \
                 json_get_float(properties, 'k'), json_get_str(properties, 'o', 'x'), \
                 json_get_int(properties, 'o', 'x'), properties->>'k' AS a, properties->'o'->>'x' AS b, \
                 properties->'k' AS c \
                 FROM events ORDER BY event_id";
        for sealed in [false, true] {
            if sealed {
                f.writer.seal_now().unwrap();
                f.version.fetch_add(1, Relaxed);
            }
            let r = match rt.block_on(f.engine.sql("a", q)) {
                Ok(r) => r,
                Err(e) => return Err(proptest::test_runner::TestCaseError::fail(format!("{e}"))),
            };
            let rows = format::rows(&r);
            proptest::prop_assert_eq!(rows.len(), values.len());
            for (row, v) in rows.iter().zip(&values) {
                let parse = |t: &Value| t.as_str().and_then(|t| serde_json::from_str::<Value>(t).ok());
                for (s_col, i_col) in [(1, 2), (4, 5)] {
                    match v {
                        Value::Null => {
                            proptest::prop_assert_eq!(&row[s_col], &Value::Null);
                            proptest::prop_assert_eq!(&row[i_col], &Value::Null);
                        }
                        Value::Bool(b) => {
                            proptest::prop_assert_eq!(&row[s_col], &Value::from(b.to_string()));
                            proptest::prop_assert_eq!(&row[i_col], &Value::from(*b as i64));
                        }
                        Value::Number(n) => {
                            if let Some(i) = n.as_i64() {
                                proptest::prop_assert_eq!(&row[s_col], &Value::from(i.to_string()));
                                proptest::prop_assert_eq!(&row[i_col], &Value::from(i));
                            } else {
                                let back: Option<f64> = row[s_col].as_str().and_then(|t| t.parse().ok());
                                proptest::prop_assert_eq!(back, n.as_f64(), "float text of {}", v);
                            }
                        }
                        Value::String(t) => {
                            proptest::prop_assert_eq!(&row[s_col], &Value::from(t.as_str()), "{}", v);
                            let want = t.trim().parse::<i64>().ok().map_or(Value::Null, Value::from);
                            proptest::prop_assert_eq!(&row[i_col], &want, "{}", v);
                        }
                        Value::Array(_) | Value::Object(_) => {
                            // Both through one parser (serde_json's float
                            // parse is not exact without `float_roundtrip`).
                            let back = parse(&row[s_col]);
                            let want = serde_json::from_str::<Value>(&v.to_string()).ok();
                            proptest::prop_assert_eq!(back, want, "raw text of {}", v);
                            proptest::prop_assert_eq!(&row[i_col], &Value::Null);
                        }
                    }
                }
                if let Some(i) = v.as_i64() {
                    proptest::prop_assert_eq!(row[3].as_f64(), Some(i as f64));
                }
                // The operators are the functions: ->> is json_get_str,
                // -> answers JSON text that parses back to the value.
                proptest::prop_assert_eq!(&row[6], &row[1]);
                proptest::prop_assert_eq!(&row[7], &row[4]);
                match v {
                    Value::Null => proptest::prop_assert_eq!(&row[8], &Value::Null),
                    _ => {
                        let back = parse(&row[8]);
                        let want = serde_json::from_str::<Value>(&v.to_string()).ok();
                        if v.is_f64() {
                            let (b, w) = (back.and_then(|b| b.as_f64()), want.and_then(|w| w.as_f64()));
                            proptest::prop_assert_eq!(b, w, "-> of {}", v);
                        } else {
                            proptest::prop_assert_eq!(back, want, "-> of {}", v);
                        }
                    }
                }
            }
        }
    }
}

/// A registered property's column reads, where an event lacks it, its
/// older names and then its event type's default; other types read null.
#[tokio::test]
async fn typed_columns_read_older_names_then_defaults() {
    let mut w = BatchWriter::new();
    // (event id, type, its one property if any)
    type Ev<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>);
    let events: [Ev<'_>; 4] = [
        ("e0", "signup", Some(("tier", "pro"))),
        ("e1", "signup", Some(("plan", "gold"))),
        ("e2", "signup", None),
        ("e3", "click", None),
    ];
    for (i, (id, ty, prop)) in events.iter().enumerate() {
        let at = w.begin_event("a", id, ty, T0 + i as i64 * 1000, None, None);
        let n = match prop {
            Some((k, v)) => {
                w.prop(k, PropValue::Str(v));
                1
            }
            None => 0,
        };
        w.finish_event(at, n);
    }
    let cfg = QueryConfig {
        columns: Some(ColumnsFn(Arc::new(|_: &str| {
            [(
                "tier".to_string(),
                PropColumn {
                    ty: PropType::String,
                    fill: tally_types::schema::ColumnFill {
                        aliases: vec!["plan".into()],
                        defaults: vec![("signup".into(), serde_json::json!("free"))],
                    },
                },
            )]
            .into_iter()
            .collect()
        }))),
        ..QueryConfig::default()
    };
    let f = fixture_with(cfg, w.finish());
    let r = f
        .engine
        .sql("a", "SELECT event_id, tier FROM events ORDER BY event_id")
        .await
        .unwrap();
    let row = |id: &str, v: Option<&str>| vec![serde_json::json!(id), serde_json::json!(v)];
    assert_eq!(
        ints(&r),
        vec![
            row("e0", Some("pro")),
            row("e1", Some("gold")),
            row("e2", Some("free")),
            row("e3", None),
        ]
    );
}

#[tokio::test]
async fn each_row_tells_its_schema_version_hot_and_sealed() {
    let mut w = BatchWriter::new();
    for (i, v) in [Some(1u32), Some(2), None].into_iter().enumerate() {
        let at = w.begin_event("a", &format!("e{i}"), "buy", T0 + i as i64, None, None);
        if let Some(v) = v {
            w.schema_version(at, v);
        }
        w.prop("n", PropValue::Int(1));
        w.finish_event(at, 1);
    }
    let mut f = fixture_with(QueryConfig::default(), w.finish());
    let q = "SELECT event_id, schema_version FROM events ORDER BY event_id";
    let want = vec![
        vec![serde_json::json!("e0"), serde_json::json!(1)],
        vec![serde_json::json!("e1"), serde_json::json!(2)],
        vec![serde_json::json!("e2"), serde_json::Value::Null],
    ];
    assert_eq!(ints(&f.engine.sql("a", q).await.unwrap()), want, "hot");
    f.writer.seal_now().unwrap();
    f.version.fetch_add(1, Relaxed);
    assert_eq!(ints(&f.engine.sql("a", q).await.unwrap()), want, "sealed");
}

/// The archive's committed fixture files, one per format (see
/// `tally-archive`'s fixture test), scanned as `events`: format 1 files
/// predate `schema_version` and read it as null.
#[tokio::test]
async fn archive_files_of_every_format_scan_in_todays_schema() {
    use arrow::array::{Array, AsArray};
    use datafusion::prelude::SessionContext;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tally-archive/tests/fixtures");
    let ctx = SessionContext::new();
    let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).unwrap();
    ctx.register_object_store(&url::Url::parse(ARCHIVE_URL).unwrap(), Arc::new(store));
    let files: Vec<Arc<tally_archive::ArchiveFile>> = ["events-v1.parquet", "events-v2.parquet"]
        .iter()
        .map(|p| {
            Arc::new(tally_archive::ArchiveFile {
                path: p.to_string(),
                tenant: "acme".into(),
                min_ts: T0,
                max_ts: T0 + 5_000,
                rows: 3,
                bytes: std::fs::metadata(dir.join(p)).unwrap().len(),
            })
        })
        .collect();
    // event_id, user_id, schema_version
    let plan = provider::archive_scan(&files, 2, Some(&vec![0, 3, 8]), None).unwrap();
    let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx())
        .await
        .unwrap();
    let mut rows = Vec::new();
    for b in &batches {
        let ids = b.column(0).as_string::<i32>();
        let users = b.column(1).as_string::<i32>();
        let v = b.column(2).as_primitive::<arrow::datatypes::Int32Type>();
        for i in 0..b.num_rows() {
            rows.push((
                ids.value(i).to_string(),
                users.is_valid(i).then(|| users.value(i).to_string()),
                v.is_valid(i).then(|| v.value(i)),
            ));
        }
    }
    rows.sort();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        rows,
        vec![
            ("e1".to_string(), s("u1"), None),
            ("e2".to_string(), None, None),
            ("e3".to_string(), s("u2"), None),
            ("e4".to_string(), s("u3"), Some(2)),
            ("e5".to_string(), None, None),
            ("e6".to_string(), s("u1"), Some(3)),
        ]
    );
}
