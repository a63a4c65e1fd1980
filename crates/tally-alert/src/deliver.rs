//! Notification bodies (Tally, PagerDuty Events v2, Slack) and the webhook
//! delivery loop: outbox → POST with a timeout → done, or retried with
//! exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use tally_types::time::format_rfc3339;
use tally_types::{Clock, Millis};

use crate::engine::{Delivery, Engine, Outcome};
use crate::rule::{Detector, Format, Rule, Target};
use crate::targets::{GuardedResolver, TargetPolicy};

/// One notification of a rule, before it is shaped for a target.
#[derive(Debug, Clone)]
pub struct Note<'a> {
    pub status: &'a str,
    pub value: Option<f64>,
    pub bucket_start: Millis,
    pub bucket_end: Millis,
    pub at: Millis,
    pub episode_start: Millis,
    pub dedupe_key: String,
    /// The series of a grouped rule (`{}` otherwise).
    pub labels: Json,
}

fn num(v: Option<f64>) -> Json {
    match v {
        Some(x) => tally_types::integral(x).map_or_else(|| json!(x), |i| json!(i)),
        None => Json::Null,
    }
}

/// The body a target receives.
pub fn payload(rule: &Rule, target: &Target, n: &Note<'_>) -> Json {
    let body = json!({
        "rule": rule.name,
        "rule_id": rule.id,
        "tenant": rule.tenant,
        "status": n.status,
        "value": num(n.value),
        "metric": rule.metric,
        "event_type": rule.event_type,
        "granularity": rule.granularity,
        "detector": rule.detector,
        "bucket_start": format_rfc3339(n.bucket_start),
        "bucket_end": format_rfc3339(n.bucket_end),
        "episode_start": format_rfc3339(n.episode_start),
        "at": format_rfc3339(n.at),
        "dedupe_key": n.dedupe_key,
        "labels": n.labels,
    });
    match target.format {
        Format::Tally => body,
        Format::Pagerduty => json!({
            "routing_key": target.routing_key.clone().unwrap_or_default(),
            "event_action": if n.status == "firing" { "trigger" } else { "resolve" },
            // One key per episode: PagerDuty pairs the resolve with its trigger.
            "dedup_key": if n.labels.as_object().is_none_or(|o| o.is_empty()) {
                format!("{}:{}", rule.id, n.episode_start)
            } else {
                format!("{}:{}:{}", rule.id, n.labels, n.episode_start)
            },
            "payload": {
                "summary": summary(rule, n),
                "source": format!("tally/{}", rule.tenant),
                "severity": target.severity.clone().unwrap_or_else(|| "error".into()),
                "timestamp": format_rfc3339(n.at),
                "component": rule.metric,
                "group": rule.tenant,
                "class": rule.detector.kind(),
                "custom_details": body,
            },
            "client": "Tally",
        }),
        Format::Slack => json!({ "text": summary(rule, n) }),
    }
}

/// One line a person reads: what, how much, against what, when.
pub fn summary(rule: &Rule, n: &Note<'_>) -> String {
    let mut what = if rule.event_type.is_empty() {
        rule.metric.clone()
    } else {
        format!("{} of {}", rule.metric, rule.event_type.join(", "))
    };
    if let Some(o) = n.labels.as_object().filter(|o| !o.is_empty()) {
        let parts: Vec<String> = o
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("(none)")))
            .collect();
        what.push_str(&format!(" [{}]", parts.join(", ")));
    }
    let value = match n.value {
        Some(v) => num(Some(v)).to_string(),
        None => "no data".into(),
    };
    let test = match &rule.detector {
        Detector::Threshold { op, value } => format!("{} {}", op.as_str(), num(Some(*value))),
        Detector::Zscore { window, z, .. } => format!("{z}σ from the last {window} buckets"),
        Detector::Ewma { alpha, k, .. } => format!("{k}σ from the EWMA (α={alpha})"),
    };
    let icon = if n.status == "firing" { "🔴" } else { "✅" };
    format!(
        "{icon} [{}] {} {}: {what} = {value} ({test}) for {}–{} (tenant {})",
        n.status.to_uppercase(),
        rule.name,
        if n.status == "firing" {
            "is firing"
        } else {
            "resolved"
        },
        format_rfc3339(n.bucket_start),
        format_rfc3339(n.bucket_end),
        rule.tenant,
    )
}

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Where webhooks may go; with `block_internal` failures are also
    /// reported without detail (no port scan through the history).
    pub targets: Arc<TargetPolicy>,
    /// Where e-mail targets are sent through (None: no `[smtp]`).
    pub smtp: Option<SmtpSettings>,
}

/// An SMTP relay for e-mail targets (`[smtp]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// The sender, `alerts@example.com` or `Tally <alerts@example.com>`.
    pub from: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Upgrade with STARTTLS before sending anything (refuse a relay without it).
    pub starttls: bool,
}

