//! One behavioural suite for the log under the pipeline, run against both
//! backends: the embedded log and Kafka (a real Kafka-protocol broker).
//! Each scenario drives `tally_runtime::pipeline` exactly as the HTTP layer
//! does (parse, `prepare_write`, the write channel, the outcome) and reads
//! the node's rollups and DLQ directly, so what it proves holds for every
//! endpoint on top, whichever log is underneath:
//!
//! - messy input (duplicates, disorder, malformed) counts every event once,
//!   every minute bucket equal to an independent computation;
//! - events past the allowed lateness are counted by no bucket and listed
//!   in the late DLQ, and malformed ones in the malformed DLQ;
//! - a node stopped mid-stream and started again on its state resumes
//!   where it stopped: the whole input sent again (every event before the
//!   stop now a duplicate) changes nothing, the rest counts once.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Expected, T0, expected, fmt_bucket};
use tally_cli::generator::{GenConfig, Generator, Kind};
use tally_ingest::{Format, Parser, Tenancy};
use tally_kafka::testing::Broker;
use tally_runtime::Config;
use tally_runtime::config::KafkaSection;
use tally_runtime::pipeline::{Pipeline, prepare_write};
use tally_stream::DlqKind;
use tally_types::Clock;
use tally_types::time::{HOUR_MS, Millis, align_down};

/// The log under test.
enum Backend {
    Embedded,
    /// Topics, group and node named after `tag` on the shared broker.
    Kafka {
        brokers: String,
        tag: String,
    },
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Kafka { .. } => "kafka",
        }
    }

    fn config(&self, dir: &Path) -> Config {
        self.config_with(dir, |_| {})
    }

    fn config_with(&self, dir: &Path, tweak: impl FnOnce(&mut Config)) -> Config {
        let mut cfg = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        cfg.log.partitions = 4;
        if let Backend::Kafka { brokers, tag } = self {
            cfg.kafka = Some(KafkaSection {
                brokers: brokers.clone(),
                group_id: format!("g-{tag}"),
                topic_events: format!("ev-{tag}"),
                topic_aggregates: format!("agg-{tag}"),
                topic_late: format!("late-{tag}"),
                node_id: "n1".into(),
                partitions: 4,
                commit_interval: "100ms".into(),
                seal_interval: "1s".into(),
                ..KafkaSection::default()
            });
        }
        tweak(&mut cfg);
        cfg
    }
}

/// Sends NDJSON batches the way `POST /api/v1/events` does; answers the
/// events accepted and rejected.
async fn submit(p: &Pipeline, lines: &[(String, Kind)], batch: usize) -> (u64, u64) {
    submit_as(p, lines, batch, false).await
}

/// As [`submit`]; `backfill`: as `?backfill=true` (judged by each tenant's
/// backfill clock).
async fn submit_as(
    p: &Pipeline,
    lines: &[(String, Kind)],
    batch: usize,
    backfill: bool,
) -> (u64, u64) {
    let (mut accepted, mut rejected) = (0, 0);
    for ch in lines.chunks(batch) {
        let body: String = ch.iter().map(|(l, _)| format!("{l}\n")).collect();
        let parsed = Parser::new(p.shared.partitions)
            .parse(body.as_bytes(), Format::Ndjson, Tenancy::Open)
            .expect("batch parses");
        accepted += parsed.accepted as u64;
        rejected += parsed.rejected_total as u64;
        let prepared = prepare_write(&p.shared, parsed, backfill, body.len());
        let Some((req, done)) = prepared.write else {
            continue;
        };
        assert!(p.tx.send(req).await.is_ok(), "the writer is gone");
        done.await
            .expect("writer answers")
            .expect("the log acknowledged the batch");
    }
    (accepted, rejected)
}

type Buckets = BTreeMap<(String, Millis, String), (u64, f64)>;

/// Count and sum of `duration_ms` of every minute bucket the node holds.
fn held(p: &Pipeline) -> Buckets {
    let store = p.shared.store.read();
    let mut out = Buckets::new();
    for (tenant, minute, b) in store.minutes_in(Millis::MIN, Millis::MAX) {
        for (ty, agg) in &b.types {
            if agg.count == 0 {
                continue;
            }
            let sum = agg.prop("duration_ms").map_or(0.0, |n| n.sum.value());
            out.insert(
                (tenant.to_string(), minute, ty.to_string()),
                (agg.count, sum),
            );
        }
    }
    out
}

