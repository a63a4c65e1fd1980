//! Tenant-scoped tables. Each provider is built for one tenant and can only
//! produce that tenant's rows: the hot batches it reads are that tenant's,
//! and the archive files are those under `tenant=<t>/`. No SQL can widen
//! it, because nothing else is registered in the query's context.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringBuilder, TimestampMillisecondBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Result, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use parking_lot::RwLock;
use tally_archive::{RawShared, events_schema};
use tally_store::RollupStore;
use tally_store::rollup::Agg;
use tally_types::Millis;
use tally_types::time::{HOUR_MS, MINUTE_MS, align_down};

/// Where DataFusion finds the archive's object store.
pub(crate) const ARCHIVE_URL: &str = "tally://archive";

/// `events`: hot Arrow batches + archive Parquet files of one tenant.
#[derive(Debug)]
pub(crate) struct EventsTable {
    pub(crate) raw: Arc<RawShared>,
    pub(crate) tenant: String,
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        events_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Used to pick files and batches by time; DataFusion still filters
        // every row (and pushes the predicate into the Parquet scan for
        // row-group and page pruning).
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (from, to) = time_bounds(filters, "ts");
        let snap = self.raw.snapshot(&self.tenant, from, to);
        let schema = events_schema();
        let mut plans: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        if !snap.files.is_empty() {
            let n = state.config().target_partitions().max(1);
            plans.push(archive_scan(&snap.files, n, projection, limit)?);
        }
        if !snap.batches.is_empty() {
            let n = state.config().target_partitions().max(1);
            let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); n.min(snap.batches.len())];
            let len = parts.len();
            for (i, b) in snap.batches.into_iter().enumerate() {
                parts[i % len].push(b);
            }
            let mem =
                MemorySourceConfig::try_new_exec(&parts, schema.clone(), projection.cloned())?;
            plans.push(mem);
        }
        Ok(match plans.len() {
            0 => {
                let projected = match projection {
                    Some(p) => Arc::new(schema.project(p)?),
                    None => schema,
                };
                Arc::new(EmptyExec::new(projected))
            }
            1 => plans.pop().expect("one plan"),
            _ => UnionExec::try_new(plans)?,
        })
    }
}

/// A scan of archive files (under [`ARCHIVE_URL`]) as `events` rows, over
/// at most `partitions` groups of files. Files of every archive format
/// read in today's schema: columns a file predates (`schema_version` in
/// format 1) read as nulls.
pub(crate) fn archive_scan(
    files: &[Arc<tally_archive::ArchiveFile>],
    partitions: usize,
    projection: Option<&Vec<usize>>,
    limit: Option<usize>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let source = Arc::new(ParquetSource::new(events_schema()));
    let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); partitions.min(files.len())];
    // Spread files over the groups by size, largest first.
    let mut files = files.to_vec();
    files.sort_by_key(|f| std::cmp::Reverse(f.bytes));
    let mut sizes = vec![0u64; groups.len()];
    for f in files {
        let i = (0..sizes.len()).min_by_key(|&i| sizes[i]).unwrap_or(0);
        sizes[i] += f.bytes;
        groups[i].push(PartitionedFile::new(f.path.clone(), f.bytes));
    }
    let conf = FileScanConfigBuilder::new(ObjectStoreUrl::parse(ARCHIVE_URL)?, source)
        .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
        .with_projection_indices(projection.cloned())?
        .with_limit(limit)
        .build();
    Ok(DataSourceExec::from_data_source(conf))
}

/// The `[from, to)` range of timestamp column `column` the filters allow
/// (conservative: any filter not understood allows everything).
/// A literal of `ts`'s type (UTC milliseconds) at `v`.
pub(crate) fn ts_lit(v: Millis) -> Expr {
    datafusion::logical_expr::lit(datafusion::scalar::ScalarValue::TimestampMillisecond(
        Some(v),
        Some("UTC".into()),
    ))
}

