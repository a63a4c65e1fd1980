//! The running pipeline: one log-writer thread (group commit) and one
//! processor thread, fed by the HTTP handlers.
//!
//! ```text
//! handlers ──WriteReq (bounded)──▶ writer: append all, fsync once, stamp lsn
//!                                    ├──▶ ack each request (oneshot)
//!                                    └──▶ processor (bounded): apply in lsn order
//! ```
//!
//! Architecture invariant: a request is acknowledged only after the fsync that
//! covers its records returned; the processor only ever sees durable records,
//! in lsn order, both live and when replaying the log on start.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tally_log::{Log, LogConfig, MergedReader, Record};
use tally_store::RollupStore;
use tally_stream::{
    Applied, CheckpointJob, Dlq, DlqBody, DlqEntry, DlqKind, Processor, RecordRef, StateStore,
    StreamConfig,
};
use tally_types::Clock;
use tally_types::time::format_rfc3339;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, Durations};
use crate::telemetry::Telemetry;

mod kafka;
pub use kafka::KafkaShared;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Log(#[from] tally_log::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    State(#[from] tally_stream::StateError),
    #[error(
        "another tally process is using this data dir ({0} is locked); stop it first or pick another --data-dir"
    )]
    Locked(PathBuf),
    #[error("raw event store: {0}")]
    Archive(#[from] tally_archive::Error),
    #[error(transparent)]
    Kafka(#[from] tally_kafka::Error),
    #[error("alerts: {0}")]
    Alerts(#[from] tally_alert::AlertError),
    #[error("schema registry: {0}")]
    Registry(#[from] tally_registry::RegistryError),
}

/// The schema registry kept in `<data-dir>/registry`.
pub fn open_registry(cfg: &Config) -> Result<Arc<tally_registry::Registry>, PipelineError> {
    let r = tally_registry::Registry::open(
        &cfg.data_dir.join("registry"),
        cfg.registry.level()?,
        cfg.registry.limits(),
    )?;
    Ok(Arc::new(r))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PipelineError {
    let path = path.to_path_buf();
    move |source| PipelineError::Io { what, path, source }
}

/// One ingest request's worth of work for the writer.
pub struct WriteReq {
    /// Encoded batches per partition.
    pub parts: Vec<(u32, Vec<u8>)>,
    pub malformed: Vec<DlqEntry>,
    pub bytes: usize,
    /// Answered after the fsync: the last lsn assigned to this request's records.
    pub done: oneshot::Sender<Result<Option<u64>, String>>,
}

/// The outcome of one [`WriteReq`]: the last lsn of its records (embedded
/// mode) or `None` (Kafka mode: acknowledged by the brokers), or why
/// nothing of it was acknowledged.
pub type WriteDone = oneshot::Receiver<Result<Option<u64>, String>>;

/// A parsed ingest request made ready for the log, whichever log it is.
pub struct Prepared {
    /// The request for the writer and the receiver of its outcome (None:
    /// nothing to write).
    pub write: Option<(WriteReq, WriteDone)>,
    /// Per event clock (the tenant, or its backfill clock), the earliest
    /// and latest event time the request carries.
    pub spans: Vec<(String, i64, i64)>,
    /// Log records the request becomes (one per partition it touches).
    pub records: u64,
}

/// Turns a parsed ingest request into the write request both backends
/// take: accepted events as encoded batches per partition (backfill ones
/// judged by their tenant's backfill clock), rejected ones as malformed
/// DLQ entries. Notes each tenant's newest event time (so an answer knows
/// when none of its events can be late) before the request is sent.
pub fn prepare_write(
    shared: &Shared,
    parsed: tally_ingest::Parsed,
    backfill: bool,
    bytes: usize,
) -> Prepared {
    let now = shared.clock.now_ms();
    let spans: Vec<(String, i64, i64)> = parsed
        .tenants
        .iter()
        .zip(&parsed.spans)
        .map(|((t, _), &(lo, hi))| {
            let clock = if backfill {
                format!("{t}\u{1}backfill")
            } else {
                t.clone()
            };
            (clock, lo, hi)
        })
        .collect();
    let malformed: Vec<DlqEntry> = parsed
        .rejected
        .into_iter()
        .map(|r| DlqEntry {
            kind: DlqKind::Malformed,
            tenant: r.tenant,
            reason: r.error,
            received_at: now,
            body: if r.is_object {
                DlqBody::Event(r.raw)
            } else {
                DlqBody::Raw(r.raw)
            },
            key: 0,
            replayed: false,
        })
        .collect();
    let parts: Vec<(u32, Vec<u8>)> = parsed
        .partitions
        .into_iter()
        .map(|(p, w)| {
            (
                p,
                if backfill {
                    w.finish_backfill()
                } else {
                    w.finish()
                },
            )
        })
        .collect();
    let records = parts.len() as u64;
    if parts.is_empty() && malformed.is_empty() {
        return Prepared {
            write: None,
            spans,
            records,
        };
    }
    {
        let mut m = shared.tenant_max_ts.lock();
        for (t, _, hi) in &spans {
            match m.get_mut(t) {
                Some(x) => *x = (*x).max(*hi),
                None => {
                    m.insert(t.clone(), *hi);
                }
            }
        }
    }
    let (done, wait) = oneshot::channel();
    let req = WriteReq {
        parts,
        malformed,
        bytes,
        done,
    };
    Prepared {
        write: Some((req, wait)),
        spans,
        records,
    }
}

/// A record for the raw store, with the ranges of its events the processor
/// dropped as duplicates.
type RawItem = (Record, Vec<(u32, u32)>);

/// A committed log record as the processor sees it.
fn record_ref(rec: &Record) -> RecordRef<'_> {
    RecordRef {
        partition: rec.partition,
        offset: rec.offset,
        next_offset: rec.next_offset(),
        lsn: rec.lsn,
        append_ms: rec.append_ms,
        payload: &rec.payload,
    }
}

/// Shared state the HTTP layer reads.
pub struct Shared {
    pub store: Arc<RwLock<RollupStore>>,
    pub dlq: Arc<Mutex<Dlq>>,
    pub telemetry: Arc<Telemetry>,
    pub processor: Arc<Mutex<ProcessorView>>,
    pub ready: AtomicBool,
    pub clock: Clock,
    pub log_bytes: AtomicI64,
    /// One past the last lsn the writer made durable.
    pub committed_lsn: AtomicU64,
    /// Results of correction records, by lsn, until their request reads them.
    pub corrections: Mutex<HashMap<u64, Applied>>,
    /// Late events of records that had any, by lsn, until their ingest
    /// request reads them (pruned past [`LATE_BY_LSN_MAX`]).
    pub late_by_lsn: Mutex<HashMap<u64, u64>>,
    /// The last commit failed (disk full or failing): `/readyz` says not
    /// ready until a write succeeds again.
    pub storage_failing: AtomicBool,
    /// Per tenant, the latest event time of any request sent to the log
    /// writer: no tenant watermark is past it minus the bound, so an ingest
    /// answer knows when none of its events can be late without asking.
    pub tenant_max_ts: Mutex<HashMap<String, i64>>,
    pub partitions: u32,
    /// The raw event store (None when `archive.enabled = false`).
    pub raw: Option<Arc<tally_archive::RawShared>>,
    /// Records applied by the processor (query caches key on it).
    pub applied: AtomicU64,
    /// Alert rules, their states, history and outbox.
    pub alerts: Arc<Mutex<tally_alert::Engine>>,
    /// Wakes the webhook delivery task when notifications are queued.
    pub alert_wake: Arc<tokio::sync::Notify>,
    /// Per tenant: event time up to which its alert buckets are closed.
    pub alert_closed: Mutex<HashMap<String, i64>>,
    /// The validated durations of the config.
    pub durations: Durations,
    /// Log offsets the last checkpoint covers (None: checkpoints are off).
    pub ckpt_offsets: Mutex<Option<Vec<u64>>>,
    /// Kafka mode: the node's view of the cluster (None: embedded mode).
    pub kafka: Option<Arc<KafkaShared>>,
    /// The schema registry (ingest checks events against it).
    pub registry: Arc<tally_registry::Registry>,
    /// Kafka mode: how a change reaches every node's registry (None:
    /// embedded mode, where changes apply to `registry` directly).
    pub registry_writes: Option<RegistryWrites>,
}

/// Applies a registry change cluster-wide and answers what it did here.
pub type RegistryWrites = Arc<
    dyn Fn(
            tally_registry::Proposal,
        ) -> Result<tally_registry::Outcome, tally_registry::RegistryError>
        + Send
        + Sync,
>;

impl Shared {
    /// Applies a registry change: through the cluster's registry log in
    /// Kafka mode, directly otherwise.
    pub fn registry_change(
        &self,
        p: tally_registry::Proposal,
    ) -> Result<tally_registry::Outcome, tally_registry::RegistryError> {
        match &self.registry_writes {
            Some(w) => w(p),
            None => p.apply(&self.registry),
        }
    }
}

/// Late counts kept for ingest answers before the oldest are pruned.
pub const LATE_BY_LSN_MAX: usize = 65_536;

/// What the processor publishes after each record.
#[derive(Debug, Default, Clone)]
pub struct ProcessorView {
    /// The furthest tenant watermark.
    pub watermark: Option<i64>,
    /// Each tenant's own watermark (its event clock).
    pub watermarks: HashMap<String, i64>,
    /// Each tenant's share of the totals (what a key's caller is shown).
    pub tenant_counts: HashMap<String, tally_stream::TenantCounts>,
    pub totals: tally_stream::Totals,
    pub dedupe_len: usize,
}

impl ProcessorView {
    fn copy_watermarks(&mut self, p: &Processor) {
        for (t, w) in p.watermarks() {
            let counts = p.tenant_counts(t);
            match self.tenant_counts.get_mut(t) {
                Some(x) => *x = counts,
                None => {
                    self.tenant_counts.insert(t.to_string(), counts);
                }
            }
            let Some(w) = w else { continue };
            match self.watermarks.get_mut(t) {
                Some(x) => *x = w,
                None => {
                    self.watermarks.insert(t.to_string(), w);
                }
            }
        }
    }
}

pub struct Pipeline {
    pub shared: Arc<Shared>,
    pub tx: mpsc::Sender<WriteReq>,
    writer: Option<JoinHandle<()>>,
    processor: Option<JoinHandle<()>>,
    raw_thread: Option<JoinHandle<()>>,
    alert_thread: Option<JoinHandle<()>>,
    /// Kafka mode: stops the progress thread once the node is down.
    kafka_stop: Option<Arc<AtomicBool>>,
    _lock: DataDirLock,
}

/// The raw store's settings and manifest location for a config.
pub fn raw_setup(
    cfg: &Config,
) -> Result<(tally_archive::ArchiveTarget, tally_archive::RawConfig), PipelineError> {
    let d = cfg.durations()?;
    let target = match &cfg.archive.s3 {
        Some(s) => tally_archive::ArchiveTarget::S3(tally_archive::S3Config {
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            endpoint: s.endpoint.clone(),
            region: s.region.clone(),
            access_key_id: s.access_key_id.clone(),
            secret_access_key: s.secret_access_key.clone(),
            allow_http: s.allow_http,
        }),
        None => tally_archive::ArchiveTarget::Local(
            cfg.archive
                .dir
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("archive")),
        ),
    };
    let mut rc = tally_archive::RawConfig::new(
        cfg.data_dir.join("raw").join("manifest"),
        cfg.log.partitions as usize,
    );
    rc.seal_interval_ms = d.seal_interval_ms as u64;
    rc.seal_rows = cfg.archive.seal_rows.max(1);
    rc.max_hot_rows = cfg.archive.max_hot_rows.max(rc.seal_rows);
    rc.row_group_rows = cfg.archive.row_group_rows.max(1024);
    rc.zstd_level = cfg.archive.zstd_level;
    rc.compact_files = cfg.archive.compact_files.max(2);
    rc.compact_rows = cfg.archive.compact_rows.max(1);
    // Replaced files outlive the longest query that may still read them.
    rc.compact_grace_ms = (d.query_timeout_ms as u64).max(1000) * 2;
    Ok((target, rc))
}

/// The malformed DLQ on disk: one NDJSON file per tenant
/// (`dlq/malformed/<tenant>.ndjson`, one entry per line), each rotated at
/// 64 MiB into `<tenant>.ndjson.old`, so one tenant's junk never erases
/// another's evidence. (Before per-tenant files, `dlq/malformed.ndjson`
/// held every tenant; it is still read.)
struct DlqFile {
    dir: PathBuf,
    /// Open files by tenant, with their length (at most `MAX_OPEN`).
    open: HashMap<String, (File, u64)>,
}

const DLQ_ROTATE_BYTES: u64 = 64 << 20;
/// Tenant files kept open at once (the rest are opened when written).
const MAX_OPEN: usize = 64;

impl DlqFile {
    fn open(dir: &Path) -> Result<Self, PipelineError> {
        let dir = dir.join("malformed");
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(DlqFile {
            dir,
            open: HashMap::new(),
        })
    }

    fn load(dir: &Path, dlq: &mut Dlq) {
        let mut files = vec![
            dir.join("malformed.ndjson.old"),
            dir.join("malformed.ndjson"),
        ];
        if let Ok(rd) = std::fs::read_dir(dir.join("malformed")) {
            let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            // Per tenant, the rotated file first.
            names.sort_by_key(|p| {
                let n = p.to_string_lossy().to_string();
                (n.trim_end_matches(".old").to_string(), !n.ends_with(".old"))
            });
            files.extend(names);
        }
        for path in files {
            let Ok(f) = File::open(&path) else {
                continue;
            };
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Some(e) = entry_from_json(&line) {
                    dlq.push(e);
                }
            }
        }
    }

    fn file(&mut self, tenant: &str) -> std::io::Result<&mut (File, u64)> {
        if !self.open.contains_key(tenant) {
            if self.open.len() >= MAX_OPEN {
                self.open.clear();
            }
            let path = self.dir.join(format!("{tenant}.ndjson"));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            self.open.insert(tenant.to_string(), (file, len));
        }
        Ok(self.open.get_mut(tenant).expect("inserted above"))
    }

    fn append(&mut self, entries: &[DlqEntry]) -> std::io::Result<()> {
        let mut by_tenant: Vec<(&str, String)> = Vec::new();
        for e in entries {
            // Tenant names are checked at ingest ([A-Za-z0-9_.-]); anything
            // else would not be a safe file name.
            let tenant = if tally_types::valid_tenant(&e.tenant) {
                e.tenant.as_str()
            } else {
                tally_types::DEFAULT_TENANT
            };
            let i = match by_tenant.iter().position(|(t, _)| *t == tenant) {
                Some(i) => i,
                None => {
                    by_tenant.push((tenant, String::new()));
                    by_tenant.len() - 1
                }
            };
            by_tenant[i].1.push_str(&entry_to_json(e).to_string());
            by_tenant[i].1.push('\n');
        }
        for (tenant, buf) in by_tenant {
            let (file, len) = self.file(tenant)?;
            file.write_all(buf.as_bytes())?;
            file.sync_data()?;
            *len += buf.len() as u64;
            if *len > DLQ_ROTATE_BYTES {
                let path = self.dir.join(format!("{tenant}.ndjson"));
                std::fs::rename(&path, path.with_extension("ndjson.old"))?;
                self.open.remove(tenant);
            }
        }
        Ok(())
    }
}

/// The JSON form of a DLQ entry (API shape plus `tenant`).
pub fn entry_to_json(e: &DlqEntry) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("kind".into(), e.kind.as_str().into());
    m.insert("tenant".into(), e.tenant.clone().into());
    m.insert("reason".into(), e.reason.clone().into());
    m.insert(
        "received_at".into(),
        tally_types::time::format_rfc3339(e.received_at).into(),
    );
    match &e.body {
        DlqBody::Event(j) => {
            let v =
                serde_json::from_str(j).unwrap_or_else(|_| serde_json::Value::String(j.clone()));
            m.insert("event".into(), v);
        }
        DlqBody::Raw(r) => {
            m.insert("raw".into(), r.clone().into());
        }
    }
    if e.kind == DlqKind::Late {
        m.insert("replayed".into(), e.replayed.into());
    }
    serde_json::Value::Object(m)
}

