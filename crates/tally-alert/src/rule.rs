//! Alert rules: what a user posts, checked field by field, and the stored form.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};
use tally_store::{Granularity, Metric};
use tally_types::Millis;
use tally_types::time::{format_rfc3339, parse_duration_ms, parse_time_param};

/// A rule the API refused, naming the field, the value and the fix.
/// Metrics of the node rather than of events, which a rule may watch:
/// the consumer lag of the cluster in Kafka mode, in seconds and records
/// (the largest over partitions, sampled every second; a bucket's value is
/// its largest sample).
pub const NODE_METRICS: [&str; 2] = ["consumer_lag_seconds", "consumer_lag_records"];

/// Whether `metric` names one of [`NODE_METRICS`].
pub fn is_node_metric(metric: &str) -> bool {
    NODE_METRICS.contains(&metric)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

/// Notification targets of one rule at most.
pub const MAX_TARGETS: usize = 10;
/// Longest webhook URL.
pub const MAX_URL: usize = 2048;

fn err(field: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError {
        field: field.into(),
        message: message.into(),
    }
}

/// Comparison of a threshold detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    pub fn holds(self, x: f64, v: f64) -> bool {
        match self {
            Op::Gt => x > v,
            Op::Ge => x >= v,
            Op::Lt => x < v,
            Op::Le => x <= v,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }
}

/// Which side of the expected value an anomaly detector watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Both,
    Up,
    Down,
}

impl Direction {
    /// Whether a deviation `d` (value − expected) of `score` deviations counts.
    pub fn anomalous(self, d: f64, score: f64, limit: f64) -> bool {
        let side = match self {
            Direction::Both => true,
            Direction::Up => d > 0.0,
            Direction::Down => d < 0.0,
        };
        side && score > limit
    }
}

/// How a rule judges one bucket's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Detector {
    Threshold {
        op: Op,
        value: f64,
    },
    /// `|x − mean| / stddev > z` over the last `window` buckets.
    Zscore {
        window: u32,
        z: f64,
        #[serde(default)]
        direction: Direction,
    },
    /// `|x − ewma| > k · ew-stddev`, after `window` buckets of warm-up.
    Ewma {
        alpha: f64,
        k: f64,
        window: u32,
        #[serde(default)]
        direction: Direction,
    },
}

impl Detector {
    /// Buckets of history needed before the detector can fire.
    pub fn warmup(&self) -> u32 {
        match self {
            Detector::Threshold { .. } => 0,
            Detector::Zscore { window, .. } | Detector::Ewma { window, .. } => *window,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Detector::Threshold { .. } => "threshold",
            Detector::Zscore { .. } => "zscore",
            Detector::Ewma { .. } => "ewma",
        }
    }
}

/// The body shape a webhook target receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The body of API.md.
    #[default]
    Tally,
    /// PagerDuty Events API v2 (`routing_key`, `event_action`, `dedup_key`, `payload`).
    Pagerduty,
    /// Slack-style incoming webhook (`text`).
    Slack,
}

/// Where notifications of a rule go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// The URL to POST to (empty for an e-mail target).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub webhook: String,
    /// An address to mail through `[smtp]`, instead of a webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default)]
    pub format: Format,
    /// PagerDuty integration key (required with `format = "pagerduty"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// PagerDuty severity: critical, error (default), warning or info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
}

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub metric: String,
    pub event_type: Vec<String>,
    pub granularity: String,
    pub detector: Detector,
    pub for_ms: Millis,
    pub resolve_after_ms: Millis,
    pub notify: Vec<Target>,
    pub silenced_until: Option<Millis>,
    pub created_at: Millis,
    /// Sliding window: each bucket is judged on this much time ending at
    /// its end (as `window=` on the metrics API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<Millis>,
    /// A ratio: the metric divided by this one without the filters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
    /// `where` filters on dimensions other than the event type, as
    /// (dimension, value); values of one dimension are any-of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<(String, String)>,
    /// One series per combination of these keys (`event_type` and
    /// declared dimensions), each with its own state and episodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
}

