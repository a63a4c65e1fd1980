//! `GET /api/v1/live`: the dashboard's WebSocket. After connecting, the
//! client gets a `hello`, then the tenant's last hour of per-minute counts by
//! event type (`buckets` with `"full": true`), and from then on only what
//! changed: `buckets` with the minutes whose counts moved (checked 4 times a
//! second, only when the processor applied something), `status` once a
//! second, and `alerts` when a rule or its state changes. The client may send
//! `{"tenant": "x"}` to switch tenant.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use tally_stream::DlqKind;
use tally_types::time::{MINUTE_MS, format_rfc3339};

use crate::auth::Caller;
use crate::http::{ApiError, AppState, query_pairs};

/// Minutes of history the live charts show.
const WINDOW_MINUTES: i64 = 60;

pub(crate) async fn live(
    State(s): State<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // A page of another site must not read the feed through the user's
    // browser: only the server's own pages and `auth.cors-origins`.
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok());
        if !crate::auth::ws_origin_allowed(&s.keys, origin, host) {
            return Err(ApiError::Status(
                axum::http::StatusCode::FORBIDDEN,
                format!(
                    "Origin {origin:?} may not open the live feed; add it to auth.cors-origins"
                ),
            ));
        }
    }
    let tenant = caller.tenant(&query_pairs(&q))?;
    Ok(ws
        .on_upgrade(move |socket| feed(s, caller, tenant, socket))
        .into_response())
}

/// Per-minute counts by (event type, minute) of a tenant's last hour of data.
type Counts = HashMap<(Box<str>, i64), u64>;

fn counts(s: &AppState, tenant: &str) -> (Counts, Option<i64>) {
    let store = s.shared.store.read();
    let mut out = Counts::new();
    let Some((_, last)) = store.span(tenant) else {
        return (out, None);
    };
    let from = last - (WINDOW_MINUTES - 1) * MINUTE_MS;
    for (minute, bucket) in store.tenant_minutes(tenant, from, last + MINUTE_MS) {
        for (ty, agg) in &bucket.types {
            out.insert((ty.clone(), minute), agg.count);
        }
    }
    (out, Some(last))
}

fn buckets_msg(
    tenant: &str,
    changed: Vec<(&str, i64, u64)>,
    last: Option<i64>,
    full: bool,
) -> Json {
    let updates: Vec<Json> = changed
        .into_iter()
        .map(|(ty, m, n)| json!({"event_type": ty, "bucket": format_rfc3339(m), "ts": m, "count": n}))
        .collect();
    json!({
        "type": "buckets",
        "tenant": tenant,
        "granularity": "1m",
        "full": full,
        "last": last,
        "updates": updates,
    })
}

struct Rate {
    at: Instant,
    /// The tenant the rate is of (a new one starts a new baseline).
    tenant: String,
    accepted: u64,
    rate: f64,
}

/// Pipeline status for the page's KPI row: the selected tenant's ingest
/// rate, counts, clock, dead letters and alerts; the processing lag and
/// freshness are the node's. Without a key (open mode) the node's own
/// totals come along under `node`, and `tenants` lists every tenant; with
/// one, only the key's tenant is ever shown.
fn status_msg(s: &AppState, caller: &Caller, tenant: &str, rate: &mut Rate) -> Json {
    let sh = &s.shared;
    let tel = &sh.telemetry;
    let v = crate::http::snapshot(s);
    let now = v.now_ms;
    let only = caller.key_tenant();
    let t = only.unwrap_or(tenant);
    let view = sh.processor.lock();
    let c = view.tenant_counts.get(t).copied().unwrap_or_default();
    let watermark = view.watermarks.get(t).copied();
    drop(view);
    let (malformed, late_held) = {
        let d = sh.dlq.lock();
        (
            d.held_of(t, DlqKind::Malformed) as u64,
            d.held_of(t, DlqKind::Late) as u64,
        )
    };
    let accepted = c.counted + c.duplicates + c.late;
    let dt = rate.at.elapsed().as_secs_f64();
    if rate.tenant != t {
        *rate = Rate {
            at: Instant::now(),
            tenant: t.to_string(),
            accepted,
            rate: 0.0,
        };
    } else if dt >= 0.5 {
        rate.rate = (accepted.saturating_sub(rate.accepted)) as f64 / dt;
        rate.at = Instant::now();
        rate.accepted = accepted;
    }
    let (tenants, dimensions): (Vec<String>, Vec<String>) = {
        let store = sh.store.read();
        (
            store
                .tenants()
                .filter(|x| only.is_none_or(|o| o == *x))
                .map(String::from)
                .collect(),
            store
                .dimensions()
                .of(t)
                .iter()
                .map(|d| d.to_string())
                .collect(),
        )
    };
    let (rules, firing) = {
        let e = sh.alerts.lock();
        let firing = e
            .rules(Some(t))
            .filter(|(_, st)| st.state == tally_alert::State::Firing)
            .count();
        (e.rules(Some(t)).count(), firing)
    };
    let mut msg = json!({
        "type": "status",
        "tenant": t,
        "now": format_rfc3339(now),
        "ingest_rate": rate.rate.round(),
        "accepted": accepted,
        "rejected": malformed,
        "counted": c.counted,
        "duplicates": c.duplicates,
        "late": c.late,
        "processing_lag_ms": tel.processing_lag_ms.load(Relaxed),
        "behind_records": v.behind_records(),
        "watermark": watermark.map(format_rfc3339),
        "watermark_lag_ms": watermark.map(|w| now - w),
        "freshness_ms": tel.freshness_ms(now),
        "dlq": {"malformed": malformed, "late": late_held},
        "alerts": {"rules": rules, "firing": firing},
        "tenants": tenants,
        "dimensions": dimensions,
        "ready": v.ready,
    });
    if only.is_none() {
        msg["node"] = json!({
            "accepted": tel.events_accepted.load(Relaxed),
            "rejected": tel.events_rejected.load(Relaxed),
            "counted": v.counted,
            "duplicates": v.duplicates,
            "late": v.late,
            "watermark": v.watermark_ms.map(format_rfc3339),
            "dlq": {"malformed": v.dlq_malformed_total, "late": v.dlq_late_total},
        });
    }
    msg
}

