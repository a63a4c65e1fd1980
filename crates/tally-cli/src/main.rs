//! `tally`: the one binary. `serve` runs the server, `demo` runs it with sample
//! traffic, `gen` generates events, `bench` measures a server under load.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tally_cli::generator::{GenConfig, Generator};
use tally_cli::load::{LoadStats, client, post_batch};
use tally_server::{Config, Server};
use tally_types::Clock;
use tally_types::time::parse_time_param;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Real-time analytics in one binary: ingest, event-time rollups, metrics API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// Run a server on embedded defaults with sample traffic, and print URLs to try.
    Demo(DemoArgs),
    /// Generate realistic events to a file or straight to a server.
    Gen(GenArgs),
    /// Drive a server for a fixed time and report throughput, latency, freshness and memory.
    Bench(BenchArgs),
    /// Reprocess the log into a fresh state (after changing stream settings,
    /// or to rebuild a damaged state dir). Run it while the server is stopped.
    Replay(ReplayArgs),
    /// API keys for keyed mode.
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a new random key and print it with the [auth] entry to add to
    /// the config (its SHA-256 only, so the file never holds the secret).
    New(NewKeyArgs),
}

#[derive(Args)]
struct NewKeyArgs {
    /// Tenant the key belongs to.
    #[arg(long)]
    tenant: String,
    /// Comma-separated scopes: ingest, read, admin.
    #[arg(long, default_value = "ingest,read")]
    scopes: String,
    /// A name shown in logs instead of the key.
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args)]
struct ReplayArgs {
    /// Directory of the log and state [default: ./tally-data].
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (stream settings to replay under).
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Where to start: a log sequence number (e.g. 0, the whole log) or a time
    /// (RFC 3339, e.g. 2026-11-01T12:00:00Z: records appended from then on).
    #[arg(long, default_value = "0")]
    from: String,
    /// Compare the rebuilt state with the current one and report differences.
    #[arg(long)]
    verify: bool,
    /// Build and report, but keep the current state.
    #[arg(long)]
    dry_run: bool,
    /// Use a state rebuilt from a later point than 0 without asking (it
    /// holds only what was appended from then on).
    #[arg(long)]
    yes: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long, env = "TALLY_LISTEN")]
    listen: Option<String>,
    /// Directory for the log and state [default: ./tally-data].
    #[arg(long, env = "TALLY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (see tally.example.toml).
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Serve open mode (no API keys) on a non-loopback address anyway:
    /// anyone who reaches it can read and change every tenant's data.
    #[arg(long)]
    insecure_open: bool,
}

#[derive(Args)]
struct DemoArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    #[arg(long, default_value = "tally-demo-data")]
    data_dir: PathBuf,
    /// Sample events per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// History sent first (as a backfill, two tenants), so every chart,
    /// the explorer and the archive have something to show at once ("0":
    /// none).
    #[arg(long, default_value = "1h")]
    history: String,
}

#[derive(Args, Clone)]
struct GenArgs {
    /// Number of events (lines) to generate.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write NDJSON to this file ("-" for stdout).
    #[arg(long, conflicts_with = "url")]
    out: Option<PathBuf>,
    /// Send to this server (base URL, e.g. http://127.0.0.1:7070).
    #[arg(long, conflicts_with = "kafka")]
    url: Option<String>,
    /// Produce straight to a Kafka topic instead (bootstrap servers,
    /// e.g. 127.0.0.1:9092): what any other producer of events would do.
    #[arg(long)]
    kafka: Option<String>,
    /// The topic for --kafka.
    #[arg(long, default_value = "user_events", requires = "kafka")]
    topic: String,
    /// With --kafka: several events per message (NDJSON, grouped by the
    /// partition each event's key goes to), as Tally's own HTTP ingest
    /// produces them; without it, one event per message.
    #[arg(long, requires = "kafka")]
    grouped: bool,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Event time of the first event (RFC 3339 or epoch ms); default: follow the wall clock.
    #[arg(long)]
    start: Option<String>,
    /// Events per second of event time (with --start).
    #[arg(long, default_value_t = 100.0)]
    events_per_sec: f64,
    #[arg(long, default_value_t = 1)]
    tenants: u32,
    #[arg(long, default_value_t = 1000)]
    users: u32,
    #[arg(long, default_value_t = 0.05)]
    disorder: f64,
    #[arg(long, default_value_t = 0.01)]
    late: f64,
    #[arg(long, default_value_t = 0.02)]
    duplicate: f64,
    #[arg(long, default_value_t = 0.01)]
    malformed: f64,
    /// API key for a server in keyed mode (needs the ingest scope).
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// Seconds of sustained load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Events per request.
    #[arg(long, default_value_t = 2000)]
    batch: usize,
    /// Cap on the offered load in events/s (0 = as fast as the server goes).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Benchmark a running server instead of starting one.
    #[arg(long)]
    target: Option<String>,
    /// Start the server in Kafka mode on these brokers (its own consumer
    /// group and topics): every event goes HTTP → Kafka → the node's
    /// partition workers → the aggregates topic → the metrics API, and
    /// freshness is measured end to end through Kafka.
    #[arg(long, value_name = "BROKERS", conflicts_with = "target")]
    kafka: Option<String>,
    /// Config file for the started server.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log filter of the started server (`RUST_LOG` syntax, e.g.
    /// `info,tally_kafka=debug`); its log goes to this command's stderr.
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// Alert notifications to time after the load (0 skips the alert phase).
    #[arg(long, default_value_t = 40)]
    alert_samples: u32,
    /// API key for a --target in keyed mode (ingest and read; admin for
    /// the alert phase).
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Demo(a) => demo(a).await,
            Cmd::Gen(a) => {
                if let Some(k) = a.api_key.clone() {
                    tally_cli::load::set_api_key(k);
                }
                gen_cmd(a).await
            }
            Cmd::Bench(a) => {
                if let Some(k) = a.api_key.clone() {
                    tally_cli::load::set_api_key(k);
                }
                bench(a).await
            }
            Cmd::Replay(a) => replay(a).await,
            Cmd::Keys(KeysCmd::New(a)) => new_key(a),
        }
    })
}