fn entry_from_json(line: &str) -> Option<DlqEntry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let kind = DlqKind::parse(v.get("kind")?.as_str()?)?;
    let received_at = tally_types::time::parse_rfc3339(v.get("received_at")?.as_str()?).ok()?;
    let body = match (v.get("event"), v.get("raw")) {
        (Some(ev), _) => DlqBody::Event(ev.to_string()),
        (None, Some(r)) => DlqBody::Raw(r.as_str()?.to_string()),
        _ => return None,
    };
    Some(DlqEntry {
        kind,
        tenant: v.get("tenant")?.as_str()?.to_string(),
        reason: v.get("reason")?.as_str()?.to_string(),
        received_at,
        body,
        key: 0,
        replayed: false,
    })
}

impl Pipeline {
    /// Opens the log, recovers state (newest checkpoint, then the log from
    /// its offsets), and starts the threads.
    pub fn start(cfg: &Config, clock: Clock) -> Result<Pipeline, PipelineError> {
        if let Some(k) = &cfg.kafka {
            return kafka::start(cfg, k, clock);
        }
        let d = cfg.durations()?;
        let started = Instant::now();
        let lock = DataDirLock::acquire(&cfg.data_dir)?;
        let mut log_cfg = LogConfig::new(cfg.data_dir.join("log"), cfg.log.partitions);
        log_cfg.segment_bytes = cfg.log.segment_bytes;
        log_cfg.retention_ms = d.retention_ms;
        log_cfg.retention_bytes = cfg.log.retention_bytes;
        log_cfg.fsync = cfg.log.fsync;
        let (log, report) = Log::open(log_cfg)?;
        let stream_cfg = stream_config(cfg)?;
        let store = Arc::new(RwLock::new(new_store(cfg, &d)));
        let dlq = Arc::new(Mutex::new(Dlq::new(cfg.dlq.capacity)));
        let dlq_dir = cfg.data_dir.join("dlq");
        let dlq_file = DlqFile::open(&dlq_dir)?;
        DlqFile::load(&dlq_dir, &mut dlq.lock());
        let telemetry = Arc::new(Telemetry::default());
        let mut processor = Processor::new(stream_cfg, store.clone(), dlq.clone());
        let checkpoints = d.checkpoint_interval_ms > 0;
        processor.set_journaling(checkpoints);
        processor.set_capture(cfg.archive.enabled);

        // Recovery: the newest valid checkpoint, then the log from its offsets.
        let (mut state, rec) = StateStore::open(&cfg.data_dir.join("state"), &mut processor)?;
        if let Some(seq) = rec.checkpoint {
            tracing::info!(
                checkpoint = seq,
                sealed_buckets = rec.sealed_buckets,
                open_buckets = rec.open_buckets,
                dedupe_entries = rec.dedupe_entries,
                late_entries = rec.late_entries,
                sessions = rec.sessions,
                elapsed_ms = rec.elapsed_ms,
                "loaded checkpoint"
            );
        }
        // The raw store: a new archive starts where the processor state is.
        let mut raw = None;
        if cfg.archive.enabled {
            let (target, rc) = raw_setup(cfg)?;
            let archive = tally_archive::Archive::open(&target)?;
            let genesis = processor.totals().applied_lsn();
            let (w, _) =
                tally_archive::RawWriter::open(archive, rc, (genesis, processor.offsets()))?;
            processor.raw_sealed(w.shared().sealed_lsn.load(Relaxed));
            raw = Some(w);
        }
        let replay = replay_log_from(
            &cfg.data_dir.join("log"),
            &mut processor,
            &report.end_offsets,
            checkpoints.then_some(&mut state),
            ReplayFrom::Lsn(0),
            raw.as_mut(),
            |_| {},
        )?;
        telemetry
            .log_corrupt_records
            .store(replay.corrupt.len() as u64, Relaxed);
        if replay.records > 0 || rec.checkpoint.is_some() {
            tracing::info!(
                records = replay.records,
                events = processor.totals().counted,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "recovered"
            );
        }
        if checkpoints && processor.dirty() {
            state.checkpoint(&mut processor)?;
        }
        telemetry
            .recovery_ms
            .store(started.elapsed().as_millis() as u64, Relaxed);
        telemetry.recovery_records.store(replay.records, Relaxed);
        let alerts = open_alerts(cfg, &d, true)?;
        let mut view = ProcessorView {
            watermark: processor.watermark(),
            totals: processor.totals(),
            dedupe_len: processor.dedupe_len(),
            ..ProcessorView::default()
        };
        view.copy_watermarks(&processor);
        let recovered = view.watermarks.clone();
        let view = Arc::new(Mutex::new(view));
        let shared = Arc::new(Shared {
            store,
            dlq,
            telemetry,
            processor: view,
            ready: AtomicBool::new(false),
            clock,
            log_bytes: AtomicI64::new(log.sizes().iter().sum::<u64>() as i64),
            committed_lsn: AtomicU64::new(report.next_lsn),
            corrections: Mutex::new(HashMap::new()),
            late_by_lsn: Mutex::new(HashMap::new()),
            storage_failing: AtomicBool::new(false),
            tenant_max_ts: Mutex::new(HashMap::new()),
            partitions: cfg.log.partitions,
            raw: raw.as_ref().map(|w| w.shared().clone()),
            applied: AtomicU64::new(0),
            alerts: Arc::new(Mutex::new(alerts)),
            alert_wake: Arc::new(tokio::sync::Notify::new()),
            alert_closed: Mutex::new(recovered),
            durations: d,
            ckpt_offsets: Mutex::new(checkpoints.then(|| processor.offsets().to_vec())),
            kafka: None,
            registry: open_registry(cfg)?,
            registry_writes: None,
        });
        {
            let st = shared.store.read();
            let tel = &shared.telemetry;
            tel.rollup_minutes_from_ms
                .store(st.downsampled_to(), Relaxed);
            tel.rollup_hours_from_ms.store(st.hours_from(), Relaxed);
        }
        let (tx, rx) = mpsc::channel::<WriteReq>(cfg.ingest.queue_depth.max(1));
        let (ptx, prx) = std::sync::mpsc::sync_channel::<Record>(1024);
        let sh = shared.clone();
        let writer = std::thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || writer_loop(log, report.next_lsn, rx, ptx, dlq_file, sh))
            .map_err(PipelineError::Thread)?;
        let mut raw_tx = None;
        let mut raw_thread = None;
        // Session corrections: the session index tells them as events
        // change closed sessions; without it they are found in the raw
        // events, so events applied behind a watermark are noted.
        if raw.is_some() && !cfg.sessions.index {
            shared.store.write().track_session_touches(true);
        }
        if let Some(w) = raw {
            let (tx, rx) = std::sync::mpsc::sync_channel::<RawItem>(1024);
            let sh = shared.clone();
            raw_thread = Some(
                std::thread::Builder::new()
                    .name("tally-raw".into())
                    .spawn(move || raw_loop(w, rx, sh))
                    .map_err(PipelineError::Thread)?,
            );
            raw_tx = Some(tx);
        }
        let (alert_tx, alert_thread) = spawn_alerts(&shared)?;
        let sh = shared.clone();
        let interval = checkpoints.then(|| Duration::from_millis(d.checkpoint_interval_ms as u64));
        let proc_thread = std::thread::Builder::new()
            .name("tally-processor".into())
            .spawn(move || processor_loop(processor, prx, sh, state, interval, raw_tx, alert_tx))
            .map_err(PipelineError::Thread)?;
        shared.ready.store(true, Relaxed);
        Ok(Pipeline {
            shared,
            tx,
            writer: Some(writer),
            processor: Some(proc_thread),
            raw_thread,
            alert_thread: Some(alert_thread),
            kafka_stop: None,
            _lock: lock,
        })
    }

    /// Stops accepting writes, lets the writer and processor drain, joins them.
    pub fn shutdown(mut self) {
        self.shared.ready.store(false, Relaxed);
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(s) = &self.kafka_stop {
            s.store(true, Relaxed);
        }
        if let Some(p) = self.processor.take() {
            let _ = p.join();
        }
        // The processor is gone, so the raw channel is closed: the raw
        // thread seals what is hot and ends.
        if let Some(r) = self.raw_thread.take() {
            let _ = r.join();
        }
        // The alert thread saw the processor's channel close: it evaluated
        // what closed and persisted its state.
        if let Some(a) = self.alert_thread.take() {
            let _ = a.join();
        }
    }
}