pub(crate) fn time_bounds(filters: &[Expr], column: &str) -> (Millis, Millis) {
    let mut from = Millis::MIN;
    let mut to = Millis::MAX;
    for f in filters {
        collect_bounds(f, column, &mut from, &mut to);
    }
    (from, to)
}

fn collect_bounds(e: &Expr, column: &str, from: &mut Millis, to: &mut Millis) {
    match e {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            collect_bounds(&b.left, column, from, to);
            collect_bounds(&b.right, column, from, to);
        }
        Expr::BinaryExpr(b) => {
            let (col, lit, op) = match (&*b.left, &*b.right) {
                (Expr::Column(c), l) => (c, l, b.op),
                (l, Expr::Column(c)) => match b.op.swap() {
                    Some(op) => (c, l, op),
                    None => return,
                },
                _ => return,
            };
            if col.name != column {
                return;
            }
            let Some(v) = literal_ms(lit) else { return };
            match op {
                Operator::Gt | Operator::GtEq => *from = (*from).max(v),
                Operator::Lt => *to = (*to).min(v),
                Operator::LtEq => *to = (*to).min(v.saturating_add(1)),
                Operator::Eq => {
                    *from = (*from).max(v);
                    *to = (*to).min(v.saturating_add(1));
                }
                _ => {}
            }
        }
        Expr::Between(b) if !b.negated => {
            if let Expr::Column(c) = &*b.expr
                && c.name == column
                && let (Some(lo), Some(hi)) = (literal_ms(&b.low), literal_ms(&b.high))
            {
                *from = (*from).max(lo);
                *to = (*to).min(hi.saturating_add(1));
            }
        }
        _ => {}
    }
}

fn literal_ms(e: &Expr) -> Option<Millis> {
    let v = match e {
        Expr::Literal(v, _) => v,
        Expr::Cast(c) => return literal_ms(&c.expr),
        Expr::TryCast(c) => return literal_ms(&c.expr),
        _ => return None,
    };
    match v {
        ScalarValue::TimestampMillisecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1000),
        ScalarValue::TimestampMicrosecond(Some(v), _) => Some(v.div_euclid(1000)),
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(v.div_euclid(1_000_000)),
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => {
            tally_types::time::parse_rfc3339(s).ok()
        }
        _ => None,
    }
}

