//! The pipeline in Kafka mode: no local log, no local processor. The HTTP
//! handlers' write requests are produced to the events topic (answered
//! after the broker's acknowledgement); `tally-kafka` processes this
//! node's share of the partitions and keeps the rollup store equal to the
//! committed aggregates of all of them; a small thread copies the
//! cluster's progress (watermarks, totals) into what `/metrics`, the
//! status endpoint and the alert thread read.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tally_ingest::Parser;
use tally_kafka::{Hooks, KafkaNode, Settings};
use tally_store::RollupStore;
use tally_stream::{Dlq, DlqEntry, DlqKind};
use tally_types::Clock;
use tokio::sync::mpsc;

use super::{
    AlertPush, DataDirLock, DlqFile, Pipeline, PipelineError, ProcessorView, Shared, WriteReq,
    io_err, open_alerts, spawn_alerts, stream_config,
};
use crate::config::{Config, KafkaSection};
use crate::telemetry::Telemetry;

/// What the HTTP layer shows of Kafka mode.
pub struct KafkaShared {
    pub settings: Settings,
    pub node_id: String,
    pub group_id: String,
    pub topic_events: String,
    pub topic_late: String,
    pub topic_malformed: String,
    pub view: Arc<tally_kafka::Materialized>,
    pub worker: Arc<tally_kafka::WorkerStats>,
    pub produce: Arc<tally_kafka::ProduceStats>,
    pub alert_log: Arc<tally_kafka::alerts::AlertLog>,
    /// The schema registry's proposals, applied in order by every node.
    pub registry_log: Arc<tally_kafka::registry_log::RegistryLog>,
    /// Replayed late events as the late topic reported them: (tenant,
    /// dedupe key) → applied (else skipped).
    pub replays: Mutex<HashMap<(String, u128), bool>>,
    /// Lag of every partition of the events topic (records, seconds), as
    /// this node sees it: its own from its worker, the others' from their
    /// committed state and the partition's end. Refreshed every second.
    pub lag: Mutex<std::collections::BTreeMap<u32, (u64, f64)>>,
    /// The cluster's worst lag, sampled every second for alert rules on
    /// node metrics: (wall time, records, seconds), the last day.
    pub lag_samples: Mutex<std::collections::VecDeque<(i64, u64, f64)>>,
}

/// How long lag samples are kept for alert rules (an anomaly detector's
/// learning window included).
const LAG_SAMPLES_KEPT_MS: i64 = 86_400_000;

impl KafkaShared {
    /// A node metric (`consumer_lag_seconds` or `consumer_lag_records`)
    /// per `step`-wide bucket of `[from, to)`: the largest sample of each
    /// bucket that has any.
    pub fn node_metric(&self, metric: &str, from: i64, to: i64, step: i64) -> Vec<(i64, f64)> {
        bucket_max(self.lag_samples.lock().iter(), metric, from, to, step)
    }
}

/// Lag samples (time, records, seconds) in time order → the largest
/// value of `metric` per `step`-wide bucket of `[from, to)` that has any.
fn bucket_max<'a>(
    samples: impl Iterator<Item = &'a (i64, u64, f64)>,
    metric: &str,
    from: i64,
    to: i64,
    step: i64,
) -> Vec<(i64, f64)> {
    let step = step.max(1);
    let mut out: Vec<(i64, f64)> = Vec::new();
    for &(at, records, seconds) in samples {
        if at < from || at >= to {
            continue;
        }
        let v = match metric {
            "consumer_lag_records" => records as f64,
            _ => seconds,
        };
        let b = tally_types::time::align_down(at, step);
        match out.last_mut() {
            Some((lb, lv)) if *lb == b => *lv = lv.max(v),
            _ => out.push((b, v)),
        }
    }
    out
}

