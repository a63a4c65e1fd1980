//! HTTP API (README, *Using it*). Errors map to status codes in one place:
//! [`ApiError`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value as Json, json};
use tally_ingest::{BodyError, Format, Parser, Tenancy};
use tally_store::{Granularity, Metric, MetricQuery, Value};
use tally_stream::{DlqBody, DlqEntry, DlqKind};
use tally_types::time::{HOUR_MS, format_rfc3339, parse_time_param};
use tokio::sync::oneshot;

use crate::auth::Caller;
use crate::pipeline::{Shared, WriteReq, entry_to_json, prepare_write};
use crate::telemetry::Snapshot;

/// State of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub tx: tokio::sync::mpsc::Sender<WriteReq>,
    pub partitions: u32,
    pub max_body: usize,
    pub max_inflight: usize,
    /// Metrics API answers (JSON bodies), valid while the data under them stands.
    pub metrics_cache: Arc<parking_lot::Mutex<tally_store::MetricsCache<Bytes>>>,
    /// SQL and sessions (None when the raw store is off).
    pub query: Option<Arc<tally_query::QueryEngine>>,
    /// API keys (none: open mode).
    pub keys: Arc<crate::auth::Keys>,
    /// Per-tenant ingest quotas.
    pub quotas: Arc<crate::quota::Quotas>,
    /// Declared properties per tenant, checked at ingest.
    pub schemas: Arc<tally_types::schema::Schemas>,
    /// Redaction of personal data at ingest (`[privacy.<tenant>]`).
    pub privacy: Option<Arc<tally_ingest::Privacy>>,
    /// Event types refused first under overload.
    pub low_priority: Arc<Vec<String>>,
    /// Deepest nesting of an event at ingest.
    pub max_json_depth: usize,
    /// Largest event at ingest (Kafka mode: one record of the events topic).
    pub max_event_bytes: Option<usize>,
    /// The data directory (`/readyz` probes it after a failed write).
    pub data_dir: std::path::PathBuf,
    /// Requests the log writer queue holds.
    pub queue_depth: usize,
}

/// Every error the API returns, with its status.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    TooLarge(String),
    /// Overload: retry after this many seconds.
    Unavailable(String, u32),
    /// Over a quota (429): retry after this many seconds.
    TooMany(String, u32),
    NotFound(String),
    /// Any other status.
    Status(StatusCode, String),
    /// 400 naming the offending field (`{"error", "field"}`).
    Field(String, String),
}

/// Directories whose absolute paths no answer may show (each server's data
/// dir, as configured and canonical): storage, archive and query errors
/// name files, and a client has no business learning the server's layout.
static HIDDEN_DIRS: parking_lot::RwLock<Vec<String>> = parking_lot::RwLock::new(Vec::new());

/// Hides `dir` (and everything under it) from every answer's messages.
pub(crate) fn hide_dir(dir: &std::path::Path) {
    let mut forms = vec![dir.display().to_string()];
    if let Ok(abs) = std::path::absolute(dir) {
        forms.push(abs.display().to_string());
    }
    if let Ok(canon) = dir.canonicalize() {
        forms.push(canon.display().to_string());
    }
    let mut hidden = HIDDEN_DIRS.write();
    for f in forms {
        let f = f.trim_end_matches('/').to_string();
        // A relative or root dir would hide ordinary words.
        if f.starts_with('/') && f.len() > 1 && !hidden.contains(&f) {
            hidden.push(f);
        }
    }
    // Longest first, so a dir inside another is replaced whole.
    hidden.sort_by_key(|d| std::cmp::Reverse(d.len()));
}

/// `msg` with every hidden directory replaced by `<data-dir>`.
pub(crate) fn hide_paths(msg: String) -> String {
    let hidden = HIDDEN_DIRS.read();
    if !hidden.iter().any(|d| msg.contains(d.as_str())) {
        return msg;
    }
    let mut out = msg;
    for d in hidden.iter() {
        out = out.replace(d.as_str(), "<data-dir>");
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg, retry) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m, None),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m, None),
            ApiError::Unavailable(m, r) => (StatusCode::SERVICE_UNAVAILABLE, m, Some(r)),
            ApiError::TooMany(m, r) => (StatusCode::TOO_MANY_REQUESTS, m, Some(r)),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m, None),
            ApiError::Status(c, m) => (c, m, None),
            ApiError::Field(field, m) => {
                return (
                    StatusCode::BAD_REQUEST,
                    axum::Json(json!({ "error": hide_paths(m), "field": field })),
                )
                    .into_response();
            }
        };
        let mut resp = (status, axum::Json(json!({ "error": hide_paths(msg) }))).into_response();
        if let Some(r) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(r));
        }
        resp
    }
}

pub fn router(state: AppState) -> Router {
    use crate::auth::{Access, Routes, Scope};
    use crate::http_alerts as alerts;
    let read = Access::Needs(Scope::Read);
    let admin = Access::Needs(Scope::Admin);
    let routes = Routes::new(state.keys.clone());
    crate::registry::routes(routes)
        .add("/", Access::Public, get(index))
        .add("/healthz", Access::Public, get(|| async { "ok\n" }))
        .add("/readyz", Access::Public, get(readyz))
        .add("/metrics", Access::Metrics, get(prometheus))
        .add("/api/v1/events", Access::Needs(Scope::Ingest), post(ingest))
        .add("/api/v1/metrics", read, get(metrics))
        .add("/api/v1/dlq", read, get(dlq))
        .add("/api/v1/dlq/replay", admin, post(dlq_replay))
        .add("/api/v1/status", admin, get(status))
        .add("/api/v1/query", read, post(sql_query))
        .add("/api/v1/sessions", read, get(sessions))
        .add("/api/v1/catalog", read, get(catalog))
        .add("/api/v1/changes", read, get(changes))
        .add(
            "/api/v1/openapi.json",
            Access::Public,
            get(|| async { axum::Json(crate::openapi::document()) }),
        )
        .add(
            "/v1/{kind}",
            Access::Needs(Scope::Ingest),
            post(crate::segment::call),
        )
        // PostHog's key is in the body: the handler checks it.
        .add_all(
            &crate::posthog::PATHS,
            Access::Public,
            post(crate::posthog::capture),
        )
        .add("/api/v1/alerts", read, get(alerts::list))
        .add("/api/v1/alerts", admin, post(alerts::create))
        .add("/api/v1/live", read, get(crate::live::live))
        .add("/api/v1/alerts/history", read, get(alerts::history))
        .add("/api/v1/alerts/{id}", read, get(alerts::get_one))
        .add(
            "/api/v1/alerts/{id}",
            admin,
            axum::routing::delete(alerts::delete),
        )
        .add(
            "/api/v1/alerts/{id}/silence",
            admin,
            post(alerts::silence).delete(alerts::unsilence),
        )
        .finish()
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    if !s.shared.ready.load(Relaxed) {
        return ApiError::Unavailable("not ready: recovering or shutting down".into(), 1)
            .into_response();
    }
    if s.shared.storage_failing.load(Relaxed) {
        // Nothing may come to retry a write: probe the disk here instead.
        let dir = s.data_dir.clone();
        let probe = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let path = dir.join(".readyz-probe");
            let r = std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(&vec![0u8; 1 << 20]).and_then(|_| f.sync_all()));
            let _ = std::fs::remove_file(&path);
            r.is_ok()
        })
        .await
        .unwrap_or(false);
        if !probe {
            return ApiError::Unavailable(
                "not ready: the data disk is full or failing; ingest resumes when a write succeeds"
                    .into(),
                5,
            )
            .into_response();
        }
        s.shared.storage_failing.store(false, Relaxed);
    }
    (StatusCode::OK, "ready\n").into_response()
}

