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
    /// How the configured partitioner places a key, when we can follow it.
    placement: Option<Partitioner>,
    /// The events topic's partition count (0: unknown) and when it was
    /// last asked for.
    partitions: Mutex<(u32, Option<Instant>)>,
}

/// The largest value of a grouped message: well under the brokers'
/// default `max.message.bytes` (1 MB).
pub const GROUP_BYTES: usize = 256 * 1024;

/// The largest event HTTP ingest takes in Kafka mode (its fields' text):
/// it goes to the events topic as one record at most, which with its
/// envelope stays under librdkafka's and the brokers' default
/// `message.max.bytes` (1,000,000 and 1 MB). A larger one would be
/// refused by the producer at every retry.
pub const MAX_EVENT_BYTES: usize = 900 * 1024;

/// How often the events topic's partition count is asked for again.
const PARTITIONS_EVERY: Duration = Duration::from_secs(30);

/// librdkafka's key partitioners (the `partitioner` setting), computed
/// here so that a group of events can be sent as one message to the
/// partition each of its keys would have gone to on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// `consistent_random` (librdkafka's default) and `consistent`: CRC-32.
    Crc32,
    /// `murmur2_random` and `murmur2`: the Java client's default.
    Murmur2,
    /// `fnv1a_random` and `fnv1a`.
    Fnv1a,
}

impl Partitioner {
    /// The partitioner a `partitioner` setting names (librdkafka's default
    /// when `None`); `None` for one that does not place by key (`random`)
    /// or that we do not know.
    pub fn from_setting(name: Option<&str>) -> Option<Partitioner> {
        match name.unwrap_or("consistent_random") {
            "consistent" | "consistent_random" => Some(Partitioner::Crc32),
            "murmur2" | "murmur2_random" => Some(Partitioner::Murmur2),
            "fnv1a" | "fnv1a_random" => Some(Partitioner::Fnv1a),
            _ => None,
        }
    }

    /// The partition (of `n`) a non-empty `key` goes to.
    pub fn partition(self, key: &[u8], n: u32) -> u32 {
        let n = n.max(1);
        match self {
            Partitioner::Crc32 => crc32fast::hash(key) % n,
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) % n,
            Partitioner::Fnv1a => fnv1a(key) % n,
        }
    }
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, librdkafka's
/// `rd_murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate().rev() {
            h ^= (*b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// 32-bit FNV-1a as librdkafka's `rd_fnv1a` has it: the absolute value
/// of the hash read as a signed number (Sarama's hash partitioner).
fn fnv1a(data: &[u8]) -> u32 {
    let h = data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ *b as u32).wrapping_mul(0x0100_0193)
    });
    (h as i32).wrapping_abs() as u32
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
        let setting = s
            .client
            .iter()
            .rev()
            .find(|(k, _)| k == "partitioner")
            .map(|(_, v)| v.as_str());
        Ok(EventProducer {
            producer,
            topic: s.topic_events.clone(),
            stats,
            placement: Partitioner::from_setting(setting),
            partitions: Mutex::new((0, None)),
        })
    }

    /// The events topic's partition count, asked of the brokers at most
    /// every [`PARTITIONS_EVERY`]; 0 while unknown.
    fn partition_count(&self) -> u32 {
        let mut p = self.partitions.lock();
        if p.1.is_none_or(|at| at.elapsed() >= PARTITIONS_EVERY) {
            p.1 = Some(Instant::now());
            if let Ok(md) = self
                .producer
                .client()
                .fetch_metadata(Some(&self.topic), Duration::from_secs(1))
            {
                let n = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == self.topic)
                    .map_or(0, |t| t.partitions().len() as u32);
                if n > 0 {
                    p.0 = n;
                }
            }
        }
        p.0
    }

    /// Produces `events` to the events topic as few messages: the events
    /// bound for one partition (where each one's key would have sent it
    /// alone) become NDJSON messages of up to [`GROUP_BYTES`]. A message
    /// costs the producer, the brokers and every consumer far more than
    /// the bytes of one more line in it. Falls back to one message per
    /// event while the partition count is unknown or the configured
    /// partitioner does not place by key. `done` as for
    /// [`EventProducer::send`].
    pub fn send_grouped(&self, events: Vec<OutEvent>, done: Done) {
        let n = self.partition_count();
        let Some(placement) = self.placement.filter(|_| n > 0 && events.len() > 1) else {
            return self.send(events, done);
        };
        let mut groups: Vec<Vec<OutEvent>> = (0..n).map(|_| Vec::new()).collect();
        for ev in events {
            let p = placement.partition(&ev.key, n) as usize;
            let (backfill, correction) = (ev.backfill, ev.correction);
            let g = &mut groups[p];
            match g.last_mut() {
                Some(last)
                    if last.value.len() + 1 + ev.value.len() <= GROUP_BYTES
                        && (last.backfill, last.correction) == (backfill, correction) =>
                {
                    last.value.push(b'\n');
                    last.value.extend_from_slice(&ev.value);
                }
                _ => g.push(ev),
            }
        }
        let messages: Vec<(i32, OutEvent)> = groups
            .into_iter()
            .enumerate()
            .flat_map(|(p, g)| g.into_iter().map(move |m| (p as i32, m)))
            .collect();
        let topic = self.topic.clone();
        self.produce(&topic, messages, done)
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
        let placed = events.into_iter().map(|e| (-1, e)).collect();
        self.produce(topic, placed, done)
    }

    /// Produces each event to its partition (`-1`: the partitioner's
    /// choice for its key).
    fn produce(&self, topic: &str, events: Vec<(i32, OutEvent)>, done: Done) {
        if events.is_empty() {
            done(Ok(()));
            return;
        }
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(events.len()),
            error: Mutex::new(None),
            done: Mutex::new(Some(done)),
        });
        for (partition, ev) in &events {
            let mut rec = BaseRecord::with_opaque_to(topic, pending.clone())
                .key(&ev.key[..])
                .payload(&ev.value[..]);
            if *partition >= 0 {
                rec = rec.partition(*partition);
            }
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
