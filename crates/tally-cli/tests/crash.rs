//! Crash test: the real `tally` binary is fed generated batches (duplicates,
//! disorder, late and malformed events) and killed with SIGKILL at random
//! moments, dozens of times. After each kill it is restarted on the same data
//! dir and every batch that was not acknowledged is sent again (a client
//! retrying). At the end every minute bucket must equal an independent
//! computation: nothing acknowledged lost, nothing counted twice. Then
//! `tally replay --from 0 --verify` must rebuild the very same state.
//!
//! CI runs a few seeds with a dozen kills each. The soak is the same test
//! with more: `TALLY_CRASH_SEEDS=20 TALLY_CRASH_KILLS=100 cargo test --release
//! -p tally-cli --test crash -- --nocapture`.

mod common;

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::{T0, expected, fetch, fmt_bucket, free_port, get};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_cli::generator::{GenConfig, Generator, Kind};

const BIN: &str = env!("CARGO_BIN_EXE_tally");

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn(dir: &Path, port: u16, checkpoint: &str, seal: &str, run: usize) -> Child {
    let log = std::fs::File::create(dir.join(format!("server-{run}.log"))).unwrap();
    Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("TALLY__STREAM__CHECKPOINT_INTERVAL", checkpoint)
        // Raw-store seals between kills too (by time, and by size).
        .env("TALLY__ARCHIVE__SEAL_INTERVAL", seal)
        .env("TALLY__ARCHIVE__SEAL_ROWS", "700")
        .env("RUST_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tally")
}