/// The node's name: `kafka.node-id`, else one made on first start and
/// kept in the data dir (a restarted node keeps its transactional id and
/// so fences its previous incarnation's open transaction).
fn node_id(cfg: &Config, k: &KafkaSection) -> Result<String, PipelineError> {
    if !k.node_id.trim().is_empty() {
        return Ok(k.node_id.trim().to_string());
    }
    let path = cfg.data_dir.join("kafka-node-id");
    if let Ok(s) = std::fs::read_to_string(&path)
        && !s.trim().is_empty()
    {
        return Ok(s.trim().to_string());
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let id = format!("{host}-{:08x}", rand::random::<u32>());
    std::fs::write(&path, format!("{id}\n")).map_err(io_err("write", &path))?;
    Ok(id)
}

pub(super) fn settings(cfg: &Config, k: &KafkaSection) -> Result<Settings, PipelineError> {
    let ms = |v: &str| {
        tally_types::time::parse_duration_ms(v)
            .unwrap_or(200)
            .max(1) as u64
    };
    Ok(Settings {
        brokers: k.brokers.clone(),
        group_id: k.group_id.clone(),
        topic_events: k.topic_events.clone(),
        topic_aggregates: k.topic_aggregates.clone(),
        topic_late: k.topic_late.clone(),
        topic_alerts: if k.topic_alerts.trim().is_empty() {
            format!("{}_alerts", k.group_id)
        } else {
            k.topic_alerts.trim().to_string()
        },
        topic_malformed: if k.topic_malformed.trim().is_empty() {
            format!("{}_malformed", k.group_id)
        } else {
            k.topic_malformed.trim().to_string()
        },
        topic_registry: if k.topic_registry.trim().is_empty() {
            format!("{}_registry", k.group_id)
        } else {
            k.topic_registry.trim().to_string()
        },
        partitions: k.partitions,
        client: k
            .client
            .iter()
            .map(|(a, b)| (a.clone(), b.to_string()))
            .collect(),
        node_id: node_id(cfg, k)?,
        commit_interval: Duration::from_millis(ms(&k.commit_interval)),
        produce_timeout_ms: ms(&k.produce_timeout),
    })
}

pub(super) fn start(
    cfg: &Config,
    k: &KafkaSection,
    clock: Clock,
) -> Result<Pipeline, PipelineError> {
    let d = cfg.durations()?;
    let lock = DataDirLock::acquire(&cfg.data_dir)?;
    let settings = settings(cfg, k)?;
    let stream = stream_config(cfg)?;
    let mut view = RollupStore::new();
    view.set_dimensions(stream.dimensions.clone());
    let store = Arc::new(RwLock::new(view));
    let dlq = Arc::new(Mutex::new(Dlq::new(cfg.dlq.capacity)));
    let dlq_dir = cfg.data_dir.join("dlq");
    let dlq_file = Arc::new(Mutex::new(DlqFile::open(&dlq_dir)?));
    DlqFile::load(&dlq_dir, &mut dlq.lock());
    let telemetry = Arc::new(Telemetry::default());

    let schemas = Arc::new(cfg.schemas.clone());
    let privacy = cfg.privacy.build(&cfg.data_dir)?;
    let skew = d.max_future_skew_ms;
    let depth = cfg.ingest.max_json_depth;
    let malformed_sink = {
        let (dlq, file) = (dlq.clone(), dlq_file.clone());
        Arc::new(move |entries: Vec<DlqEntry>| {
            if let Err(e) = file.lock().append(&entries) {
                tracing::warn!(error = %e, "cannot write the malformed DLQ file");
            }
            let mut q = dlq.lock();
            for e in entries {
                q.push(e);
            }
        })
    };
    // Raw events: each node seals its partitions' events into the shared
    // archive; every node lists the files of committed seals.
    let raw = if cfg.archive.enabled {
        let (target, _) = super::raw_setup(cfg)?;
        let archive = tally_archive::Archive::open(&target)?;
        Some(Arc::new(tally_archive::RawShared {
            archive,
            hot: Default::default(),
            files: Default::default(),
            sealed_lsn: AtomicU64::new(0),
            sealed_offsets: Mutex::new(Vec::new()),
            published_lsn: AtomicU64::new(0),
            version: AtomicU64::new(0),
            stats: Default::default(),
        }))
    } else {
        None
    };
    // The cluster's registry: every node applies the proposals of the
    // registry topic in order (see tally_kafka::registry_log), so every
    // node's registry is the same; nothing of it is kept in the data dir.
    let registry = Arc::new(tally_registry::Registry::in_memory_with(
        cfg.registry.level()?,
        cfg.registry.limits(),
    ));
    // The topics first, once: the registry log is read to its end before
    // the node serves, and a first node of a cluster finds it missing.
    tally_kafka::ensure_topics(&settings)?;
    let (registry_log, registry_writes) = start_registry_log(&settings, &registry)?;
    let checks: Arc<dyn tally_types::schema::PropsCheck> = registry.clone();
    let decoder = registry.clone();
    let hooks = Hooks {
        stream,
        make_parser: Arc::new(move |ts| {
            Parser::with_schemas(1, schemas.clone())
                .with_future_limit(ts, skew)
                .with_max_depth(depth)
                .with_privacy(privacy.clone())
                .with_registry(Some(checks.clone()))
        }),
        // They come back through the malformed topic's reader below.
        on_malformed: Arc::new(|_| {}),
        now_ms: {
            let c = clock.clone();
            Arc::new(move || c.now_ms())
        },
        raw: raw.as_ref().map(|r| tally_kafka::raw::RawSink {
            archive: r.archive.clone(),
            seal_interval: Duration::from_millis(
                tally_types::time::parse_duration_ms(&k.seal_interval)
                    .unwrap_or(5000)
                    .max(1) as u64,
            ),
            seal_rows: cfg.archive.seal_rows.max(1),
            zstd_level: cfg.archive.zstd_level,
            compact_files: cfg.archive.compact_files.max(2),
            compact_rows: cfg.archive.compact_rows.max(1),
            // As in embedded mode: queries that listed a replaced file
            // have finished with it by then.
            grace: Duration::from_millis((d.query_timeout_ms as u64).max(1000) * 2),
            retention_ms: d.archive_retention_ms,
            orphan_age: Duration::from_millis(
                tally_types::time::parse_duration_ms(&k.orphan_age)
                    .unwrap_or(3_600_000)
                    .max(1) as u64,
            ),
        }),
        minute_retention_ms: d.minute_rollups_ms,
        // Confluent-framed Avro values: decoded with the schema of their
        // id (of the tenant owning it), the tenant filled in when the
        // record has none.
        decode_binary: Some(Arc::new(move |value: &[u8]| {
            let mut line = Vec::with_capacity(value.len() * 2);
            decoder.decode_owned_event_into(value, &mut line)?;
            line.push(b'\n');
            Ok(line)
        })),
        // Each partition's owner builds its sessions and publishes the
        // changes of closed ones; `max-sessions` is shared by the
        // partitions, so a node holds at most that many.
        sessions: cfg.sessions.index.then(|| {
            let share = cfg.sessions.max_sessions / settings.partitions.max(1) as usize;
            (d.session_gap_ms, share.max(1000))
        }),
    };
    let node = KafkaNode::start(settings.clone(), hooks, store.clone())?;
    if let Some(raw) = &raw {
        let listing = Arc::new(Listing::new(raw.clone()));
        let l = listing.clone();
        node.view().on_files(Box::new(move |sealed| l.add(sealed)));
        node.view()
            .on_replace(Box::new(move |r| listing.replace(r)));
    }
    tracing::info!(
        brokers = %settings.brokers,
        group = %settings.group_id,
        node = %settings.node_id,
        topic = %settings.topic_events,
        "kafka mode"
    );
    // Every node holds the whole alert engine, rebuilt from the alert log;
    // the lease holder evaluates and notifies.
    let alerts = Arc::new(Mutex::new(open_alerts(cfg, &d, false)?.replicated()));
    let alert_log = {
        let a = alerts.clone();
        tally_kafka::alerts::AlertLog::start(
            &settings,
            Arc::new(move |key: &str, value: Option<&[u8]>| {
                if let Err(e) = a.lock().apply_change(key, value) {
                    tracing::warn!(error = %e, "skipped an unreadable alert log record");
                }
            }),
        )?
    };
    if let Err(why) = alert_log.catch_up(Duration::from_secs(10)) {
        tracing::warn!(
            topic = %settings.topic_alerts,
            "the alert log was not read to its end within 10 s ({why}); alert rules appear as it is read"
        );
    }
    let kafka = Arc::new(KafkaShared {
        settings: settings.clone(),
        node_id: settings.node_id.clone(),
        group_id: settings.group_id.clone(),
        topic_events: settings.topic_events.clone(),
        topic_late: settings.topic_late.clone(),
        topic_malformed: settings.topic_malformed.clone(),
        view: node.view().clone(),
        worker: node.stats().clone(),
        produce: node.producer().stats().clone(),
        alert_log,
        registry_log,
        replays: Mutex::new(HashMap::new()),
        lag: Mutex::new(Default::default()),
        lag_samples: Mutex::new(Default::default()),
    });
    let shared = Arc::new(Shared {
        store,
        dlq,
        telemetry,
        processor: Arc::new(Mutex::new(ProcessorView::default())),
        ready: AtomicBool::new(false),
        clock,
        log_bytes: AtomicI64::new(0),
        committed_lsn: AtomicU64::new(0),
        corrections: Mutex::new(HashMap::new()),
        late_by_lsn: Mutex::new(HashMap::new()),
        storage_failing: AtomicBool::new(false),
        tenant_max_ts: Mutex::new(HashMap::new()),
        partitions: cfg.log.partitions,
        raw,
        applied: AtomicU64::new(0),
        alerts,
        alert_wake: Arc::new(tokio::sync::Notify::new()),
        alert_closed: Mutex::new(HashMap::new()),
        durations: d,
        ckpt_offsets: Mutex::new(None),
        kafka: Some(kafka.clone()),
        registry,
        registry_writes: Some(registry_writes),
    });
    let (tx, rx) = mpsc::channel::<WriteReq>(cfg.ingest.queue_depth.max(1));
    let node = Mutex::new(Some(node));
    let sh = shared.clone();
    let ingest = std::thread::Builder::new()
        .name("tally-kafka-ingest".into())
        .spawn(move || ingest_loop(rx, node, sh, malformed_sink))
        .map_err(PipelineError::Thread)?;
    let (alert_tx, alert_thread) = spawn_alerts(&shared)?;
    let stop = Arc::new(AtomicBool::new(false));
    // Every node lists the late and the malformed events of every
    // partition (the newest `dlq.capacity` per tenant; the topics keep
    // them all).
    for (topic, kind, pause) in [
        (&settings.topic_late, DlqKind::Late, Duration::from_secs(1)),
        (
            &settings.topic_malformed,
            DlqKind::Malformed,
            Duration::from_millis(200),
        ),
    ] {
        let (dlq, st, s, topic, k) = (
            shared.dlq.clone(),
            stop.clone(),
            settings.clone(),
            topic.clone(),
            kafka.clone(),
        );
        std::thread::Builder::new()
            .name(format!("tally-kafka-{}", kind.as_str()))
            .spawn(move || {
                let r = tally_kafka::materialize::read_committed(
                    &s,
                    &topic,
                    kind.as_str(),
                    pause,
                    &st,
                    &mut |key, value| {
                        use tally_kafka::codec::{LateRecord, decode_dlq, decode_late_record};
                        let rec = value.and_then(|v| match kind {
                            DlqKind::Late => decode_late_record(key, v),
                            DlqKind::Malformed => decode_dlq(key, v, kind).map(LateRecord::Entry),
                        });
                        match rec {
                            Some(LateRecord::Entry(e)) => dlq.lock().push_view(e),
                            Some(LateRecord::Replayed {
                                tenant,
                                key,
                                applied,
                            }) => {
                                dlq.lock().mark_replayed(&tenant, key);
                                k.replays.lock().insert((tenant, key), applied);
                            }
                            None => return Err(format!("not a {} DLQ record", kind.as_str())),
                        }
                        Ok(())
                    },
                );
                if let Err(e) = r {
                    tracing::error!(error = %e, "{} DLQ reader stopped", kind.as_str());
                }
            })
            .map_err(PipelineError::Thread)?;
    }
    let sh = shared.clone();
    let st = stop.clone();
    let progress_thread = std::thread::Builder::new()
        .name("tally-kafka-progress".into())
        .spawn(move || progress_loop(sh, alert_tx, st))
        .map_err(PipelineError::Thread)?;
    shared.ready.store(true, Relaxed);
    Ok(Pipeline {
        shared,
        tx,
        writer: Some(ingest),
        processor: Some(progress_thread),
        raw_thread: None,
        alert_thread: Some(alert_thread),
        kafka_stop: Some(stop),
        _lock: lock,
    })
}

/// Produces each write request's events; answers it once the broker has
/// acknowledged all of them (503 to the client otherwise).
fn ingest_loop(
    mut rx: mpsc::Receiver<WriteReq>,
    node: Mutex<Option<KafkaNode>>,
    shared: Arc<Shared>,
    malformed: Arc<dyn Fn(Vec<DlqEntry>) + Send + Sync>,
) {
    while let Some(mut req) = rx.blocking_recv() {
        if !req.malformed.is_empty() {
            // To the malformed topic, so every node lists them; kept here
            // only if the brokers do not take them.
            let entries = std::mem::take(&mut req.malformed);
            let out: Vec<tally_kafka::OutEvent> = entries
                .iter()
                .map(|e| tally_kafka::OutEvent {
                    key: tally_kafka::codec::dlq_key(e).into_bytes(),
                    value: tally_kafka::codec::dlq_value(e).into_bytes(),
                    backfill: false,
                    correction: false,
                })
                .collect();
            if let (Some(n), Some(k)) = (node.lock().as_ref(), shared.kafka.as_ref()) {
                let fallback = malformed.clone();
                n.producer().send_to(
                    &k.topic_malformed,
                    out,
                    Box::new(move |r| {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "malformed events not taken by the brokers; listed on this node only");
                            fallback(entries);
                        }
                    }),
                );
            } else {
                malformed(entries);
            }
        }
        let mut events = Vec::new();
        let mut bad = None;
        for (_, payload) in &req.parts {
            match tally_kafka::events_of_batch(payload) {
                Ok(mut e) => events.append(&mut e),
                Err(e) => bad = Some(e.to_string()),
            }
        }
        let bytes = req.bytes as i64;
        let tel = shared.telemetry.clone();
        let done = req.done;
        if let Some(e) = bad {
            tel.inflight_bytes.fetch_sub(bytes, Relaxed);
            let _ = done.send(Err(format!("encoding events for Kafka: {e}")));
            continue;
        }
        let guard = node.lock();
        let Some(n) = guard.as_ref() else {
            tel.inflight_bytes.fetch_sub(bytes, Relaxed);
            let _ = done.send(Err("shutting down".into()));
            continue;
        };
        n.producer().send_grouped(
            events,
            Box::new(move |r| {
                tel.inflight_bytes.fetch_sub(bytes, Relaxed);
                let _ =
                    done.send(r.map(|()| None).map_err(|e| {
                        format!("the Kafka broker did not acknowledge the events ({e})")
                    }));
            }),
        );
    }
    // Handlers are gone: deliver what is queued, then stop the node.
    if let Some(n) = node.lock().take() {
        n.shutdown();
    }
}

