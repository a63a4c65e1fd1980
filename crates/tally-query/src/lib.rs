//! SQL and sessions over the raw store and the rollups, through Apache
//! DataFusion.
//!
//! Every query gets a fresh `SessionContext` holding exactly three tables,
//! all built for the query's tenant: `events` (hot Arrow batches + archive
//! Parquet files), `rollups_1m` and `rollups_1h`. DDL, DML and statements
//! (`CREATE EXTERNAL TABLE`, `COPY`, `SET`…) are refused and URL tables are
//! off, so a query has no way to name another tenant's data. Each query
//! runs under a memory pool of its own and a time limit.

mod catalog;
pub mod format;
mod limits;
mod provider;
mod sessions;
mod udf;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::Column;
use datafusion::error::DataFusionError;
use datafusion::execution::FunctionRegistry;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use parking_lot::{Mutex, RwLock};
use tally_archive::RawShared;
use tally_store::RollupStore;
use tally_types::schema::{PropColumn, PropType, Schemas};

pub use catalog::{Catalog, CatalogQuery, DISTINCT_CAP, EventTypeInfo, PropertyInfo};
pub use sessions::{
    SESSION_MARGIN_MS, SessionKey, SessionMetric, SessionMetricQuery, SessionPair, SessionRow,
    SessionsQuery, session_changes,
};
pub use udf::json_udfs;

use provider::{ARCHIVE_URL, EventsTable, ROLLUP_TABLES, RollupsTable};

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL does not parse or plan (the planner's message).
    #[error("{0}")]
    Sql(String),
    #[error(
        "the query ran longer than the time limit ({0} ms); narrow the time range or raise query.timeout"
    )]
    Timeout(u64),
    #[error(
        "the query needed more memory than the limit ({limit_mib} MiB): {detail}; add filters or a LIMIT, or raise query.memory-limit"
    )]
    Memory { limit_mib: u64, detail: String },
    #[error("query failed: {0}")]
    Exec(String),
    #[error("{0}")]
    BadRequest(String),
}

impl QueryError {
    /// An error while planning the user's SQL (constant folding included):
    /// the SQL's fault, a 400, unless it is the memory limit.
    fn from_planner(e: DataFusionError, limit: usize) -> QueryError {
        match QueryError::from_df(e, limit) {
            QueryError::Exec(m) => QueryError::Sql(
                m.trim_start_matches("query failed: ")
                    .split("\nThis issue was likely caused by a bug")
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            other => other,
        }
    }

    fn from_df(e: DataFusionError, limit: usize) -> QueryError {
        let root = e.find_root();
        match root {
            DataFusionError::ResourcesExhausted(detail) => QueryError::Memory {
                limit_mib: (limit >> 20) as u64,
                detail: detail.clone(),
            },
            // The query's own fault (its SQL, or what it asks of the data:
            // a cast that fails, a division by zero, a regex too big).
            DataFusionError::SQL(..)
            | DataFusionError::Plan(..)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(..)
            | DataFusionError::Execution(..)
            | DataFusionError::ArrowError(..) => QueryError::Sql(root.to_string()),
            _ => QueryError::Exec(e.to_string()),
        }
    }
}

/// What a query may be: one read-only statement (no DDL, DML, `SET`).
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// `events` with a typed column per property the tenant declares (after
/// the fixed ones), read from `properties` by the `json_get_*` functions
/// `ctx` has registered:
/// a view over the tenant's scan, so filters on time still prune and the
/// scan stays scoped to the tenant.
fn typed_events(
    ctx: &SessionContext,
    base: Arc<dyn TableProvider>,
    declared: &BTreeMap<String, PropColumn>,
) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    let column = |name: &str| Expr::Column(Column::new_unqualified(name));
    let mut exprs: Vec<Expr> = base
        .schema()
        .fields()
        .iter()
        .map(|f| column(f.name()))
        .collect();
    for (name, PropColumn { ty: t, fill }) in declared {
        let read = |prop: &str| -> Result<Expr, DataFusionError> {
            let get = |f: &str| -> Result<Expr, DataFusionError> {
                Ok(ctx.udf(f)?.call(vec![column("properties"), lit(prop)]))
            };
            Ok(match t {
                PropType::String => get("json_get_str")?,
                PropType::Int => get("json_get_int")?,
                PropType::Float => get("json_get_float")?,
                // json_get_int reads true as 1 and false as 0.
                PropType::Bool => get("json_get_int")?.not_eq(lit(0i64)),
            })
        };
        let mut e = read(name)?;
        if !fill.aliases.is_empty() || !fill.defaults.is_empty() {
            // The property, else its older names, else the default of the
            // event's type.
            let mut parts = vec![e];
            for a in &fill.aliases {
                parts.push(read(a)?);
            }
            let mut case: Option<datafusion::logical_expr::conditional_expressions::CaseBuilder> =
                None;
            for (event_type, d) in &fill.defaults {
                let Some(v) = default_literal(*t, d) else {
                    continue;
                };
                let cond = column("event_type").eq(lit(event_type.as_str()));
                case = Some(match case {
                    None => datafusion::logical_expr::when(cond, v),
                    Some(mut c) => c.when(cond, v),
                });
            }
            if let Some(c) = case {
                parts.push(c.end()?);
            }
            e = if parts.len() == 1 {
                parts.remove(0)
            } else {
                datafusion::functions::core::expr_fn::coalesce(parts)
            };
        }
        exprs.push(e.alias(name));
    }
    Ok(ctx.read_table(base)?.select(exprs)?.into_view())
}

