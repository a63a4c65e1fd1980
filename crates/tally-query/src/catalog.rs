//! What a tenant's data holds, for people and tools that do not know it
//! yet (`GET /api/v1/catalog`): its event types, each with the properties
//! seen, their JSON types and how many distinct values they take, and the
//! time range — read from the raw events of a window, at most
//! [`CatalogQuery::max_events`] of them.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::TimestampMillisecondType;
use datafusion::logical_expr::{LogicalPlanBuilder, col};
use datafusion::physical_plan::execute_stream;
use futures::StreamExt;
use serde_json::Value;
use tally_types::Millis;

use crate::{QueryEngine, QueryError};

/// Distinct values counted per property before it reads "at least".
pub const DISTINCT_CAP: usize = 1000;

#[derive(Debug, Clone)]
pub struct CatalogQuery {
    pub tenant: String,
    pub start: Millis,
    pub end: Millis,
    /// Events read at most (the rest of the window is not looked at).
    pub max_events: usize,
}

/// One property of one event type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PropertyInfo {
    /// JSON types seen: string, number, bool, object, array, null.
    pub types: BTreeSet<&'static str>,
    /// Events that carried it.
    pub present: u64,
    /// Distinct values (capped at [`DISTINCT_CAP`]).
    pub distinct: usize,
    pub distinct_capped: bool,
    /// Numeric range, when it took numbers.
    pub min: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Clone, Default)]
pub struct EventTypeInfo {
    pub events: u64,
    pub first: Millis,
    pub last: Millis,
    pub properties: BTreeMap<String, PropertyInfo>,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub event_types: BTreeMap<String, EventTypeInfo>,
    /// Events read.
    pub events: u64,
    /// False when `max_events` stopped the scan before the window's end.
    pub complete: bool,
}

#[derive(Default)]
struct Acc {
    info: PropertyInfo,
    seen: HashSet<u64>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "bool",
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::Null => "null",
    }
}

fn value_hash(v: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match v {
        Value::String(s) => s.hash(&mut h),
        other => other.to_string().hash(&mut h),
    }
    h.finish()
}

impl QueryEngine {
    /// The catalog of `q.tenant`'s events in `[start, end)`, read on the
    /// SQL threads (it parses every event's properties).
    pub async fn catalog(self: &Arc<Self>, q: CatalogQuery) -> Result<Catalog, QueryError> {
        self.isolated(move |me| async move { me.catalog_here(&q).await })
            .await
    }

    async fn catalog_here(&self, q: &CatalogQuery) -> Result<Catalog, QueryError> {
        let memory_limit = self.cfg.memory_limit;
        let df_err = |e| QueryError::from_df(e, memory_limit);
        let ctx = self.context(&q.tenant)?;
        let events = ctx.table_provider("events").await.map_err(df_err)?;
        let state = ctx.state();
        let ts = crate::provider::ts_lit;
        let run = async {
            let plan = LogicalPlanBuilder::scan(
                "events",
                datafusion::datasource::provider_as_source(events),
                None,
            )?
            .filter(col("ts").gt_eq(ts(q.start)).and(col("ts").lt(ts(q.end))))?
            .project(vec![col("event_type"), col("ts"), col("properties")])?
            .build()?;
            let plan = state.create_physical_plan(&plan).await?;
            let mut stream = execute_stream(plan, state.task_ctx())?;
            let mut types: BTreeMap<String, (EventTypeInfo, BTreeMap<String, Acc>)> =
                BTreeMap::new();
            let mut out = Catalog {
                complete: true,
                ..Catalog::default()
            };
            'scan: while let Some(b) = stream.next().await {
                let b = b?;
                let ets = b.column(0).as_string::<i32>();
                let tss = b.column(1).as_primitive::<TimestampMillisecondType>();
                let props = b.column(2).as_string::<i32>();
                for i in 0..b.num_rows() {
                    if out.events as usize >= q.max_events {
                        out.complete = false;
                        break 'scan;
                    }
                    out.events += 1;
                    let (t, et) = (tss.value(i), ets.value(i));
                    if !types.contains_key(et) {
                        let first = EventTypeInfo {
                            first: t,
                            last: t,
                            ..EventTypeInfo::default()
                        };
                        types.insert(et.to_string(), (first, BTreeMap::new()));
                    }
                    let Some((info, accs)) = types.get_mut(et) else {
                        continue;
                    };
                    info.events += 1;
                    info.first = info.first.min(t);
                    info.last = info.last.max(t);
                    if props.is_null(i) {
                        continue;
                    }
                    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(props.value(i))
                    else {
                        continue;
                    };
                    for (k, v) in map {
                        let a = accs.entry(k).or_default();
                        a.info.present += 1;
                        a.info.types.insert(kind(&v));
                        if let Some(x) = v.as_f64() {
                            a.info.min = Some(a.info.min.map_or(x, |m| m.min(x)));
                            a.info.max = Some(a.info.max.map_or(x, |m| m.max(x)));
                        }
                        let h = value_hash(&v);
                        if a.seen.len() < DISTINCT_CAP {
                            a.seen.insert(h);
                        } else if !a.seen.contains(&h) {
                            a.info.distinct_capped = true;
                        }
                    }
                }
            }
            for (name, (mut info, accs)) in types {
                for (k, mut a) in accs {
                    a.info.distinct = a.seen.len();
                    info.properties.insert(k, a.info);
                }
                out.event_types.insert(name, info);
            }
            Ok::<_, datafusion::error::DataFusionError>(out)
        };
        self.timed(async { run.await.map_err(df_err) }).await
    }
}
