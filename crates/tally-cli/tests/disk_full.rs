//! A full disk, for real: the server's data dir sits on a small tmpfs that a
//! filler file fills up (or, where mounting is not permitted, the process's
//! file-size limit is lowered with `prlimit`; writes then fail with EFBIG).
//! Ingest must answer 503 + Retry-After, keep nothing of the failed requests,
//! not corrupt its log, and accept again once space returns; a SIGKILL and a
//! restart afterwards must show exactly the acknowledged events.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{T0, expected, free_port, get};
use tally_cli::generator::{GenConfig, Generator, Kind};

const BIN: &str = env!("CARGO_BIN_EXE_tally");

enum Fault {
    /// A tmpfs mounted at the path; space is taken by a filler file.
    Tmpfs(PathBuf),
    /// The server's RLIMIT_FSIZE is lowered (no mount permission).
    Rlimit,
}

fn spawn(data: &Path, port: u16, log: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .env("TALLY__STREAM__CHECKPOINT_INTERVAL", "100ms")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start tally")
}

async fn ready(c: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = c.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server not ready");
}

/// Fills the file system of `dir` until it is full, then frees `leave` bytes.
fn fill(dir: &Path, leave: u64) -> std::fs::File {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xAAu8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    f.set_len(written.saturating_sub(leave)).unwrap();
    f.sync_all().unwrap();
    f
}

/// Sets the soft limit only (`N:`), so it can be raised again without
/// CAP_SYS_RESOURCE.
fn prlimit(pid: u32, limit: &str) {
    let st = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}:")])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(st.success(), "prlimit failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_503_keeps_nothing_of_failed_requests_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    // TALLY_TEST_FAULT=rlimit forces the fallback (to test it where mounting works).
    let force_rlimit = std::env::var("TALLY_TEST_FAULT").is_ok_and(|v| v == "rlimit");
    let mounted = !force_rlimit
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    // Unmounted on every exit path, a failing assertion included.
    let _unmount = mounted.then(|| Unmount(mnt.clone()));
    let fault = if mounted {
        Fault::Tmpfs(mnt.clone())
    } else {
        Fault::Rlimit
    };
    let data = mnt.join("data");

    let mut g = Generator::new(GenConfig {
        seed: 11,
        tenants: 1,
        start_ms: Some(T0),
        events_per_sec: 20.0,
        ..GenConfig::default()
    });
    let lines: Vec<(String, Kind)> = (0..8000).map(|_| g.next_line()).collect();
    let batches: Vec<String> = lines
        .chunks(200)
        .map(|ch| ch.iter().map(|(l, _)| format!("{l}\n")).collect())
        .collect();
    let want = expected(&lines);

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(&data, port, &tmp.path().join("server-1.log"));
    let c = reqwest::Client::new();
    ready(&c, &base).await;
    let post = |i: usize| {
        c.post(format!("{base}/api/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(batches[i].clone())
            .send()
    };
    // A first stretch goes in normally.
    for i in 0..5 {
        assert_eq!(post(i).await.unwrap().status(), 200);
    }
    // The disk fills up.
    let filler = match &fault {
        Fault::Tmpfs(m) => Some(fill(m, 96 << 10)),
        Fault::Rlimit => {
            let used: u64 = walk(&data).into_iter().max().unwrap_or(0);
            prlimit(child.id(), &(used + (96 << 10)).to_string());
            None
        }
    };
    let mut failed = Vec::new();
    let mut refused = 0;
    for i in 5..batches.len() {
        let r = post(i).await.expect("the server stays up");
        match r.status().as_u16() {
            200 => {}
            503 => {
                assert!(r.headers().contains_key("retry-after"));
                let body: serde_json::Value =
                    serde_json::from_str(&r.text().await.unwrap()).unwrap();
                assert!(
                    body["error"]
                        .as_str()
                        .unwrap()
                        .contains("nothing from this request"),
                    "{body}"
                );
                refused += 1;
                failed.push(i);
            }
            s => panic!("batch {i}: status {s} while the disk is full"),
        }
    }
    assert!(refused >= 10, "the disk never filled: {refused} refusals");
    // Not ready while the disk is full: a load balancer sends elsewhere.
    let r = c.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("disk") && !body.contains(&*mnt.to_string_lossy()),
        "{body}"
    );
    let health = c.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "the server stays healthy on a full disk"
    );
    // Space returns: the same batches are accepted now.
    match &fault {
        Fault::Tmpfs(_) => {
            drop(filler);
            std::fs::remove_file(mnt.join("filler")).unwrap();
        }
        Fault::Rlimit => prlimit(child.id(), "unlimited"),
    }
    for &i in &failed {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = post(i).await.unwrap().status();
            if s == 200 {
                break;
            }
            assert_eq!(s, 503);
            assert!(
                Instant::now() < deadline,
                "batch {i} still refused with space back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ready(&c, &base).await;
    let check = |base: String| {
        let c = c.clone();
        let want_counted = want.counted;
        async move {
            let status = get(&c, format!("{base}/api/v1/status")).await;
            assert_eq!(status["events"]["counted"], want_counted, "{status}");
            let prom = common::prom(&c, &base).await;
            assert!(prom.contains("tally_log_corrupt_records_total 0"), "{prom}");
            prom
        }
    };
    // Wait for the processor, then check.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = get(&c, format!("{base}/api/v1/status")).await;
        if st["log"]["behind_records"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prom = check(base.clone()).await;
    let errors: u64 = prom
        .lines()
        .find_map(|l| l.strip_prefix("tally_log_errors_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(errors >= 1, "log errors are visible in /metrics");

    // Crash and recover: the log holds exactly the acknowledged batches.
    child.kill().unwrap();
    child.wait().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(&data, port, &tmp.path().join("server-2.log"));
    ready(&c, &base).await;
    check(base).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Sizes of every file under `dir`.
fn walk(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else if let Ok(m) = p.metadata() {
                out.push(m.len());
            }
        }
    }
    out
}