/// The pooled SMTP client and the parsed sender, built once per server.
pub struct Mailer {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl SmtpSettings {
    /// Checks the settings (the sender parses as a mailbox) and builds the
    /// client every e-mail delivery goes through.
    pub fn mailer(&self, timeout: Duration) -> Result<Mailer, String> {
        use lettre::transport::smtp::authentication::Credentials;
        use lettre::transport::smtp::client::{Tls, TlsParameters};
        let from = self.from.parse().map_err(|e| {
            format!(
                "smtp.from = {:?}: {e}; use alerts@example.com or \"Tally <alerts@example.com>\"",
                self.from
            )
        })?;
        let mut b =
            lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(&self.host)
                .port(self.port)
                .timeout(Some(timeout));
        if self.starttls {
            let tls = TlsParameters::new(self.host.clone())
                .map_err(|e| format!("smtp.host = {:?}: {e}", self.host))?;
            b = b.tls(Tls::Required(tls));
        }
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            b = b.credentials(Credentials::new(u.clone(), p.clone()));
        }
        Ok(Mailer {
            transport: b.build(),
            from,
        })
    }
}

impl Mailer {
    /// Sends one e-mail delivery: the body's first line is the subject.
    async fn send(&self, to: &str, dedupe_key: &str, body: &str) -> Result<(), String> {
        use lettre::AsyncTransport;
        let (subject, text) = body.split_once("\n\n").unwrap_or((body, ""));
        let to: lettre::message::Mailbox = to
            .parse()
            .map_err(|e| format!("{to:?} is not an address: {e}"))?;
        // One Message-ID per notification: a resend after a lost answer is
        // recognisably the same message.
        let id: String = dedupe_key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '.'
                }
            })
            .collect();
        let msg = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{id}@{}>", self.from.email.domain())))
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(format!("{subject}\n\n{text}\n"))
            .map_err(|e| e.to_string())?;
        self.transport
            .send(msg)
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e))
    }
}

/// POSTs one webhook delivery.
async fn post(client: &reqwest::Client, guarded: bool, d: &mut Delivery) -> Outcome {
    let r = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("idempotency-key", &d.dedupe_key)
        .header("x-tally-dedupe-key", &d.dedupe_key)
        .body(std::mem::take(&mut d.body))
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => Outcome::Delivered,
        Ok(resp) if guarded => Outcome::Failed(format!("HTTP {}", resp.status().as_u16())),
        Ok(resp) => Outcome::Failed(format!("HTTP {}", resp.status())),
        Err(e) if e.is_timeout() => Outcome::Failed("timed out".into()),
        Err(_) if guarded => {
            Outcome::Failed("could not deliver (connection failed or refused)".into())
        }
        Err(e) => Outcome::Failed(error_chain(&e)),
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(5),
            concurrency: 16,
            targets: Arc::default(),
            smtp: None,
        }
    }
}

/// Called with the time from bucket close to the receiver's 2xx.
pub type LatencyFn = Arc<dyn Fn(Duration) + Send + Sync>;

/// Sends what the outbox holds until `stop` turns true; wakes on `wake` or
/// every 50 ms (retries come due on the clock).
pub async fn run(
    engine: Arc<Mutex<Engine>>,
    clock: Clock,
    cfg: DeliveryConfig,
    wake: Arc<tokio::sync::Notify>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    on_latency: LatencyFn,
) {
    let guarded = cfg.targets.block_internal;
    let client = match reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        // A redirect could lead anywhere the policy refuses.
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver {
            policy: cfg.targets.clone(),
        }))
        .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; alerts are not delivered");
            return;
        }
    };
    let mailer = match cfg.smtp.as_ref().map(|m| m.mailer(cfg.timeout)) {
        None => None,
        Some(Ok(m)) => Some(Arc::new(m)),
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot build the SMTP client; e-mail targets fail");
            None
        }
    };
    loop {
        // The engine counts what is in flight: it hands out no more than
        // `concurrency` at a time.
        let due = engine.lock().take_due(clock.now_ms(), cfg.concurrency);
        for mut d in due {
            // An address in the URL never reaches the resolver: checked here.
            let refused = reqwest::Url::parse(&d.url).ok().and_then(|u| {
                let ip = TargetPolicy::literal_ip(&u)?;
                (!cfg.targets.ip_allowed(u.host_str().unwrap_or_default(), ip)).then_some(ip)
            });
            if let Some(ip) = refused {
                let why = format!("{ip} is an internal address (alerts.allow-targets)");
                engine
                    .lock()
                    .finish(d.id, Outcome::Failed(why), clock.now_ms());
                continue;
            }
            let (client, mailer, engine, clock, on_latency, wake) = (
                client.clone(),
                mailer.clone(),
                engine.clone(),
                clock.clone(),
                on_latency.clone(),
                wake.clone(),
            );
            tokio::spawn(async move {
                let outcome = match (d.url.strip_prefix(crate::engine::MAILTO), mailer) {
                    (None, _) => post(&client, guarded, &mut d).await,
                    (Some(_), None) => {
                        Outcome::Failed("no [smtp] is configured on this server".into())
                    }
                    (Some(to), Some(m)) => match m.send(to, &d.dedupe_key, &d.body).await {
                        Ok(()) => Outcome::Delivered,
                        Err(e) => Outcome::Failed(format!("SMTP: {e}")),
                    },
                };
                if matches!(outcome, Outcome::Delivered)
                    && let Some(c) = d.closed
                {
                    on_latency(c.elapsed());
                }
                engine.lock().finish(d.id, outcome, clock.now_ms());
                wake.notify_one();
            });
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
