//! `/api/v1/alerts`: rules, their states, silences and history (the Alerts
//! section of API.md). Every call is scoped to one tenant.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use tally_alert::{AlertError, Rule, RuleState};
use tally_types::time::format_rfc3339;

use crate::auth::Caller;
use crate::http::{ApiError, AppState, one, query_pairs};

/// A rule with where it stands.
pub(crate) fn view(r: &Rule, st: &RuleState, now: i64) -> Json {
    let mut v = r.to_json();
    let o = v.as_object_mut().expect("rule is an object");
    o.insert("state".into(), json!(st.state.as_str()));
    o.insert("since".into(), json!(st.since.map(format_rfc3339)));
    o.insert("value".into(), json!(st.last_value));
    o.insert(
        "last_bucket".into(),
        json!(st.last_bucket.map(format_rfc3339)),
    );
    o.insert(
        "episode_start".into(),
        json!(st.episode_start.map(format_rfc3339)),
    );
    o.insert("silenced".into(), json!(r.silenced(now)));
    if !r.group_by.is_empty() {
        // One entry per label combination followed, most urgent first.
        let mut series: Vec<(&String, &RuleState)> = st.series.iter().collect();
        let rank = |s: &RuleState| match s.state {
            tally_alert::State::Firing => 0,
            tally_alert::State::Pending => 1,
            _ => 2,
        };
        series.sort_by_key(|(k, s)| (rank(s), *k));
        let list: Vec<Json> = series
            .into_iter()
            .map(|(k, s)| {
                json!({
                    "labels": serde_json::from_str::<Json>(k).unwrap_or(Json::Null),
                    "state": s.state.as_str(),
                    "since": s.since.map(format_rfc3339),
                    "value": s.last_value,
                    "last_bucket": s.last_bucket.map(format_rfc3339),
                    "episode_start": s.episode_start.map(format_rfc3339),
                })
            })
            .collect();
        o.insert("series".into(), Json::Array(list));
    }
    v
}

