//! The committed example config documents every key with its default.

use std::path::Path;

#[test]
fn example_config_loads_and_matches_defaults() {
    let path = Path::new(&*manifest_dir()).join("../../tally.example.toml");
    let cfg = tally_runtime::Config::load(Some(&path)).expect("example config parses");
    let def = tally_runtime::Config::default();
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
    let e = tally_runtime::Config::load(Some(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("partitons"), "{e}");
    std::fs::write(&p, "[stream]\nallowed-lateness = \"soon\"\n").unwrap();
    let e = tally_runtime::Config::load(Some(&p))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stream.allowed-lateness") && e.contains("soon"),
        "{e}"
    );
}

#[test]
fn api_keys_load_from_toml_and_bad_ones_name_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    let digest = tally_runtime::keys::to_hex(&tally_runtime::keys::digest("s3cret-acme-read"));
    std::fs::write(
        &p,
        format!(
            "[auth]\nkeys = [\n  {{ key = \"s3cret-acme-ingest\", tenant = \"acme\", scopes = [\"ingest\"] }},\n  {{ key-sha256 = \"{digest}\", tenant = \"acme\", scopes = [\"read\"], name = \"grafana\" }},\n]\n\n[quotas]\nevents-per-second = 5000\n[quotas.tenants.acme]\nevents-per-second = 50000\nburst-events = 100000\n"
        ),
    )
    .unwrap();
    let cfg = tally_runtime::Config::load(Some(&p)).expect("keys parse");
    assert_eq!(cfg.auth.keys.len(), 2);
    assert!(
        tally_runtime::keys::Keys::from_config(&cfg.auth)
            .unwrap()
            .keyed()
    );
    assert_eq!(cfg.quotas.of("acme").events_per_second, 50_000);
    assert_eq!(cfg.quotas.of("other").events_per_second, 5000);

    for (text, wants) in [
        (
            "[auth]\nkeys = [{ key = \"k\", tenant = \"acme\", scopes = [\"write\"] }]\n",
            &["auth.keys[0]", "\"write\"", "ingest"][..],
        ),
        (
            "[auth]\nkeys = [{ key = \"k\", tenant = \"a b\", scopes = [\"read\"] }]\n",
            &["auth.keys[0]", "tenant", "\"a b\""][..],
        ),
        (
            "[auth]\nkeys = [{ tenant = \"acme\", scopes = [\"read\"] }]\n",
            &["auth.keys[0]", "tally keys new"][..],
        ),
        (
            "[auth]\nkeys = [{ key = \"k\", tenant = \"a\", scopes = [\"read\"] }, { key = \"k\", tenant = \"b\", scopes = [\"read\"] }]\n",
            &["auth.keys[1]", "distinct"][..],
        ),
        (
            "[auth]\nkeys = [{ key-sha256 = \"abc\", tenant = \"a\", scopes = [\"read\"] }]\n",
            &["auth.keys[0]", "64 hex"][..],
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let e = tally_runtime::Config::load(Some(&p))
            .unwrap_err()
            .to_string();
        for w in wants {
            assert!(e.contains(w), "{text} → {e} (wanted {w})");
        }
    }
}

#[test]
fn tenant_schemas_load_from_toml_and_bad_ones_say_the_fix() {
    use tally_types::schema::PropType;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tally.toml");
    std::fs::write(
        &p,
        "[schemas.acme]\npage = \"string\"\nduration_ms = \"float\"\nqty = \"int\"\nok = \"bool\"\n",
    )
    .unwrap();
    let cfg = tally_runtime::Config::load(Some(&p)).expect("schemas parse");
    let acme = &cfg.schemas["acme"];
    assert_eq!(acme["page"], PropType::String);
    assert_eq!(acme["duration_ms"], PropType::Float);
    assert_eq!(acme["qty"], PropType::Int);
    assert_eq!(acme["ok"], PropType::Bool);
    for (text, wants) in [
        ("[schemas.acme]\npage = \"text\"\n", &["text", "string"][..]),
        (
            "[schemas.acme]\nts = \"int\"\n",
            &["schemas.acme.ts", "already a column", "json_get_"][..],
        ),
        (
            "[schemas.\"a b\"]\npage = \"string\"\n",
            &["schemas.a b", "tenant name"][..],
        ),
    ] {
        std::fs::write(&p, text).unwrap();
        let e = tally_runtime::Config::load(Some(&p))
            .expect_err(text)
            .to_string();
        for w in wants {
            assert!(e.contains(w), "{text}: {e}");
        }
    }
}

