//! The archive on S3-compatible object storage: a real S3 server (moto in
//! server mode, from PyPI, installed by `.ci/run`) started here, a bucket
//! created over its HTTP API, and the server configured with `[archive.s3]`.
//! Events are sealed into the bucket (nothing lands in the local data dir),
//! listed there under `<prefix>/tenant=/date=/hour=/`, and after a restart
//! SQL answers from the bucket exactly as it did from memory.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{T0, expected, free_port};
use serde_json::Value;
use tally_cli::generator::{GenConfig, Generator, Kind};
use tally_server::Server;
use tally_server::config::S3Section;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_moto(c: &reqwest::Client) -> (Moto, String) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m moto.server (pip install 'moto[server]', done by .ci/run)");
    let moto = Moto(child);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.get(format!("{url}/")).send().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (moto, url)
}

async fn start(dir: &std::path::Path, endpoint: &str) -> Server {
    start_with(dir, endpoint, |_| {}).await
}

async fn start_with(
    dir: &std::path::Path,
    endpoint: &str,
    tweak: impl FnOnce(&mut tally_server::Config),
) -> Server {
    common::start_server(dir, |cfg| {
        tweak(cfg);
        cfg.archive.seal_interval = "1h".into();
        cfg.archive.s3 = Some(S3Section {
            bucket: "tally-test".into(),
            prefix: "lake/events".into(),
            endpoint: endpoint.into(),
            region: "us-east-1".into(),
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            allow_http: true,
        });
    })
    .await
}

async fn list_keys(c: &reqwest::Client, endpoint: &str) -> Vec<String> {
    let listing = c
        .get(format!(
            "{endpoint}/tally-test?list-type=2&prefix=lake/events/"
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    listing
        .split("<Key>")
        .skip(1)
        .map(|s| s.split("</Key>").next().unwrap().to_string())
        .collect()
}

/// Rows counted by a `count_by_type` answer.
fn total(rows: &Value) -> u64 {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_u64().unwrap())
        .sum()
}

async fn count_by_type(c: &reqwest::Client, base: &str, tenant: &str) -> Value {
    let (status, v) = common::post_sql(
        c,
        base,
        tenant,
        "SELECT event_type, count(*) AS n, count(DISTINCT event_id) AS ids FROM events GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["rows"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_on_s3_compatible_storage() {
    let c = reqwest::Client::new();
    let (_moto, endpoint) = start_moto(&c).await;
    let r = c
        .put(format!("{endpoint}/tally-test"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &endpoint).await;
    let base = format!("http://{}", server.addr);
    let mut g = Generator::new(GenConfig {
        seed: 5,
        tenants: 2,
        users: 50,
        start_ms: Some(T0),
        events_per_sec: 2.0,
        disorder: 0.05,
        late: 0.0,
        duplicate: 0.05,
        malformed: 0.01,
    });
    let lines: Vec<(String, Kind)> = std::iter::once(common::warmup())
        .chain((0..3000).map(|_| g.next_line()))
        .collect();
    let exp = expected(&lines);
    for ch in lines.chunks(500) {
        let body: String = ch.iter().map(|(l, _)| format!("{l}\n")).collect();
        common::post_ndjson(&c, &base, body).await;
    }
    let want0 = exp.kept.iter().filter(|v| v["tenant"] == "tenant0").count() as u64;
    let mut hot = Value::Null;
    for _ in 0..100 {
        hot = count_by_type(&c, &base, "tenant0").await;
        if total(&hot) == want0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(total(&hot), want0);

    // Shutdown seals into the bucket.
    server.stop().await.unwrap();
    assert!(
        !dir.path().join("archive").exists(),
        "nothing is archived locally when [archive.s3] is set"
    );
    let keys = list_keys(&c, &endpoint).await;
    assert!(!keys.is_empty());
    for k in &keys {
        let parts: Vec<&str> = k.split('/').collect();
        assert_eq!(parts.len(), 6, "{k}");
        assert!(
            parts[2].starts_with("tenant=")
                && parts[3] == "date=2026-11-01"
                && parts[4].starts_with("hour=")
                && parts[5].ends_with(".parquet"),
            "{k}"
        );
    }
    assert!(keys.iter().any(|k| k.contains("tenant=tenant1/")));

    // Restart: answers come from the bucket.
    let server = start(dir.path(), &endpoint).await;
    let base = format!("http://{}", server.addr);
    let cold = count_by_type(&c, &base, "tenant0").await;
    assert_eq!(cold, hot);
    for r in cold.as_array().unwrap() {
        assert_eq!(r[1], r[2], "no row twice");
    }
    let prom = common::prom(&c, &base).await;
    assert!(prom.contains("tally_raw_hot_rows 0"));
    assert!(!prom.contains("tally_archive_files 0\n"));

    // More of the same hour, sealed at shutdown: a second file per
    // (tenant, hour) in the bucket.
    let more: Vec<(String, Kind)> = (0..1000).map(|_| g.next_line()).collect();
    for ch in more.chunks(500) {
        let body: String = ch.iter().map(|(l, _)| format!("{l}\n")).collect();
        common::post_ndjson(&c, &base, body).await;
    }
    server.stop().await.unwrap();
    let all: Vec<(String, Kind)> = lines.iter().chain(&more).cloned().collect();
    let want_all = expected(&all)
        .kept
        .iter()
        .filter(|v| v["tenant"] == "tenant0")
        .count() as u64;
    let split = list_keys(&c, &endpoint).await;
    assert!(split.len() > keys.len(), "{split:?}");

    // Compaction (every 200 ms, two files are enough) merges each
    // (tenant, hour) into one object through the bucket (`.merging` until
    // the grace period of 2 × the query timeout is over, then `.parquet`),
    // and deletes the replaced ones.
    let server = start_with(dir.path(), &endpoint, |cfg| {
        cfg.retention.interval = "200ms".into();
        cfg.archive.compact_files = 2;
        cfg.query.timeout = "1s".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let mut merged = Vec::new();
    for _ in 0..150 {
        merged = list_keys(&c, &endpoint).await;
        if merged.len() == keys.len() && merged.iter().all(|k| k.ends_with(".parquet")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hours = |ks: &[String]| -> std::collections::BTreeSet<String> {
        ks.iter()
            .map(|k| k.rsplit_once('/').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(
        merged.len(),
        hours(&merged).len(),
        "one object per (tenant, hour): {merged:?}"
    );
    assert_eq!(hours(&merged), hours(&split));
    let rows = count_by_type(&c, &base, "tenant0").await;
    for r in rows.as_array().unwrap() {
        assert_eq!(r[1], r[2], "no row twice");
    }
    assert_eq!(total(&rows), want_all);
    let st = common::get(&c, format!("{base}/api/v1/status")).await;
    // Each merged group of k files: k compacted, one written.
    let compacted = st["retention"]["archive"]["files_compacted"]
        .as_u64()
        .unwrap() as usize;
    assert!(compacted > split.len() - merged.len(), "{st}");
    server.stop().await.unwrap();
}
