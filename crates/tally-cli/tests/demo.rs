//! `tally demo` as a newcomer runs it: it sends an hour of history for
//! two tenants first (a backfill: none of it late), then live traffic, so
//! the metrics of both tenants have points all over the last hour and the
//! archive has files within seconds.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tally");

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_with_an_hour_of_history_for_two_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _demo = Killed(
        Command::new(BIN)
            .args([
                "demo",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--rate",
                "40",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tally demo starts"),
    );
    let c = reqwest::Client::new();
    let now = tally_types::Clock::system().now_ms();
    let hour = 3_600_000;
    // Per tenant: 5-minute points over the hour before the demo started.
    let points = |tenant: &str| {
        let url = format!(
            "{base}/api/v1/metrics?metric=count&granularity=5m&tenant={tenant}&start={}&end={}",
            now - hour,
            now - 60_000
        );
        let c = c.clone();
        async move {
            let Ok(r) = c.get(url).send().await else {
                return 0;
            };
            let v: Value =
                serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null);
            v["series"][0]["points"].as_array().map_or(0, Vec::len)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (a, b) = (points("tenant0").await, points("tenant1").await);
        if a >= 11 && b >= 11 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the demo's history never filled the hour: {a} and {b} five-minute points"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // None of the history went late.
    for tenant in ["tenant0", "tenant1"] {
        let v = common::get(&c, format!("{base}/api/v1/dlq?kind=late&tenant={tenant}")).await;
        let late = v["entries"].as_array().map_or(0, Vec::len);
        assert_eq!(
            late, 0,
            "{tenant}: {late} events of the history went late, e.g. {}",
            v["entries"][0]
        );
    }
}
