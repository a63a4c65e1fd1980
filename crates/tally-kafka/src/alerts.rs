//! The alert log: one compacted, single-partition topic that keeps every
//! node's copy of the alert engine equal (rules, states, history, outbox;
//! the record layout is `tally_alert::Change`'s), and the lease that lets
//! exactly one node evaluate rules and send notifications.
//!
//! - Every node reads the topic from the beginning and applies the records
//!   of other nodes; its own (marked with its *origin*, node id plus a
//!   per-process nonce) are already in its engine and are skipped.
//! - Any node may change rules (the HTTP API answers everywhere): it
//!   publishes the changed entities and answers once the broker has them.
//! - The lease goes with partition 0 of the events topic: its owner, once
//!   it has read the alert log up to where it stood when the partition
//!   came to it, is the leader. Partition 0 moves on a node's death or
//!   departure like any other (static membership, session timeout), so
//!   the duty fails over with it, and the new leader starts from
//!   everything the old one published: an episode it announced is not
//!   announced again. The old leader publishes the outbox before it
//!   delivers, and a delivery's removal right after (within 250 ms): a
//!   leader killed in between may have a delivery re-sent by its
//!   successor with the same `dedupe_key`, which receivers dedupe.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::{Error, Settings};

/// How long the reader rests once it has read everything (rule changes
/// reach other nodes within it).
const IDLE_PAUSE: Duration = Duration::from_millis(200);

/// Header naming the process that wrote a record.
const ORIGIN_HEADER: &str = "tally-origin";

/// Applies another node's record: key and value (`None`: tombstone).
pub type ApplyFn = Arc<dyn Fn(&str, Option<&[u8]>) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// Partition 0 is elsewhere.
    None,
    /// Partition 0 is here; the log must be read up to this offset first.
    Catching(i64),
    Held,
}

