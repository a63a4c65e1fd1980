//! Dead-letter queues: malformed events (rejected at ingest) and late events
//! (too late for their window). Kept per tenant in bounded rings, newest last;
//! totals count every entry ever pushed, including those the ring dropped.

use std::collections::{HashMap, VecDeque};

use tally_types::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqKind {
    Malformed,
    Late,
}

impl DlqKind {
    pub fn parse(s: &str) -> Option<DlqKind> {
        match s {
            "malformed" => Some(DlqKind::Malformed),
            "late" => Some(DlqKind::Late),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DlqKind::Malformed => "malformed",
            DlqKind::Late => "late",
        }
    }
}

/// What was dead-lettered: a well-formed event object, or raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqBody {
    /// JSON object text.
    Event(String),
    Raw(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntry {
    pub kind: DlqKind,
    pub tenant: String,
    pub reason: String,
    pub received_at: Millis,
    pub body: DlqBody,
}

/// Bounded per-tenant dead-letter rings.
#[derive(Debug)]
pub struct Dlq {
    capacity: usize,
    rings: HashMap<(String, DlqKind), VecDeque<DlqEntry>>,
    totals: HashMap<DlqKind, u64>,
}

impl Dlq {
    /// `capacity`: entries kept per (tenant, kind).
    pub fn new(capacity: usize) -> Self {
        Dlq {
            capacity: capacity.max(1),
            rings: HashMap::new(),
            totals: HashMap::new(),
        }
    }

    pub fn push(&mut self, e: DlqEntry) {
        *self.totals.entry(e.kind).or_default() += 1;
        let ring = self.rings.entry((e.tenant.clone(), e.kind)).or_default();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// The newest `limit` entries of a tenant, oldest first.
    pub fn list(&self, tenant: &str, kind: DlqKind, limit: usize) -> Vec<DlqEntry> {
        match self.rings.get(&(tenant.to_string(), kind)) {
            None => Vec::new(),
            Some(r) => r
                .iter()
                .skip(r.len().saturating_sub(limit))
                .cloned()
                .collect(),
        }
    }

    /// Entries ever pushed of a kind.
    pub fn total(&self, kind: DlqKind) -> u64 {
        self.totals.get(&kind).copied().unwrap_or(0)
    }

    /// Entries currently held of a kind.
    pub fn held(&self, kind: DlqKind) -> usize {
        self.rings
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .map(|(_, r)| r.len())
            .sum()
    }
}
