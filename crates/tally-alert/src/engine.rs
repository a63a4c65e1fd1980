//! The alert engine: rules, their states, the history of changes and the
//! outbox of webhook deliveries, persisted as one file.
//!
//! Evaluation is driven from outside: [`Engine::advance`] is called with the
//! event time up to which buckets are closed (the watermark, or the watermark
//! carried forward by wall-clock time when data stops) and evaluates, for each
//! rule, every bucket of its granularity that closed since the last call, in
//! order, exactly once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tally_types::Millis;
use tally_types::time::{align_down, format_rfc3339};

use crate::deliver::{Note, payload};
use crate::rule::{Detector, Rule};

/// Where a rule stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Ok,
    Pending,
    Firing,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Pending => "pending",
            State::Firing => "firing",
        }
    }
}

/// Exponentially weighted mean and variance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub n: u32,
    pub mean: f64,
    pub var: f64,
}

impl Ewma {
    fn update(&mut self, alpha: f64, x: f64) {
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let d = x - self.mean;
            let inc = alpha * d;
            self.mean += inc;
            self.var = (1.0 - alpha) * (self.var + d * inc);
        }
        self.n = self.n.saturating_add(1);
    }
}

/// Evaluation state of one rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub state: State,
    /// Wall time of the last state change.
    pub since: Option<Millis>,
    /// Start of the first bucket not evaluated yet (None: never evaluated).
    pub next_bucket: Option<Millis>,
    pub true_run: u32,
    pub false_run: u32,
    /// First bucket of the current firing episode (names its dedupe key).
    pub episode_start: Option<Millis>,
    /// Whether this episode's `firing` went out (a silence holds it back).
    pub notified: bool,
    /// Past values for the z-score detector (oldest first).
    pub window: VecDeque<f64>,
    pub ewma: Option<Ewma>,
    pub last_value: Option<f64>,
    pub last_bucket: Option<Millis>,
    /// Whether the series has had data yet: an anomaly detector's history
    /// starts with its first value, not with the empty buckets before it.
    #[serde(default)]
    pub seen: bool,
    /// Event time closed when the rule was created (None: no data then).
    #[serde(default)]
    pub start: Option<Millis>,
}

/// One line of `GET /api/v1/alerts/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: Millis,
    pub rule_id: String,
    pub rule: String,
    pub tenant: String,
    /// `state` (a transition) or `delivery` (a webhook outcome).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// ok, pending, firing or resolved (state); delivered, retrying, failed, dropped (delivery).
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_start: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_end: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl HistoryEntry {
    pub fn to_json(&self) -> Json {
        let mut v = json!({
            "at": format_rfc3339(self.at),
            "rule_id": self.rule_id,
            "rule": self.rule,
            "tenant": self.tenant,
            "kind": self.kind,
            "to": self.to,
        });
        let o = v.as_object_mut().expect("object literal");
        if let Some(f) = &self.from {
            o.insert("from".into(), json!(f));
        }
        if self.kind == "state" {
            o.insert("value".into(), json!(self.value));
        }
        if let Some(b) = self.bucket_start {
            o.insert("bucket_start".into(), json!(format_rfc3339(b)));
        }
        if let Some(b) = self.bucket_end {
            o.insert("bucket_end".into(), json!(format_rfc3339(b)));
        }
        for (k, x) in [
            ("dedupe_key", &self.dedupe_key),
            ("target", &self.target),
            ("detail", &self.detail),
        ] {
            if let Some(x) = x {
                o.insert(k.into(), json!(x));
            }
        }
        if let Some(a) = self.attempt {
            o.insert("attempt".into(), json!(a));
        }
        v
    }
}

/// A webhook call waiting in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub id: u64,
    pub rule_id: String,
    pub rule: String,
    pub tenant: String,
    pub url: String,
    pub body: String,
    pub dedupe_key: String,
    pub status: String,
    /// Failed attempts so far.
    pub attempts: u32,
    pub next_at: Millis,
    pub created_at: Millis,
    #[serde(skip)]
    pub in_flight: bool,
    /// When the bucket behind it closed (for the alert latency; not persisted).
    #[serde(skip)]
    pub closed: Option<Instant>,
}

