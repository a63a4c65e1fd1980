//! Sessions: a session is the events with one `session_id`; events
//! without one are sessionised per user with an inactivity gap (30 minutes
//! by default). They are computed from the raw events when asked, so a
//! late event that extends or joins sessions is in the next answer:
//! `GET /api/v1/sessions`, the SQL table `sessions`, and the metrics
//! `sessions`, `avg_session_duration` and `bounce_rate` by session start.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::TimestampMillisecondType;
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use datafusion::physical_plan::execute_stream;
use futures::StreamExt;
use tally_types::Millis;
use tally_types::time::align_down;

use crate::{QueryEngine, QueryError};

/// What to look for.
#[derive(Debug, Clone)]
pub struct SessionsQuery {
    pub tenant: String,
    /// `None`: every user's sessions.
    pub user_id: Option<String>,
    pub start: Millis,
    pub end: Millis,
    pub gap_ms: Millis,
    pub limit: usize,
}

/// One session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub session_id: String,
    /// Whether the id was derived (events without a `session_id`).
    pub derived: bool,
    pub user_id: Option<String>,
    pub start: Millis,
    pub end: Millis,
    pub events: u64,
    /// The `page` property of the first and the last event, if they have one.
    pub first_page: Option<String>,
    pub last_page: Option<String>,
    /// Event types seen, sorted.
    pub event_types: BTreeSet<String>,
}

impl SessionRow {
    fn new(id: String, derived: bool, user: Option<&str>, t: Millis) -> SessionRow {
        SessionRow {
            session_id: id,
            derived,
            user_id: user.map(str::to_string),
            start: t,
            end: t,
            events: 0,
            first_page: None,
            last_page: None,
            event_types: BTreeSet::new(),
        }
    }

    /// Adds an event (any order: first and last page follow the times).
    fn add(&mut self, e: &Ev) {
        if self.events == 0 || e.ts < self.start {
            self.start = e.ts;
            self.first_page = e.page.clone();
        }
        if self.events == 0 || e.ts >= self.end {
            self.end = e.ts;
            self.last_page = e.page.clone();
        }
        self.events += 1;
        if !self.event_types.contains(&e.event_type) {
            self.event_types.insert(e.event_type.clone());
        }
    }

    pub fn duration_ms(&self) -> Millis {
        self.end - self.start
    }
}

/// How far before and after a range events are read to find its sessions'
/// true starts and ends (a session that started before the range, by more
/// than the gap, with an explicit id, is taken to start at its first event
/// within the margin).
pub const SESSION_MARGIN_MS: Millis = 6 * 3_600_000;

/// One event as sessions see it.
struct Ev {
    ts: Millis,
    event_type: String,
    page: Option<String>,
}