/// Copies the cluster's progress into the processor view (watermarks per
/// tenant: the slowest partition's; totals: summed) four times a second,
/// and wakes the alert thread when a tenant's watermark crosses a minute.
fn progress_loop(
    shared: Arc<Shared>,
    alert_tx: std::sync::mpsc::SyncSender<AlertPush>,
    stop: Arc<AtomicBool>,
) {
    let Some(k) = shared.kafka.clone() else {
        return;
    };
    let mut last_minutes: HashMap<String, i64> = HashMap::new();
    let ends = match tally_kafka::EndOffsets::new(&k.settings) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask for partition ends; lag shown for owned partitions only");
            None
        }
    };
    let mut last_lag = std::time::Instant::now() - Duration::from_secs(10);
    let mut last_retention = std::time::Instant::now() - Duration::from_secs(3600);
    let retention_every =
        Duration::from_millis(shared.durations.retention_interval_ms.max(1000) as u64);
    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        if last_retention.elapsed() >= retention_every {
            // Minutes fold as the partitions' cuts pass them (in the view);
            // hours past their retention go here, by this node's clock.
            last_retention = std::time::Instant::now();
            let dropped = k
                .view
                .enforce_hour_retention(shared.clock.now_ms(), shared.durations.hour_rollups_ms);
            let (minutes_from, hours_from) = k.view.horizons();
            let tel = &shared.telemetry;
            tel.rollup_minutes_from_ms.store(minutes_from, Relaxed);
            tel.rollup_hours_from_ms.store(hours_from, Relaxed);
            tel.rollup_buckets_deleted
                .fetch_add(dropped as u64, Relaxed);
        }
        let states = k.view.states();
        let mut wms: HashMap<String, i64> = HashMap::new();
        let mut totals = tally_stream::Totals::default();
        for (_, s) in &states {
            totals.counted += s.counted;
            totals.duplicates += s.duplicates;
            totals.late += s.late;
            for (t, w) in &s.watermarks {
                let Some(w) = *w else { continue };
                let e = wms.entry(t.clone()).or_insert(w);
                *e = (*e).min(w);
            }
        }
        let mut crossed = false;
        for (t, w) in &wms {
            let m = tally_types::time::align_down(*w, tally_types::time::MINUTE_MS);
            if last_minutes.insert(t.clone(), m).is_none_or(|was| was < m) {
                crossed = true;
            }
        }
        {
            let mut v = shared.processor.lock();
            v.watermark = wms.values().copied().max();
            v.watermarks = wms;
            v.totals = totals;
        }
        if last_lag.elapsed() >= Duration::from_secs(1) {
            last_lag = std::time::Instant::now();
            let now = shared.clock.now_ms();
            let mine = k.worker.parts.lock().clone();
            let mut lag = std::collections::BTreeMap::new();
            for (p, st) in &states {
                if let Some(m) = mine.get(p) {
                    lag.insert(*p, (m.lag_records, m.lag_seconds));
                    continue;
                }
                let Some(end) = ends
                    .as_ref()
                    .and_then(|e| e.end(*p, Duration::from_millis(500)))
                else {
                    continue;
                };
                // Transaction markers take offsets too: one short is caught up.
                let behind = end.saturating_sub(st.next_offset);
                let records = if behind <= 1 { 0 } else { behind };
                let seconds = if records == 0 {
                    0.0
                } else {
                    (now - st.committed_at).max(0) as f64 / 1000.0
                };
                lag.insert(*p, (records, seconds));
            }
            for (p, m) in &mine {
                lag.entry(*p).or_insert((m.lag_records, m.lag_seconds));
            }
            let worst = lag
                .values()
                .fold((0u64, 0f64), |(r, s), &(lr, ls)| (r.max(lr), s.max(ls)));
            *k.lag.lock() = lag;
            let mut samples = k.lag_samples.lock();
            samples.push_back((now, worst.0, worst.1));
            while samples
                .front()
                .is_some_and(|(at, _, _)| *at < now - LAG_SAMPLES_KEPT_MS)
            {
                samples.pop_front();
            }
        }
        // What the live feed and the SQL result cache watch for changes:
        // here, every aggregates record the view applied.
        shared.applied.store(k.view.counters().0, Relaxed);
        // Freshness: the newest message any partition's numbers include.
        if let Some(newest) = states.iter().filter_map(|(_, s)| s.last_message_ms).max() {
            let tel = &shared.telemetry;
            tel.last_applied_append_ms.store(newest, Relaxed);
            tel.last_applied_at_ms.store(shared.clock.now_ms(), Relaxed);
        }
        if crossed {
            let _ = alert_tx.try_send((0, std::time::Instant::now()));
        }
    }
    // The alert thread publishes its last changes as its channel closes.
    drop(alert_tx);
    k.alert_log.shutdown();
    k.registry_log.shutdown();
}