fn alerts_msg(s: &AppState, tenant: &str) -> (u64, Json) {
    let now = s.shared.clock.now_ms();
    let e = s.shared.alerts.lock();
    let rules: Vec<Json> = e
        .rules(Some(tenant))
        .map(|(r, st)| crate::http_alerts::view(r, st, now))
        .collect();
    let history: Vec<Json> = e
        .history(tenant, None, 20)
        .into_iter()
        .map(|h| h.to_json())
        .collect();
    (
        e.version,
        json!({"type": "alerts", "tenant": tenant, "alerts": rules, "history": history}),
    )
}

async fn send(socket: &mut WebSocket, v: &Json) -> bool {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .is_ok()
}

async fn feed(s: AppState, caller: Caller, mut tenant: String, mut socket: WebSocket) {
    let mut rate = Rate {
        at: Instant::now(),
        tenant: String::new(),
        accepted: 0,
        rate: 0.0,
    };
    let hello = json!({"type": "hello", "tenant": tenant, "window_minutes": WINDOW_MINUTES});
    if !send(&mut socket, &hello).await {
        return;
    }
    let mut prev = Counts::new();
    let mut full = true;
    let mut seen_applied = u64::MAX;
    let mut seen_alerts = 0u64;
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let applied = s.shared.applied.load(Relaxed);
                if applied != seen_applied || full {
                    seen_applied = applied;
                    let (now, last) = counts(&s, &tenant);
                    let mut changed: Vec<(&str, i64, u64)> = now
                        .iter()
                        .filter(|(k, n)| full || prev.get(*k) != Some(n))
                        .map(|((ty, m), n)| (&**ty, *m, *n))
                        .collect();
                    changed.sort_unstable();
                    if full || !changed.is_empty() {
                        let msg = buckets_msg(&tenant, changed, last, full);
                        if !send(&mut socket, &msg).await {
                            return;
                        }
                    }
                    full = false;
                    prev = now;
                }
                if last_status.elapsed() >= Duration::from_secs(1) {
                    last_status = Instant::now();
                    let msg = status_msg(&s, &caller, &tenant, &mut rate);
                    if !send(&mut socket, &msg).await {
                        return;
                    }
                }
                let version = s.shared.alerts.lock().version;
                if version != seen_alerts {
                    let (v, msg) = alerts_msg(&s, &tenant);
                    seen_alerts = v;
                    if !send(&mut socket, &msg).await {
                        return;
                    }
                }
            }
            msg = socket.recv() => {
                match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(v) = serde_json::from_str::<Json>(&t)
                            && let Some(t) = v.get("tenant").and_then(Json::as_str)
                            && tally_types::valid_tenant(t)
                        {
                            if caller.key_tenant().is_some_and(|k| k != t) {
                                let msg = json!({"type": "error", "error": format!("tenant: this API key cannot reach tenant {t:?}")});
                                if !send(&mut socket, &msg).await {
                                    return;
                                }
                                continue;
                            }
                            tenant = t.to_string();
                            full = true;
                            seen_alerts = 0;
                            prev.clear();
                            // The KPI row follows at once.
                            last_status = Instant::now() - Duration::from_secs(10);
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}