/// The alert engine over `<data-dir>/alerts`, with the config's limits.
/// `on_disk: false` keeps it in memory (Kafka mode: the alert log holds it).
fn open_alerts(
    cfg: &Config,
    d: &Durations,
    on_disk: bool,
) -> Result<tally_alert::Engine, PipelineError> {
    Ok(tally_alert::Engine::open(
        on_disk.then(|| cfg.data_dir.join("alerts").join("alerts.json")),
        tally_alert::EngineConfig {
            max_queue: cfg.alerts.max_queue.max(1),
            max_attempts: cfg.alerts.max_attempts.max(1),
            backoff_ms: d.alert_backoff_ms,
            max_backoff_ms: d.alert_max_backoff_ms,
            history: cfg.alerts.history.max(1),
            max_rules_per_tenant: cfg.alerts.max_rules_per_tenant.max(1),
            targets: Arc::new(cfg.target_policy()?),
            email: cfg.smtp.settings().is_some(),
            ..tally_alert::EngineConfig::default()
        },
    )?)
}

/// Most bytes gathered into one group commit.
const GROUP_BYTES: usize = 64 << 20;

fn writer_loop(
    mut log: Log,
    mut next_lsn: u64,
    mut rx: mpsc::Receiver<WriteReq>,
    ptx: std::sync::mpsc::SyncSender<Record>,
    mut dlq_file: DlqFile,
    shared: Arc<Shared>,
) {
    let tel = &shared.telemetry;
    let mut last_retention = 0i64;
    let mut group: Vec<WriteReq> = Vec::new();
    let mut committed: Vec<Record> = Vec::new();
    let mut malformed: Vec<DlqEntry> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.bytes;
        group.push(first);
        while bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.bytes;
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        let now = shared.clock.now_ms();
        let mut result: Result<Option<u64>, String> = Ok(None);
        let mut last_lsn: Vec<Option<u64>> = Vec::with_capacity(group.len());
        'append: for req in &mut group {
            let mut mine = None;
            for (p, payload) in req.parts.drain(..) {
                match log.append(p, next_lsn, now, &payload) {
                    Ok(offset) => {
                        committed.push(Record {
                            partition: p,
                            offset,
                            lsn: next_lsn,
                            append_ms: now,
                            payload,
                        });
                        mine = Some(next_lsn);
                        next_lsn += 1;
                    }
                    Err(e) => {
                        result = Err(e.to_string());
                        break 'append;
                    }
                }
            }
            last_lsn.push(mine);
            malformed.append(&mut req.malformed);
        }
        if result.is_ok()
            && let Err(e) = log.sync()
        {
            result = Err(e.to_string());
        }
        if result.is_ok()
            && let Err(e) = dlq_file.append(&malformed)
        {
            result = Err(format!("malformed DLQ file: {e}"));
        }
        tel.log_syncs.fetch_add(1, Relaxed);
        match &result {
            Ok(_) => {
                shared.storage_failing.store(false, Relaxed);
                shared.committed_lsn.store(next_lsn, Relaxed);
                if !malformed.is_empty() {
                    let mut dlq = shared.dlq.lock();
                    for e in malformed.drain(..) {
                        dlq.push(e);
                    }
                }
                for c in committed.drain(..) {
                    if ptx.send(c).is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                shared.storage_failing.store(true, Relaxed);
                tel.log_errors.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "log write failed; failing the requests of this commit");
                log.discard_pending();
                // Records already written by a segment roll are not acknowledged
                // and will be replayed on restart; clients retry and dedupe covers it.
                // Their lsns stay used: lsns only need to be increasing.
                committed.clear();
                malformed.clear();
            }
        }
        // Clients are told what failed, not where (no paths in answers).
        let public = result.as_ref().err().map(|e| {
            if e.contains("No space left") || e.contains("os error 28") {
                "the data disk is full".to_string()
            } else {
                "a write to the data disk failed (see the server log)".to_string()
            }
        });
        for (i, req) in group.drain(..).enumerate() {
            tel.inflight_bytes.fetch_sub(req.bytes as i64, Relaxed);
            let r = match &public {
                None => Ok(last_lsn.get(i).copied().flatten()),
                Some(e) => Err(e.clone()),
            };
            let _ = req.done.send(r);
        }
        if now - last_retention >= shared.durations.retention_interval_ms {
            last_retention = now;
            match log.enforce_retention(now, &log_keep(&shared)) {
                Ok(r) if r.segments_deleted > 0 => {
                    tel.log_segments_deleted
                        .fetch_add(r.segments_deleted as u64, Relaxed);
                    tel.log_bytes_deleted.fetch_add(r.bytes_deleted, Relaxed);
                    tracing::info!(
                        segments = r.segments_deleted,
                        bytes = r.bytes_deleted,
                        "log retention deleted segments"
                    )
                }
                Ok(r) if r.segments_kept > 0 => tracing::debug!(
                    partitions = r.segments_kept,
                    "log retention: segments past the limits kept until checkpointed and sealed"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "log retention failed"),
            }
        }
        shared
            .log_bytes
            .store(log.sizes().iter().sum::<u64>() as i64, Relaxed);
    }
    if let Err(e) = log.sync() {
        tracing::error!(error = %e, "final log sync failed");
    }
}

