use super::*;
use apache_avro::schema_compatibility::SchemaCompatibility;
use proptest::prelude::*;

fn avro(s: &str) -> apache_avro::Schema {
    apache_avro::Schema::parse_str(s).unwrap()
}

fn rec(fields: &str) -> String {
    format!(r#"{{"type":"record","name":"P","fields":[{fields}]}}"#)
}

/// (writer, reader, can the reader read the writer's data per the Avro
/// specification's schema resolution, does apache-avro's check agree).
/// Where it does not, apache-avro takes a writer's union or enum when the
/// reader reads some of its branches or symbols (decoding fails only when
/// another one comes); Confluent's registry (Java's SchemaCompatibility)
/// and this one refuse it, since such data can exist.
fn cases() -> Vec<(String, String, bool, bool)> {
    let f = |n: &str, t: &str| format!(r#"{{"name":"{n}","type":{t}}}"#);
    let fd = |n: &str, t: &str, d: &str| format!(r#"{{"name":"{n}","type":{t},"default":{d}}}"#);
    vec![
        // Same schema.
        (
            rec(&f("a", r#""int""#)),
            rec(&f("a", r#""int""#)),
            true,
            true,
        ),
        // Promotions and their reverses.
        (
            rec(&f("a", r#""int""#)),
            rec(&f("a", r#""long""#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#""int""#)),
            rec(&f("a", r#""double""#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#""long""#)),
            rec(&f("a", r#""float""#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#""float""#)),
            rec(&f("a", r#""double""#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#""string""#)),
            rec(&f("a", r#""bytes""#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#""bytes""#)),
            rec(&f("a", r#""string""#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#""long""#)),
            rec(&f("a", r#""int""#)),
            false,
            true,
        ),
        (
            rec(&f("a", r#""double""#)),
            rec(&f("a", r#""float""#)),
            false,
            true,
        ),
        (
            rec(&f("a", r#""string""#)),
            rec(&f("a", r#""int""#)),
            false,
            true,
        ),
        // A field added: with a default, without one.
        (
            rec(&f("a", r#""int""#)),
            format!(
                "{{\"type\":\"record\",\"name\":\"P\",\"fields\":[{},{}]}}",
                f("a", r#""int""#),
                fd("b", r#""string""#, r#""x""#)
            ),
            true,
            true,
        ),
        (
            rec(&f("a", r#""int""#)),
            format!(
                "{{\"type\":\"record\",\"name\":\"P\",\"fields\":[{},{}]}}",
                f("a", r#""int""#),
                f("b", r#""string""#)
            ),
            false,
            true,
        ),
        (
            rec(&f("a", r#""int""#)),
            format!(
                "{{\"type\":\"record\",\"name\":\"P\",\"fields\":[{},{}]}}",
                f("a", r#""int""#),
                fd("b", r#"["null","string"]"#, "null")
            ),
            true,
            true,
        ),
        // A field removed: readers ignore it.
        (
            format!(
                "{{\"type\":\"record\",\"name\":\"P\",\"fields\":[{},{}]}}",
                f("a", r#""int""#),
                f("b", r#""string""#)
            ),
            rec(&f("a", r#""int""#)),
            true,
            true,
        ),
        // Unions.
        (
            rec(&f("a", r#""int""#)),
            rec(&f("a", r#"["null","int"]"#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#"["null","int"]"#)),
            rec(&f("a", r#""int""#)),
            false,
            false,
        ),
        (
            rec(&f("a", r#"["int","string"]"#)),
            rec(&f("a", r#"["string","long"]"#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#"["int","string"]"#)),
            rec(&f("a", r#"["string"]"#)),
            false,
            false,
        ),
        // Enums.
        (
            rec(&f("e", r#"{"type":"enum","name":"E","symbols":["A","B"]}"#)),
            rec(&f(
                "e",
                r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#,
            )),
            true,
            true,
        ),
        (
            rec(&f(
                "e",
                r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#,
            )),
            rec(&f("e", r#"{"type":"enum","name":"E","symbols":["A","B"]}"#)),
            false,
            false,
        ),
        // Arrays and maps.
        (
            rec(&f("a", r#"{"type":"array","items":"int"}"#)),
            rec(&f("a", r#"{"type":"array","items":"long"}"#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#"{"type":"array","items":"long"}"#)),
            rec(&f("a", r#"{"type":"array","items":"int"}"#)),
            false,
            true,
        ),
        (
            rec(&f("a", r#"{"type":"map","values":"int"}"#)),
            rec(&f("a", r#"{"type":"map","values":"double"}"#)),
            true,
            true,
        ),
        (
            rec(&f("a", r#"{"type":"map","values":"string"}"#)),
            rec(&f("a", r#"{"type":"map","values":"int"}"#)),
            false,
            true,
        ),
        // Nested records.
        (
            rec(&f("n", &rec(&f("x", r#""int""#)).replace("\"P\"", "\"N\""))),
            rec(&f(
                "n",
                &rec(&f("x", r#""long""#)).replace("\"P\"", "\"N\""),
            )),
            true,
            true,
        ),
        (
            rec(&f(
                "n",
                &rec(&f("x", r#""long""#)).replace("\"P\"", "\"N\""),
            )),
            rec(&f("n", &rec(&f("x", r#""int""#)).replace("\"P\"", "\"N\""))),
            false,
            true,
        ),
        // Fixed.
        (
            rec(&f("x", r#"{"type":"fixed","name":"F","size":4}"#)),
            rec(&f("x", r#"{"type":"fixed","name":"F","size":8}"#)),
            false,
            true,
        ),
    ]
}

/// The checker's verdicts agree with apache-avro's over every case (and
/// with the case table's expectation).
#[test]
fn avro_compatibility_follows_the_specification() {
    for (w, r, want, agrees) in cases() {
        let (ws, rs) = (avro(&w), avro(&r));
        let ours = avro::breaks(&ws, &rs);
        let theirs = SchemaCompatibility::can_read(&ws, &rs).is_ok();
        assert_eq!(
            ours.is_empty(),
            want,
            "ours: {ours:?}\nwriter {w}\nreader {r}"
        );
        if agrees {
            assert_eq!(
                theirs, want,
                "apache-avro disagrees with the table:\nwriter {w}\nreader {r}"
            );
        }
    }
}

const V1: &str = r#"{"type":"record","name":"PageView","fields":[{"name":"url","type":"string"},{"name":"ms","type":"int"}]}"#;
const V2: &str = r#"{"type":"record","name":"PageView","fields":[{"name":"url","type":"string"},{"name":"ms","type":"long"},{"name":"country","type":["null","string"],"default":null}]}"#;
const V3_BAD: &str = r#"{"type":"record","name":"PageView","fields":[{"name":"url","type":"string"},{"name":"ms","type":"long"},{"name":"country","type":["null","string"],"default":null},{"name":"plan","type":"string"}]}"#;

#[test]
fn registration_evolves_and_refuses_a_breaking_change_naming_the_field() {
    let r = Registry::in_memory(Level::Backward);
    let a = r.register("t", "page_view", SchemaType::Avro, V1).unwrap();
    assert_eq!((a.id, a.version), (1, 1));
    // The same schema again (spaced differently): the same id and version.
    let again = r
        .register("t", "page_view", SchemaType::Avro, &format!("  {V1}  "))
        .unwrap();
    assert_eq!((again.id, again.version), (1, 1));
    let b = r.register("t", "page_view", SchemaType::Avro, V2).unwrap();
    assert_eq!((b.id, b.version), (2, 2));
    let e = r
        .register("t", "page_view", SchemaType::Avro, V3_BAD)
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (409, 409));
    let msg = e.to_string();
    assert!(
        msg.contains("field `plan` was added without a default") && msg.contains("BACKWARD"),
        "{msg}"
    );
    // FORWARD refuses what BACKWARD took: a narrowed reader type.
    r.set_level("t", Some("page_view"), Some(Level::Forward))
        .unwrap();
    let narrowed = V2.replace(r#""long""#, r#""int""#);
    assert!(
        r.compatibility("t", "page_view", None, SchemaType::Avro, &narrowed)
            .unwrap()
            .is_empty()
    );
    let widened = V2.replace(
        r#"{"name":"ms","type":"long"}"#,
        r#"{"name":"ms","type":"double"}"#,
    );
    let m = r
        .compatibility("t", "page_view", None, SchemaType::Avro, &widened)
        .unwrap();
    assert!(
        m.iter().any(|m| m.contains("field `ms` changed type")),
        "{m:?}"
    );
    // Same schema under another subject of the tenant: the same id; in
    // another tenant: a new one.
    assert_eq!(
        r.register("t", "other", SchemaType::Avro, V1).unwrap().id,
        1
    );
    let o = r.register("u", "page_view", SchemaType::Avro, V1).unwrap();
    assert_eq!(o.id, 3);
    assert!(r.by_id("t", 3).is_err() && r.by_id("u", 3).is_ok());
}

#[test]
fn transitive_rules_check_every_version() {
    let r = Registry::in_memory(Level::BackwardTransitive);
    let v1 = rec(r#"{"name":"a","type":"int"}"#);
    let v2 = rec(r#"{"name":"a","type":"int"},{"name":"b","type":"int","default":0}"#);
    // Drops b's default: fine against v2 alone? No: v2 data has b; v1 data
    // lacks it and b has no default — only the transitive check sees v1.
    let v3 = rec(r#"{"name":"a","type":"int"},{"name":"b","type":"int"}"#);
    r.register("t", "s", SchemaType::Avro, &v1).unwrap();
    r.register("t", "s", SchemaType::Avro, &v2).unwrap();
    let e = r.register("t", "s", SchemaType::Avro, &v3).unwrap_err();
    assert!(e.to_string().contains("version 1"), "{e}");
    r.set_level("t", Some("s"), Some(Level::Backward)).unwrap();
    assert_eq!(
        r.register("t", "s", SchemaType::Avro, &v3).unwrap().version,
        3
    );
}

#[test]
fn deletes_follow_confluents_soft_then_permanent_rule() {
    let r = Registry::in_memory(Level::Backward);
    r.register("t", "s", SchemaType::Avro, V1).unwrap();
    r.register("t", "s", SchemaType::Avro, V2).unwrap();
    assert_eq!(
        r.delete_version("t", "s", VersionRef::Number(2), true)
            .unwrap_err()
            .code(),
        40407
    );
    assert_eq!(
        r.delete_version("t", "s", VersionRef::Latest, false)
            .unwrap(),
        2
    );
    assert_eq!(r.versions("t", "s", false).unwrap(), vec![1]);
    assert_eq!(r.versions("t", "s", true).unwrap(), vec![1, 2]);
    assert_eq!(r.delete_subject("t", "s", true).unwrap_err().code(), 40405);
    assert_eq!(r.delete_subject("t", "s", false).unwrap(), vec![1]);
    assert_eq!(r.delete_subject("t", "s", false).unwrap_err().code(), 40404);
    assert!(r.subjects("t", false).is_empty());
    assert_eq!(r.subjects("t", true), vec!["s".to_string()]);
    // Registering again continues the numbering.
    assert_eq!(
        r.register("t", "s", SchemaType::Avro, V2).unwrap().version,
        3
    );
    r.delete_subject("t", "s", false).unwrap();
    assert_eq!(r.delete_subject("t", "s", true).unwrap(), vec![1, 2, 3]);
    assert_eq!(r.versions("t", "s", true).unwrap_err().code(), 40401);
}

#[test]
fn a_restart_keeps_every_id_version_and_rule_and_cuts_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Registry::open(dir.path(), Level::Backward, Limits::default()).unwrap();
    {
        let r = open();
        r.register("t", "page_view", SchemaType::Avro, V1).unwrap();
        r.register("t", "page_view", SchemaType::Avro, V2).unwrap();
        r.register("u", "j", SchemaType::Json, r#"{"type":"object"}"#)
            .unwrap();
        r.set_level("t", None, Some(Level::Full)).unwrap();
        r.delete_version("t", "page_view", VersionRef::Number(1), false)
            .unwrap();
    }
    // A crash in the middle of an append.
    let path = dir.path().join("registry.jsonl");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(br#"{"op":"register","tenant":"t","sub"#);
    std::fs::write(&path, &bytes).unwrap();
    let r = open();
    assert_eq!(
        r.version("t", "page_view", VersionRef::Latest, false)
            .unwrap()
            .schema
            .id,
        2
    );
    assert_eq!(r.versions("t", "page_view", true).unwrap(), vec![1, 2]);
    assert_eq!(r.by_id("u", 3).unwrap().schema_type, SchemaType::Json);
    assert_eq!(r.level("t", None, false).unwrap(), Level::Full);
    // The next id follows the last, after the torn line was cut.
    assert_eq!(
        r.register("t", "x", SchemaType::Avro, r#""string""#)
            .unwrap()
            .id,
        4
    );
    drop(r);
    assert_eq!(open().by_id("t", 4).unwrap().text, r#""string""#);
}

/// The format-1 file as this version writes it: read back as written.
#[test]
fn reads_the_format_1_fixture() {
    let dir = tempfile::tempdir().unwrap();
    // Cargo's directory at run time: a test executable reused from a
    // shared target dir may have been built from another checkout.
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    std::fs::copy(
        format!("{crate_dir}/tests/fixtures/registry-v1.jsonl"),
        dir.path().join("registry.jsonl"),
    )
    .unwrap();
    let r = Registry::open(dir.path(), Level::Backward, Limits::default()).unwrap();
    let v = r
        .version("default", "page_view", VersionRef::Latest, false)
        .unwrap();
    assert_eq!((v.version, v.schema.id), (2, 2));
    assert_eq!(
        r.level("default", Some("page_view"), false).unwrap(),
        Level::Full
    );
    assert_eq!(
        r.versions("default", "page_view", true).unwrap(),
        vec![1, 2]
    );
}

#[test]
fn a_damaged_log_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("registry.jsonl"),
        "{\"tally_registry\":1}\n{\"op\":\"nonsense\"}\n{\"op\":\"config\",\"tenant\":\"t\",\"subject\":null,\"level\":null}\n",
    )
    .unwrap();
    let e = Registry::open(dir.path(), Level::Backward, Limits::default()).unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
    std::fs::write(
        dir.path().join("registry.jsonl"),
        "{\"tally_registry\":9}\n",
    )
    .unwrap();
    let e = Registry::open(dir.path(), Level::Backward, Limits::default()).unwrap_err();
    assert!(e.to_string().contains("newer"), "{e}");
}

fn props(json: &str) -> Vec<(Cow<'static, str>, &'static RawValue)> {
    let m: BTreeMap<String, Box<RawValue>> = serde_json::from_str(json).unwrap();
    m.into_iter()
        .map(|(k, v)| (Cow::Owned(k), &*Box::leak(v)))
        .collect()
}

#[test]
fn events_are_checked_against_the_latest_or_the_named_version() {
    let r = Registry::in_memory(Level::Backward);
    assert!(
        r.check_event("t", "page_view", None, &props(r#"{"ms":"x"}"#))
            .is_ok()
    );
    r.register("t", "page_view", SchemaType::Avro, V1).unwrap();
    r.register("t", "page_view", SchemaType::Avro, V2).unwrap();
    assert!(
        r.check_event(
            "t",
            "page_view",
            None,
            &props(r#"{"url":"/","ms":5000000000,"extra":1}"#)
        )
        .is_ok()
    );
    let e = r
        .check_event("t", "page_view", None, &props(r#"{"url":"/","ms":"slow"}"#))
        .unwrap_err();
    assert!(
        e.starts_with("properties.ms: expected long, got a string") && e.contains("version 2"),
        "{e}"
    );
    // Version 1 has an int: 5e9 does not fit.
    let e = r
        .check_event(
            "t",
            "page_view",
            Some(1),
            &props(r#"{"url":"/","ms":5000000000}"#),
        )
        .unwrap_err();
    assert!(e.contains("expected int") && e.contains("version 1"), "{e}");
    let e = r
        .check_event("t", "page_view", None, &props(r#"{"ms":1}"#))
        .unwrap_err();
    assert!(
        e.starts_with("properties.url: expected string, got nothing"),
        "{e}"
    );
    let e = r
        .check_event("t", "page_view", Some(7), &props(r#"{}"#))
        .unwrap_err();
    assert!(e.contains("no version 7 (versions: 1, 2)"), "{e}");
    let e = r
        .check_event("t", "click", Some(1), &props(r#"{}"#))
        .unwrap_err();
    assert!(e.contains("no registered schema"), "{e}");
    // JSON Schema.
    r.register(
        "t",
        "click",
        SchemaType::Json,
        r#"{"type":"object","properties":{"x":{"type":"integer"}},"required":["x"]}"#,
    )
    .unwrap();
    assert!(
        r.check_event("t", "click", None, &props(r#"{"x":3}"#))
            .is_ok()
    );
    let e = r
        .check_event("t", "click", None, &props(r#"{"x":"3"}"#))
        .unwrap_err();
    assert!(
        e.starts_with("properties.x:") && e.contains("version 1"),
        "{e}"
    );
}

/// Avro binary of a record by hand: the encoding is the specification's.
fn zigzag(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    zigzag(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

#[test]
fn frames_decode_with_the_writer_schema_resolved_to_the_latest() {
    let r = Registry::in_memory(Level::Backward);
    let id = r
        .register("t", "page_view", SchemaType::Avro, V1)
        .unwrap()
        .id;
    let mut frame = vec![0];
    frame.extend_from_slice(&id.to_be_bytes());
    string("/home", &mut frame);
    zigzag(42, &mut frame);
    let v = r.decode_frame("t", &frame).unwrap();
    assert_eq!(v, serde_json::json!({"url": "/home", "ms": 42}));
    // After v2 the same v1 frame reads with the new field's default and
    // the widened type.
    r.register("t", "page_view", SchemaType::Avro, V2).unwrap();
    let v = r.decode_frame("t", &frame).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"url": "/home", "ms": 42, "country": null})
    );
    // Clear refusals.
    assert!(
        r.decode_frame("u", &frame)
            .unwrap_err()
            .contains("not registered for tenant")
    );
    assert!(
        r.decode_frame("t", &frame[..3])
            .unwrap_err()
            .contains("got 3 bytes")
    );
    let mut bad = frame.clone();
    bad[0] = 1;
    assert!(
        r.decode_frame("t", &bad)
            .unwrap_err()
            .contains("magic byte 1")
    );
    let mut long = frame.clone();
    long.push(9);
    assert!(
        r.decode_frame("t", &long)
            .unwrap_err()
            .contains("1 bytes follow")
    );
}

#[test]
fn sql_columns_follow_the_latest_versions() {
    use tally_types::schema::PropType;
    let r = Registry::in_memory(Level::None);
    r.register("t", "page_view", SchemaType::Avro, V1).unwrap();
    r.register("t", "page_view", SchemaType::Avro, V2).unwrap();
    r.register(
        "t",
        "buy",
        SchemaType::Json,
        r#"{"type":"object","properties":{"ms":{"type":"number"},"country":{"type":"integer"},"ok":{"type":"boolean"}}}"#,
    )
    .unwrap();
    // An envelope record is not a properties schema.
    r.register(
        "t",
        "events-value",
        SchemaType::Avro,
        r#"{"type":"record","name":"E","fields":[{"name":"timestamp","type":"long"},{"name":"properties","type":{"type":"map","values":"string"}}]}"#,
    )
    .unwrap();
    let cols: BTreeMap<String, PropType> = r
        .property_columns("t")
        .into_iter()
        .map(|(name, c)| (name, c.ty))
        .collect();
    let want: BTreeMap<String, PropType> = [
        ("url".to_string(), PropType::String),
        ("ms".to_string(), PropType::Float),
        ("ok".to_string(), PropType::Bool),
    ]
    .into_iter()
    .collect();
    // country: a string in page_view, an integer in buy: left out.
    assert_eq!(cols, want);
    assert!(r.property_columns("nobody").is_empty());
}

/// What SQL columns read when an event lacks a property: a renamed
/// field's older names (Avro aliases) and each event type's default.
#[test]
fn property_fills_are_aliases_and_defaults_per_event_type() {
    use tally_types::schema::ColumnFill;
    let r = Registry::in_memory(Level::None);
    r.register(
        "t",
        "signup",
        SchemaType::Avro,
        r#"{"type":"record","name":"S","fields":[{"name":"tier","type":"string","aliases":["plan"],"default":"free"},{"name":"ref","type":["null","string"],"default":null}]}"#,
    )
    .unwrap();
    r.register(
        "t",
        "order",
        SchemaType::Json,
        r#"{"type":"object","properties":{"currency":{"type":"string","default":"EUR"},"tier":{"type":"string","default":"gold"}}}"#,
    )
    .unwrap();
    // The fills of the columns that have one.
    let fills: BTreeMap<String, ColumnFill> = r
        .property_columns("t")
        .into_iter()
        .map(|(name, c)| (name, c.fill))
        .filter(|(_, f)| *f != ColumnFill::default())
        .collect();
    assert_eq!(
        fills.get("tier"),
        Some(&ColumnFill {
            aliases: vec!["plan".into()],
            defaults: vec![
                ("order".into(), serde_json::json!("gold")),
                ("signup".into(), serde_json::json!("free")),
            ],
        })
    );
    assert_eq!(
        fills.get("currency").map(|f| f.defaults.clone()),
        Some(vec![("order".into(), serde_json::json!("EUR"))])
    );
    // A null default fills nothing.
    assert!(!fills.contains_key("ref"), "{fills:?}");
    assert!(r.property_columns("nobody").is_empty());
}

#[test]
fn levels_and_versions_parse_and_refuse_clearly() {
    assert_eq!(
        Level::parse("full_transitive").unwrap(),
        Level::FullTransitive
    );
    assert_eq!(Level::parse("SOMETIMES").unwrap_err().code(), 42203);
    assert_eq!(VersionRef::parse("latest").unwrap(), VersionRef::Latest);
    assert_eq!(VersionRef::parse("-1").unwrap(), VersionRef::Latest);
    assert_eq!(VersionRef::parse("0").unwrap_err().code(), 42202);
    assert_eq!(
        SchemaType::parse(Some("PROTOBUF")).unwrap_err().code(),
        42201
    );
    let r = Registry::in_memory(Level::Backward);
    assert_eq!(
        r.register("t", "s", SchemaType::Avro, "{")
            .unwrap_err()
            .code(),
        42201
    );
    assert_eq!(
        r.register(
            "t",
            "s",
            SchemaType::Avro,
            r#"{"type":"record","name":"X"}"#
        )
        .unwrap_err()
        .code(),
        42201
    );
    assert_eq!(
        r.register("t", "", SchemaType::Avro, V1)
            .unwrap_err()
            .code(),
        42208
    );
    let list = r#"{"type":"record","name":"L","fields":[{"name":"next","type":["null","L"],"default":null}]}"#;
    let e = r.register("t", "s", SchemaType::Avro, list).unwrap_err();
    assert!(e.to_string().contains("type L contains itself"), "{e}");
}

proptest! {
    /// The log reader takes any bytes without a panic: records, a torn
    /// tail, or an error naming a line.
    #[test]
    fn the_log_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = store::parse(&bytes);
    }

    /// The frame decoder takes any bytes after a registered id without a
    /// panic.
    #[test]
    fn the_frame_decoder_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let r = Registry::in_memory(Level::Backward);
        let id = r.register("t", "s", SchemaType::Avro, V2).unwrap().id;
        let mut frame = vec![0];
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(&tail);
        let _ = r.decode_frame("t", &frame);
    }
}

/// Kafka messages name no tenant: the schema id's owner fills it in, the
/// same whether the record is decoded straight to text or through values.
#[test]
fn owned_events_read_the_same_both_ways() {
    let r = Registry::in_memory(Level::Backward);
    let env = r#"{"type":"record","name":"E","fields":[
        {"name":"event_id","type":"string"},{"name":"event_type","type":"string"},
        {"name":"timestamp","type":"long"},
        {"name":"properties","type":["null",{"type":"record","name":"P","fields":[{"name":"url","type":"string"}]}]}]}"#;
    let id = r
        .register("acme", "events-value", SchemaType::Avro, env)
        .unwrap()
        .id;
    let with_tenant = r#"{"type":"record","name":"T","fields":[{"name":"tenant","type":["null","string"]},{"name":"event_id","type":"string"}]}"#;
    let tid = r
        .register("acme", "other-value", SchemaType::Avro, with_tenant)
        .unwrap()
        .id;
    let frame = |id: u32, body: &dyn Fn(&mut Vec<u8>)| {
        let mut f = vec![0];
        f.extend_from_slice(&id.to_be_bytes());
        body(&mut f);
        f
    };
    let frames = [
        frame(id, &|f| {
            string("e1", f);
            string("page_view", f);
            zigzag(1_780_000_000_000, f);
            zigzag(1, f);
            string("/home", f);
        }),
        // A null properties is left out.
        frame(id, &|f| {
            string("e2", f);
            string("click", f);
            zigzag(5, f);
            zigzag(0, f);
        }),
        // The record's own tenant field (null here) is kept as it is.
        frame(tid, &|f| {
            zigzag(0, f);
            string("e3", f);
        }),
    ];
    for f in &frames {
        let mut text = b"[".to_vec();
        r.decode_owned_event_into(f, &mut text).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&text[1..]).unwrap();
        let want = serde_json::Value::Object(r.decode_owned_event(f).unwrap());
        assert_eq!(got, want);
    }
    let mut text = Vec::new();
    r.decode_owned_event_into(&frames[0], &mut text).unwrap();
    // Decoded straight to text (the values path would sort the keys).
    assert!(
        text.starts_with(br#"{"tenant":"acme","event_id":"e1","#),
        "{}",
        String::from_utf8_lossy(&text)
    );
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["properties"]["url"], "/home");
}
