//! Dead-letter queues: malformed events (rejected at ingest) and late events
//! (too late for their window). Kept per tenant, newest last; totals count
//! every entry ever pushed.
//!
//! A malformed ring keeps the newest `capacity` entries. A late entry is an
//! acknowledged event that still waits to be counted, so it is never
//! dropped: past `capacity` only entries already replayed make room, and a
//! tenant holding `capacity` unreplayed entries is *full*: ingest refuses
//! its possibly late events (429) until a replay empties it.

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
    /// Dedupe key of the event (late entries; 0 for malformed ones).
    pub key: u128,
    /// A late entry already applied as a correction (`POST /dlq/replay`).
    pub replayed: bool,
}

/// Bounded per-tenant dead-letter rings.
#[derive(Debug)]
pub struct Dlq {
    capacity: usize,
    rings: HashMap<(String, DlqKind), VecDeque<DlqEntry>>,
    totals: HashMap<DlqKind, u64>,
    /// Unreplayed late entries per tenant.
    pending: HashMap<String, usize>,
}

impl Dlq {
    /// `capacity`: entries kept per (tenant, kind).
    pub fn new(capacity: usize) -> Self {
        Dlq {
            capacity: capacity.max(1),
            rings: HashMap::new(),
            totals: HashMap::new(),
            pending: HashMap::new(),
        }
    }

    pub fn push(&mut self, e: DlqEntry) {
        *self.totals.entry(e.kind).or_default() += 1;
        self.push_held(e);
    }

    /// Adds an entry as a view of a log kept elsewhere (Kafka mode's late
    /// topic): counted, the newest `capacity` kept per tenant and kind
    /// whatever the kind, and never waiting for a replay here.
    pub fn push_view(&mut self, e: DlqEntry) {
        *self.totals.entry(e.kind).or_default() += 1;
        let ring = self.rings.entry((e.tenant.clone(), e.kind)).or_default();
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// Adds an entry without counting it (reloading persisted entries whose
    /// totals are restored separately).
    pub fn push_held(&mut self, e: DlqEntry) {
        if e.kind == DlqKind::Late && !e.replayed {
            *self.pending.entry(e.tenant.clone()).or_default() += 1;
        }
        let ring = self.rings.entry((e.tenant.clone(), e.kind)).or_default();
        if ring.len() >= self.capacity {
            match e.kind {
                DlqKind::Malformed => {
                    ring.pop_front();
                }
                // Only an entry already counted through a replay makes room.
                DlqKind::Late => {
                    if let Some(i) = ring.iter().position(|x| x.replayed) {
                        ring.remove(i);
                    }
                }
            }
        }
        ring.push_back(e);
    }

    /// Entries of a tenant held of a kind.
    pub fn held_of(&self, tenant: &str, kind: DlqKind) -> usize {
        self.rings
            .get(&(tenant.to_string(), kind))
            .map_or(0, VecDeque::len)
    }

    /// Unreplayed late entries of a tenant.
    pub fn late_pending(&self, tenant: &str) -> usize {
        self.pending.get(tenant).copied().unwrap_or(0)
    }

    /// Tenants whose late DLQ is full (`capacity` unreplayed entries).
    pub fn late_full_tenants(&self) -> Vec<String> {
        self.pending
            .iter()
            .filter(|&(_, &n)| n >= self.capacity)
            .map(|(t, _)| t.clone())
            .collect()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
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

    /// Marks the late entries of `key` as applied.
    pub fn mark_replayed(&mut self, tenant: &str, key: u128) {
        if let Some(r) = self.rings.get_mut(&(tenant.to_string(), DlqKind::Late)) {
            let mut newly = 0;
            for e in r.iter_mut().filter(|e| e.key == key && !e.replayed) {
                e.replayed = true;
                newly += 1;
            }
            if let Some(n) = self.pending.get_mut(tenant) {
                *n = n.saturating_sub(newly);
            }
        }
    }

    /// Late entries not applied yet, of one tenant or of all, oldest first.
    pub fn pending_late(&self, tenant: Option<&str>) -> Vec<DlqEntry> {
        let mut out: Vec<DlqEntry> = self
            .rings
            .iter()
            .filter(|((t, k), _)| *k == DlqKind::Late && tenant.is_none_or(|x| x == t))
            .flat_map(|(_, r)| r.iter().filter(|e| !e.replayed).cloned())
            .collect();
        out.sort_by_key(|e| e.received_at);
        out
    }

    /// Entries ever pushed of a kind.
    pub fn total(&self, kind: DlqKind) -> u64 {
        self.totals.get(&kind).copied().unwrap_or(0)
    }

    /// Restores the all-time total of a kind (recovery).
    pub fn set_total(&mut self, kind: DlqKind, n: u64) {
        self.totals.insert(kind, n);
    }

    /// Every entry held of a kind, ring by ring, oldest first within a ring.
    pub fn held_entries(&self, kind: DlqKind) -> impl Iterator<Item = &DlqEntry> {
        self.rings
            .iter()
            .filter(move |((_, k), _)| *k == kind)
            .flat_map(|(_, r)| r.iter())
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