async fn wait_healthy(c: &reqwest::Client, base: &str, child: &mut Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = c.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let logs = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n---\n");
            panic!("server exited during start ({st}):\n{logs}");
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends batches from `pending` over `conns` connections until it is empty
/// or the server is gone. Acknowledged batches are recorded; anything else
/// goes back to the queue (`resent` counts those).
async fn send_all(
    base: &str,
    batches: &Arc<Vec<String>>,
    pending: &Arc<Mutex<VecDeque<usize>>>,
    acked: &Arc<Mutex<Vec<u32>>>,
    resent: &Arc<AtomicU64>,
    conns: usize,
) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (c, base, batches, pending, acked, resent) = (
            c.clone(),
            base.to_string(),
            batches.clone(),
            pending.clone(),
            acked.clone(),
            resent.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let requeue = |i: usize| {
                pending.lock().push_front(i);
                resent.fetch_add(1, Relaxed);
            };
            loop {
                let Some(i) = pending.lock().pop_front() else {
                    return;
                };
                let r = c
                    .post(format!("{base}/api/v1/events"))
                    .header("content-type", "application/x-ndjson")
                    .body(batches[i].clone())
                    .send()
                    .await;
                match r {
                    // The answer counts only once its body is read in full.
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(_) => acked.lock()[i] += 1,
                        Err(_) => return requeue(i),
                    },
                    Ok(r) if r.status() == 503 || r.status() == 429 => {
                        requeue(i);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    // Server gone (killed): retry after the restart.
                    Err(_) => return requeue(i),
                }
                // Pace the feed so that kills land in the middle of it.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn run_seed(seed: u64, kills: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut g = Generator::new(GenConfig {
        seed,
        tenants: 2,
        users: 200,
        start_ms: Some(T0),
        events_per_sec: 20.0,
        disorder: 0.10,
        late: 0.02,
        duplicate: 0.05,
        malformed: 0.02,
    });
    // Enough input that kills keep landing mid-stream, however many there are.
    let n_lines = (kills as usize * 400).max(6000);
    let lines: Vec<(String, Kind)> = std::iter::once(common::warmup())
        .chain((0..n_lines).map(|_| g.next_line()))
        .collect();
    let want = expected(&lines);
    // Batch 0 is the warm-up event alone; it is acknowledged before the rest.
    let batches: Arc<Vec<String>> = Arc::new(
        std::iter::once(format!("{}\n", lines[0].0))
            .chain(
                lines[1..]
                    .chunks(30)
                    .map(|ch| ch.iter().map(|(l, _)| format!("{l}\n")).collect()),
            )
            .collect(),
    );
    let pending = Arc::new(Mutex::new((1..batches.len()).collect::<VecDeque<_>>()));
    let acked = Arc::new(Mutex::new(vec![0u32; batches.len()]));
    let resent = Arc::new(AtomicU64::new(0));

    let mut killed = 0u64;
    let mut run = 0usize;
    {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut child = spawn(dir, port, "1s", "1h", run);
        run += 1;
        let c = reqwest::Client::new();
        wait_healthy(&c, &base, &mut child, dir).await;
        let warm = Arc::new(Mutex::new(VecDeque::from([0usize])));
        send_all(&base, &batches, &warm, &acked, &resent, 1).await;
        assert!(warm.lock().is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        killed += 1;
    }
    let started = Instant::now();
    // Feed and kill until everything is acknowledged and all kills are done.
    while !pending.lock().is_empty() || killed < kills {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let ckpt = ["20ms", "100ms", "1s"][rng.random_range(0..3)];
        let seal = ["30ms", "200ms", "1h"][rng.random_range(0..3)];
        let mut child = spawn(dir, port, ckpt, seal, run);
        run += 1;
        let c = reqwest::Client::new();
        wait_healthy(&c, &base, &mut child, dir).await;
        if killed < kills {
            let delay = Duration::from_millis(rng.random_range(5..250));
            let child = Arc::new(Mutex::new(child));
            let killer = {
                let child = child.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    child.lock().kill().unwrap(); // SIGKILL
                })
            };
            send_all(&base, &batches, &pending, &acked, &resent, 3).await;
            killer.await.unwrap();
            child.lock().wait().unwrap();
            killed += 1;
        } else {
            send_all(&base, &batches, &pending, &acked, &resent, 3).await;
            child.kill().unwrap();
            child.wait().unwrap();
            killed += 1;
        }
    }
    let acks: u32 = acked.lock().iter().sum();
    assert!(
        acked.lock().iter().all(|&a| a == 1),
        "every batch acknowledged exactly once by the test's bookkeeping"
    );

    // Recover one last time and compare every bucket.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(dir, port, "1s", "1h", run);
    let c = reqwest::Client::new();
    wait_healthy(&c, &base, &mut child, dir).await;
    for tenant in ["tenant0", "tenant1"] {
        // The raw store: every kept event exactly once (hot rows rebuilt
        // from the log and sealed Parquet files together).
        let mut want_ids: Vec<String> = want
            .kept
            .iter()
            .filter(|v| v["tenant"] == tenant)
            .map(|v| v["event_id"].as_str().unwrap().to_string())
            .collect();
        want_ids.sort();
        let mut got_ids: Vec<String> = Vec::new();
        for _ in 0..100 {
            let (status, v) = common::post_sql(
                &c,
                &base,
                tenant,
                "SELECT event_id FROM events ORDER BY event_id",
            )
            .await;
            assert_eq!(status, 200, "{v}");
            got_ids = v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r[0].as_str().unwrap().to_string())
                .collect();
            if got_ids.len() >= want_ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dup = got_ids.windows(2).find(|w| w[0] == w[1]);
        assert!(
            dup.is_none(),
            "seed {seed} {tenant}: raw row twice: {dup:?}"
        );
        assert_eq!(
            got_ids.len(),
            want_ids.len(),
            "seed {seed} {tenant}: raw rows"
        );
        assert!(
            got_ids == want_ids,
            "seed {seed} {tenant}: raw event ids differ"
        );
        // Sessions, built in the stream and recovered from the checkpoint
        // and the log after every kill: each exactly as the kept events
        // make it (id, duration, events).
        let want_sessions: Vec<(String, i64, u64)> =
            common::oracle_sessions(&want.kept, tenant, 30 * 60_000)
                .into_iter()
                .map(|(id, _, start, end, n)| (id, end - start, n))
                .collect();
        let got_sessions = common::session_rows(&c, &base, tenant).await;
        assert_eq!(
            got_sessions.len(),
            want_sessions.len(),
            "seed {seed} {tenant}: sessions"
        );
        let differ: Vec<_> = got_sessions
            .iter()
            .zip(&want_sessions)
            .filter(|(g, w)| g != w)
            .take(5)
            .collect();
        assert!(
            differ.is_empty(),
            "seed {seed} {tenant}: sessions differ (got, want): {differ:?}"
        );
        let count = fetch(&c, &base, tenant, "count", "1m").await;
        let users = fetch(&c, &base, tenant, "unique_users", "1m").await;
        let sum = fetch(&c, &base, tenant, "sum:duration_ms", "1m").await;
        let mine: Vec<_> = want
            .buckets
            .iter()
            .filter(|((t, _, _), _)| t == tenant)
            .collect();
        let extra: Vec<_> = count
            .iter()
            .filter(|((ty, m), _)| {
                !mine
                    .iter()
                    .any(|((_, minute, t), _)| t == ty && fmt_bucket(*minute) == *m)
            })
            .collect();
        assert!(
            extra.is_empty() && count.len() == mine.len(),
            "seed {seed} {tenant}: {} buckets, want {}; not in the oracle: {extra:?}",
            count.len(),
            mine.len()
        );
        for ((_, minute, ty), b) in mine {
            let key = (ty.clone(), fmt_bucket(*minute));
            assert_eq!(
                count[&key], b.count as f64,
                "seed {seed} {tenant} {key:?}: count"
            );
            assert_eq!(
                users[&key],
                b.users.len() as f64,
                "seed {seed} {tenant} {key:?}: users"
            );
            let total: f64 = b.props["duration_ms"].iter().sum();
            assert!(
                (sum[&key] - total).abs() <= total.abs() * 1e-12,
                "seed {seed} {tenant} {key:?}: sum"
            );
        }
        let dlq = get(
            &c,
            format!("{base}/api/v1/dlq?kind=late&limit=10000&tenant={tenant}"),
        )
        .await;
        assert_eq!(
            dlq["entries"].as_array().unwrap().len() as u64,
            want.late.get(tenant).copied().unwrap_or(0),
            "seed {seed} {tenant}: late DLQ (each late event once, however often it was re-sent)"
        );
    }
    // The sessions came from the index, not from the raw events.
    let (from_index, from_raw) = common::session_answers(&c, &base).await;
    assert!(
        from_index >= 2 && from_raw == 0,
        "seed {seed}: session answers from the index {from_index}, from the raw events {from_raw}"
    );
    let status = get(&c, format!("{base}/api/v1/status")).await;
    assert_eq!(
        status["events"]["counted"], want.counted,
        "seed {seed}: counted"
    );
    let input_dups = lines.iter().filter(|(_, k)| *k == Kind::Duplicate).count() as u64;
    let server_dups = status["events"]["duplicates"].as_u64().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Replaying the whole log from scratch gives the very same state.
    let out = Command::new(BIN)
        .args([
            "replay",
            "--from",
            "0",
            "--verify",
            "--dry-run",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("verify: identical"),
        "seed {seed}: replay differs:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "seed {seed}: {killed} kills survived, {} restarts, {} lines in {} batches ({acks} acknowledged, {} re-sent), {} events checked in {} buckets, {} duplicates dropped ({input_dups} in the input, the rest mostly from re-sent batches that were durable but unacknowledged), {:.1} s",
        run + 1,
        lines.len(),
        batches.len(),
        resent.load(Relaxed),
        want.counted,
        want.buckets.len(),
        server_dups,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_counts_nothing_twice() {
    let seeds = env_num("TALLY_CRASH_SEEDS", 2);
    let kills = env_num("TALLY_CRASH_KILLS", 12);
    let first = env_num("TALLY_CRASH_FIRST_SEED", 1);
    for seed in first..first + seeds {
        run_seed(seed, kills).await;
    }
}