/// Starts the registry log into `registry` and answers it with the way
/// this node's HTTP layer changes the registry: propose, wait until the
/// proposal is applied here, answer what it did.
fn start_registry_log(
    settings: &Settings,
    registry: &Arc<tally_registry::Registry>,
) -> Result<
    (
        Arc<tally_kafka::registry_log::RegistryLog>,
        super::RegistryWrites,
    ),
    PipelineError,
> {
    use tally_registry::{Outcome, Proposal, RegistryError};
    type Outcomes = Mutex<HashMap<String, Result<Outcome, RegistryError>>>;
    let origin = format!("{}/{:016x}", settings.node_id, rand::random::<u64>());
    let outcomes: Arc<Outcomes> = Arc::default();
    let apply = {
        let (registry, outcomes, origin) = (registry.clone(), outcomes.clone(), origin.clone());
        Arc::new(move |offset: i64, key: &[u8], value: &[u8]| {
            let outcome = match serde_json::from_slice::<Proposal>(value) {
                Ok(p) => p.apply(&registry),
                Err(e) => {
                    tracing::warn!(offset, error = %e, "registry log: skipped an unreadable proposal");
                    return;
                }
            };
            // Only this process waits for its own proposals' outcomes.
            let key = String::from_utf8_lossy(key);
            if key.starts_with(origin.as_str()) {
                outcomes.lock().insert(key.into_owned(), outcome);
            }
        })
    };
    let log = tally_kafka::registry_log::RegistryLog::start(settings, apply)?;
    if let Err(why) = log.catch_up(Duration::from_secs(10)) {
        tracing::warn!(
            topic = %settings.topic_registry,
            "the registry log was not read to its end within 10 s ({why}); schemas appear as it is read"
        );
    }
    let seq = std::sync::atomic::AtomicU64::new(0);
    let l = log.clone();
    let writes: super::RegistryWrites = Arc::new(move |p: Proposal| {
        let key = format!("{origin}/{}", seq.fetch_add(1, Relaxed));
        let value = serde_json::to_vec(&p).expect("a proposal serializes");
        l.propose(&key, &value, Duration::from_secs(10))
            .map_err(RegistryError::Storage)?;
        outcomes.lock().remove(&key).unwrap_or_else(|| {
            Err(RegistryError::Storage(
                "the proposal was applied but its outcome is missing".into(),
            ))
        })
    });
    Ok((log, writes))
}

