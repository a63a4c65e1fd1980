//! The alert log on a real Kafka-protocol broker: records of other nodes
//! are applied and a node's own are not; the lease is taken only once the
//! new holder has read everything in the log when partition 0 came to it;
//! a restarted node (same id, new process) rebuilds from the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tally_kafka::Settings;
use tally_kafka::alerts::AlertLog;
use tally_kafka::testing::{Broker, settings};

type View = Arc<Mutex<BTreeMap<String, Option<Vec<u8>>>>>;

fn start(s: &Settings) -> (Arc<AlertLog>, View) {
    let view: View = Arc::default();
    let v = view.clone();
    let log = AlertLog::start(
        s,
        Arc::new(move |k: &str, val: Option<&[u8]>| {
            v.lock().insert(k.to_string(), val.map(<[u8]>::to_vec));
        }),
    )
    .expect("alert log");
    (log, view)
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn put(k: &str, v: &str) -> (String, Option<Vec<u8>>) {
    (k.into(), Some(v.as_bytes().to_vec()))
}

#[test]
fn the_lease_moves_only_to_a_node_that_has_read_the_log() {
    let broker = Broker::start();
    let tag = format!("al{}", std::process::id());
    let sa = settings(&broker.brokers(), &tag, "a");
    let sb = settings(&broker.brokers(), &tag, "b");
    tally_kafka::ensure_topics(&sa).expect("topics");
    let (a, view_a) = start(&sa);
    let (b, view_b) = start(&sb);
    a.catch_up(Duration::from_secs(10))
        .expect("the alert log read to its end");

    until("a leads", || a.lease(true));
    assert!(!b.lease(false), "b does not own partition 0");
    a.publish_blocking(vec![
        put("rule/r1", "{\"v\":1}"),
        put("outbox/0000000000000001", "{}"),
    ])
    .expect("publish");
    until("b applies a's records", || view_b.lock().len() == 2);
    assert!(
        view_a.lock().is_empty(),
        "a's own records are not applied to a"
    );

    // Partition 0 moves to b. The old holder still writes a few records
    // (it has not learned yet): b leads only after reading them.
    assert!(!a.lease(false));
    let mut late = Vec::new();
    for i in 0..200 {
        late.push(put(&format!("history/{i:016x}"), "{}"));
    }
    late.push(("outbox/0000000000000001".into(), None));
    a.publish_blocking(late).expect("publish");
    until("b takes the lease", || b.lease(true));
    let v = view_b.lock();
    assert_eq!(
        v.get("outbox/0000000000000001"),
        Some(&None),
        "the delivery the old leader finished is gone before b leads"
    );
    assert_eq!(v.len(), 202);
    drop(v);
    assert!(b.held() && !a.held());

    // A restarted node rebuilds everything, its own past records included.
    a.shutdown();
    let (a2, view_a2) = start(&sa);
    a2.catch_up(Duration::from_secs(10))
        .expect("the alert log read to its end");
    assert_eq!(view_a2.lock().len(), 202);
    assert_eq!(
        view_a2.lock().get("rule/r1"),
        Some(&Some(b"{\"v\":1}".to_vec()))
    );
    b.shutdown();
    a2.shutdown();
}
