//! Alerts against the real server: a rule over HTTP, events that make it
//! fire and resolve, a webhook receiver that fails the first call, and a
//! restart in the middle of the episode. Event times are fixed in the past,
//! so only the watermark closes buckets (the wall clock never carries a
//! backfill forward) and the notifications are exact.

mod common;

use std::time::Duration;

use common::{Hook, T0, free_port, get, prom, start_server};
use serde_json::{Value, json};

fn ev(id: &str, ty: &str, ts: i64) -> Value {
    json!({"event_id": id, "event_type": ty, "timestamp": ts, "user_id": "u1", "tenant": "acme"})
}

async fn send(c: &reqwest::Client, base: &str, events: Vec<Value>) {
    common::post_ndjson(c, base, common::ndjson(&events)).await;
}

fn tweak(cfg: &mut tally_server::Config) {
    cfg.alerts.backoff = "100ms".into();
    cfg.stream.watermark_bound = "5s".into();
}

const M: i64 = 60_000;

/// `POST /api/v1/alerts?tenant=acme` with `rule`: (status, answer).
async fn create_rule(c: &reqwest::Client, base: &str, rule: &Value) -> (u16, Value) {
    let r = c
        .post(format!("{base}/api/v1/alerts?tenant=acme"))
        .body(rule.to_string())
        .send()
        .await
        .unwrap();
    answer(r).await
}