/// Adds the files of each committed seal to what SQL reads. With a local
/// archive, a file this node cannot see (each node archiving to its own
/// directory) is left out, counted and reported once.
/// The node's listing of committed archive files (what SQL over `events`
/// reads), kept from the seals and replacements the view applies.
struct Listing {
    raw: Arc<tally_archive::RawShared>,
    /// Paths listed: a record applied twice adds nothing.
    listed: Mutex<std::collections::HashSet<String>>,
    warned: AtomicBool,
}

impl Listing {
    fn new(raw: Arc<tally_archive::RawShared>) -> Listing {
        Listing {
            raw,
            listed: Mutex::new(Default::default()),
            warned: AtomicBool::new(false),
        }
    }

    /// Lists one file; answers its rows (0: not listed).
    fn list(
        &self,
        files: &mut Vec<Arc<tally_archive::ArchiveFile>>,
        f: &tally_kafka::codec::SealedFile,
    ) -> u64 {
        let raw = &self.raw;
        if let Some(root) = raw.archive.local_root()
            && !root.join(&f.path).exists()
        {
            raw.stats.seal_errors.fetch_add(1, Relaxed);
            if !self.warned.swap(true, Relaxed) {
                tracing::error!(
                    file = %f.path,
                    archive = %raw.archive.describe,
                    "a file another node sealed is not in this node's archive: in Kafka mode every node needs the same archive (archive.dir on a shared file system, or [archive.s3]); SQL over events leaves such files out"
                );
            }
            return 0;
        }
        if !self.listed.lock().insert(f.path.clone()) {
            return 0;
        }
        files.push(Arc::new(tally_archive::ArchiveFile {
            path: f.path.clone(),
            tenant: f.tenant.as_str().into(),
            min_ts: f.min_ts,
            max_ts: f.max_ts,
            rows: f.rows,
            bytes: f.bytes,
        }));
        f.rows
    }

