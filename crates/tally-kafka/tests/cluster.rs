//! Several nodes on one real Kafka-protocol broker: every node's store
//! holds the exact totals of every partition, through a node leaving, a
//! node joining, malformed messages and late events; a `read_committed`
//! reader of the aggregates topic that keeps the last value per key sees
//! the same totals.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_ingest::Parser;
use tally_kafka::codec::{self, Key};
use tally_kafka::testing::{Broker, settings};
use tally_kafka::{Hooks, KafkaNode, OutEvent, event_key};
use tally_store::RollupStore;
use tally_stream::StreamConfig;
use tally_types::time::{Clock, MINUTE_MS, Millis, align_down, format_rfc3339};

type Oracle = HashMap<(String, Millis, String), u64>;

fn hooks(malformed: Arc<Mutex<Vec<String>>>, stream: StreamConfig) -> Hooks {
    Hooks {
        decode_binary: None,
        sessions: None,
        stream,
        make_parser: Arc::new(|_| Parser::new(1)),
        on_malformed: Arc::new(move |e| {
            malformed.lock().extend(e.into_iter().map(|x| x.reason));
        }),
        now_ms: Arc::new(|| Clock::system().now_ms()),
        raw: None,
        minute_retention_ms: 0,
    }
}

struct Node {
    node: Option<KafkaNode>,
    store: Arc<RwLock<RollupStore>>,
}

impl Node {
    fn kafka(&self) -> &KafkaNode {
        self.node.as_ref().expect("running")
    }
}

fn start(brokers: &str, tag: &str, name: &str, malformed: &Arc<Mutex<Vec<String>>>) -> Node {
    start_with(brokers, tag, name, malformed, StreamConfig::default())
}

fn start_with(
    brokers: &str,
    tag: &str,
    name: &str,
    malformed: &Arc<Mutex<Vec<String>>>,
    stream: StreamConfig,
) -> Node {
    let store = Arc::new(RwLock::new(RollupStore::new()));
    tally_kafka::ensure_topics(&settings(brokers, tag, name)).expect("topics");
    let node = KafkaNode::start(
        settings(brokers, tag, name),
        hooks(malformed.clone(), stream),
        store.clone(),
    )
    .expect("node starts");
    Node {
        node: Some(node),
        store,
    }
}

/// `n` events with duplicates (every copy identical, same key) and
/// disorder over the last three minutes; the oracle counts first copies.
fn events(n: usize, seed: u64, now: Millis, oracle: &mut Oracle) -> Vec<OutEvent> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut made: Vec<(String, String, String, Millis, String, String)> = Vec::new();
    let mut msgs = Vec::new();
    for i in 0..n {
        if i > 10 && rnd() % 4 == 0 {
            let (tenant, id, _, _, session, body) = made[(rnd() % i as u64) as usize].clone();
            msgs.push(OutEvent {
                key: event_key(&tenant, Some(&session), &id),
                value: body.into_bytes(),
                backfill: false,
                correction: false,
            });
            made.push(made[made.len() - 1].clone());
            continue;
        }
        let tenant = ["acme", "globex", "initech"][(rnd() % 3) as usize].to_string();
        let ty = ["page_view", "click", "purchase"][(rnd() % 3) as usize].to_string();
        let id = format!("e-{seed}-{i}");
        let ts = now - (rnd() % 170_000) as Millis;
        let session = format!("s-{}", rnd() % 40);
        let body = format!(
            r#"{{"event_id":"{id}","event_type":"{ty}","timestamp":"{}","tenant":"{tenant}","user_id":"u{}","session_id":"{session}","properties":{{"revenue":{}}}}}"#,
            format_rfc3339(ts),
            rnd() % 100,
            rnd() % 1000
        );
        *oracle
            .entry((tenant.clone(), align_down(ts, MINUTE_MS), ty.clone()))
            .or_default() += 1;
        msgs.push(OutEvent {
            key: event_key(&tenant, Some(&session), &id),
            value: body.clone().into_bytes(),
            backfill: false,
            correction: false,
        });
        made.push((tenant, id, ty, ts, session, body));
    }
    msgs
}

