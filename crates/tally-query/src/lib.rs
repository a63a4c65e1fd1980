//! SQL and sessions over the raw store and the rollups, through Apache
//! DataFusion.
//!
//! Every query gets a fresh `SessionContext` holding exactly three tables,
//! all built for the query's tenant: `events` (hot Arrow batches + archive
//! Parquet files), `rollups_1m` and `rollups_1h`. DDL, DML and statements
//! (`CREATE EXTERNAL TABLE`, `COPY`, `SET`…) are refused and URL tables are
//! off, so a query has no way to name another tenant's data. Each query
//! runs under a memory pool of its own and a time limit.

pub mod format;
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
use tally_types::schema::{PropType, Schemas};

pub use sessions::{SessionRow, SessionsQuery};
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
    fn from_df(e: DataFusionError, limit: usize) -> QueryError {
        let root = e.find_root();
        match root {
            DataFusionError::ResourcesExhausted(detail) => QueryError::Memory {
                limit_mib: (limit >> 20) as u64,
                detail: detail.clone(),
            },
            DataFusionError::SQL(..)
            | DataFusionError::Plan(..)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(..) => QueryError::Sql(root.to_string()),
            _ => QueryError::Exec(e.to_string()),
        }
    }
}

/// `events` with a typed column per property the tenant declares (after
/// the fixed ones), read from `properties` by the `json_get_*` functions
/// `ctx` has registered:
/// a view over the tenant's scan, so filters on time still prune and the
/// scan stays scoped to the tenant.
fn typed_events(
    ctx: &SessionContext,
    base: Arc<dyn TableProvider>,
    declared: &BTreeMap<String, PropType>,
) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    let column = |name: &str| Expr::Column(Column::new_unqualified(name));
    let mut exprs: Vec<Expr> = base
        .schema()
        .fields()
        .iter()
        .map(|f| column(f.name()))
        .collect();
    for (name, t) in declared {
        let get = |f: &str| -> Result<Expr, DataFusionError> {
            Ok(ctx
                .udf(f)?
                .call(vec![column("properties"), lit(name.as_str())]))
        };
        let e = match t {
            PropType::String => get("json_get_str")?,
            PropType::Int => get("json_get_int")?,
            PropType::Float => get("json_get_float")?,
            // json_get_int reads true as 1 and false as 0.
            PropType::Bool => get("json_get_int")?.not_eq(lit(0i64)),
        };
        exprs.push(e.alias(name));
    }
    Ok(ctx.read_table(base)?.select(exprs)?.into_view())
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

pub struct QueryEngine {
    raw: Arc<RawShared>,
    store: Arc<RwLock<RollupStore>>,
    cfg: QueryConfig,
    version: VersionFn,
    cache: Mutex<HashMap<CacheKey, (u64, Arc<QueryResult>)>>,
}

impl QueryEngine {
    pub fn new(
        raw: Arc<RawShared>,
        store: Arc<RwLock<RollupStore>>,
        cfg: QueryConfig,
        version: VersionFn,
    ) -> QueryEngine {
        QueryEngine {
            raw,
            store,
            cfg,
            version,
            cache: Mutex::new(HashMap::new()),
        }
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
            .with_information_schema(false)
            .with_default_catalog_and_schema("tally", "public");
        let ctx = SessionContext::new_with_config_rt(config, runtime);
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
        let events = match self.cfg.schemas.get(tenant) {
            Some(declared) if !declared.is_empty() => {
                typed_events(&ctx, events, declared).map_err(df)?
            }
            _ => events,
        };
        ctx.register_table("events", events).map_err(df)?;
        for (name, step) in ROLLUP_TABLES {
            ctx.register_table(
                name,
                Arc::new(RollupsTable {
                    store: self.store.clone(),
                    tenant: tenant.to_string(),
                    step,
                }),
            )
            .map_err(df)?;
        }
        // Replaces DataFusion's date_trunc (same name): UTC hours and days
        // by integer floor instead of a time-zone lookup per row.
        ctx.register_udf(udf::UtcDateTrunc::udf());
        Ok(ctx)
    }

    /// Runs one read-only SQL statement for `tenant`.
    pub async fn sql(&self, tenant: &str, sql: &str) -> Result<Arc<QueryResult>, QueryError> {
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
            let mut hit = (**r).clone();
            hit.cached = true;
            return Ok(Arc::new(hit));
        }
        let started = Instant::now();
        let limit = self.cfg.memory_limit;
        let run = async {
            let ctx = self.context(tenant)?;
            let opts = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let df = ctx
                .sql_with_options(sql, opts)
                .await
                .map_err(|e| QueryError::from_df(e, limit))?;
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
        let (schema, batches, rows, truncated) =
            tokio::time::timeout(Duration::from_millis(self.cfg.timeout_ms), run)
                .await
                .map_err(|_| QueryError::Timeout(self.cfg.timeout_ms))??;
        let result = Arc::new(QueryResult {
            schema,
            batches,
            rows,
            truncated,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            cached: false,
        });
        if self.cfg.cache_entries > 0 && (self.version)() == version {
            let mut c = self.cache.lock();
            if c.len() >= self.cfg.cache_entries {
                c.clear();
            }
            c.insert(key, (version, result.clone()));
        }
        Ok(result)
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
        let mut out = HashMap::new();
        let bound = tally_types::time::format_rfc3339;
        for chunk in ids.chunks(1000) {
            let list: Vec<String> = chunk
                .iter()
                .map(|id| format!("'{}'", id.replace('\'', "''")))
                .collect();
            let sql = format!(
                "SELECT CAST(event_id AS VARCHAR) AS id, CAST(min(received_at) AS BIGINT) AS first \
                 FROM events WHERE ts >= '{}' AND ts <= '{}' AND event_id IN ({}) GROUP BY 1",
                bound(from),
                bound(to),
                list.join(",")
            );
            let r = self.sql(tenant, &sql).await?;
            for b in &r.batches {
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
