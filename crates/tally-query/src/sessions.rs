//! Sessions: a session is the events with one `session_id`; events
//! without one are sessionised per user with an inactivity gap (30 minutes
//! by default). `GET /api/v1/sessions`, the SQL table `sessions`, and the
//! metrics `sessions`, `avg_session_duration`, `median_session_duration`
//! and `bounce_rate` by session
//! start answer from the sessions the processor builds as events arrive
//! (`tally_store::SessionIndex`) when it holds the range and the gap asked;
//! otherwise (Kafka mode, another gap, a range older than what the index
//! holds) they are computed here from the raw events, the same way. A late
//! event that extends or joins sessions is in the next answer either way.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arrow::array::{Array, AsArray};
use arrow::datatypes::TimestampMillisecondType;
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use datafusion::physical_plan::execute_stream;
use futures::StreamExt;
pub use tally_store::session_changes;
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

/// One session (the store's type: its corrections go to the change log).
pub type SessionRow = tally_store::Session;

/// How many session answers came from the index and from the raw events.
#[derive(Debug, Default)]
pub(crate) struct SessionAnswers {
    pub(crate) index: AtomicU64,
    pub(crate) raw: AtomicU64,
}

/// A session of one event at `t`, to [`add`] it to.
fn open(id: String, derived: bool, user: Option<&str>, t: Millis) -> SessionRow {
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

/// Adds an event to a session (any order: first and last page follow the
/// times).
fn add(s: &mut SessionRow, e: &Ev) {
    if s.events == 0 || e.ts < s.start {
        s.start = e.ts;
        s.first_page = e.page.clone();
    }
    if s.events == 0 || e.ts >= s.end {
        s.end = e.ts;
        s.last_page = e.page.clone();
    }
    s.events += 1;
    if !s.event_types.contains(&e.event_type) {
        s.event_types.insert(e.event_type.clone());
    }
}

/// How far before and after a range events are read to find its sessions'
/// true starts and ends (a session that started before the range, by more
/// than the gap, with an explicit id, is taken to start at its first event
/// within the margin).
pub const SESSION_MARGIN_MS: Millis = 6 * 3_600_000;

/// One event as sessions see it.
#[derive(Clone)]
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
    let mut stream = scan(state, events, filter, false).await?;
    let mut b = Builder::default();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let cols = Cols::of(&batch);
        for i in 0..batch.num_rows() {
            let (user, sid, e) = cols.row(i);
            b.push(user, sid, e);
        }
    }
    Ok(b.finish(gap_ms))
}

/// The events passing `filter`, as the columns [`Cols`] reads (and the
/// event id last, with `event_id`).
async fn scan(
    state: &dyn Session,
    events: Arc<dyn TableProvider>,
    filter: datafusion::logical_expr::Expr,
    event_id: bool,
) -> Result<datafusion::physical_plan::SendableRecordBatchStream, DataFusionError> {
    let page = crate::udf::json_udfs()
        .into_iter()
        .find(|f| f.name() == "json_get_str")
        .ok_or_else(|| DataFusionError::Internal("json_get_str is missing".into()))?
        .call(vec![col("properties"), lit("page")]);
    let mut cols = vec![
        col("user_id"),
        col("session_id"),
        col("ts"),
        col("event_type"),
        page.alias("page"),
    ];
    if event_id {
        cols.push(col("event_id"));
    }
    let plan = LogicalPlanBuilder::scan(
        "events",
        datafusion::datasource::provider_as_source(events),
        None,
    )?
    .filter(filter)?
    .project(cols)?
    .build()?;
    let plan = state.create_physical_plan(&plan).await?;
    execute_stream(plan, state.task_ctx())
}

/// The columns of a scanned batch: user, session, time, type, page (and
/// event id when projected).
struct Cols<'a> {
    users: &'a arrow::array::StringArray,
    sids: &'a arrow::array::StringArray,
    tss: &'a arrow::array::PrimitiveArray<TimestampMillisecondType>,
    types: &'a arrow::array::StringArray,
    pages: &'a arrow::array::StringArray,
}

