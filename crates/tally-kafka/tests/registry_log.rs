//! The registry log on a real Kafka-protocol broker: a node starting up
//! reads every proposal already in the log before it says it caught up,
//! also when its client has never touched the topic (a node restarting
//! must not accept events before it knows their schemas).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tally_kafka::registry_log::RegistryLog;
use tally_kafka::testing::{Broker, settings};

type Seen = Arc<Mutex<Vec<(i64, String)>>>;

fn start(s: &tally_kafka::Settings) -> (Arc<RegistryLog>, Seen) {
    let seen: Seen = Arc::default();
    let v = seen.clone();
    let log = RegistryLog::start(
        s,
        Arc::new(move |offset: i64, key: &[u8], _value: &[u8]| {
            v.lock()
                .push((offset, String::from_utf8_lossy(key).into_owned()));
        }),
    )
    .expect("registry log");
    (log, seen)
}

#[test]
fn a_starting_node_reads_every_proposal_before_it_has_caught_up() {
    let broker = Broker::start();
    let tag = format!("rl{}", std::process::id());
    let sa = settings(&broker.brokers(), &tag, "a");
    tally_kafka::ensure_topics(&sa).expect("topics");

    // An empty log, created a moment ago: caught up at once.
    let (a, seen_a) = start(&sa);
    let t = Instant::now();
    a.catch_up(Duration::from_secs(10))
        .expect("an empty log read to its end");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(seen_a.lock().is_empty());

    for i in 0..3 {
        let at = a
            .propose(&format!("a/{i}"), b"{}", Duration::from_secs(10))
            .expect("proposal");
        assert_eq!(at, i);
    }
    // Another node, whose clients have never used the topic.
    let (b, seen_b) = start(&settings(&broker.brokers(), &tag, "b"));
    b.catch_up(Duration::from_secs(10))
        .expect("the registry log read to its end");
    let keys: Vec<(i64, String)> = seen_b.lock().clone();
    assert_eq!(
        keys,
        vec![(0, "a/0".into()), (1, "a/1".into()), (2, "a/2".into())],
        "every proposal applied, in order, before catch_up returned"
    );
    a.shutdown();
    b.shutdown();
}