impl Rule {
    /// Bucket width in ms.
    pub fn step(&self) -> Millis {
        Granularity::parse(&self.granularity).map_or(60_000, |g| g.ms())
    }

    pub fn metric(&self) -> Metric {
        Metric::parse(&self.metric).unwrap_or(Metric::Count)
    }

    /// The denominator metric of a ratio rule.
    pub fn over_metric(&self) -> Option<Metric> {
        Metric::parse(self.over.as_deref()?).ok()
    }

    /// Whether the rule watches the node rather than events: its buckets
    /// are wall-clock time, closed as the clock passes them, and its value
    /// is the worst sample of the bucket.
    pub fn node_metric(&self) -> bool {
        is_node_metric(&self.metric)
    }

    /// Whether a bucket without events counts as 0 (count, distinct, sum) or
    /// has no value at all (avg, min, max, quantiles).
    pub fn zero_when_empty(&self) -> bool {
        !self.node_metric()
            && self.over.is_none()
            && matches!(
                self.metric(),
                Metric::Count | Metric::UniqueUsers | Metric::UniqueSessions | Metric::Sum(_)
            )
    }

    /// Consecutive true buckets needed to fire (at least one).
    pub fn fire_after(&self) -> u32 {
        buckets(self.for_ms, self.step())
    }

    /// Consecutive false buckets needed to resolve (at least one).
    pub fn resolve_after(&self) -> u32 {
        buckets(self.resolve_after_ms, self.step())
    }

    pub fn silenced(&self, now: Millis) -> bool {
        self.silenced_until.is_some_and(|u| now < u)
    }

    /// The rule as the API shows it (durations as text, times RFC 3339).
    pub fn to_json(&self) -> Json {
        json!({
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "metric": self.metric,
            "event_type": self.event_type,
            "granularity": self.granularity,
            "detector": self.detector,
            "for": human(self.for_ms),
            "resolve_after": human(self.resolve_after_ms),
            "notify": self.notify,
            "silenced_until": self.silenced_until.map(format_rfc3339),
            "created_at": format_rfc3339(self.created_at),
            "window": self.window_ms.map(human),
            "over": self.over,
            "where": self
                .filters
                .iter()
                .map(|(d, v)| format!("{d}:{v}"))
                .collect::<Vec<_>>(),
            "group_by": self.group_by,
        })
    }

    /// Whether two rules judge and notify the same way (an update that
    /// changes none of this keeps the rule's state).
    pub fn same_definition(&self, o: &Rule) -> bool {
        self.metric == o.metric
            && self.event_type == o.event_type
            && self.granularity == o.granularity
            && self.detector == o.detector
            && self.for_ms == o.for_ms
            && self.resolve_after_ms == o.resolve_after_ms
            && self.window_ms == o.window_ms
            && self.over == o.over
            && self.filters == o.filters
            && self.group_by == o.group_by
    }

    /// The metrics query that gives this rule's values over `[start, end)`.
    pub fn query(&self, start: Millis, end: Millis) -> tally_store::MetricQuery {
        let mut q = tally_store::MetricQuery {
            tenant: self.tenant.clone(),
            metric: self.metric(),
            start,
            end,
            granularity: Granularity::parse(&self.granularity).unwrap_or(Granularity::M1),
            event_types: self.event_type.clone(),
            group_by: self.group_by.clone(),
            filters: Vec::new(),
            window: self.window_ms,
            over: self.over_metric(),
        };
        for (d, v) in &self.filters {
            q.add_filter(d, v);
        }
        q
    }
}

fn buckets(ms: Millis, step: Millis) -> u32 {
    (((ms + step - 1) / step).max(1)).min(u32::MAX as i64) as u32
}

