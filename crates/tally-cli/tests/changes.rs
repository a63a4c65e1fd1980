//! `GET /api/v1/changes`: exactly the closed buckets whose value changed
//! after they were published — late events within the allowed lateness
//! and a replay of the late DLQ — with their old and new values; events
//! into open windows, duplicates and events too late to count change
//! nothing listed.

mod common;

use std::time::Duration;

use common::{T0, get, start_server};
use serde_json::{Value, json};

const M: i64 = 60_000;

/// One session: every event in one partition, applied in the order sent
/// (events spread over partitions may be applied behind a watermark
/// another partition moved, and then are changes too).
fn ev(id: &str, ty: &str, ts: i64) -> Value {
    json!({"event_id": id, "event_type": ty, "timestamp": ts, "user_id": id,
           "session_id": "s1", "tenant": "acme"})
}

async fn send(c: &reqwest::Client, base: &str, events: &[Value]) {
    common::post_ndjson(c, base, common::ndjson(events)).await;
}

/// (event type, bucket, old count, new count) of each change listed.
fn listed(v: &Value) -> Vec<(String, String, u64, u64)> {
    v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["kind"], "bucket", "{c}");
            (
                c["key"]["event_type"].as_str().unwrap().to_string(),
                c["key"]["bucket"].as_str().unwrap().to_string(),
                c["old"]["count"].as_u64().unwrap(),
                c["new"]["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_list_exactly_the_closed_buckets_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.stream.watermark_bound = "5s".into();
        cfg.stream.allowed_lateness = "5m".into();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let applied = |n| tally_server::http::wait_applied(&server.shared, n, Duration::from_secs(20));
    let url = |since: u64| format!("{base}/api/v1/changes?since={since}&tenant=acme");

    // Two clicks in each of minutes 0..3, in order; the watermark ends
    // in minute 3 (minutes 0, 1 and 2 are closed).
    let mut first = Vec::new();
    for m in 0..4 {
        for i in 0..2 {
            first.push(ev(
                &format!("c{m}-{i}"),
                "click",
                T0 + m * M + 1000 * (i + 1),
            ));
        }
    }
    first.push(ev("tick", "view", T0 + 3 * M + 30_000));
    send(&c, &base, &first).await;
    assert!(applied(9).await);
    let v = get(&c, url(0)).await;
    assert_eq!(listed(&v), vec![], "{v}");
    let v0 = v["version"].as_u64().unwrap();

    // A late click into closed minute 1, a duplicate, a click into the
    // open minute 3, and one 10 minutes late (past the lateness: DLQ).
    send(
        &c,
        &base,
        &[
            ev("late1", "click", T0 + M + 5000),
            ev("c2-0", "click", T0 + 2 * M + 1000),
            ev("open", "click", T0 + 3 * M + 40_000),
            ev("gone", "error", T0 - 10 * M),
        ],
    )
    .await;
    assert!(applied(11).await);
    let v = get(&c, url(v0)).await;
    assert_eq!(
        listed(&v),
        vec![("click".into(), "2026-11-01T12:01:00Z".into(), 2, 3)],
        "{v}"
    );
    assert_eq!(v["complete"], true);
    let c1 = &v["changes"][0];
    assert_eq!(c1["key"]["tenant"], "acme");
    assert_eq!(
        (
            c1["old"]["unique_users"].as_u64(),
            c1["new"]["unique_users"].as_u64()
        ),
        (Some(2), Some(3))
    );
    let v1 = v["version"].as_u64().unwrap();
    // Nothing new since.
    assert_eq!(listed(&get(&c, url(v1)).await), vec![]);
    // Another tenant sees none of it.
    let other = get(&c, format!("{base}/api/v1/changes?since=0&tenant=other")).await;
    assert_eq!(listed(&other), vec![]);

    // Replaying the late DLQ counts the 10-minute-late error: a change of
    // its bucket from nothing to one.
    let r = c
        .post(format!("{base}/api/v1/dlq/replay?kind=late&tenant=acme"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut got = Vec::new();
    for _ in 0..100 {
        got = listed(&get(&c, url(v1)).await);
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        got,
        vec![("error".into(), "2026-11-01T11:50:00Z".into(), 0, 1)]
    );

    // Paging: limit=1 from the start gives the first change and the
    // version to go on from.
    let p1 = get(&c, format!("{}&limit=1", url(0))).await;
    assert_eq!(listed(&p1).len(), 1);
    let p2 = get(
        &c,
        format!("{}&limit=1", url(p1["version"].as_u64().unwrap())),
    )
    .await;
    assert_eq!(listed(&p2), got);
    // A bad version says what to give.
    let r = c
        .get(format!("{base}/api/v1/changes?since=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("since"));
}

/// An event of `user` (with `session`, if any) at `ts`.
fn user_ev(id: &str, user: &str, session: Option<&str>, ts: i64) -> Value {
    let mut e = json!({"event_id": id, "event_type": "page_view", "timestamp": ts,
        "user_id": user, "tenant": "acme", "properties": {"page": format!("/p/{id}")}});
    if let Some(s) = session {
        e["session_id"] = json!(s);
    }
    e
}

/// Sessions corrected after they closed are listed too: a late event that
/// joins two of a user's sessions lists the first one grown and the
/// second replaced by it; one that extends an explicit session lists it
/// with its old and new value; one into a session still open lists
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_that_a_late_event_extends_or_merges_are_listed() {
    // Told by the session index as the events are applied.
    closed_sessions_case(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_index_corrections_are_found_in_the_raw_events() {
    closed_sessions_case(false).await;
}

async fn closed_sessions_case(index: bool) {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.stream.watermark_bound = "5s".into();
        cfg.stream.allowed_lateness = "3h".into();
        cfg.sessions.index = index;
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let applied = |n| tally_server::http::wait_applied(&server.shared, n, Duration::from_secs(20));

    // u1 (no session ids): sessions at 0–5m and 50–55m (45 minutes apart);
    // u2: session s9 at 10–12m; u3 at 2h moves the watermark past them.
    // One request each, in time order: none of them is applied behind
    // the watermark (the events of one request may be spread over log
    // partitions and applied partition by partition).
    let first = vec![
        user_ev("a1", "u1", None, T0),
        user_ev("a2", "u1", None, T0 + 5 * M),
        user_ev("s1", "u2", Some("s9"), T0 + 10 * M),
        user_ev("s2", "u2", Some("s9"), T0 + 12 * M),
        user_ev("b1", "u1", None, T0 + 50 * M),
        user_ev("b2", "u1", None, T0 + 55 * M),
        user_ev("w1", "u3", None, T0 + 120 * M),
    ];
    for e in &first {
        send(&c, &base, std::slice::from_ref(e)).await;
    }
    assert!(applied(7).await);
    let v0 = get(&c, format!("{base}/api/v1/changes?since=0&tenant=acme")).await["version"]
        .as_u64()
        .unwrap();

    // 27m joins u1's two sessions (22 and 23 minutes from them); 20m
    // extends s9; 1h59m extends u3's session, which is still open.
    send(
        &c,
        &base,
        &[
            user_ev("late1", "u1", None, T0 + 27 * M),
            user_ev("late2", "u2", Some("s9"), T0 + 20 * M),
            user_ev("late3", "u3", None, T0 + 119 * M),
        ],
    )
    .await;
    assert!(applied(10).await);
    let sessions = |v: &Value| -> Vec<Value> {
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["kind"] == "session")
            .cloned()
            .collect()
    };
    let mut got = Vec::new();
    for _ in 0..200 {
        got = sessions(&get(&c, format!("{base}/api/v1/changes?since={v0}&tenant=acme")).await);
        if got.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = |c: &Value| c["key"]["session_id"].as_str().unwrap().to_string();
    let events = |s: &Value| s["events"].as_u64();
    let u1_first = format!("u1:{T0}");
    let u1_second = format!("u1:{}", T0 + 50 * M);
    let by_id = |want: &str| {
        got.iter()
            .find(|c| id(c) == want)
            .unwrap_or_else(|| panic!("no change of {want}: {got:?}"))
            .clone()
    };
    assert_eq!(got.len(), 3, "{got:#?}");
    let merged = by_id(&u1_first);
    assert_eq!(merged["key"]["user_id"], "u1");
    assert_eq!(
        (events(&merged["old"]), events(&merged["new"])),
        (Some(2), Some(5)),
        "{merged}"
    );
    assert_eq!(merged["new"]["end"], "2026-11-01T12:55:00Z", "{merged}");
    assert_eq!(merged["new"]["last_page"], "/p/b2", "{merged}");
    let gone = by_id(&u1_second);
    assert_eq!(events(&gone["old"]), Some(2), "{gone}");
    assert!(gone["new"].is_null(), "{gone}");
    assert_eq!(gone["replaced_by"], json!(u1_first), "{gone}");
    let s9 = by_id("s9");
    assert_eq!(
        (events(&s9["old"]), events(&s9["new"])),
        (Some(2), Some(3)),
        "{s9}"
    );
    assert_eq!(s9["new"]["duration_ms"], json!(10 * M), "{s9}");

    // The sessions answer shows the merged session.
    let s = get(
        &c,
        format!(
            "{base}/api/v1/sessions?tenant=acme&user_id=u1&start={}&end={}",
            T0 - M,
            T0 + 3 * 60 * M
        ),
    )
    .await;
    let spans: Vec<(String, u64)> = s["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["session_id"].as_str().unwrap().to_string(),
                x["events"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(spans, vec![(u1_first.clone(), 5)], "{s}");
    let text = common::prom(&c, &base).await;
    assert!(text.contains("\ntally_session_changes_total 3\n"), "{text}");
    // With the index, no session was read again from the raw events.
    let rescanned = !text.contains("\ntally_session_keys_checked_total 0\n");
    assert_eq!(rescanned, !index, "{text}");
}