/// Limits and retry policy.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most deliveries waiting; past it the oldest is dropped (and counted).
    pub max_queue: usize,
    /// Attempts per delivery before it is given up.
    pub max_attempts: u32,
    pub backoff_ms: Millis,
    pub max_backoff_ms: Millis,
    /// History entries kept.
    pub history: usize,
    /// Most buckets one rule evaluates in one call (a long backfill skips ahead).
    pub max_catchup: i64,
    /// Rules one tenant may have.
    pub max_rules_per_tenant: usize,
    /// Where webhooks may go (checked when a rule is written).
    pub targets: std::sync::Arc<crate::TargetPolicy>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_queue: 10_000,
            max_attempts: 10,
            backoff_ms: 500,
            max_backoff_ms: 60_000,
            history: 1000,
            max_catchup: 10_000,
            max_rules_per_tenant: 100,
            targets: std::sync::Arc::default(),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub evaluations: u64,
    pub notifications: u64,
    pub delivered: u64,
    pub delivery_failures: u64,
    pub gave_up: u64,
    pub dropped: u64,
    pub persist_errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("alert state file {path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Rule(#[from] crate::rule::RuleError),
    #[error("no alert rule {0:?} in this tenant")]
    NotFound(String),
}

#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    rules: Vec<Rule>,
    states: HashMap<String, RuleState>,
    history: VecDeque<HistoryEntry>,
    outbox: VecDeque<Delivery>,
    next_id: u64,
}

/// What an outbox delivery came to.
#[derive(Debug)]
pub enum Outcome {
    Delivered,
    Failed(String),
}

/// Where rules read their numbers (the rollup store in the server).
pub trait Source {
    /// A bucket range of a rule's metric: `(bucket start, value)` for the
    /// buckets that have data, exactly as the metrics API would answer.
    fn values(&self, rule: &Rule, from: Millis, to: Millis) -> Vec<(Millis, f64)>;
    /// The first minute with data of a tenant.
    fn first_minute(&self, tenant: &str) -> Option<Millis>;
}

type ValuesFn<'a> = &'a dyn Source;

pub struct Engine {
    cfg: EngineConfig,
    path: Option<PathBuf>,
    rules: BTreeMap<String, Rule>,
    states: HashMap<String, RuleState>,
    history: VecDeque<HistoryEntry>,
    outbox: VecDeque<Delivery>,
    next_id: u64,
    /// Changes not yet persisted.
    dirty: bool,
    /// Grows with every visible change (the live feed polls it).
    pub version: u64,
    pub stats: Stats,
}

