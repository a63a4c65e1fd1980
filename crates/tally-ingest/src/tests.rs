use super::*;
use proptest::prelude::*;
use tally_types::BatchReader;

fn events(p: &Parsed) -> Vec<String> {
    let mut out = Vec::new();
    for (_, w) in &p.partitions {
        let bytes = w.clone().finish();
        for e in BatchReader::new(&bytes).unwrap() {
            out.push(e.unwrap().to_json());
        }
    }
    out
}

#[test]
fn single_object_array_and_ndjson() {
    let one = br#"{"event_id":"a","event_type":"click","timestamp":"2026-11-01T12:00:00Z"}"#;
    let p = parse_body(one, Format::Json, Tenancy::Open, 4).unwrap();
    assert_eq!((p.accepted, p.rejected.len()), (1, 0));

    let arr = br#"[{"event_id":"a","event_type":"click","timestamp":1788264000000},
                   {"event_id":"b","event_type":"view","timestamp":"2026-11-01T12:00:00.250Z","user_id":"u1",
                    "properties":{"page":"/x","duration_ms":120,"revenue":9.99,"ok":true,"nested":{"a":[1,2]},"n":null}}]"#;
    let p = parse_body(arr, Format::Json, Tenancy::Open, 4).unwrap();
    assert_eq!((p.accepted, p.rejected.len()), (2, 0));
    let evs = events(&p);
    assert!(
        evs.iter()
            .any(|e| e.contains(r#""duration_ms":120"#) && e.contains(r#""nested":{"a":[1,2]}"#))
    );

    let nd = b"{\"event_id\":\"a\",\"event_type\":\"x\",\"timestamp\":1}\n\nnot json\n{\"event_id\":\"b\",\"event_type\":\"x\",\"timestamp\":2}\n";
    let p = parse_body(nd, Format::Ndjson, Tenancy::Open, 4).unwrap();
    assert_eq!(p.accepted, 2);
    assert_eq!(p.rejected.len(), 1);
    assert_eq!(p.rejected[0].index, 2);
    assert!(
        p.rejected[0].error.starts_with("json: "),
        "{}",
        p.rejected[0].error
    );
    // NDJSON without the content type is recognised.
    let p = parse_body(nd, Format::Json, Tenancy::Open, 4).unwrap();
    assert_eq!(p.accepted, 2);
}

#[test]
fn rejections_name_the_field() {
    let arr = br#"[
      {"event_type":"click","timestamp":1},
      {"event_id":"","event_type":"click","timestamp":1},
      {"event_id":"a","event_type":"bad type!","timestamp":1},
      {"event_id":"a","event_type":"x","timestamp":"yesterday"},
      {"event_id":"a","event_type":"x","timestamp":"2026-11-01T12:00:00"},
      {"event_id":"a","event_type":"x","timestamp":-5},
      {"event_id":"a","event_type":"x","timestamp":1,"properties":[1]},
      {"event_id":"a","event_type":"x","timestamp":1,"user_id":7},
      "just a string",
      {"event_id":"ok","event_type":"x","timestamp":1},
      {"event_id":"a","event_type":"x","timestamp":1,"tenant":"../etc"},
      {"event_id":"a","event_type":"x","timestamp":1.5}
    ]"#;
    let p = parse_body(arr, Format::Json, Tenancy::Open, 2).unwrap();
    assert_eq!(p.accepted, 1);
    let errs: Vec<(usize, &str)> = p
        .rejected
        .iter()
        .map(|r| (r.index, r.error.as_str()))
        .collect();
    let prefixes = [
        (0, "event_id:"),
        (1, "event_id:"),
        (2, "event_type:"),
        (3, "timestamp: not RFC 3339 or epoch ms"),
        (4, "timestamp: not RFC 3339 or epoch ms"),
        (5, "timestamp:"),
        (6, "properties:"),
        (7, "user_id:"),
        (8, "event:"),
        (10, "tenant:"),
        (11, "timestamp:"),
    ];
    assert_eq!(errs.len(), prefixes.len(), "{errs:?}");
    for ((i, e), (pi, pp)) in errs.iter().zip(prefixes) {
        assert_eq!(*i, pi);
        assert!(e.starts_with(pp), "index {i}: {e}");
    }
    assert!(p.rejected[0].is_object);
    assert!(!p.rejected[8].is_object);
}

