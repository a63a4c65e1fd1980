//! The ingest producer: accepted events of `POST /api/v1/events` to the
//! events topic (idempotent, `acks=all`), answered once the broker has
//! acknowledged every one of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use crate::{BACKFILL_HEADER, CORRECTION_HEADER, Error, Settings};

/// One event to produce: its key (so one session stays in one partition and
/// duplicates of an event meet in the same partition) and its JSON text.
#[derive(Debug, Clone)]
pub struct OutEvent {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub backfill: bool,
    /// A late event sent again to be applied to its window
    /// (`POST /api/v1/dlq/replay`).
    pub correction: bool,
}

/// Called once with the outcome of a whole request.
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Pending {
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    done: Mutex<Option<Done>>,
}

impl Pending {
    fn settle(&self, result: Result<(), String>) {
        if let Err(e) = result {
            self.error.lock().get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Relaxed) == 1
            && let Some(done) = self.done.lock().take()
        {
            done(match self.error.lock().take() {
                Some(e) => Err(e),
                None => Ok(()),
            });
        }
    }
}

/// Counters of the ingest producer, for `/metrics`.
#[derive(Debug, Default)]
pub struct ProduceStats {
    pub produced: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    /// The last delivery failed: the broker is thought unreachable.
    pub failing: AtomicBool,
}

struct Ctx {
    stats: Arc<ProduceStats>,
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Arc<Pending>;

    fn delivery(&self, r: &DeliveryResult<'_>, pending: Arc<Pending>) {
        match r {
            Ok(_) => {
                self.stats.produced.fetch_add(1, Relaxed);
                self.stats.failing.store(false, Relaxed);
                pending.settle(Ok(()));
            }
            Err((e, _)) => {
                self.stats.errors.fetch_add(1, Relaxed);
                self.stats.failing.store(true, Relaxed);
                pending.settle(Err(e.to_string()));
            }
        }
    }
}

/// Produces ingested events to the events topic.
pub struct EventProducer {
    producer: ThreadedProducer<Ctx>,
    topic: String,
    stats: Arc<ProduceStats>,
}

impl EventProducer {
    pub fn new(s: &Settings, stats: Arc<ProduceStats>) -> Result<EventProducer, Error> {
        let cfg = s.client_config(&[
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("linger.ms", "2".into()),
            ("compression.type", "lz4".into()),
            // A broker that stays away fails the request within this time
            // (503 to the client) instead of holding it for minutes.
            ("message.timeout.ms", s.produce_timeout_ms.to_string()),
        ]);
        let producer = cfg
            .create_with_context(Ctx {
                stats: stats.clone(),
            })
            .map_err(|source| Error::Client {
                what: "ingest producer",
                source,
            })?;
        Ok(EventProducer {
            producer,
            topic: s.topic_events.clone(),
            stats,
        })
    }

    pub fn stats(&self) -> &Arc<ProduceStats> {
        &self.stats
    }

    /// Produces `events`; `done` is called once every one of them is
    /// acknowledged by the broker (`Ok`) or one of them failed (`Err`,
    /// after all were settled). Nothing blocks beyond a full local queue.
    pub fn send(&self, events: Vec<OutEvent>, done: Done) {
        let topic = self.topic.clone();
        self.send_to(&topic, events, done)
    }

    /// As [`EventProducer::send`], to another topic.
    pub fn send_to(&self, topic: &str, events: Vec<OutEvent>, done: Done) {
        if events.is_empty() {
            done(Ok(()));
            return;
        }
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(events.len()),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
        });
        for ev in &events {
            let mut rec = BaseRecord::with_opaque_to(topic, pending.clone())
                .key(&ev.key[..])
                .payload(&ev.value[..]);
            if ev.backfill || ev.correction {
                let key = if ev.correction {
                    CORRECTION_HEADER
                } else {
                    BACKFILL_HEADER
                };
                rec = rec.headers(OwnedHeaders::new().insert(Header {
                    key,
                    value: Some("1"),
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match self.producer.send(rec) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < deadline =>
                    {
                        self.stats.retries.fetch_add(1, Relaxed);
                        std::thread::sleep(Duration::from_millis(2));
                        rec = back;
                    }
                    Err((e, _)) => {
                        self.stats.errors.fetch_add(1, Relaxed);
                        pending.settle(Err(e.to_string()));
                        break;
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` for every queued event to be delivered.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }
}

/// The message key of an event: its tenant and session (so one session
/// stays in one partition), or its tenant and event id without a session
/// (so duplicates of an event meet in the same partition either way).
pub fn event_key(tenant: &str, session_id: Option<&str>, event_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.len() + 40);
    k.extend_from_slice(tenant.as_bytes());
    match session_id {
        Some(s) => {
            k.extend_from_slice(b"/s/");
            k.extend_from_slice(s.as_bytes());
        }
        None => {
            k.extend_from_slice(b"/e/");
            k.extend_from_slice(event_id.as_bytes());
        }
    }
    k
}

/// The events of an encoded batch (validated and redacted by the ingest
/// parser) as messages: one JSON event each.
pub fn events_of_batch(payload: &[u8]) -> Result<Vec<OutEvent>, tally_types::CodecError> {
    let reader = tally_types::BatchReader::new(payload)?;
    let backfill = reader.is_backfill();
    let correction = reader.is_correction();
    let mut out = Vec::with_capacity(reader.len());
    for ev in reader {
        let ev = ev?;
        out.push(OutEvent {
            key: event_key(ev.tenant, ev.session_id, ev.event_id),
            value: ev.to_json().into_bytes(),
            backfill,
            correction,
        });
    }
    Ok(out)
}