/// `tally keys new`: a random key and its config entry.
fn new_key(a: NewKeyArgs) -> Result<()> {
    use rand::RngCore;
    let scopes: Vec<String> = a
        .scopes
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("tally_{}", tally_server::auth::to_hex(&bytes));
    let entry = tally_server::config::KeySection {
        key_sha256: tally_server::auth::to_hex(&tally_server::auth::digest(&secret)),
        tenant: a.tenant.clone(),
        scopes: scopes.clone(),
        name: a.name.clone().unwrap_or_default(),
        ..Default::default()
    };
    // The same checks the server makes on start.
    tally_server::auth::Keys::from_config(&tally_server::config::AuthSection {
        keys: vec![entry.clone()],
        ..Default::default()
    })
    .context("--tenant / --scopes")?;
    let scopes_toml: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    let name = a
        .name
        .map(|n| format!(", name = {n:?}"))
        .unwrap_or_default();
    println!("key (give it to the client; it is not stored anywhere):\n  {secret}\n");
    println!("add to the [auth] section of the config:\n");
    println!("[auth]");
    println!(
        "keys = [\n  {{ key-sha256 = \"{}\", tenant = {:?}, scopes = [{}]{name} }},\n]",
        entry.key_sha256,
        a.tenant,
        scopes_toml.join(", ")
    );
    println!("\nclients send it as: Authorization: Bearer {secret}");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A write past the file-size limit (RLIMIT_FSIZE) raises SIGXFSZ, which
/// kills the process by default. Handle it, so the write fails with EFBIG
/// and ingest answers 503 like for any other storage error.
fn ignore_sigxfsz() {
    #[cfg(unix)]
    if let Ok(mut s) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
    {
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                tracing::warn!(
                    "file size limit reached (SIGXFSZ); the write fails and is answered 503"
                );
            }
        });
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    ignore_sigxfsz();
    let mut cfg = Config::load(a.config.as_deref()).context("loading configuration")?;
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    cfg.auth.insecure_open |= a.insecure_open;
    let server = Server::start(cfg.clone(), Clock::system())
        .await
        .with_context(|| {
            format!(
                "starting server on {} with data dir {}",
                cfg.listen,
                cfg.data_dir.display()
            )
        })?;
    let scheme = if cfg.tls.cert.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(url = %format!("{scheme}://{}", server.addr), data_dir = %cfg.data_dir.display(), "tally is serving");
    let stop = server.stop_handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests and flushing");
        let _ = stop.send(true);
    });
    server
        .wait()
        .await
        .context("server stopped with an error")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn demo(a: DemoArgs) -> Result<()> {
    let cfg = Config {
        listen: a.listen.clone(),
        data_dir: a.data_dir.clone(),
        ..Config::default()
    };
    let server = Server::start(cfg, Clock::system())
        .await
        .context("starting the demo server")?;
    let base = format!("http://{}", server.addr);
    println!(
        "Tally demo is running at {base} (data in {})",
        a.data_dir.display()
    );
    println!("  dashboard:  {base}/");
    println!("  metrics:    {base}/api/v1/metrics?metric=count&granularity=1m&group_by=event_type");
    println!("  p95:        {base}/api/v1/metrics?metric=p95:duration_ms&granularity=5m");
    println!("  dead letters: {base}/api/v1/dlq?kind=malformed");
    println!("  prometheus: {base}/metrics");
    println!(
        "  SQL:        curl -XPOST {base}/api/v1/query -d '{{\"sql\": \"SELECT event_type, count(*) FROM events GROUP BY 1\"}}'"
    );
    println!(
        "  archive:    {} (Parquet, sealed every minute)",
        a.data_dir.join("archive").display()
    );
    println!(
        "  send your own: curl -XPOST {base}/api/v1/events -d '{{\"event_id\":\"1\",\"event_type\":\"click\",\"timestamp\":\"{}\"}}'",
        tally_types::time::format_rfc3339(Clock::system().now_ms())
    );
    // Two example alert rules (updated in place on the next start): they
    // show on the dashboard; add "notify" targets to get webhooks.
    let c = client();
    for rule in [
        serde_json::json!({"name": "error-anomaly", "metric": "count", "event_type": ["error"],
            "detector": {"kind": "zscore", "window": 10, "z": 4}, "for": "1m", "resolve_after": "2m"}),
        serde_json::json!({"name": "traffic-stopped", "metric": "count", "event_type": ["page_view"],
            "detector": {"kind": "threshold", "op": "<", "value": 1}, "for": "1m"}),
    ] {
        let r = c
            .post(format!("{base}/api/v1/alerts"))
            .body(rule.to_string())
            .send()
            .await
            .context("creating the demo alert rules")?;
        if !r.status().is_success() {
            bail!(
                "demo alert rule refused: {}",
                r.text().await.unwrap_or_default()
            );
        }
    }
    println!("  alerts:     {base}/api/v1/alerts (two example rules; POST your own)");
    let url = format!("{base}/api/v1/events");
    let rate = a.rate.max(1);
    demo_history(&c, &url, &a.history, rate).await?;
    println!(
        "Sending ~{} sample events/s for tenants tenant0 and tenant1. Ctrl-C stops.",
        a.rate
    );
    let traffic = tokio::spawn(async move {
        let mut g = Generator::new(GenConfig {
            seed: 42,
            tenants: 2,
            late: 0.002,
            malformed: 0.002,
            ..GenConfig::default()
        });
        let client = client();
        let stats = LoadStats::default();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let n = (rate / 4).max(1);
            let mut body = String::new();
            for _ in 0..n {
                body.push_str(&g.next_line().0);
                body.push('\n');
            }
            if let Err(e) = post_batch(&client, &url, body.into(), &stats).await {
                tracing::warn!(error = %e, "demo traffic");
            }
        }
    });
    shutdown_signal().await;
    traffic.abort();
    server.stop().await.context("stopping the demo server")?;
    Ok(())
}

