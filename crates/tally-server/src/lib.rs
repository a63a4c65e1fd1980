//! The Tally server: the HTTP API over a node that `tally-runtime` runs
//! (configuration, pipeline threads, telemetry), which it starts and
//! stops. Nothing here counts or stores events; every handler reads or
//! feeds the runtime's shared state.

pub mod auth;
pub mod http;
mod http_alerts;
mod live;
mod openapi;
mod posthog;
pub mod quota;
mod registry;
mod segment;
mod series_json;
mod serve;
mod session_changes;

pub use tally_runtime::{config, pipeline, telemetry};

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::Config;
use pipeline::{Pipeline, PipelineError, Shared};
use tally_types::Clock;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(
        "cannot listen on {addr}: {source} (is another server running there? pick another with --listen)"
    )]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
    #[error(
        "refusing to serve open mode (no API keys) on {0}, which is not a loopback address: anyone who reaches it could read and change every tenant's data; configure [auth] keys, listen on 127.0.0.1, or pass --insecure-open (auth.insecure-open = true)"
    )]
    InsecureOpen(SocketAddr),
    #[error(transparent)]
    Tls(#[from] serve::TlsError),
    #[error(
        "pgwire.listen = {0:?}: SQL over the Postgres protocol needs the raw event store, which this node does not run; remove [pgwire] here and connect to a node that has it"
    )]
    PgwireWithoutQuery(String),
}

