//! Every metric Tally exports, defined once, rendered in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

pub use tally_types::histogram::Histogram;

/// Process-wide telemetry of one server.
#[derive(Debug)]
pub struct Telemetry {
    pub requests: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_rejected: AtomicU64,
    /// Events refused whole with their request (overload, 413, 400).
    pub events_dropped_overload: AtomicU64,
    /// Low-priority events refused under overload (`[shedding]`).
    pub events_shed: AtomicU64,
    /// Possibly late events refused while their tenant's late DLQ is full.
    pub events_refused_late_full: AtomicU64,
    /// Session corrections: events applied behind a watermark taken for
    /// a look, keys (session or user) read again, keys not read (over the
    /// task's budget), session changes listed.
    pub session_touches: AtomicU64,
    pub session_touches_dropped: AtomicU64,
    pub session_keys_checked: AtomicU64,
    pub session_keys_skipped: AtomicU64,
    pub requests_overloaded: AtomicU64,
    /// Requests answered 429: a tenant over its ingest quota.
    pub requests_over_quota: AtomicU64,
    pub bytes_ingested: AtomicU64,
    pub ack_latency: Histogram,
    pub query_latency: Histogram,
    /// Metrics API answers served from / missing the cache.
    pub metrics_cache_hits: AtomicU64,
    pub metrics_cache_misses: AtomicU64,
    pub sql_latency: Histogram,
    /// Bucket close (watermark passed it) → webhook answered 2xx.
    pub alert_latency: Histogram,
    pub log_syncs: AtomicU64,
    pub log_errors: AtomicU64,
    /// Append time of the last record the processor applied (ms).
    pub last_applied_append_ms: AtomicI64,
    /// Wall time when the processor last applied a record (ms).
    pub last_applied_at_ms: AtomicI64,
    /// Processing lag of the last record: applied − appended (ms).
    pub processing_lag_ms: AtomicI64,
    pub inflight_bytes: AtomicI64,
    pub checkpoints: AtomicU64,
    pub checkpoint_errors: AtomicU64,
    pub checkpoint_duration: Histogram,
    pub checkpoint_bytes: AtomicU64,
    /// Wall time of the last checkpoint written (ms; 0 = none yet).
    pub last_checkpoint_ms: AtomicI64,
    /// How long the last start spent recovering (checkpoint load + log replay).
    pub recovery_ms: AtomicU64,
    pub recovery_records: AtomicU64,
    /// Corrupt log data found (and skipped) while replaying.
    pub log_corrupt_records: AtomicU64,
    /// Log segments (and their bytes) deleted by retention.
    pub log_segments_deleted: AtomicU64,
    pub log_bytes_deleted: AtomicU64,
    /// Minute rollups folded into hours, and rollup buckets deleted.
    pub rollup_minutes_downsampled: AtomicU64,
    pub rollup_buckets_deleted: AtomicU64,
    /// Minute rollups start here (earlier ones are hours; i64::MIN: all kept).
    pub rollup_minutes_from_ms: AtomicI64,
    /// Hour rollups start here (earlier ones were deleted; i64::MIN: all kept).
    pub rollup_hours_from_ms: AtomicI64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            requests: AtomicU64::new(0),
            events_accepted: AtomicU64::new(0),
            events_rejected: AtomicU64::new(0),
            events_dropped_overload: AtomicU64::new(0),
            events_shed: AtomicU64::new(0),
            events_refused_late_full: AtomicU64::new(0),
            session_touches: AtomicU64::new(0),
            session_touches_dropped: AtomicU64::new(0),
            session_keys_checked: AtomicU64::new(0),
            session_keys_skipped: AtomicU64::new(0),
            requests_overloaded: AtomicU64::new(0),
            requests_over_quota: AtomicU64::new(0),
            bytes_ingested: AtomicU64::new(0),
            ack_latency: Histogram::latency(),
            query_latency: Histogram::latency(),
            metrics_cache_hits: AtomicU64::new(0),
            metrics_cache_misses: AtomicU64::new(0),
            sql_latency: Histogram::latency(),
            alert_latency: Histogram::latency(),
            log_syncs: AtomicU64::new(0),
            log_errors: AtomicU64::new(0),
            last_applied_append_ms: AtomicI64::new(0),
            last_applied_at_ms: AtomicI64::new(0),
            processing_lag_ms: AtomicI64::new(0),
            inflight_bytes: AtomicI64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_errors: AtomicU64::new(0),
            checkpoint_duration: Histogram::latency(),
            checkpoint_bytes: AtomicU64::new(0),
            last_checkpoint_ms: AtomicI64::new(0),
            recovery_ms: AtomicU64::new(0),
            recovery_records: AtomicU64::new(0),
            log_corrupt_records: AtomicU64::new(0),
            log_segments_deleted: AtomicU64::new(0),
            log_bytes_deleted: AtomicU64::new(0),
            rollup_minutes_downsampled: AtomicU64::new(0),
            rollup_buckets_deleted: AtomicU64::new(0),
            rollup_minutes_from_ms: AtomicI64::new(i64::MIN),
            rollup_hours_from_ms: AtomicI64::new(i64::MIN),
        }
    }
}