/// The demo's history: `history` (a duration) of events of two tenants
/// up to now, at a quarter of the live rate, sent as a backfill (judged
/// by the tenants' backfill clocks, so none of it is late), with progress.
async fn demo_history(c: &reqwest::Client, url: &str, history: &str, rate: u32) -> Result<()> {
    let span = tally_types::time::parse_duration_ms(history)
        .filter(|&d| d >= 0)
        .ok_or_else(|| {
            anyhow::anyhow!("--history {history:?}: not a duration; use e.g. 1h, 30m or 0")
        })?;
    if span == 0 {
        return Ok(());
    }
    let eps = (f64::from(rate) / 4.0).max(1.0);
    let total = (span as f64 / 1000.0 * eps) as u64;
    let mut g = Generator::new(GenConfig {
        seed: 7,
        tenants: 2,
        start_ms: Some(Clock::system().now_ms() - span),
        events_per_sec: eps,
        late: 0.0,
        malformed: 0.001,
        duplicate: 0.01,
        disorder: 0.02,
        ..GenConfig::default()
    });
    let pb = progress(total, "history");
    let stats = LoadStats::default();
    let backfill = format!("{url}?backfill=true");
    // A request's events go to several partitions, applied one after the
    // other: one request spans at most 2 minutes of event time, well
    // inside the allowed lateness, so none of it falls behind the
    // backfill clock the request itself moves.
    let per_request = ((eps * 120.0) as u64).clamp(1, 5000);
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(per_request);
        let mut body = String::with_capacity(n as usize * 200);
        for _ in 0..n {
            body.push_str(&g.next_line().0);
            body.push('\n');
        }
        post_batch(c, &backfill, body.into(), &stats)
            .await
            .context("sending the demo's history")?;
        sent += n;
        pb.set_position(sent);
    }
    pb.finish_and_clear();
    println!(
        "  history:    {sent} events of the last {} for tenant0 and tenant1 (a backfill)",
        tally_types::time::human_ms(span)
    );
    Ok(())
}

fn gen_config(a: &GenArgs) -> Result<GenConfig> {
    let start_ms = match &a.start {
        None => None,
        Some(s) => Some(
            parse_time_param(s)
                .map_err(|e| anyhow::anyhow!("--start {s:?}: {e}; use RFC 3339 or epoch ms"))?,
        ),
    };
    Ok(GenConfig {
        seed: a.seed,
        tenants: a.tenants,
        users: a.users.max(1),
        start_ms,
        events_per_sec: a.events_per_sec,
        disorder: a.disorder,
        late: a.late,
        duplicate: a.duplicate,
        malformed: a.malformed,
    })
}

async fn replay(a: ReplayArgs) -> Result<()> {
    use tally_server::pipeline::{ReplayFrom, rebuild_state};
    let mut cfg = Config::load(a.config.as_deref()).context("loading configuration")?;
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    let from = if !a.from.is_empty() && a.from.bytes().all(|b| b.is_ascii_digit()) {
        ReplayFrom::Lsn(
            a.from
                .parse()
                .context("--from: sequence number too large")?,
        )
    } else {
        match tally_types::time::parse_rfc3339(&a.from) {
            Ok(t) => ReplayFrom::Time(t),
            Err(e) => bail!(
                "--from {:?}: {e}; use a log sequence number (0 = the whole log) or an RFC 3339 time",
                a.from
            ),
        }
    };
    if !cfg.data_dir.join("log").exists() {
        bail!(
            "{} has no log (no {}/log directory); point --data-dir at a tally data dir",
            cfg.data_dir.display(),
            cfg.data_dir.display()
        );
    }
    // From a later point the new state holds only what was appended since:
    // everything before drops out of the rollups. Say so and ask.
    let partial = !matches!(from, ReplayFrom::Lsn(0));
    if partial && !a.dry_run && !a.yes {
        let what = format!(
            "the rebuilt state will hold only records appended from --from {}; everything before drops out of the rollups (the current state is kept as state.old-<ms>)",
            a.from
        );
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            bail!("{what}; pass --yes to go ahead, or --dry-run to look first");
        }
        eprint!("{what}. Go ahead? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("nothing changed");
        }
    }
    let (verify, dry_run) = (a.verify, a.dry_run);
    let cfg2 = cfg.clone();
    let r = tokio::task::spawn_blocking(move || {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "replay [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let r = rebuild_state(&cfg2, from, verify, dry_run, |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        });
        pb.finish_and_clear();
        r
    })
    .await
    .context("replay task")?
    .with_context(|| format!("replaying the log of {}", cfg.data_dir.display()))?;
    let secs = r.elapsed_ms.max(1) as f64 / 1000.0;
    println!(
        "replayed {} records ({} skipped before the start), {:.1} MiB in {secs:.2} s ({:.0} events/s)",
        r.replay.records,
        r.replay.skipped,
        r.replay.bytes as f64 / 1048576.0,
        (r.totals.counted + r.totals.duplicates + r.totals.late) as f64 / secs
    );
    println!(
        "events: counted {}  duplicates {}  late {}  corrections {}  replayed from DLQ {}",
        r.totals.counted,
        r.totals.duplicates,
        r.totals.late,
        r.totals.corrections,
        r.totals.replayed
    );
    println!(
        "state: {} tenant-minute buckets, watermark {}",
        r.buckets,
        r.watermark
            .map(tally_types::time::format_rfc3339)
            .unwrap_or_else(|| "none".into())
    );
    for c in &r.replay.corrupt {
        println!("corrupt log data skipped: {c}");
    }
    if let (Some(d), Some(t)) = (r.differing_buckets, r.totals_match) {
        if d == 0 && t {
            println!("verify: identical to the current state (every bucket and every total)");
        } else {
            println!("verify: {d} buckets differ from the current state; totals match: {t}");
        }
    }
    match (&r.previous_state, dry_run) {
        (_, true) => println!("dry run: the current state was kept"),
        (Some(p), _) => println!(
            "the rebuilt state is now in use; the previous one is kept at {}",
            p.display()
        ),
        (None, _) => println!("the rebuilt state is now in use"),
    }
    if r.differing_buckets.is_some_and(|d| d > 0) || r.totals_match == Some(false) {
        std::process::exit(3);
    }
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

