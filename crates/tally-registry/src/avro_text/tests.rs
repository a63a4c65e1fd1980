//! The compiled decoder against the reference path (`apache_avro`'s
//! decoder and `to_json`), over generated records of schemas covering every
//! type it handles, and over damaged bytes.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::types::Value;
use serde_json::Value as Json;

use super::Program;

const SCHEMAS: &[&str] = &[
    // An event: the envelope and a properties record.
    r#"{"type":"record","name":"Event","namespace":"t","fields":[
      {"name":"event_id","type":"string"},{"name":"event_type","type":"string"},
      {"name":"timestamp","type":{"type":"long","logicalType":"timestamp-millis"}},
      {"name":"user_id","type":["null","string"],"default":null},
      {"name":"properties","type":["null",{"type":"record","name":"P","fields":[
        {"name":"url","type":"string"},{"name":"ms","type":"long"},
        {"name":"price","type":["null","double"]},
        {"name":"plan","type":{"type":"enum","name":"Plan","symbols":["free","pro","team"]}}]}]}]}"#,
    // Every other type it handles.
    r#"{"type":"record","name":"All","fields":[
      {"name":"n","type":"null"},{"name":"b","type":"boolean"},{"name":"i","type":"int"},
      {"name":"l","type":"long"},{"name":"f","type":"float"},{"name":"d","type":"double"},
      {"name":"s","type":"string"},
      {"name":"date","type":{"type":"int","logicalType":"date"}},
      {"name":"tm","type":{"type":"int","logicalType":"time-millis"}},
      {"name":"tu","type":{"type":"long","logicalType":"time-micros"}},
      {"name":"tsu","type":{"type":"long","logicalType":"timestamp-micros"}},
      {"name":"tsn","type":{"type":"long","logicalType":"timestamp-nanos"}},
      {"name":"ltm","type":{"type":"long","logicalType":"local-timestamp-millis"}},
      {"name":"ltu","type":{"type":"long","logicalType":"local-timestamp-micros"}},
      {"name":"arr","type":{"type":"array","items":["null","int","string"]}},
      {"name":"map","type":{"type":"map","values":{"type":"record","name":"V","namespace":"x.y",
        "fields":[{"name":"e","type":{"type":"enum","name":"E","symbols":["A","B"]}},
                  {"name":"again","type":["null","E"]}]}}},
      {"name":"v2","type":["null","x.y.V"]},
      {"name":"nested","type":{"type":"array","items":{"type":"map","values":"double"}}}]}"#,
    // Recursion: a linked list.
    r#"{"type":"record","name":"Node","fields":[
      {"name":"value","type":"int"},{"name":"next","type":["null","Node"]}]}"#,
];

/// xorshift: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const TEXTS: &[&str] = &[
    "",
    "a",
    "/p/1",
    "é\"\\\n\t",
    "日本語",
    "\u{1}\u{7f}",
    "{\"x\":1}",
];

fn named<'a>(s: &'a Schema, names: &mut HashMap<String, &'a Schema>) {
    match s {
        Schema::Record(r) => {
            names.insert(r.name.name().to_string(), s);
            for f in &r.fields {
                named(&f.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.name().to_string(), s);
        }
        Schema::Array(a) => named(&a.items, names),
        Schema::Map(m) => named(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| named(v, names)),
        _ => {}
    }
}

fn value(s: &Schema, names: &HashMap<String, &Schema>, r: &mut Rng, depth: usize) -> Value {
    let long = |r: &mut Rng| match r.below(4) {
        0 => 0,
        1 => -(r.below(1000) as i64),
        2 => r.next() as i64,
        _ => r.below(1 << 40) as i64,
    };
    match s {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(r.below(2) == 1),
        Schema::Int => Value::Int(long(r) as i32),
        Schema::Date => Value::Date(long(r) as i32),
        Schema::TimeMillis => Value::TimeMillis(long(r) as i32),
        Schema::Long => Value::Long(long(r)),
        Schema::TimeMicros => Value::TimeMicros(long(r)),
        Schema::TimestampMillis => Value::TimestampMillis(long(r)),
        Schema::TimestampMicros => Value::TimestampMicros(long(r)),
        Schema::TimestampNanos => Value::TimestampNanos(long(r)),
        Schema::LocalTimestampMillis => Value::LocalTimestampMillis(long(r)),
        Schema::LocalTimestampMicros => Value::LocalTimestampMicros(long(r)),
        Schema::Float => Value::Float(match r.below(5) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => 0.1,
            _ => (r.next() as i32) as f32 / 7.0,
        }),
        Schema::Double => Value::Double(match r.below(5) {
            0 => f64::NEG_INFINITY,
            1 => 1e300,
            2 => 0.5,
            _ => (r.next() as i64) as f64 / 3.0,
        }),
        Schema::String => Value::String(TEXTS[r.below(TEXTS.len() as u64) as usize].into()),
        Schema::Enum(e) => {
            let i = r.below(e.symbols.len() as u64) as usize;
            Value::Enum(i as u32, e.symbols[i].clone())
        }
        Schema::Array(a) => {
            let n = if depth > 3 { 0 } else { r.below(4) };
            Value::Array(
                (0..n)
                    .map(|_| value(&a.items, names, r, depth + 1))
                    .collect(),
            )
        }
        Schema::Map(m) => {
            let n = if depth > 3 { 0 } else { r.below(4) };
            Value::Map(
                (0..n)
                    .map(|k| (format!("k{k}\"é"), value(&m.types, names, r, depth + 1)))
                    .collect(),
            )
        }
        Schema::Union(u) => {
            // Deep down, the first variant (null) ends a recursion.
            let i = if depth > 5 {
                0
            } else {
                r.below(u.variants().len() as u64) as usize
            };
            Value::Union(
                i as u32,
                Box::new(value(&u.variants()[i], names, r, depth + 1)),
            )
        }
        Schema::Record(rec) => Value::Record(
            rec.fields
                .iter()
                .map(|f| (f.name.clone(), value(&f.schema, names, r, depth + 1)))
                .collect(),
        ),
        Schema::Ref { name } => value(names[name.name()], names, r, depth),
        other => panic!("no generator for {other:?}"),
    }
}