/// Per partition, the first log offset recovery may still replay from: the
/// older of the last checkpoint's and the raw store's sealed position.
/// Log retention never deletes a segment holding a record at or past it.
fn log_keep(shared: &Shared) -> Vec<u64> {
    let mut keep = shared.ckpt_offsets.lock().clone().unwrap_or_default();
    if let Some(raw) = &shared.raw {
        let sealed = raw.sealed_offsets.lock();
        if keep.is_empty() {
            keep = sealed.clone();
        } else {
            for (k, s) in keep.iter_mut().zip(sealed.iter()) {
                *k = (*k).min(*s);
            }
        }
    }
    keep
}

fn processor_loop(
    mut p: Processor,
    rx: std::sync::mpsc::Receiver<Record>,
    shared: Arc<Shared>,
    state: StateStore,
    interval: Option<Duration>,
    raw_tx: Option<std::sync::mpsc::SyncSender<RawItem>>,
    alert_tx: std::sync::mpsc::SyncSender<AlertPush>,
) {
    let tel = &shared.telemetry;
    let mut last_copy = Instant::now();
    let mut view_stale = false;
    // Checkpoints are prepared here (a snapshot, cheap) and written by a
    // helper thread while this one keeps applying records; one in flight.
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(StateStore, CheckpointJob)>(1);
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<Written>(1);
    let writer = std::thread::Builder::new()
        .name("tally-checkpoint".into())
        .spawn(move || {
            for (mut st, job) in job_rx {
                let r = st.write(&job);
                if done_tx.send((st, job, r)).is_err() {
                    return;
                }
            }
        });
    let writer = match writer {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the checkpoint thread; checkpoints are written inline");
            None
        }
    };
    let mut home = Some(state);
    let mut next_ckpt = interval.map(|i| Instant::now() + i);
    let retention_every = Duration::from_millis(shared.durations.retention_interval_ms as u64);
    let mut next_retention = Instant::now() + retention_every;
    loop {
        let mut wait = next_ckpt
            .map_or(next_retention, |t| t.min(next_retention))
            .saturating_duration_since(Instant::now());
        if view_stale {
            // Records were applied since the tenant view was copied.
            wait = wait.min(Duration::from_millis(100).saturating_sub(last_copy.elapsed()));
        }
        match rx.recv_timeout(wait) {
            Ok(c) => {
                let applied = match p.apply(record_ref(&c)) {
                    Ok(a) => {
                        if a.correction_record {
                            shared.corrections.lock().insert(c.lsn, a);
                        } else if a.late > 0 {
                            let mut m = shared.late_by_lsn.lock();
                            if m.len() >= LATE_BY_LSN_MAX {
                                // Nobody waits for records this old.
                                m.retain(|&l, _| l + LATE_BY_LSN_MAX as u64 / 2 > c.lsn);
                            }
                            m.insert(c.lsn, a.late);
                        }
                        Some(a)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "processor: skipping undecodable record");
                        None
                    }
                };
                let now = shared.clock.now_ms();
                tel.processing_lag_ms.store(now - c.append_ms, Relaxed);
                tel.last_applied_append_ms.store(c.append_ms, Relaxed);
                tel.last_applied_at_ms.store(now, Relaxed);
                shared.applied.fetch_add(1, Relaxed);
                if let Some(tx) = &raw_tx {
                    let drops = p.last_drops().to_vec();
                    if tx.send((c, drops)).is_err() {
                        tracing::error!(
                            "the raw store thread is gone; raw events are no longer kept"
                        );
                    }
                    if let Some(r) = &shared.raw {
                        p.raw_sealed(r.sealed_lsn.load(Relaxed));
                    }
                }
                let closed_minute = applied.is_some_and(|a| a.closed_minute);
                {
                    let mut v = shared.processor.lock();
                    v.watermark = p.watermark();
                    v.totals = p.totals();
                    v.dedupe_len = p.dedupe_len();
                    // Tenant watermarks: at once when one crossed a minute,
                    // else at most every 100 ms (status and alerts read them).
                    if closed_minute || last_copy.elapsed() >= Duration::from_millis(100) {
                        last_copy = Instant::now();
                        v.copy_watermarks(&p);
                        view_stale = false;
                    } else {
                        view_stale = true;
                    }
                }
                // A tenant watermark that crossed a minute closed buckets:
                // push the alert evaluation (the alert thread never polls
                // the store).
                if closed_minute {
                    let _ = alert_tx.try_send((p.watermark().unwrap_or(i64::MIN), Instant::now()));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if view_stale && last_copy.elapsed() >= Duration::from_millis(100) {
                    last_copy = Instant::now();
                    shared.processor.lock().copy_watermarks(&p);
                    view_stale = false;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Ok(done) = done_rx.try_recv() {
            home = Some(finish_checkpoint(&mut p, done, &shared));
        }
        if Instant::now() >= next_retention {
            next_retention = Instant::now() + retention_every;
            rollup_retention(&mut p, &shared);
        }
        if let (Some(t), Some(i)) = (next_ckpt, interval)
            && Instant::now() >= t
        {
            // Always move the deadline: one left in the past makes the
            // receive above time out at once, and the thread spins.
            if !p.dirty() {
                next_ckpt = Some(Instant::now() + i);
            } else if let Some(st) = home.take() {
                next_ckpt = Some(Instant::now() + i);
                let job = st.prepare(&mut p);
                if writer.is_some() {
                    if let Err(std::sync::mpsc::SendError((st, job))) = job_tx.send((st, job)) {
                        home = Some(write_inline(&mut p, st, job, &shared));
                    }
                } else {
                    home = Some(write_inline(&mut p, st, job, &shared));
                }
            } else {
                // The previous checkpoint is still being written.
                next_ckpt = Some(Instant::now() + Duration::from_millis(5).min(i));
            }
        }
    }
    // Shutdown: let the write in flight finish, then a last checkpoint.
    if home.is_none()
        && let Ok(done) = done_rx.recv()
    {
        home = Some(finish_checkpoint(&mut p, done, &shared));
    }
    drop(job_tx);
    if let Some(w) = writer {
        let _ = w.join();
    }
    if let (Some(st), Some(_)) = (home, interval)
        && p.dirty()
    {
        let job = st.prepare(&mut p);
        write_inline(&mut p, st, job, &shared);
    }
}

/// One rollup retention pass (downsampling, then deletion), reported.
fn rollup_retention(p: &mut Processor, shared: &Shared) {
    let d = &shared.durations;
    if d.minute_rollups_ms == 0 && d.hour_rollups_ms == 0 {
        return;
    }
    let r = p.enforce_rollup_retention(
        shared.clock.now_ms(),
        d.minute_rollups_ms,
        d.hour_rollups_ms,
    );
    let tel = &shared.telemetry;
    tel.rollup_minutes_from_ms.store(r.downsampled_to, Relaxed);
    tel.rollup_hours_from_ms.store(r.hours_from, Relaxed);
    if r.minutes_folded + r.buckets_dropped == 0 {
        return;
    }
    tel.rollup_minutes_downsampled
        .fetch_add(r.minutes_folded as u64, Relaxed);
    tel.rollup_buckets_deleted
        .fetch_add(r.buckets_dropped as u64, Relaxed);
    let horizon = |t: i64| (t > i64::MIN).then(|| format_rfc3339(t));
    tracing::info!(
        minutes_folded = r.minutes_folded,
        hours_written = r.hours_written,
        buckets_deleted = r.buckets_dropped,
        minutes_from = ?horizon(r.downsampled_to),
        hours_from = ?horizon(r.hours_from),
        "rollup retention"
    );
}

/// A watermark that crossed a minute, and when.
type AlertPush = (i64, Instant);

/// Evaluates alert rules when the processor pushes a watermark that closed
/// buckets, and every 250 ms for wall-clock progress (a stream that stops);
/// persists the engine before its notifications go out.
/// The alert thread (both modes), and the channel that tells it when
/// event time closed buckets.
fn spawn_alerts(
    shared: &Arc<Shared>,
) -> Result<(std::sync::mpsc::SyncSender<AlertPush>, JoinHandle<()>), PipelineError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<AlertPush>(64);
    let sh = shared.clone();
    let d = &shared.durations;
    let progress = tally_alert::Progress::new(d.alert_grace_ms, d.alert_live_horizon_ms);
    let thread = std::thread::Builder::new()
        .name("tally-alert".into())
        .spawn(move || alert_loop(rx, sh, progress))
        .map_err(PipelineError::Thread)?;
    Ok((tx, thread))
}

fn alert_loop(
    rx: std::sync::mpsc::Receiver<AlertPush>,
    shared: Arc<Shared>,
    template: tally_alert::Progress,
) {
    let mut progress: HashMap<String, tally_alert::Progress> = HashMap::new();
    let source = StoreSource(&shared.store, shared.kafka.as_deref());
    let mut last_persist = Instant::now();
    let mut open = true;
    // Kafka mode: changes not yet taken by the alert log.
    let mut unsent: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    // Corrections of closed buckets seen so far: those after it are judged
    // again by the rules that judged them.
    let mut corrections_seen = shared.store.read().version();
    while open {
        let mut closed = None;
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok((_, at)) => closed = Some(at),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => open = false,
        }
        while let Ok((_, at)) = rx.try_recv() {
            closed = closed.or(Some(at));
        }
        let now = shared.clock.now_ms();
        // Each tenant's event time closes its own buckets.
        let wms = shared.processor.lock().watermarks.clone();
        let mut through = HashMap::with_capacity(wms.len());
        for (tenant, wm) in wms {
            let p = progress
                .entry(tenant.clone())
                .or_insert_with(|| template.clone());
            p.observe(Some(wm), now);
            if let Some(t) = p.closed_through(now) {
                through.insert(tenant, t);
            }
        }
        // Kafka mode: one node evaluates, the holder of the alert lease.
        let lead = shared.kafka.as_ref().map(|k| {
            let owns = k.worker.parts.lock().contains_key(&0);
            k.alert_log.lease(owns)
        });
        let mut engine = shared.alerts.lock();
        if let Some(lead) = lead {
            engine.set_leader(lead);
        }
        let queued = engine.advance_tenants(
            &|t| through.get(t).copied(),
            now,
            Some(closed.unwrap_or_else(Instant::now)),
            &source,
        );
        let corrected: Vec<(String, i64)> = {
            let store = shared.store.read();
            let changes = store.all_changes_since(corrections_seen, 100_000);
            if let Some(c) = changes.last() {
                corrections_seen = c.version;
            }
            let mut keys: Vec<(String, i64)> = changes
                .iter()
                .filter_map(|c| match c.what {
                    tally_store::Changed::Bucket { minute, .. } => {
                        Some((c.tenant.to_string(), minute))
                    }
                    tally_store::Changed::Session(_) => None,
                })
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        };
        if !corrected.is_empty() {
            engine.rejudge(&corrected, now, &source);
        }
        *shared.alert_closed.lock() = through;
        if let Some(k) = shared.kafka.as_ref() {
            // The outbox is published before the delivery task sees it,
            // and a delivery's outcome within a loop of it.
            unsent.extend(engine.take_changes().into_iter().map(|c| (c.key, c.value)));
            drop(engine);
            if !unsent.is_empty() {
                match k.alert_log.publish_blocking(unsent.clone()) {
                    Ok(()) => unsent.clear(),
                    Err(e) => {
                        tracing::warn!(error = %e, pending = unsent.len(), "cannot publish alert changes; retrying")
                    }
                }
            }
            if queued > 0 && unsent.is_empty() {
                shared.alert_wake.notify_one();
            }
            continue;
        }
        if queued > 0 || last_persist.elapsed() >= Duration::from_secs(1) || !open {
            last_persist = Instant::now();
            if let Err(e) = engine.persist() {
                tracing::error!(error = %e, "cannot persist alert state; retrying");
            }
        }
        drop(engine);
        if queued > 0 {
            shared.alert_wake.notify_one();
        }
    }
}

