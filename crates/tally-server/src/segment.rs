//! The Segment HTTP tracking API (`/v1/batch`, `/v1/track`, `/v1/page`,
//! `/v1/screen`, `/v1/identify`, `/v1/group`, `/v1/alias`), so Segment's
//! SDKs and anything that speaks to Segment send to Tally unchanged. Each
//! message becomes one Tally event and goes through the ingest path of
//! `POST /api/v1/events` (validation, dedupe, quotas, the durable ack).
//!
//! Mapping:
//! - `messageId` → `event_id` (absent: a hash of the message, so a retried
//!   message is still one event);
//! - `track`: `event` → `event_type`, normalised (see [`event_type`]);
//!   `page` → `page_view`, `screen` → `screen_view`, and `identify`,
//!   `group`, `alias` as they are;
//! - `userId`, else `anonymousId` → `user_id`;
//! - `timestamp` (else `originalTimestamp`) → `timestamp`, corrected for
//!   the sender's clock by `sentAt` as Segment does (timestamp + receive
//!   time − sentAt); without any, the receive time;
//! - `properties` (`traits` for identify and group), plus `name` of page
//!   and screen calls, and `context` flattened as `context.<path>`.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Map, Value as Json, json};
use tally_types::Millis;
use tally_types::time::parse_rfc3339;

use crate::auth::Caller;
use crate::http::{
    ApiError, AppState, Mapped, default_tenant, ingest_response, mapped_event, query_pairs,
    read_ingest_body, tenancy,
};

/// The Segment calls Tally takes.
const CALLS: [&str; 7] = [
    "track", "page", "screen", "identify", "group", "alias", "batch",
];

/// `POST /v1/<call>`.
pub(crate) async fn call(
    State(s): State<AppState>,
    caller: Caller,
    Path(kind): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !CALLS.contains(&kind.as_str()) {
        return Err(ApiError::NotFound(format!(
            "/v1/{kind} is not a Segment call Tally takes; use /v1/batch, /v1/track, /v1/page, /v1/screen, /v1/identify, /v1/group or /v1/alias"
        )));
    }
    let started = std::time::Instant::now();
    let pairs = query_pairs(&q);
    let default_tenant = default_tenant(&caller, &pairs)?;
    let tenancy = tenancy(&caller, &default_tenant);
    let body = read_ingest_body(&s, &headers, body).await?;
    let msg: Json = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("body: not JSON ({e}); send a Segment message"))
    })?;
    let now = s.shared.clock.now_ms();
    let messages: Vec<(Json, Option<&str>)> = if kind == "batch" {
        let Some(batch) = msg.get("batch").and_then(Json::as_array) else {
            return Err(ApiError::Field(
                "batch".into(),
                "batch: required, an array of Segment messages".into(),
            ));
        };
        let sent_at = msg.get("sentAt").and_then(Json::as_str);
        batch.iter().map(|m| (m.clone(), sent_at)).collect()
    } else {
        vec![(msg.clone(), None)]
    };
    // Each message's line, or why it made none (answered as rejected, by
    // its index in the call).
    let mut mapped = Mapped::new(body.len(), messages.len(), &caller, &default_tenant);
    for (i, (m, batch_sent)) in messages.iter().enumerate() {
        let call = if kind == "batch" {
            m.get("type").and_then(Json::as_str).unwrap_or("track")
        } else {
            kind.as_str()
        };
        mapped.push(i, m, to_event(m, call, *batch_sent, now))?;
    }
    let (status, mut answer) = mapped.ingest(&s, &pairs, tenancy, started).await?;
    // Segment's answer is `{"success": true}`; Tally's counts come along.
    let ok = status.is_success() && answer["rejected"].as_u64() == Some(0);
    answer["success"] = json!(ok);
    Ok(ingest_response(status, answer))
}

/// One Segment message as a Tally event.
fn to_event(m: &Json, call: &str, batch_sent: Option<&str>, now: Millis) -> Result<Json, String> {
    let obj = m
        .as_object()
        .ok_or_else(|| "a Segment message must be a JSON object".to_string())?;
    let event_type = match call {
        "track" => {
            let name = obj
                .get("event")
                .and_then(Json::as_str)
                .ok_or_else(|| "event: a track call names its event".to_string())?;
            event_type(name).ok_or_else(|| format!("event: {name:?} has no letter or digit"))?
        }
        "page" => "page_view".into(),
        "screen" => "screen_view".into(),
        "identify" | "group" | "alias" => call.to_string(),
        other => return Err(format!("type: {other:?} is not a Segment call")),
    };
    let event_id = match obj.get("messageId").and_then(Json::as_str) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => format!(
            "segment-{:016x}",
            tally_types::stable_hash(&[m.to_string().as_bytes()])
        ),
    };
    let user = ["userId", "anonymousId"]
        .iter()
        .find_map(|k| match obj.get(*k) {
            Some(Json::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Json::Number(n)) => Some(n.to_string()),
            _ => None,
        });
    let ts = timestamp(obj, batch_sent, now);
    let mut props = Map::new();
    let source = if matches!(call, "identify" | "group") {
        "traits"
    } else {
        "properties"
    };
    if let Some(Json::Object(p)) = obj.get(source) {
        props.extend(p.clone());
    }
    if matches!(call, "page" | "screen")
        && let Some(name) = obj.get("name").filter(|n| n.is_string())
    {
        props.entry("name").or_insert_with(|| name.clone());
    }
    if call == "group"
        && let Some(g) = obj.get("groupId")
    {
        props.insert("group_id".into(), g.clone());
    }
    if call == "alias"
        && let Some(p) = obj.get("previousId")
    {
        props.insert("previous_id".into(), p.clone());
    }
    if let Some(Json::Object(c)) = obj.get("context") {
        flatten("context", c, &mut props);
    }
    Ok(mapped_event(event_id, event_type, ts, props, user, None))
}

