//! PostHog's capture API (`/batch/`, `/capture/`, `/e/`, `/i/v0/e/`,
//! `/track/`, with or without the trailing slash), so PostHog's SDKs send
//! to Tally unchanged. Bodies are JSON (gzip too): `{"api_key", "batch":
//! [...], "sent_at"}`, one event object, or an array of them. Each event
//! goes through the ingest path of `POST /api/v1/events`.
//!
//! The project API key travels in the body (`api_key`, or `token` in the
//! event or its properties): in keyed mode it is a Tally key with the
//! `ingest` scope (an `Authorization` header works too); in open mode it
//! is ignored and the tenant is `?tenant=` or the default one.
//!
//! Mapping:
//! - `uuid` → `event_id` (absent: a hash of the event);
//! - `event` → `event_type`: `$pageview` → `page_view`, `$screen` →
//!   `screen_view`, `$identify` → `identify`, any other `$name` without
//!   its `$`, and names normalised as for Segment (`"Order Completed"` →
//!   `order_completed`);
//! - `distinct_id` (top level or in `properties`) → `user_id`;
//! - `properties.$session_id` → `session_id`;
//! - `timestamp`, corrected for the sender's clock by `sent_at` as PostHog
//!   does (timestamp + receive time − sent_at), or `offset` (ms before
//!   receipt); without any, the receive time;
//! - `properties` → `properties` (without `token`, `api_key` and
//!   `distinct_id`), and `$set` / `$set_once` under those names.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value as Json, json};
use tally_types::Millis;
use tally_types::time::parse_rfc3339;

use crate::auth::Caller;
use crate::http::{
    ApiError, AppState, Mapped, default_tenant, ingest_response, mapped_event, query_pairs,
    read_ingest_body, tenancy,
};

/// The capture paths PostHog's SDKs post to.
pub(crate) const PATHS: [&str; 10] = [
    "/batch",
    "/batch/",
    "/capture",
    "/capture/",
    "/e",
    "/e/",
    "/i/v0/e",
    "/i/v0/e/",
    "/track",
    "/track/",
];

/// `POST /batch/` and the other capture paths.
pub(crate) async fn capture(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let pairs = query_pairs(&q);
    let body = read_ingest_body(&s, &headers, body).await?;
    let msg: Json = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body: not JSON ({e}); send PostHog's JSON capture body ({{\"api_key\", \"batch\": [...]}} or one event), gzip allowed"
        ))
    })?;
    let sent_at = msg
        .get("sent_at")
        .and_then(Json::as_str)
        .map(str::to_string);
    let (events, key): (Vec<Json>, Option<String>) = match &msg {
        Json::Array(list) => (list.clone(), None),
        Json::Object(o) => match o.get("batch") {
            Some(Json::Array(list)) => (list.clone(), None),
            Some(_) => {
                return Err(ApiError::Field(
                    "batch".into(),
                    "batch: must be an array of PostHog events".into(),
                ));
            }
            None => (vec![msg.clone()], None),
        },
        _ => {
            return Err(ApiError::BadRequest(
                "body: expected a JSON object (an event, or {\"batch\": [...]}) or an array of events"
                    .into(),
            ));
        }
    };
    let key = key
        .or_else(|| project_key(&msg))
        .or_else(|| events.iter().find_map(project_key));
    let caller = authorize(&s, caller, key.as_deref())?;
    let default_tenant = default_tenant(&caller, &pairs)?;
    let tenancy = tenancy(&caller, &default_tenant);
    let now = s.shared.clock.now_ms();
    let mut mapped = Mapped::new(body.len(), events.len(), &caller, &default_tenant);
    for (i, m) in events.iter().enumerate() {
        mapped.push(i, m, to_event(m, sent_at.as_deref(), now))?;
    }
    let (status, mut answer) = mapped.ingest(&s, &pairs, tenancy, started).await?;
    // PostHog answers `{"status": 1}`; Tally's counts come along.
    answer["status"] = json!(1);
    Ok(ingest_response(status, answer))
}

/// The project API key a body carries: `api_key`, or `token` (top level
/// or in `properties`).
fn project_key(v: &Json) -> Option<String> {
    let s = |x: Option<&Json>| {
        x.and_then(Json::as_str)
            .filter(|k| !k.is_empty())
            .map(str::to_string)
    };
    s(v.get("api_key"))
        .or_else(|| s(v.get("token")))
        .or_else(|| s(v.get("properties").and_then(|p| p.get("token"))))
}

/// In keyed mode the project key is a Tally key with the `ingest` scope
/// (unless an `Authorization` header already gave one).
fn authorize(s: &AppState, caller: Caller, key: Option<&str>) -> Result<Caller, ApiError> {
    if !s.keys.keyed() {
        return Ok(caller);
    }
    let k = match caller {
        Caller::Key(k) => k,
        Caller::Open => {
            let Some(secret) = key else {
                return Err(ApiError::Status(
                    StatusCode::UNAUTHORIZED,
                    "missing API key: PostHog's api_key (or token) must be a Tally key with the ingest scope".into(),
                ));
            };
            s.keys
                .get(&crate::auth::digest(secret))
                .cloned()
                .ok_or_else(|| {
                    ApiError::Status(
                        StatusCode::UNAUTHORIZED,
                        "unknown API key in api_key: use a Tally key with the ingest scope as the PostHog project key".into(),
                    )
                })?
        }
    };
    if !k.allows(crate::auth::Scope::Ingest) {
        return Err(ApiError::Status(
            StatusCode::FORBIDDEN,
            "this API key lacks the \"ingest\" scope that PostHog capture needs".into(),
        ));
    }
    Ok(Caller::Key(k))
}