async fn gen_cmd(a: GenArgs) -> Result<()> {
    let cfg = gen_config(&a)?;
    let mut g = Generator::new(cfg);
    if let Some(out) = &a.out {
        let mut w: Box<dyn Write> = if out.as_os_str() == "-" {
            Box::new(std::io::BufWriter::new(std::io::stdout()))
        } else {
            Box::new(std::io::BufWriter::new(
                std::fs::File::create(out)
                    .with_context(|| format!("creating {}", out.display()))?,
            ))
        };
        let pb = progress(a.events, "generating");
        for i in 0..a.events {
            writeln!(w, "{}", g.next_line().0)?;
            if i % 10_000 == 0 {
                pb.set_position(i);
            }
        }
        w.flush()?;
        pb.finish();
        return Ok(());
    }
    if let Some(brokers) = a.kafka.clone() {
        return tokio::task::spawn_blocking(move || gen_kafka(&a, &mut g, &brokers)).await?;
    }
    let Some(base) = a.url.clone() else {
        bail!("give --out FILE, --url http://HOST:PORT or --kafka HOST:PORT")
    };
    let url = format!("{}/api/v1/events", base.trim_end_matches('/'));
    let stats = Arc::new(LoadStats::default());
    let pb = progress(a.events, "sending");
    let (tx, rx) = async_channel(a.connections * 2);
    let mut tasks = Vec::new();
    for _ in 0..a.connections.max(1) {
        let rx = rx.clone();
        let (url, stats, pb) = (url.clone(), stats.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            while let Ok((body, n)) = rx.recv().await {
                post_batch(&c, &url, body, &stats).await?;
                pb.inc(n);
            }
            anyhow::Ok(())
        }));
    }
    drop(rx);
    let mut left = a.events;
    while left > 0 {
        let n = left.min(a.batch.max(1) as u64);
        let mut body = String::with_capacity(n as usize * 300);
        for _ in 0..n {
            body.push_str(&g.next_line().0);
            body.push('\n');
        }
        left -= n;
        if tx.send((bytes::Bytes::from(body), n)).await.is_err() {
            break;
        }
    }
    drop(tx);
    for t in tasks {
        t.await??;
    }
    pb.finish();
    println!(
        "sent {} events in {} requests: {} accepted, {} rejected, {} retries",
        a.events,
        stats.batches.load(Relaxed),
        stats.accepted.load(Relaxed),
        stats.rejected.load(Relaxed),
        stats.retries.load(Relaxed)
    );
    Ok(())
}