fn send(node: &KafkaNode, msgs: Vec<OutEvent>) {
    let (tx, rx) = std::sync::mpsc::channel();
    node.producer().send(
        msgs,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(Duration::from_secs(30))
        .expect("delivery answered")
        .expect("broker acknowledged");
}

fn mismatches(store: &RollupStore, oracle: &Oracle) -> Vec<String> {
    let mut out = Vec::new();
    let mut total_oracle = 0;
    for ((t, m, ty), &n) in oracle {
        total_oracle += n;
        let got = store.agg(t, *m, ty).map_or(0, |a| a.count);
        if got != n {
            out.push(format!("{t} {} {ty}: {got} != {n}", format_rfc3339(*m)));
        }
    }
    let mut total = 0;
    for t in store.tenants() {
        let Some((lo, hi)) = store.span(t) else {
            continue;
        };
        let mut m = lo;
        while m <= hi {
            if let Some(b) = store.minute(t, m) {
                total += b.types.iter().map(|(_, a)| a.count).sum::<u64>();
            }
            m += MINUTE_MS;
        }
    }
    if total != total_oracle {
        out.push(format!("total {total} != {total_oracle}"));
    }
    out
}

fn wait_exact(nodes: &[&Node], oracle: &Oracle, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let bad: Vec<String> = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                mismatches(&n.store.read(), oracle)
                    .into_iter()
                    .map(move |m| format!("node {i}: {m}"))
            })
            .collect();
        if bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not exact after 90 s: {:?}",
            &bad[..bad.len().min(10)]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One live record of the aggregates topic.
struct Live {
    whole: bool,
    partition: u32,
    bucket: (String, Millis, String),
    count: u64,
}

/// Every aggregate key, last value wins (a tombstone deletes its key), as
/// any `read_committed` consumer of the aggregates topic sees it.
fn topic_records(brokers: &str, tag: &str) -> Vec<Live> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("check-{tag}"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topic = format!("agg-{tag}");
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..4 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("partition");
        let (_, hi) = consumer
            .fetch_watermarks(&topic, p, Duration::from_secs(5))
            .expect("watermarks");
        ends.insert(p, hi);
    }
    consumer.assign(&tpl).expect("assign");
    let mut last: HashMap<Vec<u8>, Live> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pos: HashMap<i32, i64> = consumer
            .position()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if ends
            .iter()
            .all(|(p, hi)| pos.get(p).copied().unwrap_or(0) >= *hi)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "aggregates topic not read to its end"
        );
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.expect("message");
        let key = m.key().expect("key");
        let (whole, partition, bucket) = match codec::decode_key(key) {
            Ok(Key::Agg(k)) => (
                true,
                k.partition,
                (k.tenant.to_string(), k.minute, k.event_type.to_string()),
            ),
            Ok(Key::Delta(k)) => (
                false,
                k.partition,
                (k.tenant.to_string(), k.minute, k.event_type.to_string()),
            ),
            _ => continue,
        };
        match m.payload() {
            Some(v) => {
                let count = codec::decode_agg(v).expect("aggregate").count;
                last.insert(
                    key.to_vec(),
                    Live {
                        whole,
                        partition,
                        bucket,
                        count,
                    },
                );
            }
            None => {
                last.remove(key);
            }
        }
    }
    last.into_values().collect()
}

/// Each bucket's total over its live keys (whole values and deltas).
fn topic_totals(brokers: &str, tag: &str) -> Oracle {
    let mut out = Oracle::new();
    for r in topic_records(brokers, tag) {
        *out.entry(r.bucket).or_default() += r.count;
    }
    out.retain(|_, n| *n > 0);
    out
}