/// `120000` → `"2m"`; exact units only.
pub fn human(ms: Millis) -> String {
    for (unit, n) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms != 0 && ms % n == 0 {
            return format!("{}{unit}", ms / n);
        }
    }
    if ms == 0 {
        "0s".into()
    } else {
        format!("{ms}ms")
    }
}

const FIELDS: &[&str] = &[
    "name",
    "metric",
    "event_type",
    "granularity",
    "window",
    "where",
    "over",
    "group_by",
    "detector",
    "for",
    "resolve_after",
    "notify",
    "tenant",
    "silenced_until",
];

/// Checks a posted rule and builds it (id, tenant and creation time come
/// from the caller). Every error names the field.
pub fn parse_rule(body: &Json, tenant: &str, id: String, now: Millis) -> Result<Rule, RuleError> {
    let obj = body
        .as_object()
        .ok_or_else(|| err("body", "must be a JSON object describing one rule"))?;
    for k in obj.keys() {
        if !FIELDS.contains(&k.as_str()) {
            return Err(err(
                k.as_str(),
                format!("unknown field; a rule has {}", FIELDS.join(", ")),
            ));
        }
    }
    let name = string(obj, "name")?.ok_or_else(|| err("name", "required, e.g. \"error-spike\""))?;
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(err(
            "name",
            format!("{name:?}: 1 to 128 printable characters"),
        ));
    }
    let metric = string(obj, "metric")?.unwrap_or_else(|| "count".into());
    if !is_node_metric(&metric) {
        Metric::parse(&metric).map_err(|e| {
            err(
                "metric",
                format!(
                    "{e} (or a node metric: {}, measured in Kafka mode)",
                    NODE_METRICS.join(", ")
                ),
            )
        })?;
    }
    let event_type = match obj.get("event_type") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(s)) => vec![s.clone()],
        Some(Json::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        err(
                            format!("event_type[{i}]"),
                            format!("{v}: must be a non-empty string"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(err(
                "event_type",
                format!("{v}: must be a string or an array of strings"),
            ));
        }
    };
    if is_node_metric(&metric) && !event_type.is_empty() {
        return Err(err(
            "event_type",
            format!(
                "{metric} is a node metric (the whole cluster's consumer lag), not one of events: leave event_type out"
            ),
        ));
    }
    // `where=event_type:<t>` as on the metrics API: the event types any of
    // which a bucket counts (with `event_type`).
    let mut event_type = event_type;
    let wheres: Vec<String> = match obj.get("where") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(w)) => vec![w.clone()],
        Some(Json::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                err(
                    "where",
                    "must be a string or an array of strings like \"event_type:error\"",
                )
            })?,
        Some(v) => {
            return Err(err(
                "where",
                format!("{v}: must be a string or an array of strings like \"event_type:error\""),
            ));
        }
    };
    let mut filters = Vec::new();
    for w in wheres {
        let (d, v) = tally_store::parse_where(&w).map_err(|e| err("where", e))?;
        if d == "event_type" {
            event_type.push(v);
        } else {
            filters.push((d, v));
        }
    }
    if is_node_metric(&metric) && !filters.is_empty() {
        return Err(err(
            "where",
            format!("{metric} is a node metric, not one of events: leave where out"),
        ));
    }
    let group_by = match obj.get("group_by") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(g)) => tally_store::parse_group_by(g),
        Some(Json::Array(a)) => {
            let mut out = Vec::new();
            for v in a {
                let g = v.as_str().ok_or_else(|| {
                    err(
                        "group_by",
                        format!("{v}: must be a dimension name like \"country\""),
                    )
                })?;
                out.extend(tally_store::parse_group_by(g));
            }
            out.dedup();
            out
        }
        Some(v) => {
            return Err(err(
                "group_by",
                format!("{v}: must be a string like \"country\" or \"event_type,country\""),
            ));
        }
    };
    if is_node_metric(&metric) && !group_by.is_empty() {
        return Err(err(
            "group_by",
            format!(
                "{metric} is a node metric: one series for the whole cluster, without group_by"
            ),
        ));
    }
    let over = string(obj, "over")?;
    if let Some(o) = &over {
        Metric::parse(o).map_err(|e| {
            err(
                "over",
                format!("{e} (the metric to divide by, e.g. \"count\")"),
            )
        })?;
    }
    let granularity = string(obj, "granularity")?.unwrap_or_else(|| "1m".into());
    let g = Granularity::parse(&granularity).map_err(|e| err("granularity", e.to_string()))?;
    let window_ms = match string(obj, "window")? {
        None => None,
        Some(w) => {
            let ms = parse_duration_ms(&w).filter(|&ms| ms > 0).ok_or_else(|| {
                err(
                    "window",
                    format!("{w:?} is not a duration; give one like \"5m\""),
                )
            })?;
            if ms < g.ms() || ms % g.ms() != 0 {
                return Err(err(
                    "window",
                    format!(
                        "{w:?} is not a whole number of buckets of the granularity ({})",
                        g.as_str()
                    ),
                ));
            }
            Some(ms)
        }
    };
    if is_node_metric(&metric) && (window_ms.is_some() || over.is_some()) {
        return Err(err(
            if over.is_some() { "over" } else { "window" },
            format!(
                "{metric} is a node metric: each bucket is its largest sample, without window or over"
            ),
        ));
    }
    let detector = parse_detector(obj.get("detector").ok_or_else(|| {
        err(
            "detector",
            "required, e.g. {\"kind\": \"threshold\", \"op\": \">\", \"value\": 100}",
        )
    })?)?;
    let for_ms = duration(obj, "for")?.unwrap_or(0);
    let resolve_after_ms = duration(obj, "resolve_after")?.unwrap_or(g.ms());
    let notify = match obj.get("notify") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(a)) if a.len() > MAX_TARGETS => {
            return Err(err(
                "notify",
                format!("{} targets; a rule has at most {MAX_TARGETS}", a.len()),
            ));
        }
        Some(Json::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| parse_target(t, &format!("notify[{i}]")))
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(err(
                "notify",
                format!(
                    "{v}: must be an array of targets, e.g. [{{\"webhook\": \"http://127.0.0.1:9000/hook\"}}]"
                ),
            ));
        }
    };
    let silenced_until = match obj.get("silenced_until") {
        None | Some(Json::Null) => None,
        Some(v) => Some(time_value(v, "silenced_until")?),
    };
    Ok(Rule {
        id,
        name,
        tenant: tenant.to_string(),
        metric,
        event_type,
        granularity: g.as_str().to_string(),
        detector,
        for_ms,
        resolve_after_ms,
        notify,
        silenced_until,
        created_at: now,
        window_ms,
        over,
        filters,
        group_by,
    })
}