/// An array body is read in one pass; it accepts and rejects exactly what
/// the same events sent as NDJSON (read line by line) do, with the same
/// indexes, reasons and tenants, and rejected texts that hold the same
/// JSON (written back compact: no whitespace between tokens).
#[test]
fn array_body_reads_like_the_same_lines_as_ndjson() {
    let elements = [
        r#"{"event_id":"a","event_type":"x","timestamp":1,"properties":{"k": 1}}"#,
        r#"{"event_id":"","event_type":"x","timestamp":1,"tenant":"t2"}"#,
        r#"42"#,
        r#"{"event_id":"b","event_type":"x","timestamp":2,"tenant":"t2","extra":[1,{"z":null}]}"#,
        r#""a \"string\"""#,
        r#"[1, {"event_id":"c"}]"#,
        r#"null"#,
        r#"true"#,
        r#"-1.5e3"#,
        r#"{"event_id":"d","event_type":"x","timestamp":"yesterday","properties":{"s":"é\n"}}"#,
        r#"{ "event_id" : "e" , "event_type" : "y" , "timestamp" : 3 }"#,
        r#"{ "event_id" : "f" , "event_type" : "bad type!" , "timestamp" : 4 , "x\u0041" : [1, 2] , "x\u0041" : 0 }"#,
    ];
    let array = format!("[{}]", elements.join(",\n  "));
    let lines = elements.join("\n");
    let a = parse_body(array.as_bytes(), Format::Json, Tenancy::Open, 2).unwrap();
    let n = parse_body(lines.as_bytes(), Format::Ndjson, Tenancy::Open, 2).unwrap();
    assert_eq!(a.accepted, 3);
    assert_eq!(a.accepted, n.accepted);
    assert_eq!(a.tenants, n.tenants);
    let view = |p: &Parsed| {
        p.rejected
            .iter()
            .map(|r| (r.index, r.error.clone(), r.tenant.clone(), r.is_object))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&a), view(&n));
    let got: Vec<(usize, &str)> = a
        .rejected
        .iter()
        .map(|r| (r.index, r.raw.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, elements[1]),
            (2, "42"),
            (4, elements[4]),
            (5, r#"[1,{"event_id":"c"}]"#),
            (6, "null"),
            (7, "true"),
            (8, "-1500.0"),
            (9, elements[9]),
            (
                11,
                r#"{"event_id":"f","event_type":"bad type!","timestamp":4,"xA":[1, 2],"xA":0}"#
            ),
        ]
    );
    // The same JSON as the client's text, value for value.
    for (x, y) in a.rejected.iter().zip(&n.rejected) {
        let v = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        assert_eq!(v(&x.raw), v(&y.raw), "{}", y.raw);
    }
    assert_eq!(
        a.rejected[1].error,
        "event: must be a JSON object, got a number"
    );
    assert_eq!(
        a.rejected[3].error,
        "event: must be a JSON object, got an array"
    );
    assert_eq!(a.rejected[0].tenant, "t2");
    let sorted = |p: &Parsed| {
        let mut v = events(p);
        v.sort();
        v
    };
    assert_eq!(sorted(&a), sorted(&n));
    // A syntax error anywhere in the array stores nothing.
    let broken = format!("[{},{{\"event_id\":]", elements[0]);
    assert!(parse_body(broken.as_bytes(), Format::Json, Tenancy::Open, 2).is_err());
}

