//! The schema registry against Confluent's own Python client (PyPI
//! `confluent-kafka[avro,schemaregistry]`, installed by `scripts/test` /
//! `.ci/run`): a producer registers a schema, evolves it three times, is
//! refused on a breaking change, looks schemas up by id and version, and
//! sends `AvroSerializer` bytes to `POST /api/v1/events`, which Tally
//! decodes, validates, counts and serves in SQL beside JSON events written
//! under an older version. Ids survive a restart; in keyed mode the key
//! (as basic-auth password) scopes the registry to its tenant.

mod common;

use common::{key, rows, start_server, wait_events};
use serde_json::{Value, json};

const CLIENT_SCRIPT: &str = r#"
import sys, json, urllib.request
from confluent_kafka.schema_registry import SchemaRegistryClient, Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import SerializationContext, MessageField

base, secret, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
conf = {"url": base + "/api/v1/registry"}
if secret:
    conf["basic.auth.user.info"] = "producer:" + secret
sr = SchemaRegistryClient(conf)
out = {}

def avro(fields):
    return Schema(json.dumps({"type": "record", "name": "PageView", "namespace": "shop",
                              "fields": fields}), "AVRO")

url = {"name": "url", "type": "string"}
ms = {"name": "ms", "type": "int"}
country = {"name": "country", "type": ["null", "string"], "default": None}
plan = {"name": "plan", "type": "string", "default": "free"}
ids = [sr.register_schema("page_view", avro([url, ms]))]
ids.append(sr.register_schema("page_view", avro([url, ms, country])))      # optional field
ids.append(sr.register_schema("page_view", avro([url, ms, country, plan])))  # with a default
ids.append(sr.register_schema("page_view", avro([url, ms, plan])))           # removed, had a default
out["ids"] = ids
out["again"] = sr.register_schema("page_view", avro([url, ms]))
bad = avro([url, ms, plan, {"name": "referrer", "type": "string"}])
out["bad_compatible"] = sr.test_compatibility("page_view", bad)
try:
    sr.register_schema("page_view", bad)
    out["refused"] = None
except SchemaRegistryError as e:
    out["refused"] = [e.http_status_code, e.error_code, e.error_message]
out["versions"] = sr.get_versions("page_view")
out["latest"] = sr.get_latest_version("page_view").version
out["v1_id"] = sr.get_version("page_view", 1).schema_id
out["by_id"] = json.loads(sr.get_schema(ids[0]).schema_str)
out["subjects_before"] = sr.get_subjects()
out["level"] = sr.get_compatibility()

# The producer's envelope: Tally's fields plus the properties record.
envelope = {"type": "record", "name": "Event", "namespace": "shop", "fields": [
    {"name": "event_id", "type": "string"},
    {"name": "event_type", "type": "string"},
    {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "user_id", "type": ["null", "string"], "default": None},
    {"name": "properties", "type": {"type": "record", "name": "Props", "fields": [url, ms, plan]}},
]}
ser = AvroSerializer(sr, json.dumps(envelope))
ctx = SerializationContext("events", MessageField.VALUE)
def frame(i):
    return ser({"event_id": "avro-%d" % i, "event_type": "page_view", "timestamp": t0 + i * 1000,
                "user_id": "u%d" % (i % 3),
                "properties": {"url": "/p/%d" % i, "ms": 100 + i, "plan": "pro"}}, ctx)

def post(body):
    req = urllib.request.Request(base + "/api/v1/events", data=body, method="POST",
                                 headers={"Content-Type": "application/vnd.confluent.avro"})
    if secret:
        req.add_header("Authorization", "Bearer " + secret)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())

def zigzag(n):
    z, b = (n << 1) ^ (n >> 63), bytearray()
    while True:
        if z < 0x80:
            b.append(z)
            return bytes(b)
        b.append((z & 0x7f) | 0x80)
        z >>= 7

out["single"] = post(frame(0))
batch = b"".join(zigzag(len(f)) + f for f in (frame(i) for i in range(1, 5)))
out["batch"] = post(batch)
# A retried record counts once.
out["retry"] = post(frame(0))
# A frame of an unknown schema id: rejected, kept in the malformed DLQ.
out["bad_frame"] = post(bytes([0, 0, 0, 3, 231, 2, 4]))
out["subjects"] = sr.get_subjects()
print(json.dumps(out))
"#;