/// The reference: the crate's decoder, `to_json`, the event's object.
fn reference(schema: &Schema, body: &[u8]) -> Option<Json> {
    let mut b = body;
    let v = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .and_then(|r| r.read_value(&mut b))
        .ok()?;
    if !b.is_empty() {
        return None;
    }
    match crate::avro::to_json(v) {
        Json::Object(mut o) => {
            if o.get("properties").is_some_and(Json::is_null) {
                o.remove("properties");
            }
            Some(Json::Object(o))
        }
        _ => None,
    }
}

fn fast(p: &Program, body: &[u8]) -> Option<Json> {
    let mut out = b"junk".to_vec();
    match p.decode_event(body, &mut out) {
        Ok(()) => Some(serde_json::from_slice(&out[4..]).expect("valid JSON")),
        Err(()) => {
            assert_eq!(out, b"junk", "a failure leaves the output as it was");
            None
        }
    }
}

#[test]
fn the_compiled_decoder_writes_what_the_reference_path_gives() {
    crate::cap_avro_allocations();
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut decoded, mut damaged_ok) = (0, 0);
    for text in SCHEMAS {
        let schema = Schema::parse_str(text).unwrap();
        let program = Program::compile(&schema).expect("compiles");
        let mut names = HashMap::new();
        named(&schema, &mut names);
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap();
        for _ in 0..400 {
            let v = value(&schema, &names, &mut r, 0);
            let body = writer.write_value_to_vec(v).unwrap();
            let want = reference(&schema, &body).expect("the reference decodes it");
            assert_eq!(fast(&program, &body), Some(want), "{text}");
            decoded += 1;
            // Damaged: a byte changed, cut short, or a byte too many. What
            // the compiled decoder accepts, the reference reads the same.
            let mut bad = body.clone();
            match r.below(3) {
                0 if !bad.is_empty() => {
                    let i = r.below(bad.len() as u64) as usize;
                    bad[i] ^= 1 << r.below(8);
                }
                1 => bad.truncate(r.below(bad.len() as u64 + 1) as usize),
                _ => bad.push(r.below(256) as u8),
            }
            if let Some(got) = fast(&program, &bad) {
                assert_eq!(Some(got), reference(&schema, &bad), "{text}: {bad:?}");
                damaged_ok += 1;
            }
        }
    }
    assert_eq!(decoded, 1200);
    assert!(damaged_ok > 0);
}

#[test]
fn types_it_leaves_to_the_reference_are_not_compiled() {
    for text in [
        r#"{"type":"record","name":"R","fields":[{"name":"b","type":"bytes"}]}"#,
        r#"{"type":"record","name":"R","fields":[{"name":"f","type":{"type":"fixed","name":"F","size":4}}]}"#,
        r#"{"type":"record","name":"R","fields":[{"name":"u","type":{"type":"string","logicalType":"uuid"}}]}"#,
        r#""string""#,
    ] {
        assert!(
            Program::compile(&Schema::parse_str(text).unwrap()).is_none(),
            "{text}"
        );
    }
}

#[test]
fn hostile_counts_and_depths_go_to_the_reference() {
    let schema = Schema::parse_str(SCHEMAS[1]).unwrap();
    let p = Program::compile(&schema).unwrap();
    // A huge array of nulls would take no bytes per item.
    let list = Schema::parse_str(
        r#"{"type":"record","name":"R","fields":[{"name":"a","type":{"type":"array","items":"null"}}]}"#,
    )
    .unwrap();
    let lp = Program::compile(&list).unwrap();
    let mut out = Vec::new();
    // Count 2^40 (zigzag), then the end.
    let mut body = Vec::new();
    let mut z = (1u64 << 40) << 1;
    while z >= 0x80 {
        body.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    body.push(z as u8);
    body.push(0);
    assert!(lp.decode_event(&body, &mut out).is_err());
    assert!(out.is_empty());
    // A linked list (the registry refuses recursive schemas, but the
    // decoder must not follow one without bound): 5 nodes decode as the
    // reference does, 100 (200 levels) are past the limit.
    let node = Schema::parse_str(SCHEMAS[2]).unwrap();
    let np = Program::compile(&node).unwrap();
    let list = |n: usize| {
        let mut b = Vec::new();
        for _ in 0..n {
            b.extend_from_slice(&[2, 2]); // value 1, branch 1 (a Node)
        }
        b.extend_from_slice(&[2, 0]); // value 1, branch 0 (null)
        b
    };
    assert_eq!(fast(&np, &list(5)), reference(&node, &list(5)));
    assert!(fast(&np, &list(5)).is_some());
    assert!(np.decode_event(&list(100), &mut out).is_err());
    assert!(out.is_empty());
    let _ = p;
}