impl<'a> Cols<'a> {
    fn of(b: &'a arrow::record_batch::RecordBatch) -> Cols<'a> {
        Cols {
            users: b.column(0).as_string::<i32>(),
            sids: b.column(1).as_string::<i32>(),
            tss: b.column(2).as_primitive::<TimestampMillisecondType>(),
            types: b.column(3).as_string::<i32>(),
            pages: b.column(4).as_string::<i32>(),
        }
    }

    fn row(&self, i: usize) -> (Option<&'a str>, Option<&'a str>, Ev) {
        let e = Ev {
            ts: self.tss.value(i),
            event_type: self.types.value(i).to_string(),
            page: (!self.pages.is_null(i)).then(|| self.pages.value(i).to_string()),
        };
        let user = (!self.users.is_null(i)).then(|| self.users.value(i));
        let sid =
            (!self.sids.is_null(i) && !self.sids.value(i).is_empty()).then(|| self.sids.value(i));
        (user, sid, e)
    }
}

/// Sessions built from events given in any order: explicit ones by id,
/// anonymous ones per user, split by the gap when finished.
#[derive(Default)]
struct Builder {
    by_id: HashMap<String, SessionRow>,
    anon: HashMap<Option<String>, Vec<Ev>>,
}

impl Builder {
    fn push(&mut self, user: Option<&str>, sid: Option<&str>, e: Ev) {
        let Some(sid) = sid else {
            self.anon
                .entry(user.map(str::to_string))
                .or_default()
                .push(e);
            return;
        };
        let s = self
            .by_id
            .entry(sid.to_string())
            .or_insert_with(|| open(sid.to_string(), false, user, e.ts));
        add(s, &e);
        if s.user_id.is_none() {
            s.user_id = user.map(str::to_string);
        }
    }

    /// Every session, by start.
    fn finish(self, gap_ms: Millis) -> Vec<SessionRow> {
        let mut out: Vec<SessionRow> = self.by_id.into_values().collect();
        for (user, mut evs) in self.anon {
            evs.sort_by_key(|e| e.ts);
            out.extend(split(user.as_deref(), &evs, gap_ms));
        }
        out.sort_by(|a, b| {
            (a.start, &a.user_id, &a.session_id).cmp(&(b.start, &b.user_id, &b.session_id))
        });
        out
    }
}

/// The sessions of one explicit session id, or of one user's events
/// without a session id, in `[from, to)`: before a set of events was
/// applied (`exclude`, by event id) and now, and how many of those events
/// the scan saw (fewer than asked: not all visible yet).
pub(crate) async fn compute_pair(
    state: &dyn Session,
    events: Arc<dyn TableProvider>,
    key: &SessionKey,
    from: Millis,
    to: Millis,
    gap_ms: Millis,
    exclude: &std::collections::HashSet<String>,
) -> Result<SessionPair, DataFusionError> {
    let ts = crate::provider::ts_lit;
    let mut filter = col("ts").gt_eq(ts(from)).and(col("ts").lt(ts(to)));
    filter = match key {
        SessionKey::Session(sid) => filter.and(col("session_id").eq(lit(sid.as_str()))),
        SessionKey::User(u) => filter.and(col("user_id").eq(lit(u.as_str()))).and(
            col("session_id")
                .is_null()
                .or(col("session_id").eq(lit(""))),
        ),
    };
    let mut stream = scan(state, events, filter, true).await?;
    let (mut before, mut after) = (Builder::default(), Builder::default());
    let mut seen = std::collections::HashSet::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let cols = Cols::of(&batch);
        let ids = batch.column(5).as_string::<i32>();
        for i in 0..batch.num_rows() {
            let (user, sid, e) = cols.row(i);
            let id = ids.value(i);
            if exclude.contains(id) {
                seen.insert(id.to_string());
            } else {
                before.push(user, sid, e.clone());
            }
            after.push(user, sid, e);
        }
    }
    Ok(SessionPair {
        before: before.finish(gap_ms),
        after: after.finish(gap_ms),
        seen: seen.len(),
    })
}

/// Whose sessions a correction is looked for in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionKey {
    /// The events with this `session_id`.
    Session(String),
    /// This user's events without a `session_id`.
    User(String),
}

/// One key's sessions before and after a set of events, as
/// [`QueryEngine::session_pair`] answers.
#[derive(Debug, Clone)]
pub struct SessionPair {
    pub before: Vec<SessionRow>,
    pub after: Vec<SessionRow>,
    /// How many of the events asked about the scan saw.
    pub seen: usize,
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

