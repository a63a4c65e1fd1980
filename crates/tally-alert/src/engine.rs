//! The alert engine: rules, their states, the history of changes and the
//! outbox of webhook deliveries, persisted as a snapshot (`alerts.json`)
//! and a journal of changes beside it (`alerts.journal`).
//!
//! Each [`Engine::persist`] appends one CRC-framed JSON record holding only
//! what changed since the last one (rules and states put or removed by id,
//! history entries appended, deliveries put or removed by id), fsynced: a
//! change costs its own size, not the whole state's. When the journal grows
//! past the snapshot (and 256 KiB) the whole state is written as a new
//! snapshot (temp file, fsync, rename) and a new journal started. Both
//! carry a generation: a journal replays only over the snapshot of its
//! generation, so a crash between the two renames never applies a change
//! twice. A torn journal tail (a crash mid-append) is cut on open.
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

mod replica;
pub use replica::Change;

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
    /// A rule with `group_by`: the state of each label combination seen,
    /// keyed by its labels as a JSON object text. The rule's own `state`
    /// is then the most urgent of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub series: BTreeMap<String, RuleState>,
    /// The last buckets judged, oldest first (at most [`JUDGED_KEEP`]):
    /// what a correction of one of them is judged again against. Kept in
    /// memory only.
    #[serde(skip)]
    pub judged: VecDeque<Judged>,
    /// The state machine before the oldest of `judged`: replaying
    /// `judged` from it gives the moves the rule made (or, after a
    /// correction, would have made).
    #[serde(skip)]
    judged_from: Machine,
}

/// How many judged buckets of a series are kept for corrections.
pub const JUDGED_KEEP: usize = 64;

/// The state machine's counters: state, true run, false run.
type Machine = (State, u32, u32);

/// A move of the state machine that the history records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    Pending,
    Ok,
    Firing,
    Resolved,
}

/// One judged bucket: its value and what the detector compared it with;
/// the condition follows from them.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub bucket: Millis,
    /// The value the rule saw (an empty counting bucket is 0).
    pub value: Option<f64>,
    /// What an anomaly detector compared the value with (mean, standard
    /// deviation); `None` for a threshold or a detector still learning.
    basis: Option<(f64, f64)>,
}

impl Judged {
    fn cond(&self, d: &Detector) -> bool {
        self.value.is_some_and(|x| holds(d, self.basis, x))
    }
}

/// The episode moves (fired or resolved, silences aside) each bucket of a
/// judged run makes, replayed from the machine `from` before its first.
fn episode_moves(rule: &Rule, mut from: Machine, judged: &VecDeque<Judged>) -> Vec<Option<Move>> {
    judged
        .iter()
        .map(|j| {
            let (next, made) = machine(rule, from, j.cond(&rule.detector));
            from = next;
            made.filter(|m| matches!(m, Move::Firing | Move::Resolved))
        })
        .collect()
}

/// The state machine over one bucket's condition: the counters after it,
/// and the move it made.
fn machine(rule: &Rule, (state, tr, fr): Machine, cond: bool) -> (Machine, Option<Move>) {
    match (state, cond) {
        (State::Ok | State::Pending, true) => {
            let tr = tr + 1;
            if tr >= rule.fire_after() {
                ((State::Firing, tr, 0), Some(Move::Firing))
            } else if state == State::Ok {
                ((State::Pending, tr, 0), Some(Move::Pending))
            } else {
                ((state, tr, 0), None)
            }
        }
        (State::Pending, false) => ((State::Ok, 0, fr), Some(Move::Ok)),
        (State::Ok, false) => ((State::Ok, 0, fr), None),
        (State::Firing, true) => ((State::Firing, tr, 0), None),
        (State::Firing, false) => {
            let fr = fr + 1;
            if fr >= rule.resolve_after() {
                ((State::Ok, 0, 0), Some(Move::Resolved))
            } else {
                ((State::Firing, tr, fr), None)
            }
        }
    }
}

/// The labels of one series of a grouped rule, in `group_by` order.
pub type Labels = Vec<(String, Option<String>)>;

/// Most label combinations one grouped rule follows; past it new ones are
/// not judged (and a warning is logged).
pub const MAX_SERIES: usize = 1000;

/// Labels as the JSON object webhooks and the API show.
pub fn labels_json(labels: &[(String, Option<String>)]) -> Json {
    Json::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().map_or(Json::Null, Json::String)))
            .collect(),
    )
}

fn labels_of(key: &str, group_by: &[String]) -> Labels {
    let v: Json = serde_json::from_str(key).unwrap_or(Json::Null);
    group_by
        .iter()
        .map(|g| (g.clone(), v.get(g).and_then(Json::as_str).map(String::from)))
        .collect()
}