/// An RFC 3339 string or epoch ms.
pub fn time_value(v: &Json, field: &str) -> Result<Millis, RuleError> {
    match v {
        Json::Number(n) => n
            .as_i64()
            .ok_or_else(|| err(field, format!("{n}: not an epoch-ms integer"))),
        Json::String(s) => parse_time_param(s)
            .map_err(|e| err(field, format!("{s:?}: {e}; use RFC 3339 or epoch ms"))),
        other => Err(err(
            field,
            format!("{other}: use an RFC 3339 string or epoch ms"),
        )),
    }
}

fn string(obj: &Map<String, Json>, key: &str) -> Result<Option<String>, RuleError> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(err(key, format!("{v}: must be a string"))),
    }
}

fn duration(obj: &Map<String, Json>, key: &str) -> Result<Option<Millis>, RuleError> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => parse_duration_ms(s)
            .filter(|&ms| ms >= 0)
            .map(Some)
            .ok_or_else(|| {
                err(
                    key,
                    format!("{s:?}: not a duration; write it like \"90s\", \"2m\" or \"1h\""),
                )
            }),
        Some(Json::Number(n)) => n
            .as_u64()
            .map(|s| Some((s as i64).saturating_mul(1000)))
            .ok_or_else(|| err(key, format!("{n}: a number here is whole seconds, >= 0"))),
        Some(v) => Err(err(key, format!("{v}: write a duration like \"2m\""))),
    }
}

