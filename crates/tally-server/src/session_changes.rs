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
use tally_query::{QueryEngine, SessionKey};
use tally_store::{Session, SessionTouch};

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
    let gap_ms = engine.config().session_gap_ms;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stopped.changed() => return,
        }
        let (touches, dropped) = shared.store.write().take_session_touches();
        let tel = &shared.telemetry;
        tel.session_touches.fetch_add(touches.len() as u64, Relaxed);
        tel.session_touches_dropped.fetch_add(dropped, Relaxed);
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
        let round = std::time::Instant::now();
        // Each key at most once, from where the last round stopped, so no
        // key waits behind others that keep the budget busy.
        for _ in 0..pending.len() {
            if round.elapsed() >= ROUND_BUDGET {
                break;
            }
            let next = cursor
                .as_ref()
                .and_then(|c| pending.range((Excluded(c), Unbounded)).next())
                .or_else(|| pending.iter().next())
                .map(|(k, _)| k.clone());
            let Some(k) = next else {
                break;
            };
            cursor = Some(k.clone());
            let Some(p) = pending.get_mut(&k) else {
                continue;
            };
            p.tries += 1;
            let exclude: HashSet<String> =
                p.touches.iter().map(|t| t.event_id.to_string()).collect();
            let wanted = exclude.len();
            let from = p.touches.iter().map(|t| t.ts).min().unwrap_or_default();
            let to = p.touches.iter().map(|t| t.ts).max().unwrap_or_default() + 1;
            let pair = engine
                .session_pair(&k.0, k.1.clone(), from, to, gap_ms, exclude)
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
            if pair.seen < wanted && p.tries < MAX_TRIES {
                continue;
            }
            let Some(p) = pending.remove(&k) else {
                continue;
            };
            tel.session_keys_checked.fetch_add(1, Relaxed);
            let watermark = p.touches.iter().map(|t| t.watermark).max().unwrap_or(0);
            let at = p.touches.iter().map(|t| t.at).max().unwrap_or(0);
            let closed_to = watermark.saturating_sub(gap_ms);
            let found = tally_query::session_changes(&pair.before, &pair.after, closed_to);
            if !found.is_empty() {
                tracing::debug!(changes = found.len(), "session corrections");
                shared.store.write().push_session_changes(&k.0, at, found);
            }
        }
    }
}

/// A session as `GET /api/v1/changes` shows it (the fields of the SQL
/// table `sessions`).
pub(crate) fn session_json(s: &Session) -> serde_json::Value {
    use tally_types::time::format_rfc3339;
    serde_json::json!({
        "session_id": s.session_id,
        "user_id": s.user_id,
        "start": format_rfc3339(s.start),
        "end": format_rfc3339(s.end),
        "duration_ms": s.duration_ms(),
        "events": s.events,
        "first_page": s.first_page,
        "last_page": s.last_page,
        "event_types": s.event_types,
        "derived": s.derived,
    })
}