#[test]
fn keyed_mode_forbids_other_tenants() {
    let arr = br#"[{"event_id":"a","event_type":"x","timestamp":1,"tenant":"acme"},
                   {"event_id":"b","event_type":"x","timestamp":1,"tenant":"evil"},
                   {"event_id":"c","event_type":"x","timestamp":1}]"#;
    let p = parse_body(arr, Format::Json, Tenancy::Keyed("acme"), 2).unwrap();
    assert_eq!(p.accepted, 2);
    assert_eq!(p.rejected.len(), 1);
    assert_eq!(p.rejected[0].tenant, "acme");
    assert!(events(&p).iter().all(|e| e.contains(r#""tenant":"acme""#)));
}

#[test]
fn whole_body_errors() {
    assert_eq!(
        parse_body(b"  ", Format::Json, Tenancy::Open, 1).unwrap_err(),
        BodyError::Empty
    );
    assert!(matches!(
        parse_body(b"hello", Format::Json, Tenancy::Open, 1),
        Err(BodyError::NotJson(_))
    ));
    assert!(matches!(
        parse_body(b"[1,2", Format::Json, Tenancy::Open, 1),
        Err(BodyError::NotJson(_))
    ));
    assert!(matches!(
        parse_body(b"42", Format::Json, Tenancy::Open, 1),
        Err(BodyError::WrongShape(_))
    ));
    assert!(matches!(
        parse_body(b"garbage\nmore", Format::Ndjson, Tenancy::Open, 1),
        Err(BodyError::NotJson(_))
    ));
    let p = parse_body(b"[]", Format::Json, Tenancy::Open, 1).unwrap();
    assert_eq!((p.accepted, p.rejected.len()), (0, 0));
}

#[test]
fn escaped_strings_are_decoded() {
    let one = br#"{"event_id":"a\"b","event_type":"x","timestamp":1,"user_id":"\u00e9","properties":{"k\n":"v\\"}}"#;
    let p = parse_body(one, Format::Json, Tenancy::Open, 1).unwrap();
    let bytes = p.partitions[0].1.clone().finish();
    let e = BatchReader::new(&bytes).unwrap().next().unwrap().unwrap();
    assert_eq!(e.event_id, "a\"b");
    assert_eq!(e.user_id, Some("é"));
    assert_eq!(e.props().next().unwrap(), ("k\n", PropValue::Str("v\\")));
}

proptest! {
    // Arbitrary bytes never panic the parser, and accepted + rejected never
    // exceeds the number of items the body could hold.
    #[test]
    fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        for f in [Format::Json, Format::Ndjson] {
            if let Ok(p) = parse_body(&body, f, Tenancy::Open, 3) {
                prop_assert!(p.accepted + p.rejected.len() <= body.len());
            }
        }
    }

    #[test]
    fn valid_events_roundtrip(id in "[a-z0-9]{1,20}", ty in "[a-z_]{1,10}", ts in 0i64..4_000_000_000_000, v in any::<i32>()) {
        let body = format!(r#"{{"event_id":"{id}","event_type":"{ty}","timestamp":{ts},"properties":{{"v":{v}}}}}"#);
        let p = parse_body(body.as_bytes(), Format::Json, Tenancy::Open, 5).unwrap();
        prop_assert_eq!(p.accepted, 1);
        let bytes = p.partitions[0].1.clone().finish();
        let e = BatchReader::new(&bytes).unwrap().next().unwrap().unwrap();
        prop_assert_eq!(e.ts, ts);
        prop_assert_eq!(e.props().next().unwrap().1, PropValue::Int(v as i64));
    }
}

/// The properties of the one event `body` holds: as the reader gives them
/// (one entry per key, values as JSON) and as the raw store's JSON text.
fn read_props(body: &str) -> (serde_json::Map<String, serde_json::Value>, usize, String) {
    let p = parse_body(body.as_bytes(), Format::Json, Tenancy::Open, 1).unwrap();
    assert_eq!((p.accepted, p.rejected.len()), (1, 0), "{body}");
    let bytes = p.partitions[0].1.clone().finish();
    let e = BatchReader::new(&bytes).unwrap().next().unwrap().unwrap();
    let mut m = serde_json::Map::new();
    let mut n = 0;
    for (k, v) in e.props() {
        let v = match v {
            PropValue::Null => serde_json::Value::Null,
            PropValue::Bool(b) => b.into(),
            PropValue::Int(i) => i.into(),
            PropValue::Float(f) => f.into(),
            PropValue::Str(s) => s.into(),
            PropValue::Json(j) => serde_json::from_str(j).unwrap(),
        };
        assert!(m.insert(k.to_string(), v).is_none(), "key {k:?} read twice");
        n += 1;
    }
    assert_eq!(n, e.n_props());
    (m, n, e.props_json())
}

fn body_with(props: &str) -> String {
    format!(r#"{{"event_id":"a","event_type":"x","timestamp":1,"properties":{props}}}"#)
}

#[test]
fn compact_properties_are_kept_as_sent_and_read_the_same() {
    // Compact, no escapes: the client's text is kept byte for byte.
    let text = r#"{"f":1.50,"z":-0,"big":12345678901234567890,"s":"é €","j":{"a":[1,"}"]},"b":false,"n":null}"#;
    let (m, n, json) = read_props(&body_with(text));
    assert_eq!(json, text);
    assert_eq!(n, 7);
    assert_eq!(m["f"], serde_json::json!(1.5));
    assert_eq!(m["z"], serde_json::json!(0));
    assert_eq!(m["big"], serde_json::json!(12345678901234567890f64));
    assert_eq!(m["s"], "é €");
    assert_eq!(m["j"], serde_json::json!({"a": [1, "}"]}));
    // Whitespace between tokens or a repeated key: kept as text too, made
    // compact (values as sent, so `1.50` stays `1.50`; nested JSON as sent).
    // Escapes and numbers no f64 holds: read value by value and rendered.
    for (sent, rendered) in [
        (r#"{"f": 1.50, "s": "x"}"#, r#"{"f":1.50,"s":"x"}"#),
        (
            "{ \"j\" : {\"a\": [1, 2]},\n\t\"n\": null }",
            r#"{"j":{"a": [1, 2]},"n":null}"#,
        ),
        (r#"{"a":1,"a":2}"#, r#"{"a":2}"#),
        (r#"{"a": 1, "b": true, "a": 2}"#, r#"{"a":2,"b":true}"#),
        (r#"{"s":"a\nb\u00e9"}"#, r#"{"s":"a\nbé"}"#),
        (r#"{"s": "a\nb"}"#, r#"{"s":"a\nb"}"#),
        (r#"{"k\u0041":1}"#, r#"{"kA":1}"#),
        (r#"{"k\u0041": 1.50}"#, r#"{"kA":1.5}"#),
    ] {
        let (_, _, json) = read_props(&body_with(sent));
        assert_eq!(json, rendered, "{sent}");
    }
}

/// A property value and its JSON text.
fn prop_value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        // Few digits: serde_json (the oracle) reads these exactly.
        (any::<i32>(), 0u8..100, -3i8..4).prop_map(|(i, d, e)| format!("{i}.{d:02}e{e}")),
        "[a-zé\"\\\\\n /€]{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("true".to_string()),
        Just("false".to_string()),
        Just("null".to_string()),
        Just(r#"{"a": [1, "]}\""]}"#.to_string()),
    ]
}

proptest! {
    /// Whatever form ingest keeps the properties in (the client's text or
    /// value by value), the reader and the raw store's JSON text give what
    /// serde_json reads from the body: one value per key, the last one for
    /// repeated keys.
    #[test]
    fn properties_read_back_as_sent(
        pairs in proptest::collection::vec(("[a-c]{1,2}|k\\\\n|é", prop_value_text()), 1..6),
        spaced in any::<bool>(),
    ) {
        let (sep, colon) = if spaced { (", ", ": ") } else { (",", ":") };
        let text = format!(
            "{{{}}}",
            pairs
                .iter()
                .map(|(k, v)| format!("\"{k}\"{colon}{v}"))
                .collect::<Vec<_>>()
                .join(sep)
        );
        let want: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let (got, n, json) = read_props(&body_with(&text));
        prop_assert_eq!(n, want.len());
        prop_assert_eq!(&got, &want);
        let rendered: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&rendered, &want);
    }
}

#[test]
fn declared_properties_are_checked_against_their_tenants_schema() {
    use tally_types::schema::PropType;
    let mut schemas = tally_types::schema::Schemas::new();
    schemas.insert(
        "acme".into(),
        [
            ("duration_ms".to_string(), PropType::Float),
            ("page".to_string(), PropType::String),
            ("qty".to_string(), PropType::Int),
            ("ok".to_string(), PropType::Bool),
        ]
        .into_iter()
        .collect(),
    );
    let schemas = Arc::new(schemas);
    let ev = |tenant: &str, id: &str, props: &str| {
        format!(
            r#"{{"event_id":"{id}","event_type":"click","timestamp":1788264000000,"tenant":"{tenant}","properties":{props}}}"#
        )
    };
    let lines = [
        ev(
            "acme",
            "good",
            r#"{"duration_ms":12,"page":"/x","qty":3,"ok":true,"extra":"anything"}"#,
        ),
        ev("acme", "nulls", r#"{"duration_ms":null,"page":null}"#),
        ev("acme", "absent", r#"{"other":1}"#),
        ev("acme", "bad-float", r#"{"duration_ms":"fast"}"#),
        ev("acme", "bad-int", r#"{"qty":1.5}"#),
        ev("acme", "bad-bool", r#"{"ok":"yes"}"#),
        ev("acme", "bad-string", r#"{"page":7}"#),
        // Another tenant declares nothing: anything goes.
        ev("zeta", "free", r#"{"duration_ms":"fast"}"#),
    ];
    // The same events as NDJSON, as a JSON array and one by one: every path
    // through the parser checks the schema.
    let ndjson = lines.join("\n");
    let array = format!("[{}]", lines.join(","));
    for (body, format) in [
        (ndjson.as_str(), Format::Ndjson),
        (array.as_str(), Format::Json),
    ] {
        let p = Parser::with_schemas(2, schemas.clone())
            .parse(body.as_bytes(), format, Tenancy::Open)
            .unwrap();
        assert_eq!(p.accepted, 4, "{format:?}");
        let bad: Vec<(usize, &str, &str)> = p
            .rejected
            .iter()
            .map(|r| (r.index, r.tenant.as_str(), r.error.as_str()))
            .collect();
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert_eq!(
            bad[0],
            (
                3,
                "acme",
                "properties.duration_ms: expected float, got \"fast\" (tenant \"acme\" declares duration_ms as float; send a JSON number or change the schema)"
            )
        );
        assert!(
            bad[1]
                .2
                .starts_with("properties.qty: expected int, got 1.5"),
            "{}",
            bad[1].2
        );
        assert!(
            bad[2]
                .2
                .starts_with("properties.ok: expected bool, got \"yes\""),
            "{}",
            bad[2].2
        );
        assert!(
            bad[3]
                .2
                .starts_with("properties.page: expected string, got 7"),
            "{}",
            bad[3].2
        );
        assert!(
            p.rejected
                .iter()
                .all(|r| r.is_object && r.raw.contains("\"event_id\""))
        );
        assert_eq!(
            p.tenants,
            vec![("acme".to_string(), 3), ("zeta".to_string(), 1)]
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let p = Parser::with_schemas(2, schemas.clone())
            .parse(line.as_bytes(), Format::Json, Tenancy::Open)
            .unwrap();
        assert_eq!(p.accepted + p.rejected.len(), 1);
        assert_eq!(p.accepted == 1, !(3..7).contains(&i), "{line}");
    }
    // Keyed: the tenant comes from the key.
    let p = Parser::with_schemas(1, schemas)
        .parse(
            br#"{"event_id":"k","event_type":"click","timestamp":1788264000000,"properties":{"qty":"3"}}"#,
            Format::Json,
            Tenancy::Keyed("acme"),
        )
        .unwrap();
    assert_eq!((p.accepted, p.rejected.len()), (0, 1));
}

/// A number no 64-bit float holds is rejected, naming the property and the
/// value, not stored as null.
#[test]
fn numbers_past_f64_are_rejected() {
    for props in [
        r#"{"x":1e400}"#,
        r#"{"x": -1e400, "y": 1}"#,
        r#"{"ok": 1e308, "x": 2E999}"#,
    ] {
        let body = format!(
            r#"{{"event_id":"a","event_type":"t","timestamp":1793534400000,"properties":{props}}}"#
        );
        let p = parse_body(body.as_bytes(), Format::Json, Tenancy::Open, 1).unwrap();
        assert_eq!(p.accepted, 0, "{props}");
        let e = &p.rejected[0].error;
        assert!(
            e.starts_with("properties.x: ") && e.contains("64-bit float"),
            "{e}"
        );
    }
    let body = r#"{"event_id":"a","event_type":"t","timestamp":1793534400000,"properties":{"x":1e308,"big":123456789012345678901234567890}}"#;
    assert_eq!(
        parse_body(body.as_bytes(), Format::Json, Tenancy::Open, 1)
            .unwrap()
            .accepted,
        1
    );
}

/// Nesting past the limit is rejected naming the property, the depth and
/// the setting; at the limit it is kept.
#[test]
fn deep_nesting_is_rejected_at_the_limit() {
    let nested = |levels: usize| format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
    let body = |levels: usize| {
        format!(
            r#"{{"event_id":"a","event_type":"t","timestamp":1793534400000,"properties":{{"deep":{},"s":"[[[[[[[[[["}}}}"#,
            nested(levels)
        )
    };
    let mut p = Parser::new(1).with_max_depth(10);
    let ok = p
        .parse(body(8).as_bytes(), Format::Json, Tenancy::Open)
        .unwrap();
    assert_eq!(ok.accepted, 1, "{:?}", ok.rejected);
    let bad = p
        .parse(body(9).as_bytes(), Format::Json, Tenancy::Open)
        .unwrap();
    assert_eq!(bad.accepted, 0);
    let e = &bad.rejected[0].error;
    assert!(
        e.starts_with("properties.deep: nested 11 levels") && e.contains("ingest.max-json-depth"),
        "{e}"
    );
}

/// With a size limit (Kafka mode), an event larger than one record of the
/// events topic is refused on its own, naming its size and the limit; the
/// others of the body are taken.
#[test]
fn events_past_the_size_limit_are_refused_alone() {
    let event = |id: &str, blob: usize| {
        format!(
            r#"{{"event_id":"{id}","event_type":"t","timestamp":1793534400000,"properties":{{"blob":"{}"}}}}"#,
            "x".repeat(blob)
        )
    };
    let body = format!(
        "{}\n{}\n{}",
        event("a", 10),
        event("b", 5000),
        event("c", 900)
    );
    let mut p = Parser::new(1).with_max_event_bytes(Some(1000));
    let parsed = p
        .parse(body.as_bytes(), Format::Ndjson, Tenancy::Open)
        .unwrap();
    assert_eq!(parsed.accepted, 2, "{:?}", parsed.rejected);
    let e = &parsed.rejected[0].error;
    assert!(
        e.starts_with("the event takes 5")
            && e.contains("more than the 1000")
            && e.contains("Kafka mode"),
        "{e}"
    );
    // No limit: all taken.
    let parsed = Parser::new(1)
        .parse(body.as_bytes(), Format::Ndjson, Tenancy::Open)
        .unwrap();
    assert_eq!(parsed.accepted, 3);
}

/// Redaction happens before encoding: the batch holds the hashed user,
/// the masked address, no e-mail; rejected events of the tenant are kept
/// redacted, in every body shape; other tenants are untouched.
#[test]
fn privacy_rules_apply_before_encoding() {
    let p = Arc::new(
        Privacy::new(
            b"key",
            [(
                "acme".to_string(),
                vec![
                    ("user_id".to_string(), "hash".to_string()),
                    ("properties.email".to_string(), "drop".to_string()),
                    ("properties.ip".to_string(), "mask".to_string()),
                    ("properties.ctx.phone".to_string(), "mask".to_string()),
                ],
            )],
        )
        .unwrap(),
    );
    let body = br#"[
      {"event_id":"a","event_type":"x","timestamp":1,"tenant":"acme","user_id":"u-secret","properties":{"email":"e@secret.example","ip":"203.0.113.77","plan":"pro","ctx":{"phone":"+1 555 0100 999"}}},
      {"event_id":"b","event_type":"x","timestamp":"never","tenant":"acme","user_id":"u-secret","properties":{"email":"e@secret.example"}},
      {"event_id":"c","event_type":"x","timestamp":1,"tenant":"beta","user_id":"u-plain","properties":{"email":"e@plain.example"}}
    ]"#;
    for format in [Format::Json, Format::Ndjson] {
        let text = match format {
            Format::Json => body.to_vec(),
            Format::Ndjson => {
                let v: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
                v.iter()
                    .map(|e| format!("{e}\n"))
                    .collect::<String>()
                    .into_bytes()
            }
        };
        let parsed = Parser::new(2)
            .with_privacy(Some(p.clone()))
            .parse(&text, format, Tenancy::Open)
            .unwrap();
        assert_eq!((parsed.accepted, parsed.rejected.len()), (2, 1));
        let evs = events(&parsed).join("\n");
        for secret in ["u-secret", "e@secret.example", "203.0.113.77", "0100 999"] {
            assert!(!evs.contains(secret), "{secret} in {evs}");
        }
        assert!(evs.contains(&p.hash("u-secret")), "{evs}");
        assert!(
            evs.contains("203.0.113.0") && evs.contains("\"plan\":\"pro\""),
            "{evs}"
        );
        assert!(
            evs.contains("u-plain") && evs.contains("e@plain.example"),
            "{evs}"
        );
        let r = &parsed.rejected[0];
        assert!(
            !r.raw.contains("u-secret") && !r.raw.contains("e@secret"),
            "{}",
            r.raw
        );
        assert!(r.error.starts_with("timestamp:"), "{}", r.error);
    }
}

/// A reused parser judges each body's future skew against the "now" it
/// was last moved to (Kafka mode: each message's timestamp).
#[test]
fn a_reused_parser_judges_the_future_from_its_latest_now() {
    let t = 1_793_534_400_000; // 2026-11-01T12:00:00Z
    let body = br#"{"event_id":"a","event_type":"click","timestamp":"2026-11-01T12:00:00Z"}"#;
    let mut p = Parser::new(1).with_future_limit(t - 3_600_000, 60_000);
    let r = p.parse(body, Format::Json, Tenancy::Open).unwrap();
    assert_eq!(
        (r.accepted, r.rejected.len()),
        (0, 1),
        "an hour ahead of now"
    );
    p.set_now(t);
    let r = p.parse(body, Format::Json, Tenancy::Open).unwrap();
    assert_eq!((r.accepted, r.rejected.len()), (1, 0));
    // Without a limit there is nothing to move.
    let mut p = Parser::new(1);
    p.set_now(0);
    assert_eq!(
        p.parse(body, Format::Json, Tenancy::Open).unwrap().accepted,
        1
    );
}