fn number(d: &Map<String, Json>, key: &str) -> Result<Option<f64>, RuleError> {
    let field = format!("detector.{key}");
    match d.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| err(field, format!("{n}: not a finite number"))),
        Some(v) => Err(err(field, format!("{v}: must be a number"))),
    }
}

fn parse_detector(v: &Json) -> Result<Detector, RuleError> {
    let d = v.as_object().ok_or_else(|| {
        err(
            "detector",
            format!("{v}: must be an object with a \"kind\""),
        )
    })?;
    let kind = d
        .get("kind")
        .and_then(Json::as_str)
        .ok_or_else(|| err("detector.kind", "required: threshold, zscore or ewma"))?;
    let allowed: &[&str] = match kind {
        "threshold" => &["kind", "op", "value"],
        "zscore" => &["kind", "window", "z", "direction"],
        "ewma" => &["kind", "alpha", "k", "window", "direction"],
        other => {
            return Err(err(
                "detector.kind",
                format!("{other:?} is not a detector; use threshold, zscore or ewma"),
            ));
        }
    };
    for k in d.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(err(
                format!("detector.{k}"),
                format!("unknown for {kind}; it takes {}", allowed[1..].join(", ")),
            ));
        }
    }
    let direction = || -> Result<Direction, RuleError> {
        match d.get("direction") {
            None | Some(Json::Null) => Ok(Direction::Both),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                err(
                    "detector.direction",
                    format!("{v}: use \"both\", \"up\" or \"down\""),
                )
            }),
        }
    };
    let window = |default: Option<u32>| -> Result<u32, RuleError> {
        match d.get("window") {
            None | Some(Json::Null) => default.ok_or_else(|| {
                err(
                    "detector.window",
                    "required: how many past buckets, e.g. 30",
                )
            }),
            Some(v) => v
                .as_u64()
                .filter(|&w| (2..=10_000).contains(&w))
                .map(|w| w as u32)
                .ok_or_else(|| {
                    err(
                        "detector.window",
                        format!("{v}: a whole number of buckets from 2 to 10000"),
                    )
                }),
        }
    };
    Ok(match kind {
        "threshold" => {
            let op = match d.get("op") {
                Some(v) => serde_json::from_value::<Op>(v.clone())
                    .map_err(|_| err("detector.op", format!("{v}: use one of >, >=, <, <=")))?,
                None => return Err(err("detector.op", "required: one of >, >=, <, <=")),
            };
            let value = number(d, "value")?
                .ok_or_else(|| err("detector.value", "required: the number to compare with"))?;
            Detector::Threshold { op, value }
        }
        "zscore" => {
            let z = number(d, "z")?.ok_or_else(|| {
                err(
                    "detector.z",
                    "required: how many standard deviations, e.g. 3",
                )
            })?;
            if z <= 0.0 {
                return Err(err("detector.z", format!("{z}: must be > 0")));
            }
            Detector::Zscore {
                window: window(None)?,
                z,
                direction: direction()?,
            }
        }
        _ => {
            let alpha = number(d, "alpha")?.ok_or_else(|| {
                err(
                    "detector.alpha",
                    "required: the smoothing factor in (0, 1], e.g. 0.3",
                )
            })?;
            if !(alpha > 0.0 && alpha <= 1.0) {
                return Err(err("detector.alpha", format!("{alpha}: must be in (0, 1]")));
            }
            let k = number(d, "k")?.ok_or_else(|| {
                err(
                    "detector.k",
                    "required: how many smoothed deviations, e.g. 3",
                )
            })?;
            if k <= 0.0 {
                return Err(err("detector.k", format!("{k}: must be > 0")));
            }
            // Default warm-up: about the detector's memory (2/alpha buckets).
            let default = ((2.0 / alpha).ceil() as u32).clamp(2, 10_000);
            Detector::Ewma {
                alpha,
                k,
                window: window(Some(default))?,
                direction: direction()?,
            }
        }
    })
}