/// The alert log of one node.
pub struct AlertLog {
    producer: FutureProducer,
    topic: String,
    origin: String,
    /// The next offset the reader will look at.
    applied: Arc<AtomicI64>,
    lease: Mutex<Lease>,
    stop: Arc<AtomicBool>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl AlertLog {
    /// Starts reading the alert log (from the beginning) into `apply`.
    pub fn start(settings: &Settings, apply: ApplyFn) -> Result<Arc<AlertLog>, Error> {
        let producer = crate::log_producer(settings, "alert log producer")?;
        let origin = format!("{}/{:016x}", settings.node_id, rand::random::<u64>());
        let applied = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(AlertLog {
            producer,
            topic: settings.topic_alerts.clone(),
            origin: origin.clone(),
            applied: applied.clone(),
            lease: Mutex::new(Lease::None),
            stop: stop.clone(),
            reader: Mutex::new(None),
        });
        let s = settings.clone();
        let st = stop.clone();
        let handle = crate::spawn_reader("tally-kafka-alerts", "alert log", stop, move || {
            read(&s, &origin, &apply, &applied, &st)
        })?;
        *log.reader.lock() = Some(handle);
        Ok(log)
    }

    /// The end of the log now (the offset the next record will get).
    fn end(&self) -> Result<i64, Error> {
        let deadline = Instant::now() + Duration::from_secs(5);
        crate::end_offset(self.producer.client(), &self.topic, 0, deadline).map_err(|source| {
            Error::Client {
                what: "alert log end offset",
                source,
            }
        })
    }

    /// Waits (up to `timeout`) until everything in the log now is applied;
    /// if not, says how far it got.
    pub fn catch_up(&self, timeout: Duration) -> Result<(), String> {
        crate::catch_up(self.producer.client(), &self.topic, &self.applied, timeout)
    }

    /// Whether this node holds the alert lease, given whether it owns
    /// partition 0 of the events topic now.
    pub fn lease(&self, owns_partition_0: bool) -> bool {
        let mut l = self.lease.lock();
        if !owns_partition_0 {
            *l = Lease::None;
            return false;
        }
        if *l == Lease::None {
            match self.end() {
                Ok(end) => *l = Lease::Catching(end),
                Err(e) => {
                    tracing::warn!(error = %e, "alert lease: cannot read the alert log's end");
                    return false;
                }
            }
        }
        if let Lease::Catching(end) = *l
            && self.applied.load(Relaxed) >= end
        {
            tracing::info!("alert lease taken: this node evaluates alert rules");
            *l = Lease::Held;
        }
        *l == Lease::Held
    }

    /// Whether the lease was held at the last [`AlertLog::lease`] call.
    pub fn held(&self) -> bool {
        *self.lease.lock() == Lease::Held
    }

    /// Publishes changed entities (value `None`: removed) and waits for the
    /// broker to acknowledge every one.
    pub async fn publish(&self, changes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), String> {
        let mut waits = Vec::with_capacity(changes.len());
        for (key, value) in &changes {
            let headers = OwnedHeaders::new().insert(Header {
                key: ORIGIN_HEADER,
                value: Some(self.origin.as_bytes()),
            });
            let mut rec = FutureRecord::to(&self.topic)
                .partition(0)
                .key(key.as_bytes())
                .headers(headers);
            if let Some(v) = value {
                rec = rec.payload(&v[..]);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        waits.push(f);
                        break;
                    }
                    Err((e, back)) if Instant::now() < deadline => {
                        tracing::debug!(error = %e, "alert log producer queue full; retrying");
                        std::thread::sleep(Duration::from_millis(5));
                        rec = back;
                    }
                    Err((e, _)) => return Err(format!("alert log: {e}")),
                }
            }
        }
        for w in waits {
            match w.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(format!("alert log: {e}")),
                Err(_) => return Err("alert log: the producer went away".into()),
            }
        }
        Ok(())
    }

    /// [`AlertLog::publish`] from a thread that is not async.
    pub fn publish_blocking(&self, changes: Vec<(String, Option<Vec<u8>>)>) -> Result<(), String> {
        futures::executor::block_on(self.publish(changes))
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Relaxed);
        let _ = self.producer.flush(Duration::from_secs(5));
        if let Some(h) = self.reader.lock().take() {
            let _ = h.join();
        }
    }
}

/// Reads the log from where it stopped, applying other nodes' records.
fn read(
    s: &Settings,
    origin: &str,
    apply: &ApplyFn,
    applied: &AtomicI64,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let (consumer, tpl) = crate::log_consumer(
        s,
        "alert log reader",
        "alerts",
        &s.topic_alerts,
        applied.load(Relaxed),
    )?;
    let mut last_end_check = Instant::now();
    let mut rest = crate::materialize::Rest::new(IDLE_PAUSE);
    while !stop.load(Relaxed) {
        let Some(msg) = consumer.poll(rest.poll_timeout(&consumer)) else {
            rest.idle(&consumer, &tpl);
            // Compaction can remove the records up to the end: a reader
            // with nothing to read is at the end.
            if last_end_check.elapsed() >= Duration::from_millis(500) {
                last_end_check = Instant::now();
                if let Ok((lo, hi)) =
                    consumer.fetch_watermarks(&s.topic_alerts, 0, Duration::from_millis(500))
                    && let Ok(Some(pos)) = consumer
                        .position()
                        .map(|t| t.elements().first().and_then(|e| e.offset().to_raw()))
                    && pos >= hi.max(lo)
                {
                    applied.fetch_max(pos, Relaxed);
                }
            }
            continue;
        };
        let msg = msg.map_err(|source| Error::Client {
            what: "alert log reader",
            source,
        })?;
        let mine = msg.headers().is_some_and(|h| {
            h.iter()
                .any(|x| x.key == ORIGIN_HEADER && x.value == Some(origin.as_bytes()))
        });
        if !mine && let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) {
            apply(key, msg.payload());
        }
        applied.store(msg.offset() + 1, Relaxed);
    }
    Ok(())
}
