//! The dashboard in a real browser: Debian's headless Chromium (installed by
//! `.ci/run`), driven from Rust over the DevTools protocol. The page must
//! show every ingested event type with its exact count, update through the
//! WebSocket without a reload, list the alert rules, and throw no
//! JavaScript error. `TALLY_SCREENSHOT=docs/dashboard.png` saves a picture.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{T0, start_server};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const M: i64 = 60_000;

/// A headless Chromium with a DevTools WebSocket; killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

impl Browser {
    fn launch() -> Browser {
        let exe = std::env::var("TALLY_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1440,1200",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe:?}: {e}. Install Debian's chromium (apt-get install -y chromium; .ci/run does) or set TALLY_CHROMIUM")
            });
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ws_url = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(u) = l.strip_prefix("DevTools listening on ") {
                        break u.trim().to_string();
                    }
                }
                _ => panic!("chromium exited before opening its DevTools port"),
            }
        };
        // Keep draining stderr so Chromium never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Browser {
            child,
            _profile: profile,
            ws_url,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol session on one page.
struct Page {
    ws: Socket,
    next: u64,
    session: String,
    /// Events received while waiting for answers.
    events: Vec<Value>,
}

impl Page {
    async fn open(b: &Browser) -> Page {
        let (ws, _) = tokio_tungstenite::connect_async(b.ws_url.as_str())
            .await
            .unwrap();
        let mut p = Page {
            ws,
            next: 0,
            session: String::new(),
            events: Vec::new(),
        };
        let t = p
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let s = p
            .call(
                "Target.attachToTarget",
                json!({"targetId": t["targetId"], "flatten": true}),
            )
            .await;
        p.session = s["sessionId"].as_str().unwrap().to_string();
        p.call("Runtime.enable", json!({})).await;
        p.call("Page.enable", json!({})).await;
        p.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1440, "height": 1200, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        p
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer from chromium"))
                .expect("devtools socket open")
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Evaluates a JS expression and returns its JSON value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it equals `want` (or fails after 20 s with the last value).
    async fn wait_for(&mut self, expr: &str, want: &Value) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.eval(expr).await;
            if &got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expr}\n got: {got}\nwant: {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// JavaScript errors and console errors seen so far.
    fn js_errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    Some(e["params"]["exceptionDetails"].to_string())
                }
                Some("Runtime.consoleAPICalled") if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                _ => None,
            })
            .collect()
    }
}

/// An hour of shop traffic: (event type, minute, how many).
fn traffic() -> Vec<(&'static str, i64, usize)> {
    let mut out = Vec::new();
    for m in 0..60i64 {
        let wave = ((m as f64) / 9.0).sin();
        out.push((
            "page_view",
            m,
            (60.0 + 25.0 * wave) as usize + (m as usize % 7),
        ));
        out.push(("click", m, (22.0 + 10.0 * wave) as usize + (m as usize % 3)));
        out.push(("signup", m, 2 + (m as usize % 4)));
        out.push((
            "error",
            m,
            if (44..48).contains(&m) {
                30
            } else {
                m as usize % 3
            },
        ));
    }
    out
}

/// Each chart's event type with the total it shows, as JSON text.
const TOTALS: &str = "JSON.stringify([...document.querySelectorAll('[data-event-type]')].map(c => [c.dataset.eventType, Number(c.querySelector('.total').dataset.total)]))";

/// Runs the metric explorer on counts per minute over the last hour and
/// waits for its summary of the metrics API's answer.
async fn explore_counts(page: &mut Page) {
    page.eval("document.getElementById('x-gran').value = '1m'; document.getElementById('x-range').value = '3600000'; document.getElementById('x-run').click(); 0").await;
    page.wait_for(
        "/^count per 1m: \\d+ buckets, min \\d+, max \\d+$/.test(document.getElementById('x-summary').textContent)",
        &json!(true),
    )
    .await;
}