/// Alert rules read the rollup store, and in Kafka mode the node's lag.
struct StoreSource<'a>(&'a RwLock<RollupStore>, Option<&'a KafkaShared>);

impl tally_alert::Source for StoreSource<'_> {
    /// A rule's metric over `[from, to)` (one series: the rule is not
    /// grouped).
    fn values(&self, r: &tally_alert::Rule, from: i64, to: i64) -> Vec<(i64, f64)> {
        self.series(r, from, to)
            .into_iter()
            .flat_map(|(_, points)| points)
            .collect()
    }

    /// A rule's metric per label combination: the very query
    /// `GET /api/v1/metrics` runs (node metrics: one series of samples).
    fn series(
        &self,
        r: &tally_alert::Rule,
        from: i64,
        to: i64,
    ) -> Vec<(tally_alert::Labels, Vec<(i64, f64)>)> {
        let Ok(granularity) = tally_store::Granularity::parse(&r.granularity) else {
            return Vec::new();
        };
        if r.node_metric() {
            let points = self.1.map_or_else(Vec::new, |k| {
                k.node_metric(&r.metric, from, to, granularity.ms())
            });
            return vec![(Vec::new(), points)];
        }
        self.0
            .read()
            .query(&r.query(from, to))
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let points = s.points.iter().map(|&(b, v)| (b, v.as_f64())).collect();
                (s.labels, points)
            })
            .collect()
    }

    fn first_minute(&self, tenant: &str) -> Option<i64> {
        self.0.read().span(tenant).map(|(first, _)| first)
    }
}