/// The sessions of the events of `events` in `[from, to)` (of one user if
/// given), by start.
pub(crate) async fn compute(
    state: &dyn Session,
    events: Arc<dyn TableProvider>,
    user: Option<&str>,
    from: Millis,
    to: Millis,
    gap_ms: Millis,
) -> Result<Vec<SessionRow>, DataFusionError> {
    let ts = crate::provider::ts_lit;
    // Unbounded ends (a table scan without a filter on `start`) read
    // everything rather than compare with extreme timestamps.
    let mut filter = lit(true);
    if from > Millis::MIN / 2 {
        filter = filter.and(col("ts").gt_eq(ts(from)));
    }
    if to < Millis::MAX / 2 {
        filter = filter.and(col("ts").lt(ts(to)));
    }
    if let Some(u) = user {
        filter = filter.and(col("user_id").eq(lit(u)));
    }
    let page = crate::udf::json_udfs()
        .into_iter()
        .find(|f| f.name() == "json_get_str")
        .ok_or_else(|| DataFusionError::Internal("json_get_str is missing".into()))?
        .call(vec![col("properties"), lit("page")]);
    let plan = LogicalPlanBuilder::scan(
        "events",
        datafusion::datasource::provider_as_source(events),
        None,
    )?
    .filter(filter)?
    .project(vec![
        col("user_id"),
        col("session_id"),
        col("ts"),
        col("event_type"),
        page.alias("page"),
    ])?
    .build()?;
    let plan = state.create_physical_plan(&plan).await?;
    let mut stream = execute_stream(plan, state.task_ctx())?;
    // Explicit sessions by id; anonymous ones by user (sorted later).
    let mut by_id: HashMap<String, SessionRow> = HashMap::new();
    let mut anon: HashMap<Option<String>, Vec<Ev>> = HashMap::new();
    while let Some(b) = stream.next().await {
        let b = b?;
        let users = b.column(0).as_string::<i32>();
        let sids = b.column(1).as_string::<i32>();
        let tss = b.column(2).as_primitive::<TimestampMillisecondType>();
        let types = b.column(3).as_string::<i32>();
        let pages = b.column(4).as_string::<i32>();
        for i in 0..b.num_rows() {
            let e = Ev {
                ts: tss.value(i),
                event_type: types.value(i).to_string(),
                page: (!pages.is_null(i)).then(|| pages.value(i).to_string()),
            };
            let user = (!users.is_null(i)).then(|| users.value(i));
            if sids.is_null(i) || sids.value(i).is_empty() {
                anon.entry(user.map(str::to_string)).or_default().push(e);
                continue;
            }
            let s = by_id
                .entry(sids.value(i).to_string())
                .or_insert_with(|| SessionRow::new(sids.value(i).to_string(), false, user, e.ts));
            s.add(&e);
            if s.user_id.is_none() {
                s.user_id = user.map(str::to_string);
            }
        }
    }
    let mut out: Vec<SessionRow> = by_id.into_values().collect();
    for (user, mut evs) in anon {
        evs.sort_by_key(|e| e.ts);
        out.extend(split(user.as_deref(), &evs, gap_ms));
    }
    out.sort_by(|a, b| {
        (a.start, &a.user_id, &a.session_id).cmp(&(b.start, &b.user_id, &b.session_id))
    });
    Ok(out)
}

impl QueryEngine {
    /// Sessions with events in `[start, end)`, ordered by start time,
    /// computed on the SQL threads (never the caller's: a heavy range
    /// must not hold the HTTP threads).
    pub async fn sessions(
        self: &Arc<Self>,
        q: &SessionsQuery,
    ) -> Result<Vec<SessionRow>, QueryError> {
        let q = q.clone();
        self.isolated(move |me| async move { me.sessions_here(&q).await })
            .await
    }

    /// A session metric (`sessions`, `avg_session_duration`,
    /// `bounce_rate`) per bucket of the sessions' start, on the SQL
    /// threads.
    pub async fn session_metric(
        self: &Arc<Self>,
        q: &SessionMetricQuery,
    ) -> Result<Vec<(Millis, f64)>, QueryError> {
        let q = q.clone();
        self.isolated(move |me| async move { me.session_metric_here(&q).await })
            .await
    }

    async fn sessions_here(&self, q: &SessionsQuery) -> Result<Vec<SessionRow>, QueryError> {
        let memory_limit = self.cfg.memory_limit;
        let df_err = |e| QueryError::from_df(e, memory_limit);
        let ctx = self.context(&q.tenant)?;
        let events = ctx.table_provider("events").await.map_err(df_err)?;
        let state = ctx.state();
        let run = async {
            let mut out = compute(
                &state,
                events,
                q.user_id.as_deref(),
                q.start,
                q.end,
                q.gap_ms,
            )
            .await
            .map_err(df_err)?;
            out.truncate(q.limit);
            Ok(out)
        };
        self.timed(run).await
    }