    /// One key's sessions around `[from, to)` (with [`SESSION_MARGIN_MS`]
    /// on each side) before the events `exclude` were applied, and now:
    /// what a correction changed. On the SQL threads.
    pub async fn session_pair(
        self: &Arc<Self>,
        tenant: &str,
        key: SessionKey,
        from: Millis,
        to: Millis,
        gap_ms: Millis,
        exclude: std::collections::HashSet<String>,
    ) -> Result<SessionPair, QueryError> {
        let tenant = tenant.to_string();
        self.isolated(move |me| async move {
            let memory_limit = me.cfg.memory_limit;
            let df_err = |e| QueryError::from_df(e, memory_limit);
            let ctx = me.context(&tenant)?;
            let events = ctx.table_provider("events").await.map_err(df_err)?;
            let state = ctx.state();
            let run = async {
                compute_pair(
                    &state,
                    events,
                    &key,
                    from.saturating_sub(SESSION_MARGIN_MS),
                    to.saturating_add(SESSION_MARGIN_MS),
                    gap_ms,
                    &exclude,
                )
                .await
                .map_err(df_err)
            };
            me.timed(run).await
        })
        .await
    }

    /// Sessions with an event in `[start, end)`, whole: from the index when
    /// it holds the range, else from the raw events read with
    /// [`SESSION_MARGIN_MS`] around it.
    async fn sessions_here(&self, q: &SessionsQuery) -> Result<Vec<SessionRow>, QueryError> {
        let user = q.user_id.as_deref();
        let indexed = from_index(
            &self.store,
            &self.session_answers,
            &q.tenant,
            q.start,
            q.gap_ms,
            |ix| ix.sessions(&q.tenant, user, q.start, q.end, true, q.limit),
        );
        if let Some(rows) = indexed {
            return Ok(rows);
        }
        let mut out = self
            .raw_sessions(&q.tenant, user, q.start, q.end, q.gap_ms)
            .await?;
        out.retain(|s| s.start < q.end && s.end >= q.start);
        out.truncate(q.limit);
        Ok(out)
    }

    /// The sessions of the raw events in `[from, to)` and
    /// [`SESSION_MARGIN_MS`] around it (of one user if given), by start:
    /// what the index cannot answer.
    async fn raw_sessions(
        &self,
        tenant: &str,
        user: Option<&str>,
        from: Millis,
        to: Millis,
        gap_ms: Millis,
    ) -> Result<Vec<SessionRow>, QueryError> {
        self.session_answers.raw.fetch_add(1, Relaxed);
        let memory_limit = self.cfg.memory_limit;
        let df_err = |e| QueryError::from_df(e, memory_limit);
        let ctx = self.context(tenant)?;
        let events = ctx.table_provider("events").await.map_err(df_err)?;
        let state = ctx.state();
        let run = async {
            compute(
                &state,
                events,
                user,
                from.saturating_sub(SESSION_MARGIN_MS),
                to.saturating_add(SESSION_MARGIN_MS),
                gap_ms,
            )
            .await
            .map_err(df_err)
        };
        self.timed(run).await
    }

