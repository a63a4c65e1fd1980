//! SQL over the Postgres wire protocol, driven by the real clients users
//! have: Debian's `psql` and PyPI's `psycopg` (with parameters, text and
//! binary results). Answers equal the HTTP SQL API's; the tenant comes from
//! the user name (open mode) or the key given as password (keyed mode) and
//! never widens; a hostile query hits the same limits and the server stays.

mod common;

use std::time::Duration;

use common::{T0, key, rows, start_server, wait_events};
use serde_json::{Value, json};

const M: i64 = 60_000;

fn ev(id: &str, tenant: &str, ty: &str, ts: i64, user: &str, n: i64) -> Value {
    json!({"event_id": id, "event_type": ty, "timestamp": ts, "tenant": tenant, "user_id": user,
        "properties": {"country": if n % 2 == 0 { "DE" } else { "US" }, "n": n}})
}

/// Runs `psql` with `args` against `port`: (success, stdout, stderr).
async fn psql(
    port: u16,
    user: &str,
    password: Option<&str>,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        user,
        "-d",
        "tally",
    ])
    .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
    .args(args)
    .env("PGCONNECT_TIMEOUT", "10")
    .env("PGSSLMODE", "disable");
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("psql finishes")
        .expect("psql runs (scripts/test installs Debian's postgresql-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The HTTP SQL API's rows as psql's unaligned output (`a|b` per row).
fn as_psql(rows: &[Vec<Value>]) -> String {
    rows.iter()
        .map(|r| {
            r.iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const PSYCOPG: &str = r#"
import datetime, json, sys
import psycopg
port, user = sys.argv[1], sys.argv[2]
out = {}
with psycopg.connect(host="127.0.0.1", port=int(port), user=user, dbname="analytics",
                     sslmode="disable", connect_timeout=10) as conn:
    t0 = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.timezone.utc)
    cur = conn.execute(
        "SELECT event_type, count(*) AS n FROM events WHERE ts >= %s AND event_type = %s GROUP BY 1",
        (t0, "click"))
    out["click"] = [list(r) for r in cur.fetchall()]
    out["columns"] = [d.name for d in cur.description]
    cur = conn.execute(
        "SELECT event_id FROM events WHERE user_id = %s ORDER BY event_id LIMIT %s", ("u1", 2))
    out["u1"] = [r[0] for r in cur.fetchall()]
    # A value that would be SQL if spliced stays a value.
    cur = conn.execute("SELECT count(*) FROM events WHERE user_id = %s", ("x' OR '1'='1",))
    out["injection"] = cur.fetchone()[0]
    # Binary results: integers, floats, text, timestamps decode natively.
    with conn.cursor(binary=True) as c:
        c.execute("SELECT count(*) AS n, max(ts) AS last, min(event_id) AS first, "
                  "avg(json_get_float(properties, 'n')) AS avg FROM events")
        n, last, first, avg = c.fetchone()
        out["binary"] = [n, last.isoformat(), first, avg]
    # Prepared (named) statement, run twice.
    for ty in ("click", "page_view"):
        cur = conn.execute("SELECT count(*) FROM events WHERE event_type = %s", (ty,), prepare=True)
        out["prepared_" + ty] = cur.fetchone()[0]
    try:
        conn.execute("SELECT nope FROM events")
    except psycopg.Error as e:
        out["error"] = [e.sqlstate, str(e)]
print(json.dumps(out))
"#;

async fn psycopg(port: u16, user: &str) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .args(["-c", PSYCOPG, &port.to_string(), user])
            .output(),
    )
    .await
    .expect("psycopg finishes")
    .expect("python3 runs (scripts/test installs psycopg[binary])");
    assert!(
        out.status.success(),
        "psycopg failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_psycopg_run_the_same_sql_as_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.pgwire.listen = Some("127.0.0.1:0".into());
        cfg.query.memory_limit = 64 << 20;
        cfg.query.max_rows = 50;
    })
    .await;
    let base = format!("http://{}", server.addr);
    let port = server.pg_addr.expect("pgwire listens").port();
    let c = reqwest::Client::new();
    let mut evs = Vec::new();
    for i in 0..40 {
        let ty = ["page_view", "click", "purchase"][i % 3];
        evs.push(ev(
            &format!("a{i:02}"),
            "acme",
            ty,
            T0 + i as i64 * M,
            &format!("u{}", i % 4),
            i as i64,
        ));
    }
    for i in 0..7 {
        evs.push(ev(&format!("g{i}"), "globex", "click", T0 + i * M, "g", i));
    }
    common::post_ndjson(&c, &base, common::ndjson(&evs)).await;
    wait_events(&c, &base, "acme", 40).await;
    wait_events(&c, &base, "globex", 7).await;

    // psql: the same rows as POST /api/v1/query, per tenant.
    for (tenant, q) in [
        (
            "acme",
            "SELECT event_type, count(*) AS n, count(DISTINCT user_id) AS users FROM events GROUP BY 1 ORDER BY 1",
        ),
        (
            "globex",
            "SELECT event_type, count(*) AS n, count(DISTINCT user_id) AS users FROM events GROUP BY 1 ORDER BY 1",
        ),
        (
            "acme",
            "SELECT event_id, json_get_str(properties, 'country') AS c, user_id FROM events WHERE event_type = 'purchase' ORDER BY event_id LIMIT 5",
        ),
        (
            "acme",
            "SELECT event_type, sum(count) AS n FROM rollups_1h GROUP BY 1 ORDER BY 1",
        ),
    ] {
        let http = rows(&c, &base, tenant, q).await;
        let (ok, out, err) = psql(port, tenant, None, &["-c", q]).await;
        assert!(ok, "{q}: {err}");
        assert_eq!(out, as_psql(&http), "{tenant}: {q}");
    }
    // Timestamps are timestamptz.
    let (ok, out, err) = psql(
        port,
        "acme",
        None,
        &["-c", "SELECT ts FROM events WHERE event_id = 'a02'"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("2026-11-01 12:02:00"), "{out}");
    // Another tenant's rows never show, whatever the SQL says.
    let (ok, out, _) = psql(
        port,
        "acme",
        None,
        &["-c", "SELECT count(*) FROM events WHERE tenant = 'globex'"],
    )
    .await;
    assert!(ok);
    assert_eq!(out, "0");
    // Several statements in one simple query; session statements drivers send.
    let (ok, out, err) = psql(
        port,
        "globex",
        None,
        &["-c", "SET application_name = 'x'; BEGIN; SELECT count(*) FROM events; SHOW transaction_isolation; COMMIT"],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "7\nread committed", "{out}");
    // What tools browse: the tenant's own tables.
    let (ok, out, err) = psql(
        port,
        "acme",
        None,
        &["-c", "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"],
    )
    .await;
    assert!(ok, "{err}");
    let tables: Vec<&str> = out.lines().collect();
    assert!(
        tables.contains(&"events")
            && tables.contains(&"rollups_1m")
            && tables.contains(&"sessions"),
        "{out}"
    );
    let (ok, out, err) = psql(port, "acme", None, &["-c", "SHOW TABLES"]).await;
    assert!(ok && out.contains("events"), "{out} {err}");
    // Limits: rows cut at query.max-rows; a memory hog is refused with the
    // HTTP API's message and the server goes on.
    let (ok, out, _) = psql(
        port,
        "acme",
        None,
        &[
            "-c",
            "SELECT event_id FROM events CROSS JOIN (SELECT 1 UNION ALL SELECT 2) x",
        ],
    )
    .await;
    assert!(ok);
    assert_eq!(out.lines().count(), 50);
    let (ok, _, err) = psql(
        port,
        "acme",
        None,
        &["-c", "SELECT length(repeat('x', 1500000000))"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("query.memory-limit"), "{err}");
    let (ok, _, err) = psql(port, "acme", None, &["-c", "SELEKT 1"]).await;
    assert!(!ok && err.contains("ERROR"), "{err}");
    let (ok, _, err) = psql(port, "acme", None, &["-c", "DROP TABLE events"]).await;
    assert!(!ok, "{err}");
    assert!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    // A user name that is no tenant is refused with the rule.
    let (ok, _, err) = psql(port, "no such tenant!", None, &["-c", "SELECT 1"]).await;
    assert!(!ok && err.contains("tenant"), "{err}");

    // psycopg: parameters (server-side binding), binary results, prepared
    // statements, errors with their SQLSTATE.
    let v = psycopg(port, "acme").await;
    let clicks = rows(
        &c,
        &base,
        "acme",
        "SELECT count(*) FROM events WHERE event_type = 'click'",
    )
    .await;
    assert_eq!(v["click"], json!([["click", clicks[0][0]]]), "{v}");
    assert_eq!(v["columns"], json!(["event_type", "n"]));
    assert_eq!(v["u1"], json!(["a01", "a05"]));
    assert_eq!(v["injection"], 0);
    let http = rows(
        &c,
        &base,
        "acme",
        "SELECT count(*), max(ts), min(event_id), avg(json_get_float(properties, 'n')) FROM events",
    )
    .await;
    assert_eq!(v["binary"][0], http[0][0]);
    assert_eq!(v["binary"][1], json!("2026-11-01T12:39:00+00:00"));
    assert_eq!(v["binary"][2], http[0][2]);
    assert_eq!(v["binary"][3], http[0][3]);
    assert_eq!(v["prepared_click"], clicks[0][0]);
    assert_eq!(v["prepared_page_view"], 14);
    assert_eq!(v["error"][0], "42601", "{v}");
    assert!(v["error"][1].as_str().unwrap().contains("nope"), "{v}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_mode_takes_a_read_key_as_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.pgwire.listen = Some("127.0.0.1:0".into());
        cfg.auth.keys = vec![
            key("acme-ingest-0123456789", "acme", &["ingest"]),
            key("acme-read-0123456789", "acme", &["read"]),
            key("globex-read-0123456789", "globex", &["read"]),
        ];
    })
    .await;
    let base = format!("http://{}", server.addr);
    let port = server.pg_addr.unwrap().port();
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{base}/api/v1/events"))
        .bearer_auth("acme-ingest-0123456789")
        .body(common::ndjson(&[
            ev("k1", "acme", "click", T0, "u", 1),
            ev("k2", "acme", "click", T0 + M, "u", 2),
        ]))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let mut got = String::new();
    for _ in 0..200 {
        // The user name does not choose the tenant: the key does.
        let (ok, out, err) = psql(
            port,
            "globex",
            Some("acme-read-0123456789"),
            &["-c", "SELECT count(*) FROM events"],
        )
        .await;
        assert!(ok, "{err}");
        got = out;
        if got == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got, "2");
    let (ok, out, _) = psql(
        port,
        "acme",
        Some("globex-read-0123456789"),
        &["-c", "SELECT count(*) FROM events"],
    )
    .await;
    assert!(ok);
    assert_eq!(out, "0");
    let (ok, _, err) = psql(port, "acme", Some("wrong"), &["-c", "SELECT 1"]).await;
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    let (ok, _, err) = psql(
        port,
        "acme",
        Some("acme-ingest-0123456789"),
        &["-c", "SELECT 1"],
    )
    .await;
    assert!(!ok && err.contains("read scope"), "{err}");
    let (ok, _, err) = psql(port, "acme", None, &["-w", "-c", "SELECT 1"]).await;
    assert!(!ok, "{err}");
    server.stop().await.unwrap();
}
