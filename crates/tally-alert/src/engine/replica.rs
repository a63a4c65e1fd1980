//! One engine per node, kept equal through a replicated log of keyed
//! changes (Kafka mode: a compacted topic).
//!
//! Every change an engine makes becomes one record per entity: its key
//! names the entity, its value is the entity's JSON, and a removal is a
//! tombstone (no value). A log compacted by key keeps exactly what a new
//! node needs to rebuild the engine.
//!
//! ```text
//! next_id               the largest id handed out (a JSON number)
//! rule/<id>             a rule (tombstone: deleted)
//! state/<id>            its state (episodes, detector windows)
//! outbox/<id:016x>      a delivery waiting (tombstone: delivered or given up)
//! history/<seq:016x>    a history entry (tombstone: aged out of the history)
//! ```
//!
//! Only the *leader* (the node holding the alert lease) evaluates rules and
//! delivers notifications; every node may change rules (the HTTP API
//! answers everywhere). A node applies the records of others; its own come
//! back to it too and are skipped by the caller, which knows its own
//! records by their origin.

use serde::Serialize;

use super::{AlertError, Delivery, Engine, HistoryEntry, RuleState};
use crate::rule::Rule;

/// One replicated change: a key and the entity's new JSON (`None`: removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
pub(super) struct Replica {
    leader: bool,
    outgoing: Vec<Change>,
}

fn json<T: Serialize>(v: &T) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(v).expect("alert entities serialize"))
}

impl Engine {
    /// Makes this engine one copy of a replicated one: [`Engine::persist`]
    /// turns changes into [`Change`]s (taken with [`Engine::take_changes`])
    /// instead of writing files, and nothing is evaluated or delivered
    /// until [`Engine::set_leader`] says so.
    pub fn replicated(mut self) -> Engine {
        self.replica = Some(Replica::default());
        self
    }

    /// Whether this engine evaluates and delivers: always when it is not
    /// replicated, only as the leader when it is.
    pub(super) fn evaluates(&self) -> bool {
        self.replica.as_ref().is_none_or(|r| r.leader)
    }

    pub fn is_leader(&self) -> bool {
        self.replica.as_ref().is_some_and(|r| r.leader)
    }

    /// Takes or gives up the lease. A new leader treats every delivery
    /// as not in flight: the old leader's attempts died with its lease.
    pub fn set_leader(&mut self, leader: bool) {
        let Some(r) = self.replica.as_mut() else {
            return;
        };
        if r.leader == leader {
            return;
        }
        r.leader = leader;
        for d in self.outbox.iter_mut() {
            d.in_flight = false;
        }
        self.version += 1;
    }

    /// The changes persisted since the last call, in the order to publish.
    pub fn take_changes(&mut self) -> Vec<Change> {
        if self.dirty {
            // Nothing fails on this path: it only collects.
            let _ = self.persist();
        }
        self.replica
            .as_mut()
            .map(|r| std::mem::take(&mut r.outgoing))
            .unwrap_or_default()
    }

    /// Turns the pending changes into records (called by `persist`).
    pub(super) fn collect_changes(&mut self) {
        let mut out = Vec::new();
        let p = &self.pending;
        for id in &p.rules {
            out.push(Change {
                key: format!("rule/{id}"),
                value: self.rules.get(id).and_then(json),
            });
        }
        for id in &p.states {
            out.push(Change {
                key: format!("state/{id}"),
                value: self.states.get(id).and_then(json),
            });
        }
        let cap = self.cfg.history.max(1) as u64;
        let new = p.history.min(self.history.len());
        let first_seq = self.history_seq + 1 - new as u64;
        for (i, h) in self
            .history
            .iter()
            .skip(self.history.len() - new)
            .enumerate()
        {
            let seq = first_seq + i as u64;
            out.push(Change {
                key: format!("history/{seq:016x}"),
                value: json(h),
            });
            if seq > cap {
                out.push(Change {
                    key: format!("history/{:016x}", seq - cap),
                    value: None,
                });
            }
        }
        for d in self.outbox.iter().filter(|d| p.outbox_put.contains(&d.id)) {
            out.push(Change {
                key: format!("outbox/{:016x}", d.id),
                value: json(d),
            });
        }
        for id in &p.outbox_del {
            out.push(Change {
                key: format!("outbox/{id:016x}"),
                value: None,
            });
        }
        if !out.is_empty() {
            out.push(Change {
                key: "next_id".into(),
                value: json(&self.next_id),
            });
        }
        if let Some(r) = self.replica.as_mut() {
            r.outgoing.extend(out);
        }
    }

    /// Applies another node's change. Unknown keys are skipped (a newer
    /// version's entity), so old and new nodes can share one log.
    pub fn apply_change(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), AlertError> {
        fn parse<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Result<T, AlertError> {
            serde_json::from_slice(v).map_err(|source| AlertError::Record {
                key: key.to_string(),
                source,
            })
        }
        let (kind, id) = key.split_once('/').unwrap_or((key, ""));
        match (kind, value) {
            ("next_id", Some(v)) => {
                let n: u64 = parse(key, v)?;
                self.next_id = self.next_id.max(n);
            }
            ("rule", Some(v)) => {
                let r: Rule = parse(key, v)?;
                self.rules.insert(id.to_string(), r);
            }
            ("rule", None) => {
                self.rules.remove(id);
            }
            ("state", Some(v)) => {
                let st: RuleState = parse(key, v)?;
                self.states.insert(id.to_string(), st);
            }
            ("state", None) => {
                self.states.remove(id);
            }
            ("outbox", v) => {
                let Ok(n) = u64::from_str_radix(id, 16) else {
                    return Ok(());
                };
                match v {
                    Some(v) => {
                        let d: Delivery = parse(key, v)?;
                        match self.outbox.iter_mut().find(|x| x.id == n) {
                            Some(x) => {
                                let busy = x.in_flight;
                                *x = d;
                                x.in_flight = busy;
                            }
                            None => {
                                let at = self.outbox.iter().position(|x| x.id > n);
                                match at {
                                    Some(i) => self.outbox.insert(i, d),
                                    None => self.outbox.push_back(d),
                                }
                            }
                        }
                    }
                    None => self.outbox.retain(|x| x.id != n),
                }
            }
            ("history", Some(v)) => {
                let Ok(seq) = u64::from_str_radix(id, 16) else {
                    return Ok(());
                };
                // Entries come in order; an older one is already here or
                // aged out.
                if seq > self.history_seq {
                    let h: HistoryEntry = parse(key, v)?;
                    self.push_history(h);
                    self.history_seq = seq;
                }
            }
            // History tombstones only trim the log; the history keeps its
            // newest entries by itself.
            _ => return Ok(()),
        }
        self.version += 1;
        Ok(())
    }
}
