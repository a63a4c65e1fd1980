//! A real Kafka-protocol broker for tests (PyPI `noida-db`, installed by
//! `scripts/kafka-broker install`): started on a free port with a fresh
//! data dir, killed when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running broker.
pub struct Broker {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
}

/// The broker binary: `$TALLY_KAFKA_BROKER`, else the one inside the venv
/// `scripts/kafka-broker install` makes (`~/.cache/kafka-venv`).
pub fn broker_bin() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("TALLY_KAFKA_BROKER") {
        return Ok(p.into());
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let lib = PathBuf::from(home).join(".cache/kafka-venv/lib");
    if let Ok(dirs) = std::fs::read_dir(&lib) {
        for d in dirs.flatten() {
            let p = d.path().join("site-packages/noida_db/noida-db");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "no Kafka-protocol broker for the tests: run scripts/kafka-broker install (PyPI noida-db into {}), or set TALLY_KAFKA_BROKER to a broker binary",
        lib.display()
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(19092)
}

impl Broker {
    /// Starts a broker; panics (naming the fix) when none is installed.
    pub fn start() -> Broker {
        let bin = broker_bin().unwrap_or_else(|e| panic!("{e}"));
        let dir = std::env::temp_dir().join(format!(
            "tally-broker-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut b = Broker {
            child: None,
            bin,
            port: free_port(),
            dir,
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).expect("broker data dir");
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["start", "--data-dir"])
            .arg(&self.dir)
            .args(["--host", "127.0.0.1", "--only", "kafka", "--kafka-port"])
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "broker did not open port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM: it saves its state), as an outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_free_term(&mut c);
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the data it saved.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

/// SIGTERM through `kill(1)` (no unsafe code in this workspace).
fn unsafe_free_term(c: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Settings for a test cluster: topics and group named after `tag` (one
/// set per test on a shared broker), node `node`.
pub fn settings(brokers: &str, tag: &str, node: &str) -> crate::Settings {
    crate::Settings {
        brokers: brokers.into(),
        group_id: format!("g-{tag}"),
        topic_events: format!("ev-{tag}"),
        topic_aggregates: format!("agg-{tag}"),
        topic_late: format!("late-{tag}"),
        topic_alerts: format!("alerts-{tag}"),
        topic_malformed: format!("malformed-{tag}"),
        topic_registry: format!("registry-{tag}"),
        partitions: 4,
        client: Vec::new(),
        node_id: node.into(),
        commit_interval: std::time::Duration::from_millis(100),
        produce_timeout_ms: 10_000,
    }
}