pub(crate) fn snapshot(s: &AppState) -> Snapshot {
    let v = s.shared.processor.lock().clone();
    // One read guard: a second read of the same lock while a writer waits
    // would wait behind that writer forever.
    let (rollup_buckets, folds, session_changes) = {
        let store = s.shared.store.read();
        (
            store.bucket_count(),
            store.folds(),
            store.session_changes_told(),
        )
    };
    let dlq = s.shared.dlq.lock();
    Snapshot {
        now_ms: s.shared.clock.now_ms(),
        watermark_ms: v.watermark,
        counted: v.totals.counted,
        duplicates: v.totals.duplicates,
        late: v.totals.late,
        corrections: v.totals.corrections,
        replayed: v.totals.replayed,
        dlq_malformed_total: dlq.total(DlqKind::Malformed),
        dlq_late_total: dlq.total(DlqKind::Late),
        dlq_malformed_held: dlq.held(DlqKind::Malformed),
        dlq_late_held: dlq.held(DlqKind::Late),
        dlq_late_full_tenants: dlq.late_full_tenants().len(),
        rollup_buckets,
        folds,
        session_changes,
        dedupe_entries: v.dedupe_len,
        log_bytes: s.shared.log_bytes.load(Relaxed).max(0) as u64,
        ready: s.shared.ready.load(Relaxed),
        committed_lsn: s.shared.committed_lsn.load(Relaxed),
        applied_lsn: v.totals.applied_lsn(),
    }
}

async fn prometheus(State(s): State<AppState>) -> Response {
    let mut text = s.shared.telemetry.render(&snapshot(&s));
    if let Some(raw) = &s.shared.raw {
        crate::telemetry::render_raw(&mut text, raw);
    }
    crate::telemetry::render_alerts(&mut text, &s.shared.alerts.lock());
    crate::telemetry::render_sessions(
        &mut text,
        s.shared.store.read().sessions(),
        s.query.as_ref().map(|q| q.session_answers()),
    );
    if let Some(k) = &s.shared.kafka {
        crate::telemetry::render_kafka(&mut text, k);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// What the server takes now, event by event: under overload not the
/// low-priority types (`[shedding]`); while a tenant's late DLQ is full, not
/// its events that may be too late to count (they would have nowhere to
/// wait). None when nothing is refused (the common case: no closure).
fn admission(s: &AppState, overloaded: bool, backfill: bool) -> Option<tally_ingest::Admission> {
    let shed: Vec<String> = if overloaded {
        s.low_priority.to_vec()
    } else {
        Vec::new()
    };
    let (full, capacity) = {
        let dlq = s.shared.dlq.lock();
        (dlq.late_full_tenants(), dlq.capacity())
    };
    if shed.is_empty() && full.is_empty() {
        return None;
    }
    let d = s.shared.durations;
    let max_ts: std::collections::HashMap<String, i64> = {
        let m = s.shared.tenant_max_ts.lock();
        full.iter()
            .filter_map(|t| {
                let key = if backfill {
                    format!("{t}\u{1}backfill")
                } else {
                    t.clone()
                };
                Some((t.clone(), *m.get(&key)?))
            })
            .collect()
    };
    let tel = s.shared.telemetry.clone();
    Some(Arc::new(move |tenant: &str, event_type: &str, ts: i64| {
        if shed.iter().any(|t| t == event_type) {
            tel.events_shed.fetch_add(1, Relaxed);
            return Some(format!(
                "shed: the server is overloaded and {event_type:?} is low priority (shedding.low-priority); retry later"
            ));
        }
        let end = tally_types::time::align_down(ts, tally_types::time::MINUTE_MS)
            + tally_types::time::MINUTE_MS;
        let maybe_late = max_ts
            .get(tenant)
            .is_some_and(|&hi| end + d.allowed_lateness_ms <= hi - d.watermark_bound_ms);
        if maybe_late {
            tel.events_refused_late_full.fetch_add(1, Relaxed);
            return Some(format!(
                "late DLQ full: tenant {tenant:?} has {capacity} late events waiting (dlq.capacity) and this one may be too late to count; \
                 apply them with POST /api/v1/dlq/replay?kind=late (or send history with ?backfill=true), then retry"
            ));
        }
        None
    }))
}

/// Whether an error or one of its sources is a `T`.
fn chain_has<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<T>() {
            return true;
        }
        cur = x.source();
    }
    false
}

/// Errors listed in an ingest answer; the rest are counted in `errors_omitted`.
const MAX_ERRORS_ANSWERED: usize = 100;

/// Whether any accepted event could go to the late DLQ: a tenant's
/// watermark is at most the latest event time sent to the log writer for it
/// (every earlier request updated that before it was written) minus the
/// bound, so events whose window ends, with the allowed lateness, after
/// that cannot be late. Read after the acknowledgement.
fn maybe_late(s: &AppState, spans: &[(String, i64, i64)]) -> bool {
    let d = &s.shared.durations;
    let max_ts = s.shared.tenant_max_ts.lock();
    spans.iter().any(|(t, lo, _)| {
        let first_end = tally_types::time::align_down(*lo, tally_types::time::MINUTE_MS)
            + tally_types::time::MINUTE_MS;
        max_ts
            .get(t)
            .is_some_and(|&hi| first_end + d.allowed_lateness_ms <= hi - d.watermark_bound_ms)
    })
}

/// How many events of the records `first..=last` the processor sent to the
/// late DLQ, once it applied them (None if that takes over 10 s).
async fn late_of(s: &AppState, first: u64, last: u64) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.shared.processor.lock().totals.applied_lsn() <= last {
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut m = s.shared.late_by_lsn.lock();
    Some((first..=last).filter_map(|l| m.remove(&l)).sum())
}

async fn ingest(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if crate::registry::is_avro(&headers) {
        return crate::registry::ingest_avro(s, caller, q, headers, body).await;
    }
    let started = Instant::now();
    let pairs = query_pairs(&q);
    let default_tenant = default_tenant(&caller, &pairs)?;
    let tenancy = tenancy(&caller, &default_tenant);
    let body = read_ingest_body(&s, &headers, body).await?;
    let format = Format::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let (status, answer) =
        ingest_body(&s, &pairs, tenancy, format, body, started, Vec::new()).await?;
    Ok(ingest_response(status, answer))
}

