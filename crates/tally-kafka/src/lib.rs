//! Kafka mode: several Tally nodes share the partitions of one events topic.
//!
//! - [`produce`]: `POST /api/v1/events` produces the accepted events to the
//!   events topic (idempotent, `acks=all`) and answers after the broker's
//!   acknowledgement.
//! - [`worker`]: the node's member of the consumer group. For every
//!   partition assigned to it, one `tally_stream::Processor` (dedupe,
//!   per-tenant watermarks, minute windows); every commit interval the
//!   changed aggregates, the late events and each partition's state are
//!   produced and the consumed offsets committed in one Kafka transaction.
//! - [`materialize`]: every node reads the aggregates topic
//!   (`read_committed`) into its rollup store, so every node answers for
//!   every partition; a new owner of a partition restores its state from
//!   the same view.
//! - [`codec`]: the versioned records of the aggregates topic.
//! - [`alerts`]: the alert log (every node's copy of the alert engine)
//!   and the lease that lets one node evaluate and notify.

pub mod alerts;
pub mod codec;
pub mod materialize;
pub mod produce;
pub mod raw;
pub mod registry_log;
#[doc(hidden)]
pub mod testing;
pub mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::RwLock;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tally_store::RollupStore;

pub use materialize::Materialized;
pub use produce::{
    EventProducer, GROUP_BYTES, MAX_EVENT_BYTES, OutEvent, Partitioner, ProduceStats, event_key,
    events_of_batch,
};
pub use worker::{Hooks, PartStatus, WorkerStats};

/// Message header that marks a backfill (history judged by the tenant's
/// backfill clock), as `?backfill=true` does on HTTP ingest.
pub const BACKFILL_HEADER: &str = "tally-backfill";

/// Message header that marks a late event sent again to be applied to its
/// window whatever the watermark (`POST /api/v1/dlq/replay`): once per
/// event, never over an event already counted.
pub const CORRECTION_HEADER: &str = "tally-correction";

/// Everything Kafka mode needs to know (the server maps its `[kafka]`
/// config section onto it).
#[derive(Debug, Clone)]
pub struct Settings {
    pub brokers: String,
    pub group_id: String,
    pub topic_events: String,
    pub topic_aggregates: String,
    pub topic_late: String,
    /// The alert log (compacted, one partition).
    pub topic_alerts: String,
    /// Malformed events (the malformed DLQ every node lists).
    pub topic_malformed: String,
    /// The schema registry's proposals (one partition, kept).
    pub topic_registry: String,
    /// Partitions of the topics Tally creates when they do not exist.
    pub partitions: u32,
    /// librdkafka settings passed through (SASL, TLS, timeouts...).
    pub client: Vec<(String, String)>,
    /// This node's name: its transactional id is `<group-id>-<node-id>`,
    /// so a restarted node fences its own previous incarnation.
    pub node_id: String,
    /// How often the partition workers commit a transaction.
    pub commit_interval: Duration,
    /// How long an ingest request waits for the broker before 503.
    pub produce_timeout_ms: u64,
}

impl Settings {
    /// A librdkafka config: the bootstrap servers, then `own` (what this
    /// client needs), then the pass-through settings, which win.
    pub(crate) fn client_config(&self, own: &[(&str, String)]) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("tally-{}", self.node_id));
        for (k, v) in own {
            cfg.set(*k, v);
        }
        for (k, v) in &self.client {
            cfg.set(k, v);
        }
        cfg
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka {what}: {source}")]
    Client {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error(
        "kafka topic {topic:?} not found on {brokers}: create it, or let Tally create it (the broker refused: {reason})"
    )]
    NoTopic {
        topic: String,
        brokers: String,
        reason: String,
    },
    #[error("kafka partition {partition}: {source}")]
    Process {
        partition: u32,
        #[source]
        source: tally_stream::Error,
    },
    #[error(
        "kafka commit: the brokers refused a record as larger than their max.message.bytes ({source}); the partitions of this transaction cannot commit until they take it: raise max.message.bytes of the topic named there (Tally creates {aggregates:?} allowing 16 MiB; each partition's state there holds about 100 bytes per tenant)"
    )]
    RecordTooLarge {
        aggregates: String,
        #[source]
        source: KafkaError,
    },
    #[error("kafka thread: {0}")]
    Thread(std::io::Error),
    #[error("sealing raw events into the archive {archive}: {what}")]
    Archive { archive: String, what: String },
    #[error(
        "the Kafka brokers at {brokers} did not answer ({source}): check kafka.brokers (TALLY__KAFKA__BROKERS) and that Kafka is running and reachable from here"
    )]
    Unreachable {
        brokers: String,
        #[source]
        source: KafkaError,
    },
}

