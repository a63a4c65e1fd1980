//! Every node's view of the whole cluster: the aggregates topic, read
//! `read_committed` from the beginning, into the node's rollup store.
//!
//! Per source partition it keeps the last value of every key and the last
//! partition state. A partition's aggregates are held back until the
//! partition state that closes their transaction arrives, then applied
//! together, so the store (and a new owner restoring the partition) always
//! sees whole transactions. The store's aggregate of a (tenant, minute,
//! event type) is the merge of that key's values over source partitions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_store::{Agg, RollupStore};
use tally_types::time::Millis;

use crate::codec::{self, AggKey, Key, PartitionState};
use crate::{Error, Settings};

type BucketKey = (Box<str>, Millis, Box<str>);

#[derive(Default)]
struct PartView {
    state: Option<PartitionState>,
    values: HashMap<BucketKey, Agg>,
    /// Aggregates read since the last state of this partition.
    pending: Vec<(BucketKey, Agg)>,
}

#[derive(Default)]
struct Inner {
    parts: HashMap<u32, PartView>,
    /// Records applied, and records skipped as unreadable.
    applied: u64,
    unreadable: u64,
}

/// What a new owner of a partition restores from.
pub struct Restore {
    pub state: PartitionState,
    /// The partition's aggregates at that state whose minute is at or after
    /// the cutoff the caller gave for their tenant.
    pub values: Vec<(BucketKey, Agg)>,
}

/// The materialized aggregates topic, shared by the reader thread, the
/// partition workers and the HTTP layer.
pub struct Materialized {
    inner: Mutex<Inner>,
    changed: Condvar,
    store: Arc<RwLock<RollupStore>>,
}

impl Materialized {
    pub fn new(store: Arc<RwLock<RollupStore>>) -> Arc<Materialized> {
        Arc::new(Materialized {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            store,
        })
    }

    /// Every partition's last committed state.
    pub fn states(&self) -> Vec<(u32, PartitionState)> {
        let inner = self.inner.lock();
        let mut out: Vec<_> = inner
            .parts
            .iter()
            .filter_map(|(p, v)| v.state.clone().map(|s| (*p, s)))
            .collect();
        out.sort_by_key(|(p, _)| *p);
        out
    }

    /// Records applied and records skipped as unreadable.
    pub fn counters(&self) -> (u64, u64) {
        let i = self.inner.lock();
        (i.applied, i.unreadable)
    }

    /// Waits (up to `timeout`) until the state of `partition` has reached
    /// `committed` (the group's committed offset for it), then hands the
    /// state and the partition's aggregates from `cutoff(state)[tenant]` on
    /// to `take`, under the lock (nothing of the partition changes
    /// meanwhile). `None`: no state of the partition was ever seen.
    pub fn restore(
        &self,
        partition: u32,
        committed: Option<u64>,
        timeout: Duration,
        cutoff: impl FnOnce(&PartitionState) -> HashMap<String, Millis>,
    ) -> Option<Restore> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.inner.lock();
        loop {
            let at = inner
                .parts
                .get(&partition)
                .and_then(|v| v.state.as_ref())
                .map(|s| s.next_offset);
            let reached = match (committed, at) {
                (None, _) => true,
                (Some(c), Some(a)) => a >= c,
                (Some(_), None) => false,
            };
            if reached || self.changed.wait_until(&mut inner, deadline).timed_out() {
                if !reached {
                    tracing::warn!(
                        partition,
                        committed,
                        at,
                        "the aggregates topic has not caught up with the committed offset; restoring from the last state read"
                    );
                }
                break;
            }
        }
        let view = inner.parts.get(&partition)?;
        let state = view.state.clone()?;
        let cut = cutoff(&state);
        let values = view
            .values
            .iter()
            .filter(|((t, m, _), _)| *m >= cut.get(&**t).copied().unwrap_or(Millis::MIN))
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect();
        Some(Restore { state, values })
    }

    /// Applies one record of the aggregates topic.
    fn apply(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), codec::CodecError> {
        let key = codec::decode_key(key)?;
        let mut inner = self.inner.lock();
        inner.applied += 1;
        match key {
            Key::Agg(AggKey {
                partition,
                minute,
                tenant,
                event_type,
            }) => {
                let agg = match value {
                    Some(v) => codec::decode_agg(v)?,
                    None => Agg::default(),
                };
                inner
                    .parts
                    .entry(partition)
                    .or_default()
                    .pending
                    .push(((tenant, minute, event_type), agg));
            }
            Key::State(partition) => {
                let Some(v) = value else { return Ok(()) };
                let state = codec::decode_state(v)?;
                let pending = {
                    let view = inner.parts.entry(partition).or_default();
                    view.state = Some(state);
                    std::mem::take(&mut view.pending)
                };
                if !pending.is_empty() {
                    let mut store = self.store.write();
                    for (k, agg) in pending {
                        inner
                            .parts
                            .entry(partition)
                            .or_default()
                            .values
                            .insert(k.clone(), agg);
                        let mut merged = Agg::default();
                        for v in inner.parts.values() {
                            if let Some(a) = v.values.get(&k) {
                                merged.merge(a);
                            }
                        }
                        store.set_agg(&k.0, k.1, &k.2, merged);
                    }
                    store.commit();
                }
                self.changed.notify_all();
            }
        }
        Ok(())
    }
}

/// Reads the aggregates topic into `view` until `stop`.
pub fn run(
    settings: Settings,
    view: Arc<Materialized>,
    stop: Arc<AtomicBool>,
) -> Result<(), Error> {
    while !stop.load(Relaxed) {
        match session(&settings, &view, &stop) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "aggregates reader failed; starting again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

fn session(settings: &Settings, view: &Materialized, stop: &AtomicBool) -> Result<(), Error> {
    let mut cfg = settings.client_config();
    cfg.set(
        "group.id",
        format!("{}-view-{}", settings.group_id, settings.node_id),
    )
    .set("isolation.level", "read_committed")
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "false");
    for (k, v) in &settings.client {
        cfg.set(k, v);
    }
    let consumer: BaseConsumer = cfg.create().map_err(|source| Error::Client {
        what: "aggregates reader",
        source,
    })?;
    let topic = &settings.topic_aggregates;
    let n = crate::partition_count(consumer.client(), topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .map_err(|source| Error::Client {
                what: "aggregates reader",
                source,
            })?;
    }
    consumer.assign(&tpl).map_err(|source| Error::Client {
        what: "aggregates reader",
        source,
    })?;
    // Offsets already applied per partition: a restarted session reads the
    // topic from the start again, and applying a record twice is harmless
    // (last value per key), so nothing needs to be remembered.
    while !stop.load(Relaxed) {
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let msg = msg.map_err(|source| Error::Client {
            what: "aggregates reader",
            source,
        })?;
        let Some(key) = msg.key() else { continue };
        if let Err(e) = view.apply(key, msg.payload()) {
            view.inner.lock().unreadable += 1;
            tracing::warn!(
                partition = msg.partition(),
                offset = msg.offset(),
                error = %e,
                "skipped an unreadable aggregates record"
            );
        }
    }
    Ok(())
}