async fn run_client(base: &str, secret: &str, t0: i64) -> Value {
    let (base, secret) = (base.to_string(), secret.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", CLIENT_SCRIPT, &base, &secret, &t0.to_string()])
            .output()
            .expect("python3 runs (scripts/test installs confluent-kafka)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "Confluent's client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn now_ms() -> i64 {
    tally_types::Clock::system().now_ms()
}

async fn post_events(c: &reqwest::Client, base: &str, events: &[Value]) -> Value {
    let r = c
        .post(format!("{base}/api/v1/events"))
        .body(common::ndjson(events))
        .header("content-type", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    body(r).await
}

async fn body(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluents_client_registers_evolves_and_sends_avro_that_sql_serves() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let t0 = now_ms() - 60_000;
    // A JSON event of the type before any schema: taken as it comes.
    let v = post_events(
        &c,
        &base,
        &[json!({"event_id": "json-0", "event_type": "page_view", "timestamp": t0, "properties": {"url": "/old", "ms": "fast"}})],
    )
    .await;
    assert_eq!(v["accepted"], 1, "{v}");

    let out = run_client(&base, "", t0).await;
    assert_eq!(out["ids"], json!([1, 2, 3, 4]), "{out}");
    assert_eq!(out["again"], 1, "the same schema keeps its id");
    assert_eq!(out["bad_compatible"], false);
    let refused = &out["refused"];
    assert_eq!(
        (refused[0].as_u64(), refused[1].as_u64()),
        (Some(409), Some(409)),
        "{out}"
    );
    let msg = refused[2].as_str().unwrap();
    assert!(
        msg.contains("field `referrer` was added without a default") && msg.contains("BACKWARD"),
        "{msg}"
    );
    assert_eq!(out["versions"], json!([1, 2, 3, 4]));
    assert_eq!(
        (out["latest"].as_u64(), out["v1_id"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(out["by_id"]["fields"][1]["name"], "ms");
    assert_eq!(out["subjects_before"], json!(["page_view"]));
    assert_eq!(out["level"], "BACKWARD");
    assert_eq!(out["subjects"], json!(["events-value", "page_view"]));
    // Avro events: one frame, then four length-prefixed; the retry is a
    // duplicate of the first.
    assert_eq!(
        (
            out["single"]["accepted"].as_u64(),
            out["single"]["rejected"].as_u64()
        ),
        (Some(1), Some(0)),
        "{out}"
    );
    assert_eq!(out["batch"]["accepted"], 4, "{out}");
    let bad = &out["bad_frame"];
    assert_eq!(
        (bad["accepted"].as_u64(), bad["rejected"].as_u64()),
        (Some(0), Some(1)),
        "{bad}"
    );
    assert_eq!(bad["errors"][0]["index"], 0, "{bad}");
    assert!(
        bad["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("schema id 999 is not registered"),
        "{bad}"
    );

    // JSON events are checked against the latest version (4: url string,
    // ms int, plan string with a default) or the one they name.
    let v = post_events(
        &c,
        &base,
        &[
            json!({"event_id": "json-1", "event_type": "page_view", "timestamp": t0 + 10, "properties": {"url": "/a", "ms": 7}}),
            json!({"event_id": "json-2", "event_type": "page_view", "timestamp": t0 + 20, "properties": {"url": 5, "ms": 7}}),
            json!({"event_id": "json-3", "event_type": "page_view", "timestamp": t0 + 30, "schema_version": 2, "properties": {"url": "/b", "ms": 8, "country": "DE"}}),
            json!({"event_id": "json-4", "event_type": "page_view", "timestamp": t0 + 40, "schema_version": 9, "properties": {"url": "/c", "ms": 1}}),
            json!({"event_id": "json-5", "event_type": "other", "timestamp": t0 + 50, "properties": {"anything": [1]}}),
        ],
    )
    .await;
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    let e = v["errors"][0]["error"].as_str().unwrap();
    assert!(
        e.starts_with("properties.url: expected string, got an integer") && e.contains("version 4"),
        "{e}"
    );
    assert!(
        v["errors"][1]["error"]
            .as_str()
            .unwrap()
            .contains("no version 9 (versions: 1, 2, 3, 4)"),
        "{v}"
    );
    let dlq = common::get(&c, format!("{base}/api/v1/dlq?kind=malformed")).await;
    assert!(
        dlq.to_string().contains("properties.url: expected string"),
        "{dlq}"
    );
    assert!(dlq.to_string().contains("avro: schema id 999"), "{dlq}");

    // Served in SQL beside the event written before any schema.
    wait_events(&c, &base, "default", 1 + 5 + 3).await;
    let r = rows(
        &c,
        &base,
        "default",
        "SELECT count(*), count(DISTINCT event_id), min(json_get_str(properties, 'url')), max(json_get_int(properties, 'ms')) FROM events WHERE event_id LIKE 'avro-%'",
    )
    .await;
    assert_eq!(r[0], vec![json!(5), json!(5), json!("/p/0"), json!(104)]);
    let r = rows(
        &c,
        &base,
        "default",
        "SELECT json_get_str(properties, 'ms') FROM events WHERE event_id = 'json-0'",
    )
    .await;
    assert_eq!(r[0][0], "fast");
    // The registry's latest versions are typed columns of `events`: rows
    // without a field (written before it, or untyped) read null.
    let r = rows(
        &c,
        &base,
        "default",
        "SELECT max(ms), min(url), count(plan) FROM events WHERE event_id LIKE 'avro-%'",
    )
    .await;
    assert_eq!(r[0], vec![json!(104), json!("/p/0"), json!(5)]);
    let r = rows(
        &c,
        &base,
        "default",
        "SELECT ms FROM events WHERE event_id = 'json-0'",
    )
    .await;
    assert_eq!(r[0][0], Value::Null, "\"fast\" is not an int");
    // A field with a default reads it where an event of the type lacks
    // it (json-1 was sent without `plan`; version 4 says "free"); other
    // types do not.
    let r = rows(
        &c,
        &base,
        "default",
        "SELECT event_id, plan FROM events WHERE event_id IN ('avro-1', 'json-1', 'json-5') ORDER BY event_id",
    )
    .await;
    assert_eq!(
        r,
        vec![
            vec![json!("avro-1"), json!("pro")],
            vec![json!("json-1"), json!("free")],
            vec![json!("json-5"), Value::Null],
        ]
    );

    // Each row keeps the version its properties were checked against:
    // the one named, else the latest (Avro frames are resolved to it);
    // none for a type without a schema or an event sent before one.
    let r = rows(
        &c,
        &base,
        "default",
        "SELECT event_id, schema_version FROM events WHERE event_id IN ('avro-1', 'json-0', 'json-1', 'json-3', 'json-5') ORDER BY event_id",
    )
    .await;
    assert_eq!(
        r,
        vec![
            vec![json!("avro-1"), json!(4)],
            vec![json!("json-0"), Value::Null],
            vec![json!("json-1"), json!(4)],
            vec![json!("json-3"), json!(2)],
            vec![json!("json-5"), Value::Null],
        ]
    );

    // The status lists subjects and versions.
    let st = common::get(&c, format!("{base}/api/v1/status")).await;
    assert_eq!(
        st["registry"]["default"]["page_view"],
        json!([1, 2, 3, 4]),
        "{st}"
    );
    server.stop().await.unwrap();

    // A restart keeps every id and version.
    let server = start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let v = common::get(&c, format!("{base}/api/v1/registry/schemas/ids/4")).await;
    assert!(v["schema"].as_str().unwrap().contains("\"plan\""), "{v}");
    let v = common::get(
        &c,
        format!("{base}/api/v1/registry/subjects/events-value/versions/latest"),
    )
    .await;
    assert_eq!(
        (v["id"].as_u64(), v["version"].as_u64()),
        (Some(5), Some(1)),
        "{v}"
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_scope_the_registry_to_their_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.auth.keys = vec![
            key("acme-producer", "acme", &["ingest", "read"]),
            key("globex-reader", "globex", &["read"]),
            key("acme-admin", "acme", &["admin"]),
        ];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let out = run_client(&base, "acme-producer", now_ms() - 60_000).await;
    assert_eq!(out["ids"], json!([1, 2, 3, 4]), "{out}");
    assert_eq!(out["batch"]["accepted"], 4, "{out}");
    let get = |path: &str, secret: &str| {
        let c = c.clone();
        let url = format!("{base}{path}");
        let secret = secret.to_string();
        async move {
            let r = c.get(url).bearer_auth(secret).send().await.unwrap();
            let s = r.status().as_u16();
            (s, body(r).await)
        }
    };
    // Another tenant's key sees an empty registry, and cannot name acme.
    assert_eq!(
        get("/api/v1/registry/subjects", "globex-reader").await,
        (200, json!([]))
    );
    let (s, v) = get("/api/v1/registry/tenants/acme/subjects", "globex-reader").await;
    assert_eq!(s, 403, "{v}");
    let (s, _) = get("/api/v1/registry/schemas/ids/1", "globex-reader").await;
    assert_eq!(s, 404);
    // A read key may not delete; an admin key may (soft, then permanent).
    let r = c
        .delete(format!("{base}/api/v1/registry/subjects/page_view"))
        .bearer_auth("acme-producer")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .delete(format!("{base}/api/v1/registry/subjects/page_view"))
        .bearer_auth("acme-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(body(r).await, json!([1, 2, 3, 4]));
    let (s, v) = get(
        "/api/v1/registry/subjects/page_view/versions",
        "acme-producer",
    )
    .await;
    assert_eq!((s, v["error_code"].as_u64()), (404, Some(40401)), "{v}");
    server.stop().await.unwrap();
}