/// Field names from the environment are kebab-case (`GROUP_ID` →
/// `group-id`); names that are map keys (tenants, properties) keep their
/// underscores.
#[test]
fn environment_keeps_tenant_and_property_names() {
    let env = [
        ("TALLY__SCHEMAS__ACME_CORP__DURATION_MS", "float"),
        ("TALLY__QUOTAS__TENANTS__BIG_ONE__EVENTS_PER_SECOND", "7"),
        ("TALLY__STREAM__ALLOWED_LATENESS", "10m"),
        ("TALLY__INGEST__MAX_FUTURE_SKEW", "1h"),
        ("TALLY__SHEDDING__LOW_PRIORITY", "[\"ping\"]"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let cfg = tally_runtime::Config::load_with_env(None, env).unwrap();
    let acme = cfg.schemas.get("acme_corp").expect("tenant acme_corp");
    assert!(acme.contains_key("duration_ms"), "{acme:?}");
    assert_eq!(cfg.quotas.of("big_one").events_per_second, 7);
    assert_eq!(cfg.stream.allowed_lateness, "10m");
    assert_eq!(cfg.durations().unwrap().max_future_skew_ms, 3_600_000);
    assert_eq!(cfg.shedding.low_priority, vec!["ping".to_string()]);
}

/// `[privacy]`: the key and the rules from TOML (quoted and unquoted dotted
/// fields) and from the environment (tenant and field names verbatim);
/// unknown fields and actions are refused naming the fix.
#[test]
fn privacy_rules_load_from_toml_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(
        &f,
        "[privacy]\nhash-key = \"k1\"\n[privacy.\"*\"]\nuser_id = \"hash\"\n[privacy.acme]\n\"properties.email\" = \"drop\"\nproperties.ip = \"mask\"\n",
    )
    .unwrap();
    let env = [
        ("TALLY__PRIVACY__HASH_KEY", "k2"),
        ("TALLY__PRIVACY__ACME_CORP__SESSION_ID", "mask"),
        ("TALLY__PRIVACY__ACME_CORP__PROPERTIES__PHONE_NO", "drop"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let cfg = tally_runtime::Config::load_with_env(Some(&f), env).unwrap();
    assert_eq!(cfg.privacy.hash_key, "k2");
    let mut rules = cfg.privacy.rules().unwrap();
    rules.iter_mut().for_each(|(_, f)| f.sort());
    rules.sort();
    assert_eq!(
        rules,
        vec![
            ("*".into(), vec![("user_id".into(), "hash".into())]),
            (
                "acme".into(),
                vec![
                    ("properties.email".into(), "drop".into()),
                    ("properties.ip".into(), "mask".into())
                ]
            ),
            (
                "acme_corp".into(),
                vec![
                    ("properties.phone_no".into(), "drop".into()),
                    ("session_id".into(), "mask".into())
                ]
            ),
        ]
    );
    let p = cfg.privacy.build(dir.path()).unwrap().unwrap();
    assert_eq!(p.hash("x").len(), 64);

    for (text, want) in [
        ("[privacy.acme]\nemail = \"drop\"\n", "properties.<name>"),
        ("[privacy.acme]\nuser_id = \"encrypt\"\n", "\"mask\""),
        ("[privacy]\nacme = \"hash\"\n", "must be a table"),
    ] {
        std::fs::write(&f, text).unwrap();
        let e = tally_runtime::Config::load_with_env(Some(&f), Vec::new()).unwrap_err();
        assert!(e.to_string().contains(want), "{text}: {e}");
    }

    // No key configured: one is made once and kept, so hashes are stable.
    std::fs::write(&f, "[privacy.acme]\nuser_id = \"hash\"\n").unwrap();
    let cfg = tally_runtime::Config::load_with_env(Some(&f), Vec::new()).unwrap();
    let a = cfg.privacy.build(dir.path()).unwrap().unwrap().hash("u");
    let b = cfg.privacy.build(dir.path()).unwrap().unwrap().hash("u");
    assert_eq!(a, b);
    assert!(dir.path().join("privacy-hash-key").exists());
}

#[test]
fn kafka_section_from_toml_and_environment() {
    // Absent: embedded mode.
    let cfg = tally_runtime::Config::load_with_env(None, Vec::new()).unwrap();
    assert!(cfg.kafka.is_none());
    let env = vec![
        (
            "TALLY__KAFKA__BROKERS".to_string(),
            "127.0.0.1:9092".to_string(),
        ),
        ("TALLY__KAFKA__GROUP_ID".to_string(), "g1".to_string()),
        (
            "TALLY__KAFKA__CLIENT__SECURITY_PROTOCOL".to_string(),
            "SASL_SSL".to_string(),
        ),
        (
            "TALLY__KAFKA__CLIENT__LINGER_MS".to_string(),
            "5".to_string(),
        ),
    ];
    let cfg = tally_runtime::Config::load_with_env(None, env).unwrap();
    let k = cfg.kafka.expect("kafka mode");
    assert_eq!(k.brokers, "127.0.0.1:9092");
    assert_eq!(k.group_id, "g1");
    assert_eq!(k.topic_events, "user_events");
    assert_eq!(k.topic_aggregates, "aggregates");
    assert_eq!(k.topic_late, "late_events");
    let client: Vec<(String, String)> = k
        .client
        .iter()
        .map(|(a, b)| (a.clone(), b.to_string()))
        .collect();
    assert_eq!(
        client,
        vec![
            ("linger.ms".to_string(), "5".to_string()),
            ("security.protocol".to_string(), "SASL_SSL".to_string()),
        ]
    );
    // A section without brokers, or with a bad topic, names the key and the fix.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(&f, "[kafka]\ngroup-id = \"x\"\n").unwrap();
    let e = tally_runtime::Config::load_with_env(Some(&f), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("kafka.brokers"), "{e}");
    std::fs::write(&f, "[kafka]\nbrokers = \"b:1\"\ntopic-events = \"a b\"\n").unwrap();
    let e = tally_runtime::Config::load_with_env(Some(&f), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("kafka.topic-events") && e.contains("letters"),
        "{e}"
    );
    // The topics named after the group are checked as the group makes them.
    std::fs::write(&f, "[kafka]\nbrokers = \"b:1\"\ngroup-id = \"my group\"\n").unwrap();
    let e = tally_runtime::Config::load_with_env(Some(&f), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("kafka.topic-alerts") && e.contains("my group_alerts"),
        "{e}"
    );
}

#[test]
fn dimensions_from_toml_and_environment() {
    let cfg = tally_runtime::Config::load_with_env(None, Vec::new()).unwrap();
    let d = cfg.dimensions.build().unwrap();
    assert_eq!(d.describe("any"), "event_type, country, device, page");
    let env = vec![
        (
            "TALLY__DIMENSIONS__DEFAULT".to_string(),
            "plan, region".to_string(),
        ),
        (
            "TALLY__DIMENSIONS__TENANTS__ACME_CO".to_string(),
            r#"["tier"]"#.to_string(),
        ),
        (
            "TALLY__DIMENSIONS__MAX_VALUES".to_string(),
            "50".to_string(),
        ),
    ];
    let cfg = tally_runtime::Config::load_with_env(None, env).unwrap();
    let d = cfg.dimensions.build().unwrap();
    assert_eq!(d.describe("x"), "event_type, plan, region");
    assert_eq!(d.describe("acme_co"), "event_type, tier");
    assert_eq!(d.max_values, 50);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(&f, "[dimensions.tenants]\nacme = [\"country\", \"a=b\"]\n").unwrap();
    let e = tally_runtime::Config::load_with_env(Some(&f), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dimensions.tenants.acme") && e.contains("a=b"),
        "{e}"
    );
    std::fs::write(&f, "[dimensions]\nmax-values = 0\n").unwrap();
    let e = tally_runtime::Config::load_with_env(Some(&f), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dimensions.max-values"), "{e}");
}

/// The crate's directory: cargo's at run time (a test executable reused
/// from a shared target dir may have been built from another checkout),
/// else where it was built.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