/// A started server: its address and a handle to stop it.
pub struct Server {
    pub addr: SocketAddr,
    /// The Postgres wire protocol's address, when `[pgwire] listen` is set.
    pub pg_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Server {
    /// Recovers state from the data dir, binds `cfg.listen` and serves until stopped.
    pub async fn start(cfg: Config, clock: Clock) -> Result<Server, ServerError> {
        let keys = auth::Keys::from_config(&cfg.auth).map_err(PipelineError::from)?;
        let tls = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(cert), Some(key)) => Some(serve::tls_acceptor(cert, key)?),
            _ => None,
        };
        let privacy = cfg
            .privacy
            .build(&cfg.data_dir)
            .map_err(PipelineError::from)?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: cfg.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(ServerError::Serve)?;
        // Open mode answers anyone who reaches a listener: loopback only,
        // unless the operator says otherwise.
        let exposed =
            |a: SocketAddr| !keys.keyed() && !a.ip().is_loopback() && !cfg.auth.insecure_open;
        if exposed(addr) {
            return Err(ServerError::InsecureOpen(addr));
        }
        let pg_listener = match cfg.pgwire.address() {
            Some(a) => {
                let l =
                    tokio::net::TcpListener::bind(a)
                        .await
                        .map_err(|source| ServerError::Bind {
                            addr: format!("{a} (pgwire.listen)"),
                            source,
                        })?;
                let pa = l.local_addr().map_err(ServerError::Serve)?;
                if exposed(pa) {
                    return Err(ServerError::InsecureOpen(pa));
                }
                Some(l)
            }
            None => None,
        };
        let d = cfg.durations().map_err(PipelineError::from)?;
        let cfg2 = cfg.clone();
        let pipeline = tokio::task::spawn_blocking(move || Pipeline::start(&cfg2, clock))
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))??;
        let shared = pipeline.shared.clone();
        if keys.keyed() {
            tracing::info!(
                keys = cfg.auth.keys.len(),
                "keyed mode: every API request needs an API key"
            );
        }
        http::hide_dir(&cfg.data_dir);
        let schemas = Arc::new(cfg.schemas.clone());
        let state = http::AppState {
            keys: Arc::new(keys),
            schemas: schemas.clone(),
            privacy,
            quotas: Arc::new(quota::Quotas::new(cfg.quotas.clone(), shared.clock.clone())),
            shared: shared.clone(),
            tx: pipeline.tx.clone(),
            partitions: cfg.log.partitions,
            max_body: cfg.ingest.max_body_bytes,
            max_inflight: cfg.ingest.max_inflight_bytes,
            low_priority: Arc::new(cfg.shedding.low_priority.clone()),
            max_json_depth: cfg.ingest.max_json_depth,
            max_event_bytes: shared
                .kafka
                .is_some()
                .then_some(tally_kafka::MAX_EVENT_BYTES),
            data_dir: cfg.data_dir.clone(),
            queue_depth: cfg.ingest.queue_depth,
            metrics_cache: Arc::new(parking_lot::Mutex::new(tally_store::MetricsCache::new(
                cfg.query.metrics_cache_entries,
            ))),
            query: shared.raw.as_ref().map(|raw| {
                let sh = shared.clone();
                let r = raw.clone();
                let version: tally_query::VersionFn = Arc::new(move || {
                    // All only grow: their sum changes whenever one does (a
                    // registration changes the typed columns).
                    sh.applied.load(std::sync::atomic::Ordering::Relaxed)
                        + r.version.load(std::sync::atomic::Ordering::Relaxed)
                        + sh.registry.generation()
                });
                Arc::new(tally_query::QueryEngine::new(
                    raw.clone(),
                    shared.store.clone(),
                    tally_query::QueryConfig {
                        timeout_ms: d.query_timeout_ms as u64,
                        memory_limit: cfg.query.memory_limit.max(16 << 20),
                        max_rows: cfg.query.max_rows.max(1),
                        cache_entries: cfg.query.cache_entries,
                        schemas: schemas.clone(),
                        columns: Some({
                            let r = shared.registry.clone();
                            tally_query::ColumnsFn(Arc::new(move |t: &str| r.property_columns(t)))
                        }),
                        session_gap_ms: d.session_gap_ms,
                        ..tally_query::QueryConfig::default()
                    },
                    version,
                ))
            }),
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut pg_addr = None;
        if let Some(l) = pg_listener {
            let Some(engine) = state.query.clone() else {
                return Err(ServerError::PgwireWithoutQuery(
                    cfg.pgwire.listen.clone().unwrap_or_default(),
                ));
            };
            pg_addr = l.local_addr().ok();
            tracing::info!(addr = ?pg_addr, "SQL over the Postgres wire protocol");
            let pg =
                tally_pgwire::PgServer::new(engine, state.keys.clone(), cfg.pgwire.max_connections);
            tokio::spawn(pg.serve(l, stopped.clone()));
        }
        // Session corrections are worked out from the raw events (in Kafka
        // mode the touched events are applied on the partitions' owners,
        // not here: not listed there yet).
        if let Some(engine) = state.query.clone()
            && shared.kafka.is_none()
        {
            tokio::spawn(session_changes::run(
                shared.clone(),
                engine,
                stopped.clone(),
            ));
        }
        let app = http::router(state);
        let tel = shared.telemetry.clone();
        tokio::spawn(tally_alert::deliver::run(
            shared.alerts.clone(),
            shared.clock.clone(),
            tally_alert::DeliveryConfig {
                timeout: std::time::Duration::from_millis(d.webhook_timeout_ms as u64),
                targets: Arc::new(cfg.target_policy().map_err(PipelineError::from)?),
                smtp: cfg.smtp.settings(),
                ..tally_alert::DeliveryConfig::default()
            },
            shared.alert_wake.clone(),
            stopped.clone(),
            Arc::new(move |d: std::time::Duration| {
                tel.alert_latency.observe_us(d.as_micros() as u64)
            }),
        ));
        let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            std::time::Duration::from_millis(d.http_body_timeout_ms as u64),
        ));
        let limits = serve::Limits {
            max_connections: cfg.http.max_connections.max(1),
            header_timeout: std::time::Duration::from_millis(d.http_header_timeout_ms as u64),
            write_timeout: std::time::Duration::from_millis(d.http_write_timeout_ms as u64),
        };
        let drain = std::time::Duration::from_millis(d.query_timeout_ms.max(1000) as u64 * 2);
        let task = tokio::spawn(async move {
            let r = serve::serve(listener, app, limits, tls, stopped, drain).await;
            // In-flight requests are finished; now drain the writer and processor.
            tokio::task::spawn_blocking(move || pipeline.shutdown())
                .await
                .ok();
            r.map_err(ServerError::Serve)
        });
        Ok(Server {
            addr,
            pg_addr,
            shared,
            stop,
            task,
        })
    }

    /// Stops accepting connections, finishes in-flight requests, flushes the log.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shared
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?
    }

    /// Serves until the task ends on its own (it does not unless stopped).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?
    }

    pub fn stop_handle(&self) -> tokio::sync::watch::Sender<bool> {
        self.stop.clone()
    }
}
