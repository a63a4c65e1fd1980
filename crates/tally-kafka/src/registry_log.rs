//! The registry log: the schema registry of a Kafka-mode cluster as one
//! single-partition topic of *proposals* (register, delete, set a rule).
//!
//! Every node reads the topic from the beginning and applies every
//! proposal, its own included, in the partition's order, with the same
//! deterministic code: every node ends up with the same subjects,
//! versions, ids and rules, and an incompatible proposal is refused
//! everywhere alike. The node that took the HTTP request produces the
//! proposal, waits until its reader has applied it, and answers with what
//! applying it did there. The topic is never compacted (each record is a
//! change, not a state); registrations are rare and small.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::{Error, Settings};

/// How long the reader rests once it has read everything (a proposal of
/// another node reaches this one within it).
const IDLE_PAUSE: Duration = Duration::from_millis(50);

/// Applies one record: its offset, key and value.
pub type ApplyFn = Arc<dyn Fn(i64, &[u8], &[u8]) + Send + Sync>;

/// The registry log of one node.
pub struct RegistryLog {
    producer: FutureProducer,
    topic: String,
    /// The next offset the reader will apply.
    applied: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl RegistryLog {
    /// Starts reading the log from the beginning into `apply`.
    pub fn start(settings: &Settings, apply: ApplyFn) -> Result<Arc<RegistryLog>, Error> {
        let producer = crate::log_producer(settings, "registry log producer")?;
        let applied = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(RegistryLog {
            producer,
            topic: settings.topic_registry.clone(),
            applied: applied.clone(),
            stop: stop.clone(),
            reader: Mutex::new(None),
        });
        let s = settings.clone();
        let st = stop.clone();
        let handle =
            crate::spawn_reader("tally-kafka-registry", "registry log", stop, move || {
                read(&s, &apply, &applied, &st)
            })?;
        *log.reader.lock() = Some(handle);
        Ok(log)
    }

    /// Waits (up to `timeout`) until every record in the log now is
    /// applied; if not, says how far it got.
    pub fn catch_up(&self, timeout: Duration) -> Result<(), String> {
        crate::catch_up(self.producer.client(), &self.topic, &self.applied, timeout)
    }

    /// Waits (up to `timeout`) until the records before `offset` are
    /// applied.
    pub fn wait_applied(&self, offset: i64, timeout: Duration) -> bool {
        crate::wait_applied(&self.applied, offset, Instant::now() + timeout)
    }

    /// Appends a proposal and waits until this node has applied it (up to
    /// `timeout`); answers its offset.
    pub fn propose(&self, key: &str, value: &[u8], timeout: Duration) -> Result<i64, String> {
        let rec = FutureRecord::to(&self.topic)
            .partition(0)
            .key(key.as_bytes())
            .payload(value);
        let sent = futures::executor::block_on(self.producer.send(rec, Duration::from_secs(5)));
        let offset = match sent {
            Ok(delivery) => delivery.offset,
            Err((e, _)) => return Err(format!("registry log: {e}")),
        };
        if !self.wait_applied(offset + 1, timeout) {
            return Err(format!(
                "registry log: the proposal at offset {offset} was not read back within {timeout:?}"
            ));
        }
        Ok(offset)
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Relaxed);
        let _ = self.producer.flush(Duration::from_secs(5));
        if let Some(h) = self.reader.lock().take() {
            let _ = h.join();
        }
    }
}

/// Reads the log from where it stopped, applying every record in order.
fn read(
    s: &Settings,
    apply: &ApplyFn,
    applied: &AtomicI64,
    stop: &AtomicBool,
) -> Result<(), Error> {
    let (consumer, tpl) = crate::log_consumer(
        s,
        "registry log reader",
        "registry",
        &s.topic_registry,
        applied.load(Relaxed),
    )?;
    let mut rest = crate::materialize::Rest::new(IDLE_PAUSE);
    while !stop.load(Relaxed) {
        let Some(msg) = consumer.poll(rest.poll_timeout(&consumer)) else {
            rest.idle(&consumer, &tpl);
            continue;
        };
        let msg = msg.map_err(|source| Error::Client {
            what: "registry log reader",
            source,
        })?;
        if msg.offset() < applied.load(Relaxed) {
            continue;
        }
        apply(
            msg.offset(),
            msg.key().unwrap_or_default(),
            msg.payload().unwrap_or_default(),
        );
        applied.store(msg.offset() + 1, Relaxed);
    }
    Ok(())
}