    /// A session metric (`sessions`, `avg_session_duration`, `bounce_rate`)
    /// per bucket of `step` of the sessions' start in `[start, end)`, each
    /// point over the `window` ending at its bucket's end. Sessions are
    /// read with [`SESSION_MARGIN_MS`] around the range.
    async fn session_metric_here(
        &self,
        q: &SessionMetricQuery,
    ) -> Result<Vec<(Millis, f64)>, QueryError> {
        let SessionMetricQuery {
            ref tenant,
            metric,
            start,
            end,
            step,
            window,
            gap_ms,
        } = *q;
        let memory_limit = self.cfg.memory_limit;
        let df_err = |e| QueryError::from_df(e, memory_limit);
        let ctx = self.context(tenant)?;
        let events = ctx.table_provider("events").await.map_err(df_err)?;
        let state = ctx.state();
        let first = align_down(start, step);
        let from = first - (window - step);
        let run = async {
            let rows = compute(
                &state,
                events,
                None,
                from.saturating_sub(SESSION_MARGIN_MS),
                end.saturating_add(SESSION_MARGIN_MS),
                gap_ms,
            )
            .await
            .map_err(df_err)?;
            // Per bucket: sessions, summed duration, single-event sessions.
            let mut per: std::collections::BTreeMap<Millis, (u64, i64, u64)> = Default::default();
            for r in rows.iter().filter(|r| r.start >= from && r.start < end) {
                let p = per.entry(align_down(r.start, step)).or_default();
                p.0 += 1;
                p.1 += r.duration_ms();
                p.2 += u64::from(r.events == 1);
            }
            let mut out = Vec::new();
            let mut b = first;
            while b < end {
                let (n, dur, bounces) = per
                    .range(b - (window - step)..=b)
                    .fold((0, 0, 0), |a, (_, x)| (a.0 + x.0, a.1 + x.1, a.2 + x.2));
                if n > 0 {
                    out.push((
                        b,
                        match metric {
                            SessionMetric::Sessions => n as f64,
                            SessionMetric::AvgDuration => dur as f64 / n as f64,
                            SessionMetric::BounceRate => bounces as f64 / n as f64,
                        },
                    ));
                }
                b += step;
            }
            Ok(out)
        };
        self.timed(run).await
    }
}

/// What [`QueryEngine::session_metric`] computes.
#[derive(Debug, Clone)]
pub struct SessionMetricQuery {
    pub tenant: String,
    pub metric: SessionMetric,
    pub start: Millis,
    pub end: Millis,
    /// Bucket width.
    pub step: Millis,
    /// A multiple of `step` (`step`: each point is its bucket).
    pub window: Millis,
    pub gap_ms: Millis,
}

/// A metric over sessions rather than rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMetric {
    /// Sessions that started in the bucket.
    Sessions,
    /// Their mean duration (last event − first event), ms.
    AvgDuration,
    /// Their share with a single event.
    BounceRate,
}

impl SessionMetric {
    pub fn parse(s: &str) -> Option<SessionMetric> {
        Some(match s {
            "sessions" => SessionMetric::Sessions,
            "avg_session_duration" => SessionMetric::AvgDuration,
            "bounce_rate" => SessionMetric::BounceRate,
            _ => return None,
        })
    }
}

/// The SQL table `sessions`: one row per session of the tenant's events,
/// computed from them when scanned (a filter on `start` bounds what is
/// read, with [`SESSION_MARGIN_MS`] around it).
#[derive(Debug)]
pub(crate) struct SessionsTable {
    pub(crate) events: Arc<dyn TableProvider>,
    pub(crate) gap_ms: Millis,
}

pub(crate) fn sessions_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("session_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("start", ts.clone(), false),
        Field::new("end", ts, false),
        Field::new("duration_ms", DataType::Int64, false),
        Field::new("events", DataType::UInt64, false),
        Field::new("first_page", DataType::Utf8, true),
        Field::new("last_page", DataType::Utf8, true),
        Field::new("event_types", DataType::Utf8, false),
    ]))
}

