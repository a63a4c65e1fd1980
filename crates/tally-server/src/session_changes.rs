//! Session corrections: events the processor applied behind a tenant's
//! watermark may extend a session that had closed, or join two into one.
//! This task takes those events ("touches") from the store, reads each
//! touched key's sessions from the raw events with and without them, and
//! appends what changed to the store's session change log, which
//! `GET /api/v1/changes` lists with the bucket changes.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::pipeline::Shared;
use tally_query::{QueryEngine, SessionKey, SessionRow};
use tally_store::{DEFAULT_SESSION_GAP_MS, SessionChange, SessionSummary, SessionTouch};
use tally_types::Millis;

/// How often touches are looked at.
const EVERY: Duration = Duration::from_millis(250);
/// Wall time a round may spend reading sessions (the rest wait for the
/// next round): the task takes at most a fifth of one SQL thread, however
/// many late events arrive.
const ROUND_BUDGET: Duration = Duration::from_millis(50);
/// Keys waiting at most; touches of further keys are dropped (counted in
/// `tally_session_keys_skipped_total`): a flood of late events must not
/// grow this task's memory or its backlog without bound.
const MAX_PENDING: usize = 10_000;
/// Rounds a key waits for its events to be visible in the raw events
/// before its change is worked out with what is visible.
const MAX_TRIES: u32 = 40;

/// The events of one key waiting to be looked at.
struct Pending {
    touches: Vec<SessionTouch>,
    tries: u32,
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    engine: Arc<QueryEngine>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut pending: BTreeMap<(Box<str>, SessionKey), Pending> = BTreeMap::new();
    let mut cursor: Option<(Box<str>, SessionKey)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stopped.changed() => return,
        }
        let touches = shared.store.write().take_session_touches();
        let tel = &shared.telemetry;
        tel.session_touches.fetch_add(touches.len() as u64, Relaxed);
        for t in touches {
            let key = match (&t.session_id, &t.user_id) {
                (Some(s), _) => SessionKey::Session(s.to_string()),
                (None, Some(u)) => SessionKey::User(u.to_string()),
                (None, None) => continue,
            };
            let k = (t.tenant.clone(), key);
            if !pending.contains_key(&k) && pending.len() >= MAX_PENDING {
                tel.session_keys_skipped.fetch_add(1, Relaxed);
                continue;
            }
            pending
                .entry(k)
                .or_insert_with(|| Pending {
                    touches: Vec::new(),
                    tries: 0,
                })
                .touches
                .push(t);
        }
        // From where the last round stopped, so no key waits behind others
        // that keep the budget busy.
        let keys: Vec<(Box<str>, SessionKey)> = match &cursor {
            Some(c) => pending
                .range((Excluded(c.clone()), Unbounded))
                .chain(pending.range(..=c.clone()))
                .map(|(k, _)| k.clone())
                .collect(),
            None => pending.keys().cloned().collect(),
        };
        let round = std::time::Instant::now();
        let mut changes = Vec::new();
        for k in keys {
            if round.elapsed() >= ROUND_BUDGET {
                break;
            }
            cursor = Some(k.clone());
            let Some(p) = pending.get_mut(&k) else {
                continue;
            };
            p.tries += 1;
            let exclude: HashSet<String> =
                p.touches.iter().map(|t| t.event_id.to_string()).collect();
            let from = p.touches.iter().map(|t| t.ts).min().unwrap_or_default();
            let to = p.touches.iter().map(|t| t.ts).max().unwrap_or_default() + 1;
            let pair = engine
                .session_pair(
                    &k.0,
                    k.1.clone(),
                    from,
                    to,
                    DEFAULT_SESSION_GAP_MS,
                    exclude.clone(),
                )
                .await;
            let pair = match pair {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(tenant = %k.0, key = ?k.1, error = %e, "cannot read sessions to find their corrections; skipped");
                    pending.remove(&k);
                    continue;
                }
            };
            // Not every event visible in the raw events yet: next round.
            if pair.seen < exclude.len() && p.tries < MAX_TRIES {
                continue;
            }
            let Some(p) = pending.remove(&k) else {
                continue;
            };
            tel.session_keys_checked.fetch_add(1, Relaxed);
            let watermark = p.touches.iter().map(|t| t.watermark).max().unwrap_or(0);
            let at = p.touches.iter().map(|t| t.at).max().unwrap_or(0);
            let closed_to = watermark.saturating_sub(DEFAULT_SESSION_GAP_MS);
            for c in tally_query::session_changes(&pair.before, &pair.after, closed_to) {
                let any = c.new.as_ref().or(c.old.as_ref()).expect("one side");
                changes.push(SessionChange {
                    version: 0,
                    tenant: k.0.clone(),
                    session_id: any.session_id.clone(),
                    user_id: any.user_id.clone(),
                    old: c.old.as_ref().map(summary),
                    new: c.new.as_ref().map(summary),
                    replaced_by: c.replaced_by,
                    at,
                });
            }
        }
        if !changes.is_empty() {
            tel.session_changes.fetch_add(changes.len() as u64, Relaxed);
            tracing::debug!(changes = changes.len(), "session corrections");
            shared.store.write().push_session_changes(changes);
        }
    }
}

fn summary(r: &SessionRow) -> SessionSummary {
    SessionSummary {
        session_id: r.session_id.clone(),
        derived: r.derived,
        user_id: r.user_id.clone(),
        start: r.start,
        end: r.end,
        events: r.events,
        first_page: r.first_page.clone(),
        last_page: r.last_page.clone(),
        event_types: r.event_types.iter().cloned().collect(),
    }
}

/// A session as `GET /api/v1/changes` shows it (the fields of the SQL
/// table `sessions`).
pub(crate) fn session_json(s: &SessionSummary) -> serde_json::Value {
    use tally_types::time::format_rfc3339;
    let duration: Millis = s.end - s.start;
    serde_json::json!({
        "session_id": s.session_id,
        "user_id": s.user_id,
        "start": format_rfc3339(s.start),
        "end": format_rfc3339(s.end),
        "duration_ms": duration,
        "events": s.events,
        "first_page": s.first_page,
        "last_page": s.last_page,
        "event_types": s.event_types,
        "derived": s.derived,
    })
}