type Written = (
    StateStore,
    CheckpointJob,
    Result<tally_stream::CheckpointReport, tally_stream::StateError>,
);

fn write_inline(
    p: &mut Processor,
    mut st: StateStore,
    job: CheckpointJob,
    shared: &Shared,
) -> StateStore {
    let r = st.write(&job);
    finish_checkpoint(p, (st, job, r), shared)
}

/// Records a checkpoint's outcome; on failure gives the processor its
/// journal back so the next checkpoint writes it.
fn finish_checkpoint(p: &mut Processor, (st, job, r): Written, shared: &Shared) -> StateStore {
    let tel = &shared.telemetry;
    match r {
        Ok(r) => {
            *shared.ckpt_offsets.lock() = Some(job.offsets().to_vec());
            tel.checkpoints.fetch_add(1, Relaxed);
            tel.checkpoint_bytes.fetch_add(r.bytes, Relaxed);
            tel.checkpoint_duration.observe_us(r.elapsed_us);
            tel.last_checkpoint_ms.store(shared.clock.now_ms(), Relaxed);
            tracing::debug!(
                seq = r.seq,
                bytes = r.bytes,
                us = r.elapsed_us,
                "checkpoint"
            );
        }
        Err(e) => {
            tel.checkpoint_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %e, "checkpoint failed; state stays in memory and is retried");
            job.restore(p);
        }
    }
    st
}