#[async_trait::async_trait]
impl TableProvider for SessionsTable {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        sessions_schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::logical_expr::Expr],
    ) -> datafusion::common::Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>>
    {
        Ok(vec![
            datafusion::logical_expr::TableProviderFilterPushDown::Inexact;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use arrow::array::{
            ArrayRef, Int64Builder, StringBuilder, TimestampMillisecondBuilder, UInt64Builder,
        };
        let (from, to) = crate::provider::time_bounds(filters, "start");
        let rows = compute(
            state,
            self.events.clone(),
            None,
            from.saturating_sub(SESSION_MARGIN_MS),
            to.saturating_add(SESSION_MARGIN_MS),
            self.gap_ms,
        )
        .await?;
        let rows: Vec<&SessionRow> = rows
            .iter()
            .filter(|r| r.start >= from && r.start < to)
            .collect();
        let n = rows.len();
        let mut id = StringBuilder::new();
        let mut user = StringBuilder::new();
        let mut start = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut end = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut dur = Int64Builder::with_capacity(n);
        let mut evs = UInt64Builder::with_capacity(n);
        let mut first = StringBuilder::new();
        let mut last = StringBuilder::new();
        let mut types = StringBuilder::new();
        for r in rows {
            id.append_value(&r.session_id);
            user.append_option(r.user_id.as_deref());
            start.append_value(r.start);
            end.append_value(r.end);
            dur.append_value(r.duration_ms());
            evs.append_value(r.events);
            first.append_option(r.first_page.as_deref());
            last.append_option(r.last_page.as_deref());
            types.append_value(
                r.event_types
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(user.finish()),
            Arc::new(start.finish()),
            Arc::new(end.finish()),
            Arc::new(dur.finish()),
            Arc::new(evs.finish()),
            Arc::new(first.finish()),
            Arc::new(last.finish()),
            Arc::new(types.finish()),
        ];
        let batch = arrow::record_batch::RecordBatch::try_new(sessions_schema(), cols)?;
        datafusion::datasource::memory::MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            sessions_schema(),
            projection.cloned(),
        )
        .map(|e| e as Arc<dyn datafusion::physical_plan::ExecutionPlan>)
    }
}

/// Splits one user's events, sorted by time, into sessions at gaps of at
/// least `gap_ms`. Derived ids are `<user>:<start ms>`, stable for the
/// same events.
fn split(user: Option<&str>, evs: &[Ev], gap_ms: Millis) -> Vec<SessionRow> {
    let mut out: Vec<SessionRow> = Vec::new();
    for e in evs {
        match out.last_mut() {
            Some(s) if e.ts - s.end < gap_ms => s.add(e),
            _ => {
                let mut s =
                    SessionRow::new(format!("{}:{}", user.unwrap_or(""), e.ts), true, user, e.ts);
                s.add(e);
                out.push(s);
            }
        }
    }
    out
}

/// [`split`] over bare times (tests).
#[cfg(test)]
pub(crate) fn sessionise(user: Option<&str>, times: &[Millis], gap_ms: Millis) -> Vec<SessionRow> {
    let evs: Vec<Ev> = times
        .iter()
        .map(|&ts| Ev {
            ts,
            event_type: "e".into(),
            page: None,
        })
        .collect();
    split(user, &evs, gap_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_sessions() {
        let m = 60_000;
        let s = sessionise(Some("u"), &[0, 10 * m, 39 * m, 69 * m, 70 * m], 30 * m);
        let spans: Vec<(Millis, Millis, u64)> =
            s.iter().map(|s| (s.start, s.end, s.events)).collect();
        // 39m → 69m is exactly the gap: a new session.
        assert_eq!(spans, vec![(0, 39 * m, 3), (69 * m, 70 * m, 2)]);
        assert_eq!(s[0].session_id, "u:0");
        assert!(sessionise(None, &[], 30 * m).is_empty());
    }
}