async fn answer(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spike_fires_once_retries_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::start(1).await;
    let port = free_port();
    let server = start_server(dir.path(), |cfg| {
        tweak(cfg);
        cfg.listen = format!("127.0.0.1:{port}");
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();

    // Invalid rules name the field.
    let bad = json!({"name": "x", "detector": {"kind": "threshold", "op": "!=", "value": 1}});
    let (code, v) = create_rule(&c, &base, &bad).await;
    assert_eq!(code, 400);
    assert_eq!(v["field"], "detector.op", "{v}");
    // The consumer lag is a Kafka-mode metric: refused here, with the fix.
    let lag = json!({"name": "lag", "metric": "consumer_lag_seconds",
        "detector": {"kind": "threshold", "op": ">", "value": 30}});
    let (code, v) = create_rule(&c, &base, &lag).await;
    assert_eq!(code, 400);
    assert_eq!(v["field"], "metric", "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("[kafka]"),
        "{v}"
    );

    let rule = json!({"name": "error-spike", "metric": "count", "event_type": ["error"],
        "granularity": "1m", "detector": {"kind": "threshold", "op": ">", "value": 5},
        "for": "1m", "resolve_after": "1m", "notify": [{"webhook": hook.url}]});
    let (code, created) = create_rule(&c, &base, &rule).await;
    assert_eq!(code, 201);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "ok");
    assert_eq!(created["for"], "1m");

    // Minute 0: 2 errors (quiet). Minute 1: 10 errors (spike). An info
    // event at 12:02:30 moves the watermark to 12:02:25: buckets 0 and 1 close.
    let mut evs: Vec<Value> = (0..2)
        .map(|i| ev(&format!("a{i}"), "error", T0 + 1000 * i))
        .collect();
    evs.extend((0..10).map(|i| ev(&format!("b{i}"), "error", T0 + M + 1000 * i)));
    // A duplicate of a spike event is not counted twice.
    evs.push(ev("b3", "error", T0 + M + 3000));
    evs.push(ev("i1", "info", T0 + 2 * M + 30_000));
    send(&c, &base, evs).await;

    let calls = hook.wait_ok(1, Duration::from_secs(20)).await;
    assert_eq!(calls.len(), 2, "one failed call, one retry: {calls:?}");
    assert_eq!(calls[0].0, 500);
    assert_eq!(
        calls[0].1, calls[1].1,
        "the retry carries the same body and dedupe_key"
    );
    let firing = &calls[1].1;
    assert_eq!(firing["status"], "firing");
    assert_eq!(firing["value"], 10);
    assert_eq!(firing["rule"], "error-spike");
    assert_eq!(firing["rule_id"], json!(id));
    assert_eq!(firing["tenant"], "acme");
    assert_eq!(firing["bucket_start"], "2026-11-01T12:01:00Z");
    assert_eq!(firing["bucket_end"], "2026-11-01T12:02:00Z");
    assert_eq!(
        firing["detector"],
        json!({"kind": "threshold", "op": ">", "value": 5.0})
    );

    // The list shows the rule firing; the history has the transition and
    // the failed attempt; /metrics counts both and the latency.
    let list: Value = get(&c, format!("{base}/api/v1/alerts?tenant=acme")).await;
    assert_eq!(list["alerts"][0]["state"], "firing", "{list}");
    assert_eq!(list["alerts"][0]["value"], 10.0);
    let other: Value = get(&c, format!("{base}/api/v1/alerts?tenant=other")).await;
    assert_eq!(other["alerts"], json!([]), "rules are per tenant");
    let hist: Value = get(&c, format!("{base}/api/v1/alerts/history?tenant=acme")).await;
    let kinds: Vec<(String, String)> = hist["history"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|h| {
            (
                h["kind"].as_str().unwrap().into(),
                h["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("state", "firing"),
        ("delivery", "retrying"),
        ("delivery", "delivered"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(kinds, want, "{hist}");
    let text = prom(&c, &base).await;
    assert!(
        text.contains("tally_alert_deliveries_total{result=\"failed\"} 1"),
        "{text}"
    );
    assert!(text.contains("tally_alert_deliveries_total{result=\"delivered\"} 1"));
    assert!(text.contains("tally_alert_firing 1"));
    assert!(text.contains("tally_alert_latency_seconds_count 1"));

    // Restart in the middle of the episode: nothing is sent again.
    server.stop().await.unwrap();
    let server = start_server(dir.path(), |cfg| {
        tweak(cfg);
        cfg.listen = format!("127.0.0.1:{port}");
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        hook.calls.lock().len(),
        2,
        "no notification after the restart"
    );
    let one: Value = get(&c, format!("{base}/api/v1/alerts/{id}?tenant=acme")).await;
    assert_eq!(one["state"], "firing", "state survives the restart: {one}");

    // Minute 2: one error; the watermark passes 12:04: bucket 2 resolves.
    send(
        &c,
        &base,
        vec![
            ev("c1", "error", T0 + 2 * M + 40_000),
            ev("i2", "info", T0 + 4 * M + 30_000),
        ],
    )
    .await;
    let calls = hook.wait_ok(2, Duration::from_secs(20)).await;
    assert_eq!(calls.len(), 3, "{calls:?}");
    let resolved = &calls[2].1;
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["value"], 1);
    assert_eq!(resolved["bucket_start"], "2026-11-01T12:02:00Z");
    assert_ne!(resolved["dedupe_key"], firing["dedupe_key"]);
    // The rule sees the same number the metrics API answers for that bucket.
    let m: Value = get(&c, format!(
            "{base}/api/v1/metrics?tenant=acme&metric=count&event_type=error&granularity=1m&start={}&end={}",
            T0 + M,
            T0 + 3 * M
        )).await;
    assert_eq!(
        m["series"][0]["points"],
        json!([["2026-11-01T12:01:00Z", 10], ["2026-11-01T12:02:00Z", 1]])
    );
    // Silences and deletes are per tenant too.
    let r = c
        .post(format!("{base}/api/v1/alerts/{id}/silence?tenant=acme"))
        .body(json!({"for": "1h"}).to_string())
        .send()
        .await
        .unwrap();
    let (code, v) = answer(r).await;
    assert_eq!((code, &v["silenced"]), (200, &json!(true)), "{v}");
    let r = c
        .delete(format!("{base}/api/v1/alerts/{id}?tenant=other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .delete(format!("{base}/api/v1/alerts/{id}?tenant=acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = get(&c, format!("{base}/api/v1/alerts?tenant=acme")).await;
    assert_eq!(list["alerts"], json!([]));
    server.stop().await.unwrap();
}

/// An error-rate rule over a sliding window (`where`, `over`, `window` as
/// on the metrics API): judged on the rate of the three minutes ending at
/// each bucket's end, it fires once with that rate and resolves once the
/// window has moved past the errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_rate_over_a_sliding_window_fires_and_resolves_once() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::start(0).await;
    let server = start_server(dir.path(), tweak).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let rule = json!({"name": "error-rate", "metric": "count", "where": "event_type:error",
        "over": "count", "granularity": "1m", "window": "3m",
        "detector": {"kind": "threshold", "op": ">", "value": 0.5},
        "for": "1m", "resolve_after": "1m", "notify": [{"webhook": hook.url}]});
    let (code, created) = create_rule(&c, &base, &rule).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        (created["window"].as_str(), created["over"].as_str()),
        (Some("3m"), Some("count"))
    );

    // Every minute 4 page views; minute 3 also 14 errors: the windows of
    // three minutes ending with minutes 3, 4 and 5 hold 14 errors of 26
    // events (> 0.5); the one ending with minute 6 none.
    let mut evs = Vec::new();
    for m in 0..9 {
        for i in 0..4 {
            evs.push(ev(&format!("p{m}-{i}"), "page_view", T0 + m * M + 1000 * i));
        }
    }
    for i in 0..14 {
        evs.push(ev(&format!("e{i}"), "error", T0 + 3 * M + 2000 + 1000 * i));
    }
    // Moves the watermark past minute 8.
    evs.push(ev("late-info", "info", T0 + 9 * M + 30_000));
    send(&c, &base, evs).await;

    // Both transitions close in one pass; deliveries may arrive in
    // either order.
    let calls = hook.wait_ok(2, Duration::from_secs(20)).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    let of = |status: &str| {
        calls
            .iter()
            .map(|c| &c.1)
            .find(|b| b["status"] == status)
            .unwrap_or_else(|| panic!("no {status} call: {calls:?}"))
    };
    let (firing, resolved) = (of("firing"), of("resolved"));
    assert_eq!(firing["bucket_start"], "2026-11-01T12:03:00Z", "{firing}");
    let rate = firing["value"].as_f64().unwrap();
    assert!((rate - 14.0 / 26.0).abs() < 1e-9, "{firing}");
    // The first window without the errors ends with minute 6: a rate of 0.
    assert_eq!(
        resolved["bucket_start"], "2026-11-01T12:06:00Z",
        "{resolved}"
    );
    assert_eq!(resolved["value"].as_f64(), Some(0.0), "{resolved}");
}

/// "Errors over the last 3 minutes by country > 5" pages once per country
/// and episode, the webhook body carries the labels, the rule shows each
/// country's state, and an undeclared dimension is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_grouped_by_country_pages_once_per_country() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::start(0).await;
    let server = start_server(dir.path(), tweak).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let rule = json!({"name": "errors-by-country", "metric": "count",
        "where": "event_type:error", "group_by": "country", "window": "3m",
        "detector": {"kind": "threshold", "op": ">", "value": 5},
        "resolve_after": "1m", "notify": [{"webhook": hook.url}]});
    let (code, created) = create_rule(&c, &base, &rule).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["group_by"], json!(["country"]), "{created}");
    let mut bad = rule.clone();
    bad["group_by"] = json!("plan");
    let (code, body) = create_rule(&c, &base, &bad).await;
    assert_eq!(code, 400);
    assert!(
        body.to_string()
            .contains("event_type, country, device, page"),
        "{body}"
    );

    // DE: 4 errors in each of minutes 2 and 3 (the windows ending with
    // minutes 3 and 4 hold 8); US: 7 errors in minute 5 (the windows
    // ending with 5, 6 and 7); FR: one error a minute (3 per window), and
    // page views that the filter leaves out.
    let with = |id: String, country: &str, ts: i64| {
        let mut e = ev(&id, "error", ts);
        e["properties"] = json!({"country": country});
        e
    };
    let mut evs = Vec::new();
    for m in 0..10 {
        evs.push(with(format!("fr{m}"), "FR", T0 + m * M + 500));
        let mut p = ev(&format!("p{m}"), "page_view", T0 + m * M + 700);
        p["properties"] = json!({"country": "DE"});
        evs.push(p);
    }
    for m in [2, 3] {
        for i in 0..4 {
            evs.push(with(
                format!("de{m}-{i}"),
                "DE",
                T0 + m * M + 1000 * (i + 1),
            ));
        }
    }
    for i in 0..7 {
        evs.push(with(format!("us{i}"), "US", T0 + 5 * M + 1000 * (i + 1)));
    }
    evs.push(ev("tick", "info", T0 + 12 * M + 30_000));
    // In time order: none of it is late.
    evs.sort_by_key(|e| e["timestamp"].as_i64());
    send(&c, &base, evs).await;

    hook.wait_ok(4, Duration::from_secs(20)).await;
    // Nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = hook.wait_ok(usize::MAX, Duration::ZERO).await;
    let mut got: Vec<(String, String, String)> = calls
        .iter()
        .map(|c| {
            (
                c.1["labels"]["country"].as_str().unwrap().to_string(),
                c.1["status"].as_str().unwrap().to_string(),
                c.1["bucket_start"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("DE".into(), "firing".into(), "2026-11-01T12:03:00Z".into()),
            (
                "DE".into(),
                "resolved".into(),
                "2026-11-01T12:05:00Z".into()
            ),
            ("US".into(), "firing".into(), "2026-11-01T12:05:00Z".into()),
            (
                "US".into(),
                "resolved".into(),
                "2026-11-01T12:08:00Z".into()
            ),
        ],
        "{calls:?}"
    );
    let r = c
        .get(format!("{base}/api/v1/alerts?tenant=acme"))
        .send()
        .await
        .unwrap();
    let (_, list) = answer(r).await;
    let shown = list.to_string();
    assert!(shown.contains("\"series\""), "{shown}");
}

/// An SMTP sink (PyPI `aiosmtpd`) that refuses the first `fail_first`
/// messages with a 451 and writes every accepted one to `log` as JSON.
const SMTP_SINK: &str = r#"
import email, email.policy, json, sys, time
from aiosmtpd.controller import Controller
port, log, fail = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
seen = {"n": 0}
class Sink:
    async def handle_DATA(self, server, session, envelope):
        seen["n"] += 1
        if seen["n"] <= fail:
            return "451 try again later"
        with open(log, "a") as f:
            msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
            f.write(json.dumps({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                                "subject": str(msg["subject"]), "message_id": str(msg["message-id"]),
                                "body": msg.get_content()}) + "\n")
        return "250 OK"
c = Controller(Sink(), hostname="127.0.0.1", port=port)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

/// E-mail targets go through `[smtp]` with the webhooks' retries and
/// dedupe: a relay that refuses the first attempt still gets exactly one
/// message per transition, with the summary as its subject; without
/// `[smtp]` an e-mail target is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_targets_are_sent_through_smtp_once() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let log = dir.path().join("mail.jsonl");
    let mut sink = tokio::process::Command::new("python3")
        .args([
            "-c",
            SMTP_SINK,
            &smtp_port.to_string(),
            log.to_str().unwrap(),
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (scripts/test installs aiosmtpd)");
    let mut line = String::new();
    tokio::io::BufReader::new(sink.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "the SMTP sink did not start (pip install aiosmtpd)"
    );

    // Without [smtp]: refused, naming the field and the fix.
    let plain = tempfile::tempdir().unwrap();
    let server = start_server(plain.path(), tweak).await;
    let (code, v) = create_rule(
        &reqwest::Client::new(),
        &format!("http://{}", server.addr),
        &json!({"name": "m", "detector": {"kind": "threshold", "op": ">", "value": 1},
            "notify": [{"email": "ops@example.com"}]}),
    )
    .await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["field"], "notify[0].email", "{v}");
    assert!(v["error"].as_str().unwrap().contains("[smtp]"), "{v}");
    server.stop().await.unwrap();

    let server = start_server(dir.path(), |cfg| {
        tweak(cfg);
        cfg.smtp.host = Some("127.0.0.1".into());
        cfg.smtp.port = Some(smtp_port);
        cfg.smtp.starttls = false;
        cfg.smtp.from = "Tally <alerts@tally.test>".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    for (target, field) in [
        (json!({"email": "not an address"}), "notify[0].email"),
        (
            json!({"email": "ops@example.com\r\nBcc: x@y.z"}),
            "notify[0].email",
        ),
        (
            json!({"email": "ops@example.com", "format": "slack"}),
            "notify[0].format",
        ),
    ] {
        let rule = json!({"name": "m", "detector": {"kind": "threshold", "op": ">", "value": 1},
            "notify": [target]});
        let (code, v) = create_rule(&c, &base, &rule).await;
        assert_eq!((code, v["field"].as_str()), (400, Some(field)), "{v}");
    }
    let rule = json!({"name": "purchases-spike", "metric": "count", "event_type": ["purchase"],
        "detector": {"kind": "threshold", "op": ">", "value": 3},
        "resolve_after": "1m", "notify": [{"email": "ops@example.com"}]});
    let (code, created) = create_rule(&c, &base, &rule).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["notify"][0]["email"], "ops@example.com",
        "{created}"
    );
    assert!(created["notify"][0].get("webhook").is_none(), "{created}");
    // Minute 1: five purchases (fires); minute 2: one (resolves).
    let mut evs: Vec<Value> = (0..5)
        .map(|i| ev(&format!("p{i}"), "purchase", T0 + M + i * 1000))
        .collect();
    evs.push(ev("q", "purchase", T0 + 2 * M));
    evs.push(ev("tick", "info", T0 + 4 * M));
    send(&c, &base, evs).await;
    for _ in 0..400 {
        let n = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        if n >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A little longer: a duplicate would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mails: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(mails.len(), 2, "{mails:?}");
    let firing = mails
        .iter()
        .find(|m| {
            m["subject"]
                .as_str()
                .unwrap()
                .contains("[FIRING] purchases-spike")
        })
        .unwrap_or_else(|| panic!("a firing mail: {mails:?}"));
    assert_eq!(firing["to"], json!(["ops@example.com"]));
    assert_eq!(firing["from"], "alerts@tally.test");
    let body = firing["body"].as_str().unwrap();
    assert!(
        body.contains("\"bucket_start\": \"2026-11-01T12:01:00Z\""),
        "{body}"
    );
    assert!(
        firing["message_id"]
            .as_str()
            .unwrap()
            .ends_with("@tally.test>"),
        "{firing}"
    );
    assert!(
        mails
            .iter()
            .any(|m| m["subject"].as_str().unwrap().contains("[RESOLVED]"))
    );
    // The history shows the refused attempt and the delivery.
    let h = get(&c, format!("{base}/api/v1/alerts/history?tenant=acme")).await;
    let text = h.to_string();
    assert!(text.contains("451"), "{h}");
    assert!(text.contains("delivered"), "{h}");
    server.stop().await.unwrap();
    let _ = sink.kill().await;
}

/// A closed bucket corrected after the rule judged it — here by replaying
/// late events into it — is judged again: the history tells that the
/// correction would have fired the rule a bucket earlier, and nothing is
/// sent for the past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_that_would_have_fired_is_told_in_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::start(0).await;
    let server = start_server(dir.path(), |cfg| {
        tweak(cfg);
        cfg.stream.allowed_lateness = "30s".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let rule = json!({"name": "errors", "metric": "count", "event_type": ["error"],
        "granularity": "1m", "detector": {"kind": "threshold", "op": ">", "value": 5},
        "for": "1m", "resolve_after": "1m", "notify": [{"webhook": hook.url}]});
    let (code, created) = create_rule(&c, &base, &rule).await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();

    // Minute 0: 4 errors (quiet); minute 1: 8 (fires); minute 2: none
    // (resolves); the watermark ends in minute 3.
    let mut evs: Vec<Value> = (0..4)
        .map(|i| ev(&format!("a{i}"), "error", T0 + 1000 * i))
        .collect();
    evs.extend((0..8).map(|i| ev(&format!("b{i}"), "error", T0 + M + 1000 * i)));
    evs.push(ev("tick", "info", T0 + 3 * M + 30_000));
    send(&c, &base, evs).await;
    let calls = hook.wait_ok(2, Duration::from_secs(20)).await;
    assert_eq!(calls.len(), 2, "{calls:?}");

    // Three more errors of minute 0, minutes too late: to the late DLQ,
    // then replayed into their closed bucket (4 + 3 = 7 > 5).
    send(
        &c,
        &base,
        (0..3)
            .map(|i| ev(&format!("late{i}"), "error", T0 + 10_000 + 1000 * i))
            .collect(),
    )
    .await;
    let r = c
        .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=acme"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    let mut told = None;
    for _ in 0..200 {
        let h = get(&c, format!("{base}/api/v1/alerts/history?tenant=acme")).await;
        told = h["history"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["kind"] == "correction")
            .cloned();
        if told.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let told = told.expect("a correction entry in the alert history");
    assert_eq!(told["rule_id"], json!(id), "{told}");
    assert_eq!(told["to"], "would_fire", "{told}");
    assert_eq!(told["bucket_start"], "2026-11-01T12:00:00Z", "{told}");
    assert_eq!(told["value"].as_f64(), Some(7.0), "{told}");
    let detail = told["detail"].as_str().unwrap();
    assert!(detail.contains("from 4 to 7"), "{detail}");

    // Nothing is sent for the past, and the rule is at rest.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook.calls.lock().len(), 2);
    let rules = get(&c, format!("{base}/api/v1/alerts?tenant=acme")).await;
    assert_eq!(rules["alerts"][0]["state"], "ok", "{rules}");
}
