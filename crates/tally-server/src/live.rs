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
    accepted: u64,
    rate: f64,
}

/// Pipeline status; with a key, the tenant list and alert counts are the
/// key's tenant's only.
fn status_msg(s: &AppState, caller: &Caller, rate: &mut Rate) -> Json {
    let sh = &s.shared;
    let tel = &sh.telemetry;
    let v = crate::http::snapshot(s);
    let now = v.now_ms;
    let only = caller.key_tenant();
    // A key sees its tenant's counts, clock and dead letters, never the
    // server's (other tenants' volume is not its business).
    let (accepted, rejected, counted, duplicates, late, watermark, dlq) = match only {
        Some(t) => {
            let view = sh.processor.lock();
            let c = view.tenant_counts.get(t).copied().unwrap_or_default();
            let wm = view.watermarks.get(t).copied();
            drop(view);
            let d = sh.dlq.lock();
            let (m, l) = (
                d.held_of(t, DlqKind::Malformed),
                d.held_of(t, DlqKind::Late),
            );
            let accepted = c.counted + c.duplicates + c.late;
            (
                accepted,
                m as u64,
                c.counted,
                c.duplicates,
                c.late,
                wm,
                (m as u64, l as u64),
            )
        }
        None => (
            tel.events_accepted.load(Relaxed),
            tel.events_rejected.load(Relaxed),
            v.counted,
            v.duplicates,
            v.late,
            v.watermark_ms,
            (v.dlq_malformed_total, v.dlq_late_total),
        ),
    };
    let dt = rate.at.elapsed().as_secs_f64();
    if dt >= 0.5 {
        rate.rate = (accepted.saturating_sub(rate.accepted)) as f64 / dt;
        rate.at = Instant::now();
        rate.accepted = accepted;
    }
    let tenants: Vec<String> = sh
        .store
        .read()
        .tenants()
        .filter(|t| only.is_none_or(|o| o == *t))
        .map(String::from)
        .collect();
    let (rules, firing) = {
        let e = sh.alerts.lock();
        let firing = e
            .rules(only)
            .filter(|(_, st)| st.state == tally_alert::State::Firing)
            .count();
        (e.rules(only).count(), firing)
    };
    json!({
        "type": "status",
        "now": format_rfc3339(now),
        "ingest_rate": rate.rate.round(),
        "accepted": accepted,
        "rejected": rejected,
        "counted": counted,
        "duplicates": duplicates,
        "late": late,
        "processing_lag_ms": tel.processing_lag_ms.load(Relaxed),
        "behind_records": v.behind_records(),
        "watermark": watermark.map(format_rfc3339),
        "watermark_lag_ms": watermark.map(|w| now - w),
        "freshness_ms": tel.freshness_ms(now),
        "dlq": {"malformed": dlq.0, "late": dlq.1},
        "alerts": {"rules": rules, "firing": firing},
        "tenants": tenants,
        "ready": v.ready,
    })
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
        accepted: s.shared.telemetry.events_accepted.load(Relaxed),
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
                    let msg = status_msg(&s, &caller, &mut rate);
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
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}