/// The stream settings of a config.
pub fn stream_config(cfg: &Config) -> Result<StreamConfig, PipelineError> {
    let d = cfg.durations()?;
    Ok(StreamConfig {
        partitions: cfg.log.partitions,
        watermark_bound_ms: d.watermark_bound_ms,
        idle_timeout_ms: d.idle_timeout_ms,
        allowed_lateness_ms: d.allowed_lateness_ms,
        dimensions: cfg.dimensions.build()?,
    })
}

/// What a log replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub records: u64,
    /// Records fed to the raw store.
    pub raw_records: u64,
    /// Records before the replay's start, passed over.
    pub skipped: u64,
    pub bytes: u64,
    /// Corrupt data found (checksum, truncation), with partition and offset.
    pub corrupt: Vec<String>,
}

/// Payload bytes replayed between two checkpoints during a long replay.
const REPLAY_CHECKPOINT_BYTES: u64 = 256 << 20;

/// Applies the log from `p.offsets()` up to `end` in lsn order. With a state
/// store, checkpoints every few hundred MiB so a long replay keeps little in
/// memory. `progress` sees the payload bytes applied so far.
pub fn replay_log(
    log_dir: &Path,
    p: &mut Processor,
    end: &[u64],
    state: Option<&mut StateStore>,
    progress: impl FnMut(u64),
) -> Result<ReplayReport, PipelineError> {
    replay_log_from(log_dir, p, end, state, ReplayFrom::Lsn(0), None, progress)
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Records with this log-wide sequence number or later.
    Lsn(u64),
    /// Records appended at or after this time (epoch ms).
    Time(i64),
}

/// [`replay_log`] that skips (without applying) the records before `from`,
/// and feeds a raw store: from its own position, which may lie before the
/// processor's (records the processor already applied then go to the raw
/// store alone, with the dropped ranges the checkpoint kept for them).
pub fn replay_log_from(
    log_dir: &Path,
    p: &mut Processor,
    end: &[u64],
    mut state: Option<&mut StateStore>,
    from: ReplayFrom,
    mut raw: Option<&mut tally_archive::RawWriter>,
    mut progress: impl FnMut(u64),
) -> Result<ReplayReport, PipelineError> {
    let mut start = p.offsets().to_vec();
    if let Some(r) = raw.as_deref() {
        for (s, &o) in start.iter_mut().zip(r.offsets()) {
            *s = (*s).min(o);
        }
    }
    let mut out = ReplayReport::default();
    let mut since_ckpt = 0u64;
    let mut reader = MergedReader::open(log_dir, &start, end)?;
    for rec in reader.by_ref() {
        let applied = p
            .offsets()
            .get(rec.partition as usize)
            .is_some_and(|&o| rec.offset < o);
        if !applied {
            let before = match from {
                ReplayFrom::Lsn(l) => rec.lsn < l,
                ReplayFrom::Time(t) => rec.append_ms < t,
            };
            if before {
                p.skip(rec.partition, rec.next_offset());
                out.skipped += 1;
                out.bytes += rec.next_offset() - rec.offset;
                progress(out.bytes);
                continue;
            }
            if let Err(e) = p.apply(record_ref(&rec)) {
                tracing::error!(error = %e, "replay: skipping undecodable record");
                out.corrupt.push(e.to_string());
            }
        }
        if let Some(r) = raw.as_deref_mut()
            && r.wants(rec.partition, rec.offset)
        {
            let drops = if applied {
                p.drops_of(rec.lsn)
            } else {
                p.last_drops()
            };
            raw_append(r, &rec, drops);
            out.raw_records += 1;
        }
        if applied {
            continue;
        }
        out.records += 1;
        let n = rec.next_offset() - rec.offset;
        out.bytes += n;
        since_ckpt += n;
        progress(out.bytes);
        if since_ckpt > REPLAY_CHECKPOINT_BYTES
            && let Some(s) = state.as_deref_mut()
        {
            since_ckpt = 0;
            s.checkpoint(p)?;
        }
    }
    for e in &reader.errors {
        tracing::error!(error = %e, "replay: corrupt log data skipped");
        out.corrupt.push(e.to_string());
    }
    Ok(out)
}

fn raw_append(r: &mut tally_archive::RawWriter, rec: &Record, drops: &[(u32, u32)]) {
    let res = r
        .append(
            rec.partition,
            rec.next_offset(),
            rec.lsn,
            rec.append_ms,
            &rec.payload,
            drops,
        )
        .and_then(|_| r.maybe_seal());
    if let Err(e) = res {
        tracing::error!(error = %e, lsn = rec.lsn, "raw store: record not kept");
    }
}

/// The raw thread naps until its rows are due to be published when it
/// found fewer queued records than this (of the channel's 1024).
const RAW_NAP_RECORDS: usize = 64;