#[test]
fn nodes_share_partitions_and_every_node_answers_exactly() {
    let broker = Broker::start();
    let brokers = broker.brokers();
    let tag = format!("c{}", std::process::id());
    let malformed = Arc::new(Mutex::new(Vec::new()));
    let now = Clock::system().now_ms();
    let mut oracle = Oracle::new();

    let a = start(&brokers, &tag, "a", &malformed);
    let mut b = start(&brokers, &tag, "b", &malformed);
    send(a.kafka(), events(3000, 1, now, &mut oracle));
    wait_exact(&[&a, &b], &oracle, "two nodes");

    // B stops, events keep coming, B starts again (same node id, so the
    // same static member): it restores its partitions from its last
    // commit and catches up.
    b.node.take().expect("running").shutdown();
    send(a.kafka(), events(2000, 2, now, &mut oracle));
    let b = start(&brokers, &tag, "b", &malformed);
    wait_exact(&[&a, &b], &oracle, "after a node came back");

    // C joins mid-stream and restores what it is given.
    let c = start(&brokers, &tag, "c", &malformed);
    send(a.kafka(), events(2000, 3, now, &mut oracle));
    // Garbage, and an invalid event beside a valid one: the malformed DLQ
    // names topic, partition and offset; the valid event counts.
    let ok = format!(
        r#"{{"event_id":"mixed-ok","event_type":"click","timestamp":"{}","tenant":"acme"}}"#,
        format_rfc3339(now)
    );
    *oracle
        .entry(("acme".into(), align_down(now, MINUTE_MS), "click".into()))
        .or_default() += 1;
    send(
        a.kafka(),
        vec![
            OutEvent {
                key: b"x".to_vec(),
                value: b"not json at all".to_vec(),
                backfill: false,
                correction: false,
            },
            OutEvent {
                key: b"y".to_vec(),
                value: format!("{ok}\n{{\"event_id\":\"bad\"}}\n").into_bytes(),
                backfill: false,
                correction: false,
            },
        ],
    );
    wait_exact(&[&a, &b, &c], &oracle, "after a node joined");
    // C took partitions over from A's commits: it rebuilt their dedupe
    // entries from the events topic.
    let cs = c.kafka().stats();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cs.restored_events.load(Relaxed) == 0 {
        assert!(Instant::now() < deadline, "C restored nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.kafka().stats().rebalances.load(Relaxed) >= 3);
    let reasons = malformed.lock().clone();
    assert!(
        reasons
            .iter()
            .all(|r| r.contains(&format!("kafka message ev-{tag}/"))),
        "{reasons:?}"
    );
    // Reported by the node that processed the message; a message processed
    // again after a rebalance (its transaction aborted) is reported again.
    let distinct: std::collections::BTreeSet<&String> = reasons.iter().collect();
    assert_eq!(distinct.len(), 2, "{reasons:?}");

    // Late events (session keys of live traffic: the same partitions and
    // clocks): never counted, reported in the partition states.
    let late: Vec<OutEvent> = (0..5)
        .map(|i| OutEvent {
            key: event_key("acme", Some(&format!("s-{i}")), "late"),
            value: format!(
                r#"{{"event_id":"late-{i}","event_type":"click","timestamp":"{}","tenant":"acme","session_id":"s-{i}"}}"#,
                format_rfc3339(now - 40 * MINUTE_MS)
            )
            .into_bytes(),
            backfill: false,
            correction: false,
        })
        .collect();
    send(a.kafka(), late);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let late: u64 = a.kafka().view().states().iter().map(|(_, s)| s.late).sum();
        if late == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "late events not reported: {late}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_exact(&[&a, &c], &oracle, "after late events");

    let mut want = oracle.clone();
    want.retain(|_, n| *n > 0);
    assert_eq!(
        topic_totals(&brokers, &tag),
        want,
        "read_committed, last value per key"
    );
    for mut n in [a, b, c] {
        n.node.take().expect("running").shutdown();
    }
}

#[test]
fn final_minutes_are_published_whole_in_place_of_their_deltas() {
    // A growing minute is published as deltas, one per transaction; once
    // it is final its whole value replaces them (tombstones), also for
    // deltas an earlier owner of the partition published.
    let broker = Broker::start();
    let brokers = broker.brokers();
    let tag = format!("f{}", std::process::id());
    let malformed = Arc::new(Mutex::new(Vec::new()));
    let now = Clock::system().now_ms();
    let stream = StreamConfig {
        allowed_lateness_ms: MINUTE_MS,
        ..StreamConfig::default()
    };
    let old = align_down(now - 10 * MINUTE_MS, MINUTE_MS);
    let mut oracle = Oracle::new();
    let mut seq = 0;
    let mut batch = |at: Millis, n: usize, oracle: &mut Oracle| -> Vec<OutEvent> {
        (0..n)
            .map(|i| {
                seq += 1;
                let tenant = ["acme", "globex", "initech"][i % 3];
                let ty = ["page_view", "click"][(i / 3) % 2];
                let ts = at + (i as Millis * 997) % 50_000;
                let session = format!("s-{}", i % 60);
                *oracle
                    .entry((tenant.into(), align_down(ts, MINUTE_MS), ty.into()))
                    .or_default() += 1;
                OutEvent {
                    key: event_key(tenant, Some(&session), &format!("f-{seq}")),
                    value: format!(
                        r#"{{"event_id":"f-{seq}","event_type":"{ty}","timestamp":"{}","tenant":"{tenant}","user_id":"u{}","session_id":"{session}"}}"#,
                        format_rfc3339(ts),
                        i % 17
                    )
                    .into_bytes(),
                    backfill: false,
                    correction: false,
                }
            })
            .collect()
    };
    let a = start_with(&brokers, &tag, "a", &malformed, stream.clone());
    // Several transactions of the old minute on A: its first ones whole
    // (the minute is small beside what they add), later ones deltas.
    for _ in 0..8 {
        send(a.kafka(), batch(old, 240, &mut oracle));
        wait_exact(&[&a], &oracle, "old minute on A");
    }
    let open = topic_records(&brokers, &tag);
    let deltas = open.iter().filter(|r| !r.whole).count();
    assert!(deltas > 6, "{deltas} deltas of an open minute");
    let mut totals = Oracle::new();
    for r in &open {
        *totals.entry(r.bucket.clone()).or_default() += r.count;
    }
    assert_eq!(totals, oracle, "the topic's totals, deltas open");
    // A stops and starts again: it restores its partitions, and the deltas
    // it published, from the topic; more of the old minute, then the
    // clocks move on past it.
    let mut a = a;
    a.node.take().expect("running").shutdown();
    let b = start_with(&brokers, &tag, "a", &malformed, stream);
    send(b.kafka(), batch(old, 240, &mut oracle));
    wait_exact(&[&b], &oracle, "old minute after the restart");
    send(b.kafka(), batch(now - 30_000, 240, &mut oracle));
    wait_exact(&[&b], &oracle, "after the clocks moved on");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = topic_records(&brokers, &tag);
        let old_deltas = live
            .iter()
            .filter(|r| r.bucket.1 == old && !r.whole)
            .count();
        let old_wholes: HashMap<(u32, (String, Millis, String)), u64> = live
            .iter()
            .filter(|r| r.bucket.1 == old && r.whole)
            .map(|r| ((r.partition, r.bucket.clone()), r.count))
            .collect();
        let mut totals = Oracle::new();
        for r in &live {
            *totals.entry(r.bucket.clone()).or_default() += r.count;
        }
        totals.retain(|_, n| *n > 0);
        assert_eq!(totals, oracle, "the topic's totals, at every step");
        if old_deltas == 0 && !old_wholes.is_empty() {
            // Every (partition, bucket) of the old minute: one whole value.
            let whole_sum: u64 = old_wholes.values().sum();
            let want: u64 = oracle
                .iter()
                .filter(|(k, _)| k.1 == old)
                .map(|(_, n)| n)
                .sum();
            assert_eq!(whole_sum, want);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old minute still has {old_deltas} deltas and {} whole values",
            old_wholes.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut b = b;
    b.node.take().expect("running").shutdown();
}

#[test]
fn a_minute_too_large_for_one_record_is_split_and_stays_exact() {
    // One minute of one event type with 80k distinct users and sessions
    // over 500 pages (a declared dimension): its whole value carries about
    // 1.3 MB of (incompressible) user and session hashes, past the
    // broker's 1 MB limit on a record. Written as one record it would be
    // refused and its transaction aborted at every retry; split by
    // combination it commits, and the node and the topic stay exact.
    let broker = Broker::start();
    let brokers = broker.brokers();
    let tag = format!("w{}", std::process::id());
    let malformed = Arc::new(Mutex::new(Vec::new()));
    let now = Clock::system().now_ms();
    let stream = StreamConfig {
        allowed_lateness_ms: MINUTE_MS,
        dimensions: tally_store::Dimensions::new(&["page".to_string()], &[], 1000, 256)
            .expect("dimensions"),
        ..StreamConfig::default()
    };
    let old = align_down(now - 10 * MINUTE_MS, MINUTE_MS);
    hand_made_aggregates_topic(&brokers, &tag);
    let mut oracle = Oracle::new();
    let event = |i: usize, ts: Millis, oracle: &mut Oracle| {
        *oracle
            .entry(("acme".into(), align_down(ts, MINUTE_MS), "page_view".into()))
            .or_default() += 1;
        OutEvent {
            // One partition takes them all (the key places, not the session).
            key: event_key("acme", Some("wide"), &format!("w-{i}")),
            value: format!(
                r#"{{"event_id":"w-{i}","event_type":"page_view","timestamp":"{}","tenant":"acme","user_id":"u{i}","session_id":"s{i}","properties":{{"page":"/p{}","duration_ms":{}}}}}"#,
                format_rfc3339(ts),
                i % 500,
                i % 9000
            )
            .into_bytes(),
            backfill: false,
            correction: false,
        }
    };
    let a = start_with(&brokers, &tag, "a", &malformed, stream);
    const N: usize = 80_000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(20_000) {
        let msgs = chunk
            .iter()
            .map(|&i| event(i, old + (i as Millis * 7) % 59_000, &mut oracle))
            .collect();
        send(a.kafka(), msgs);
    }
    wait_exact(&[&a], &oracle, "the wide minute");
    // The clocks move on: the minute is final and published whole.
    send(a.kafka(), vec![event(N, now - 30_000, &mut oracle)]);
    wait_exact(&[&a], &oracle, "after the clocks moved on");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = topic_records(&brokers, &tag);
        let old_live: Vec<&Live> = live.iter().filter(|r| r.bucket.1 == old).collect();
        let total: u64 = old_live.iter().map(|r| r.count).sum();
        assert_eq!(total, N as u64, "the topic's total of the wide minute");
        // Whole values in place of the transactions' deltas (once final,
        // or while small beside a delta), continued in parts: deltas of
        // the same transaction with a count of 0.
        let done = old_live.iter().all(|r| r.whole || r.count == 0);
        if done {
            assert!(
                old_live.len() > old_live.iter().filter(|r| r.whole).count(),
                "the whole value was not split: {} records",
                old_live.len()
            );
            break;
        }
        assert!(Instant::now() < deadline, "the wide minute's deltas stay");
        std::thread::sleep(Duration::from_millis(500));
    }
    let parts = a.kafka().stats().aggregate_parts.load(Relaxed);
    assert!(parts > 0, "no split counted in /metrics");
    // Every node's value: every combination, and the users of all of them.
    let st = a.store.read();
    let agg = st.agg("acme", old, "page_view").expect("the wide minute");
    assert_eq!(agg.by.len(), 500);
    assert_eq!(agg.by.values().map(|c| c.count).sum::<u64>(), N as u64);
    let users = agg.users.estimate() as f64;
    assert!(
        (users - N as f64).abs() < 0.02 * N as f64,
        "{users} distinct users"
    );
    drop(st);
    let mut a = a;
    a.node.take().expect("running").shutdown();
}

/// The aggregates topic as a user would create it by hand: the broker's
/// default limit of 1 MB per record (Tally's own allows 16 MiB).
fn hand_made_aggregates_topic(brokers: &str, tag: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let name = format!("agg-{tag}");
    let topic =
        NewTopic::new(&name, 4, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let made = futures::executor::block_on(admin.create_topics(&[topic], &AdminOptions::new()))
        .expect("create topics");
    assert!(made.iter().all(Result::is_ok), "{made:?}");
}

#[test]
fn a_state_too_large_for_the_topic_says_what_to_raise() {
    // 20,000 tenants with long names that do not compress, in one partition:
    // its state (every tenant's clocks) passes the 1 MB a hand-made
    // aggregates topic takes. The node cannot
    // commit that partition, and its error (in /api/v1/status) says which
    // setting to raise instead of a bare commit failure.
    let broker = Broker::start();
    let brokers = broker.brokers();
    let tag = format!("s{}", std::process::id());
    hand_made_aggregates_topic(&brokers, &tag);
    let malformed = Arc::new(Mutex::new(Vec::new()));
    let a = start(&brokers, &tag, "a", &malformed);
    let now = Clock::system().now_ms();
    let msgs = (0..20_000u64)
        .map(|i| OutEvent {
            key: b"one partition".to_vec(),
            value: format!(
                r#"{{"event_id":"s-{i}","event_type":"click","timestamp":"{}","tenant":"{}"}}"#,
                format_rfc3339(now - 5_000),
                // 64 characters, the longest a tenant may have.
                (1..=4u64)
                    .map(|j| format!("{:016x}", (i * 4 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
                    .collect::<String>()
            )
            .into_bytes(),
            backfill: false,
            correction: false,
        })
        .collect();
    send(a.kafka(), msgs);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let err = a.kafka().stats().last_error.lock().clone();
        if let Some(e) = err.filter(|e| e.contains("commit")) {
            assert!(
                e.contains("max.message.bytes") && e.contains(&format!("agg-{tag}")),
                "{e}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no commit refused in 60 s (last error: {:?})",
            a.kafka().stats().last_error.lock()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut a = a;
    a.node.take().expect("running").shutdown();
}