/// The body of an ingest request (`/api/v1/events` and the Segment API):
/// counted, refused while the node is not ready, within
/// `ingest.max-body-bytes` and `http.body-timeout`, inflated if gzip.
pub(crate) async fn read_ingest_body(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    s.shared.telemetry.requests.fetch_add(1, Relaxed);
    if !s.shared.ready.load(Relaxed) {
        return Err(ApiError::Unavailable(
            "not ready: recovering or shutting down; retry".into(),
            1,
        ));
    }
    let too_large = || {
        ApiError::TooLarge(format!(
            "body is larger than the {}-byte limit (ingest.max-body-bytes); split the batch",
            s.max_body
        ))
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > s.max_body
    {
        return Err(too_large());
    }
    let body: Bytes = axum::body::to_bytes(body, s.max_body).await.map_err(|e| {
        if std::error::Error::source(&e)
            .is_some_and(|src| src.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else if chain_has::<tower_http::timeout::TimeoutError>(&e) {
            ApiError::Status(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive within http.body-timeout; send it faster or in smaller batches".into(),
            )
        } else {
            ApiError::BadRequest(format!("cannot read body: {e}"))
        }
    })?;
    decode_body(headers, body, s.max_body)
}

/// An ingest answer: a 429 (every valid event refused) says when to retry.
pub(crate) fn ingest_response(status: StatusCode, answer: Json) -> Response {
    let mut r = (status, axum::Json(answer)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// `?tenant=` names the tenant of events without one (open mode); a key
/// may only name its own (403 otherwise, as on every route).
pub(crate) fn default_tenant(
    caller: &Caller,
    pairs: &[(String, String)],
) -> Result<Option<String>, ApiError> {
    match one(pairs, "tenant") {
        Some(t) if !t.is_empty() => Ok(Some(caller.tenant(pairs)?)),
        _ => Ok(None),
    }
}

/// Whose events an ingest request carries, given [`default_tenant`].
pub(crate) fn tenancy<'a>(caller: &'a Caller, default_tenant: &'a Option<String>) -> Tenancy<'a> {
    match (default_tenant, caller.tenancy()) {
        (Some(t), Tenancy::Open) => Tenancy::OpenAs(t),
        (_, tenancy) => tenancy,
    }
}

/// A request body as sent, or inflated when `Content-Encoding: gzip`
/// (at most `max` bytes either way).
fn decode_body(headers: &HeaderMap, body: Bytes, max: usize) -> Result<Bytes, ApiError> {
    let enc = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match enc.as_deref() {
        None | Some("") | Some("identity") => Ok(body),
        Some("gzip") | Some("x-gzip") => {
            use std::io::Read as _;
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
            let mut dec = flate2::read::MultiGzDecoder::new(&body[..]).take(max as u64 + 1);
            dec.read_to_end(&mut out).map_err(|e| {
                ApiError::BadRequest(format!(
                    "body: Content-Encoding gzip, but the body does not inflate ({e}); send gzip data or drop the header"
                ))
            })?;
            if out.len() > max {
                return Err(ApiError::TooLarge(format!(
                    "body inflates past the {max}-byte limit (ingest.max-body-bytes); split the batch"
                )));
            }
            Ok(Bytes::from(out))
        }
        Some(other) => Err(ApiError::Status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {other:?} is not supported; send gzip or no encoding"),
        )),
    }
}

/// The ingest path after the body is read: validation, quotas, the write
/// and its acknowledgement (`POST /api/v1/events` and the Segment API).
/// `extra`: records the caller could not turn into events (a Segment
/// message, an Avro frame), rejected and kept in the malformed DLQ with
/// the body's own rejections. Answers the status and body; see
/// [`ingest_response`].
/// Bodies at least this large are parsed off the runtime's workers.
const PARSE_APART_BYTES: usize = 64 << 10;

pub(crate) async fn ingest_body(
    s: &AppState,
    pairs: &[(String, String)],
    tenancy: Tenancy<'_>,
    format: Format,
    body: Bytes,
    started: Instant,
    extra: Vec<tally_ingest::Rejection>,
) -> Result<(StatusCode, Json), ApiError> {
    let tel = &s.shared.telemetry;
    tel.bytes_ingested.fetch_add(body.len() as u64, Relaxed);
    // Bounded memory: refuse while too many bytes wait to become durable.
    let inflight = tel.inflight_bytes.fetch_add(body.len() as i64, Relaxed);
    let release = |n: usize| tel.inflight_bytes.fetch_sub(n as i64, Relaxed);
    if inflight as usize + body.len() > s.max_inflight {
        release(body.len());
        tel.requests_overloaded.fetch_add(1, Relaxed);
        return Err(ApiError::Unavailable(
            "overloaded: too much data waiting for the disk; retry".into(),
            1,
        ));
    }
    let backfill = pairs
        .iter()
        .any(|(k, v)| k == "backfill" && matches!(v.as_str(), "true" | "1" | "yes"));
    let overloaded =
        inflight as usize + body.len() > s.max_inflight / 2 || s.tx.capacity() < s.queue_depth / 2;
    let mut parser = Parser::with_schemas(s.partitions, s.schemas.clone())
        .with_future_limit(
            s.shared.clock.now_ms(),
            s.shared.durations.max_future_skew_ms,
        )
        .with_admission(admission(s, overloaded, backfill))
        .with_max_depth(s.max_json_depth)
        .with_max_event_bytes(s.max_event_bytes)
        .with_privacy(s.privacy.clone())
        .with_registry(Some(s.shared.registry.clone()));
    // A large body takes milliseconds of parsing: off the runtime's
    // workers, so a dashboard's read does not queue behind a few of them.
    let parsed = if body.len() >= PARSE_APART_BYTES
        && tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(|| parser.parse(&body, format, tenancy))
    } else {
        parser.parse(&body, format, tenancy)
    };
    let mut parsed = match parsed {
        Ok(p) => p,
        Err(BodyError::Empty) if !extra.is_empty() => tally_ingest::Parsed::default(),
        Err(e) => {
            release(body.len());
            return Err(match e {
                BodyError::Empty | BodyError::NotJson(_) | BodyError::WrongShape(_) => {
                    ApiError::BadRequest(e.to_string())
                }
            });
        }
    };
    parsed.rejected_total += extra.len();
    parsed.rejected.extend(extra);
    if s.quotas.enabled()
        && let Err(q) = s.quotas.take(&parsed.tenants)
    {
        release(body.len());
        tel.requests_over_quota.fetch_add(1, Relaxed);
        tel.events_dropped_overload
            .fetch_add((parsed.accepted + parsed.rejected.len()) as u64, Relaxed);
        return Err(ApiError::TooMany(
            format!(
                "tenant {:?} is over its ingest quota of {} events/s (quotas.events-per-second); nothing from this request was stored: retry after the Retry-After seconds or send smaller batches",
                q.tenant, q.limit
            ),
            q.retry_after_s,
        ));
    }
    // The first errors are answered (and the first rejections kept in the
    // DLQ); past that they are only counted.
    let errors: Vec<Json> = parsed
        .rejected
        .iter()
        .take(MAX_ERRORS_ANSWERED)
        .map(|r| json!({ "index": r.index, "error": r.error }))
        .collect();
    let rejected = parsed.rejected_total;
    let accepted = parsed.accepted;
    let refused = std::mem::take(&mut parsed.refused);
    let prepared = prepare_write(&s.shared, parsed, backfill, body.len());
    let spans = prepared.spans;
    let n_records = prepared.records;
    let mut last_lsn = None;
    if let Some((req, wait)) = prepared.write {
        if s.tx.try_send(req).is_err() {
            release(body.len());
            tel.requests_overloaded.fetch_add(1, Relaxed);
            tel.events_dropped_overload
                .fetch_add((accepted + rejected) as u64, Relaxed);
            return Err(ApiError::Unavailable(
                "overloaded: the log writer queue is full; retry".into(),
                1,
            ));
        }
        match wait.await {
            Ok(Ok(lsn)) => last_lsn = lsn,
            Ok(Err(e)) => {
                tel.events_dropped_overload
                    .fetch_add((accepted + rejected) as u64, Relaxed);
                return Err(ApiError::Unavailable(
                    format!(
                        "storage error ({e}): nothing from this request was acknowledged; retry"
                    ),
                    5,
                ));
            }
            Err(_) => {
                return Err(ApiError::Unavailable("shutting down; retry".into(), 1));
            }
        }
    } else {
        release(body.len());
    }
    tel.events_accepted.fetch_add(accepted as u64, Relaxed);
    tel.events_rejected.fetch_add(rejected as u64, Relaxed);
    tel.ack_latency
        .observe_us(started.elapsed().as_micros() as u64);
    let late = match last_lsn {
        Some(last) if maybe_late(s, &spans) => late_of(s, last + 1 - n_records, last).await,
        // Kafka mode: the node owning each partition judges lateness later.
        None if s.shared.kafka.is_some() && accepted > 0 => None,
        _ => Some(0),
    };
    let mut errors = errors;
    for (index, reason) in refused
        .iter()
        .take(MAX_ERRORS_ANSWERED.saturating_sub(errors.len()))
    {
        errors.push(json!({ "index": index, "error": reason, "status": 429 }));
    }
    let mut answer = json!({ "accepted": accepted, "rejected": rejected, "errors": errors });
    if !refused.is_empty() {
        answer["refused"] = json!(refused.len());
    }
    match late {
        Some(n) => answer["late"] = json!(n),
        // Durable, not judged yet: say so rather than guess.
        None => answer["late_pending"] = json!(true),
    }
    let listed = answer["errors"].as_array().map_or(0, Vec::len);
    if rejected + refused.len() > listed {
        answer["errors_omitted"] = json!(rejected + refused.len() - listed);
    }
    // Every valid event refused (retry later): the request as a whole is 429.
    if accepted == 0 && rejected == 0 && !refused.is_empty() {
        return Ok((StatusCode::TOO_MANY_REQUESTS, answer));
    }
    Ok((StatusCode::OK, answer))
}

/// The Tally event another API's record maps to.
pub(crate) fn mapped_event(
    event_id: String,
    event_type: String,
    ts: tally_types::Millis,
    properties: serde_json::Map<String, Json>,
    user_id: Option<String>,
    session_id: Option<String>,
) -> Json {
    let mut ev = json!({
        "event_id": event_id,
        "event_type": event_type,
        "timestamp": format_rfc3339(ts),
        "properties": properties,
    });
    if let Some(u) = user_id {
        ev["user_id"] = json!(u);
    }
    if let Some(s) = session_id {
        ev["session_id"] = json!(s);
    }
    ev
}

/// JSON records of another API (Segment messages, PostHog events) mapped
/// to Tally events, as [`ingest_mapped`] takes them.
pub(crate) struct Mapped {
    pub(crate) lines: Vec<u8>,
    pub(crate) index_of: Vec<usize>,
    pub(crate) unmapped: Vec<(usize, tally_ingest::Rejection)>,
    /// The tenant a record that maps to nothing is filed under.
    tenant: String,
}

impl Mapped {
    pub(crate) fn new(
        bytes: usize,
        records: usize,
        caller: &Caller,
        default_tenant: &Option<String>,
    ) -> Mapped {
        Mapped {
            lines: Vec::with_capacity(bytes),
            index_of: Vec::with_capacity(records),
            unmapped: Vec::new(),
            tenant: default_tenant.clone().unwrap_or_else(|| {
                caller
                    .key_tenant()
                    .unwrap_or(tally_types::DEFAULT_TENANT)
                    .to_string()
            }),
        }
    }

    /// The mapped events through [`ingest_mapped`].
    pub(crate) async fn ingest(
        self,
        s: &AppState,
        pairs: &[(String, String)],
        tenancy: Tenancy<'_>,
        started: Instant,
    ) -> Result<(StatusCode, Json), ApiError> {
        ingest_mapped(
            s,
            pairs,
            tenancy,
            self.lines,
            self.index_of,
            self.unmapped,
            started,
        )
        .await
    }

    /// Record `i` (`raw`) and what it maps to: an event, or why not.
    pub(crate) fn push(
        &mut self,
        i: usize,
        raw: &Json,
        event: Result<Json, String>,
    ) -> Result<(), ApiError> {
        match event {
            Ok(ev) => {
                serde_json::to_writer(&mut self.lines, &ev)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                self.lines.push(b'\n');
                self.index_of.push(i);
            }
            Err(why) => self.unmapped.push((
                i,
                tally_ingest::Rejection {
                    index: 0,
                    error: why,
                    tenant: self.tenant.clone(),
                    raw: raw.to_string(),
                    is_object: raw.is_object(),
                },
            )),
        }
        Ok(())
    }
}

/// The ingest path for events made from a request's records (Segment
/// messages, Avro frames): `lines` are NDJSON events, `index_of[i]` the
/// record line `i` came from, `unmapped` the records that made no event
/// (their index and rejection: answered, and kept in the malformed DLQ).
/// The answer counts and names the records.
pub(crate) async fn ingest_mapped(
    s: &AppState,
    pairs: &[(String, String)],
    tenancy: Tenancy<'_>,
    lines: Vec<u8>,
    mut index_of: Vec<usize>,
    unmapped: Vec<(usize, tally_ingest::Rejection)>,
    started: Instant,
) -> Result<(StatusCode, Json), ApiError> {
    if index_of.is_empty() && unmapped.is_empty() {
        return Ok((
            StatusCode::OK,
            json!({"accepted": 0, "rejected": 0, "errors": [], "late": 0}),
        ));
    }
    // The unmapped follow the lines, as if they were lines after them.
    let lines_n = index_of.len();
    let extra = unmapped
        .into_iter()
        .enumerate()
        .map(|(j, (record, mut r))| {
            r.index = lines_n + j;
            index_of.push(record);
            r
        })
        .collect();
    let (status, mut answer) = ingest_body(
        s,
        pairs,
        tenancy,
        Format::Ndjson,
        Bytes::from(lines),
        started,
        extra,
    )
    .await?;
    if let Some(errors) = answer["errors"].as_array_mut() {
        for e in errors.iter_mut() {
            if let Some(i) = e["index"].as_u64().and_then(|i| index_of.get(i as usize)) {
                e["index"] = json!(i);
            }
        }
    }
    Ok((status, answer))
}

/// `&limit=`: a count from 1 to `max` (absent: `default`).
fn limit_param(pairs: &[(String, String)], default: usize, max: usize) -> Result<usize, ApiError> {
    match one(pairs, "limit") {
        None | Some("") => Ok(default),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|&l| (1..=max).contains(&l))
            .ok_or_else(|| {
                ApiError::BadRequest(if max == usize::MAX {
                    format!("limit: {l:?} is not a positive integer")
                } else {
                    format!("limit: {l:?} is not an integer from 1 to {max}")
                })
            }),
    }
}

/// `&gap=`: the inactivity that ends a session without an id (30m).
fn gap_param(pairs: &[(String, String)], default: i64) -> Result<i64, ApiError> {
    match one(pairs, "gap") {
        None | Some("") => Ok(default),
        Some(g) => tally_types::time::parse_duration_ms(g)
            .filter(|&g| g > 0)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("gap: {g:?} is not a duration; use e.g. 30m"))
            }),
    }
}