/// One PostHog event as a Tally event.
fn to_event(m: &Json, sent_at: Option<&str>, now: Millis) -> Result<Json, String> {
    let obj = m
        .as_object()
        .ok_or_else(|| "a PostHog event must be a JSON object".to_string())?;
    let name = obj
        .get("event")
        .and_then(Json::as_str)
        .ok_or_else(|| "event: a PostHog event names its event".to_string())?;
    let event_type =
        event_type(name).ok_or_else(|| format!("event: {name:?} has no letter or digit"))?;
    let event_id = match obj.get("uuid").and_then(Json::as_str) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!(
            "posthog-{:016x}",
            tally_types::stable_hash(&[m.to_string().as_bytes()])
        ),
    };
    let mut props = match obj.get("properties") {
        Some(Json::Object(p)) => p.clone(),
        _ => Map::new(),
    };
    let text = |v: Option<&Json>| match v {
        Some(Json::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Json::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let user = text(obj.get("distinct_id")).or_else(|| text(props.get("distinct_id")));
    let session = text(props.get("$session_id"));
    for k in ["token", "api_key", "distinct_id"] {
        props.remove(k);
    }
    for k in ["$set", "$set_once"] {
        if let Some(v) = obj.get(k) {
            props.entry(k).or_insert_with(|| v.clone());
        }
    }
    let ts = timestamp(obj, sent_at, now);
    Ok(mapped_event(event_id, event_type, ts, props, user, session))
}

/// PostHog's event names as Tally event types.
pub(crate) fn event_type(name: &str) -> Option<String> {
    match name {
        "$pageview" => Some("page_view".into()),
        "$screen" => Some("screen_view".into()),
        "$identify" => Some("identify".into()),
        other => crate::segment::event_type(other.trim_start_matches('$')),
    }
}

/// When the event happened: its `timestamp`, shifted by the sender's clock
/// error when the body says when it was sent; `now − offset` with an
/// `offset`; else the receive time.
fn timestamp(obj: &Map<String, Json>, sent_at: Option<&str>, now: Millis) -> Millis {
    let at = |v: Option<&str>| v.and_then(|s| parse_rfc3339(s).ok());
    let sent = at(obj.get("sent_at").and_then(Json::as_str)).or_else(|| at(sent_at));
    match at(obj.get("timestamp").and_then(Json::as_str)) {
        Some(ts) => match sent {
            Some(sent) => ts + (now - sent),
            None => ts,
        },
        None => match obj.get("offset").and_then(Json::as_i64) {
            Some(off) if off >= 0 => now - off,
            _ => now,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_types::time::format_rfc3339;

    #[test]
    fn posthog_names_map_to_event_types() {
        assert_eq!(event_type("$pageview").as_deref(), Some("page_view"));
        assert_eq!(event_type("$screen").as_deref(), Some("screen_view"));
        assert_eq!(event_type("$autocapture").as_deref(), Some("autocapture"));
        assert_eq!(
            event_type("Order Completed").as_deref(),
            Some("order_completed")
        );
        assert_eq!(event_type("$"), None);
    }

    #[test]
    fn events_map_with_users_sessions_and_clock_correction() {
        let now = 1_793_534_400_000;
        let m = json!({"event": "$pageview", "uuid": "u-1", "distinct_id": "d1",
            "timestamp": "2026-11-01T11:59:00Z",
            "properties": {"$session_id": "s1", "$current_url": "https://x/", "token": "secret"},
            "$set": {"plan": "pro"}});
        let e = to_event(&m, Some("2026-11-01T11:59:30Z"), now).unwrap();
        assert_eq!(e["event_id"], "u-1");
        assert_eq!(e["event_type"], "page_view");
        assert_eq!(e["user_id"], "d1");
        assert_eq!(e["session_id"], "s1");
        assert_eq!(e["timestamp"], "2026-11-01T11:59:30Z");
        assert_eq!(e["properties"]["$current_url"], "https://x/");
        assert_eq!(e["properties"]["$set"]["plan"], "pro");
        assert!(
            e["properties"].get("token").is_none(),
            "the key is not kept"
        );
        let o = to_event(
            &json!({"event": "x", "offset": 1500, "properties": {"distinct_id": 7}}),
            None,
            now,
        )
        .unwrap();
        assert_eq!(o["timestamp"], format_rfc3339(now - 1500));
        assert_eq!(o["user_id"], "7");
        assert_eq!(
            to_event(&json!({"event": "x"}), None, now).unwrap()["event_id"],
            to_event(&json!({"event": "x"}), None, now).unwrap()["event_id"],
            "the same event keeps its id"
        );
        assert!(to_event(&json!({"properties": {}}), None, now).is_err());
    }
}