/// A schema default as a literal of the column's type (`None` when it is
/// not one: such a default fills nothing).
fn default_literal(t: PropType, d: &serde_json::Value) -> Option<Expr> {
    Some(match t {
        PropType::String => lit(d.as_str()?.to_string()),
        PropType::Int => lit(d.as_i64()?),
        PropType::Float => lit(d.as_f64()?),
        PropType::Bool => lit(d.as_bool()?),
    })
}

/// Limits and tuning.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    pub timeout_ms: u64,
    /// Per query, bytes.
    pub memory_limit: usize,
    /// Rows returned at most (the answer says `"truncated": true` past it).
    pub max_rows: usize,
    pub target_partitions: usize,
    /// Entries in the result cache (0: off).
    pub cache_entries: usize,
    /// Declared properties per tenant: typed columns of `events`.
    pub schemas: Arc<Schemas>,
    /// More typed columns per tenant, asked at each query (the schema
    /// registry's latest versions); `schemas` wins where both name one.
    pub columns: Option<ColumnsFn>,
    /// The inactivity gap of the SQL table `sessions` (and the default of
    /// the API's `gap`).
    pub session_gap_ms: i64,
}

/// A tenant's typed property columns, asked when a query is planned.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct ColumnsFn(pub Arc<dyn Fn(&str) -> BTreeMap<String, PropColumn> + Send + Sync>);

impl std::fmt::Debug for ColumnsFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ColumnsFn")
    }
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            timeout_ms: 30_000,
            memory_limit: 1 << 30,
            max_rows: 100_000,
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cache_entries: 256,
            schemas: Arc::default(),
            columns: None,
            session_gap_ms: tally_store::DEFAULT_SESSION_GAP_MS,
        }
    }
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    pub truncated: bool,
    pub elapsed_ms: f64,
    pub cached: bool,
}

/// Changes whenever data a query could read changes (applied records,
/// seals); cached results are only served while it stands still.
pub type VersionFn = Arc<dyn Fn() -> u64 + Send + Sync>;

/// (tenant, SQL text).
type CacheKey = (String, String);

/// Bytes of answers the SQL result cache holds at most.
const CACHE_BYTES: usize = 64 << 20;

struct Cached {
    result: Arc<QueryResult>,
    bytes: usize,
}

pub struct QueryEngine {
    raw: Arc<RawShared>,
    store: Arc<RwLock<RollupStore>>,
    cfg: QueryConfig,
    version: VersionFn,
    cache: Mutex<HashMap<CacheKey, (u64, Cached)>>,
    /// SQL runs here, on threads of its own (`tally-sql`), so a heavy query
    /// never holds up the HTTP workers that answer health checks, metrics
    /// and ingest; a panic in a query ends that query only.
    runtime: Option<tokio::runtime::Runtime>,
    /// Session answers given from the stream's index and from the raw events.
    session_answers: Arc<sessions::SessionAnswers>,
}