    /// A session metric (`sessions`, `avg_session_duration`,
    /// `median_session_duration`, `bounce_rate`) per bucket of `step` of
    /// the sessions' start in `[start, end)`, each point over the `window`
    /// ending at its bucket's end.
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
        let first = align_down(start, step);
        let from = first - (window - step);
        let median = metric == SessionMetric::MedianDuration;
        // The index sums buckets itself; the median needs each duration.
        let indexed = from_index(
            &self.store,
            &self.session_answers,
            tenant,
            from,
            gap_ms,
            |ix| {
                if median {
                    by_bucket(ix.stats(tenant, from, end), step, true)
                } else {
                    ix.buckets(tenant, from, end, step)
                        .into_iter()
                        .map(|(b, n, dur, single)| {
                            (
                                b,
                                Bucket {
                                    n,
                                    dur,
                                    single,
                                    durs: Vec::new(),
                                },
                            )
                        })
                        .collect()
                }
            },
        );
        let per = match indexed {
            Some(per) => per,
            None => {
                let rows = self.raw_sessions(tenant, None, from, end, gap_ms).await?;
                let rows = rows
                    .iter()
                    .filter(|r| r.start >= from && r.start < end)
                    .map(|r| (r.start, r.duration_ms(), r.events));
                by_bucket(rows, step, median)
            }
        };
        let mut out = Vec::new();
        let mut b = first;
        let mut durs: Vec<i64> = Vec::new();
        while b < end {
            let in_window = per.range(b - (window - step)..=b).map(|(_, x)| x);
            let point = if median {
                durs.clear();
                in_window.for_each(|x| durs.extend_from_slice(&x.durs));
                median_of(&mut durs)
            } else {
                let (n, dur, single) =
                    in_window.fold((0, 0, 0), |a, x| (a.0 + x.n, a.1 + x.dur, a.2 + x.single));
                (n > 0).then(|| match metric {
                    SessionMetric::Sessions => n as f64,
                    SessionMetric::AvgDuration => dur as f64 / n as f64,
                    _ => single as f64 / n as f64,
                })
            };
            if let Some(v) = point {
                out.push((b, v));
            }
            b += step;
        }
        Ok(out)
    }
}

/// `f` over the session index when it holds `tenant`'s range starting at
/// `from` for sessions split by `gap_ms` (counted as an index answer).
fn from_index<T>(
    store: &parking_lot::RwLock<tally_store::RollupStore>,
    answers: &SessionAnswers,
    tenant: &str,
    from: Millis,
    gap_ms: Millis,
    f: impl FnOnce(&tally_store::SessionIndex) -> T,
) -> Option<T> {
    let store = store.read();
    let ix = store.sessions();
    if !ix.covers(tenant, from, gap_ms) {
        return None;
    }
    answers.index.fetch_add(1, Relaxed);
    Some(f(ix))
}

/// The sessions starting in one bucket: how many, their summed duration,
/// how many had one event, and (for the median) each duration.
#[derive(Debug, Default)]
struct Bucket {
    n: u64,
    dur: i64,
    single: u64,
    durs: Vec<i64>,
}

/// `(start, duration, events)` of sessions summed per bucket of `step`.
fn by_bucket(
    rows: impl IntoIterator<Item = (Millis, Millis, u64)>,
    step: Millis,
    keep_durations: bool,
) -> std::collections::BTreeMap<Millis, Bucket> {
    let mut per: std::collections::BTreeMap<Millis, Bucket> = Default::default();
    for (start, dur, events) in rows {
        let b = per.entry(align_down(start, step)).or_default();
        b.n += 1;
        b.dur += dur;
        b.single += u64::from(events == 1);
        if keep_durations {
            b.durs.push(dur);
        }
    }
    per
}

/// The median of `v` (sorted in place), none when empty.
fn median_of(v: &mut [i64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0
    })
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
    /// The median of their durations, ms (the mean of the middle two for
    /// an even count).
    MedianDuration,
}

impl SessionMetric {
    pub fn parse(s: &str) -> Option<SessionMetric> {
        Some(match s {
            "sessions" => SessionMetric::Sessions,
            "avg_session_duration" => SessionMetric::AvgDuration,
            "bounce_rate" => SessionMetric::BounceRate,
            "median_session_duration" => SessionMetric::MedianDuration,
            _ => return None,
        })
    }
}

/// The SQL table `sessions`: one row per session of the tenant's events,
/// computed from them when scanned (a filter on `start` bounds what is
/// read, with [`SESSION_MARGIN_MS`] around it).
pub(crate) struct SessionsTable {
    pub(crate) events: Arc<dyn TableProvider>,
    /// The index built in the stream, answering when it holds the range.
    pub(crate) store: Arc<parking_lot::RwLock<tally_store::RollupStore>>,
    pub(crate) tenant: String,
    pub(crate) gap_ms: Millis,
    pub(crate) answers: Arc<SessionAnswers>,
}

