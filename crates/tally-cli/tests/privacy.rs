//! Privacy and transport against the real server: personal data redacted
//! by `[privacy.<tenant>]` appears nowhere (data dir, archive, DLQ, every
//! answer) while distinct counts over the hashed `user_id` stay right; and
//! `[tls]` makes the listener speak HTTPS only, to a client that verifies
//! the certificate.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

const HOUR: i64 = 3_600_000;

fn now_ms() -> i64 {
    tally_types::Clock::system().now_ms()
}

/// The files under `dir` whose bytes hold `needle`.
fn grep(dir: &Path, needle: &str) -> Vec<String> {
    common::files_under(dir)
        .into_iter()
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// `POST /api/v1/events` of `evs` as NDJSON; must be 200: the answer
/// parsed and as text.
async fn ingest(c: &reqwest::Client, base: &str, evs: &[Value]) -> (Value, String) {
    let (s, a) = text(
        c.post(format!("{base}/api/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(common::ndjson(evs)),
    )
    .await;
    assert_eq!(s, 200, "{a}");
    (serde_json::from_str(&a).unwrap(), a)
}

async fn text(r: reqwest::RequestBuilder) -> (u16, String) {
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Tenant `acme` hashes `user_id`, drops `email`, masks `ip` and a
/// declared-int `code`; tenant `beta` has no rules and is the control that
/// shows the search would find the values if they were kept. Accepted,
/// rejected (bad timestamp; a type mismatch whose message would quote the
/// value) and late events all go through; then every answer, every file in
/// the data dir (log, state, DLQ, archive) and the archive read back with
/// SQL are searched for the original values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_values_appear_nowhere_and_distinct_counts_hold() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let conf = dir.path().join("tally.toml");
    std::fs::write(
        &conf,
        r#"
[archive]
seal-interval = "1s"

[privacy]
hash-key = "test-key-kept-outside-the-data"

[privacy.acme]
user_id = "hash"
"properties.email" = "drop"
properties.ip = "mask"
"properties.code" = "mask"

[schemas.acme]
code = "int"
"#,
    )
    .unwrap();
    let mut cfg = tally_server::Config::load_with_env(Some(&conf), Vec::new()).unwrap();
    cfg.listen = "127.0.0.1:0".into();
    cfg.data_dir = data.clone();
    let server = tally_server::Server::start(cfg.clone(), tally_types::Clock::system())
        .await
        .unwrap();
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let now = now_ms();
    let secrets = |t: &str, i: usize| {
        [
            format!("{t}-user-{:02}", i % 20),
            format!("{t}.person{i:02}@secret.example"),
            // Each tenant its own network, so the search tells them apart.
            if t == "acme" {
                format!("198.51.100.{}", 100 + i)
            } else {
                format!("203.0.113.{}", 100 + i)
            },
        ]
    };
    let event = |t: &str, i: usize, ts: i64| {
        let [u, e, ip] = secrets(t, i);
        json!({"event_id": format!("{t}-{i}"), "event_type": "signup", "timestamp": ts,
               "tenant": t, "user_id": u,
               "properties": {"email": e, "ip": ip, "code": 7, "plan": "pro"}})
    };
    let mut answers = String::new();
    for t in ["acme", "beta"] {
        let mut evs: Vec<Value> = (0..60).map(|i| event(t, i, now - i as i64 * 500)).collect();
        // Rejected: a bad timestamp, and a declared int sent as a string.
        let mut bad = event(t, 90, now);
        bad["timestamp"] = json!("yesterday");
        evs.push(bad);
        let mut mismatch = event(t, 91, now);
        mismatch["properties"]["code"] = json!(format!("{t}-code-9911"));
        evs.push(mismatch);
        let (v, a) = ingest(&c, &base, &evs).await;
        // beta declares no schema: its string `code` is taken.
        let (want_accepted, want_rejected) = if t == "acme" { (60, 2) } else { (61, 1) };
        assert_eq!(v["accepted"], want_accepted, "{v}");
        assert_eq!(v["rejected"], want_rejected, "{v}");
        answers.push_str(&a);
        // Late: two hours behind the tenant's clock.
        let late: Vec<Value> = (70..75).map(|i| event(t, i, now - 2 * HOUR)).collect();
        let (v, a) = ingest(&c, &base, &late).await;
        assert_eq!(v["late"], 5, "{v}");
        answers.push_str(&a);
    }
    // The mismatch message names the field but not the value.
    assert!(answers.contains("properties.code"), "{answers}");

    // Distinct users over the hashed ids: 20, as over the originals.
    let metrics = format!(
        "{base}/api/v1/metrics?metric=unique_users&start={}&end={}&granularity=1d&tenant=acme",
        now - HOUR,
        now + HOUR
    );
    let mut users = 0.0;
    for _ in 0..100 {
        let v = common::get(&c, metrics.clone()).await;
        users = v["series"][0]["points"][0][1].as_f64().unwrap_or(0.0);
        if users >= 20.0 {
            answers.push_str(&v.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(users, 20.0);
    let (s, sql) = common::post_sql(
        &c,
        &base,
        "acme",
        "SELECT count(DISTINCT user_id), min(user_id), max(properties) FROM events",
    )
    .await;
    assert_eq!(s, 200, "{sql}");
    assert_eq!(sql["rows"][0][0], 20, "{sql}");
    let key = ring_hmac("test-key-kept-outside-the-data", "acme-user-00");
    let (_, all) = common::post_sql(&c, &base, "acme", "SELECT * FROM events").await;
    assert!(all.to_string().contains(&key), "hash is HMAC-SHA256: {all}");
    assert!(all.to_string().contains("198.51.100.0"), "{all}");
    answers.push_str(&sql.to_string());
    answers.push_str(&all.to_string());
    for kind in ["late", "malformed"] {
        for t in ["acme", "beta"] {
            let v = common::get(&c, format!("{base}/api/v1/dlq?kind={kind}&tenant={t}")).await;
            assert!(
                !v["entries"].as_array().unwrap().is_empty(),
                "{kind} {t}: {v}"
            );
            answers.push_str(&v.to_string());
        }
    }
    // Wait for the archive to hold both tenants' events, then read it.
    for _ in 0..200 {
        if common::files_under(&data)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in ["acme", "beta"] {
        let (_, archived) = common::post_sql(&c, &base, t, "SELECT * FROM events").await;
        answers.push_str(&archived.to_string());
    }
    let live = common::get(&c, format!("{base}/api/v1/status")).await;
    answers.push_str(&live.to_string());
    server.stop().await.unwrap();

    let mut acme_secrets: Vec<String> = (0..92).flat_map(|i| secrets("acme", i)).collect();
    acme_secrets.push("acme-code-9911".into());
    for s in &acme_secrets {
        assert!(!answers.contains(s.as_str()), "{s} in an answer");
        let found = grep(&data, s);
        assert!(found.is_empty(), "{s} kept in {found:?}");
    }
    // The control: the same search finds beta's values (log, DLQ, answers).
    for s in [
        "beta-user-07",
        "beta.person03@secret.example",
        "beta-code-9911",
    ] {
        assert!(!grep(&data, s).is_empty(), "{s} should be in the data dir");
    }
    for s in [
        "beta.person03@secret.example",
        "beta.person90@secret.example",
        "beta-user-07",
    ] {
        assert!(answers.contains(s), "{s} should be in an answer");
    }
}

/// HMAC-SHA256 in hex, computed here independently of the server.
fn ring_hmac(key: &str, msg: &str) -> String {
    // RFC 2104 over SHA-256, by hand: the server uses ring.
    use sha2::{Digest, Sha256};
    let mut k = key.as_bytes().to_vec();
    if k.len() > 64 {
        k = Sha256::digest(&k).to_vec();
    }
    k.resize(64, 0);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg.as_bytes())
        .finalize();
    let outer = Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

const CA: &str = include_str!("fixtures/tls/ca.pem");

/// With `[tls]` the listener speaks HTTPS: a client that trusts the test CA
/// and verifies the certificate (for 127.0.0.1 and localhost) ingests and
/// reads; a plain-HTTP request gets no answer; a client that does not
/// trust the CA fails its handshake; a config with a cert and no key is
/// refused naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_a_verifying_client() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(&*manifest_dir()).join("tests/fixtures/tls");
    let server = common::start_server(dir.path(), |cfg| {
        cfg.tls.cert = Some(fixtures.join("server.pem"));
        cfg.tls.key = Some(fixtures.join("server.key"));
    })
    .await;
    let port = server.addr.port();
    let trusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(CA.as_bytes()).unwrap())
        .build()
        .unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let base = format!("https://{host}:{port}");
        let (s, body) =
            text(trusting.post(format!("{base}/api/v1/events")).body(
                json!({"event_id": host, "event_type": "t", "timestamp": now_ms()}).to_string(),
            ))
            .await;
        assert_eq!(s, 200, "{body}");
        let (s, _) = text(trusting.get(format!("{base}/healthz"))).await;
        assert_eq!(s, 200);
    }
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(
        plain
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err(),
        "plain HTTP must not be answered"
    );
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    let e = untrusting
        .get(format!("https://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .expect_err("an unknown CA fails verification");
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    server.stop().await.unwrap();

    let conf = dir.path().join("half.toml");
    std::fs::write(&conf, "[tls]\ncert = \"server.pem\"\n").unwrap();
    let e = tally_server::Config::load_with_env(Some(&conf), Vec::new()).unwrap_err();
    assert!(e.to_string().contains("set both cert and key"), "{e}");
    let mut cfg = tally_server::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().join("d2"),
        ..Default::default()
    };
    cfg.tls.cert = Some(dir.path().join("missing.pem"));
    cfg.tls.key = Some(fixtures.join("server.key"));
    let e = tally_server::Server::start(cfg, tally_types::Clock::system())
        .await
        .err()
        .expect("a missing certificate is refused");
    assert!(e.to_string().contains("tls.cert"), "{e}");
}

/// The crate's directory: cargo's at run time (a test executable reused
/// from a shared target dir may have been built from another checkout),
/// else where it was built.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
}