/// Query-string pairs, percent-decoded, repeated keys kept.
pub(crate) fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub(crate) fn one<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn time_param(
    pairs: &[(String, String)],
    key: &'static str,
    now: i64,
) -> Result<Option<i64>, ApiError> {
    match one(pairs, key) {
        None | Some("") => Ok(None),
        Some(v) => relative_time(v, now).map(Some).map_err(|e| {
            ApiError::BadRequest(format!(
                "{key}: {v:?} is {e}; use RFC 3339 (2026-11-01T12:00:00Z), a date (2026-11-01), epoch ms, or a time relative to now (now, now-24h, now-7d)"
            ))
        }),
    }
}

/// `start` and `end` with their defaults (`end`, then `start` = `end` −
/// `span`), refused unless `start` is before `end`.
fn time_range(
    pairs: &[(String, String)],
    now: i64,
    end_default: i64,
    span: i64,
) -> Result<(i64, i64), ApiError> {
    let end = time_param(pairs, "end", now)?.unwrap_or(end_default);
    let start = time_param(pairs, "start", now)?.unwrap_or(end - span);
    if start >= end {
        return Err(ApiError::BadRequest(format!(
            "start: {} is not before end {}",
            format_rfc3339(start),
            format_rfc3339(end)
        )));
    }
    Ok((start, end))
}

/// A time parameter: `now`, `now-<duration>` / `now+<duration>`, a
/// date (midnight UTC), RFC 3339 or epoch milliseconds.
fn relative_time(v: &str, now: i64) -> Result<i64, String> {
    let v = v.trim();
    if let Some(rest) = v.strip_prefix("now") {
        let rest = rest.trim();
        if rest.is_empty() {
            return Ok(now);
        }
        let (sign, d) = match rest.split_at(1) {
            ("-", d) => (-1, d),
            ("+", d) => (1, d),
            _ => return Err("not now±<duration>".into()),
        };
        let ms = tally_types::time::parse_duration_ms(d.trim())
            .ok_or_else(|| format!("{d:?} is not a duration like 15m, 24h or 7d"))?;
        return Ok(now.saturating_add(sign * ms));
    }
    let b = v.as_bytes();
    if b.len() == 10 && b[4] == b'-' && b[7] == b'-' {
        return parse_time_param(&format!("{v}T00:00:00Z")).map_err(|e| e.to_string());
    }
    parse_time_param(v).map_err(|e| e.to_string())
}

/// Refuses a query parameter `route` does not know (a typo or a filter
/// written as `country=US` would otherwise answer as if it were absent).
fn known_params(
    pairs: &[(String, String)],
    route: &str,
    known: &[&str],
    hint: &str,
) -> Result<(), ApiError> {
    match pairs
        .iter()
        .find(|(k, _)| !known.contains(&k.as_str()) && k != "access_token" && k != "_")
    {
        None => Ok(()),
        Some((k, v)) => Err(ApiError::BadRequest(format!(
            "{k}: not a parameter of {route} (given {k}={v}); its parameters are {}{hint}",
            known.join(", ")
        ))),
    }
}

