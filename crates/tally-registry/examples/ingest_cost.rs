//! CPU per event of the ingest parser, four ways over the same events:
//! JSON without a registered schema, JSON checked against a registered
//! Avro schema, and Confluent-framed Avro decoded then parsed and checked,
//! straight to JSON text as the server does (the writer's schema is the
//! latest) and through `apache_avro` values (the reference path). Run:
//!
//!     cargo run --release -p tally-registry --example ingest_cost [EVENTS]
//!
//! Each way runs five rounds, alternating, and the best round counts
//! (this machine is noisy). Single thread: the figures are CPU per event.

use std::sync::Arc;
use std::time::Instant;

use apache_avro::types::Value;
use tally_ingest::{Format, Parser, Tenancy};
use tally_registry::{Level, Registry, SchemaType};

const PROPS: &str = r#"{"type":"record","name":"PageView","fields":[
 {"name":"url","type":"string"},{"name":"ms","type":"long"},
 {"name":"country","type":["null","string"],"default":null},
 {"name":"plan","type":"string","default":"free"}]}"#;

const ENVELOPE: &str = r#"{"type":"record","name":"Event","fields":[
 {"name":"event_id","type":"string"},{"name":"event_type","type":"string"},
 {"name":"timestamp","type":"long"},{"name":"user_id","type":["null","string"],"default":null},
 {"name":"properties","type":{"type":"record","name":"P","fields":[
   {"name":"url","type":"string"},{"name":"ms","type":"long"},
   {"name":"country","type":["null","string"],"default":null},
   {"name":"plan","type":"string","default":"free"}]}}]}"#;

/// Appends one frame's event as JSON text.
type Decode = dyn Fn(&tally_registry::FrameReader, &[u8], &mut Vec<u8>);

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let registry = Arc::new(Registry::in_memory(Level::Backward));
    registry
        .register("default", "page_view", SchemaType::Avro, PROPS)
        .unwrap();
    let env_id = registry
        .register("default", "events-value", SchemaType::Avro, ENVELOPE)
        .unwrap()
        .id;
    let envelope = apache_avro::Schema::parse_str(ENVELOPE).unwrap();
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&envelope)
        .build()
        .unwrap();
    let t0 = 1_780_000_000_000i64;
    let mut ndjson = Vec::new();
    let mut frames = Vec::new();
    for i in 0..n {
        let (url, ms, country) = (
            format!("/p/{}", i % 500),
            (i % 3000) as i64,
            ["DE", "FR", "US"][i % 3],
        );
        ndjson.extend_from_slice(
            format!(
                r#"{{"event_id":"e{i}","event_type":"page_view","timestamp":{},"user_id":"u{}","properties":{{"url":"{url}","ms":{ms},"country":"{country}","plan":"pro"}}}}"#,
                t0 + i as i64,
                i % 1000
            )
            .as_bytes(),
        );
        ndjson.push(b'\n');
        let rec = Value::Record(vec![
            ("event_id".into(), Value::String(format!("e{i}"))),
            ("event_type".into(), Value::String("page_view".into())),
            ("timestamp".into(), Value::Long(t0 + i as i64)),
            (
                "user_id".into(),
                Value::Union(1, Box::new(Value::String(format!("u{}", i % 1000)))),
            ),
            (
                "properties".into(),
                Value::Record(vec![
                    ("url".into(), Value::String(url)),
                    ("ms".into(), Value::Long(ms)),
                    (
                        "country".into(),
                        Value::Union(1, Box::new(Value::String(country.into()))),
                    ),
                    ("plan".into(), Value::String("pro".into())),
                ]),
            ),
        ]);
        let mut f = vec![0u8];
        f.extend_from_slice(&env_id.to_be_bytes());
        f.extend_from_slice(&writer.write_value_to_vec(rec).unwrap());
        frames.push(f);
    }
    let checks: Arc<dyn tally_types::schema::PropsCheck> = registry.clone();
    let json_plain = || {
        let p = Parser::new(4)
            .parse(&ndjson, Format::Ndjson, Tenancy::Open)
            .unwrap();
        assert_eq!(p.accepted, n);
    };
    let json_checked = || {
        let p = Parser::new(4)
            .with_registry(Some(checks.clone()))
            .parse(&ndjson, Format::Ndjson, Tenancy::Open)
            .unwrap();
        assert_eq!(p.accepted, n);
    };
    // Frames to NDJSON as the server does (the id's schemas looked up once
    // per body), then parsed and checked.
    let avro_with = |decode: &Decode| {
        let mut lines = Vec::with_capacity(ndjson.len());
        let reader = registry.frame_reader(Some("default"), env_id).unwrap();
        for f in &frames {
            decode(&reader, f, &mut lines);
            lines.push(b'\n');
        }
        let p = Parser::new(4)
            .with_registry(Some(checks.clone()))
            .parse(&lines, Format::Ndjson, Tenancy::Open)
            .unwrap();
        assert_eq!(p.accepted, n);
    };
    let avro = || avro_with(&|r, f, out| r.decode_event_into(f, out).unwrap());
    let avro_values =
        || avro_with(&|r, f, out| serde_json::to_writer(out, &r.decode_event(f).unwrap()).unwrap());
    let ways: [(&str, &dyn Fn()); 4] = [
        ("json, checked against a schema", &json_checked),
        ("json, no schema", &json_plain),
        ("avro frames, straight to text", &avro),
        ("avro frames, via avro values", &avro_values),
    ];
    // TALLY_BENCH_ONLY=<n>: run way n alone (for a profiler).
    let only: Option<usize> = std::env::var("TALLY_BENCH_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut best = [f64::MAX; 4];
    for _ in 0..5 {
        for (i, (_, f)) in ways.iter().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let t = Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    println!("{n} events, best of 5 rounds, one thread:");
    for (i, (name, _)) in ways.iter().enumerate() {
        println!(
            "  {name:<34} {:>7.0} ns/event  {:>6.2} M events/s",
            best[i] * 1e9 / n as f64,
            n as f64 / best[i] / 1e6
        );
    }
    println!(
        "  schema check: +{:.0}% CPU per event over plain JSON",
        (best[0] / best[1] - 1.0) * 100.0
    );
}