/// A count as the page writes it (en-US grouping).
fn format_num(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

async fn post(c: &reqwest::Client, base: &str, lines: &[Value]) {
    common::post_ndjson(c, base, common::ndjson(lines)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_counts_and_updates_live() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |_| {}).await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    let hook = common::Hook::start(0).await;

    // A rule made before the data: it judges every bucket from the first on.
    let rule = json!({"name": "error-spike", "metric": "count", "event_type": ["error"],
        "detector": {"kind": "threshold", "op": ">", "value": 20}, "for": "2m",
        "notify": [{"webhook": hook.url}]});
    let r = c
        .post(format!("{base}/api/v1/alerts?tenant=shop"))
        .body(rule.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // An hour of events, sent minute by minute as a live producer would,
    // with duplicates (which must not count).
    let mut expect: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut by_country: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut batches: std::collections::BTreeMap<i64, Vec<Value>> = Default::default();
    for (ty, m, n) in traffic() {
        for i in 0..n {
            let country = ["DE", "FR", "US"][i % 3];
            batches
                .entry(m)
                .or_default()
                .push(json!({"event_id": format!("{ty}-{m}-{i}"),
                "event_type": ty, "timestamp": T0 + m * M + (i as i64 * 997) % M,
                "user_id": format!("u{}", i % 40), "tenant": "shop",
                "properties": {"duration_ms": 20 + (i * 13) % 400,
                    "country": country}}));
            if ty == "page_view" {
                *by_country.entry(country).or_default() += 1;
            }
        }
        *expect.entry(ty).or_default() += n as u64;
    }
    let mut shop_dups = 0u64;
    for lines in batches.values_mut() {
        let dups: Vec<Value> = lines.iter().step_by(25).cloned().collect();
        shop_dups += dups.len() as u64;
        lines.extend(dups);
        post(&c, &base, lines).await;
    }
    let browser = Browser::launch();
    let mut page = Page::open(&browser).await;
    page.goto(&format!("{base}/?tenant=shop")).await;

    let want = |e: &std::collections::BTreeMap<&str, u64>| {
        json!(
            serde_json::to_string(&e.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>())
                .unwrap()
        )
    };
    page.wait_for(TOTALS, &want(&expect)).await;
    // Status and alerts arrived over the same socket.
    page.wait_for(
        "document.getElementById('conn').textContent",
        &json!("live"),
    )
    .await;
    page.wait_for(
        "document.querySelector('#alerts tr[data-rule] td b')?.textContent ?? null",
        &json!("error-spike"),
    )
    .await;
    // The error spike (minutes 44-47) fired and resolved: the history shows both.
    page.wait_for(
        "[...document.querySelectorAll('#history .badge')].map(b => b.textContent).filter(t => t === 'firing' || t === 'resolved').join()",
        &json!("resolved,firing"),
    )
    .await;
    let calls = hook.wait_ok(2, Duration::from_secs(10)).await;
    let statuses: Vec<&str> = calls
        .iter()
        .map(|c| c.1["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["firing", "resolved"]);
    page.wait_for(
        "document.querySelectorAll('#types canvas').length",
        &json!(4),
    )
    .await;

    // A WebSocket update changes the page without a reload.
    page.eval("window.__marker = 42").await;
    let before = page
        .eval("window.__tally.bucketUpdates")
        .await
        .as_u64()
        .unwrap();
    let more: Vec<Value> = (0..7)
        .map(|i| {
            json!({"event_id": format!("late-click-{i}"), "event_type": "click",
            "timestamp": T0 + 59 * M + 1000 * i, "tenant": "shop"})
        })
        .chain([json!({"event_id": "new-type", "event_type": "purchase",
            "timestamp": T0 + 59 * M + 30_000, "tenant": "shop"})])
        .collect();
    post(&c, &base, &more).await;
    *expect.get_mut("click").unwrap() += 7;
    expect.insert("purchase", 1);
    page.wait_for(TOTALS, &want(&expect)).await;
    assert_eq!(
        page.eval("window.__marker").await,
        json!(42),
        "the page reloaded"
    );
    let after = page
        .eval("window.__tally.bucketUpdates")
        .await
        .as_u64()
        .unwrap();
    assert!(
        (1..=4).contains(&(after - before)),
        "only the changed buckets are pushed ({} updates)",
        after - before
    );

    // The metric explorer draws an answer of the metrics API.
    explore_counts(&mut page).await;
    // Grouped by event type over a sliding window: one line per type.
    page.eval("document.getElementById('x-group').value = 'event_type'; document.getElementById('x-window').value = '5m'; document.getElementById('x-run').click(); 0").await;
    page.wait_for(
        "/^count per 1m by event_type over 5m: \\d+ series/.test(document.getElementById('x-summary').textContent)",
        &json!(true),
    )
    .await;
    let shown = page
        .eval("document.getElementById('x-summary').textContent")
        .await;
    let types: Value = serde_json::from_str(page.eval(TOTALS).await.as_str().unwrap()).unwrap();
    assert!(!types.as_array().unwrap().is_empty());
    for t in types.as_array().unwrap() {
        let ty = t[0].as_str().unwrap();
        assert!(shown.as_str().unwrap().contains(ty), "{ty} in {shown}");
    }
    // An undeclared dimension: the API's message, not a blank chart.
    page.eval("document.getElementById('x-group').value = 'plan'; document.getElementById('x-run').click(); 0").await;
    page.wait_for(
        "document.getElementById('x-summary').textContent.includes('not a declared dimension')",
        &json!(true),
    )
    .await;
    page.eval("document.getElementById('x-group').value = ''; document.getElementById('x-window').value = ''; 0").await;

    // A card split by a dimension: one line per country, each with its
    // count over the hour.
    page.eval("const sp = document.querySelector('[data-event-type=\"page_view\"] .split'); sp.value = 'country'; sp.dispatchEvent(new Event('change')); 0").await;
    let legend = "JSON.stringify([...document.querySelectorAll('[data-event-type=\"page_view\"] .legend [data-value]')].map(x => [x.dataset.value, Number(x.dataset.total)]).sort())";
    let want_split: Vec<Value> = by_country.iter().map(|(k, v)| json!([k, v])).collect();
    page.wait_for(legend, &json!(serde_json::to_string(&want_split).unwrap()))
        .await;

    // The sessions panel: what the sessions API says of the hour.
    let sessions = common::get(
        &c,
        format!(
            "{base}/api/v1/sessions?tenant=shop&start={T0}&end={}&limit=100000",
            T0 + 60 * M
        ),
    )
    .await;
    let list = sessions["sessions"].as_array().unwrap();
    let mut durations: Vec<i64> = list
        .iter()
        .map(|x| x["duration_ms"].as_i64().unwrap())
        .collect();
    durations.sort_unstable();
    let n = durations.len();
    let median = if n % 2 == 1 {
        durations[n / 2] as f64
    } else {
        (durations[n / 2 - 1] + durations[n / 2]) as f64 / 2.0
    };
    let bounces = list.iter().filter(|x| x["events"] == 1).count() as f64 / n as f64;
    page.wait_for(
        "document.getElementById('s-count').dataset.value ?? null",
        &json!(n.to_string()),
    )
    .await;
    let shown = page
        .eval("[Number(document.getElementById('s-median').dataset.value), Number(document.getElementById('s-bounce').dataset.value)]")
        .await;
    assert_eq!(shown[0].as_f64(), Some(median), "{shown}");
    assert!(
        (shown[1].as_f64().unwrap() - bounces).abs() < 1e-9,
        "{shown}"
    );

    // The picture of the README: the shop with a card split by country,
    // and the explorer's page views by country over 5 minutes.
    page.eval("document.getElementById('x-group').value = 'country'; document.getElementById('x-window').value = '5m'; document.querySelector('#x-types input[value=\"page_view\"]').checked = true; document.getElementById('x-run').click(); 0").await;
    page.wait_for(
        "/^count per 1m by country over 5m: 3 series/.test(document.getElementById('x-summary').textContent)",
        &json!(true),
    )
    .await;
    if let Ok(path) = std::env::var("TALLY_SCREENSHOT") {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let shot = page
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot written to {path}");
    }

    // The KPI row follows the selected tenant: shop's duplicates, then
    // another tenant's.
    page.wait_for(
        "document.getElementById('dups').textContent",
        &json!(format_num(shop_dups)),
    )
    .await;
    let other: Vec<Value> = ["o1", "o2", "o3", "o1"]
        .iter()
        .map(|id| json!({"event_id": id, "event_type": "visit", "timestamp": T0 + 59 * M, "tenant": "other"}))
        .collect();
    post(&c, &base, &other).await;
    page.wait_for(
        "[...document.getElementById('tenant').options].some(o => o.value === 'other')",
        &json!(true),
    )
    .await;
    page.eval("const ts = document.getElementById('tenant'); ts.value = 'other'; ts.dispatchEvent(new Event('change')); 0").await;
    page.wait_for(
        "[document.getElementById('scope').textContent, document.getElementById('dups').textContent, document.getElementById('accepted').textContent]",
        &json!(["other", "1", "4"]),
    )
    .await;

    assert_eq!(page.eval("window.__tally.errors").await, json!([]));
    let errors = page.js_errors();
    assert!(errors.is_empty(), "JavaScript errors: {errors:?}");

    drop(page);
    drop(browser);
    server.stop().await.unwrap();
}

/// Keyed mode: the page opened with `?key=` keeps the key out of the
/// address bar, finds the key's tenant from the live feed (no `?tenant=`),
/// shows that tenant's counts and never lists another tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_keyed_mode_shows_the_keys_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), |cfg| {
        cfg.auth.keys = ["acme", "globex"]
            .iter()
            .map(|t| tally_server::config::KeySection {
                key: format!("{t}-key-0123456789"),
                tenant: t.to_string(),
                scopes: vec!["ingest".into(), "read".into()],
                ..Default::default()
            })
            .collect();
    })
    .await;
    let base = format!("http://{}", server.addr);
    let c = reqwest::Client::new();
    for (tenant, n) in [("acme", 12), ("globex", 30)] {
        let lines: Vec<Value> = (0..n)
            .map(|i| json!({"event_id": format!("{tenant}-{i}"), "event_type": "page_view", "timestamp": T0 + i * 1000}))
            .collect();
        let r = c
            .post(format!("{base}/api/v1/events"))
            .bearer_auth(format!("{tenant}-key-0123456789"))
            .body(common::ndjson(&lines))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let browser = Browser::launch();
    let mut page = Page::open(&browser).await;
    page.goto(&format!("{base}/?key=acme-key-0123456789")).await;
    page.wait_for(TOTALS, &json!(r#"[["page_view",12]]"#)).await;
    page.wait_for(
        "document.getElementById('conn').textContent",
        &json!("live"),
    )
    .await;
    page.wait_for(
        "[...document.querySelectorAll('#tenant option')].map(o => o.textContent).join()",
        &json!("acme"),
    )
    .await;
    assert_eq!(page.eval("location.search").await, json!(""));
    // The explorer's metrics call carries the key too.
    explore_counts(&mut page).await;
    let errors = page.js_errors();
    assert!(errors.is_empty(), "JavaScript errors: {errors:?}");
    drop(page);
    drop(browser);
    server.stop().await.unwrap();
}