/// Partitions of `topic` (from the broker's metadata).
pub(crate) fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> Result<u32, Error> {
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|source| Error::Client {
            what: "metadata",
            source,
        })?;
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    if n == 0 {
        return Err(Error::NoTopic {
            topic: topic.into(),
            brokers: "the brokers".into(),
            reason: "no partitions in its metadata".into(),
        });
    }
    Ok(n as u32)
}

/// The end offset of partition `partition` of `topic`, asked again until
/// `deadline` while the broker cannot say yet (a topic created a moment
/// ago has no leader for a while).
pub(crate) fn end_offset<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    partition: i32,
    deadline: std::time::Instant,
) -> Result<i64, KafkaError> {
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match client.fetch_watermarks(
            topic,
            partition,
            left.clamp(Duration::from_millis(100), Duration::from_secs(5)),
        ) {
            Ok((_, hi)) => return Ok(hi),
            Err(e) if left.is_zero() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits until the reader of one of the cluster's one-partition logs has
/// applied every record `topic` holds now (its next offset in `applied`),
/// up to `timeout`; if not, says how far it got.
pub(crate) fn catch_up<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    applied: &std::sync::atomic::AtomicI64,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    let end = end_offset(client, topic, 0, deadline)
        .map_err(|e| format!("its end offset is unknown: {e}"))?;
    if wait_applied(applied, end, deadline) {
        Ok(())
    } else {
        Err(format!(
            "{} of its {end} records applied",
            applied.load(Relaxed)
        ))
    }
}

/// Waits until `applied` reaches `offset`, up to `deadline`; answers
/// whether it did.
pub(crate) fn wait_applied(
    applied: &std::sync::atomic::AtomicI64,
    offset: i64,
    deadline: std::time::Instant,
) -> bool {
    while applied.load(Relaxed) < offset {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// An idempotent producer (`acks=all`) for one of the cluster's logs.
pub(crate) fn log_producer(
    settings: &Settings,
    what: &'static str,
) -> Result<rdkafka::producer::FutureProducer, Error> {
    settings
        .client_config(&[
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            (
                "message.timeout.ms",
                settings.produce_timeout_ms.to_string(),
            ),
        ])
        .create()
        .map_err(|source| Error::Client { what, source })
}

/// A reader of one of the cluster's one-partition logs, assigned from
/// offset `from` (0: the beginning); its group (`<group>-<role>-<node>`)
/// commits nothing.
pub(crate) fn log_consumer(
    s: &Settings,
    what: &'static str,
    role: &str,
    topic: &str,
    from: i64,
) -> Result<(rdkafka::consumer::BaseConsumer, rdkafka::TopicPartitionList), Error> {
    use rdkafka::consumer::Consumer as _;
    let err = |source| Error::Client { what, source };
    let consumer: rdkafka::consumer::BaseConsumer = s
        .client_config(&[
            ("group.id", format!("{}-{role}-{}", s.group_id, s.node_id)),
            ("enable.auto.commit", "false".into()),
            ("enable.partition.eof", "false".into()),
        ])
        .create()
        .map_err(err)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    let at = if from == 0 {
        rdkafka::Offset::Beginning
    } else {
        rdkafka::Offset::Offset(from)
    };
    tpl.add_partition_offset(topic, 0, at).map_err(err)?;
    consumer.assign(&tpl).map_err(err)?;
    Ok((consumer, tpl))
}

/// Runs a log's reader on its own thread until `stop`, again a second
/// after each failure.
pub(crate) fn spawn_reader(
    name: &str,
    what: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut read: impl FnMut() -> Result<(), Error> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = read() {
                    tracing::warn!(error = %e, "{what} reader failed; starting again in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        })
        .map_err(Error::Thread)
}

/// Creates the cluster's topics when they do not exist (the aggregates
/// topic and the alert log compacted: only the last value per key
/// matters; the registry log kept forever).
pub fn ensure_topics(s: &Settings) -> Result<(), Error> {
    let cfg = s.client_config(&[]);
    let admin: AdminClient<DefaultClientContext> =
        cfg.create().map_err(|source| Error::Client {
            what: "admin client",
            source,
        })?;
    let n = s.partitions.max(1) as i32;
    let topics = [
        NewTopic::new(&s.topic_events, n, TopicReplication::Fixed(-1)),
        // Aggregates are split to stay under a broker's default 1 MB
        // (`worker::MAX_VALUE_BYTES`), but one partition state holds every
        // tenant's clocks of its partition: headroom for many tenants.
        NewTopic::new(&s.topic_aggregates, n, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact")
            .set("max.message.bytes", "16777216"),
        NewTopic::new(&s.topic_late, n, TopicReplication::Fixed(-1)),
        NewTopic::new(&s.topic_alerts, 1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact"),
        NewTopic::new(&s.topic_malformed, n, TopicReplication::Fixed(-1)),
        NewTopic::new(&s.topic_registry, 1, TopicReplication::Fixed(-1)).set("retention.ms", "-1"),
    ];
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results =
        futures::executor::block_on(admin.create_topics(&topics, &opts)).map_err(|source| {
            Error::Unreachable {
                brokers: s.brokers.clone(),
                source,
            }
        })?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                // Creating may be forbidden (ACLs) while the topic exists:
                // only a missing topic is an error.
                if partition_count(admin.inner(), &topic).is_err() {
                    return Err(Error::NoTopic {
                        topic,
                        brokers: s.brokers.clone(),
                        reason: code.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Asks the brokers where each partition of the events topic ends (for
/// the lag of partitions other nodes own).
pub struct EndOffsets {
    consumer: rdkafka::consumer::BaseConsumer,
    topic: String,
}

impl EndOffsets {
    pub fn new(s: &Settings) -> Result<EndOffsets, Error> {
        let consumer = s
            .client_config(&[("group.id", format!("{}-ends-{}", s.group_id, s.node_id))])
            .create()
            .map_err(|source| Error::Client {
                what: "end offsets",
                source,
            })?;
        Ok(EndOffsets {
            consumer,
            topic: s.topic_events.clone(),
        })
    }

    /// The end (high watermark) of `partition`, `None` if the brokers did
    /// not answer within `timeout`.
    pub fn end(&self, partition: u32, timeout: Duration) -> Option<u64> {
        use rdkafka::consumer::Consumer;
        self.consumer
            .fetch_watermarks(&self.topic, partition as i32, timeout)
            .ok()
            .map(|(_, hi)| hi.max(0) as u64)
    }
}

/// The Kafka side of one node: the ingest producer, the partition worker
/// and the aggregates reader.
pub struct KafkaNode {
    producer: EventProducer,
    view: Arc<Materialized>,
    stats: Arc<WorkerStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl KafkaNode {
    /// Starts the threads on topics that exist ([`ensure_topics`]);
    /// `store` is the node's rollup store, kept equal to the committed
    /// aggregates.
    pub fn start(
        settings: Settings,
        hooks: Hooks,
        store: Arc<RwLock<RollupStore>>,
    ) -> Result<KafkaNode, Error> {
        let producer = EventProducer::new(&settings, Arc::new(ProduceStats::default()))?;
        let view = Materialized::new(store);
        let stats = Arc::new(WorkerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (s, v, st) = (settings.clone(), view.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tally-kafka-view".into())
                    .spawn(move || {
                        if let Err(e) = materialize::run(s, v, st) {
                            tracing::error!(error = %e, "aggregates reader stopped");
                        }
                    })
                    .map_err(Error::Thread)?,
            );
        }
        {
            let (s, v, st, stats) = (settings, view.clone(), stop.clone(), stats.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tally-kafka-worker".into())
                    .spawn(move || worker::run(s, hooks, v, stats, st))
                    .map_err(Error::Thread)?,
            );
        }
        Ok(KafkaNode {
            producer,
            view,
            stats,
            stop,
            threads,
        })
    }

    pub fn producer(&self) -> &EventProducer {
        &self.producer
    }

    pub fn view(&self) -> &Arc<Materialized> {
        &self.view
    }

    pub fn stats(&self) -> &Arc<WorkerStats> {
        &self.stats
    }

    /// Delivers what is queued (up to 10 s), then stops the threads; the
    /// worker commits what it processed before leaving the group.
    pub fn shutdown(mut self) {
        self.producer.flush(Duration::from_secs(10));
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