    fn add(&self, sealed: &tally_kafka::codec::Sealed) {
        let mut added = 0;
        {
            let mut files = self.raw.files.write();
            for f in &sealed.files {
                added += self.list(&mut files, f);
            }
        }
        self.raw.stats.rows_sealed.fetch_add(added, Relaxed);
        self.raw.bump_version();
    }

    /// Compaction (the merged file replaces its inputs at once, so no
    /// query sees a row twice or misses one) or retention.
    fn replace(&self, r: &tally_kafka::codec::Replaced) {
        {
            let mut files = self.raw.files.write();
            files.retain(|f| !r.removed.contains(&f.path));
            let mut listed = self.listed.lock();
            for p in &r.removed {
                listed.remove(p);
            }
            drop(listed);
            if let Some((_, _, f)) = &r.added {
                self.list(&mut files, f);
            }
        }
        let st = &self.raw.stats;
        match r.added {
            Some(_) => st
                .files_compacted
                .fetch_add(r.removed.len() as u64, Relaxed),
            None => st.files_deleted.fetch_add(r.removed.len() as u64, Relaxed),
        };
        self.raw.bump_version();
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_max;

    #[test]
    fn a_bucket_of_a_node_metric_is_its_worst_sample() {
        let m = 60_000;
        let samples = [
            (m - 1, 9, 9.0),
            (m, 10, 1.0),
            (m + 1000, 500, 40.0),
            (m + 59_999, 20, 3.0),
            (3 * m + 5, 0, 0.0),
            (4 * m, 7, 7.0),
        ];
        assert_eq!(
            bucket_max(samples.iter(), "consumer_lag_seconds", m, 4 * m, m),
            vec![(m, 40.0), (3 * m, 0.0)]
        );
        assert_eq!(
            bucket_max(samples.iter(), "consumer_lag_records", 0, 5 * m, 2 * m),
            vec![(0, 500.0), (2 * m, 0.0), (4 * m, 7.0)]
        );
    }
}
