//! Grouped ingest messages go where librdkafka would have sent each of
//! their events alone: our partitioners agree with librdkafka's own (the
//! reference) on a real broker, for each `partitioner` setting we follow,
//! and every line of a grouped message belongs to its partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_kafka::testing::{Broker, settings};
use tally_kafka::{EventProducer, OutEvent, Partitioner, ProduceStats, ensure_topics, event_key};

fn keys() -> Vec<Vec<u8>> {
    // Every tail length of murmur2's 4-byte blocks, empty-ish and long
    // keys, non-ASCII bytes, and the keys Tally's ingest makes.
    let mut k: Vec<Vec<u8>> = (1..=9).map(|n| b"abcdefghi"[..n].to_vec()).collect();
    k.push("ünïcødé/s/Ω".as_bytes().to_vec());
    k.push(vec![0xff; 33]);
    for i in 0..200 {
        k.push(event_key(
            &format!("tenant{}", i % 3),
            (i % 2 == 0).then(|| format!("sess-{i}")).as_deref(),
            &format!("evt-{i:05}"),
        ));
    }
    k
}

#[test]
fn our_partitioners_place_keys_as_librdkafka_does() {
    let broker = Broker::start();
    let s = settings(&broker.brokers(), "placement", "n1");
    ensure_topics(&s).expect("topics");
    let n = s.partitions;
    for name in [
        "consistent_random",
        "consistent",
        "murmur2_random",
        "murmur2",
        "fnv1a",
    ] {
        let ours = Partitioner::from_setting(Some(name)).expect("a key partitioner");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.brokers())
            .set("partitioner", name)
            .create()
            .expect("producer");
        for key in keys() {
            let rec = FutureRecord::to(&s.topic_events).key(&key).payload("{}");
            let partition =
                futures::executor::block_on(producer.send(rec, Duration::from_secs(10)))
                    .expect("delivered")
                    .partition;
            assert_eq!(
                ours.partition(&key, n),
                partition as u32,
                "partitioner {name}, key {:?}",
                String::from_utf8_lossy(&key)
            );
        }
    }
    assert_eq!(Partitioner::from_setting(None), Some(Partitioner::Crc32));
    assert_eq!(Partitioner::from_setting(Some("random")), None);
}

#[test]
fn a_grouped_message_holds_only_its_partitions_events() {
    let broker = Broker::start();
    let s = settings(&broker.brokers(), "grouped", "n1");
    ensure_topics(&s).expect("topics");
    let producer = EventProducer::new(&s, Arc::new(ProduceStats::default())).expect("producer");
    // Big enough that some partitions need several messages.
    let events: Vec<OutEvent> = (0..6000)
        .map(|i| {
            let session = format!("s{}", i % 97);
            let id = format!("e{i:06}");
            let value = format!(
                r#"{{"event_id":"{id}","event_type":"view","session_id":"{session}","pad":"{}"}}"#,
                "x".repeat(200)
            );
            OutEvent {
                key: event_key("default", Some(&session), &id),
                value: value.into_bytes(),
                backfill: false,
                correction: false,
            }
        })
        .collect();
    let want: HashMap<String, u32> = events
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
            (
                v["event_id"].as_str().unwrap().to_string(),
                Partitioner::Crc32.partition(&e.key, s.partitions),
            )
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    producer.send_grouped(
        events,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv_timeout(Duration::from_secs(30))
        .expect("settled")
        .expect("acknowledged");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", "grouped-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..s.partitions {
        tpl.add_partition_offset(&s.topic_events, p as i32, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut messages = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < want.len() && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("message");
        messages += 1;
        let value = m.payload().unwrap();
        assert!(
            value.len() <= tally_kafka::GROUP_BYTES,
            "{} bytes",
            value.len()
        );
        for line in value.split(|b| *b == b'\n') {
            let v: serde_json::Value =
                serde_json::from_slice(line).expect("one JSON event per line");
            let id = v["event_id"].as_str().unwrap().to_string();
            assert!(
                seen.insert(id, m.partition() as u32).is_none(),
                "an event sent twice"
            );
        }
    }
    assert_eq!(seen, want, "every event once, in its key's partition");
    assert!(
        messages < 6000 / 20,
        "{messages} messages for 6000 events: not grouped"
    );
}