/// `gen --kafka`: every line (malformed ones too) is one message of the
/// topic, keyed as Tally's own ingest keys events (or, with `--grouped`,
/// the lines bound for one partition share messages); waits for the
/// broker's acknowledgement of every batch.
fn gen_kafka(a: &GenArgs, g: &mut Generator, brokers: &str) -> Result<()> {
    let settings = tally_kafka::Settings {
        brokers: brokers.to_string(),
        group_id: "tally-gen".into(),
        topic_events: a.topic.clone(),
        topic_aggregates: String::new(),
        topic_late: String::new(),
        topic_alerts: String::new(),
        topic_malformed: String::new(),
        topic_registry: String::new(),
        partitions: 1,
        client: Vec::new(),
        node_id: format!("gen-{}", std::process::id()),
        commit_interval: Duration::from_millis(200),
        produce_timeout_ms: 30_000,
    };
    let stats = Arc::new(tally_kafka::ProduceStats::default());
    let producer = tally_kafka::EventProducer::new(&settings, stats.clone())
        .with_context(|| format!("connecting to Kafka at {brokers}"))?;
    let pb = progress(a.events, "producing");
    let started = Instant::now();
    let mut left = a.events;
    let (tx, rx) = std::sync::mpsc::channel::<std::result::Result<(), String>>();
    let mut in_flight = 0usize;
    while left > 0 {
        let n = left.min(a.batch.max(1) as u64);
        let mut batch = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let line = g.next_line().0;
            let key = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => tally_kafka::event_key(
                    v["tenant"].as_str().unwrap_or("default"),
                    v["session_id"].as_str(),
                    v["event_id"].as_str().unwrap_or(""),
                ),
                Err(_) => line.as_bytes().iter().take(32).copied().collect(),
            };
            batch.push(tally_kafka::OutEvent {
                key,
                value: line.into_bytes(),
                backfill: false,
                correction: false,
            });
        }
        left -= n;
        let tx = tx.clone();
        let done: tally_kafka::produce::Done = Box::new(move |r| {
            let _ = tx.send(r);
        });
        if a.grouped {
            producer.send_grouped(batch, done);
        } else {
            producer.send(batch, done);
        }
        in_flight += 1;
        // Keep a few batches in flight, not the whole run.
        while in_flight > 8 {
            rx.recv()?.map_err(anyhow::Error::msg)?;
            in_flight -= 1;
        }
        pb.inc(n);
    }
    while in_flight > 0 {
        rx.recv()?.map_err(anyhow::Error::msg)?;
        in_flight -= 1;
    }
    pb.finish();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} events to {} on {brokers} in {secs:.1} s ({:.0} events/s)",
        stats.produced.load(Relaxed),
        a.topic,
        stats.produced.load(Relaxed) as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// A small multi-consumer channel over tokio's mpsc.
fn async_channel<T: Send + 'static>(cap: usize) -> (tokio::sync::mpsc::Sender<T>, SharedRx<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (tx, SharedRx(Arc::new(tokio::sync::Mutex::new(rx))))
}

struct SharedRx<T>(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<T>>>);

impl<T> Clone for SharedRx<T> {
    fn clone(&self) -> Self {
        SharedRx(self.0.clone())
    }
}

impl<T> SharedRx<T> {
    async fn recv(&self) -> Result<T, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// A batch body with fixed-width id and timestamp fields patched per send.
struct Template {
    body: Vec<u8>,
    id_at: Vec<usize>,
    ts_at: Vec<usize>,
}

const ID_W: usize = 16;

fn template(seed: u64, n: usize) -> Template {
    let mut g = Generator::new(GenConfig {
        seed,
        disorder: 0.0,
        late: 0.0,
        duplicate: 0.0,
        malformed: 0.0,
        users: 100_000,
        ..GenConfig::default()
    });
    let mut body = Vec::with_capacity(n * 300);
    let (mut id_at, mut ts_at) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (line, _) = g.next_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let rest = line
            .split_once(",\"tenant\"")
            .map(|(_, r)| format!(",\"tenant\"{r}"))
            .unwrap_or_else(|| "}".into());
        let ty = v["event_type"].as_str().unwrap_or("click");
        let prefix = b"{\"event_id\":\"";
        body.extend_from_slice(prefix);
        id_at.push(body.len());
        body.extend_from_slice(&[b'0'; ID_W]);
        body.extend_from_slice(format!("\",\"event_type\":\"{ty}\",\"timestamp\":").as_bytes());
        ts_at.push(body.len());
        body.extend_from_slice(b"0000000000000");
        body.extend_from_slice(rest.as_bytes());
        body.push(b'\n');
    }
    Template { body, id_at, ts_at }
}

fn patch(t: &Template, conn: usize, counter: &mut u64, now_ms: i64) -> bytes::Bytes {
    let mut b = t.body.clone();
    let ts = format!("{:013}", now_ms);
    for (&i, &j) in t.id_at.iter().zip(&t.ts_at) {
        *counter += 1;
        let id = format!("{:02}{:014}", conn % 100, *counter);
        b[i..i + ID_W].copy_from_slice(id.as_bytes());
        b[j..j + 13].copy_from_slice(ts.as_bytes());
    }
    bytes::Bytes::from(b)
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds (user + system) per thread name of a process.
type ThreadCpu = std::collections::BTreeMap<String, f64>;

/// CPU used so far by each thread name of a process, from
/// `/proc/<pid>/task/*/stat` (empty where there is no /proc).
fn thread_cpu(pid: u32) -> ThreadCpu {
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (name) state ...": the name may hold spaces, so cut at the parens.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
        *out.entry(stat[open + 1..close].to_string()).or_insert(0.0) +=
            (ticks(11) + ticks(12)) as f64 / hz;
    }
    out
}