impl From<AlertError> for ApiError {
    fn from(e: AlertError) -> ApiError {
        match e {
            AlertError::Rule(r) => ApiError::Field(r.field.clone(), r.to_string()),
            AlertError::NotFound(id) => {
                ApiError::NotFound(format!("no alert rule {id:?} in this tenant"))
            }
            other => ApiError::Status(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

fn json_body(body: &Bytes) -> Result<Json, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body: not valid JSON: {e}")))
}

/// Makes a change durable: on disk, or, in Kafka mode, taken to be
/// published to the alert log (see [`replicate`]) once the lock is gone.
fn persist(
    s: &AppState,
    e: &mut tally_alert::Engine,
) -> Result<Vec<tally_alert::Change>, ApiError> {
    e.persist()?;
    s.shared.alert_wake.notify_one();
    Ok(e.take_changes())
}

/// Kafka mode: publishes a rule change to the alert log, so every node
/// has it; answers only once the broker has it.
async fn replicate(s: &AppState, changes: Vec<tally_alert::Change>) -> Result<(), ApiError> {
    let Some(k) = s.shared.kafka.as_ref() else {
        return Ok(());
    };
    if changes.is_empty() {
        return Ok(());
    }
    let changes = changes.into_iter().map(|c| (c.key, c.value)).collect();
    k.alert_log.publish(changes).await.map_err(|e| {
        ApiError::Unavailable(
            format!(
                "the change is made on this node but the Kafka brokers did not take it for the other nodes ({e}); send it again"
            ),
            5,
        )
    })
}

/// `POST /api/v1/alerts`: creates a rule (201), or updates the tenant's rule
/// of the same name (200).
pub(crate) async fn create(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    let body = json_body(&body)?;
    let tenant = caller.tenant_of(&pairs, &body)?;
    if let Some(m) = body.get("metric").and_then(Json::as_str)
        && tally_alert::rule::is_node_metric(m)
        && s.shared.kafka.is_none()
    {
        return Err(ApiError::Field(
            "metric".into(),
            format!(
                "{m:?} is the consumer lag of Kafka mode; this node runs on its embedded log, which has none (watch freshness with metric=count instead, or start the node with [kafka] brokers)"
            ),
        ));
    }
    check_dimensions(&s, &tenant, &body)?;
    let now = s.shared.clock.now_ms();
    let closed = s.shared.alert_closed.lock().get(&*tenant).copied();
    let (answer, created, changes) = {
        let mut e = s.shared.alerts.lock();
        let (rule, created) = e.upsert(&body, &tenant, now, closed)?;
        let changes = persist(&s, &mut e)?;
        let (r, st) = e.rule(&rule.id).expect("just stored");
        (view(r, st, now), created, changes)
    };
    replicate(&s, changes).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, axum::Json(answer)).into_response())
}

/// A rule's `where` and `group_by` name dimensions the tenant declared
/// (as on the metrics API); the rule's own parser checks the rest.
fn check_dimensions(s: &AppState, tenant: &str, body: &Json) -> Result<(), ApiError> {
    let store = s.shared.store.read();
    let dims = store.dimensions();
    let texts = |v: Option<&Json>| -> Vec<String> {
        match v {
            Some(Json::String(x)) => vec![x.clone()],
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    for w in texts(body.get("where")) {
        if let Ok((d, _)) = tally_store::parse_where(&w)
            && !dims.declares(tenant, &d)
        {
            return Err(ApiError::Field(
                "where".into(),
                format!(
                    "{d:?} is not a declared dimension; the declared dimensions are: {} (declare more under [dimensions] in the config)",
                    dims.describe(tenant)
                ),
            ));
        }
    }
    for g in texts(body.get("group_by"))
        .iter()
        .flat_map(|g| tally_store::parse_group_by(g))
    {
        if !dims.declares(tenant, &g) {
            return Err(ApiError::Field(
                "group_by".into(),
                format!(
                    "{g:?} is not a declared dimension; the declared dimensions are: {} (declare more under [dimensions] in the config)",
                    dims.describe(tenant)
                ),
            ));
        }
    }
    Ok(())
}

/// `GET /api/v1/alerts`: the tenant's rules with their states.
pub(crate) async fn list(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant(&query_pairs(&q))?;
    let now = s.shared.clock.now_ms();
    let e = s.shared.alerts.lock();
    let alerts: Vec<Json> = e
        .rules(Some(&tenant))
        .map(|(r, st)| view(r, st, now))
        .collect();
    Ok(axum::Json(json!({ "alerts": alerts })).into_response())
}

pub(crate) async fn get_one(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant(&query_pairs(&q))?;
    let e = s.shared.alerts.lock();
    match e.rule(&id) {
        Some((r, st)) if r.tenant == tenant => {
            Ok(axum::Json(view(r, st, s.shared.clock.now_ms())).into_response())
        }
        _ => Err(AlertError::NotFound(id).into()),
    }
}

/// `DELETE /api/v1/alerts/{id}`.
pub(crate) async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant(&query_pairs(&q))?;
    let (r, changes) = {
        let mut e = s.shared.alerts.lock();
        let r = e.delete(&tenant, &id)?;
        (r, persist(&s, &mut e)?)
    };
    replicate(&s, changes).await?;
    Ok(axum::Json(json!({ "deleted": r.id, "name": r.name })).into_response())
}

/// `POST /api/v1/alerts/{id}/silence` with `{"until": T}` or `{"for": "1h"}`:
/// no notifications until then (the rule keeps evaluating; an episode still
/// firing when the silence ends is notified then).
pub(crate) async fn silence(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    let body = json_body(&body)?;
    let tenant = caller.tenant(&pairs)?;
    let now = s.shared.clock.now_ms();
    let bad = ApiError::BadRequest;
    let until = match (body.get("until"), body.get("for")) {
        (Some(u), None) => {
            tally_alert::rule::time_value(u, "until").map_err(|e| bad(e.to_string()))?
        }
        (None, Some(Json::String(d))) => {
            now + tally_types::time::parse_duration_ms(d).ok_or_else(|| {
                bad(format!(
                    "for: {d:?} is not a duration like \"30m\" or \"2h\""
                ))
            })?
        }
        _ => {
            return Err(bad(
                "body: give {\"until\": \"2026-11-01T13:00:00Z\"} or {\"for\": \"1h\"}".into(),
            ));
        }
    };
    let (answer, changes) = {
        let mut e = s.shared.alerts.lock();
        let r = e.silence(&tenant, &id, Some(until))?;
        let changes = persist(&s, &mut e)?;
        let (r, st) = e.rule(&r.id).expect("just silenced");
        (view(r, st, now), changes)
    };
    replicate(&s, changes).await?;
    Ok(axum::Json(answer).into_response())
}

/// `DELETE /api/v1/alerts/{id}/silence`: lifts a silence.
pub(crate) async fn unsilence(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let tenant = caller.tenant(&query_pairs(&q))?;
    let now = s.shared.clock.now_ms();
    let (answer, changes) = {
        let mut e = s.shared.alerts.lock();
        let r = e.silence(&tenant, &id, None)?;
        let changes = persist(&s, &mut e)?;
        let (r, st) = e.rule(&r.id).expect("just changed");
        (view(r, st, now), changes)
    };
    replicate(&s, changes).await?;
    Ok(axum::Json(answer).into_response())
}

/// `GET /api/v1/alerts/history[?rule_id=][&limit=]`: state changes and
/// delivery outcomes, newest first.
pub(crate) async fn history(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(&q);
    let tenant = caller.tenant(&pairs)?;
    let limit = match one(&pairs, "limit") {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::BadRequest(format!("limit: {l:?} is not a whole number")))?,
    };
    let e = s.shared.alerts.lock();
    let h: Vec<Json> = e
        .history(&tenant, one(&pairs, "rule_id"), limit)
        .into_iter()
        .map(|h| h.to_json())
        .collect();
    Ok(axum::Json(json!({ "history": h })).into_response())
}