/// One line of `GET /api/v1/alerts/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: Millis,
    pub rule_id: String,
    pub rule: String,
    pub tenant: String,
    /// `state` (a transition), `delivery` (a webhook outcome) or
    /// `correction` (a judged bucket changed: what it would have changed).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// ok, pending, firing or resolved (state); delivered, retrying, failed, dropped (delivery);
    /// would_fire, would_not_fire, would_resolve, would_not_resolve (correction).
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
    /// The series of a grouped rule the entry is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Json>,
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
        if self.kind == "state" || self.kind == "correction" {
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
        if let Some(l) = &self.labels {
            o.insert("labels".into(), l.clone());
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
    /// Whether `[smtp]` is configured (e-mail targets are refused otherwise).
    pub email: bool,
}

/// How an e-mail delivery's address is kept where a webhook keeps its URL.
pub const MAILTO: &str = "mailto:";

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
            email: false,
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
    #[error("alert record {key:?} is not valid: {source}")]
    Record {
        key: String,
        source: serde_json::Error,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    rules: Vec<Rule>,
    states: HashMap<String, RuleState>,
    history: VecDeque<HistoryEntry>,
    outbox: VecDeque<Delivery>,
    next_id: u64,
    /// The generation of the journal that continues this snapshot.
    #[serde(default)]
    journal_gen: u64,
}

/// The first record of a journal: which snapshot it continues.
#[derive(Serialize, Deserialize)]
struct JournalHead {
    generation: u64,
}

/// One journal record: what changed since the previous one.
#[derive(Serialize, Deserialize, Default)]
struct JournalRecord {
    next_id: u64,
    /// Put (`Some`) or removed (`None`), by rule id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rules: BTreeMap<String, Option<Rule>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    states: BTreeMap<String, Option<RuleState>>,
    /// Appended to the history (which then keeps its newest entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    history: Vec<HistoryEntry>,
    /// Deliveries put (new ones go last: ids only grow), by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbox_put: Vec<Delivery>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outbox_del: Vec<u64>,
}

/// What changed since the last [`Engine::persist`].
#[derive(Debug, Default)]
struct Pending {
    rules: std::collections::BTreeSet<String>,
    states: std::collections::BTreeSet<String>,
    /// Entries appended to the history (at most its length are kept).
    history: usize,
    outbox_put: std::collections::BTreeSet<u64>,
    outbox_del: Vec<u64>,
}

/// The journal grows to at least this before it is folded into a snapshot.
const MIN_JOURNAL_BYTES: u64 = 256 << 10;

/// Where the journal of the snapshot at `path` lives.
fn journal_path(path: &Path) -> PathBuf {
    path.with_extension("journal")
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
    /// The same per label combination, for a rule with `group_by`.
    fn series(&self, rule: &Rule, from: Millis, to: Millis) -> Vec<(Labels, Vec<(Millis, f64)>)> {
        vec![(Vec::new(), self.values(rule, from, to))]
    }
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
    pending: Pending,
    /// The open journal (appends), its generation and length, and the
    /// snapshot's length.
    journal: Option<std::fs::File>,
    journal_gen: u64,
    journal_len: u64,
    snapshot_len: u64,
    /// How many history entries were ever appended (the newest one's
    /// sequence number when replicated).
    history_seq: u64,
    /// Set when the engine is one copy of a cluster's (Kafka mode).
    replica: Option<replica::Replica>,
    /// Grows with every visible change (the live feed polls it).
    pub version: u64,
    pub stats: Stats,
}

impl Engine {
    /// Opens the engine persisted at `path` (None: in memory only).
    pub fn open(path: Option<PathBuf>, cfg: EngineConfig) -> Result<Engine, AlertError> {
        let mut p = Persisted::default();
        let mut snapshot_len = 0;
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => {
                    snapshot_len = bytes.len() as u64;
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
        let journal_gen = p.journal_gen;
        let mut e = Engine {
            cfg,
            path,
            rules: p.rules.into_iter().map(|r| (r.id.clone(), r)).collect(),
            states: p.states,
            history: p.history,
            outbox: p.outbox,
            next_id: p.next_id,
            dirty: false,
            pending: Pending::default(),
            journal: None,
            journal_gen,
            journal_len: 0,
            snapshot_len,
            history_seq: 0,
            replica: None,
            version: 1,
            stats: Stats::default(),
        };
        e.replay_journal()?;
        // Nothing is in flight after a restart.
        for d in e.outbox.iter_mut() {
            d.in_flight = false;
        }
        Ok(e)
    }

    /// Applies the journal of the snapshot's generation (a journal of
    /// another generation is a leftover of an interrupted fold: the
    /// snapshot holds its changes already) and cuts a torn tail.
    fn replay_journal(&mut self) -> Result<(), AlertError> {
        let Some(path) = self.path.as_ref().map(|p| journal_path(p)) else {
            return Ok(());
        };
        let io = |source| AlertError::Io {
            path: path.clone(),
            source,
        };
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let (frames, valid) = tally_types::bin::unframe(&data);
        let corrupt = |source| AlertError::Corrupt {
            path: path.clone(),
            source,
        };
        let mut frames = frames.into_iter();
        let head: Option<JournalHead> = match frames.next() {
            Some(f) => Some(serde_json::from_slice(f).map_err(corrupt)?),
            None => None,
        };
        if head.is_none_or(|h| h.generation != self.journal_gen) {
            return Ok(());
        }
        for f in frames {
            let r: JournalRecord = serde_json::from_slice(f).map_err(corrupt)?;
            self.apply(r);
        }
        if valid < data.len() {
            tracing::warn!(journal = %path.display(), valid, len = data.len(), "cutting a torn alert journal tail");
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io)?;
        f.set_len(valid as u64).map_err(io)?;
        drop(f);
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io)?;
        self.journal = Some(f);
        self.journal_len = valid as u64;
        Ok(())
    }

    fn apply(&mut self, r: JournalRecord) {
        self.next_id = self.next_id.max(r.next_id);
        for (id, rule) in r.rules {
            match rule {
                Some(rule) => self.rules.insert(id, rule),
                None => self.rules.remove(&id),
            };
        }
        for (id, st) in r.states {
            match st {
                Some(st) => self.states.insert(id, st),
                None => self.states.remove(&id),
            };
        }
        for h in r.history {
            self.push_history(h);
        }
        for d in r.outbox_put {
            match self.outbox.iter_mut().find(|x| x.id == d.id) {
                Some(x) => *x = d,
                None => self.outbox.push_back(d),
            }
        }
        for id in r.outbox_del {
            self.outbox.retain(|d| d.id != id);
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Makes every change so far durable: one journal record with what
    /// changed (fsynced), or, once the journal has grown past the
    /// snapshot, a new snapshot of everything and a new journal.
    pub fn persist(&mut self) -> Result<(), AlertError> {
        if !self.dirty {
            return Ok(());
        }
        if self.replica.is_some() {
            self.collect_changes();
            self.dirty = false;
            self.pending = Pending::default();
            return Ok(());
        }
        let Some(path) = self.path.clone() else {
            self.dirty = false;
            self.pending = Pending::default();
            return Ok(());
        };
        let r = if self.journal_len >= self.snapshot_len.max(MIN_JOURNAL_BYTES) {
            self.fold(&path)
        } else {
            self.append_journal(&path)
        };
        match r {
            Ok(()) => {
                self.dirty = false;
                self.pending = Pending::default();
                Ok(())
            }
            Err(e) => {
                self.stats.persist_errors += 1;
                // The next call writes a snapshot, which holds everything
                // whatever the journal got.
                self.journal_len = u64::MAX;
                Err(e)
            }
        }
    }

    /// Appends the pending changes as one record.
    fn append_journal(&mut self, path: &Path) -> Result<(), AlertError> {
        let jpath = journal_path(path);
        let io = |source| AlertError::Io {
            path: jpath.clone(),
            source,
        };
        let p = &self.pending;
        let record = JournalRecord {
            next_id: self.next_id,
            rules: p
                .rules
                .iter()
                .map(|id| (id.clone(), self.rules.get(id).cloned()))
                .collect(),
            states: p
                .states
                .iter()
                .map(|id| (id.clone(), self.states.get(id).cloned()))
                .collect(),
            history: self
                .history
                .iter()
                .skip(self.history.len().saturating_sub(p.history))
                .cloned()
                .collect(),
            outbox_put: self
                .outbox
                .iter()
                .filter(|d| p.outbox_put.contains(&d.id))
                .cloned()
                .collect(),
            outbox_del: p.outbox_del.clone(),
        };
        let body = serde_json::to_vec(&record).map_err(|e| io(std::io::Error::other(e)))?;
        let mut buf = Vec::new();
        tally_types::bin::frame(&mut buf, &body);
        if self.journal.is_none() {
            self.start_journal(&jpath)?;
        }
        let f = self.journal.as_mut().expect("started above");
        use std::io::Write;
        f.write_all(&buf).map_err(io)?;
        f.sync_data().map_err(io)?;
        self.journal_len += buf.len() as u64;
        Ok(())
    }

    /// A new journal of the current generation at `jpath`: its head is
    /// written in a temp file renamed in place, so a journal is never
    /// without its generation; then it is open for appends.
    fn start_journal(&mut self, jpath: &Path) -> Result<(), AlertError> {
        let io = |source| AlertError::Io {
            path: jpath.to_path_buf(),
            source,
        };
        let head = serde_json::to_vec(&JournalHead {
            generation: self.journal_gen,
        })
        .map_err(|e| io(std::io::Error::other(e)))?;
        let mut first = Vec::new();
        tally_types::bin::frame(&mut first, &head);
        write_atomic(jpath, &first).map_err(io)?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(jpath)
            .map_err(io)?;
        self.journal = Some(f);
        self.journal_len = first.len() as u64;
        Ok(())
    }

    /// Writes everything as a new snapshot (the next generation) and
    /// starts its journal.
    fn fold(&mut self, path: &Path) -> Result<(), AlertError> {
        let next_gen = self.journal_gen + 1;
        let p = PersistedRef {
            rules: self.rules.values().collect(),
            states: &self.states,
            history: &self.history,
            outbox: &self.outbox,
            next_id: self.next_id,
            journal_gen: next_gen,
        };
        let io = |source| AlertError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = serde_json::to_vec(&p).map_err(|e| io(std::io::Error::other(e)))?;
        write_atomic(path, &bytes).map_err(io)?;
        self.snapshot_len = bytes.len() as u64;
        self.journal_gen = next_gen;
        self.journal = None;
        self.journal_len = 0;
        // The new generation's (empty) journal; a crash before this leaves
        // the old one, which the new snapshot's generation ignores.
        self.start_journal(&journal_path(path))
    }

    /// Writes everything as a new snapshot now, whatever the journal's size.
    pub fn fold_now(&mut self) -> Result<(), AlertError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        self.fold(&path)?;
        self.dirty = false;
        self.pending = Pending::default();
        Ok(())
    }

    /// Everything persisted, as one JSON value (tests compare engines).
    #[cfg(test)]
    pub(crate) fn state_json(&self) -> Json {
        let states: BTreeMap<&String, &RuleState> = self.states.iter().collect();
        let outbox: Vec<Delivery> = self
            .outbox
            .iter()
            .map(|d| Delivery {
                in_flight: false,
                closed: None,
                ..d.clone()
            })
            .collect();
        json!({
            "rules": self.rules.values().collect::<Vec<_>>(),
            "states": states,
            "history": self.history,
            "outbox": outbox,
            "next_id": self.next_id,
        })
    }

    /// The sizes of the snapshot and the journal (for tests and metrics).
    pub fn persisted_bytes(&self) -> (u64, u64) {
        (self.snapshot_len, self.journal_len)
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
        // A node metric's buckets are wall-clock time: judged from now on.
        let node = body
            .get("metric")
            .and_then(Json::as_str)
            .is_some_and(crate::rule::is_node_metric);
        let fresh = RuleState {
            start: if node { Some(now) } else { closed_through },
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
            if t.email.is_some() {
                if !self.cfg.email {
                    return Err(crate::rule::RuleError {
                        field: format!("notify[{i}].email"),
                        message: "this server sends no e-mail: configure [smtp] (host, from) first"
                            .into(),
                    }
                    .into());
                }
                continue;
            }
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
        self.pending.rules.insert(id.clone());
        self.pending.states.insert(id.clone());
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
        self.pending.rules.insert(id.to_string());
        self.pending.states.insert(id.to_string());
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
                self.pending.rules.insert(r.id.clone());
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

    /// Series firing: one per ungrouped rule, one per label combination
    /// of a grouped rule.
    pub fn firing(&self) -> usize {
        self.states
            .values()
            .map(|s| {
                if s.series.is_empty() {
                    usize::from(s.state == State::Firing)
                } else {
                    s.series
                        .values()
                        .filter(|x| x.state == State::Firing)
                        .count()
                }
            })
            .sum()
    }

    fn record(&mut self, h: HistoryEntry) {
        self.push_history(h);
        self.pending.history += 1;
    }

    fn push_history(&mut self, h: HistoryEntry) {
        self.history_seq += 1;
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
        if !self.evaluates() {
            return 0;
        }
        let ids: Vec<(String, Millis)> = self
            .rules
            .iter()
            .filter_map(|(id, r)| {
                // Node metrics live in wall-clock time: a bucket is closed
                // once the clock has passed it.
                let through = if r.node_metric() {
                    now
                } else {
                    closed_through(&r.tenant)?
                };
                Some((id.clone(), through))
            })
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
        let grouped = !rule.group_by.is_empty();
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
                    None if rule.node_metric() => through,
                    None => values
                        .first_minute(&rule.tenant)
                        .map_or(through, |f| align_down(f, g)),
                };
                let warm = rule.detector.warmup() as i64;
                if warm > 0 {
                    let from = start - warm * g;
                    if grouped {
                        for (labels, points) in dense_series(&rule, from, start, values) {
                            let key = labels_json(&labels).to_string();
                            if st.series.len() >= MAX_SERIES && !st.series.contains_key(&key) {
                                continue;
                            }
                            let sst = st.series.entry(key).or_default();
                            for (_, v) in points {
                                if let Some(x) = fill(&rule, sst, v) {
                                    learn(&rule.detector, sst, x);
                                }
                            }
                        }
                    } else {
                        for (_, v) in dense(&rule, from, start, values) {
                            if let Some(x) = fill(&rule, &mut st, v) {
                                learn(&rule.detector, &mut st, x);
                            }
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
            if grouped {
                queued += self.advance_series(&rule, &mut st, next, through, now, closed, values);
            } else {
                for (b, v) in dense(&rule, next, through, values) {
                    self.stats.evaluations += 1;
                    let v = fill(&rule, &mut st, v);
                    queued += self.step(&rule, &[], &mut st, b, v, now, closed);
                }
            }
            st.next_bucket = Some(through);
            self.dirty = true;
        }
        // A silence that ended while an episode is firing: send its firing now.
        if grouped {
            let keys: Vec<String> = st.series.keys().cloned().collect();
            for key in keys {
                let labels = labels_of(&key, &rule.group_by);
                if let Some(sst) = st.series.get_mut(&key)
                    && sst.state == State::Firing
                    && !sst.notified
                    && !rule.silenced(now)
                {
                    let b = sst.last_bucket.unwrap_or(through - g);
                    let v = sst.last_value;
                    let sst = sst.clone();
                    queued += self.notify(&rule, &labels, &sst, "firing", v, b, now, closed);
                    if let Some(x) = st.series.get_mut(&key) {
                        x.notified = true;
                    }
                }
            }
            summarize(&mut st);
        } else if st.state == State::Firing && !st.notified && !rule.silenced(now) {
            let b = st.last_bucket.unwrap_or(through - g);
            let v = st.last_value;
            queued += self.notify(&rule, &[], &st, "firing", v, b, now, closed);
            st.notified = true;
        }
        self.pending.states.insert(id.to_string());
        self.states.insert(id.to_string(), st);
        queued
    }

    /// The buckets `[next, through)` of a grouped rule: each label
    /// combination with data, or with a state already, through its own
    /// state machine. Combinations back at rest with no data in the range
    /// are forgotten (they start afresh when data returns).
    #[allow(clippy::too_many_arguments)]
    fn advance_series(
        &mut self,
        rule: &Rule,
        st: &mut RuleState,
        next: Millis,
        through: Millis,
        now: Millis,
        closed: Option<Instant>,
        values: ValuesFn<'_>,
    ) -> usize {
        let g = rule.step();
        let mut got: BTreeMap<String, (Labels, BTreeMap<Millis, f64>)> = BTreeMap::new();
        for (labels, points) in values.series(rule, next, through) {
            if points.is_empty() {
                continue;
            }
            let key = labels_json(&labels).to_string();
            got.insert(key, (labels, points.into_iter().collect()));
        }
        let mut keys: Vec<String> = st.series.keys().cloned().collect();
        for k in got.keys() {
            if !st.series.contains_key(k) {
                if keys.len() >= MAX_SERIES {
                    tracing::warn!(rule = %rule.name, series = %k, "alert rule follows {MAX_SERIES} label combinations already; not judging more");
                    continue;
                }
                keys.push(k.clone());
            }
        }
        let mut queued = 0;
        for key in keys {
            let (labels, points) = match got.remove(&key) {
                Some(x) => x,
                None => (labels_of(&key, &rule.group_by), BTreeMap::new()),
            };
            let mut sst = st.series.remove(&key).unwrap_or_default();
            let quiet = points.is_empty();
            let mut b = next;
            while b < through {
                self.stats.evaluations += 1;
                let v = fill(rule, &mut sst, points.get(&b).copied());
                queued += self.step(rule, &labels, &mut sst, b, v, now, closed);
                b += g;
            }
            let anomaly = !matches!(rule.detector, Detector::Threshold { .. });
            if !(quiet && sst.state == State::Ok && !anomaly) {
                st.series.insert(key, sst);
            }
        }
        queued
    }

    /// One closed bucket through the state machine.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        rule: &Rule,
        labels: &[(String, Option<String>)],
        st: &mut RuleState,
        b: Millis,
        v: Option<f64>,
        now: Millis,
        closed: Option<Instant>,
    ) -> usize {
        let basis = basis(&rule.detector, st);
        let cond = judge(&rule.detector, st, v);
        st.last_value = v;
        st.last_bucket = Some(b);
        let g = rule.step();
        let mut queued = 0;
        let before = st.state;
        let was = (st.state, st.true_run, st.false_run);
        let ((state, true_run, false_run), made) = machine(rule, was, cond);
        (st.state, st.true_run, st.false_run) = (state, true_run, false_run);
        match made {
            Some(Move::Firing) => {
                st.episode_start = Some(b - (st.true_run as i64 - 1) * g);
                st.notified = !rule.silenced(now);
                self.transition(rule, labels, before, "firing", v, b, now);
                if st.notified {
                    queued += self.notify(rule, labels, st, "firing", v, b, now, closed);
                }
            }
            Some(Move::Pending) => self.transition(rule, labels, before, "pending", v, b, now),
            Some(Move::Ok) => self.transition(rule, labels, before, "ok", v, b, now),
            Some(Move::Resolved) => {
                self.transition(rule, labels, before, "resolved", v, b, now);
                // An episode the receiver heard of is always closed for it,
                // even under a silence.
                if st.notified {
                    queued += self.notify(rule, labels, st, "resolved", v, b, now, closed);
                }
                st.episode_start = None;
                st.notified = false;
            }
            None => {}
        }
        if st.state != before {
            st.since = Some(now);
        }
        if st.judged.len() >= JUDGED_KEEP
            && let Some(oldest) = st.judged.pop_front()
        {
            st.judged_from = machine(rule, st.judged_from, oldest.cond(&rule.detector)).0;
        }
        if st.judged.is_empty() {
            st.judged_from = was;
        }
        st.judged.push_back(Judged {
            bucket: b,
            value: v,
            basis,
        });
        queued
    }

    /// Judges again the buckets that corrections changed after they were
    /// judged: `corrected` lists (tenant, minute) of closed buckets whose
    /// value changed (late events within the allowed lateness, a replay of
    /// late events, a backfill). For each rule of those tenants, every
    /// judged bucket whose value (or sliding window) covers such a minute
    /// is read again; where its condition flips, the rule's run since that
    /// bucket is replayed, and when the replay would have notified
    /// differently (an episode fired or resolved, or not), a `correction`
    /// entry in the history says so. Notifications are not sent or
    /// withdrawn after the fact, and the live state goes on as it was.
    /// Returns the number of history entries written.
    pub fn rejudge(
        &mut self,
        corrected: &[(String, Millis)],
        now: Millis,
        values: ValuesFn<'_>,
    ) -> usize {
        if !self.evaluates() || corrected.is_empty() {
            return 0;
        }
        let ids: Vec<String> = self
            .rules
            .iter()
            .filter(|(_, r)| !r.node_metric() && corrected.iter().any(|(t, _)| *t == r.tenant))
            .map(|(id, _)| id.clone())
            .collect();
        let mut written = 0;
        for id in ids {
            let (Some(rule), Some(mut st)) =
                (self.rules.get(&id).cloned(), self.states.remove(&id))
            else {
                continue;
            };
            let g = rule.step();
            let reach = rule.window_ms.unwrap_or(g).max(g) - g;
            let judged_to = st.next_bucket.unwrap_or(Millis::MIN);
            let mut buckets: Vec<Millis> = Vec::new();
            for (t, m) in corrected {
                if *t != rule.tenant {
                    continue;
                }
                let last = align_down(*m, g);
                let mut b = align_down(last - reach, g);
                while b <= last {
                    if b < judged_to {
                        buckets.push(b);
                    }
                    b += g;
                }
            }
            buckets.sort_unstable();
            buckets.dedup();
            if let (Some(&from), Some(&last)) = (buckets.first(), buckets.last()) {
                let to = last + g;
                if rule.group_by.is_empty() {
                    let points: BTreeMap<Millis, Option<f64>> =
                        dense(&rule, from, to, values).into_iter().collect();
                    written += self.rejudge_series(&rule, &[], &mut st, &buckets, &points, now);
                } else {
                    let mut got: BTreeMap<String, BTreeMap<Millis, Option<f64>>> =
                        dense_series(&rule, from, to, values)
                            .into_iter()
                            .map(|(l, p)| (labels_json(&l).to_string(), p.into_iter().collect()))
                            .collect();
                    let keys: Vec<String> = st.series.keys().cloned().collect();
                    for key in keys {
                        let labels = labels_of(&key, &rule.group_by);
                        let points = got.remove(&key).unwrap_or_default();
                        if let Some(sst) = st.series.get_mut(&key) {
                            let mut sst = std::mem::take(sst);
                            written += self
                                .rejudge_series(&rule, &labels, &mut sst, &buckets, &points, now);
                            st.series.insert(key, sst);
                        }
                    }
                }
            }
            self.states.insert(id, st);
        }
        written
    }

    /// [`Engine::rejudge`] for one series: `points` holds the buckets'
    /// values now (`None`: no events).
    fn rejudge_series(
        &mut self,
        rule: &Rule,
        labels: &[(String, Option<String>)],
        st: &mut RuleState,
        buckets: &[Millis],
        points: &BTreeMap<Millis, Option<f64>>,
        now: Millis,
    ) -> usize {
        let threshold = matches!(rule.detector, Detector::Threshold { .. });
        let moved = episode_moves(rule, st.judged_from, &st.judged);
        let mut changed: Vec<(Millis, Option<f64>, Option<f64>)> = Vec::new();
        for j in st.judged.iter_mut() {
            if buckets.binary_search(&j.bucket).is_err() {
                continue;
            }
            let raw = points.get(&j.bucket).copied().flatten();
            let v = raw.or_else(|| {
                (rule.zero_when_empty() && (threshold || j.value.is_some() || st.seen))
                    .then_some(0.0)
            });
            if v != j.value {
                changed.push((j.bucket, j.value, v));
                j.value = v;
            }
        }
        if changed.is_empty() {
            return 0;
        }
        // The run replayed with the values as they are now: the first
        // bucket whose episode move differs.
        let would_move = episode_moves(rule, st.judged_from, &st.judged);
        let Some(k) = (0..moved.len()).find(|&k| moved[k] != would_move[k]) else {
            return 0;
        };
        let (was, would) = (moved[k], would_move[k]);
        let (at, value) = (st.judged[k].bucket, st.judged[k].value);
        let to = match (was, would) {
            (_, Some(Move::Firing)) => "would_fire",
            (_, Some(Move::Resolved)) => "would_resolve",
            (Some(Move::Firing), _) => "would_not_fire",
            _ => "would_not_resolve",
        };
        let g = rule.step();
        let fmt = |v: Option<f64>| v.map_or_else(|| "no value".to_string(), |x| format!("{x}"));
        let values: Vec<String> = changed
            .iter()
            .map(|(b, old, new)| {
                format!("{} from {} to {}", format_rfc3339(*b), fmt(*old), fmt(*new))
            })
            .collect();
        let what = match to {
            "would_fire" => "would have fired",
            "would_resolve" => "would have resolved",
            "would_not_fire" => "would not have fired",
            _ => "would not have resolved",
        };
        let detail = format!(
            "corrected after it was judged (late or replayed events): bucket {}; judged again, the rule {what} at the bucket starting {}. Notifications already sent stand and none is sent for the past; the live state goes on unchanged",
            values.join(", bucket "),
            format_rfc3339(at),
        );
        tracing::info!(rule = %rule.name, tenant = %rule.tenant, labels = ?labels, to, bucket = %format_rfc3339(at), "alert bucket corrected");
        self.changed();
        self.record(HistoryEntry {
            at: now,
            rule_id: rule.id.clone(),
            rule: rule.name.clone(),
            tenant: rule.tenant.clone(),
            kind: "correction".into(),
            from: None,
            to: to.into(),
            value,
            bucket_start: Some(at),
            bucket_end: Some(at + g),
            dedupe_key: None,
            target: None,
            attempt: None,
            detail: Some(detail),
            labels: (!labels.is_empty()).then(|| labels_json(labels)),
        });
        1
    }

    #[allow(clippy::too_many_arguments)]
    fn transition(
        &mut self,
        rule: &Rule,
        labels: &[(String, Option<String>)],
        from: State,
        to: &str,
        v: Option<f64>,
        b: Millis,
        now: Millis,
    ) {
        self.changed();
        tracing::info!(rule = %rule.name, tenant = %rule.tenant, labels = ?labels, from = from.as_str(), to, value = ?v, bucket = %format_rfc3339(b), "alert state");
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
            labels: (!labels.is_empty()).then(|| labels_json(labels)),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn notify(
        &mut self,
        rule: &Rule,
        labels: &[(String, Option<String>)],
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
            dedupe_key: if labels.is_empty() {
                format!("{}:{}:{}", rule.id, episode, status)
            } else {
                format!("{}:{}:{}:{}", rule.id, labels_json(labels), episode, status)
            },
            labels: labels_json(labels),
        };
        self.stats.notifications += 1;
        for t in &rule.notify {
            if self.outbox.len() >= self.cfg.max_queue.max(1)
                && let Some(old) = self.outbox.pop_front()
            {
                self.pending.outbox_del.push(old.id);
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
            self.pending.outbox_put.insert(self.next_id);
            let (url, body) = match &t.email {
                // Subject on the first line, then the details.
                Some(e) => (
                    format!("{MAILTO}{e}"),
                    format!(
                        "{}\n\n{}",
                        crate::deliver::summary(rule, &note),
                        serde_json::to_string_pretty(&payload(rule, t, &note)).unwrap_or_default()
                    ),
                ),
                None => (t.webhook.clone(), payload(rule, t, &note).to_string()),
            };
            self.outbox.push_back(Delivery {
                id: self.next_id,
                rule_id: rule.id.clone(),
                rule: rule.name.clone(),
                tenant: rule.tenant.clone(),
                url,
                body,
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
        if !self.evaluates() {
            return Vec::new();
        }
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
                self.pending.outbox_del.push(id);
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
                    self.pending.outbox_del.push(id);
                    let d = self.outbox.remove(i).expect("position found");
                    self.stats.gave_up += 1;
                    tracing::error!(rule = %d.rule, url = %d.url, attempts = d.attempts, error = %e, "webhook delivery given up");
                    self.record(delivery_entry(&d, now, "failed", Some(e)));
                } else {
                    let backoff = (self.cfg.backoff_ms.max(1) << (d.attempts - 1).min(20))
                        .min(self.cfg.max_backoff_ms.max(1));
                    d.next_at = now + backoff;
                    let d = d.clone();
                    self.pending.outbox_put.insert(id);
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
    series: BTreeMap::new(),
    judged: VecDeque::new(),
    judged_from: (State::Ok, 0, 0),
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
        labels: None,
    }
}

#[derive(Serialize)]
struct PersistedRef<'a> {
    rules: Vec<&'a Rule>,
    states: &'a HashMap<String, RuleState>,
    history: &'a VecDeque<HistoryEntry>,
    outbox: &'a VecDeque<Delivery>,
    next_id: u64,
    journal_gen: u64,
}

/// A grouped rule's state: the most urgent of its series (firing, then
/// pending), with that series' value, bucket and episode.
fn summarize(st: &mut RuleState) {
    let rank = |s: State| match s {
        State::Firing => 2,
        State::Pending => 1,
        _ => 0,
    };
    let top = st
        .series
        .values()
        .max_by_key(|x| (rank(x.state), x.last_bucket))
        .cloned();
    let state = top.as_ref().map_or(State::Ok, |x| match x.state {
        State::Firing | State::Pending => x.state,
        _ => State::Ok,
    });
    if state != st.state {
        st.since = top.as_ref().and_then(|x| x.since);
    }
    st.state = state;
    if let Some(t) = top {
        st.last_value = t.last_value;
        st.last_bucket = t.last_bucket;
        st.episode_start = t.episode_start;
        st.notified = t.notified;
    }
}

/// Every bucket of a range with its value, None where it has no events.
type DenseSeries = Vec<(Millis, Option<f64>)>;

/// Every bucket of `[from, to)` per series of a grouped rule.
fn dense_series(
    rule: &Rule,
    from: Millis,
    to: Millis,
    values: ValuesFn<'_>,
) -> Vec<(Labels, DenseSeries)> {
    let g = rule.step();
    if to <= from {
        return Vec::new();
    }
    values
        .series(rule, from, to)
        .into_iter()
        .map(|(labels, points)| {
            let got: BTreeMap<Millis, f64> = points.into_iter().collect();
            let dense = (0..(to - from) / g)
                .map(|i| {
                    let b = from + i * g;
                    (b, got.get(&b).copied())
                })
                .collect();
            (labels, dense)
        })
        .collect()
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

/// What an anomaly detector compares the next value with: the mean and
/// standard deviation it has learnt, once it has learnt its window.
fn basis(d: &Detector, st: &RuleState) -> Option<(f64, f64)> {
    match d {
        Detector::Threshold { .. } => None,
        Detector::Zscore { window, .. } => {
            (st.window.len() >= *window as usize).then(|| mean_sd(&st.window))
        }
        Detector::Ewma { window, .. } => match st.ewma {
            Some(e) if e.n >= *window => Some((e.mean, e.var.max(0.0).sqrt())),
            _ => None,
        },
    }
}

/// Whether the condition holds for value `x`, given the detector's basis.
fn holds(d: &Detector, basis: Option<(f64, f64)>, x: f64) -> bool {
    match (d, basis) {
        (Detector::Threshold { op, value }, _) => op.holds(x, *value),
        (Detector::Zscore { z, direction, .. }, Some((mean, sd))) => {
            deviates(*direction, x - mean, sd, *z)
        }
        (Detector::Ewma { k, direction, .. }, Some((mean, sd))) => {
            deviates(*direction, x - mean, sd, *k)
        }
        _ => false,
    }
}

/// Whether the condition holds for a bucket's value; anomaly detectors then
/// learn the value.
fn judge(d: &Detector, st: &mut RuleState, v: Option<f64>) -> bool {
    let Some(x) = v else { return false };
    let cond = holds(d, basis(d, st), x);
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