/// CPU each thread name used between two readings of [`thread_cpu`].
fn cpu_since(before: &ThreadCpu, after: &ThreadCpu) -> ThreadCpu {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// The raw store's threads: Arrow rows, then Parquet.
const RAW_STORE_THREADS: [&str; 2] = ["tally-raw", "tally-seal"];

/// Prints where the server's CPU went during the load, per thread name;
/// returns the CPU per event in ns of every thread but the raw store's
/// ([`RAW_STORE_THREADS`]).
fn print_server_cpu(used: &ThreadCpu, secs: f64, events: u64) -> Option<f64> {
    let mut used: Vec<(&String, f64)> = used
        .iter()
        .map(|(k, &v)| (k, v))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let total: f64 = used.iter().map(|(_, v)| v).sum();
    if total <= 0.0 {
        return None;
    }
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = used
        .iter()
        .map(|(k, v)| {
            format!(
                "{} {:.0}%",
                k.trim_start_matches("tally-"),
                100.0 * v / total
            )
        })
        .collect();
    let per_event = |cpu: f64| cpu * 1e9 / events.max(1) as f64;
    println!(
        "server CPU          {:.2} cores, {:.0} ns per event: {}",
        total / secs,
        per_event(total),
        parts.join("  ")
    );
    let raw_store: f64 = used
        .iter()
        .filter(|(k, _)| RAW_STORE_THREADS.contains(&k.as_str()))
        .map(|(_, v)| v)
        .sum();
    Some(per_event(total - raw_store))
}

/// What the raw store cost per row, once it has caught up with the load:
/// CPU of its `tally-raw` thread (Arrow rows) per row appended and of its
/// `tally-seal` thread (Parquet) per row sealed. Rows still hot at the end
/// are sealed at shutdown, outside the figures. With the CPU per event of
/// the rest of the server (`server_ns`), also the raw store's share of
/// the CPU an event costs in all: on a machine ingest keeps busy, the
/// throughput that keeping and archiving every event takes.
async fn print_raw_store_cpu(
    c: &reqwest::Client,
    base: &str,
    pid: u32,
    before: &ThreadCpu,
    server_ns: Option<f64>,
) -> Result<()> {
    let metric = |text: &str, name: &str| metric_value(text, name).unwrap_or(0.0);
    // Settled: no row appended or sealed and no CPU used by either thread
    // for half a second.
    let mut last = None;
    let settle_by = Instant::now() + Duration::from_secs(20);
    let (appended, sealed, raw, seal) = loop {
        let text = scrape(c, base).await?;
        let used = cpu_since(before, &thread_cpu(pid));
        let thread = |k: &str| used.get(k).copied().unwrap_or(0.0);
        let now = (
            metric(&text, "tally_raw_rows_appended_total"),
            metric(&text, "tally_archive_rows_sealed_total"),
            thread(RAW_STORE_THREADS[0]),
            thread(RAW_STORE_THREADS[1]),
        );
        if last == Some(now) || Instant::now() > settle_by {
            break now;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if appended > 0.0 {
        println!(
            "raw store CPU       {:.0} ns per row appended (tally-raw, {appended:.0} rows), {:.0} ns per row sealed (tally-seal, {sealed:.0} rows)",
            raw * 1e9 / appended,
            seal * 1e9 / sealed.max(1.0),
        );
        if let Some(server) = server_ns.filter(|&n| n > 0.0 && sealed > 0.0) {
            let archive = (raw / appended + seal / sealed) * 1e9;
            println!(
                "raw store share     {:.1}% of the CPU per event ({archive:.0} ns; the rest of the server {server:.0} ns)",
                100.0 * archive / (archive + server)
            );
        }
    }
    Ok(())
}

/// The `/metrics` page of a server.
async fn scrape(c: &reqwest::Client, base: &str) -> Result<String> {
    Ok(c.get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// The value of the unlabelled metric `name` on a `/metrics` page.
fn metric_value(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Where freshness goes in Kafka mode, from the node's histograms: the
/// bucket bounds the median and the 99th percentile fall under.
async fn print_kafka_stages(c: &reqwest::Client, base: &str) {
    let Ok(text) = scrape(c, base).await else {
        return;
    };
    let mut parts = Vec::new();
    for (label, name) in [
        ("to worker", "tally_kafka_consume_delay_seconds"),
        ("transaction", "tally_kafka_commit_seconds"),
        ("commit to view", "tally_kafka_view_delay_seconds"),
    ] {
        let q = |p| {
            histogram_quantile(&text, name, p)
                .map_or("-".to_string(), |s| format!("≤{}", s * 1000.0))
        };
        parts.push(format!("{label} p50 {} p99 {} ms", q(0.5), q(0.99)));
    }
    println!("kafka stages        {}", parts.join("  · "));
}

/// The upper bound of the bucket of a Prometheus histogram `name` in
/// `text` that holds quantile `q` (`None`: no observations, or past the
/// last bound).
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, n) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
}

async fn bench(a: BenchArgs) -> Result<()> {
    let mut child = None;
    let _tmp;
    let base = match &a.target {
        Some(t) => t.trim_end_matches('/').to_string(),
        None => {
            let tmp = tempfile::tempdir().context("creating a temporary data dir")?;
            let port = free_port()?;
            let exe = std::env::current_exe().context("finding the tally binary")?;
            let mut cmd = std::process::Command::new(exe);
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(tmp.path())
                .env("RUST_LOG", &a.server_log);
            if let Some(c) = &a.config {
                cmd.arg("--config").arg(c);
            }
            if let Some(brokers) = &a.kafka {
                let tag = format!("tally-bench-{}-{}", std::process::id(), port);
                cmd.env("TALLY__KAFKA__BROKERS", brokers)
                    .env("TALLY__KAFKA__GROUP_ID", &tag)
                    .env("TALLY__KAFKA__TOPIC_EVENTS", format!("{tag}-events"))
                    .env(
                        "TALLY__KAFKA__TOPIC_AGGREGATES",
                        format!("{tag}-aggregates"),
                    )
                    .env("TALLY__KAFKA__TOPIC_LATE", format!("{tag}-late"));
            }
            child = Some(cmd.spawn().context("starting the server")?);
            _tmp = tmp;
            format!("http://127.0.0.1:{port}")
        }
    };
    let c = client();
    let ready_by = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = c.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > ready_by {
            bail!("server at {base} not ready after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "tally bench: {} s, {} connections, {} events/request, server {base}{}",
        a.duration,
        a.connections,
        a.batch,
        a.kafka
            .as_ref()
            .map(|b| format!(" in Kafka mode on {b}"))
            .unwrap_or_default()
    );
    let templates: Vec<Arc<Template>> = (0..8)
        .map(|i| Arc::new(template(1000 + i, a.batch)))
        .collect();
    let url = format!("{base}/api/v1/events");
    let stats = Arc::new(LoadStats::default());
    let server_pid = child.as_ref().map(|c: &std::process::Child| c.id());
    let cpu_before = server_pid.map(thread_cpu).unwrap_or_default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.duration);
    let per_conn_rate = if a.rate > 0 {
        a.rate as f64 / a.connections.max(1) as f64
    } else {
        0.0
    };
    let mut senders = Vec::new();
    for conn in 0..a.connections.max(1) {
        let (url, stats, templates) = (url.clone(), stats.clone(), templates.clone());
        senders.push(tokio::spawn(async move {
            let c = client();
            let mut h = Histogram::<u64>::new(3)?;
            let mut counter = 0u64;
            let mut i = conn;
            let t0 = Instant::now();
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let t = &templates[i % templates.len()];
                i += 1;
                let body = patch(t, conn, &mut counter, Clock::system().now_ms());
                let n = t.id_at.len() as u64;
                let s = Instant::now();
                post_batch(&c, &url, body, &stats).await?;
                h.record(s.elapsed().as_micros() as u64)?;
                sent += n;
                if per_conn_rate > 0.0 {
                    let due = Duration::from_secs_f64(sent as f64 / per_conn_rate);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            anyhow::Ok(h)
        }));
    }
    // Metrics queries under load.
    let q_url = format!("{base}/api/v1/metrics?metric=count&granularity=1m&group_by=event_type");
    let querier = tokio::spawn(async move {
        let c = client();
        let mut h = Histogram::<u64>::new(3)?;
        while Instant::now() < deadline {
            let s = Instant::now();
            let r = c.get(&q_url).send().await?;
            r.bytes().await?;
            h.record(s.elapsed().as_micros() as u64)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(h)
    });
    // Freshness: ack of a probe event → visible in the metrics API.
    let probe_base = base.clone();
    let prober = tokio::spawn(async move {
        let c = client();
        let mut h = Histogram::<u64>::new(3)?;
        let stats = LoadStats::default();
        let mut n = 0u64;
        let t_start = Clock::system().now_ms();
        while Instant::now() < deadline {
            n += 1;
            let now = Clock::system().now_ms();
            let body = format!(
                "{{\"event_id\":\"probe-{t_start}-{n}\",\"event_type\":\"bench_probe\",\"timestamp\":{now}}}\n"
            );
            post_batch(
                &c,
                &format!("{probe_base}/api/v1/events"),
                body.into(),
                &stats,
            )
            .await?;
            let acked = Instant::now();
            let q = format!(
                "{probe_base}/api/v1/metrics?metric=count&granularity=1d&event_type=bench_probe&start={}&end={}",
                t_start - 86_400_000,
                now + 86_400_000
            );
            loop {
                let v: serde_json::Value =
                    serde_json::from_str(&c.get(&q).send().await?.text().await?)?;
                let seen: u64 = v["series"][0]["points"]
                    .as_array()
                    .map(|ps| ps.iter().filter_map(|p| p[1].as_u64()).sum())
                    .unwrap_or(0);
                if seen >= n {
                    break;
                }
                if acked.elapsed() > Duration::from_secs(10) {
                    bail!("probe {n} not visible 10 s after its ack");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            h.record(acked.elapsed().as_micros() as u64)?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(h)
    });
    let pb = ProgressBar::new(a.duration);
    pb.set_style(
        ProgressStyle::with_template("load [{elapsed_precise}] {wide_bar} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let el = started.elapsed().as_secs_f64();
        pb.set_position(el as u64);
        pb.set_message(format!(
            "{:.0} events/s",
            stats.accepted.load(Relaxed) as f64 / el
        ));
    }
    let mut ack = Histogram::<u64>::new(3)?;
    for s in senders {
        ack.add(s.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = server_pid.map(thread_cpu).unwrap_or_default();
    pb.finish_and_clear();
    let queries = querier.await??;
    let fresh = prober.await??;
    let accepted = stats.accepted.load(Relaxed);
    println!("events accepted     {accepted} in {elapsed:.1} s");
    println!(
        "sustained ingest    {:.0} events/s (durable ack; {} requests, {} retries after 429/503)",
        accepted as f64 / elapsed,
        stats.batches.load(Relaxed),
        stats.retries.load(Relaxed)
    );
    let server_ns = print_server_cpu(&cpu_since(&cpu_before, &cpu_after), elapsed, accepted);
    if let Some(pid) = server_pid {
        print_raw_store_cpu(&c, &base, pid, &cpu_before, server_ns).await?;
    }
    println!(
        "ack latency         p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms (per {}-event request)",
        ms(&ack, 0.5),
        ms(&ack, 0.99),
        ack.max() as f64 / 1000.0,
        a.batch
    );
    println!(
        "freshness           p50 {:.2} ms  p99 {:.2} ms  ({} probes, ack → visible in metrics API)",
        ms(&fresh, 0.5),
        ms(&fresh, 0.99),
        fresh.len()
    );
    if a.kafka.is_some() {
        print_kafka_stages(&c, &base).await;
    }
    println!(
        "metrics query       p50 {:.2} ms  p99 {:.2} ms  ({} queries under load)",
        ms(&queries, 0.5),
        ms(&queries, 0.99),
        queries.len()
    );
    if a.alert_samples > 0 {
        let (client_h, server_mean) = alert_phase(&c, &base, a.alert_samples).await?;
        println!(
            "alert latency       p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} notifications, ack of the event closing a bucket → webhook received; after the load)",
            ms(&client_h, 0.5),
            ms(&client_h, 0.99),
            client_h.max() as f64 / 1000.0,
            client_h.len()
        );
        if let Some(m) = server_mean {
            println!(
                "alert latency (srv) mean {m:.2} ms (tally_alert_latency_seconds: watermark passed the bucket → webhook 2xx)"
            );
        }
    }
    if let Some(ch) = &mut child {
        if let Some(kib) = peak_rss_kib(ch.id()) {
            println!("server peak RSS     {:.1} MiB", kib as f64 / 1024.0);
        }
        #[allow(unsafe_code)]
        let _ = unsafe { libc::kill(ch.id() as i32, libc::SIGTERM) };
        let _ = ch.wait();
    }
    Ok(())
}

/// Times alert notifications end to end: a threshold rule on its own tenant,
/// a webhook receiver in this process, and event time stepped one minute per
/// sample (in the future, after the load, so the load's windows are not
/// disturbed): each step fills a bucket (over or under the threshold, so the
/// rule alternates firing / resolved), then sends one event per partition
/// that moves the watermark past it, and waits for the webhook.
async fn alert_phase(
    c: &reqwest::Client,
    base: &str,
    samples: u32,
) -> Result<(Histogram<u64>, Option<f64>)> {
    use tally_types::time::{MINUTE_MS, align_down};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the bench webhook receiver")?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let tenant = "bench-alerts";
    let rule = serde_json::json!({"name": "bench-latency", "metric": "count",
        "event_type": ["bench_alert"], "detector": {"kind": "threshold", "op": ">", "value": 5},
        "resolve_after": "1m", "notify": [{"webhook": hook}]});
    let r = c
        .post(format!("{base}/api/v1/alerts?tenant={tenant}"))
        .body(rule.to_string())
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "creating the bench alert rule: {} {}",
            r.status(),
            r.text().await?
        );
    }
    let run = Clock::system().now_ms();
    let t0 = align_down(run, MINUTE_MS) + 120 * MINUTE_MS;
    let stats = LoadStats::default();
    let url = format!("{base}/api/v1/events");
    let mut h = Histogram::<u64>::new(3)?;
    let pb = ProgressBar::new(samples as u64);
    pb.set_style(
        ProgressStyle::with_template("alerts [{elapsed_precise}] {wide_bar} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for k in 0..samples as i64 {
        let n = if k % 2 == 0 { 10 } else { 1 };
        let mut body = String::new();
        for i in 0..n {
            body.push_str(&format!(
                "{{\"event_id\":\"ba-{run}-{k}-{i}\",\"event_type\":\"bench_alert\",\"tenant\":\"{tenant}\",\"user_id\":\"a{i}\",\"timestamp\":{}}}\n",
                t0 + k * MINUTE_MS + 40_000
            ));
        }
        post_batch(c, &url, body.into(), &stats).await?;
        // One tick per user key so that every partition's watermark moves.
        let mut tick = String::new();
        for u in 0..64 {
            tick.push_str(&format!(
                "{{\"event_id\":\"bt-{run}-{k}-{u}\",\"event_type\":\"bench_tick\",\"tenant\":\"{tenant}\",\"user_id\":\"t{u}\",\"timestamp\":{}}}\n",
                t0 + (k + 1) * MINUTE_MS + 30_000
            ));
        }
        post_batch(c, &url, tick.into(), &stats).await?;
        let acked = Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(at)) => h.record(at.saturating_duration_since(acked).as_micros() as u64)?,
            _ => bail!(
                "no alert notification 10 s after closing bucket {k} (watermark bound over 29 s?)"
            ),
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let text = scrape(c, base).await?;
    let mean = match (
        metric_value(&text, "tally_alert_latency_seconds_sum"),
        metric_value(&text, "tally_alert_latency_seconds_count"),
    ) {
        (Some(s), Some(n)) if n > 0.0 => Some(s / n * 1000.0),
        _ => None,
    };
    Ok((h, mean))
}

#[cfg(test)]
mod tests {
    use super::histogram_quantile;

    #[test]
    fn quantiles_come_from_the_bucket_that_holds_them() {
        let h = tally_types::histogram::Histogram::latency();
        for ms in [3, 3, 3, 3, 3, 3, 3, 3, 40, 700] {
            h.observe_ms(ms);
        }
        let mut text = String::from("other_bucket{le=\"0.001\"} 99\n");
        h.render(&mut text, "x_seconds", "help");
        assert_eq!(histogram_quantile(&text, "x_seconds", 0.5), Some(0.005));
        assert_eq!(histogram_quantile(&text, "x_seconds", 0.9), Some(0.05));
        assert_eq!(histogram_quantile(&text, "x_seconds", 0.99), Some(1.0));
        assert_eq!(histogram_quantile(&text, "missing", 0.5), None);
        // Past the last bound: no finite answer.
        h.observe_ms(60_000);
        h.observe_ms(60_000);
        h.observe_ms(60_000);
        let mut text = String::new();
        h.render(&mut text, "x_seconds", "help");
        assert_eq!(histogram_quantile(&text, "x_seconds", 0.99), None);
        // No observations.
        let mut text = String::new();
        tally_types::histogram::Histogram::latency().render(&mut text, "y", "h");
        assert_eq!(histogram_quantile(&text, "y", 0.5), None);
    }
}