/// Schema of `rollups_1m` and `rollups_1h`: one nullable text column per
/// declared dimension of the tenant, after `event_type`.
pub(crate) fn rollups_schema(dims: &[String]) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("bucket", ts, false),
        Field::new("event_type", DataType::Utf8, false),
    ];
    for d in dims {
        fields.push(Field::new(d, DataType::Utf8, true));
    }
    fields.extend([
        Field::new("count", DataType::UInt64, false),
        Field::new("unique_users", DataType::UInt64, false),
        Field::new("unique_sessions", DataType::UInt64, false),
        Field::new("properties", DataType::Utf8, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// `rollups_1m` / `rollups_1h`: the rollup store of one tenant, one row per
/// (bucket, event type, combination of the tenant's dimension values),
/// a dimension's column null where its events had no value. `count` and
/// the property sums add up over rows; `unique_*` and percentiles are of
/// the row's own events. `properties` holds, per numeric property, a JSON
/// object with count, sum, min, max, avg, p50, p90, p95, p99.
#[derive(Debug)]
pub(crate) struct RollupsTable {
    pub(crate) store: Arc<RwLock<RollupStore>>,
    pub(crate) tenant: String,
    pub(crate) step: Millis,
    /// The tenant's declared dimensions (columns).
    pub(crate) dims: Vec<String>,
}

#[async_trait]
impl TableProvider for RollupsTable {
    fn schema(&self) -> SchemaRef {
        rollups_schema(&self.dims)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (from, to) = time_bounds(filters, "bucket");
        let from = if from == Millis::MIN {
            from
        } else {
            align_down(from, self.step)
        };
        let batch = self.build(from, to)?;
        let schema = rollups_schema(&self.dims);
        MemorySourceConfig::try_new_exec(&[vec![batch]], schema, projection.cloned())
            .map(|e| e as Arc<dyn ExecutionPlan>)
    }
}

/// A row of a rollup table: bucket, event type, value per dimension.
type RowKey = (Millis, String, Vec<Option<String>>);

impl RollupsTable {
    fn build(&self, from: Millis, to: Millis) -> Result<RecordBatch> {
        // Merge minutes into buckets of `step` (a no-op for 1m).
        let mut rows: std::collections::BTreeMap<RowKey, Agg> = Default::default();
        {
            let store = self.store.read();
            let mut add = |key: RowKey, agg: &Agg| match rows.get_mut(&key) {
                Some(a) => a.merge_flat(agg),
                None => {
                    let mut a = agg.clone();
                    a.by.clear();
                    rows.insert(key, a);
                }
            };
            for (m, b) in store.tenant_buckets(&self.tenant, from, to, self.step) {
                let bucket = align_down(m, self.step);
                for (t, agg) in &b.types {
                    if self.dims.is_empty() || agg.by.is_empty() {
                        add((bucket, t.to_string(), vec![None; self.dims.len()]), agg);
                        continue;
                    }
                    for (combo, sub) in &agg.by {
                        let vals = self
                            .dims
                            .iter()
                            .map(|d| tally_store::dims::value_of(combo, d).map(String::from))
                            .collect();
                        add((bucket, t.to_string(), vals), sub);
                    }
                }
            }
        }
        let n = rows.len();
        let mut tenant = StringBuilder::with_capacity(n, n * self.tenant.len());
        let mut bucket = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut et = StringBuilder::new();
        let mut dim_cols: Vec<StringBuilder> =
            self.dims.iter().map(|_| StringBuilder::new()).collect();
        let mut count = UInt64Builder::with_capacity(n);
        let mut users = UInt64Builder::with_capacity(n);
        let mut sessions = UInt64Builder::with_capacity(n);
        let mut props = StringBuilder::new();
        for ((b, t, vals), a) in &rows {
            tenant.append_value(&self.tenant);
            bucket.append_value(*b);
            et.append_value(t);
            for (col, v) in dim_cols.iter_mut().zip(vals) {
                col.append_option(v.as_deref());
            }
            count.append_value(a.count);
            users.append_value(a.users.estimate());
            sessions.append_value(a.sessions.estimate());
            let mut obj = serde_json::Map::new();
            for (name, p) in &a.props {
                let q = |x: f64| p.sketch.quantile(x).map(serde_json::Value::from);
                let sum = p.sum.value();
                obj.insert(
                    name.to_string(),
                    serde_json::json!({
                        "count": p.count,
                        "sum": sum,
                        "min": p.min,
                        "max": p.max,
                        "avg": if p.count > 0 { sum / p.count as f64 } else { 0.0 },
                        "p50": q(0.5), "p90": q(0.9), "p95": q(0.95), "p99": q(0.99),
                    }),
                );
            }
            props.append_value(serde_json::Value::Object(obj).to_string());
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(tenant.finish()),
            Arc::new(bucket.finish()),
            Arc::new(et.finish()),
        ];
        for mut c in dim_cols {
            cols.push(Arc::new(c.finish()));
        }
        cols.extend([
            Arc::new(count.finish()) as ArrayRef,
            Arc::new(users.finish()),
            Arc::new(sessions.finish()),
            Arc::new(props.finish()),
        ]);
        Ok(RecordBatch::try_new(rollups_schema(&self.dims), cols)?)
    }
}

/// Bucket steps of the rollup tables.
pub(crate) const ROLLUP_TABLES: [(&str, Millis); 2] =
    [("rollups_1m", MINUTE_MS), ("rollups_1h", HOUR_MS)];