/// What `GET /api/v1/metrics` takes.
const METRICS_PARAMS: &[&str] = &[
    "metric",
    "granularity",
    "start",
    "end",
    "event_type",
    "where",
    "group_by",
    "window",
    "over",
    "gap",
    "tenant",
];

fn number(v: Value) -> Json {
    match v {
        Value::Int(i) => json!(i),
        Value::Float(f) => tally_types::integral(f).map_or_else(|| json!(f), |i| json!(i)),
    }
}

async fn metrics(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let pairs = query_pairs(&q);
    known_params(
        &pairs,
        "/api/v1/metrics",
        METRICS_PARAMS,
        "; to filter by a property use where=<dimension>:<value> (e.g. where=country:US)",
    )?;
    let metric_s = one(&pairs, "metric").ok_or_else(|| {
        ApiError::BadRequest("metric: required, e.g. metric=count or metric=p99:duration_ms".into())
    })?;
    if let Some(sm) = tally_query::SessionMetric::parse(metric_s) {
        return session_metric(&s, &caller, &pairs, metric_s, sm).await;
    }
    let metric = Metric::parse(metric_s).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let granularity = Granularity::parse(one(&pairs, "granularity").unwrap_or("1m"))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let now = s.shared.clock.now_ms();
    let end_param = time_param(&pairs, "end", now)?;
    let end = end_param.unwrap_or(now + 1);
    let start = time_param(&pairs, "start", now)?.unwrap_or(end - HOUR_MS);
    // "Until now" is a new range on every call: not worth a cache entry.
    let relative = one(&pairs, "end").is_some_and(|e| e.trim().starts_with("now"));
    let cache = (end_param.is_some() && !relative).then_some(&*s.metrics_cache);
    let event_types: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "event_type")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
        })
        .collect();
    // `where=<dimension>:<value>`, repeatable: values of one dimension are
    // any-of, different dimensions all-of (the store checks they are declared).
    let mut wheres = Vec::new();
    for (_, w) in pairs.iter().filter(|(k, _)| k == "where") {
        wheres.push(
            tally_store::parse_where(w).map_err(|e| ApiError::BadRequest(format!("where: {e}")))?,
        );
    }
    let group_by: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "group_by")
        .flat_map(|(_, v)| tally_store::parse_group_by(v))
        .fold(Vec::new(), |mut acc, g| {
            if !acc.contains(&g) {
                acc.push(g);
            }
            acc
        });
    let window = match one(&pairs, "window") {
        None | Some("") => None,
        Some(w) => Some(
            tally_types::time::parse_duration_ms(w)
                .filter(|&ms| ms > 0)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "window: {w:?} is not a duration; give one like 5m or 1h"
                    ))
                })?,
        ),
    };
    let over = match one(&pairs, "over") {
        None | Some("") => None,
        Some(o) => Some(Metric::parse(o).map_err(|e| {
            ApiError::BadRequest(format!(
                "over: {e} (the metric to divide by, e.g. over=count)"
            ))
        })?),
    };
    let mut query = MetricQuery {
        tenant: caller.tenant(&pairs)?,
        metric,
        start,
        end,
        granularity,
        event_types,
        group_by,
        filters: Vec::new(),
        window,
        over,
    };
    for (d, v) in &wheres {
        query.add_filter(d, v);
    }
    let tel = &s.shared.telemetry;
    let key = format!(
        "{}\0{metric_s}\0{}\0{start}\0{end}\0{}\0{}\0{:?}\0{window:?}\0{}",
        query.tenant,
        granularity.as_str(),
        query.event_types.join("\x1f"),
        query.group_by.join(","),
        query.filters,
        one(&pairs, "over").unwrap_or("")
    );
    let store = s.shared.store.read();
    if let Some(body) = cache.and_then(|c| c.lock().get(&key, &store)) {
        drop(store);
        tel.metrics_cache_hits.fetch_add(1, Relaxed);
        tel.query_latency
            .observe_us(started.elapsed().as_micros() as u64);
        return Ok(json_bytes(body, "hit"));
    }
    let version = store.version();
    let downsampled_to = store.downsampled_to();
    let series = store
        .query(&query)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // A property with no numeric value: sums read 0 and the others have
    // no point; both are answered with a note rather than silently.
    let no_numbers = match &query.metric {
        Metric::Sum(p)
            if series.iter().flat_map(|x| &x.points).all(|(_, v)| {
                matches!(v, Value::Int(0)) || matches!(v, Value::Float(f) if *f == 0.0)
            }) =>
        {
            let mut q = query.clone();
            q.metric = Metric::Max(p.clone());
            q.over = None;
            q.window = None;
            store
                .query(&q)
                .is_ok_and(|s| s.iter().all(|x| x.points.is_empty()))
        }
        Metric::Avg(_) | Metric::Min(_) | Metric::Max(_) | Metric::Quantile(..) => {
            series.iter().all(|x| x.points.is_empty())
        }
        _ => false,
    };
    drop(store);
    tel.metrics_cache_misses.fetch_add(1, Relaxed);
    // Say why rather than answer a silent nothing.
    let note = no_numbers
        .then(|| metric_s.split_once(':'))
        .flatten()
        .map(|(name, prop)| {
            format!(
                "no numeric values of property {prop:?} in this range: {name} needs a property sent as a number (GET /api/v1/catalog lists each property's types)"
            )
        });
    let body = crate::series_json::write(&crate::series_json::Answer {
        metric: metric_s,
        granularity: granularity.as_str(),
        series: &series,
        note: note.as_deref(),
        // Minutes before the horizon were folded into hours: say so rather
        // than answer as if those minutes had no events.
        downsampled_before: (granularity.ms() < HOUR_MS && start < downsampled_to)
            .then_some(downsampled_to),
    });
    let body = Bytes::from(body);
    if let Some(c) = cache {
        c.lock().put(key, &query.tenant, end, version, body.clone());
    }
    tel.query_latency
        .observe_us(started.elapsed().as_micros() as u64);
    Ok(json_bytes(body, "miss"))
}

/// `metric=sessions|avg_session_duration|median_session_duration|bounce_rate`:
/// per bucket of the sessions' start, from the session index or the raw
/// events (late events that extend or join sessions are counted), with
/// `window` as for rollups.
async fn session_metric(
    s: &AppState,
    caller: &Caller,
    pairs: &[(String, String)],
    metric_s: &str,
    metric: tally_query::SessionMetric,
) -> Result<Response, ApiError> {
    for p in ["group_by", "where", "over", "event_type"] {
        if one(pairs, p).is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::BadRequest(format!(
                "{p}: {metric_s} is a metric of whole sessions, which are not split by {p}; leave it out (or query the sessions table with SQL)"
            )));
        }
    }
    let engine = engine(s)?;
    let granularity = Granularity::parse(one(pairs, "granularity").unwrap_or("1m"))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let g = granularity.ms();
    let now = s.shared.clock.now_ms();
    let (start, end) = time_range(pairs, now, now + 1, HOUR_MS)?;
    if (end - start) / g > tally_store::rollup::MAX_BUCKETS {
        return Err(ApiError::BadRequest(format!(
            "granularity: the range holds more than {} buckets of {}; use a coarser granularity or a shorter range",
            tally_store::rollup::MAX_BUCKETS,
            granularity.as_str()
        )));
    }
    let window = match one(pairs, "window") {
        None | Some("") => g,
        Some(w) => tally_types::time::parse_duration_ms(w)
            .filter(|&ms| ms >= g && ms % g == 0)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "window: {w:?} is not a whole number of buckets of the granularity ({}), e.g. granularity=1m&window=5m",
                    granularity.as_str()
                ))
            })?,
    };
    let gap_ms = gap_param(pairs, engine.config().session_gap_ms)?;
    let tenant = caller.tenant(pairs)?;
    let points = engine
        .session_metric(&tally_query::SessionMetricQuery {
            tenant,
            metric,
            start,
            end,
            step: g,
            window,
            gap_ms,
        })
        .await
        .map_err(query_error)?;
    let points: Vec<Json> = points
        .into_iter()
        .map(|(t, v)| json!([format_rfc3339(t), number(Value::Float(v))]))
        .collect();
    Ok(axum::Json(json!({
        "metric": metric_s,
        "granularity": granularity.as_str(),
        "series": [{"labels": {}, "points": points}],
    }))
    .into_response())
}

