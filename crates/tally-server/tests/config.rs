//! The committed example config documents every key with its default.

use std::path::Path;

#[test]
fn example_config_loads_and_matches_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tally.example.toml");
    let cfg = tally_server::Config::load(Some(&path)).expect("example config parses");
    let def = tally_server::Config::default();
    assert_eq!(cfg.listen, def.listen);
    assert_eq!(cfg.log.partitions, def.log.partitions);
    assert_eq!(cfg.log.segment_bytes, def.log.segment_bytes);
    assert_eq!(cfg.ingest.max_body_bytes, def.ingest.max_body_bytes);
    assert_eq!(cfg.ingest.max_inflight_bytes, def.ingest.max_inflight_bytes);
    assert_eq!(cfg.stream.allowed_lateness, def.stream.allowed_lateness);
    assert_eq!(cfg.dlq.capacity, def.dlq.capacity);
}

#[test]
fn unknown_keys_and_bad_durations_are_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(&p, "[log]\npartitons = 3\n").unwrap();
    let e = tally_server::Config::load(Some(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("partitons"), "{e}");
    std::fs::write(&p, "[stream]\nallowed-lateness = \"soon\"\n").unwrap();
    let e = tally_server::Config::load(Some(&p))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stream.allowed-lateness") && e.contains("soon"),
        "{e}"
    );
}