/// Values owned elsewhere that `/metrics` reports too.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub now_ms: i64,
    pub watermark_ms: Option<i64>,
    pub dlq_late_full_tenants: usize,
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub corrections: u64,
    pub replayed: u64,
    pub dlq_malformed_total: u64,
    pub dlq_late_total: u64,
    pub dlq_malformed_held: usize,
    pub dlq_late_held: usize,
    pub rollup_buckets: usize,
    /// What the cardinality guards folded into `__other__` or left out.
    pub folds: tally_store::dims::Folds,
    pub dedupe_entries: usize,
    /// Session changes listed by /api/v1/changes, ever.
    pub session_changes: u64,
    pub log_bytes: u64,
    pub ready: bool,
    /// One past the last lsn made durable / applied by the processor.
    pub committed_lsn: u64,
    pub applied_lsn: u64,
}

impl Snapshot {
    /// Log records committed but not yet applied by the processor.
    pub fn behind_records(&self) -> u64 {
        self.committed_lsn.saturating_sub(self.applied_lsn)
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

impl Telemetry {
    /// Age of the newest data visible in rollups at wall time `now` (None
    /// before the processor applied anything).
    pub fn freshness_ms(&self, now: i64) -> Option<i64> {
        (self.last_applied_at_ms.load(Relaxed) > 0)
            .then(|| now - self.last_applied_append_ms.load(Relaxed))
    }

    pub fn render(&self, s: &Snapshot) -> String {
        let mut o = String::with_capacity(4096);
        counter(
            &mut o,
            "tally_ingest_requests_total",
            "Ingest requests received.",
            self.requests.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_events_accepted_total",
            "Events accepted and durable.",
            self.events_accepted.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_events_rejected_total",
            "Events rejected as malformed (sent to the malformed DLQ).",
            self.events_rejected.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_events_late_total",
            "Events too late for their window (sent to the late DLQ).",
            s.late,
        );
        counter(
            &mut o,
            "tally_events_duplicate_total",
            "Events dropped as duplicates of an event_id.",
            s.duplicates,
        );
        counter(
            &mut o,
            "tally_events_counted_total",
            "Events applied to rollups.",
            s.counted,
        );
        counter(
            &mut o,
            "tally_events_corrections_total",
            "Events that updated an already closed window within allowed lateness.",
            s.corrections,
        );
        counter(
            &mut o,
            "tally_events_dropped_total",
            "Events refused with their whole request (overload); the client must retry.",
            self.events_dropped_overload.load(Relaxed),
        );
        for (name, help, v) in [
            (
                "tally_session_touches_total",
                "Events applied behind their tenant's watermark, looked at for session corrections.",
                &self.session_touches,
            ),
            (
                "tally_session_touches_dropped_total",
                "Such events dropped unlooked at: more than 100,000 were waiting.",
                &self.session_touches_dropped,
            ),
            (
                "tally_session_keys_checked_total",
                "Sessions (by id, or a user's) read again from the raw events for corrections.",
                &self.session_keys_checked,
            ),
            (
                "tally_session_keys_skipped_total",
                "Sessions not read again for corrections: more were waiting than the task's bound.",
                &self.session_keys_skipped,
            ),
        ] {
            counter(&mut o, name, help, v.load(Relaxed));
        }
        counter(
            &mut o,
            "tally_session_changes_total",
            "Session changes listed by /api/v1/changes.",
            s.session_changes,
        );
        counter(
            &mut o,
            "tally_events_shed_total",
            "Low-priority events refused with 429 under overload (shedding.low-priority).",
            self.events_shed.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_events_refused_late_dlq_full_total",
            "Possibly late events refused with 429 while their tenant's late DLQ was full.",
            self.events_refused_late_full.load(Relaxed),
        );
        gauge(
            &mut o,
            "tally_dlq_late_full_tenants",
            "Tenants whose late DLQ holds dlq.capacity unreplayed events (their possibly late events are refused).",
            s.dlq_late_full_tenants as f64,
        );
        counter(
            &mut o,
            "tally_ingest_overloaded_total",
            "Requests answered 503 because of backpressure.",
            self.requests_overloaded.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_ingest_over_quota_total",
            "Requests answered 429 because a tenant was over its ingest quota.",
            self.requests_over_quota.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_ingest_bytes_total",
            "Request body bytes received.",
            self.bytes_ingested.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_log_syncs_total",
            "Group commits (fsync rounds) of the log.",
            self.log_syncs.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_log_errors_total",
            "Log write or fsync failures (the requests of that commit got 503, nothing of them kept).",
            self.log_errors.load(Relaxed),
        );
        self.ack_latency.render(
            &mut o,
            "tally_ingest_ack_latency_seconds",
            "Time from request received to acknowledgement (durable).",
        );
        self.query_latency.render(
            &mut o,
            "tally_query_latency_seconds",
            "Metrics API query latency.",
        );
        self.sql_latency.render(
            &mut o,
            "tally_sql_latency_seconds",
            "SQL query latency (POST /api/v1/query), errors included.",
        );
        self.alert_latency.render(
            &mut o,
            "tally_alert_latency_seconds",
            "Alert latency: bucket closed (watermark passed it) to webhook answered 2xx.",
        );
        let lag = self.processing_lag_ms.load(Relaxed);
        gauge(
            &mut o,
            "tally_processing_lag_seconds",
            "Time from log append to rollup update, last record.",
            lag as f64 / 1e3,
        );
        if let Some(w) = s.watermark_ms {
            gauge(
                &mut o,
                "tally_watermark_timestamp_seconds",
                "Event-time watermark.",
                w as f64 / 1e3,
            );
            gauge(
                &mut o,
                "tally_watermark_lag_seconds",
                "Wall clock minus watermark.",
                (s.now_ms - w) as f64 / 1e3,
            );
        }
        if let Some(f) = self.freshness_ms(s.now_ms) {
            gauge(
                &mut o,
                "tally_freshness_seconds",
                "Age of the newest data visible in rollups (wall clock minus its append time).",
                f as f64 / 1e3,
            );
        }
        let _ = writeln!(
            o,
            "# HELP tally_dlq_entries_total Entries ever written to a dead-letter queue.\n# TYPE tally_dlq_entries_total counter"
        );
        let _ = writeln!(
            o,
            "tally_dlq_entries_total{{kind=\"malformed\"}} {}",
            s.dlq_malformed_total
        );
        let _ = writeln!(
            o,
            "tally_dlq_entries_total{{kind=\"late\"}} {}",
            s.dlq_late_total
        );
        let _ = writeln!(
            o,
            "# HELP tally_dlq_size Entries held in a dead-letter queue.\n# TYPE tally_dlq_size gauge"
        );
        let _ = writeln!(
            o,
            "tally_dlq_size{{kind=\"malformed\"}} {}",
            s.dlq_malformed_held
        );
        let _ = writeln!(o, "tally_dlq_size{{kind=\"late\"}} {}", s.dlq_late_held);
        gauge(
            &mut o,
            "tally_rollup_buckets",
            "Tenant-minute rollup buckets held in memory.",
            s.rollup_buckets as f64,
        );
        counter(
            &mut o,
            "tally_dimension_values_folded_total",
            "Dimension values counted under __other__ because their tenant-minute already held dimensions.max-values distinct values of that dimension, or they were longer than dimensions.max-value-bytes.",
            s.folds.values,
        );
        counter(
            &mut o,
            "tally_dimension_combinations_folded_total",
            "Events of a new combination of dimension values counted under the combination with every value __other__, because their tenant-minute already held dimensions.max-combinations combinations.",
            s.folds.combinations,
        );
        counter(
            &mut o,
            "tally_event_types_folded_total",
            "Events of a new event type counted in the rollups under the event type __other__, because their tenant-minute already held dimensions.max-event-types event types (the raw events keep their type).",
            s.folds.event_types,
        );
        counter(
            &mut o,
            "tally_properties_dropped_total",
            "Numeric property values not aggregated because their (tenant, minute, event type) aggregate already held 128 other numeric properties (the raw events keep them).",
            s.folds.properties,
        );
        gauge(
            &mut o,
            "tally_dedupe_entries",
            "Event ids remembered for dedupe.",
            s.dedupe_entries as f64,
        );
        gauge(
            &mut o,
            "tally_log_bytes",
            "Bytes in the embedded log.",
            s.log_bytes as f64,
        );
        gauge(
            &mut o,
            "tally_ingest_inflight_bytes",
            "Accepted bytes waiting to become durable.",
            self.inflight_bytes.load(Relaxed) as f64,
        );
        counter(
            &mut o,
            "tally_events_replayed_total",
            "Late events applied from the DLQ as corrections.",
            s.replayed,
        );
        counter(
            &mut o,
            "tally_log_corrupt_records_total",
            "Corrupt log records found by checksum on replay (skipped, reported).",
            self.log_corrupt_records.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_metrics_cache_hits_total",
            "Metrics API answers served from the cache (nothing under them changed).",
            self.metrics_cache_hits.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_metrics_cache_misses_total",
            "Metrics API answers computed (not cached, or data under them changed).",
            self.metrics_cache_misses.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_log_segments_deleted_total",
            "Log segments deleted by retention (log.retention, log.retention-bytes).",
            self.log_segments_deleted.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_log_bytes_deleted_total",
            "Log bytes deleted by retention.",
            self.log_bytes_deleted.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_rollup_minutes_downsampled_total",
            "Minute rollup buckets folded into hour buckets (retention.minute-rollups).",
            self.rollup_minutes_downsampled.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_rollup_buckets_deleted_total",
            "Rollup buckets deleted by retention (retention.hour-rollups).",
            self.rollup_buckets_deleted.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_checkpoints_total",
            "Checkpoints written.",
            self.checkpoints.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_checkpoint_errors_total",
            "Checkpoint attempts that failed (retried at the next interval).",
            self.checkpoint_errors.load(Relaxed),
        );
        counter(
            &mut o,
            "tally_checkpoint_bytes_total",
            "Bytes written by checkpoints (state journals and checkpoint files).",
            self.checkpoint_bytes.load(Relaxed),
        );
        self.checkpoint_duration.render(
            &mut o,
            "tally_checkpoint_duration_seconds",
            "Time to write one checkpoint.",
        );
        let last = self.last_checkpoint_ms.load(Relaxed);
        if last > 0 {
            gauge(
                &mut o,
                "tally_checkpoint_age_seconds",
                "Time since the last checkpoint.",
                (s.now_ms - last).max(0) as f64 / 1000.0,
            );
        }
        gauge(
            &mut o,
            "tally_recovery_seconds",
            "Time the last start spent loading the checkpoint and replaying the log.",
            self.recovery_ms.load(Relaxed) as f64 / 1000.0,
        );
        gauge(
            &mut o,
            "tally_recovery_records",
            "Log records replayed at the last start.",
            self.recovery_records.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "tally_ready",
            "1 when the server accepts events.",
            if s.ready { 1.0 } else { 0.0 },
        );
        o
    }
}

/// The raw store's series.
pub fn render_raw(o: &mut String, raw: &tally_archive::RawShared) {
    let st = &raw.stats;
    let (hot_rows, hot_bytes) = {
        let h = raw.hot.read();
        (h.rows, h.bytes)
    };
    let (files, archive_bytes, archive_rows) = {
        let f = raw.files.read();
        (
            f.len(),
            f.iter().map(|x| x.bytes).sum::<u64>(),
            f.iter().map(|x| x.rows).sum::<u64>(),
        )
    };
    gauge(
        o,
        "tally_raw_hot_rows",
        "Raw events in memory, not yet sealed into Parquet.",
        hot_rows as f64,
    );
    gauge(
        o,
        "tally_raw_hot_bytes",
        "Memory held by hot raw events.",
        hot_bytes as f64,
    );
    gauge(
        o,
        "tally_archive_files",
        "Live Parquet files in the archive.",
        files as f64,
    );
    gauge(
        o,
        "tally_archive_bytes",
        "Bytes of live Parquet files in the archive.",
        archive_bytes as f64,
    );
    gauge(
        o,
        "tally_archive_rows",
        "Rows in live Parquet files in the archive.",
        archive_rows as f64,
    );
    counter(
        o,
        "tally_raw_rows_appended_total",
        "Raw events appended to the hot store.",
        st.rows_appended.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_rows_sealed_total",
        "Raw events sealed into Parquet.",
        st.rows_sealed.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_files_written_total",
        "Parquet files written by seals.",
        st.files_written.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_bytes_written_total",
        "Parquet bytes written by seals.",
        st.bytes_written.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_seals_total",
        "Seals of hot raw events.",
        st.seals.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_seal_errors_total",
        "Failed seals (the rows stay hot and the seal is retried).",
        st.seal_errors.load(Relaxed),
    );
    gauge(
        o,
        "tally_archive_seal_seconds_total",
        "Time spent sealing.",
        st.seal_us_total.load(Relaxed) as f64 / 1e6,
    );
    counter(
        o,
        "tally_archive_files_compacted_total",
        "Small archive files merged into larger ones by compaction.",
        st.files_compacted.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_files_deleted_total",
        "Archive files deleted by retention.",
        st.files_deleted.load(Relaxed),
    );
    counter(
        o,
        "tally_archive_rows_deleted_total",
        "Archive rows deleted by retention.",
        st.rows_deleted.load(Relaxed),
    );
}

/// The session index: sessions held and dropped for its cap, and where
/// session answers came from (`answers`: from the index, from the raw
/// events; none without a query engine).
pub fn render_sessions(
    o: &mut String,
    index: &tally_store::SessionIndex,
    answers: Option<(u64, u64)>,
) {
    gauge(
        o,
        "tally_sessions_indexed",
        "Sessions held by the index built in the stream.",
        index.len() as f64,
    );
    counter(
        o,
        "tally_sessions_evicted_total",
        "Sessions dropped from the index for sessions.max-sessions (older ranges are read from the raw events).",
        index.evicted(),
    );
    if let Some((from_index, from_raw)) = answers {
        let _ = writeln!(
            o,
            "# HELP tally_session_answers_total Session answers (API, SQL table, metrics) by where they were computed.\n\
             # TYPE tally_session_answers_total counter\n\
             tally_session_answers_total{{source=\"index\"}} {from_index}\n\
             tally_session_answers_total{{source=\"raw\"}} {from_raw}"
        );
    }
}

/// The alert engine's series.
pub fn render_alerts(o: &mut String, e: &tally_alert::Engine) {
    let st = &e.stats;
    gauge(
        o,
        "tally_alert_rules",
        "Alert rules defined.",
        e.rules(None).count() as f64,
    );
    gauge(
        o,
        "tally_alert_firing",
        "Alert rules firing now.",
        e.firing() as f64,
    );
    gauge(
        o,
        "tally_alert_outbox",
        "Notifications waiting for delivery (or a retry).",
        e.outbox_len() as f64,
    );
    counter(
        o,
        "tally_alert_evaluations_total",
        "Closed buckets evaluated by alert rules.",
        st.evaluations,
    );
    counter(
        o,
        "tally_alert_notifications_total",
        "Firing and resolved notifications queued (one per rule and change).",
        st.notifications,
    );
    let _ = writeln!(
        o,
        "# HELP tally_alert_deliveries_total Webhook calls by outcome: delivered, failed (an attempt; it is retried), gave_up (after alerts.max-attempts), dropped (outbox full).\n# TYPE tally_alert_deliveries_total counter"
    );
    for (k, v) in [
        ("delivered", st.delivered),
        ("failed", st.delivery_failures),
        ("gave_up", st.gave_up),
        ("dropped", st.dropped),
    ] {
        let _ = writeln!(o, "tally_alert_deliveries_total{{result=\"{k}\"}} {v}");
    }
    counter(
        o,
        "tally_alert_persist_errors_total",
        "Failed writes of the alert state file.",
        st.persist_errors,
    );
}

/// Kafka mode: this node's consumer lag per owned partition, rebalances,
/// transactions, and the ingest producer's counters.
pub fn render_kafka(out: &mut String, k: &crate::pipeline::KafkaShared) {
    let parts = k.worker.parts.lock().clone();
    // Every partition: owned ones from the worker, the others from their
    // owner's committed state and the partition's end.
    let mut lag = k.lag.lock().clone();
    for (p, s) in &parts {
        lag.insert(*p, (s.lag_records, s.lag_seconds));
    }
    // Under the names the API promises (`consumer_lag_*`, what alert rules
    // watch) and under the tally_ prefix of every other series.
    for prefix in ["", "tally_"] {
        let _ = writeln!(
            out,
            "# HELP {prefix}consumer_lag_records Records of a partition of the events topic not processed yet (this node's own partitions as its worker sees them, the others since their owner's last commit).\n# TYPE {prefix}consumer_lag_records gauge"
        );
        for (p, (records, _)) in &lag {
            let _ = writeln!(
                out,
                "{prefix}consumer_lag_records{{partition=\"{p}\"}} {records}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP {prefix}consumer_lag_seconds How far a partition is behind in time while it is behind (0 when caught up).\n# TYPE {prefix}consumer_lag_seconds gauge"
        );
        for (p, (_, seconds)) in &lag {
            let _ = writeln!(
                out,
                "{prefix}consumer_lag_seconds{{partition=\"{p}\"}} {seconds}"
            );
        }
    }
    let w = &k.worker;
    gauge(
        out,
        "tally_kafka_partitions_owned",
        "Partitions of the events topic this node processes.",
        parts.len() as f64,
    );
    counter(
        out,
        "tally_kafka_rebalances_total",
        "Consumer group rebalances this node went through.",
        w.rebalances.load(Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP tally_kafka_transactions_total Kafka transactions (aggregates + offsets) by outcome.\n# TYPE tally_kafka_transactions_total counter\ntally_kafka_transactions_total{{result=\"commit\"}} {}\ntally_kafka_transactions_total{{result=\"abort\"}} {}",
        w.commits.load(Relaxed),
        w.aborts.load(Relaxed)
    );
    let p = &k.produce;
    let (applied, unreadable) = k.view.counters();
    for (name, help, v) in [
        (
            "tally_kafka_sessions_total",
            "Consumer sessions started (one more after every failure).",
            w.sessions.load(Relaxed),
        ),
        (
            "tally_kafka_messages_total",
            "Messages of the events topic handled.",
            w.messages.load(Relaxed),
        ),
        (
            "tally_kafka_worker_events_total",
            "Events this node's partition workers applied (counted, duplicate or late; restores not included).",
            w.counted.load(Relaxed) + w.duplicates.load(Relaxed) + w.late.load(Relaxed),
        ),
        (
            "tally_kafka_malformed_total",
            "Events or messages of the events topic that failed validation.",
            w.malformed.load(Relaxed),
        ),
        (
            "tally_kafka_aggregates_produced_total",
            "Aggregate records produced to the aggregates topic.",
            w.aggregates_produced.load(Relaxed),
        ),
        (
            "tally_kafka_raw_files_total",
            "Archive files written by seals of this node's partitions' raw events.",
            w.raw_files.load(Relaxed),
        ),
        (
            "tally_kafka_files_compacted_total",
            "Archive files of this node's partitions merged away by compaction.",
            w.files_compacted.load(Relaxed),
        ),
        (
            "tally_kafka_files_expired_total",
            "Archive files of this node's partitions removed by archive.retention.",
            w.files_expired.load(Relaxed),
        ),
        (
            "tally_kafka_files_swept_total",
            "Archive files no transaction listed (left by an interrupted seal or merge) deleted by this node.",
            w.files_swept.load(Relaxed),
        ),
        (
            "tally_kafka_aggregate_parts_total",
            "Aggregate records written as further parts of a value too large for one record (a minute with very many dimension combinations or users).",
            w.aggregate_parts.load(Relaxed),
        ),
        (
            "tally_kafka_restored_events_total",
            "Events re-read to rebuild dedupe entries of partitions taken over.",
            w.restored_events.load(Relaxed),
        ),
        (
            "tally_kafka_produced_total",
            "Ingested events the broker acknowledged.",
            p.produced.load(Relaxed),
        ),
        (
            "tally_kafka_produce_errors_total",
            "Ingested events the broker did not acknowledge (answered 503).",
            p.errors.load(Relaxed),
        ),
        (
            "tally_kafka_produce_retries_total",
            "Sends retried because the local producer queue was full.",
            p.retries.load(Relaxed),
        ),
        (
            "tally_kafka_view_records_total",
            "Aggregates-topic records applied to this node's store.",
            applied,
        ),
        (
            "tally_kafka_view_unreadable_total",
            "Aggregates-topic records skipped as unreadable.",
            unreadable,
        ),
    ] {
        counter(out, name, help, v);
    }
    // Where freshness goes: reaching the worker, its transaction, and the
    // view's read of what committed.
    w.consume_delay.render(
        out,
        "tally_kafka_consume_delay_seconds",
        "From an events-topic message's timestamp to its handling by this node's worker.",
    );
    w.commit_latency.render(
        out,
        "tally_kafka_commit_seconds",
        "From the start of a transaction (aggregates, late events, offsets) to its commit.",
    );
    k.view.visible_delay.render(
        out,
        "tally_kafka_view_delay_seconds",
        "From a partition's transaction commit starting (its writer's clock) to this node's view applying it.",
    );
}