/// The raw store's thread: appends records as the processor applied them,
/// makes them visible when it catches up, seals on time or size, and
/// enforces archive retention; at the end (shutdown) seals what is hot.
fn raw_loop(
    mut w: tally_archive::RawWriter,
    rx: std::sync::mpsc::Receiver<RawItem>,
    shared: Arc<Shared>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let retention_ms = shared.durations.archive_retention_ms;
    let every = Duration::from_millis(shared.durations.retention_interval_ms as u64);
    let mut last_retention = Instant::now() - every;
    loop {
        // Appended rows wait at most PUBLISH_INTERVAL to become visible.
        let wait = w.publish_wait().unwrap_or(Duration::from_millis(100));
        match rx.recv_timeout(wait) {
            Ok((rec, drops)) => {
                raw_append(&mut w, &rec, &drops);
                let mut n = 0;
                while n < 256 {
                    match rx.try_recv() {
                        Ok((rec, drops)) => {
                            raw_append(&mut w, &rec, &drops);
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                // Caught up and due: make what was appended visible.
                if n < 256 {
                    match w.publish_wait() {
                        Some(d) if d.is_zero() => {
                            if let Err(e) = w.flush() {
                                tracing::error!(error = %e, "raw store flush failed");
                            }
                        }
                        // Built rows are due later and records come seldom:
                        // sleep until then and take what queued, instead of
                        // a wake-up (a futex call on each side and a context
                        // switch) for every record. Frequent records are
                        // taken as they come: a nap would fill the channel.
                        Some(d) if n < RAW_NAP_RECORDS => std::thread::sleep(d),
                        _ => {}
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = w.flush().and_then(|_| w.maybe_seal()) {
                    tracing::error!(error = %e, "raw store seal failed");
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if last_retention.elapsed() >= every {
            last_retention = Instant::now();
            if retention_ms > 0 {
                let cutoff = shared.clock.now_ms() - retention_ms;
                if let Err(e) = w.retain(cutoff) {
                    tracing::error!(error = %e, "archive retention failed");
                }
            }
            // Merging small files runs on the seal thread; never waits.
            w.compact_soon();
        }
    }
    match w.close() {
        Ok(r) if r.rows > 0 => tracing::info!(
            rows = r.rows,
            bytes = r.bytes,
            "sealed hot raw events at shutdown"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "final raw seal failed; the events are rebuilt from the log on the next start")
        }
    }
}

/// Holds `<data-dir>/LOCK` so two processes never share a data dir.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, PipelineError> {
        std::fs::create_dir_all(data_dir).map_err(io_err("create", data_dir))?;
        let path = data_dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(PipelineError::Locked(path)),
            Err(std::fs::TryLockError::Error(source)) => Err(PipelineError::Io {
                what: "lock",
                path,
                source,
            }),
        }
    }
}

/// An empty rollup store, building sessions as `[sessions]` says.
fn new_store(cfg: &Config, d: &crate::config::Durations) -> RollupStore {
    let mut store = RollupStore::new();
    if cfg.sessions.index {
        store
            .sessions_mut()
            .enable(d.session_gap_ms, cfg.sessions.max_sessions);
    }
    store
}

/// What [`rebuild_state`] did.
#[derive(Debug, Default)]
pub struct RebuildReport {
    pub replay: ReplayReport,
    pub totals: tally_stream::Totals,
    pub watermark: Option<i64>,
    pub buckets: usize,
    /// With `verify`: buckets (tenant, minute) that differ from the current
    /// state, and whether the totals match. `None` without `verify`.
    pub differing_buckets: Option<usize>,
    pub totals_match: Option<bool>,
    /// Where the state that was replaced now is (unless a dry run).
    pub previous_state: Option<PathBuf>,
    pub elapsed_ms: u64,
}

/// `tally replay`: reprocesses the log into a fresh state under the current
/// settings; optionally compares it with the current state; then (unless
/// `dry_run`) makes it the state the next start recovers from. The old
/// state directory is kept beside it as `state.old-<ms>`.
pub fn rebuild_state(
    cfg: &Config,
    from: ReplayFrom,
    verify: bool,
    dry_run: bool,
    progress: impl FnMut(u64, u64),
) -> Result<RebuildReport, PipelineError> {
    let started = Instant::now();
    let _lock = DataDirLock::acquire(&cfg.data_dir)?;
    let d = cfg.durations()?;
    let mut log_cfg = LogConfig::new(cfg.data_dir.join("log"), cfg.log.partitions);
    log_cfg.segment_bytes = cfg.log.segment_bytes;
    log_cfg.retention_ms = d.retention_ms;
    let (log, report) = Log::open(log_cfg)?;
    let total: u64 = log.sizes().iter().sum();
    drop(log);
    let new_dir = cfg.data_dir.join("state.replay");
    if new_dir.exists() {
        std::fs::remove_dir_all(&new_dir).map_err(io_err("remove", &new_dir))?;
    }
    let fresh = || {
        let store = Arc::new(RwLock::new(new_store(cfg, &d)));
        let dlq = Arc::new(Mutex::new(Dlq::new(cfg.dlq.capacity)));
        stream_config(cfg).map(|sc| Processor::new(sc, store, dlq))
    };
    let mut p = fresh()?;
    let (mut state, _) = StateStore::open(&new_dir, &mut p)?;
    let mut progress = progress;
    // Keep the dropped ranges the raw store has not sealed yet, so the
    // rebuilt checkpoint can still rebuild its hot rows.
    p.set_capture(cfg.archive.enabled);
    let replay = replay_log_from(
        &cfg.data_dir.join("log"),
        &mut p,
        &report.end_offsets,
        Some(&mut state),
        from,
        None,
        |b| progress(b, total),
    )?;
    if let Ok((_, rc)) = raw_setup(cfg)
        && let Ok(Some((next_lsn, _))) =
            tally_archive::sealed_position(&rc.manifest_path, cfg.log.partitions as usize)
    {
        p.raw_sealed(next_lsn);
    }
    state.checkpoint(&mut p)?;
    let mut out = RebuildReport {
        totals: p.totals(),
        watermark: p.watermark(),
        buckets: p.store().read().bucket_count(),
        ..RebuildReport::default()
    };
    let old_dir = cfg.data_dir.join("state");
    if verify {
        let mut cur = fresh()?;
        let (_s, _) = StateStore::open(&old_dir, &mut cur)?;
        replay_log(
            &cfg.data_dir.join("log"),
            &mut cur,
            &report.end_offsets,
            None,
            |_| {},
        )?;
        let a = p.store().read();
        let b = cur.store().read();
        let mut differing = 0;
        let keys: std::collections::BTreeSet<(String, i64)> = a
            .minutes_in(i64::MIN, i64::MAX)
            .chain(b.minutes_in(i64::MIN, i64::MAX))
            .map(|(t, m, _)| (t.to_string(), m))
            .collect();
        for (t, m) in keys {
            if a.minute(&t, m) != b.minute(&t, m) {
                differing += 1;
            }
        }
        out.differing_buckets = Some(differing);
        out.totals_match = Some(p.totals() == cur.totals());
    }
    drop(state);
    if !dry_run {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let aside = cfg.data_dir.join(format!("state.old-{stamp}"));
        if old_dir.exists() {
            std::fs::rename(&old_dir, &aside).map_err(io_err("rename", &old_dir))?;
            out.previous_state = Some(aside);
        }
        std::fs::rename(&new_dir, &old_dir).map_err(io_err("rename", &new_dir))?;
        File::open(&cfg.data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", &cfg.data_dir))?;
    }
    out.replay = replay;
    out.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(out)
}
