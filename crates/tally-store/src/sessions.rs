//! Corrections of closed sessions. Sessions themselves are computed from
//! the raw events (`tally-query`); what lives here is what makes their
//! corrections visible downstream: the events the processor applied behind
//! a tenant's watermark ("touches", which may extend or merge sessions
//! already closed), and the log of session changes those turned out to
//! make, listed by `GET /api/v1/changes` with the bucket changes, in one
//! version order.

use std::collections::VecDeque;

use tally_types::Millis;

/// The inactivity gap that ends a session when none is asked for.
pub const DEFAULT_SESSION_GAP_MS: Millis = 30 * 60_000;

/// Touches kept for the corrections task at most; more are dropped (and
/// counted) rather than grow without bound under a flood of late events.
pub const TOUCHES_KEPT: usize = 100_000;

/// One session as a change shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSummary {
    pub session_id: String,
    /// Whether the id was derived (events without a `session_id`, split
    /// per user by the gap): `<user>:<start ms>`.
    pub derived: bool,
    pub user_id: Option<String>,
    pub start: Millis,
    pub end: Millis,
    pub events: u64,
    pub first_page: Option<String>,
    pub last_page: Option<String>,
    /// Sorted.
    pub event_types: Vec<String>,
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

/// A closed session that changed after it was first published: extended
/// (`old` and `new`), created behind the watermark (`old` is `None`), or
/// merged into another one (`new` is `None`, `replaced_by` names it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionChange {
    /// The store version the change became visible at.
    pub version: u64,
    pub tenant: Box<str>,
    pub session_id: String,
    pub user_id: Option<String>,
    pub old: Option<SessionSummary>,
    pub new: Option<SessionSummary>,
    pub replaced_by: Option<String>,
    pub at: Millis,
}

/// Touches waiting for the corrections task, and the session change log.
#[derive(Clone, Debug, Default)]
pub(crate) struct SessionLog {
    pub(crate) tracking: bool,
    pub(crate) touches: Vec<SessionTouch>,
    pub(crate) touches_dropped: u64,
    pub(crate) changes: VecDeque<SessionChange>,
    /// Versions at or before this fell out of `changes`.
    pub(crate) floor: u64,
}