/// An address one can mail: `local@domain`, no spaces or line breaks (a
/// header injection), at most 254 bytes.
fn check_email(a: &str) -> Result<(), String> {
    let a = a.trim();
    let ok = a.len() <= 254
        && !a
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>,;\"".contains(c))
        && a.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty()
                && !d.is_empty()
                && !d.contains('@')
                && !d.starts_with('.')
                && !d.ends_with('.')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{a:?} is not an e-mail address like ops@example.com"
        ))
    }
}

fn parse_target(v: &Json, field: &str) -> Result<Target, RuleError> {
    let o = v.as_object().ok_or_else(|| {
        err(
            field,
            format!("{v}: must be an object like {{\"webhook\": \"http://…\"}}"),
        )
    })?;
    for k in o.keys() {
        if !["webhook", "email", "format", "routing_key", "severity"].contains(&k.as_str()) {
            return Err(err(
                format!("{field}.{k}"),
                "unknown; a target has webhook (with format, routing_key, severity) or email",
            ));
        }
    }
    if let Some(e) = o.get("email") {
        if let Some(k) = ["webhook", "format", "routing_key", "severity"]
            .into_iter()
            .find(|k| o.contains_key(*k))
        {
            return Err(err(
                format!("{field}.{k}"),
                "an e-mail target has only \"email\"; put a webhook in a target of its own",
            ));
        }
        let addr = e
            .as_str()
            .ok_or_else(|| err(format!("{field}.email"), format!("{e}: must be a string")))?;
        check_email(addr).map_err(|m| err(format!("{field}.email"), m))?;
        return Ok(Target {
            webhook: String::new(),
            email: Some(addr.trim().to_string()),
            format: Format::Tally,
            routing_key: None,
            severity: None,
        });
    }
    let url = o
        .get("webhook")
        .and_then(Json::as_str)
        .ok_or_else(|| err(format!("{field}.webhook"), "required: the URL to POST to"))?;
    if url.len() > MAX_URL {
        return Err(err(
            format!("{field}.webhook"),
            format!("{} bytes; a webhook URL has at most {MAX_URL}", url.len()),
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| err(format!("{field}.webhook"), format!("{url:?}: {e}")))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(err(
            format!("{field}.webhook"),
            "credentials in the URL (user:password@) are not accepted; put a token in the path or query",
        ));
    }
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(err(
            format!("{field}.webhook"),
            format!("{url:?}: must be an http:// or https:// URL with a host"),
        ));
    }
    let format = match o.get("format") {
        None | Some(Json::Null) => Format::Tally,
        Some(f) => serde_json::from_value(f.clone()).map_err(|_| {
            err(
                format!("{field}.format"),
                format!("{f}: use \"tally\", \"pagerduty\" or \"slack\""),
            )
        })?,
    };
    let routing_key = o
        .get("routing_key")
        .and_then(Json::as_str)
        .map(String::from);
    if format == Format::Pagerduty && routing_key.as_deref().is_none_or(str::is_empty) {
        return Err(err(
            format!("{field}.routing_key"),
            "required with format \"pagerduty\": the integration key of the service",
        ));
    }
    let severity = o.get("severity").and_then(Json::as_str).map(String::from);
    if let Some(s) = &severity
        && !["critical", "error", "warning", "info"].contains(&s.as_str())
    {
        return Err(err(
            format!("{field}.severity"),
            format!("{s:?}: use critical, error, warning or info"),
        ));
    }
    Ok(Target {
        webhook: url.to_string(),
        email: None,
        format,
        routing_key,
        severity,
    })
}