/// Segment's event names are free text ("Order Completed"); Tally's event
/// types are `[A-Za-z0-9_.:-]{1,64}`. Lower case, every other run of
/// characters one `_`, none at the ends, at most 64 characters:
/// "Order Completed" → `order_completed`.
pub(crate) fn event_type(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-') {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_');
    let out: String = out.chars().take(64).collect();
    let out = out.trim_end_matches('_').to_string();
    (!out.is_empty()).then_some(out)
}

/// When the event happened: its `timestamp` (else `originalTimestamp`),
/// shifted by the sender's clock error when it says when it sent
/// (`sentAt`: receive time − sentAt is that error); else the receive time.
fn timestamp(obj: &Map<String, Json>, batch_sent: Option<&str>, now: Millis) -> Millis {
    let at = |k: &str| {
        obj.get(k)
            .and_then(Json::as_str)
            .and_then(|s| parse_rfc3339(s).ok())
    };
    let Some(ts) = at("timestamp").or_else(|| at("originalTimestamp")) else {
        return now;
    };
    let sent = at("sentAt").or_else(|| batch_sent.and_then(|s| parse_rfc3339(s).ok()));
    match sent {
        Some(sent) => ts + (now - sent),
        None => ts,
    }
}

/// `context: {"ip": .., "library": {"name": ..}}` → `context.ip`,
/// `context.library.name`; arrays are kept as values.
fn flatten(prefix: &str, obj: &Map<String, Json>, out: &mut Map<String, Json>) {
    for (k, v) in obj {
        let key = format!("{prefix}.{k}");
        match v {
            Json::Object(o) => flatten(&key, o, out),
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_types::time::format_rfc3339;

    #[test]
    fn event_names_normalise_to_event_types() {
        assert_eq!(
            event_type("Order Completed").as_deref(),
            Some("order_completed")
        );
        assert_eq!(event_type("  Signed Up!! ").as_deref(), Some("signed_up"));
        assert_eq!(
            event_type("checkout:step-2").as_deref(),
            Some("checkout:step-2")
        );
        assert_eq!(event_type("Ünïcode ok").as_deref(), Some("n_code_ok"));
        assert_eq!(event_type("!!!"), None);
        assert_eq!(event_type(&"a".repeat(100)).map(|s| s.len()), Some(64));
    }

    #[test]
    fn messages_map_to_events() {
        let now = 1_793_534_400_000;
        let m = json!({"type": "track", "event": "Order Completed", "messageId": "m1",
            "anonymousId": "anon", "timestamp": "2026-11-01T11:59:00Z", "sentAt": "2026-11-01T11:59:30Z",
            "properties": {"revenue": 12.5}, "context": {"ip": "1.2.3.4", "library": {"name": "x"}}});
        let e = to_event(&m, "track", None, now).unwrap();
        assert_eq!(e["event_id"], "m1");
        assert_eq!(e["event_type"], "order_completed");
        assert_eq!(e["user_id"], "anon");
        // The sender's clock was 30 s behind: 11:59:00 + 30 s.
        assert_eq!(e["timestamp"], "2026-11-01T11:59:30Z");
        assert_eq!(e["properties"]["revenue"], 12.5);
        assert_eq!(e["properties"]["context.library.name"], "x");
        assert_eq!(e["properties"]["context.ip"], "1.2.3.4");
        let p = to_event(&json!({"userId": "u", "name": "Home"}), "page", None, now).unwrap();
        assert_eq!(
            (p["event_type"].as_str(), p["properties"]["name"].as_str()),
            (Some("page_view"), Some("Home"))
        );
        assert_eq!(
            p["timestamp"],
            format_rfc3339(now),
            "no timestamp: the receive time"
        );
        let again = to_event(&json!({"userId": "u", "name": "Home"}), "page", None, now).unwrap();
        assert_eq!(
            p["event_id"], again["event_id"],
            "the same message keeps its id"
        );
        let i = to_event(
            &json!({"userId": "u", "traits": {"plan": "pro"}}),
            "identify",
            None,
            now,
        )
        .unwrap();
        assert_eq!(i["properties"]["plan"], "pro");
        assert!(to_event(&json!({"userId": "u"}), "track", None, now).is_err());
    }
}