impl Engine {
    /// Opens the engine persisted at `path` (None: in memory only).
    pub fn open(path: Option<PathBuf>, cfg: EngineConfig) -> Result<Engine, AlertError> {
        let mut p = Persisted::default();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => {
                    p = serde_json::from_slice(&bytes).map_err(|source| AlertError::Corrupt {
                        path: path.clone(),
                        source,
                    })?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(AlertError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(Engine {
            cfg,
            path,
            rules: p.rules.into_iter().map(|r| (r.id.clone(), r)).collect(),
            states: p.states,
            history: p.history,
            outbox: p.outbox,
            next_id: p.next_id,
            dirty: false,
            version: 1,
            stats: Stats::default(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Writes the engine to its file if anything changed (temp file, fsync,
    /// rename: a crash leaves the old or the new file, never a torn one).
    pub fn persist(&mut self) -> Result<(), AlertError> {
        if !self.dirty {
            return Ok(());
        }
        let Some(path) = self.path.clone() else {
            self.dirty = false;
            return Ok(());
        };
        let p = PersistedRef {
            rules: self.rules.values().collect(),
            states: &self.states,
            history: &self.history,
            outbox: &self.outbox,
            next_id: self.next_id,
        };
        let bytes = serde_json::to_vec(&p).map_err(|e| AlertError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        match write_atomic(&path, &bytes) {
            Ok(()) => {
                self.dirty = false;
                Ok(())
            }
            Err(source) => {
                self.stats.persist_errors += 1;
                Err(AlertError::Io { path, source })
            }
        }
    }

    fn changed(&mut self) {
        self.dirty = true;
        self.version += 1;
    }

    /// Creates a rule, or replaces the tenant's rule of the same name (its
    /// id stays; its state stays unless the definition changed). Returns the
    /// rule and whether it is new.
    ///
    /// `closed_through` is how far event time has closed now: the rule
    /// judges the buckets that close after it (None: no data yet, so every
    /// bucket from the tenant's first data on).
    pub fn upsert(
        &mut self,
        body: &Json,
        tenant: &str,
        now: Millis,
        closed_through: Option<Millis>,
    ) -> Result<(Rule, bool), AlertError> {
        let fresh = RuleState {
            start: closed_through,
            ..RuleState::default()
        };
        let existing = self
            .rules
            .values()
            .find(|r| {
                r.tenant == tenant && body.get("name").and_then(Json::as_str) == Some(&r.name)
            })
            .map(|r| (r.id.clone(), r.created_at));
        let id = match &existing {
            Some((id, _)) => id.clone(),
            None => {
                self.next_id += 1;
                let h = tally_types::stable_hash(&[
                    tenant.as_bytes(),
                    &now.to_le_bytes(),
                    &self.next_id.to_le_bytes(),
                ]);
                format!("r{:012x}", h & 0xffff_ffff_ffff)
            }
        };
        let mut rule = crate::rule::parse_rule(body, tenant, id.clone(), now)?;
        for (i, t) in rule.notify.iter().enumerate() {
            let url = reqwest::Url::parse(&t.webhook).map_err(|e| crate::rule::RuleError {
                field: format!("notify[{i}].webhook"),
                message: e.to_string(),
            })?;
            self.cfg
                .targets
                .check_url(&url)
                .map_err(|message| crate::rule::RuleError {
                    field: format!("notify[{i}].webhook"),
                    message,
                })?;
        }
        let created = existing.is_none();
        if created
            && self.rules.values().filter(|r| r.tenant == tenant).count()
                >= self.cfg.max_rules_per_tenant
        {
            return Err(crate::rule::RuleError {
                field: "name".into(),
                message: format!(
                    "tenant {tenant:?} has {} rules, the most it may have; delete one first",
                    self.cfg.max_rules_per_tenant
                ),
            }
            .into());
        }
        if let Some((_, created_at)) = existing {
            rule.created_at = created_at;
            if !self.rules[&id].same_definition(&rule) {
                self.states.insert(id.clone(), fresh);
            }
        } else {
            self.states.insert(id.clone(), fresh);
        }
        self.rules.insert(id, rule.clone());
        self.changed();
        Ok((rule, created))
    }

    pub fn delete(&mut self, tenant: &str, id: &str) -> Result<Rule, AlertError> {
        match self.rules.get(id) {
            Some(r) if r.tenant == tenant => {}
            _ => return Err(AlertError::NotFound(id.to_string())),
        }
        let rule = self.rules.remove(id).expect("checked above");
        self.states.remove(id);
        // Deliveries already queued still go out: the receiver should learn
        // how an episode it was told about ended.
        self.changed();
        Ok(rule)
    }

    /// Mutes a rule's notifications until `until` (None lifts the silence).
    pub fn silence(
        &mut self,
        tenant: &str,
        id: &str,
        until: Option<Millis>,
    ) -> Result<Rule, AlertError> {
        match self.rules.get_mut(id) {
            Some(r) if r.tenant == tenant => {
                r.silenced_until = until;
                let r = r.clone();
                self.changed();
                Ok(r)
            }
            _ => Err(AlertError::NotFound(id.to_string())),
        }
    }

    pub fn rules(&self, tenant: Option<&str>) -> impl Iterator<Item = (&Rule, &RuleState)> {
        self.rules
            .values()
            .filter(move |r| tenant.is_none_or(|t| r.tenant == t))
            .map(|r| (r, self.states.get(&r.id).unwrap_or(&DEFAULT_STATE)))
    }

    pub fn rule(&self, id: &str) -> Option<(&Rule, &RuleState)> {
        let r = self.rules.get(id)?;
        Some((r, self.states.get(id).unwrap_or(&DEFAULT_STATE)))
    }

    /// The newest `limit` history entries of a tenant, newest first.
    pub fn history(&self, tenant: &str, rule_id: Option<&str>, limit: usize) -> Vec<&HistoryEntry> {
        self.history
            .iter()
            .rev()
            .filter(|h| h.tenant == tenant && rule_id.is_none_or(|id| h.rule_id == id))
            .take(limit)
            .collect()
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    pub fn firing(&self) -> usize {
        self.states
            .values()
            .filter(|s| s.state == State::Firing)
            .count()
    }

    fn record(&mut self, h: HistoryEntry) {
        if self.history.len() >= self.cfg.history.max(1) {
            self.history.pop_front();
        }
        self.history.push_back(h);
    }

    /// Evaluates every bucket of every rule that closed before `closed_through`
    /// (event time). `now` is the wall time stamped on notifications; `closed`
    /// is when the watermark passed (for the alert latency). Returns the
    /// number of deliveries queued.
    pub fn advance(
        &mut self,
        closed_through: Millis,
        now: Millis,
        closed: Option<Instant>,
        values: ValuesFn<'_>,
    ) -> usize {
        self.advance_tenants(&|_| Some(closed_through), now, closed, values)
    }

    /// As [`Engine::advance`], with each tenant's own event time: a rule
    /// judges the buckets its tenant's clock closed (`None`: nothing yet),
    /// never another tenant's.
    pub fn advance_tenants(
        &mut self,
        closed_through: &dyn Fn(&str) -> Option<Millis>,
        now: Millis,
        closed: Option<Instant>,
        values: ValuesFn<'_>,
    ) -> usize {
        let ids: Vec<(String, Millis)> = self
            .rules
            .iter()
            .filter_map(|(id, r)| Some((id.clone(), closed_through(&r.tenant)?)))
            .collect();
        let mut queued = 0;
        for (id, through) in ids {
            queued += self.advance_rule(&id, through, now, closed, values);
        }
        queued
    }

    fn advance_rule(
        &mut self,
        id: &str,
        closed_through: Millis,
        now: Millis,
        closed: Option<Instant>,
        values: ValuesFn<'_>,
    ) -> usize {
        let Some(rule) = self.rules.get(id) else {
            return 0;
        };
        let g = rule.step();
        let through = align_down(closed_through, g);
        // Most calls (every tick between bucket closes) have nothing to do.
        if let Some(st) = self.states.get(id)
            && st.next_bucket.is_some_and(|n| n >= through)
            && !(st.state == State::Firing && !st.notified && !rule.silenced(now))
        {
            return 0;
        }
        let rule = rule.clone();
        let mut st = self.states.remove(id).unwrap_or_default();
        let mut queued = 0;
        let mut next = match st.next_bucket {
            Some(n) => n,
            None => {
                // A new rule starts at the bucket that was open when it was
                // created (or, created before any data, at the tenant's
                // first data); an anomaly detector first learns its window
                // from the buckets before that.
                let start = match st.start {
                    Some(ct) => align_down(ct, g),
                    None => values
                        .first_minute(&rule.tenant)
                        .map_or(through, |f| align_down(f, g)),
                };
                let warm = rule.detector.warmup() as i64;
                if warm > 0 {
                    let from = start - warm * g;
                    for (_, v) in dense(&rule, from, start, values) {
                        if let Some(x) = fill(&rule, &mut st, v) {
                            learn(&rule.detector, &mut st, x);
                        }
                    }
                }
                st.next_bucket = Some(start);
                self.dirty = true;
                start
            }
        };
        if through > next {
            if (through - next) / g > self.cfg.max_catchup {
                let skip_to = through - self.cfg.max_catchup * g;
                tracing::warn!(rule = %rule.name, skipped = (skip_to - next) / g, "alert rule is far behind; skipping old buckets");
                next = skip_to;
            }
            for (b, v) in dense(&rule, next, through, values) {
                self.stats.evaluations += 1;
                let v = fill(&rule, &mut st, v);
                queued += self.step(&rule, &mut st, b, v, now, closed);
            }
            st.next_bucket = Some(through);
            self.dirty = true;
        }
        // A silence that ended while an episode is firing: send its firing now.
        if st.state == State::Firing && !st.notified && !rule.silenced(now) {
            let b = st.last_bucket.unwrap_or(through - g);
            let v = st.last_value;
            queued += self.notify(&rule, &st, "firing", v, b, now, closed);
            st.notified = true;
        }
        self.states.insert(id.to_string(), st);
        queued
    }

    /// One closed bucket through the state machine.
    fn step(
        &mut self,
        rule: &Rule,
        st: &mut RuleState,
        b: Millis,
        v: Option<f64>,
        now: Millis,
        closed: Option<Instant>,
    ) -> usize {
        let cond = judge(&rule.detector, st, v);
        st.last_value = v;
        st.last_bucket = Some(b);
        let g = rule.step();
        let mut queued = 0;
        let before = st.state;
        match (st.state, cond) {
            (State::Ok | State::Pending, true) => {
                st.true_run += 1;
                st.false_run = 0;
                if st.true_run >= rule.fire_after() {
                    st.state = State::Firing;
                    st.episode_start = Some(b - (st.true_run as i64 - 1) * g);
                    st.notified = !rule.silenced(now);
                    self.transition(rule, before, "firing", v, b, now);
                    if st.notified {
                        queued += self.notify(rule, st, "firing", v, b, now, closed);
                    }
                } else if st.state == State::Ok {
                    st.state = State::Pending;
                    self.transition(rule, before, "pending", v, b, now);
                }
            }
            (State::Pending, false) => {
                st.true_run = 0;
                st.state = State::Ok;
                self.transition(rule, before, "ok", v, b, now);
            }
            (State::Ok, false) => st.true_run = 0,
            (State::Firing, true) => st.false_run = 0,
            (State::Firing, false) => {
                st.false_run += 1;
                if st.false_run >= rule.resolve_after() {
                    self.transition(rule, before, "resolved", v, b, now);
                    // An episode the receiver heard of is always closed for it,
                    // even under a silence.
                    if st.notified {
                        queued += self.notify(rule, st, "resolved", v, b, now, closed);
                    }
                    st.state = State::Ok;
                    st.true_run = 0;
                    st.false_run = 0;
                    st.episode_start = None;
                    st.notified = false;
                }
            }
        }
        if st.state != before {
            st.since = Some(now);
        }
        queued
    }

    fn transition(
        &mut self,
        rule: &Rule,
        from: State,
        to: &str,
        v: Option<f64>,
        b: Millis,
        now: Millis,
    ) {
        self.changed();
        tracing::info!(rule = %rule.name, tenant = %rule.tenant, from = from.as_str(), to, value = ?v, bucket = %format_rfc3339(b), "alert state");
        self.record(HistoryEntry {
            at: now,
            rule_id: rule.id.clone(),
            rule: rule.name.clone(),
            tenant: rule.tenant.clone(),
            kind: "state".into(),
            from: Some(from.as_str().into()),
            to: to.into(),
            value: v,
            bucket_start: Some(b),
            bucket_end: Some(b + rule.step()),
            dedupe_key: None,
            target: None,
            attempt: None,
            detail: None,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn notify(
        &mut self,
        rule: &Rule,
        st: &RuleState,
        status: &str,
        v: Option<f64>,
        b: Millis,
        now: Millis,
        closed: Option<Instant>,
    ) -> usize {
        let episode = st.episode_start.unwrap_or(b);
        let note = Note {
            status,
            value: v,
            bucket_start: b,
            bucket_end: b + rule.step(),
            at: now,
            episode_start: episode,
            dedupe_key: format!("{}:{}:{}", rule.id, episode, status),
        };
        self.stats.notifications += 1;
        for t in &rule.notify {
            if self.outbox.len() >= self.cfg.max_queue.max(1)
                && let Some(old) = self.outbox.pop_front()
            {
                self.stats.dropped += 1;
                tracing::warn!(rule = %old.rule, key = %old.dedupe_key, "alert outbox full; dropping the oldest delivery");
                self.record(delivery_entry(
                    &old,
                    now,
                    "dropped",
                    Some("outbox full (alerts.max-queue)".into()),
                ));
            }
            self.next_id += 1;
            self.outbox.push_back(Delivery {
                id: self.next_id,
                rule_id: rule.id.clone(),
                rule: rule.name.clone(),
                tenant: rule.tenant.clone(),
                url: t.webhook.clone(),
                body: payload(rule, t, &note).to_string(),
                dedupe_key: note.dedupe_key.clone(),
                status: status.into(),
                attempts: 0,
                next_at: now,
                created_at: now,
                in_flight: false,
                closed,
            });
        }
        self.changed();
        rule.notify.len()
    }

    /// Deliveries due at `now`, marked in flight, so that at most
    /// `max_in_flight` are in flight in all.
    pub fn take_due(&mut self, now: Millis, max_in_flight: usize) -> Vec<Delivery> {
        let busy = self.outbox.iter().filter(|d| d.in_flight).count();
        let free = max_in_flight.saturating_sub(busy);
        let mut out = Vec::new();
        for d in self.outbox.iter_mut() {
            if out.len() >= free {
                break;
            }
            if !d.in_flight && d.next_at <= now {
                d.in_flight = true;
                out.push(d.clone());
            }
        }
        out
    }

    /// Records how a delivery went: done, or retried after a backoff, or
    /// given up after `max_attempts`.
    pub fn finish(&mut self, id: u64, outcome: Outcome, now: Millis) {
        let Some(i) = self.outbox.iter().position(|d| d.id == id) else {
            return;
        };
        match outcome {
            Outcome::Delivered => {
                let d = self.outbox.remove(i).expect("position found");
                self.stats.delivered += 1;
                self.record(delivery_entry(&d, now, "delivered", None));
            }
            Outcome::Failed(e) => {
                self.stats.delivery_failures += 1;
                let d = &mut self.outbox[i];
                d.attempts += 1;
                d.in_flight = false;
                if d.attempts >= self.cfg.max_attempts {
                    let d = self.outbox.remove(i).expect("position found");
                    self.stats.gave_up += 1;
                    tracing::error!(rule = %d.rule, url = %d.url, attempts = d.attempts, error = %e, "webhook delivery given up");
                    self.record(delivery_entry(&d, now, "failed", Some(e)));
                } else {
                    let backoff = (self.cfg.backoff_ms.max(1) << (d.attempts - 1).min(20))
                        .min(self.cfg.max_backoff_ms.max(1));
                    d.next_at = now + backoff;
                    let d = d.clone();
                    tracing::warn!(rule = %d.rule, url = %d.url, attempt = d.attempts, retry_in_ms = backoff, error = %e, "webhook delivery failed; retrying");
                    self.record(delivery_entry(&d, now, "retrying", Some(e)));
                }
            }
        }
        self.changed();
    }
}

static DEFAULT_STATE: RuleState = RuleState {
    state: State::Ok,
    since: None,
    next_bucket: None,
    true_run: 0,
    false_run: 0,
    episode_start: None,
    notified: false,
    window: VecDeque::new(),
    ewma: None,
    last_value: None,
    last_bucket: None,
    seen: false,
    start: None,
};

fn delivery_entry(d: &Delivery, now: Millis, to: &str, detail: Option<String>) -> HistoryEntry {
    HistoryEntry {
        at: now,
        rule_id: d.rule_id.clone(),
        rule: d.rule.clone(),
        tenant: d.tenant.clone(),
        kind: "delivery".into(),
        from: Some(d.status.clone()),
        to: to.into(),
        value: None,
        bucket_start: None,
        bucket_end: None,
        dedupe_key: Some(d.dedupe_key.clone()),
        target: Some(d.url.clone()),
        attempt: Some(d.attempts + u32::from(to == "delivered")),
        detail,
    }
}

#[derive(Serialize)]
struct PersistedRef<'a> {
    rules: Vec<&'a Rule>,
    states: &'a HashMap<String, RuleState>,
    history: &'a VecDeque<HistoryEntry>,
    outbox: &'a VecDeque<Delivery>,
    next_id: u64,
}

/// Every bucket of `[from, to)` with its value, None where it has no events.
fn dense(
    rule: &Rule,
    from: Millis,
    to: Millis,
    values: ValuesFn<'_>,
) -> Vec<(Millis, Option<f64>)> {
    let g = rule.step();
    if to <= from {
        return Vec::new();
    }
    let got: BTreeMap<Millis, f64> = values.values(rule, from, to).into_iter().collect();
    (0..(to - from) / g)
        .map(|i| {
            let b = from + i * g;
            (b, got.get(&b).copied())
        })
        .collect()
}

/// The value a rule sees for a bucket: an empty bucket is 0 for counting
/// metrics (count, distinct, sum) and has no value for the others; an
/// anomaly detector sees no zeros before the series' first value.
fn fill(rule: &Rule, st: &mut RuleState, v: Option<f64>) -> Option<f64> {
    if v.is_some() {
        st.seen = true;
        return v;
    }
    let threshold = matches!(rule.detector, Detector::Threshold { .. });
    (rule.zero_when_empty() && (threshold || st.seen)).then_some(0.0)
}

/// Adds a value to an anomaly detector's history without judging it.
fn learn(d: &Detector, st: &mut RuleState, x: f64) {
    match d {
        Detector::Threshold { .. } => {}
        Detector::Zscore { window, .. } => {
            st.window.push_back(x);
            while st.window.len() > *window as usize {
                st.window.pop_front();
            }
        }
        Detector::Ewma { alpha, .. } => st
            .ewma
            .get_or_insert(Ewma {
                n: 0,
                mean: 0.0,
                var: 0.0,
            })
            .update(*alpha, x),
    }
}

/// Whether the condition holds for a bucket's value; anomaly detectors then
/// learn the value.
fn judge(d: &Detector, st: &mut RuleState, v: Option<f64>) -> bool {
    let Some(x) = v else { return false };
    let cond = match d {
        Detector::Threshold { op, value } => op.holds(x, *value),
        Detector::Zscore {
            window,
            z,
            direction,
        } => {
            st.window.len() >= *window as usize && {
                let (mean, sd) = mean_sd(&st.window);
                deviates(*direction, x - mean, sd, *z)
            }
        }
        Detector::Ewma {
            k,
            window,
            direction,
            ..
        } => match st.ewma {
            Some(e) if e.n >= *window => {
                deviates(*direction, x - e.mean, e.var.max(0.0).sqrt(), *k)
            }
            _ => false,
        },
    };
    learn(d, st, x);
    cond
}

/// Mean and sample standard deviation.
pub fn mean_sd(xs: &VecDeque<f64>) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A deviation `d` from the expected value is anomalous when it is more than
/// `limit` deviations `sd` away; with a flat history (sd ≈ 0) any change is.
fn deviates(dir: crate::rule::Direction, d: f64, sd: f64, limit: f64) -> bool {
    let score = if sd <= 1e-9 * d.abs().max(1.0) {
        if d.abs() <= 1e-9 { 0.0 } else { f64::INFINITY }
    } else {
        d.abs() / sd
    };
    dir.anomalous(d, score, limit)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}
