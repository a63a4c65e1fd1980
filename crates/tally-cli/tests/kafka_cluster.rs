//! Kafka mode end to end: three `tally` processes (own ports and data
//! dirs) on one real Kafka-protocol broker, fed over HTTP on every node
//! with generated messy input (duplicates, disorder, malformed events)
//! while nodes are killed with SIGKILL and restarted. Afterwards every
//! minute bucket of every tenant is exact on every node (count, distinct
//! users, sum), late events sent at the end are counted by no node and
//! reported by all, and the status and metrics endpoints describe the
//! cluster.

mod common;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{T0, expected, fetch, fmt_bucket, get};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_cli::generator::{GenConfig, Generator};
use tally_kafka::testing::Broker;

const BIN: &str = env!("CARGO_BIN_EXE_tally");

struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    brokers: String,
    tag: String,
    child: Option<Child>,
    runs: usize,
}

impl Node {
    fn new(name: &str, dir: &std::path::Path, brokers: String, tag: &str) -> Node {
        Node {
            name: name.into(),
            port: free_port(),
            dir: dir.to_path_buf(),
            brokers,
            tag: tag.into(),
            child: None,
            runs: 0,
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.dir.join(format!("{}-{}.log", self.name, self.runs)))
            .expect("log file");
        self.runs += 1;
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(self.dir.join(&self.name))
            .env("TALLY__KAFKA__BROKERS", &self.brokers)
            .env("TALLY__KAFKA__GROUP_ID", format!("g-{}", self.tag))
            .env("TALLY__KAFKA__TOPIC_EVENTS", format!("ev-{}", self.tag))
            .env(
                "TALLY__KAFKA__TOPIC_AGGREGATES",
                format!("agg-{}", self.tag),
            )
            .env("TALLY__KAFKA__TOPIC_LATE", format!("late-{}", self.tag))
            .env("TALLY__KAFKA__NODE_ID", &self.name)
            .env("TALLY__KAFKA__COMMIT_INTERVAL", "100ms")
            .env("TALLY__KAFKA__SEAL_INTERVAL", "1s")
            // One archive for the cluster, as on a shared file system.
            .env("TALLY__ARCHIVE__DIR", self.dir.join("archive"))
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tally");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reaped");
        }
    }

    fn logs(&self) -> String {
        (0..self.runs)
            .map(|r| {
                std::fs::read_to_string(self.dir.join(format!("{}-{r}.log", self.name)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    async fn wait_ready(&mut self, c: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = c.get(format!("{}/readyz", self.base())).send().await
                && r.status().is_success()
            {
                // Ready with the cluster's logs read: its schemas and alert
                // rules are there before the first request.
                let logs = self.logs();
                assert!(
                    !logs.contains("was not read to its end"),
                    "{} started without its logs read:\n{logs}",
                    self.name
                );
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("{} exited during start ({st}):\n{}", self.name, self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// With `TALLY_KEEP_TEST_DIR` set the nodes' data dirs and logs stay.
/// Every node's warnings and errors, and what restored which partition
/// from where (what a failure needs to be understood).
fn warnings(nodes: &[Node]) -> String {
    nodes
        .iter()
        .flat_map(|n| {
            n.logs()
                .lines()
                .filter(|l| {
                    l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("stalled")
                        || l.contains("restoring partition")
                        || l.contains("waits for it")
                })
                .map(|l| format!("{}: {l}", n.name))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn scopeguard_keep(tmp: tempfile::TempDir) -> KeepDir {
    if std::env::var_os("TALLY_KEEP_TEST_DIR").is_some() {
        KeepDir::Kept(tmp.keep())
    } else {
        KeepDir::Temp(tmp)
    }
}

enum KeepDir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl KeepDir {
    fn path(&self) -> &std::path::Path {
        match self {
            KeepDir::Temp(t) => t.path(),
            KeepDir::Kept(p) => p,
        }
    }
}

/// Nodes n0, n1 and n2 of one cluster, not started.
fn three_nodes(dir: &std::path::Path, broker: &Broker, tag: &str) -> Vec<Node> {
    (0..3)
        .map(|i| Node::new(&format!("n{i}"), dir, broker.brokers(), tag))
        .collect()
}

/// Starts every node with `env` and waits until each is ready.
async fn start_all(nodes: &mut [Node], c: &reqwest::Client, env: &[(&str, &str)]) {
    for n in nodes.iter_mut() {
        n.spawn_with(env);
    }
    for n in nodes.iter_mut() {
        n.wait_ready(c).await;
    }
}

fn free_port() -> u16 {
    common::free_port()
}

/// Posts batches from `pending` to the nodes in turn until none is left;
/// a batch that is not acknowledged (node killed, 503) goes back to the
/// queue and is sent again, possibly to another node, as a client would.
async fn feed(bases: Vec<String>, batches: Arc<Vec<String>>, pending: Arc<Mutex<VecDeque<usize>>>) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut turn = 0usize;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let Some(i) = pending.lock().pop_front() else {
            return;
        };
        assert!(Instant::now() < deadline, "feed did not finish");
        turn += 1;
        let base = &bases[turn % bases.len()];
        let r = c
            .post(format!("{base}/api/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(batches[i].clone())
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => {
                let text = r.text().await.unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if v.get("accepted").is_none() {
                    pending.lock().push_back(i);
                }
            }
            Ok(r) if r.status() == 503 || r.status() == 429 => {
                pending.lock().push_back(i);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(r) => panic!("unexpected status {}", r.status()),
            Err(_) => {
                pending.lock().push_back(i);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn exact_on(c: &reqwest::Client, base: &str, want: &common::Expected) -> Result<(), String> {
    exact_at(c, base, want, "1m").await
}

/// Every `gran` bucket (`1m` or `1h`) of both tenants on a node equals the
/// oracle's minutes merged into it: count, distinct users and sum.
async fn exact_at(
    c: &reqwest::Client,
    base: &str,
    want: &common::Expected,
    gran: &str,
) -> Result<(), String> {
    let step = if gran == "1h" { 3_600_000 } else { 60_000 };
    for tenant in ["tenant0", "tenant1"] {
        let count = fetch(c, base, tenant, "count", gran).await;
        let users = fetch(c, base, tenant, "unique_users", gran).await;
        let sum = fetch(c, base, tenant, "sum:duration_ms", gran).await;
        type Want<'a> = (u64, std::collections::HashSet<&'a str>, f64);
        let mut mine: std::collections::BTreeMap<(String, String), Want<'_>> = Default::default();
        for ((t, m, ty), b) in &want.buckets {
            if t != tenant {
                continue;
            }
            let k = (
                ty.clone(),
                fmt_bucket(tally_types::time::align_down(*m, step)),
            );
            let e = mine.entry(k).or_default();
            e.0 += b.count;
            e.1.extend(b.users.iter().map(String::as_str));
            e.2 += b
                .props
                .get("duration_ms")
                .map_or(0.0, |v| v.iter().sum::<f64>());
        }
        let got_total: f64 = count.values().sum();
        let want_total: u64 = mine.values().map(|w| w.0).sum();
        if got_total as u64 != want_total {
            return Err(format!(
                "{base} {tenant}: total {got_total} != {want_total}"
            ));
        }
        for (k, (n, u, s)) in &mine {
            let got = count.get(k).copied().unwrap_or(0.0);
            if got as u64 != *n {
                return Err(format!("{base} {tenant} {k:?}: count {got} != {n}"));
            }
            let got = users.get(k).copied().unwrap_or(0.0);
            if got as usize != u.len() {
                return Err(format!("{base} {tenant} {k:?}: users {got} != {}", u.len()));
            }
            let got = sum.get(k).copied().unwrap_or(0.0);
            if (got - s).abs() > 1e-6 * s.abs().max(1.0) {
                return Err(format!("{base} {tenant} {k:?}: sum {got} != {s}"));
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_survive_kill_9_with_every_bucket_exact_on_every_node() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    if std::env::var_os("TALLY_KEEP_TEST_DIR").is_some() {
        eprintln!("test dir: {}", tmp.path().display());
    }
    let tmp = scopeguard_keep(tmp);
    let tag = format!("k{}", std::process::id());
    let c = reqwest::Client::new();
    let mut nodes = three_nodes(tmp.path(), &broker, &tag);
    start_all(&mut nodes, &c, &[]).await;

    let seed = 7;
    let mut g = Generator::new(GenConfig {
        seed,
        tenants: 2,
        users: 200,
        start_ms: Some(T0),
        events_per_sec: 20.0,
        disorder: 0.10,
        late: 0.0,
        duplicate: 0.08,
        malformed: 0.02,
    });
    let lines: Vec<_> = (0..4000).map(|_| g.next_line()).collect();
    let want = expected(&lines);
    let batches: Arc<Vec<String>> = Arc::new(
        lines
            .chunks(40)
            .map(|ch| ch.iter().map(|(l, _)| format!("{l}\n")).collect())
            .collect(),
    );
    let pending = Arc::new(Mutex::new((0..batches.len()).collect::<VecDeque<_>>()));
    let bases: Vec<String> = nodes.iter().map(Node::base).collect();
    let feeder = tokio::spawn(feed(bases.clone(), batches.clone(), pending.clone()));

    // Kill a random node every so often and bring it back on its data dir.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kills = 0;
    while !feeder.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        let i = rng.random_range(0..nodes.len());
        nodes[i].kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..800))).await;
        nodes[i].spawn();
        nodes[i].wait_ready(&c).await;
        if kills >= 8 {
            break;
        }
    }
    feeder.await.expect("feed");

    // Every node converges to the exact totals.
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in &nodes {
        loop {
            match exact_on(&c, &n.base(), &want).await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    let warnings = warnings(&nodes);
                    let mut statuses = Vec::new();
                    for n in &nodes {
                        let st = get(&c, format!("{}/api/v1/status", n.base())).await;
                        statuses.push(format!("{}: {} {}", n.name, st["cluster"], st["events"]));
                    }
                    panic!(
                        "after {kills} kills, not exact: {e}\n{warnings}\n{}",
                        statuses.join("\n")
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    // Late events: ten days before the stream, in sessions the stream
    // used (so their partitions hold the tenant's clock): counted by none.
    let late = common::late_lines(&lines, 6);
    let r = c
        .post(format!("{}/api/v1/events", nodes[0].base()))
        .header("content-type", "application/x-ndjson")
        .body(late.join("\n"))
        .send()
        .await
        .expect("late batch");
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &nodes {
        loop {
            let st = get(&c, format!("{}/api/v1/status", n.base())).await;
            if st["events"]["late"] == 6 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: late not reported: {st}",
                n.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        exact_on(&c, &n.base(), &want)
            .await
            .expect("late events counted nowhere");
        // Every node lists them, with the watermark that judged them.
        loop {
            let v = get(
                &c,
                format!("{}/api/v1/dlq?kind=late&tenant=tenant0&limit=100", n.base()),
            )
            .await;
            let entries = v["entries"].as_array().cloned().unwrap_or_default();
            if entries.len() == 6 {
                let ids: std::collections::BTreeSet<String> = entries
                    .iter()
                    .filter_map(|e| e["event"]["event_id"].as_str().map(String::from))
                    .collect();
                assert_eq!(ids.len(), 6, "{v}");
                assert!(ids.iter().all(|i| i.starts_with("late-")), "{v}");
                let reason = entries[0]["reason"].as_str().unwrap_or_default();
                assert!(reason.contains("watermark"), "{v}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: late DLQ lists {}: {v}",
                n.name,
                entries.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Raw events: every node's SQL sees every kept event of every
    // partition once (sealed into the shared archive within seconds),
    // the late ones included.
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &nodes {
        for (tenant, late) in [("tenant0", 6u64), ("tenant1", 0)] {
            let want_rows: u64 = want
                .buckets
                .iter()
                .filter(|((t, _, _), _)| t == tenant)
                .map(|(_, b)| b.count)
                .sum::<u64>()
                + late;
            loop {
                let r = common::rows(
                    &c,
                    &n.base(),
                    tenant,
                    "SELECT count(*), count(DISTINCT event_id) FROM events",
                )
                .await;
                let (rows, distinct) = (r[0][0].as_u64(), r[0][1].as_u64());
                if rows == Some(want_rows) {
                    assert_eq!(distinct, rows, "{}: duplicate raw rows", n.name);
                    break;
                }
                assert!(
                    rows.unwrap_or(0) <= want_rows && Instant::now() < deadline,
                    "{} {tenant}: {rows:?} raw rows, want {want_rows}\n{}",
                    n.name,
                    warnings(&nodes)
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    let files = common::files_under(&tmp.path().join("archive"));
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/kafka-ev-")),
        "{files:?}"
    );
    // Replaying them on one node applies each once, through its
    // partition's owner; every node then counts them in their minute and
    // lists them as replayed; a second replay applies nothing.
    let replay = |base: String| {
        let c = c.clone();
        async move {
            let r = c
                .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=tenant0"))
                .send()
                .await
                .expect("replay");
            let code = r.status().as_u16();
            let v: serde_json::Value =
                serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
            (code, v)
        }
    };
    let (code, v) = replay(nodes[2].base()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["applied"], 6, "{v}");
    let late_minute = T0 - 10 * 86_400_000;
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &nodes {
        loop {
            let url = format!(
                "{}/api/v1/metrics?metric=count&start={}&end={}&granularity=1m&group_by=event_type&tenant=tenant0",
                n.base(),
                late_minute,
                late_minute + 60_000
            );
            let got = common::points(&get(&c, url).await.clone());
            let listed = get(
                &c,
                format!("{}/api/v1/dlq?kind=late&tenant=tenant0&limit=100", n.base()),
            )
            .await;
            let replayed = listed["entries"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|e| e["replayed"] == true).count());
            if got.values().sum::<f64>() == 6.0 && replayed == 6 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: after the replay {got:?}, {replayed} listed as replayed",
                n.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        exact_on(&c, &n.base(), &want)
            .await
            .expect("the stream's buckets are untouched by the replay");
    }
    let (code, v) = replay(nodes[0].base()).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["applied"], 0, "{v}");

    // The cluster as the status and metrics endpoints show it.
    let st = get(&c, format!("{}/api/v1/status", nodes[1].base())).await;
    let cluster = &st["cluster"];
    assert_eq!(cluster["mode"], "kafka");
    assert_eq!(cluster["node"], "n1");
    let members: Vec<&str> = cluster["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    assert!(
        members.iter().all(|m| ["n0", "n1", "n2"].contains(m)),
        "{members:?}"
    );
    assert_eq!(
        cluster["partitions"].as_array().map(Vec::len),
        Some(4),
        "{cluster}"
    );
    let prom = common::prom(&c, &nodes[0].base()).await;
    assert!(
        prom.contains("tally_consumer_lag_seconds{partition="),
        "{prom}"
    );
    // Also under the name the API promises, which alert rules watch.
    assert!(prom.contains("\nconsumer_lag_seconds{partition="), "{prom}");
    assert!(prom.contains("\nconsumer_lag_records{partition="), "{prom}");
    let r = c
        .post(format!("{}/api/v1/alerts?tenant=tenant0", nodes[1].base()))
        .body(
            serde_json::json!({"name": "lagging", "metric": "consumer_lag_seconds",
                "granularity": "1m", "detector": {"kind": "threshold", "op": ">", "value": 30},
                "for": "5m"})
            .to_string(),
        )
        .send()
        .await
        .expect("rule");
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    assert!(prom.contains("tally_kafka_transactions_total{result=\"commit\"}"));
    assert!(prom.contains("tally_freshness_seconds"), "{prom}");
    // Where freshness goes: reaching a worker, its transaction, and the
    // views' reads of what committed, observed on the nodes that did them.
    let mut proms = Vec::new();
    for n in &nodes {
        proms.push(common::prom(&c, &n.base()).await);
    }
    for name in [
        "tally_kafka_consume_delay_seconds",
        "tally_kafka_commit_seconds",
        "tally_kafka_view_delay_seconds",
    ] {
        let count = format!("{name}_count ");
        let observed: u64 = proms.iter().map(|p| common::counter(p, &count)).sum();
        assert!(observed > 0, "{name} observed nothing: {}", proms[0]);
    }
    // Every node shows the lag of every partition, not only its own: all
    // at 0 once the others' commits (refreshed every second) are seen.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let prom = common::prom(&c, &nodes[0].base()).await;
        let lagging: Vec<u32> = (0..4)
            .filter(|p| {
                !prom.contains(&format!(
                    "tally_consumer_lag_records{{partition=\"{p}\"}} 0\n"
                ))
            })
            .collect();
        if lagging.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions {lagging:?} lag: {prom}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every node lists every malformed line (through the malformed
    // topic); a batch sent twice after a kill may file its lines twice
    // (HTTP ingest files them at least once), never fewer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut counts = Vec::new();
    for n in &nodes {
        loop {
            let got = malformed_listed(&c, &n.base()).await;
            if got >= want.rejected as usize {
                counts.push(got);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: malformed DLQ lists {got}, want at least {}",
                n.name,
                want.rejected
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(want.rejected > 0);
    assert!(
        counts.windows(2).all(|w| w[0] == w[1]),
        "nodes list different malformed DLQs: {counts:?}"
    );
}

/// Malformed-DLQ entries a node lists over the test tenants.
async fn malformed_listed(c: &reqwest::Client, base: &str) -> usize {
    let mut n = 0;
    for t in ["tenant0", "tenant1", "default"] {
        let v = get(
            c,
            format!("{base}/api/v1/dlq?kind=malformed&limit=10000&tenant={t}"),
        )
        .await;
        n += v["entries"].as_array().map_or(0, Vec::len);
    }
    n
}

/// The broker stops for a while: ingest answers 503 with Retry-After
/// (nothing acknowledged that the broker did not take), and once it is
/// back the node resumes; every acknowledged event counts exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_503_then_every_acknowledged_event_counts_once() {
    let mut broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tag = format!("o{}", std::process::id());
    let mut node = Node::new("solo", tmp.path(), broker.brokers(), &tag);
    node.spawn_with(&[("TALLY__KAFKA__PRODUCE_TIMEOUT", "2s")]);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    node.wait_ready(&c).await;
    let event = |i: usize| {
        format!(
            r#"{{"event_id":"o-{i}","event_type":"click","timestamp":"{}","tenant":"tenant0","user_id":"u{i}"}}"#,
            fmt_bucket(T0 + i as i64 * 100)
        )
    };
    let post = |body: String| {
        let c = c.clone();
        let url = format!("{}/api/v1/events", node.base());
        async move {
            c.post(url)
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .expect("answer")
        }
    };
    let first: Vec<String> = (0..50).map(event).collect();
    assert_eq!(post(first.join("\n")).await.status(), 200);

    broker.stop();
    let second: Vec<String> = (50..100).map(event).collect();
    let r = post(second.join("\n")).await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    assert!(r.headers().contains_key("retry-after"));
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("Kafka broker"), "{text}");

    broker.restart();
    // The client retries what was refused until it is taken.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = post(second.join("\n")).await;
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never accepted again: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = fetch(&c, &node.base(), "tenant0", "count", "1h").await;
        let total: f64 = count.values().sum();
        if total == 100.0 {
            break;
        }
        assert!(
            Instant::now() < deadline && total <= 100.0,
            "after the outage: {total} events counted, want 100\n{}",
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `tally gen --kafka` produces straight to the events topic, as any other
/// producer would: the node counts exactly what the generator made
/// (duplicates once, malformed lines in the DLQ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gen_produces_to_the_topic_and_the_node_counts_it_exactly() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tag = format!("g{}", std::process::id());
    let mut node = Node::new("solo", tmp.path(), broker.brokers(), &tag);
    // No seal within the test: only the view's progress may refresh
    // cached SQL results.
    node.spawn_with(&[("TALLY__KAFKA__SEAL_INTERVAL", "1h")]);
    let c = reqwest::Client::new();
    node.wait_ready(&c).await;
    let out = Command::new(BIN)
        .args([
            "gen",
            "--kafka",
            &broker.brokers(),
            "--topic",
            &format!("ev-{tag}"),
        ])
        .args([
            "--events",
            "3000",
            "--seed",
            "11",
            "--tenants",
            "2",
            "--users",
            "200",
        ])
        .args([
            "--start",
            &T0.to_string(),
            "--events-per-sec",
            "20",
            "--late",
            "0",
        ])
        .args([
            "--duplicate",
            "0.05",
            "--malformed",
            "0.02",
            "--batch",
            "200",
        ])
        .output()
        .expect("tally gen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("produced 3000 events"));
    let mut g = Generator::new(GenConfig {
        seed: 11,
        tenants: 2,
        users: 200,
        start_ms: Some(T0),
        events_per_sec: 20.0,
        disorder: 0.05,
        late: 0.0,
        duplicate: 0.05,
        malformed: 0.02,
    });
    let lines: Vec<_> = (0..3000).map(|_| g.next_line()).collect();
    let want = expected(&lines);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match exact_on(&c, &node.base(), &want).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "{e}\n{}", node.logs()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // SQL over the rollups sees what the metrics API sees, and keeps
    // seeing it as the view moves (its result cache follows the view).
    let total: u64 = want
        .buckets
        .iter()
        .filter(|((t, _, _), _)| t == "tenant0")
        .map(|(_, b)| b.count)
        .sum();
    let q = "SELECT sum(count) FROM rollups_1m";
    let sum = |r: Vec<Vec<serde_json::Value>>| r[0][0].as_u64().unwrap_or(0);
    assert_eq!(
        sum(common::rows(&c, &node.base(), "tenant0", q).await),
        total
    );
    common::post_ndjson(
        &c,
        &node.base(),
        format!(
            r#"{{"event_id":"more-1","event_type":"click","timestamp":"{}","tenant":"tenant0"}}"#,
            fmt_bucket(T0)
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sum(common::rows(&c, &node.base(), "tenant0", q).await) != total + 1 {
        assert!(
            Instant::now() < deadline,
            "SQL over rollups_1m never saw the new event"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Malformed messages of the topic are filed exactly once, in the
    // transaction of their partition: one entry per rejected event (a
    // message that is an array of numbers files each element).
    let want_entries: usize = lines
        .iter()
        .filter(|(_, k)| *k == tally_cli::generator::Kind::Malformed)
        .map(
            |(l, _)| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(serde_json::Value::Array(a)) => a.len().max(1),
                _ => 1,
            },
        )
        .sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = malformed_listed(&c, &node.base()).await;
        if got == want_entries {
            break;
        }
        assert!(
            got < want_entries && Instant::now() < deadline,
            "malformed DLQ lists {got}, want {want_entries}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Alerts once per cluster: a rule made on one node is on every node; of
/// three nodes exactly one (the holder of the alert lease) evaluates and
/// notifies, so an episode pages once; the leader killed with SIGKILL
/// mid-episode comes back from the alert log and neither repeats the
/// firing nor misses the resolution; followers show the same states and
/// history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_page_once_per_episode_through_a_leader_kill() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tmp = scopeguard_keep(tmp);
    let tag = format!("a{}", std::process::id());
    let mut nodes = three_nodes(tmp.path(), &broker, &tag);
    let env = [
        ("TALLY__STREAM__WATERMARK_BOUND", "5s"),
        ("TALLY__ALERTS__BACKOFF", "100ms"),
    ];
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    start_all(&mut nodes, &c, &env).await;
    let hook = common::Hook::start(0).await;
    let rule = serde_json::json!({"name": "error-spike", "metric": "count",
        "event_type": ["error"], "granularity": "1m",
        "detector": {"kind": "threshold", "op": ">", "value": 5},
        "resolve_after": "1m", "notify": [{"webhook": hook.url}]});
    let r = c
        .post(format!("{}/api/v1/alerts?tenant=acme", nodes[1].base()))
        .body(rule.to_string())
        .send()
        .await
        .expect("create rule");
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    // Every node has the rule.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        loop {
            let v = get(&c, format!("{}/api/v1/alerts?tenant=acme", n.base())).await;
            if v["alerts"].as_array().is_some_and(|a| a.len() == 1) {
                break;
            }
            assert!(Instant::now() < deadline, "{}: no rule: {v}", n.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // One session: one partition holds the tenant's clock.
    let ev = |id: &str, ty: &str, ts: i64| {
        serde_json::json!({"event_id": id, "event_type": ty, "timestamp": ts,
            "user_id": "u1", "session_id": "s1", "tenant": "acme"})
    };
    const M: i64 = 60_000;
    let mut evs: Vec<serde_json::Value> = (0..2)
        .map(|i| ev(&format!("a{i}"), "error", T0 + 1000 * i))
        .collect();
    evs.extend((0..10).map(|i| ev(&format!("b{i}"), "error", T0 + M + 1000 * i)));
    evs.push(ev("i1", "info", T0 + 2 * M + 30_000));
    common::post_ndjson(&c, &nodes[2].base(), common::ndjson(&evs)).await;
    let calls = hook.wait_ok(1, Duration::from_secs(60)).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].1["status"], "firing");
    assert_eq!(calls[0].1["value"], 10);

    // Exactly one leader; every node shows the rule firing.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let mut leaders = Vec::new();
        let mut firing = 0;
        for (i, n) in nodes.iter().enumerate() {
            let st = get(&c, format!("{}/api/v1/status", n.base())).await;
            if st["cluster"]["alerts_leader"] == true {
                leaders.push(i);
            }
            let v = get(&c, format!("{}/api/v1/alerts?tenant=acme", n.base())).await;
            if v["alerts"][0]["state"] == "firing" {
                firing += 1;
            }
        }
        assert!(leaders.len() <= 1, "two leaders: {leaders:?}");
        if leaders.len() == 1 && firing == nodes.len() {
            break leaders[0];
        }
        assert!(
            Instant::now() < deadline,
            "leaders {leaders:?}, {firing} nodes show the rule firing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The delivery's outcome reaches the alert log within a loop of the
    // alert thread; then the leader dies and comes back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nodes[leader].kill();
    nodes[leader].spawn_with(&env);
    nodes[leader].wait_ready(&c).await;

    // Quiet minutes 2 and 3, closed by an event at 12:04:30: resolved.
    let evs = vec![
        ev("c1", "error", T0 + 2 * M + 40_000),
        ev("d1", "error", T0 + 3 * M + 1000),
        ev("i2", "info", T0 + 4 * M + 30_000),
    ];
    common::post_ndjson(&c, &nodes[(leader + 1) % 3].base(), common::ndjson(&evs)).await;
    let calls = hook.wait_ok(2, Duration::from_secs(60)).await;
    // Nothing more comes: no second leader, no repeat.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls_after = hook.calls.lock().clone();
    assert_eq!(calls_after.len(), calls.len());
    let statuses: Vec<&str> = calls
        .iter()
        .map(|(_, b)| b["status"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        statuses,
        vec!["firing", "resolved"],
        "{calls:?}\n{}",
        nodes[leader].logs()
    );
    assert_eq!(calls[0].1["episode_start"], calls[1].1["episode_start"]);
    // Followers show the same history as the leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        loop {
            let h = get(
                &c,
                format!("{}/api/v1/alerts/history?tenant=acme", n.base()),
            )
            .await;
            let delivered = h["history"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|x| x["to"] == "delivered").count());
            if delivered == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{}: history {h}", n.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Rollup retention through failures: traffic weeks old (every minute of
/// it behind the partitions' cuts, so counted as deltas) fed over HTTP to three nodes while they are killed with
/// SIGKILL and restarted; every node folds the minutes into hours and
/// every hour is exact on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_fold_old_minutes_into_exact_hours_through_kill_9() {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tag = format!("f{}", std::process::id());
    let retention = [("TALLY__RETENTION__MINUTE_ROLLUPS", "7d")];
    let c = reqwest::Client::new();
    let mut nodes = three_nodes(tmp.path(), &broker, &tag);
    start_all(&mut nodes, &c, &retention).await;
    // Straddling an hour; dense in event time, so a batch sent again late
    // after a kill is not behind the allowed lateness (as in the test
    // above).
    let mut g = Generator::new(GenConfig {
        seed: 23,
        tenants: 2,
        users: 100,
        start_ms: Some(T0 + 58 * 60_000),
        events_per_sec: 20.0,
        disorder: 0.10,
        late: 0.0,
        duplicate: 0.08,
        malformed: 0.02,
    });
    let lines: Vec<_> = (0..3000).map(|_| g.next_line()).collect();
    let want = expected(&lines);
    let batches: Arc<Vec<String>> = Arc::new(
        lines
            .chunks(40)
            .map(|ch| ch.iter().map(|(l, _)| format!("{l}\n")).collect())
            .collect(),
    );
    let pending = Arc::new(Mutex::new((0..batches.len()).collect::<VecDeque<_>>()));
    let bases: Vec<String> = nodes.iter().map(Node::base).collect();
    let feeder = tokio::spawn(feed(bases, batches, pending));
    let mut rng = StdRng::seed_from_u64(23);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1000))).await;
        let i = rng.random_range(0..nodes.len());
        nodes[i].kill();
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..500))).await;
        nodes[i].spawn_with(&retention);
        nodes[i].wait_ready(&c).await;
    }
    feeder.await.expect("feed");
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in &nodes {
        loop {
            match exact_at(&c, &n.base(), &want, "1h").await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    let st = get(&c, format!("{}/api/v1/status", n.base())).await;
                    panic!("{}: {e}; events {}\n{}", n.name, st["events"], n.logs())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        // The minutes are folded: a minute answer says from when it has them.
        let v = get(
            &c,
            format!(
                "{}/api/v1/metrics?metric=count&granularity=1m&start={}&end={}&tenant=tenant0",
                n.base(),
                T0,
                T0 + 3_600_000
            ),
        )
        .await;
        assert!(v["downsampled_before"].is_string(), "{}: {v}", n.name);
    }
}

/// (status, JSON body) of a request.
async fn answer(r: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let r = r.send().await.expect("answer");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// (status, body) of a GET once it answers 200 (another node applies a
/// registration within the registry log's read pause), up to 10 s.
async fn get_when_there(c: &reqwest::Client, url: String) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = answer(c.get(&url)).await;
        if got.0 == 200 || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The schema registry is one for the cluster: a schema registered
/// through one node is there on the others, a breaking change is refused
/// by any, two nodes registering under one subject at once agree on the
/// versions and ids, ingest on any node checks against it, and a node
/// back from `kill -9` rebuilds it from the registry topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_one_for_the_cluster_and_any_node_answers() {
    use serde_json::json;
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tag = format!("r{}", std::process::id());
    let mut nodes: Vec<Node> = ["a", "b"]
        .iter()
        .map(|n| Node::new(n, tmp.path(), broker.brokers(), &tag))
        .collect();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    for n in &mut nodes {
        n.spawn();
    }
    for n in &mut nodes {
        n.wait_ready(&c).await;
    }
    let (a, b) = (nodes[0].base(), nodes[1].base());
    let schema = |fields: &str| {
        json!({"schema": format!(r#"{{"type":"record","name":"P","fields":[{fields}]}}"#)})
            .to_string()
    };
    let url = |base: &str, path: &str| format!("{base}/api/v1/registry{path}");
    let v1 = schema(r#"{"name":"url","type":"string"}"#);
    let (s, v) = answer(c.post(url(&a, "/subjects/page_view/versions")).body(v1)).await;
    assert_eq!(
        (s, v["id"].as_u64(), v["version"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    // Read on the other node: the same subject, version and id.
    let (s, v) = get_when_there(&c, url(&b, "/subjects/page_view/versions/1")).await;
    assert_eq!((s, v["id"].as_u64()), (200, Some(1)), "{v}");
    // A breaking change is refused by either node.
    let bad = schema(r#"{"name":"url","type":"string"},{"name":"n","type":"int"}"#);
    let (s, v) = answer(c.post(url(&b, "/subjects/page_view/versions")).body(bad)).await;
    assert_eq!((s, v["error_code"].as_u64()), (409, Some(409)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("field `n`"), "{v}");
    // Two nodes register different schemas under one subject at once:
    // both succeed, in one order, and both nodes agree.
    let x1 = schema(r#"{"name":"a","type":["null","string"],"default":null}"#);
    let x2 = schema(r#"{"name":"b","type":["null","long"],"default":null}"#);
    let (ra, rb) = tokio::join!(
        answer(c.post(url(&a, "/subjects/x/versions")).body(x1)),
        answer(c.post(url(&b, "/subjects/x/versions")).body(x2)),
    );
    assert_eq!((ra.0, rb.0), (200, 200), "{ra:?} {rb:?}");
    let mut got: Vec<u64> = [&ra.1, &rb.1]
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![1, 2]);
    for base in [&a, &b] {
        for r in [&ra.1, &rb.1] {
            let (s, v) = get_when_there(&c, url(base, &format!("/schemas/ids/{}", r["id"]))).await;
            assert_eq!((s, &v["schema"]), (200, &r["schema"]), "{base}: {v}");
        }
    }
    // Ingest on either node checks against the registry.
    let post = |ev: serde_json::Value| {
        answer(
            c.post(format!("{b}/api/v1/events"))
                .header("content-type", "application/json")
                .body(ev.to_string()),
        )
    };
    let ev = json!({"event_id": "e1", "event_type": "page_view", "timestamp": fmt_bucket(T0), "properties": {"url": 7}});
    let (s, v) = post(ev).await;
    assert_eq!((s, v["rejected"].as_u64()), (200, Some(1)), "{v}");
    assert!(
        v["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("properties.url: expected string"),
        "{v}"
    );
    // A valid one keeps the version it was checked against, in the raw
    // rows every node serves.
    let ev = json!({"event_id": "e2", "event_type": "page_view", "timestamp": fmt_bucket(T0), "properties": {"url": "/a"}});
    let (s, v) = post(ev).await;
    assert_eq!((s, v["accepted"].as_u64()), (200, Some(1)), "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = "SELECT schema_version FROM events WHERE event_id = 'e2'";
        let r = common::rows(&c, &a, "default", q).await;
        if !r.is_empty() {
            assert_eq!(r, vec![vec![json!(1)]]);
            break;
        }
        assert!(Instant::now() < deadline, "e2 never reached the raw rows");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A node back from kill -9 rebuilds the registry from the topic.
    nodes[0].kill();
    nodes[0].spawn();
    nodes[0].wait_ready(&c).await;
    let (s, v) = answer(c.get(url(&nodes[0].base(), "/subjects"))).await;
    assert_eq!((s, v), (200, json!(["page_view", "x"])));
}

/// One node on a broker of its own, started with `env` (its topics and
/// group named from `tag` and the process), with a client; ready.
async fn solo_node(
    tag: &str,
    env: &[(&str, &str)],
) -> (Broker, tempfile::TempDir, Node, reqwest::Client) {
    let broker = Broker::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tag = format!("{tag}{}", std::process::id());
    let mut node = Node::new("solo", tmp.path(), broker.brokers(), &tag);
    node.spawn_with(env);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    node.wait_ready(&c).await;
    (broker, tmp, node, c)
}

/// GETs `url` until `done` holds for the answer (60 s at most): the answer.
async fn get_until(
    c: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(c, url.to_string()).await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kafka mode records corrections too: a late event into a minute its
/// partition had closed is listed by `GET /api/v1/changes` with the
/// bucket's old and new values; events into open minutes are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_listed_in_kafka_mode() {
    use serde_json::json;
    let (_broker, _tmp, node, c) = solo_node(
        "c",
        &[
            ("TALLY__STREAM__WATERMARK_BOUND", "5s"),
            ("TALLY__STREAM__ALLOWED_LATENESS", "5m"),
        ],
    )
    .await;
    let base = node.base();
    let m = 60_000i64;
    let t0 = (tally_types::Clock::system().now_ms() / m - 10) * m;
    // One session: one partition, applied in the order sent.
    let ev = |id: &str, ts: i64| {
        json!({"event_id": id, "event_type": "click", "timestamp": ts, "user_id": id,
               "session_id": "s1", "tenant": "acme"})
    };
    let send =
        |events: Vec<serde_json::Value>| common::post_ndjson(&c, &base, common::ndjson(&events));
    let mut first = Vec::new();
    for minute in 0..4 {
        for i in 0..2 {
            first.push(ev(
                &format!("c{minute}-{i}"),
                t0 + minute * m + 1000 * (i + 1),
            ));
        }
    }
    first.push(ev("tick", t0 + 3 * m + 30_000));
    send(first).await;
    let minute_1 = format!(
        "{base}/api/v1/metrics?metric=count&granularity=1m&tenant=acme&start={}&end={}",
        t0 + m,
        t0 + 2 * m
    );
    get_until(&c, &minute_1, "minute 1 counted", |v| {
        v["series"][0]["points"][0][1].as_u64() == Some(2)
    })
    .await;
    // The first transaction closed minutes 0..2; a late click into minute
    // 1 (within the lateness) and one into the open minute 3.
    send(vec![
        ev("late1", t0 + m + 5000),
        ev("open", t0 + 3 * m + 40_000),
    ])
    .await;
    let url = format!("{base}/api/v1/changes?since=0&tenant=acme");
    let v = get_until(&c, &url, "a change listed", |v| {
        !v["changes"].as_array().unwrap().is_empty()
    })
    .await;
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{v}");
    let ch = &changes[0];
    assert_eq!(
        (
            ch["key"]["bucket"].as_str().unwrap(),
            ch["old"]["count"].as_u64(),
            ch["new"]["count"].as_u64()
        ),
        (fmt_bucket(t0 + m).as_str(), Some(2), Some(3)),
        "{v}"
    );
}

/// A late event that grows a closed session: the owner of its partition
/// tells the change in its transaction, and the node lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_session_changes_are_listed_in_kafka_mode() {
    use serde_json::json;
    let (_broker, _tmp, node, c) = solo_node(
        "s",
        &[
            // One partition: the session and the events that move its clock meet.
            ("TALLY__KAFKA__PARTITIONS", "1"),
            ("TALLY__SESSIONS__GAP", "1m"),
            ("TALLY__STREAM__WATERMARK_BOUND", "5s"),
            ("TALLY__STREAM__ALLOWED_LATENESS", "10m"),
        ],
    )
    .await;
    let base = node.base();
    let m = 60_000i64;
    let t0 = (tally_types::Clock::system().now_ms() / m - 20) * m;
    let ev = |id: &str, ts: i64, session: &str, user: &str| {
        json!({"event_id": id, "event_type": "click", "timestamp": ts, "user_id": user,
               "session_id": session, "tenant": "acme", "properties": {"page": id}})
    };
    let send =
        |events: Vec<serde_json::Value>| common::post_ndjson(&c, &base, common::ndjson(&events));
    // Session s1 (two events), then another session five minutes on: s1
    // is closed (the gap is a minute) once that event moved the clock.
    send(vec![
        ev("a", t0 + 1000, "s1", "u1"),
        ev("b", t0 + 10_000, "s1", "u1"),
        ev("tick", t0 + 5 * m, "s9", "u9"),
    ])
    .await;
    let url = format!(
        "{base}/api/v1/metrics?metric=count&granularity=1h&tenant=acme&start={}&end={}",
        t0,
        t0 + 10 * m
    );
    get_until(&c, &url, "the three events counted", |v| {
        let total: u64 = v["series"][0]["points"]
            .as_array()
            .map(|p| p.iter().filter_map(|x| x[1].as_u64()).sum())
            .unwrap_or(0);
        total == 3
    })
    .await;
    // A late event of s1 (within the lateness) makes it longer.
    send(vec![ev("late", t0 + 20_000, "s1", "u1")]).await;
    let url = format!("{base}/api/v1/changes?since=0&tenant=acme");
    let v = get_until(&c, &url, "a session change listed", |v| {
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ch| ch["kind"] == "session")
    })
    .await;
    let sessions: Vec<&serde_json::Value> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|ch| ch["kind"] == "session")
        .collect();
    assert_eq!(sessions.len(), 1, "{v}");
    let ch = sessions[0];
    assert_eq!(ch["key"]["session_id"], "s1", "{v}");
    assert_eq!(ch["key"]["user_id"], "u1", "{v}");
    assert_eq!(
        (
            ch["old"]["events"].as_u64(),
            ch["new"]["events"].as_u64(),
            ch["old"]["end"].as_str(),
            ch["new"]["end"].as_str(),
            ch["new"]["last_page"].as_str(),
        ),
        (
            Some(2),
            Some(3),
            Some(fmt_bucket(t0 + 10_000).as_str()),
            Some(fmt_bucket(t0 + 20_000).as_str()),
            Some("late"),
        ),
        "{v}"
    );
    // The closed minute's bucket changed too, and the other session did not.
    assert!(
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ch| ch["kind"] == "bucket" && ch["new"]["count"] == 3),
        "{v}"
    );
}

/// An event too large for one record of the events topic is refused on
/// its own, naming its size and why (before, the producer refused it at
/// every try and the client got a 503 to retry forever); the others of
/// the body are taken and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_a_kafka_record_is_refused_alone() {
    use serde_json::json;
    let (_broker, _tmp, node, c) = solo_node("big", &[]).await;
    let base = node.base();
    let now = tally_types::Clock::system().now_ms();
    let ev = |id: &str, blob: usize| {
        json!({"event_id": id, "event_type": "click", "timestamp": now - 1000, "tenant": "acme",
               "user_id": "u1", "properties": {"blob": "x".repeat(blob)}})
    };
    let body = common::ndjson(&[ev("small", 10), ev("big", 1_200_000), ev("fits", 200_000)]);
    let (status, v) = answer(
        c.post(format!("{base}/api/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(body),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{v}"
    );
    let e = &v["errors"][0];
    assert_eq!(e["index"], 1, "{v}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("1200") && msg.contains("Kafka mode"), "{msg}");
    let url = format!("{base}/api/v1/metrics?metric=count&granularity=1h&tenant=acme");
    get_until(&c, &url, "both events counted", |v| {
        v["series"][0]["points"]
            .as_array()
            .is_some_and(|p| p.iter().map(|x| x[1].as_u64().unwrap_or(0)).sum::<u64>() == 2)
    })
    .await;
}