impl std::fmt::Debug for SessionsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionsTable")
            .field("tenant", &self.tenant)
            .field("gap_ms", &self.gap_ms)
            .finish_non_exhaustive()
    }
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
        let indexed = from_index(
            &self.store,
            &self.answers,
            &self.tenant,
            from,
            self.gap_ms,
            |ix| ix.sessions(&self.tenant, None, from, to, false, usize::MAX),
        );
        let rows = match indexed {
            Some(rows) => rows,
            None => {
                self.answers.raw.fetch_add(1, Relaxed);
                let mut rows = compute(
                    state,
                    self.events.clone(),
                    None,
                    from.saturating_sub(SESSION_MARGIN_MS),
                    to.saturating_add(SESSION_MARGIN_MS),
                    self.gap_ms,
                )
                .await?;
                rows.retain(|r| r.start >= from && r.start < to);
                rows
            }
        };
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
        for r in &rows {
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
            Some(s) if e.ts - s.end < gap_ms => add(s, e),
            _ => {
                let mut s = open(format!("{}:{}", user.unwrap_or(""), e.ts), true, user, e.ts);
                add(&mut s, e);
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
    use tally_store::SessionCorrection;

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

    /// (id, old events, new events, replaced by) of one change.
    type Told = (String, Option<u64>, Option<u64>, Option<String>);

    fn told(c: &[SessionCorrection]) -> Vec<Told> {
        c.iter()
            .map(|c| {
                (
                    c.session().session_id.clone(),
                    c.before().map(|s| s.events),
                    c.after().map(|s| s.events),
                    c.replaced_by().map(str::to_string),
                )
            })
            .collect()
    }

    #[test]
    fn a_late_event_that_joins_two_closed_sessions_replaces_the_second() {
        let m = 60_000;
        let gap = 30 * m;
        let before = sessionise(Some("u"), &[0, 5 * m, 50 * m, 55 * m], gap);
        let after = sessionise(Some("u"), &[0, 5 * m, 27 * m, 50 * m, 55 * m], gap);
        let c = session_changes(&before, &after, 120 * m - gap);
        assert_eq!(
            told(&c),
            vec![
                ("u:0".into(), Some(2), Some(5), None),
                (format!("u:{}", 50 * m), Some(2), None, Some("u:0".into())),
            ]
        );
        // Earlier than the first: the session's id moves with its start.
        let after = sessionise(Some("u"), &[-10 * m, 0, 5 * m, 50 * m, 55 * m], gap);
        let c = session_changes(&before, &after, 120 * m - gap);
        assert_eq!(
            told(&c),
            vec![
                (format!("u:{}", -10 * m), None, Some(3), None),
                ("u:0".into(), Some(2), None, Some(format!("u:{}", -10 * m))),
            ]
        );
    }

    #[test]
    fn only_closed_sessions_are_corrected() {
        let m = 60_000;
        let gap = 30 * m;
        let before = sessionise(Some("u"), &[0, 5 * m, 50 * m, 55 * m], gap);
        let after = sessionise(Some("u"), &[0, 5 * m, 50 * m, 55 * m, 58 * m], gap);
        // The watermark at 80m: the session ending at 55m is still open.
        assert_eq!(session_changes(&before, &after, 80 * m - gap), vec![]);
        // At 90m it had closed.
        assert_eq!(
            told(&session_changes(&before, &after, 90 * m - gap)),
            vec![(format!("u:{}", 50 * m), Some(2), Some(3), None)]
        );
        // A session all of whose events came behind the watermark: new.
        let after = sessionise(Some("u"), &[0, 5 * m, 50 * m, 55 * m, 200 * m], gap);
        assert_eq!(
            told(&session_changes(&before, &after, 300 * m - gap)),
            vec![(format!("u:{}", 200 * m), None, Some(1), None)]
        );
        // Nothing changed: nothing told.
        assert_eq!(session_changes(&before, &before, i64::MAX), vec![]);
    }

    #[test]
    fn an_explicit_session_is_matched_by_id() {
        let m = 60_000;
        let mk = |events: u64, end: Millis| SessionRow {
            session_id: "s9".into(),
            derived: false,
            user_id: Some("u".into()),
            start: 10 * m,
            end,
            events,
            first_page: None,
            last_page: None,
            event_types: BTreeSet::new(),
        };
        let c = session_changes(&[mk(2, 12 * m)], &[mk(3, 20 * m)], 100 * m);
        assert_eq!(told(&c), vec![("s9".into(), Some(2), Some(3), None)]);
    }
}