/// A JSON body already serialized, with the cache outcome in `X-Tally-Cache`.
fn json_bytes(body: Bytes, cache: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::HeaderName::from_static("x-tally-cache"),
                HeaderValue::from_static(cache),
            ),
        ],
        body,
    )
        .into_response()
}

async fn dlq(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    let kind_s = one(&pairs, "kind").unwrap_or("malformed");
    let kind = DlqKind::parse(kind_s).ok_or_else(|| {
        ApiError::BadRequest(format!("kind: {kind_s:?} is not malformed or late"))
    })?;
    let limit = match one(&pairs, "limit") {
        None => 100,
        Some(l) => l.parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!("limit: {l:?} is not a non-negative integer"))
        })?,
    }
    .min(10_000);
    let tenant = caller.tenant(&pairs)?;
    let entries = s.shared.dlq.lock().list(&tenant, kind, limit);
    let entries: Vec<Json> = entries.iter().map(entry_to_json).collect();
    Ok(axum::Json(json!({ "entries": entries })).into_response())
}

/// `POST /api/v1/dlq/replay?kind=late[&tenant=X]`: applies the late events
/// waiting in the DLQ to their windows as corrections. The events go through
/// the log as one correction record, so the corrections are durable, survive
/// crashes and replays, and apply once: the processor skips an event already
/// counted or already corrected. Without `tenant`, every tenant's entries.
async fn dlq_replay(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    match one(&pairs, "kind").unwrap_or("late") {
        "late" => {}
        "malformed" => {
            return Err(ApiError::BadRequest(
                "kind: malformed events cannot be replayed as they are; fix them and send them again to /api/v1/events".into(),
            ));
        }
        k => {
            return Err(ApiError::BadRequest(format!(
                "kind: {k:?} is not late (the only kind that can be replayed)"
            )));
        }
    }
    let tenant = caller.tenant_or_all(&pairs)?;
    if !s.shared.ready.load(Relaxed) {
        return Err(ApiError::Unavailable(
            "not ready: recovering or shutting down; retry".into(),
            1,
        ));
    }
    let pending = s.shared.dlq.lock().pending_late(tenant.as_deref());
    let (pending, counted_before) = match (&s.query, &s.shared.raw) {
        (Some(engine), Some(raw)) if !pending.is_empty() => {
            // The check asks the raw store for earlier copies: it must see
            // every record the processor applied so far (the raw thread
            // publishes what it appended at most every few ms).
            let applied = s.shared.processor.lock().totals.applied_lsn();
            if !raw.wait_published(applied, Duration::from_secs(10)).await {
                return Err(ApiError::Unavailable(
                    "the raw event store is behind the processor, so earlier copies of late events cannot be checked yet; nothing was replayed: retry".into(),
                    1,
                ));
            }
            received_before(engine, pending).await?
        }
        _ => (pending, 0),
    };
    let mut ndjson = String::new();
    for e in &pending {
        // Late entries are rendered from the batch form and name their
        // tenant (`EventView::to_json`), so open-mode parsing files each
        // under its own, keyed or not.
        if let DlqBody::Event(j) = &e.body {
            ndjson.push_str(j);
            ndjson.push('\n');
        }
    }
    let mut applied = 0u64;
    let mut skipped = counted_before;
    // Kafka mode: the replayed events go to the events topic, each to its
    // partition's owner, which reports how each went on the late topic.
    let replayed_keys: Vec<(String, u128)> = pending
        .iter()
        .filter(|e| matches!(e.body, DlqBody::Event(_)))
        .map(|e| (e.tenant.clone(), e.key))
        .collect();
    if !ndjson.is_empty() {
        let parsed = Parser::new(1)
            .parse(ndjson.as_bytes(), Format::Ndjson, Tenancy::Open)
            .map_err(|e| ApiError::BadRequest(format!("late DLQ entries do not parse: {e}")))?;
        skipped += parsed.rejected.len() as u64;
        let parts: Vec<(u32, Vec<u8>)> = parsed
            .partitions
            .into_iter()
            .map(|(p, w)| (p, w.finish_correction()))
            .collect();
        let (done, wait) = oneshot::channel();
        let req = WriteReq {
            parts,
            malformed: Vec::new(),
            bytes: ndjson.len(),
            done,
        };
        s.shared
            .telemetry
            .inflight_bytes
            .fetch_add(ndjson.len() as i64, Relaxed);
        if s.tx.send(req).await.is_err() {
            return Err(ApiError::Unavailable("shutting down; retry".into(), 1));
        }
        let lsn = match wait.await {
            Ok(Ok(Some(lsn))) => lsn,
            Ok(Ok(None)) if s.shared.kafka.is_some() => {
                let (a, k) = kafka_replayed(&s, &replayed_keys).await?;
                applied = a;
                skipped += k;
                return Ok(axum::Json(json!({
                    "kind": "late",
                    "applied": applied,
                    "skipped": skipped,
                    "already_counted": counted_before,
                    "tenant": tenant,
                }))
                .into_response());
            }
            Ok(Ok(None)) => {
                return Err(ApiError::Unavailable(
                    "nothing was written; retry".into(),
                    1,
                ));
            }
            Ok(Err(e)) => {
                return Err(ApiError::Unavailable(
                    format!("storage error, no correction was applied: {e}; retry"),
                    5,
                ));
            }
            Err(_) => return Err(ApiError::Unavailable("shutting down; retry".into(), 1)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = loop {
            if let Some(a) = s.shared.corrections.lock().remove(&lsn) {
                break a;
            }
            if Instant::now() > deadline {
                return Err(ApiError::Unavailable(
                    "the corrections are durable but not applied yet; they will be: query again shortly".into(),
                    1,
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        applied = result.replayed;
        skipped += result.duplicates;
    }
    Ok(axum::Json(json!({
        "kind": "late",
        "applied": applied,
        "skipped": skipped,
        "already_counted": counted_before,
        "tenant": tenant,
    }))
    .into_response())
}

/// Kafka mode: waits until the late topic reported every replayed event
/// (its partition's owner applied or skipped it in a transaction), then
/// answers how many were applied and how many skipped.
async fn kafka_replayed(s: &AppState, keys: &[(String, u128)]) -> Result<(u64, u64), ApiError> {
    let Some(k) = &s.shared.kafka else {
        return Ok((0, 0));
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let done = k.replays.lock();
            if keys.iter().all(|x| done.contains_key(x)) {
                let applied = keys.iter().filter(|x| done[*x]).count() as u64;
                return Ok((applied, keys.len() as u64 - applied));
            }
        }
        if Instant::now() > deadline {
            return Err(ApiError::Unavailable(
                "the replayed events are in Kafka but their partitions' owners have not applied them yet; they will be: list the late DLQ again shortly".into(),
                5,
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Splits off the late entries whose event the raw store holds an earlier
/// copy of. Such an event was counted on time long ago (its dedupe entry
/// has since expired, so the re-sent copy was judged late), or the earlier
/// copy is itself a late entry that is replayed instead: replaying this one
/// would count the event twice. Answers the rest and how many were split off.
async fn received_before(
    engine: &tally_query::QueryEngine,
    pending: Vec<DlqEntry>,
) -> Result<(Vec<DlqEntry>, u64), ApiError> {
    use std::collections::{BTreeMap, HashMap};
    // Per tenant: (event id, event time) of each entry; per entry its id.
    let mut wanted: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    let mut ids = Vec::with_capacity(pending.len());
    for e in &pending {
        let id_ts = match &e.body {
            DlqBody::Event(j) => serde_json::from_str::<Json>(j).ok().and_then(|v| {
                let id = v["event_id"].as_str()?.to_string();
                let ts = match &v["timestamp"] {
                    Json::String(t) => parse_time_param(t).ok()?,
                    n => n.as_i64()?,
                };
                Some((id, ts))
            }),
            DlqBody::Raw(_) => None,
        };
        ids.push(id_ts.as_ref().map(|(id, _)| id.clone()));
        if let Some(x) = id_ts {
            wanted.entry(e.tenant.clone()).or_default().push(x);
        }
    }
    // Per tenant: event id → first received.
    let mut first: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for (tenant, events) in &wanted {
        let from = events.iter().map(|x| x.1).min().unwrap_or(0);
        let to = events.iter().map(|x| x.1).max().unwrap_or(0);
        let list: Vec<&str> = events.iter().map(|x| x.0.as_str()).collect();
        let seen = engine
            .first_received(tenant, &list, from, to)
            .await
            .map_err(query_error)?;
        first.insert(tenant.clone(), seen);
    }
    let mut keep = Vec::with_capacity(pending.len());
    let mut dropped = 0;
    for (e, id) in pending.into_iter().zip(ids) {
        let earlier = id.is_some_and(|id| {
            first
                .get(&e.tenant)
                .and_then(|m| m.get(&id))
                .is_some_and(|&at| at < e.received_at)
        });
        if earlier {
            dropped += 1;
        } else {
            keep.push(e);
        }
    }
    Ok((keep, dropped))
}

/// `GET /api/v1/status`: where the pipeline stands (an addition to API.md).
async fn status(State(s): State<AppState>, caller: Caller) -> Response {
    let v = snapshot(&s);
    let tel = &s.shared.telemetry;
    // Every tenant has its own event clock; a key sees its tenant's only.
    let (watermark, watermarks) = {
        let view = s.shared.processor.lock();
        let mut all: Vec<(&String, &i64)> = view
            .watermarks
            .iter()
            .filter(|(t, _)| caller.key_tenant().is_none_or(|k| k == t.as_str()))
            .collect();
        all.sort();
        let map: serde_json::Map<String, Json> = all
            .iter()
            .map(|(t, w)| ((*t).clone(), Json::from(format_rfc3339(**w))))
            .collect();
        let mine = match caller.key_tenant() {
            Some(k) => view.watermarks.get(k).copied(),
            None => v.watermark_ms,
        };
        (mine, map)
    };
    // A key sees its tenant's counts, never the server's (other tenants'
    // volume is not its business).
    let events = match caller.key_tenant() {
        Some(k) => {
            let c = s
                .shared
                .processor
                .lock()
                .tenant_counts
                .get(k)
                .copied()
                .unwrap_or_default();
            json!({"counted": c.counted, "duplicates": c.duplicates, "late": c.late})
        }
        None => json!({
            "counted": v.counted,
            "duplicates": v.duplicates,
            "late": v.late,
            "corrections": v.corrections,
            "replayed": v.replayed,
        }),
    };
    axum::Json(json!({
        "ready": v.ready,
        "watermark": watermark.map(format_rfc3339),
        "watermarks": watermarks,
        "log": {"committed_lsn": v.committed_lsn, "applied_lsn": v.applied_lsn, "behind_records": v.behind_records()},
        "events": events,
        "checkpoints": {
            "written": tel.checkpoints.load(Relaxed),
            "errors": tel.checkpoint_errors.load(Relaxed),
        },
        "recovery_ms": tel.recovery_ms.load(Relaxed),
        "retention": retention_status(&s),
        "cluster": s.shared.kafka.as_ref().map(|k| cluster_status(k)),
        "registry": registry_status(&s, &caller),
    }))
    .into_response()
}

/// Each tenant's registered subjects and their live versions (a key sees
/// its tenant's only).
fn registry_status(s: &AppState, caller: &Caller) -> Json {
    let mut all = s.shared.registry.summary();
    if let Some(k) = caller.key_tenant() {
        all.retain(|t, _| t == k);
    }
    json!(all)
}

/// Kafka mode: the members (nodes that committed partition state), who
/// owns each partition as of its last commit, and this node's lag.
fn cluster_status(k: &crate::pipeline::KafkaShared) -> Json {
    use std::sync::atomic::Ordering::Relaxed;
    let mine = k.worker.parts.lock().clone();
    let lag = k.lag.lock().clone();
    let states = k.view.states();
    let mut members: Vec<String> = states.iter().map(|(_, s)| s.node.clone()).collect();
    if !mine.is_empty() || !members.contains(&k.node_id) {
        members.push(k.node_id.clone());
    }
    members.sort();
    members.dedup();
    let mut ids: Vec<u32> = states
        .iter()
        .map(|(p, _)| *p)
        .chain(mine.keys().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let partitions: Vec<Json> = ids
        .iter()
        .map(|p| {
            let st = states.iter().find(|(q, _)| q == p).map(|(_, s)| s);
            let own = mine.get(p);
            let owner = if own.is_some() {
                Some(k.node_id.clone())
            } else {
                st.map(|s| s.node.clone())
            };
            let mut o = json!({
                "partition": p,
                "owner": owner,
                "committed_offset": st.map(|s| s.next_offset),
                "committed_at": st.map(|s| format_rfc3339(s.committed_at)),
            });
            if let Some(x) = own {
                o["lag_records"] = json!(x.lag_records);
                o["lag_seconds"] = json!(x.lag_seconds);
                o["end_offset"] = json!(x.end_offset);
                o["restoring"] = json!(x.restoring);
            } else if let Some((records, seconds)) = lag.get(p) {
                o["lag_records"] = json!(records);
                o["lag_seconds"] = json!(seconds);
            }
            o
        })
        .collect();
    json!({
        "mode": "kafka",
        "node": k.node_id,
        "group": k.group_id,
        "topic": k.topic_events,
        "members": members,
        "owned": mine.keys().collect::<Vec<_>>(),
        "alerts_leader": k.alert_log.held(),
        "partitions": partitions,
        "lag_records": mine.values().map(|x| x.lag_records).sum::<u64>(),
        "lag_seconds": mine.values().map(|x| x.lag_seconds).fold(0.0, f64::max),
        "rebalances": k.worker.rebalances.load(Relaxed),
        "transactions": {
            "commits": k.worker.commits.load(Relaxed),
            "aborts": k.worker.aborts.load(Relaxed),
        },
        "last_error": k.worker.last_error.lock().clone(),
    })
}

/// Where each tier's data starts and what retention deleted so far.
fn retention_status(s: &AppState) -> Json {
    let tel = &s.shared.telemetry;
    let d = &s.shared.durations;
    let horizon = |t: i64| (t > i64::MIN).then(|| format_rfc3339(t));
    let raw = s.shared.raw.as_ref();
    json!({
        "log": {"retention": human_ms(d.retention_ms), "segments_deleted": tel.log_segments_deleted.load(Relaxed), "bytes_deleted": tel.log_bytes_deleted.load(Relaxed)},
        "archive": {
            "retention": human_ms(d.archive_retention_ms),
            "files_deleted": raw.map(|r| r.stats.files_deleted.load(Relaxed)),
            "rows_deleted": raw.map(|r| r.stats.rows_deleted.load(Relaxed)),
            "files_compacted": raw.map(|r| r.stats.files_compacted.load(Relaxed)),
        },
        "rollups": {
            "minute_retention": human_ms(d.minute_rollups_ms),
            "hour_retention": human_ms(d.hour_rollups_ms),
            "minutes_from": horizon(tel.rollup_minutes_from_ms.load(Relaxed)),
            "hours_from": horizon(tel.rollup_hours_from_ms.load(Relaxed)),
            "minutes_downsampled": tel.rollup_minutes_downsampled.load(Relaxed),
            "buckets_deleted": tel.rollup_buckets_deleted.load(Relaxed),
        },
    })
}

/// A retention as config text ("0s" = kept forever).
fn human_ms(ms: i64) -> String {
    if ms == 0 {
        "forever".into()
    } else {
        tally_stream::human_ms(ms)
    }
}

fn engine(s: &AppState) -> Result<&Arc<tally_query::QueryEngine>, ApiError> {
    s.query.as_ref().ok_or_else(|| {
        ApiError::Status(
            StatusCode::NOT_IMPLEMENTED,
            "raw events are not kept (archive.enabled = false), so SQL and sessions are off; enable the archive".into(),
        )
    })
}

fn query_error(e: tally_query::QueryError) -> ApiError {
    use tally_query::QueryError as Q;
    let status = match &e {
        Q::Sql(_) | Q::BadRequest(_) => StatusCode::BAD_REQUEST,
        Q::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        Q::Memory { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Q::Exec(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::Status(status, e.to_string())
}

/// `POST /api/v1/query` with `{"sql": "SELECT …"}`.
async fn sql_query(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let engine = engine(&s)?;
    let pairs = query_pairs(&q);
    let req: Json = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body: not JSON ({e}); send {{\"sql\": \"SELECT …\"}}"
        ))
    })?;
    let sql = req.get("sql").and_then(Json::as_str).ok_or_else(|| {
        ApiError::BadRequest("sql: missing or not a string; send {\"sql\": \"SELECT …\"}".into())
    })?;
    // The tenant comes from ?tenant= (or the body's "tenant"), never from the SQL.
    let tenant = caller.tenant_of(&pairs, &req)?;
    let format = tally_query::format::Format::from_accept(
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    );
    let r = engine.sql(&tenant, sql).await;
    s.shared
        .telemetry
        .sql_latency
        .observe_us(started.elapsed().as_micros() as u64);
    let r = r.map_err(query_error)?;
    let bytes = tally_query::format::encode(&r, format)
        .map_err(|e| ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from(bytes),
    )
        .into_response())
}

/// `GET /api/v1/changes?since=V[&limit=N][&tenant=X]`: closed buckets and
/// sessions whose value changed after they were first published, after
/// store version `V`, oldest first. `version` is where to continue from.
async fn changes(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    let tenant = caller.tenant(&pairs)?;
    let since = match one(&pairs, "since") {
        None | Some("") => 0,
        Some(v) => v.parse::<u64>().map_err(|_| {
            ApiError::BadRequest(format!(
                "since: {v:?} is not a version; give 0 or the version of the last answer"
            ))
        })?,
    };
    let limit = limit_param(&pairs, 1000, tally_store::CHANGES_KEPT)?;
    let store = s.shared.store.read();
    let (list, complete) = store.changes_since(&tenant, since, limit);
    let version = if list.len() == limit {
        list.last().map_or(store.version(), |c| c.version)
    } else {
        store.version()
    };
    let changes: Vec<Json> = list.iter().map(|c| change_json(c)).collect();
    drop(store);
    Ok(
        axum::Json(json!({"version": version, "complete": complete, "changes": changes}))
            .into_response(),
    )
}

/// One entry of `GET /api/v1/changes`.
fn change_json(c: &tally_store::Change) -> Json {
    use crate::session_changes::session_json;
    use tally_store::Changed;
    let summary = |x: &tally_store::Summary| json!({"count": x.count, "unique_users": x.unique_users, "unique_sessions": x.unique_sessions});
    let mut v = match &c.what {
        Changed::Bucket {
            minute,
            event_type,
            old,
            new,
        } => json!({
            "kind": "bucket",
            "key": {
                "tenant": &*c.tenant,
                "event_type": &**event_type,
                "bucket": format_rfc3339(*minute),
                "granularity": "1m",
            },
            "old": summary(old),
            "new": summary(new),
        }),
        Changed::Session(sc) => {
            let mut v = json!({
                "kind": "session",
                "key": {
                    "tenant": &*c.tenant,
                    "session_id": sc.session().session_id,
                    "user_id": sc.session().user_id,
                },
                "old": sc.before().map(session_json),
                "new": sc.after().map(session_json),
            });
            if let Some(r) = sc.replaced_by() {
                v["replaced_by"] = json!(r);
            }
            v
        }
    };
    v["at"] = json!(format_rfc3339(c.at));
    v["version"] = json!(c.version);
    v
}

/// `GET /api/v1/sessions?user_id=U&start=T&end=T[&tenant=X][&gap=30m][&limit=N]`.
/// `GET /api/v1/catalog[?start=&end=&limit=]`: the tenant's event types
/// in the window (default the last 7 days), each with the properties seen,
/// their JSON types, distinct values (counted up to 1000), numeric range,
/// and whether they are a declared dimension; from at most `limit` raw
/// events (default 100000).
async fn catalog(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    known_params(
        &pairs,
        "/api/v1/catalog",
        &["start", "end", "limit", "tenant"],
        "",
    )?;
    let engine = engine(&s)?;
    let tenant = caller.tenant(&pairs)?;
    let now = s.shared.clock.now_ms();
    let (start, end) = time_range(&pairs, now, now + HOUR_MS, 7 * 24 * HOUR_MS + HOUR_MS)?;
    let max_events = limit_param(&pairs, 100_000, 10_000_000)?;
    let cat = engine
        .catalog(tally_query::CatalogQuery {
            tenant: tenant.clone(),
            start,
            end,
            max_events,
        })
        .await
        .map_err(query_error)?;
    let dims: Vec<String> = s
        .shared
        .store
        .read()
        .dimensions()
        .of(&tenant)
        .iter()
        .map(|d| d.to_string())
        .collect();
    let first = cat.event_types.values().map(|t| t.first).min();
    let last = cat.event_types.values().map(|t| t.last).max();
    let types: Vec<Json> = cat
        .event_types
        .iter()
        .map(|(name, t)| {
            let props: Vec<Json> = t
                .properties
                .iter()
                .map(|(k, p)| {
                    json!({
                        "name": k,
                        "types": p.types,
                        "present": p.present,
                        "distinct": p.distinct,
                        "distinct_at_least": p.distinct_capped,
                        "numeric": p.types.contains("number"),
                        "min": p.min,
                        "max": p.max,
                        "dimension": dims.iter().any(|d| d == k),
                    })
                })
                .collect();
            json!({
                "event_type": name,
                "events": t.events,
                "first": format_rfc3339(t.first),
                "last": format_rfc3339(t.last),
                "properties": props,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "tenant": tenant,
        "start": format_rfc3339(start),
        "end": format_rfc3339(end),
        "events_read": cat.events,
        "complete": cat.complete,
        "first": first.map(format_rfc3339),
        "last": last.map(format_rfc3339),
        "dimensions": dims,
        "event_types": types,
    }))
    .into_response())
}

async fn sessions(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let engine = engine(&s)?;
    let pairs = query_pairs(&q);
    let tenant = caller.tenant(&pairs)?;
    let now = s.shared.clock.now_ms();
    let (start, end) = time_range(&pairs, now, now + HOUR_MS, 24 * HOUR_MS)?;
    let gap_ms = gap_param(&pairs, engine.config().session_gap_ms)?;
    let limit = limit_param(&pairs, 1000, usize::MAX)?;
    let user_id = one(&pairs, "user_id")
        .filter(|u| !u.is_empty())
        .map(str::to_string);
    let rows = engine
        .sessions(&tally_query::SessionsQuery {
            tenant,
            user_id,
            start,
            end,
            gap_ms,
            limit,
        })
        .await
        .map_err(query_error)?;
    let sessions: Vec<Json> = rows
        .iter()
        .map(|r| {
            json!({
                "session_id": r.session_id,
                "user_id": r.user_id,
                "start": format_rfc3339(r.start),
                "end": format_rfc3339(r.end),
                "events": r.events,
                "duration_ms": r.end - r.start,
                "derived": r.derived,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "sessions": sessions })).into_response())
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// Waits until the processor has applied everything acknowledged so far
/// (tests and benchmarks use it to measure freshness).
pub async fn wait_applied(shared: &Shared, counted_at_least: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if shared.processor.lock().totals.counted >= counted_at_least {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