impl Drop for QueryEngine {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Aborts a spawned query when the request waiting for it goes away.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl QueryEngine {
    pub fn new(
        raw: Arc<RawShared>,
        store: Arc<RwLock<RollupStore>>,
        cfg: QueryConfig,
        version: VersionFn,
    ) -> QueryEngine {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.target_partitions.max(1))
            .thread_name("tally-sql")
            .enable_all()
            .build()
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start the SQL threads; queries run on the HTTP workers");
            })
            .ok();
        QueryEngine {
            raw,
            store,
            cfg,
            version,
            cache: Mutex::new(HashMap::new()),
            runtime,
            session_answers: Arc::default(),
        }
    }

    /// Session answers given so far from the index built in the stream and
    /// from the raw events.
    pub fn session_answers(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.session_answers.index.load(Relaxed),
            self.session_answers.raw.load(Relaxed),
        )
    }

    pub fn config(&self) -> &QueryConfig {
        &self.cfg
    }

    /// A context that sees only `tenant`'s tables.
    pub(crate) fn context(&self, tenant: &str) -> Result<SessionContext, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(self.cfg.memory_limit)))
            .build_arc()
            .map_err(|e| QueryError::Exec(e.to_string()))?;
        let config = SessionConfig::new()
            .with_target_partitions(self.cfg.target_partitions.max(1))
            // Lists only what this context registered: the tenant's own
            // tables (what SQL tools browse, and `SHOW TABLES`).
            .with_information_schema(true)
            .with_default_catalog_and_schema("tally", "public");
        // The JSON operators' planner goes first: `properties.country`
        // must reach it before the default one plans a struct access.
        let state = datafusion::execution::SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();
        let mut planners: Vec<Arc<dyn datafusion::logical_expr::planner::ExprPlanner>> =
            vec![Arc::new(udf::JsonOperators)];
        planners.extend(state.expr_planners().iter().cloned());
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(state)
            .with_expr_planners(planners)
            .build();
        let ctx = SessionContext::new_with_state(state);
        let url = url::Url::parse(ARCHIVE_URL).map_err(|e| QueryError::Exec(e.to_string()))?;
        ctx.register_object_store(&url, self.raw.archive.store());
        let df = |e: DataFusionError| QueryError::Exec(e.to_string());
        for f in json_udfs() {
            ctx.register_udf(f);
        }
        let events: Arc<dyn TableProvider> = Arc::new(EventsTable {
            raw: self.raw.clone(),
            tenant: tenant.to_string(),
        });
        let mut declared = self
            .cfg
            .columns
            .as_ref()
            .map_or_else(BTreeMap::new, |f| (f.0)(tenant));
        if let Some(toml) = self.cfg.schemas.get(tenant) {
            declared.extend(toml.iter().map(|(k, v)| (k.clone(), PropColumn::from(*v))));
        }
        // A property named like a fixed column stays in `properties`.
        declared.retain(|k, _| events.schema().field_with_name(k).is_err());
        let events = if declared.is_empty() {
            events
        } else {
            typed_events(&ctx, events, &declared).map_err(df)?
        };
        ctx.register_table("events", events.clone()).map_err(df)?;
        ctx.register_table(
            "sessions",
            Arc::new(sessions::SessionsTable {
                events,
                store: self.store.clone(),
                tenant: tenant.to_string(),
                gap_ms: self.cfg.session_gap_ms,
                answers: self.session_answers.clone(),
            }),
        )
        .map_err(df)?;
        let dims: Vec<String> = self
            .store
            .read()
            .dimensions()
            .of(tenant)
            .iter()
            .map(|d| d.to_string())
            .collect();
        for (name, step) in ROLLUP_TABLES {
            ctx.register_table(
                name,
                Arc::new(RollupsTable {
                    store: self.store.clone(),
                    tenant: tenant.to_string(),
                    step,
                    dims: dims.clone(),
                }),
            )
            .map_err(df)?;
        }
        // Replaces DataFusion's date_trunc (same name): UTC hours and days
        // by integer floor instead of a time-zone lookup per row.
        ctx.register_udf(udf::UtcDateTrunc::udf());
        limits::cap_functions(&ctx, (self.cfg.memory_limit / 2).max(1 << 20));
        Ok(ctx)
    }

    /// Runs one read-only SQL statement for `tenant`, on the SQL threads.
    pub async fn sql(
        self: &Arc<Self>,
        tenant: &str,
        sql: &str,
    ) -> Result<Arc<QueryResult>, QueryError> {
        let (tenant, sql) = (tenant.to_string(), sql.to_string());
        self.isolated(move |me| async move { me.sql_here(&tenant, &sql).await })
            .await
    }

    /// Runs `f` on the SQL threads (here when there are none): heavy work
    /// never delays the caller's runtime, a panic fails this call only,
    /// and dropping the call aborts the work.
    pub(crate) async fn isolated<T, F, Fut>(self: &Arc<Self>, f: F) -> Result<T, QueryError>
    where
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: std::future::Future<Output = Result<T, QueryError>> + Send + 'static,
        T: Send + 'static,
    {
        let Some(rt) = &self.runtime else {
            return f(self.clone()).await;
        };
        let mut task = AbortOnDrop(rt.spawn(f(self.clone())));
        match (&mut task.0).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                let what = e.into_panic();
                let msg = what
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| what.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                tracing::error!(panic = msg, "a SQL query panicked; the server goes on");
                Err(QueryError::Exec(format!(
                    "the query failed inside the engine: {msg}"
                )))
            }
            Err(_) => Err(QueryError::Exec("the query was cancelled".into())),
        }
    }

    /// `fut` under `query.timeout`.
    pub(crate) async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, QueryError>>,
    ) -> Result<T, QueryError> {
        tokio::time::timeout(Duration::from_millis(self.cfg.timeout_ms), fut)
            .await
            .map_err(|_| QueryError::Timeout(self.cfg.timeout_ms))?
    }

    /// Runs one read-only SQL statement for `tenant` on the calling runtime.
    async fn sql_here(&self, tenant: &str, sql: &str) -> Result<Arc<QueryResult>, QueryError> {
        if sql.trim().is_empty() {
            return Err(QueryError::BadRequest(
                "sql is empty: send {\"sql\": \"SELECT …\"}".into(),
            ));
        }
        let key = (tenant.to_string(), sql.to_string());
        let version = (self.version)();
        if self.cfg.cache_entries > 0
            && let Some((v, r)) = self.cache.lock().get(&key)
            && *v == version
        {
            let mut hit = (*r.result).clone();
            hit.cached = true;
            return Ok(Arc::new(hit));
        }
        let started = Instant::now();
        let limit = self.cfg.memory_limit;
        let run = async {
            let ctx = self.context(tenant)?;
            let df = ctx
                .sql_with_options(sql, read_only())
                .await
                .map_err(|e| QueryError::from_planner(e, limit))?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let mut stream = df
                .execute_stream()
                .await
                .map_err(|e| QueryError::from_df(e, limit))?;
            let mut batches = Vec::new();
            let mut rows = 0usize;
            let mut truncated = false;
            use futures::StreamExt;
            while let Some(b) = stream.next().await {
                let b = b.map_err(|e| QueryError::from_df(e, limit))?;
                let room = self.cfg.max_rows - rows;
                if b.num_rows() > room {
                    batches.push(b.slice(0, room));
                    rows += room;
                    truncated = true;
                    break;
                }
                rows += b.num_rows();
                batches.push(b);
            }
            Ok::<_, QueryError>((schema, batches, rows, truncated))
        };
        let (schema, batches, rows, truncated) = self.timed(run).await?;
        let result = Arc::new(QueryResult {
            schema,
            batches,
            rows,
            truncated,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            cached: false,
        });
        let bytes: usize = result
            .batches
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum();
        // Only answers that fit a slice of the budget are kept; entries of
        // an older data version can never be served again and go first.
        if self.cfg.cache_entries > 0 && bytes <= CACHE_BYTES / 8 && (self.version)() == version {
            let mut c = self.cache.lock();
            c.retain(|_, (v, _)| *v == version);
            let held: usize = c.values().map(|(_, r)| r.bytes).sum();
            if c.len() >= self.cfg.cache_entries || held + bytes > CACHE_BYTES {
                c.clear();
            }
            c.insert(
                key,
                (
                    version,
                    Cached {
                        result: result.clone(),
                        bytes,
                    },
                ),
            );
        }
        Ok(result)
    }

    /// Plans one read-only statement without running it: the columns of
    /// its answer and the types its `$n` parameters take where the
    /// planner can tell (what a Postgres client's Describe asks).
    pub async fn describe(
        &self,
        tenant: &str,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<Option<arrow::datatypes::DataType>>), QueryError> {
        let limit = self.cfg.memory_limit;
        let ctx = self.context(tenant)?;
        let run = async {
            let df = ctx
                .sql_with_options(sql, read_only())
                .await
                .map_err(|e| QueryError::from_planner(e, limit))?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let types = df
                .logical_plan()
                .get_parameter_types()
                .map_err(|e| QueryError::from_planner(e, limit))?;
            // `$1`, `$2`, … in order; a gap reads as unknown.
            let n = types
                .keys()
                .filter_map(|k| k.strip_prefix('$')?.parse::<usize>().ok())
                .max()
                .unwrap_or(0);
            let params = (1..=n)
                .map(|i| types.get(&format!("${i}")).cloned().flatten())
                .collect();
            Ok((schema, params))
        };
        self.timed(run).await
    }

    /// When each of `ids` was first received, from the tenant's kept raw
    /// events with event time in `[from, to]`: event id → earliest
    /// `received_at` (ids the raw store does not hold are absent).
    pub async fn first_received(
        &self,
        tenant: &str,
        ids: &[&str],
        from: tally_types::Millis,
        to: tally_types::Millis,
    ) -> Result<HashMap<String, tally_types::Millis>, QueryError> {
        use arrow::array::{Array, Int64Array, StringArray};
        use arrow::compute::cast;
        use arrow::datatypes::DataType;
        use datafusion::functions_aggregate::expr_fn::min;
        use datafusion::logical_expr::{cast as cast_expr, col};
        let mut out = HashMap::new();
        let limit = self.cfg.memory_limit;
        let df_err = |e| QueryError::from_df(e, limit);
        let ts = provider::ts_lit;
        for chunk in ids.chunks(1000) {
            // A filter built as expressions: the ids are values, never SQL text.
            let ctx = self.context(tenant)?;
            let run = async {
                let df = async {
                    ctx.table("events")
                        .await?
                        .filter(
                            col("ts").gt_eq(ts(from)).and(col("ts").lt_eq(ts(to))).and(
                                col("event_id")
                                    .in_list(chunk.iter().map(|id| lit(*id)).collect(), false),
                            ),
                        )?
                        .aggregate(
                            vec![col("event_id")],
                            vec![min(col("received_at")).alias("first")],
                        )?
                        .select(vec![
                            cast_expr(col("event_id"), DataType::Utf8).alias("id"),
                            cast_expr(col("first"), DataType::Int64).alias("first"),
                        ])?
                        .collect()
                        .await
                };
                df.await.map_err(df_err)
            };
            let batches = self.timed(run).await?;
            for b in &batches {
                let ids = cast(b.column(0), &DataType::Utf8)
                    .map_err(|e| QueryError::Exec(e.to_string()))?;
                let first = cast(b.column(1), &DataType::Int64)
                    .map_err(|e| QueryError::Exec(e.to_string()))?;
                let (Some(ids), Some(first)) = (
                    ids.as_any().downcast_ref::<StringArray>(),
                    first.as_any().downcast_ref::<Int64Array>(),
                ) else {
                    continue;
                };
                for i in 0..b.num_rows() {
                    if !ids.is_null(i) && !first.is_null(i) {
                        out.insert(ids.value(i).to_string(), first.value(i));
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
