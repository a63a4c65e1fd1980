//! Corrections of closed sessions. Sessions themselves are computed from
//! the raw events (`tally-query`, which builds [`Session`]s); what lives
//! here is what makes their corrections visible downstream: the events the
//! processor applied behind a tenant's watermark ("touches", which may
//! extend or merge sessions already closed), and the [`SessionCorrection`]s
//! those turned out to make, which go to the store's change log
//! ([`crate::Changed::Session`]) beside the bucket changes.

use std::collections::BTreeSet;

use tally_types::Millis;

/// The inactivity gap that ends a session when none is asked for.
pub const DEFAULT_SESSION_GAP_MS: Millis = 30 * 60_000;

/// Touches kept for the corrections task at most; more are dropped (and
/// counted) rather than grow without bound under a flood of late events.
pub const TOUCHES_KEPT: usize = 100_000;

/// One session: the events with one `session_id`, or one user's events
/// without one, split by the inactivity gap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub session_id: String,
    /// Whether the id was derived (events without a `session_id`, split
    /// per user by the gap): `<user>:<start ms>`.
    pub derived: bool,
    pub user_id: Option<String>,
    pub start: Millis,
    pub end: Millis,
    pub events: u64,
    /// The `page` property of the first and the last event, if they have one.
    pub first_page: Option<String>,
    pub last_page: Option<String>,
    pub event_types: BTreeSet<String>,
}

impl Session {
    pub fn duration_ms(&self) -> Millis {
        self.end - self.start
    }
}

/// A closed session that changed after it was first published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCorrection {
    /// Grown by late events (or joined by another, which is then
    /// [`SessionCorrection::MergedInto`] it).
    Changed { old: Session, new: Session },
    /// New behind the watermark: all its events came late, or an earlier
    /// event moved a derived session's start (and so its id).
    Appeared(Session),
    /// Joined into the session `into` by a late event.
    MergedInto { old: Session, into: String },
}

impl SessionCorrection {
    /// The session the change is about (its id and user).
    pub fn session(&self) -> &Session {
        match self {
            SessionCorrection::Changed { new, .. } | SessionCorrection::Appeared(new) => new,
            SessionCorrection::MergedInto { old, .. } => old,
        }
    }

    /// The session before the change (none for one that appeared).
    pub fn before(&self) -> Option<&Session> {
        match self {
            SessionCorrection::Changed { old, .. } | SessionCorrection::MergedInto { old, .. } => {
                Some(old)
            }
            SessionCorrection::Appeared(_) => None,
        }
    }

    /// The session after the change (none for one merged away).
    pub fn after(&self) -> Option<&Session> {
        match self {
            SessionCorrection::Changed { new, .. } | SessionCorrection::Appeared(new) => Some(new),
            SessionCorrection::MergedInto { .. } => None,
        }
    }

    /// For a session merged into another: that one's id.
    pub fn replaced_by(&self) -> Option<&str> {
        match self {
            SessionCorrection::MergedInto { into, .. } => Some(into),
            _ => None,
        }
    }
}

/// What a correction changed in one key's sessions: each session of
/// `after` that is not in `before` (extended, merged, or new), with the
/// session of the same id before; and each session of `before` that a
/// changed one swallowed under another id (`new` is `None`). Only
/// sessions that were closed count (`closed_to`: a session whose last
/// event is at or before it had ended by the gap when the events came):
/// a session still open grows, it is not corrected.
pub fn session_changes(
    before: &[Session],
    after: &[Session],
    closed_to: Millis,
) -> Vec<SessionCorrection> {
    let mut out = Vec::new();
    for n in after.iter().filter(|n| !before.contains(n)) {
        // The sessions before that are part of it.
        let parts: Vec<&Session> = before
            .iter()
            .filter(|b| {
                if n.derived {
                    b.derived && b.user_id == n.user_id && b.start >= n.start && b.end <= n.end
                } else {
                    b.session_id == n.session_id
                }
            })
            .collect();
        let closed = if parts.is_empty() {
            n.end <= closed_to
        } else {
            parts.iter().any(|p| p.end <= closed_to)
        };
        if !closed {
            continue;
        }
        out.push(match parts.iter().find(|p| p.session_id == n.session_id) {
            Some(old) => SessionCorrection::Changed {
                old: (*old).clone(),
                new: n.clone(),
            },
            None => SessionCorrection::Appeared(n.clone()),
        });
        for p in parts.iter().filter(|p| p.session_id != n.session_id) {
            out.push(SessionCorrection::MergedInto {
                old: (*p).clone(),
                into: n.session_id.clone(),
            });
        }
    }
    out
}

/// Corrections told together with each session's chain of changes told
/// once: a session changed several times goes from its first old value to
/// its last new one (or appears once).
pub(crate) fn coalesce(fixes: Vec<SessionCorrection>) -> Vec<SessionCorrection> {
    use SessionCorrection as C;
    let mut out: Vec<C> = Vec::with_capacity(fixes.len());
    for f in fixes {
        match f {
            C::Changed { old, new } => {
                match out.iter_mut().rev().find(|p| p.after() == Some(&old)) {
                    Some(C::Changed { new: n, .. } | C::Appeared(n)) => *n = new,
                    _ => out.push(C::Changed { old, new }),
                }
            }
            f => out.push(f),
        }
    }
    out
}

/// An event applied behind its tenant's watermark: it may have changed a
/// session that was already closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTouch {
    pub tenant: Box<str>,
    /// The event's `session_id` (its session is the events with that id).
    pub session_id: Option<Box<str>>,
    /// Its user (without a `session_id`: sessions split by the gap).
    pub user_id: Option<Box<str>>,
    pub event_id: Box<str>,
    pub ts: Millis,
    /// The tenant's watermark when the event was applied: a session that
    /// had ended a gap before it was closed.
    pub watermark: Millis,
    /// When it was applied (wall clock).
    pub at: Millis,
}

/// Touches waiting for the corrections task.
#[derive(Clone, Debug, Default)]
pub(crate) struct Touches {
    pub(crate) tracking: bool,
    pub(crate) list: Vec<SessionTouch>,
    /// Dropped since last taken (more than [`TOUCHES_KEPT`] waiting).
    pub(crate) dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sessions_changes_in_one_record_are_told_once() {
        use crate::{Session, SessionCorrection as C};
        let s = |id: &str, events: u64| Session {
            session_id: id.into(),
            derived: false,
            user_id: Some("u".into()),
            start: 0,
            end: events as Millis,
            events,
            first_page: None,
            last_page: None,
            event_types: Default::default(),
        };
        let told = coalesce(vec![
            C::Changed {
                old: s("a", 1),
                new: s("a", 2),
            },
            C::Appeared(s("b", 1)),
            C::Changed {
                old: s("a", 2),
                new: s("a", 3),
            },
            C::Changed {
                old: s("b", 1),
                new: s("b", 2),
            },
            C::MergedInto {
                old: s("c", 4),
                into: "a".into(),
            },
        ]);
        assert_eq!(
            told,
            vec![
                C::Changed {
                    old: s("a", 1),
                    new: s("a", 3),
                },
                C::Appeared(s("b", 2)),
                C::MergedInto {
                    old: s("c", 4),
                    into: "a".into(),
                },
            ]
        );
    }
}