fn wanted(want: &Expected) -> Buckets {
    want.buckets
        .iter()
        .map(|((t, m, ty), b)| {
            let sum = b.props.get("duration_ms").map_or(0.0, |d| d.iter().sum());
            ((t.clone(), *m, ty.clone()), (b.count, sum))
        })
        .collect()
}

/// Waits until every bucket equals the independent computation.
async fn exact(backend: &str, p: &Pipeline, want: &Expected) {
    let want = wanted(want);
    let close = |a: &Buckets| {
        a.len() == want.len()
            && a.iter().zip(&want).all(|((ka, (ca, sa)), (kb, (cb, sb)))| {
                ka == kb && ca == cb && (sa - sb).abs() <= sb.abs() * 1e-9
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = held(p);
        if close(&got) {
            return;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(10)
                .map(|((t, m, ty), v)| {
                    format!(
                        "{t} {} {ty}: want {v:?}, got {:?}",
                        fmt_bucket(*m),
                        got.get(&(t.clone(), *m, ty.clone()))
                    )
                })
                .collect();
            let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
            panic!(
                "{backend}: buckets differ from the oracle ({} held, {} wanted, {extra} unexpected): {diff:#?}",
                got.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dlq_lists(backend: &str, p: &Pipeline, tenant: &str, kind: DlqKind, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = p.shared.dlq.lock().list(tenant, kind, 10_000).len();
        if got == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: the {} DLQ of {tenant} lists {got} entries, want {n}",
            kind.as_str()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn input(seed: u64, n: usize) -> Vec<(String, Kind)> {
    input_at(seed, n, T0)
}

fn input_at(seed: u64, n: usize, start: Millis) -> Vec<(String, Kind)> {
    let mut g = Generator::new(GenConfig {
        seed,
        tenants: 2,
        users: 200,
        start_ms: Some(start),
        events_per_sec: 20.0,
        disorder: 0.10,
        late: 0.0,
        duplicate: 0.08,
        malformed: 0.03,
    });
    (0..n).map(|_| g.next_line()).collect()
}

async fn messy_input_counts_every_event_once(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().unwrap();
    let p = Pipeline::start(&backend.config(dir.path()), Clock::system()).expect("pipeline");
    let lines = input(11, 3000);
    let want = expected(&lines);
    for k in [Kind::Duplicate, Kind::Disordered, Kind::Malformed] {
        assert!(lines.iter().filter(|(_, x)| *x == k).count() > 30, "{k:?}");
    }
    let (accepted, rejected) = submit(&p, &lines, 150).await;
    assert_eq!(rejected, want.rejected, "{name}: rejected");
    assert_eq!(accepted + rejected, lines.len() as u64);
    exact(name, &p, &want).await;
    // Every rejected event is listed once, under its tenant (or the
    // default one when it names none).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed: usize = ["tenant0", "tenant1", tally_types::DEFAULT_TENANT]
            .iter()
            .map(|t| {
                p.shared
                    .dlq
                    .lock()
                    .list(t, DlqKind::Malformed, 10_000)
                    .len()
            })
            .sum();
        if listed as u64 == want.rejected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: the malformed DLQ lists {listed}, want {}",
            want.rejected
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let late: Vec<(String, Kind)> = common::late_lines(&lines, 6)
        .into_iter()
        .map(|l| (l, Kind::Late))
        .collect();
    submit(&p, &late, 100).await;
    dlq_lists(name, &p, "tenant0", DlqKind::Late, 6).await;
    // Counted by no bucket.
    exact(name, &p, &want).await;
    p.shutdown();
}

async fn a_restart_resumes_where_it_stopped(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().unwrap();
    let cfg = backend.config(dir.path());
    let lines = input(12, 3000);
    let (first, _) = lines.split_at(1700);
    let p = Pipeline::start(&cfg, Clock::system()).expect("pipeline");
    submit(&p, first, 100).await;
    exact(name, &p, &expected(first)).await;
    p.shutdown();

    let p = Pipeline::start(&cfg, Clock::system()).expect("pipeline restarts");
    // What it had before the stop, before anything new arrives.
    exact(name, &p, &expected(first)).await;
    // Everything again: the first part now duplicates, the rest new.
    submit(&p, &lines, 100).await;
    exact(name, &p, &expected(&lines)).await;
    p.shutdown();
}

/// History sent with `backfill` over minutes live traffic already counted
/// (and whose windows closed long ago) adds to them: a minute's value is
/// every event of it, whichever clock judged each.
async fn history_backfilled_over_counted_minutes_adds_to_them(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().unwrap();
    let p = Pipeline::start(&backend.config(dir.path()), Clock::system()).expect("pipeline");
    // Live: a few minutes from T0, then traffic half an hour later, which
    // closes them for good.
    let mut live = input_at(31, 1500, T0);
    live.extend(input_at(32, 400, T0 + 30 * 60_000));
    submit(&p, &live, 100).await;
    exact(name, &p, &expected(&live)).await;
    // History of the same minutes, sent as a backfill.
    let history = input_at(33, 1500, T0);
    submit_as(&p, &history, 100, true).await;
    let mut all = live.clone();
    all.extend(history);
    exact(name, &p, &expected(&all)).await;
    p.shutdown();
}

type Hours = BTreeMap<(String, Millis, String), (u64, f64)>;

fn by_hour(minutes: &Buckets) -> Hours {
    let mut out = Hours::new();
    for ((t, m, ty), (c, s)) in minutes {
        let e = out
            .entry((t.clone(), align_down(*m, HOUR_MS), ty.clone()))
            .or_default();
        e.0 += c;
        e.1 += s;
    }
    out
}

/// Count and sum of `duration_ms` per hour, over the hours the node
/// folded and the minutes it still holds.
fn held_hours(p: &Pipeline) -> Hours {
    let store = p.shared.store.read();
    let mut out = Hours::new();
    let tenants: Vec<String> = store.tenants().map(String::from).collect();
    for t in tenants {
        for (b, bucket) in store.tenant_buckets(&t, Millis::MIN, Millis::MAX, HOUR_MS) {
            for (ty, agg) in &bucket.types {
                let sum = agg.prop("duration_ms").map_or(0.0, |n| n.sum.value());
                let e = out
                    .entry((t.clone(), align_down(b, HOUR_MS), ty.to_string()))
                    .or_default();
                e.0 += agg.count;
                e.1 += sum;
            }
        }
    }
    out.retain(|_, (c, _)| *c > 0);
    out
}

/// Waits until every hour equals the oracle's and the node has folded
/// the minutes before `folded_to` into hours.
async fn exact_hours(backend: &str, p: &Pipeline, want: &Expected, folded_to: Millis) {
    let want = by_hour(&wanted(want));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = held_hours(p);
        let horizon = p.shared.store.read().downsampled_to();
        let same = got.len() == want.len()
            && got
                .iter()
                .zip(&want)
                .all(|((ka, (ca, sa)), (kb, (cb, sb)))| {
                    ka == kb && ca == cb && (sa - sb).abs() <= sb.abs() * 1e-9
                });
        if same && horizon >= folded_to {
            return;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(10)
                .map(|(k, v)| format!("{k:?}: want {v:?}, got {:?}", got.get(k)))
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .take(10)
                .collect();
            panic!(
                "{backend}: minutes folded to {} (want {}), hours differ from the oracle: {diff:#?}, not in the oracle: {extra:?}",
                fmt_bucket(horizon),
                fmt_bucket(folded_to)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rollup retention: minutes older than `retention.minute-rollups` are
/// folded into hours, every hour exact; history backfilled into a folded
/// hour adds to it; events for minutes just past the retention (folded on
/// one backend, not yet on the other) add to them; a restart answers the
/// same. The wall clock is injected and stands still, so the retention
/// boundary does not move under the test.
async fn old_minutes_fold_into_exact_hours(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().unwrap();
    let cfg = backend.config_with(dir.path(), |c| {
        c.retention.minute_rollups = "7d".into();
        c.retention.interval = "1s".into();
    });
    let clock = Clock::manual(Clock::system().now_ms());
    // Minutes before this are past the minute retention.
    let boundary = align_down(clock.now_ms() - 7 * 86_400_000, HOUR_MS);
    let p = Pipeline::start(&cfg, clock.clone()).expect("pipeline");
    // Weeks old: a few minutes at T0, then two hours later, which makes
    // T0's hour final everywhere.
    let mut lines = input_at(41, 1500, T0);
    lines.extend(input_at(42, 400, T0 + 2 * HOUR_MS));
    submit(&p, &lines, 100).await;
    exact_hours(name, &p, &expected(&lines), T0 + HOUR_MS).await;
    // History backfilled into the folded hour adds to it.
    let history = input_at(43, 600, T0);
    submit_as(&p, &history, 100, true).await;
    lines.extend(history);
    exact_hours(name, &p, &expected(&lines), T0 + HOUR_MS).await;
    // Live traffic, then history, half an hour before the boundary.
    let recent = boundary - 30 * 60_000;
    let live = input_at(44, 800, recent);
    submit(&p, &live, 100).await;
    lines.extend(live);
    let history = input_at(45, 400, recent);
    submit_as(&p, &history, 100, true).await;
    lines.extend(history);
    exact_hours(name, &p, &expected(&lines), boundary - HOUR_MS).await;
    p.shutdown();
    let p = Pipeline::start(&cfg, clock).expect("pipeline restarts");
    exact_hours(name, &p, &expected(&lines), boundary - HOUR_MS).await;
    p.shutdown();
}

/// Hours past `retention.hour-rollups` are dropped on both backends, the
/// rest stays exact, and a restart does not bring them back.
async fn hours_past_retention_are_dropped(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().unwrap();
    let cfg = backend.config_with(dir.path(), |c| {
        c.retention.minute_rollups = "7d".into();
        c.retention.hour_rollups = "30d".into();
        c.retention.interval = "1s".into();
        c.archive.retention = "30d".into();
        c.archive.seal_interval = "1s".into();
    });
    let clock = Clock::manual(Clock::system().now_ms());
    let boundary = align_down(clock.now_ms() - 7 * 86_400_000, HOUR_MS);
    assert!(
        T0 < clock.now_ms() - 31 * 86_400_000,
        "T0 is past the hour retention"
    );
    let p = Pipeline::start(&cfg, clock.clone()).expect("pipeline");
    // Five weeks old (past the hour retention), then a week old.
    let old = input_at(51, 600, T0);
    submit(&p, &old, 100).await;
    let kept = input_at(52, 800, boundary - 30 * 60_000);
    submit(&p, &kept, 100).await;
    exact_hours(name, &p, &expected(&kept), boundary - HOUR_MS).await;
    // The raw events of those hours leave the archive too (archive
    // retention, also 30 days); the week-old ones stay.
    let raw = p.shared.raw.clone().expect("raw events kept");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let files = raw.files.read().clone();
        let old_rows: u64 = files
            .iter()
            .filter(|f| f.max_ts < boundary - HOUR_MS)
            .map(|f| f.rows)
            .sum();
        let kept_rows: u64 = files
            .iter()
            .filter(|f| f.min_ts >= boundary - HOUR_MS)
            .map(|f| f.rows)
            .sum();
        if old_rows == 0 && kept_rows == expected(&kept).kept.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {old_rows} expired rows still listed, {kept_rows} kept rows listed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.shutdown();
    let p = Pipeline::start(&cfg, clock).expect("pipeline restarts");
    exact_hours(name, &p, &expected(&kept), boundary - HOUR_MS).await;
    let raw = p.shared.raw.clone().expect("raw events kept");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !raw
        .files
        .read()
        .iter()
        .all(|f| f.max_ts >= boundary - HOUR_MS)
    {
        assert!(
            Instant::now() < deadline,
            "{name}: expired files listed again after a restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.shutdown();
}

/// Raw events sealed many times into one hour are compacted into a file
/// per (tenant, hour) (per source partition in Kafka mode), every row
/// listed once throughout; the files replaced leave the archive once no
/// query can be reading them. In Kafka mode, files of the partition no
/// transaction lists (a seal or merge a crash interrupted, left by an
/// earlier owner) go once old enough; a recent one stays.
async fn sealed_files_compact_and_every_row_stays_once(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().unwrap();
    let cfg = backend.config_with(dir.path(), |c| {
        c.archive.seal_interval = "1s".into();
        c.archive.compact_files = 2;
        c.query.timeout = "1s".into();
        // How often the embedded raw store compacts and buries.
        c.retention.interval = "1s".into();
        if let Some(k) = c.kafka.as_mut() {
            k.orphan_age = "2s".into();
        }
    });
    let archive_dir = cfg
        .archive
        .dir
        .clone()
        .unwrap_or_else(|| dir.path().join("archive"));
    // (path, should be swept)
    let mut planted: Vec<(std::path::PathBuf, bool)> = Vec::new();
    if let Some(k) = &cfg.kafka {
        let hour = archive_dir.join("tenant=tenant0/date=2026-01-01/hour=10");
        std::fs::create_dir_all(&hour).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        let named = |files_as: &str, p: u32, from: u64, to: u64| {
            format!("{files_as}-p{p}-{from:020}-{to:020}.parquet")
        };
        let ours = tally_kafka::raw::files_as(&k.topic_events, &k.group_id);
        let theirs = tally_kafka::raw::files_as(&k.topic_events, "another-group");
        let before_groups = format!("kafka-{}", k.topic_events);
        for (file, gone, age) in [
            // Below raw-from once the partition sealed: swept.
            (named(&ours, 0, 0, 1), true, old),
            (format!(".{}.tmp", named(&ours, 0, 1, 2)), true, old),
            // Changed lately (here: stamped an hour ahead): an owner may
            // be writing it.
            (
                named(&ours, 0, 2, 3),
                false,
                std::time::SystemTime::now() + Duration::from_secs(3600),
            ),
            // Past any raw-from the test reaches: a seal may write it.
            (named(&ours, 0, 1 << 40, (1 << 40) + 1), false, old),
            // Another cluster's on the same topic, and one named before
            // groups were in names: not this cluster's to delete.
            (named(&theirs, 0, 0, 1), false, old),
            (named(&before_groups, 0, 0, 1), false, old),
        ] {
            let path = hour.join(file);
            std::fs::write(&path, b"not a parquet file").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(age)
                .unwrap();
            planted.push((path, gone));
        }
    }
    let p = Pipeline::start(&cfg, Clock::system()).expect("pipeline");
    let raw = p.shared.raw.clone().expect("raw events kept");
    // Several seals of the same hour, then an event two hours on (the
    // hour is over).
    let mut lines = Vec::new();
    for round in 0..4u64 {
        let batch = input_at(60 + round, 300, T0 + round as i64 * 120_000);
        submit(&p, &batch, 100).await;
        lines.extend(batch);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let later = input_at(70, 50, T0 + 2 * HOUR_MS);
    submit(&p, &later, 100).await;
    lines.extend(later);
    let want = expected(&lines);
    let mut kept: BTreeMap<(String, Millis), u64> = BTreeMap::new();
    for v in &want.kept {
        let t = v["tenant"].as_str().unwrap_or_default().to_string();
        *kept
            .entry((t, align_down(common::ts_of(v), HOUR_MS)))
            .or_default() += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen_many = false;
    loop {
        let files = raw.files.read().clone();
        let mut rows: BTreeMap<(String, Millis), u64> = BTreeMap::new();
        let mut count: BTreeMap<(String, Millis), usize> = BTreeMap::new();
        for f in &files {
            *rows.entry((f.tenant.to_string(), f.hour())).or_default() += f.rows;
            *count.entry((f.tenant.to_string(), f.hour())).or_default() += 1;
        }
        seen_many |= count.values().any(|&n| n > 4);
        // Never a row listed twice, whatever the moment.
        for (k, n) in &rows {
            assert!(
                *n <= kept.get(k).copied().unwrap_or(0),
                "{name}: {k:?} lists {n} rows, {} kept",
                kept.get(k).copied().unwrap_or(0)
            );
        }
        let on_disk = common::files_under(&archive_dir)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
            .filter(|f| !planted.iter().any(|(p, gone)| p == f && !gone))
            .count();
        let swept = planted.iter().all(|(p, gone)| p.exists() != *gone);
        let t0_hour_compacted = count
            .iter()
            .filter(|((_, h), _)| *h == T0)
            .all(|(_, &n)| n <= 4);
        if rows == kept && t0_hour_compacted && on_disk == files.len() && swept {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: files per (tenant, hour) {count:?}, rows {rows:?}, want rows {kept:?}; {on_disk} files on disk, {} listed; planted (path, to sweep, exists): {:?}",
            files.len(),
            planted
                .iter()
                .map(|(p, g)| (p, g, p.exists()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        raw.stats
            .files_compacted
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "{name}: nothing was compacted (seen more than one file per partition: {seen_many})"
    );
    p.shutdown();
}

fn kafka(broker: &Broker, scenario: &str) -> Backend {
    Backend::Kafka {
        brokers: broker.brokers(),
        tag: format!("seam-{scenario}-{}", std::process::id()),
    }
}

/// Each scenario runs on both backends: `embedded::<scenario>` and
/// `kafka::<scenario>` (each Kafka one with a broker and topics of its own).
macro_rules! on_both_logs {
    ($($scenario:ident => $tag:literal),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Backend::Embedded).await;
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let broker = super::Broker::start();
                    super::$scenario(super::kafka(&broker, $tag)).await;
                }
            )*
        }
    };
}

on_both_logs! {
    messy_input_counts_every_event_once => "messy",
    a_restart_resumes_where_it_stopped => "restart",
    history_backfilled_over_counted_minutes_adds_to_them => "backfill",
    old_minutes_fold_into_exact_hours => "retention",
    hours_past_retention_are_dropped => "hours",
    sealed_files_compact_and_every_row_stays_once => "compact",
}
