//! Configuration: one serde struct, read from built-in defaults, then a TOML
//! file, then `TALLY__SECTION__KEY=value` environment variables (plus the
//! `--listen`/`--data-dir` flags and `TALLY_LISTEN`/`TALLY_DATA_DIR`).
//! `tally.example.toml` at the repository root documents every key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tally_types::schema::Schemas;
use tally_types::time::{Millis, parse_duration_ms};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config: {key} = {value:?}: {fix}")]
    Invalid {
        key: &'static str,
        value: String,
        fix: &'static str,
    },
    #[error("config: auth.keys[{index}] {msg}")]
    Key { index: usize, msg: String },
    #[error("config: {0}")]
    Schema(String),
    #[error("config: {0}")]
    Dimensions(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Where the log, DLQ and state live.
    pub data_dir: PathBuf,
    pub ingest: IngestConfig,
    pub log: LogSection,
    pub stream: StreamSection,
    pub dlq: DlqSection,
    pub archive: ArchiveSection,
    pub query: QuerySection,
    pub alerts: AlertsSection,
    pub retention: RetentionSection,
    pub auth: AuthSection,
    pub quotas: QuotasSection,
    pub shedding: SheddingSection,
    pub http: HttpSection,
    /// The Postgres wire protocol for SQL tools; off unless `listen` is set.
    pub pgwire: PgwireSection,
    /// The SMTP relay of e-mail alert targets; off unless `host` is set.
    pub smtp: SmtpSection,
    /// The schema registry (the Confluent-compatible API under
    /// `/api/v1/registry`).
    pub registry: RegistrySection,
    pub tls: TlsSection,
    pub privacy: PrivacySection,
    /// Kafka mode (several nodes on one consumer group); off when absent.
    pub kafka: Option<KafkaSection>,
    /// Declared properties per tenant, e.g. `[schemas.acme]` then
    /// `duration_ms = "float"`, `page = "string"` (types: string, int,
    /// float, bool). Ingest rejects an event whose declared property has
    /// another type; undeclared properties are kept as sent; SQL shows each
    /// declared property as a typed column of `events`.
    pub schemas: Schemas,
    /// Properties the rollups are split by (breakdowns and filters of the
    /// metrics API and alerts).
    pub dimensions: DimensionsSection,
    /// Sessions: the inactivity gap that splits a user's events without a
    /// `session_id`, and the index built in the stream.
    pub sessions: SessionsSection,
}

/// `[sessions]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SessionsSection {
    /// Events of one user without a `session_id` further apart than this
    /// start a new session (the default of the API's `gap` parameter).
    pub gap: String,
    /// Build sessions as events are applied, so session answers come from
    /// memory (embedded mode; Kafka mode reads the raw events).
    pub index: bool,
    /// Sessions the index holds at most; past it the oldest are dropped and
    /// ranges that old are read from the raw events (about 250 bytes each).
    pub max_sessions: usize,
}

impl Default for SessionsSection {
    fn default() -> Self {
        SessionsSection {
            gap: "30m".into(),
            index: true,
            max_sessions: tally_store::DEFAULT_MAX_SESSIONS,
        }
    }
}

/// Declared dimensions: `default` for every tenant, `[dimensions.tenants]`
/// a list of its own per named tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DimensionsSection {
    /// Dimensions of every tenant without a list of its own (a list, or a
    /// comma-separated text from the environment).
    #[serde(deserialize_with = "names")]
    pub default: Vec<String>,
    /// Per-tenant lists: `acme = ["plan", "country"]`.
    pub tenants: std::collections::BTreeMap<String, Names>,
    /// Distinct values kept per dimension, tenant and minute; later new
    /// values are counted under `__other__`.
    pub max_values: usize,
    /// Longer values are counted under `__other__`.
    pub max_value_bytes: usize,
    /// Combinations of dimension values kept per tenant and minute (over
    /// its event types); events of later new combinations are counted
    /// under the one with every value `__other__`.
    pub max_combinations: usize,
    /// Event types kept per tenant and minute; events of later new types
    /// are counted under the event type `__other__` (the raw events keep
    /// theirs).
    pub max_event_types: usize,
}

/// A list of names: a TOML array, or one comma-separated text.
#[derive(Debug, Clone, Default)]
pub struct Names(pub Vec<String>);

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        names(d).map(Names)
    }
}

fn names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Text(t) => t
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect(),
    })
}

impl Default for DimensionsSection {
    fn default() -> Self {
        DimensionsSection {
            default: vec!["country".into(), "device".into(), "page".into()],
            tenants: Default::default(),
            max_values: 1000,
            max_value_bytes: 256,
            max_combinations: tally_store::dims::MAX_COMBINATIONS,
            max_event_types: tally_store::dims::MAX_EVENT_TYPES,
        }
    }
}

impl DimensionsSection {
    /// The checked declaration the rollup store takes.
    pub fn build(&self) -> Result<tally_store::Dimensions, ConfigError> {
        let tenants: Vec<(String, Vec<String>)> = self
            .tenants
            .iter()
            .map(|(t, n)| (t.clone(), n.0.clone()))
            .collect();
        tally_store::Dimensions::new(
            &self.default,
            &tenants,
            self.max_values,
            self.max_value_bytes,
        )
        .and_then(|d| d.with_max_combinations(self.max_combinations))
        .and_then(|d| d.with_max_event_types(self.max_event_types))
        .map_err(|e| ConfigError::Dimensions(e.0))
    }
}

/// API keys. With none configured the server runs in open mode (the
/// tenant is the event's `tenant` field or `?tenant=`); with any, every API
/// request needs `Authorization: Bearer <key>` and the key names the tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AuthSection {
    pub keys: Vec<KeySection>,
    /// `GET /metrics` (Prometheus) without a key even in keyed mode; when
    /// false it needs a key with the `admin` scope.
    pub public_metrics: bool,
    /// Browser origins allowed to call the API from their pages (CORS), e.g.
    /// `["https://shop.example"]`; `["*"]` any; empty (the default): none.
    /// Also the origins whose pages may open the live WebSocket, besides
    /// the server's own.
    pub cors_origins: Vec<String>,
    /// Serve open mode (no keys) on an address other than loopback. Off:
    /// such a server refuses to start, since anyone reaching it could read
    /// and change every tenant's data (`tally serve --insecure-open`).
    pub insecure_open: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            keys: Vec::new(),
            public_metrics: true,
            cors_origins: Vec::new(),
            insecure_open: false,
        }
    }
}

/// One API key: the key itself or its SHA-256 (hex), its tenant and scopes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct KeySection {
    /// The secret as clients send it.
    pub key: String,
    /// Or its SHA-256 in hex (`tally keys new` prints both), so the config
    /// file need not hold the secret.
    pub key_sha256: String,
    pub tenant: String,
    /// `ingest`, `read`, `admin` (admin allows everything).
    pub scopes: Vec<String>,
    /// Shown in logs instead of the key.
    pub name: String,
}

/// The Postgres wire protocol: `psql`, drivers and BI tools run the same
/// tenant-scoped SQL as `POST /api/v1/query` (with its limits).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PgwireSection {
    /// Address to listen on, e.g. "127.0.0.1:5433" ("" or absent: off).
    pub listen: Option<String>,
    /// Sessions open at once; past it a new one is refused (SQLSTATE 53300).
    pub max_connections: usize,
}

impl Default for PgwireSection {
    fn default() -> Self {
        PgwireSection {
            listen: None,
            max_connections: 64,
        }
    }
}

impl PgwireSection {
    /// The address to listen on, if the protocol is on.
    pub fn address(&self) -> Option<&str> {
        self.listen
            .as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
    }
}

/// The SMTP relay e-mail alert targets (`{"email": "ops@example.com"}`)
/// are sent through, with the webhooks' retries and dedupe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SmtpSection {
    /// The relay's host name ("" or absent: no e-mail).
    pub host: Option<String>,
    /// Its port: 587 (submission with STARTTLS) unless set.
    pub port: Option<u16>,
    /// The sender: `alerts@example.com` or `Tally <alerts@example.com>`.
    pub from: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Require STARTTLS before credentials or mail cross the wire.
    pub starttls: bool,
}

impl Default for SmtpSection {
    fn default() -> Self {
        SmtpSection {
            host: None,
            port: None,
            from: String::new(),
            username: None,
            password: None,
            starttls: true,
        }
    }
}

/// The schema registry: subjects and versions per tenant, kept in
/// `<data-dir>/registry`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RegistrySection {
    /// The compatibility rule of tenants and subjects that set none:
    /// BACKWARD (Confluent's default), BACKWARD_TRANSITIVE, FORWARD,
    /// FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE.
    pub compatibility: String,
    /// Subjects a tenant may hold.
    pub max_subjects: usize,
    /// Versions a subject may hold (soft-deleted ones count).
    pub max_versions: usize,
    /// The largest schema text taken.
    pub max_schema_bytes: usize,
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            compatibility: "BACKWARD".into(),
            max_subjects: 10_000,
            max_versions: 1_000,
            max_schema_bytes: 256 * 1024,
        }
    }
}

impl RegistrySection {
    /// The default rule, checked.
    pub fn level(&self) -> Result<tally_registry::Level, ConfigError> {
        tally_registry::Level::parse(&self.compatibility).map_err(|_| ConfigError::Invalid {
            key: "registry.compatibility",
            value: self.compatibility.clone(),
            fix: "one of BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE, NONE",
        })
    }

    pub fn limits(&self) -> tally_registry::Limits {
        tally_registry::Limits {
            subjects_per_tenant: self.max_subjects.max(1),
            versions_per_subject: self.max_versions.max(1),
            schema_bytes: self.max_schema_bytes.max(1024),
        }
    }
}

impl SmtpSection {
    /// The relay's settings, if e-mail is on.
    pub fn settings(&self) -> Option<tally_alert::SmtpSettings> {
        let host = self
            .host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty())?;
        Some(tally_alert::SmtpSettings {
            host: host.to_string(),
            port: self.port.unwrap_or(if self.starttls { 587 } else { 25 }),
            from: self.from.trim().to_string(),
            username: self.username.clone(),
            password: self.password.clone(),
            starttls: self.starttls,
        })
    }

    fn check(&self) -> Result<(), ConfigError> {
        let Some(s) = self.settings() else {
            return Ok(());
        };
        if s.from.is_empty() {
            return Err(ConfigError::Invalid {
                key: "smtp.from",
                value: String::new(),
                fix: "the sender of alert e-mail, e.g. from = \"alerts@example.com\"",
            });
        }
        if s.username.is_some() != s.password.is_some() {
            return Err(ConfigError::Invalid {
                key: "smtp.username",
                value: s.username.clone().unwrap_or_default(),
                fix: "give both smtp.username and smtp.password, or neither",
            });
        }
        s.mailer(std::time::Duration::from_secs(5))
            .map(|_| ())
            .map_err(|e| ConfigError::Invalid {
                key: "smtp",
                value: e,
                fix: "check smtp.host and smtp.from",
            })
    }
}

/// Limits of the HTTP listener against slow and greedy clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HttpSection {
    /// Connections open at once; past it new ones wait in the backlog.
    pub max_connections: usize,
    /// A request's headers must arrive within this (slowloris).
    pub header_timeout: String,
    /// A request's body must arrive within this (408 past it).
    pub body_timeout: String,
    /// A client that takes no byte of an answer for this long is
    /// disconnected (unread answers do not pin memory).
    pub write_timeout: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            max_connections: 1024,
            header_timeout: "10s".into(),
            body_timeout: "60s".into(),
            write_timeout: "30s".into(),
        }
    }
}

/// Load shedding: under overload (more than half of
/// `ingest.max-inflight-bytes` waiting for the disk, or the writer queue
/// half full) events of these types are refused first (`429` for those
/// events alone; the rest of the batch is taken).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SheddingSection {
    pub low_priority: Vec<String>,
}

/// HTTPS on the listener: with `cert` and `key` set (PEM files: the
/// certificate chain, leaf first, and its private key) the listener speaks
/// TLS only (HTTP/1.1 and HTTP/2 by ALPN).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TlsSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Kafka mode: `POST /api/v1/events` produces to `topic-events`, every
/// node started with the same `group-id` processes its share of that
/// topic's partitions, and every node reads `topic-aggregates` so that it
/// answers for all of them. `client` passes librdkafka settings through
/// (`"security.protocol" = "SASL_SSL"`; from the environment
/// `TALLY__KAFKA__CLIENT__SECURITY_PROTOCOL`, underscores read as dots).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct KafkaSection {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    pub group_id: String,
    pub topic_events: String,
    pub topic_aggregates: String,
    pub topic_late: String,
    /// The alert log: rules, their states and the outbox, shared by the
    /// nodes of the group (compacted, one partition). Default
    /// `<group-id>_alerts`.
    pub topic_alerts: String,
    /// Malformed events, listed by every node's malformed DLQ. Default
    /// `<group-id>_malformed`.
    pub topic_malformed: String,
    /// The schema registry's proposals, applied in order by every node
    /// (one partition, kept). Default `<group-id>_registry`.
    pub topic_registry: String,
    /// Partitions of the topics Tally creates when they are missing.
    pub partitions: u32,
    /// This node's name in the cluster (its transactional id is
    /// `<group-id>-<node-id>`: keep it stable across restarts of the same
    /// node, unique among nodes). Default: made on first start (host name
    /// and a random suffix) and kept in `<data-dir>/kafka-node-id`.
    pub node_id: String,
    /// How often each node commits a transaction of aggregates + offsets.
    pub commit_interval: String,
    /// How long an ingest request waits for the broker before 503.
    pub produce_timeout: String,
    /// Raw events of each owned partition are sealed into the archive at
    /// least this often (what SQL over `events` sees on every node).
    pub seal_interval: String,
    /// Archive files of a partition no transaction lists (left by a seal
    /// or merge a crash interrupted) are deleted by the partition's owner
    /// once unchanged this long; owners look every sixth of it.
    pub orphan_age: String,
    pub client: std::collections::BTreeMap<String, ClientValue>,
}

/// A librdkafka setting's value as written (`linger.ms = 5` or `"5"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClientValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for ClientValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientValue::Text(s) => f.write_str(s),
            ClientValue::Int(i) => write!(f, "{i}"),
            ClientValue::Float(x) => write!(f, "{x}"),
            ClientValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            brokers: String::new(),
            group_id: "tally".into(),
            topic_events: "user_events".into(),
            topic_aggregates: "aggregates".into(),
            topic_late: "late_events".into(),
            topic_alerts: String::new(),
            topic_malformed: String::new(),
            topic_registry: String::new(),
            partitions: 4,
            node_id: String::new(),
            commit_interval: "100ms".into(),
            produce_timeout: "10s".into(),
            seal_interval: "5s".into(),
            orphan_age: "1h".into(),
            client: Default::default(),
        }
    }
}

/// Personal data redacted at ingest, before anything is written:
/// `[privacy.<tenant>]` (or `[privacy."*"]` for every tenant) maps a field
/// (`user_id`, `session_id`, `"properties.<name>"`) to `"drop"`, `"hash"`
/// (keyed HMAC-SHA256, stable, so distinct counts still work) or `"mask"`.
/// `hash-key` is the HMAC key (also `TALLY__PRIVACY__HASH_KEY`); without
/// one, a random key is made once and kept in `<data-dir>/privacy-hash-key`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PrivacySection {
    #[serde(rename = "hash-key")]
    pub hash_key: String,
    #[serde(flatten)]
    pub tenants: std::collections::BTreeMap<String, toml::Value>,
}

/// One tenant's redaction rules: `(tenant, [(field, action)])`.
pub type TenantRules = (String, Vec<(String, String)>);

impl PrivacySection {
    /// The rules as `(tenant, [(field, action)])`, nested tables
    /// (`properties.email = "drop"` unquoted) read as dotted fields.
    pub fn rules(&self) -> Result<Vec<TenantRules>, ConfigError> {
        fn walk(
            tenant: &str,
            prefix: &str,
            t: &toml::Table,
            out: &mut Vec<(String, String)>,
        ) -> Result<(), ConfigError> {
            for (k, v) in t {
                let field = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::String(a) => out.push((field, a.clone())),
                    toml::Value::Table(inner) => walk(tenant, &field, inner, out)?,
                    other => {
                        return Err(ConfigError::Schema(format!(
                            "privacy.{tenant}: {field} = {other} is not an action; write \"drop\", \"hash\" or \"mask\""
                        )));
                    }
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        for (tenant, v) in &self.tenants {
            let Some(t) = v.as_table() else {
                return Err(ConfigError::Schema(format!(
                    "privacy.{tenant} must be a table of field = action, e.g. [privacy.{tenant}] user_id = \"hash\" (the only other key of [privacy] is hash-key)"
                )));
            };
            if tenant != "*" && !tally_types::valid_tenant(tenant) {
                return Err(ConfigError::Schema(format!(
                    "privacy.{tenant}: not a tenant name (1–64 characters of [A-Za-z0-9_.-]) nor \"*\""
                )));
            }
            let mut fields = Vec::new();
            walk(tenant, "", t, &mut fields)?;
            out.push((tenant.clone(), fields));
        }
        Ok(out)
    }

    /// The redaction rules with their key, or `None` when there are none.
    /// A missing key is made (32 random bytes) and kept in
    /// `<data_dir>/privacy-hash-key`, so hashes stay stable across restarts.
    pub fn build(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<Option<std::sync::Arc<tally_ingest::Privacy>>, ConfigError> {
        let rules = self.rules()?;
        if rules.is_empty() {
            return Ok(None);
        }
        let check = tally_ingest::Privacy::new(b"", rules.clone())
            .map_err(|e| ConfigError::Schema(e.to_string()))?;
        let key: Vec<u8> = if !self.hash_key.is_empty() {
            self.hash_key.as_bytes().to_vec()
        } else if check.hashes() {
            let path = data_dir.join("privacy-hash-key");
            let io = |source| ConfigError::Read {
                path: path.clone(),
                source,
            };
            match std::fs::read_to_string(&path) {
                Ok(k) if !k.trim().is_empty() => k.trim().as_bytes().to_vec(),
                Ok(_) | Err(_) => {
                    std::fs::create_dir_all(data_dir).map_err(io)?;
                    let bytes: [u8; 32] = rand::random();
                    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    write_private(&path, hex.as_bytes()).map_err(io)?;
                    tracing::warn!(
                        "privacy: no [privacy] hash-key configured; made one and kept it in the data dir (privacy-hash-key). Keep the key apart from the data (set TALLY__PRIVACY__HASH_KEY) so the data alone cannot be matched against guessed values"
                    );
                    hex.into_bytes()
                }
            }
        } else {
            Vec::new()
        };
        tally_ingest::Privacy::new(&key, rules)
            .map(|p| Some(std::sync::Arc::new(p)))
            .map_err(|e| ConfigError::Schema(e.to_string()))
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Per-tenant ingest quotas (token buckets). A request over its tenant's
/// quota is answered `429` + `Retry-After` and nothing from it is stored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct QuotasSection {
    /// Every tenant's sustained events per second unless it has its own
    /// limit below (0: no limit).
    pub events_per_second: u64,
    /// Events allowed at once above the sustained rate (0: one second's worth).
    pub burst_events: u64,
    /// Limits of named tenants: `[quotas.tenants.acme]`.
    pub tenants: std::collections::BTreeMap<String, QuotaSection>,
}

impl QuotasSection {
    /// The limit that applies to `tenant`.
    pub fn of(&self, tenant: &str) -> QuotaSection {
        self.tenants.get(tenant).copied().unwrap_or(QuotaSection {
            events_per_second: self.events_per_second,
            burst_events: self.burst_events,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct QuotaSection {
    /// Sustained events per second (0: no limit).
    pub events_per_second: u64,
    /// Events allowed at once above the sustained rate (0: one second's worth).
    pub burst_events: u64,
}

/// Rollup retention and downsampling; the log's and the archive's own
/// retention are `log.retention` and `archive.retention`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RetentionSection {
    /// Minute rollups older than this are folded into hour rollups ("0s": never).
    pub minute_rollups: String,
    /// Rollups (hours, and minutes not yet folded) older than this are deleted ("0s": kept).
    pub hour_rollups: String,
    /// How often the retention passes (log, archive, rollups) run.
    pub interval: String,
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection {
            minute_rollups: "90d".into(),
            hour_rollups: "365d".into(),
            interval: "1m".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct IngestConfig {
    /// Largest request body accepted (bytes); larger bodies get 413.
    pub max_body_bytes: usize,
    /// Bytes of accepted-but-not-yet-durable batches allowed in memory;
    /// past this, ingest answers 503 with Retry-After.
    pub max_inflight_bytes: usize,
    /// Requests waiting for the log writer; past this, 503.
    pub queue_depth: usize,
    /// Events stamped further than this ahead of the server's clock are
    /// rejected (their tenant's watermark must not run into the future).
    pub max_future_skew: String,
    /// Deepest nesting of an event (the event object is level 1).
    pub max_json_depth: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LogSection {
    pub partitions: u32,
    pub segment_bytes: u64,
    /// Age after which closed segments are deleted, e.g. "30d" ("0s" keeps
    /// all): the log is the raw hot tier, replayable as it was ingested.
    pub retention: String,
    /// Per-partition size limit in bytes (0 = none).
    pub retention_bytes: u64,
    /// fsync before acknowledging. Only benchmarks of the CPU path turn it off.
    pub fsync: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct StreamSection {
    /// Bounded out-of-orderness of the watermark.
    pub watermark_bound: String,
    /// A partition silent this long stops holding the watermark back.
    pub idle_timeout: String,
    /// How long after a window closes events still update it.
    pub allowed_lateness: String,
    /// How often the processor state is checkpointed ("0s": never; recovery
    /// then replays the whole log).
    pub checkpoint_interval: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DlqSection {
    /// Entries kept per tenant and kind for `GET /api/v1/dlq`.
    pub capacity: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ArchiveSection {
    /// Keep raw events (the `events` table, the Parquet archive, sessions).
    pub enabled: bool,
    /// Hot rows are sealed into Parquet at least this often.
    pub seal_interval: String,
    /// ... or once this many rows are hot.
    pub seal_rows: usize,
    /// Past this many hot rows (a seal that cannot keep up, e.g. object
    /// storage down), ingest slows down instead of memory growing.
    pub max_hot_rows: usize,
    pub row_group_rows: usize,
    pub zstd_level: i32,
    /// Archive files older than this (by event hour) are deleted ("0s": kept).
    pub retention: String,
    /// The files of one (tenant, hour) are merged once there are this many
    /// (or two, once the hour is over).
    pub compact_files: usize,
    /// Files with more rows than this are not merged further.
    pub compact_rows: u64,
    /// An S3-compatible bucket instead of `<data-dir>/archive`.
    pub s3: Option<S3Section>,
    /// The local archive directory (default `<data-dir>/archive`). Kafka
    /// mode: every node must reach the same archive (this directory on a
    /// shared file system, or `[archive.s3]`).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct S3Section {
    pub bucket: String,
    pub prefix: String,
    /// For S3-compatible servers, e.g. "http://127.0.0.1:9000".
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub allow_http: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct QuerySection {
    /// Longest a SQL or sessions query may run.
    pub timeout: String,
    /// Memory one query may use, bytes.
    pub memory_limit: usize,
    /// Most rows in one answer (the answer says "truncated" past it).
    pub max_rows: usize,
    /// Cached SQL answers (0: no cache).
    pub cache_entries: usize,
    /// Cached metrics API answers (0: no cache).
    pub metrics_cache_entries: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AlertsSection {
    /// Longest a webhook call may take before it counts as failed.
    pub webhook_timeout: String,
    /// Attempts per notification before it is given up.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `max-backoff`.
    pub backoff: String,
    pub max_backoff: String,
    /// Most notifications waiting for delivery (the oldest go first past it).
    pub max_queue: usize,
    /// State changes and delivery outcomes kept for `/api/v1/alerts/history`.
    pub history: usize,
    /// After a live stream stops, wall-clock time carries event time forward
    /// (so `count < 1` fires) once this long has passed without progress.
    pub wall_clock_grace: String,
    /// Event time further behind the wall clock than this is a backfill and
    /// is never carried forward by the wall clock.
    pub live_horizon: String,
    /// In keyed mode webhooks may not reach loopback, private or link-local
    /// addresses; these hosts, addresses and networks (`10.0.0.0/8`) are
    /// allowed anyway.
    pub allow_targets: Vec<String>,
    /// Alert rules one tenant may have.
    pub max_rules_per_tenant: usize,
}

impl Default for AlertsSection {
    fn default() -> Self {
        AlertsSection {
            webhook_timeout: "5s".into(),
            max_attempts: 10,
            backoff: "500ms".into(),
            max_backoff: "1m".into(),
            max_queue: 10_000,
            history: 1000,
            wall_clock_grace: "2s".into(),
            live_horizon: "10m".into(),
            allow_targets: Vec::new(),
            max_rules_per_tenant: 100,
        }
    }
}

impl Default for ArchiveSection {
    fn default() -> Self {
        ArchiveSection {
            enabled: true,
            seal_interval: "1m".into(),
            seal_rows: 1_000_000,
            max_hot_rows: 8_000_000,
            row_group_rows: 128 * 1024,
            zstd_level: 1,
            retention: "365d".into(),
            compact_files: 8,
            compact_rows: 4_000_000,
            s3: None,
            dir: None,
        }
    }
}

impl Default for QuerySection {
    fn default() -> Self {
        QuerySection {
            timeout: "30s".into(),
            memory_limit: 1 << 30,
            max_rows: 100_000,
            cache_entries: 256,
            metrics_cache_entries: 4096,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7070".into(),
            data_dir: PathBuf::from("tally-data"),
            ingest: IngestConfig::default(),
            log: LogSection::default(),
            stream: StreamSection::default(),
            dlq: DlqSection::default(),
            archive: ArchiveSection::default(),
            query: QuerySection::default(),
            alerts: AlertsSection::default(),
            retention: RetentionSection::default(),
            auth: AuthSection::default(),
            quotas: QuotasSection::default(),
            shedding: SheddingSection::default(),
            http: HttpSection::default(),
            pgwire: PgwireSection::default(),
            smtp: SmtpSection::default(),
            registry: RegistrySection::default(),
            tls: TlsSection::default(),
            privacy: PrivacySection::default(),
            kafka: None,
            schemas: Schemas::new(),
            dimensions: DimensionsSection::default(),
            sessions: SessionsSection::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body_bytes: 16 << 20,
            max_inflight_bytes: 512 << 20,
            queue_depth: 4096,
            max_future_skew: "10m".into(),
            max_json_depth: 64,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            partitions: 4,
            segment_bytes: 128 << 20,
            retention: "30d".into(),
            retention_bytes: 0,
            fsync: true,
        }
    }
}

impl Default for StreamSection {
    fn default() -> Self {
        StreamSection {
            watermark_bound: "5s".into(),
            idle_timeout: "30s".into(),
            allowed_lateness: "5m".into(),
            checkpoint_interval: "1s".into(),
        }
    }
}

impl Default for DlqSection {
    fn default() -> Self {
        DlqSection { capacity: 10_000 }
    }
}

/// Whether the section at `path` is a map whose keys are names (tenants,
/// properties), not field names.
fn map_section(path: &[String]) -> bool {
    match path {
        [p, ..] if p == "privacy" => true,
        [k, c] if k == "kafka" && c == "client" => true,
        [s] => s == "schemas",
        [s, _] if s == "schemas" => true,
        [q, t] => (q == "quotas" || q == "dimensions") && t == "tenants",
        _ => false,
    }
}

fn duration(key: &'static str, v: &str) -> Result<Millis, ConfigError> {
    parse_duration_ms(v).ok_or_else(|| ConfigError::Invalid {
        key,
        value: v.into(),
        fix: "write a duration like 250ms, 5s, 2m, 1h or 7d",
    })
}

/// Durations and limits of a validated config.
#[derive(Debug, Clone, Copy)]
pub struct Durations {
    pub retention_ms: Millis,
    pub watermark_bound_ms: Millis,
    pub idle_timeout_ms: Millis,
    pub allowed_lateness_ms: Millis,
    pub max_future_skew_ms: Millis,
    pub http_header_timeout_ms: Millis,
    pub http_body_timeout_ms: Millis,
    pub http_write_timeout_ms: Millis,
    pub checkpoint_interval_ms: Millis,
    pub seal_interval_ms: Millis,
    pub archive_retention_ms: Millis,
    pub query_timeout_ms: Millis,
    pub webhook_timeout_ms: Millis,
    pub alert_backoff_ms: Millis,
    pub alert_max_backoff_ms: Millis,
    pub alert_grace_ms: Millis,
    pub alert_live_horizon_ms: Millis,
    pub minute_rollups_ms: Millis,
    pub hour_rollups_ms: Millis,
    pub retention_interval_ms: Millis,
    pub session_gap_ms: Millis,
}

impl Config {
    /// Defaults, then the file (if any), then `TALLY__SECTION__KEY` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with_env(file, std::env::vars())
    }

    /// [`Config::load`] with the environment given (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for (k, v) in env {
            let Some(path) = k.strip_prefix("TALLY__") else {
                continue;
            };
            // Field names are kebab-case (`GROUP_ID` → `group-id`); keys of
            // maps (tenants, property names) keep their underscores.
            let mut keys: Vec<String> = Vec::new();
            for seg in path.split("__") {
                let lower = seg.to_ascii_lowercase();
                let seg = if map_section(&keys) {
                    if keys.len() == 1 && keys[0] == "privacy" && lower == "hash_key" {
                        "hash-key".to_string()
                    } else if keys.len() == 2 && keys[0] == "kafka" {
                        // librdkafka settings are dotted: sasl.mechanism.
                        lower.replace('_', ".")
                    } else {
                        lower
                    }
                } else {
                    lower.replace('_', "-")
                };
                keys.push(seg);
            }
            let value = format!("x = {v}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("x"))
                .unwrap_or(toml::Value::String(v.clone()));
            let mut t = &mut table;
            for seg in &keys[..keys.len() - 1] {
                let entry = t
                    .entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                let Some(next) = entry.as_table_mut() else {
                    return Err(ConfigError::Parse(format!("{k}: {seg} is not a section")));
                };
                t = next;
            }
            t.insert(keys[keys.len() - 1].clone(), value);
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.durations()?;
        cfg.check_kafka()?;
        cfg.target_policy()?;
        cfg.check_schemas()?;
        cfg.check_privacy()?;
        cfg.dimensions.build()?;
        cfg.smtp.check()?;
        cfg.registry.level()?;
        crate::keys::Keys::from_config(&cfg.auth)?;
        Ok(cfg)
    }

    /// Where webhooks may go: internal addresses refused in keyed mode
    /// (tenants are not trusted), except `alerts.allow-targets`.
    pub fn target_policy(&self) -> Result<tally_alert::TargetPolicy, ConfigError> {
        let allow = self
            .alerts
            .allow_targets
            .iter()
            .map(|a| {
                tally_alert::Allowed::parse(a).map_err(|_| ConfigError::Invalid {
                    key: "alerts.allow-targets",
                    value: a.clone(),
                    fix: "write a host name, an IP address or a network like 10.0.0.0/8",
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(tally_alert::TargetPolicy {
            block_internal: !self.auth.keys.is_empty(),
            allow,
        })
    }

    /// A `[kafka]` section names its brokers and sane settings.
    pub fn check_kafka(&self) -> Result<(), ConfigError> {
        let Some(k) = &self.kafka else { return Ok(()) };
        if k.brokers.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "kafka.brokers",
                value: String::new(),
                fix: "name the bootstrap servers, e.g. brokers = \"127.0.0.1:9092\" (or TALLY__KAFKA__BROKERS), or remove [kafka] for embedded mode",
            });
        }
        if k.group_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "kafka.group-id",
                value: String::new(),
                fix: "name the consumer group every node of this cluster shares, e.g. \"tally\"",
            });
        }
        if k.partitions == 0 || k.partitions > 1024 {
            return Err(ConfigError::Invalid {
                key: "kafka.partitions",
                value: k.partitions.to_string(),
                fix: "use 1 to 1024",
            });
        }
        let derived = |t: &String, suffix: &str| {
            if t.trim().is_empty() {
                format!("{}_{suffix}", k.group_id)
            } else {
                t.clone()
            }
        };
        let alerts = derived(&k.topic_alerts, "alerts");
        let malformed = derived(&k.topic_malformed, "malformed");
        let registry = derived(&k.topic_registry, "registry");
        for (name, t) in [
            ("kafka.topic-events", &k.topic_events),
            ("kafka.topic-aggregates", &k.topic_aggregates),
            ("kafka.topic-late", &k.topic_late),
            ("kafka.topic-alerts", &alerts),
            ("kafka.topic-malformed", &malformed),
            ("kafka.topic-registry", &registry),
        ] {
            let ok = !t.is_empty()
                && t.len() <= 249
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(ConfigError::Invalid {
                    key: name,
                    value: t.clone(),
                    fix: "use a Kafka topic name: letters, digits, '.', '_' and '-', at most 249",
                });
            }
        }
        let ms = duration("kafka.commit-interval", &k.commit_interval)?;
        if ms <= 0 {
            return Err(ConfigError::Invalid {
                key: "kafka.commit-interval",
                value: k.commit_interval.clone(),
                fix: "use a positive duration, e.g. 100ms",
            });
        }
        duration("kafka.produce-timeout", &k.produce_timeout)?;
        if duration("kafka.seal-interval", &k.seal_interval)? <= 0 {
            return Err(ConfigError::Invalid {
                key: "kafka.seal-interval",
                value: k.seal_interval.clone(),
                fix: "use a positive duration, e.g. 5s",
            });
        }
        if duration("kafka.orphan-age", &k.orphan_age)? <= 0 {
            return Err(ConfigError::Invalid {
                key: "kafka.orphan-age",
                value: k.orphan_age.clone(),
                fix: "use a positive duration, e.g. 1h",
            });
        }
        Ok(())
    }

    /// Redaction rules that name known fields and actions; TLS with both
    /// files or neither.
    pub fn check_privacy(&self) -> Result<(), ConfigError> {
        tally_ingest::Privacy::new(b"", self.privacy.rules()?)
            .map_err(|e| ConfigError::Schema(e.to_string()))?;
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Schema(
                "tls: set both cert and key (PEM files), or neither for plain HTTP".into(),
            ));
        }
        Ok(())
    }

    /// Tenant names valid, property names usable as `events` columns.
    pub fn check_schemas(&self) -> Result<(), ConfigError> {
        for (tenant, props) in &self.schemas {
            if !tally_types::valid_tenant(tenant) {
                return Err(ConfigError::Schema(format!(
                    "schemas.{tenant}: not a tenant name; use 1–64 characters of [A-Za-z0-9_.-]"
                )));
            }
            for name in props.keys() {
                if name.is_empty() || name.len() > 256 {
                    return Err(ConfigError::Schema(format!(
                        "schemas.{tenant}.{name:?}: a property name is 1–256 bytes"
                    )));
                }
                // The columns `events` has for every tenant.
                if tally_archive::events_schema().field_with_name(name).is_ok() {
                    return Err(ConfigError::Schema(format!(
                        "schemas.{tenant}.{name}: {name} is already a column of events; \
                         read that property with json_get_*(properties, '{name}') instead of declaring it"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn durations(&self) -> Result<Durations, ConfigError> {
        if self.log.partitions == 0 || self.log.partitions > 1024 {
            return Err(ConfigError::Invalid {
                key: "log.partitions",
                value: self.log.partitions.to_string(),
                fix: "use 1 to 1024",
            });
        }
        if self.ingest.max_body_bytes == 0 {
            return Err(ConfigError::Invalid {
                key: "ingest.max-body-bytes",
                value: "0".into(),
                fix: "use a positive size in bytes, e.g. 16777216",
            });
        }
        let minute_rollups_ms =
            duration("retention.minute-rollups", &self.retention.minute_rollups)?;
        let hour_rollups_ms = duration("retention.hour-rollups", &self.retention.hour_rollups)?;
        if hour_rollups_ms > 0 && minute_rollups_ms > 0 && hour_rollups_ms < minute_rollups_ms {
            return Err(ConfigError::Invalid {
                key: "retention.hour-rollups",
                value: self.retention.hour_rollups.clone(),
                fix: "hour rollups are what minute rollups become: keep them at least as long as retention.minute-rollups (or \"0s\" to keep them forever)",
            });
        }
        let session_gap_ms = duration("sessions.gap", &self.sessions.gap)?;
        if session_gap_ms <= 0 {
            return Err(ConfigError::Invalid {
                key: "sessions.gap",
                value: self.sessions.gap.clone(),
                fix: "use a positive duration, e.g. 30m",
            });
        }
        Ok(Durations {
            session_gap_ms,
            minute_rollups_ms,
            hour_rollups_ms,
            retention_interval_ms: duration("retention.interval", &self.retention.interval)?.max(1),
            retention_ms: duration("log.retention", &self.log.retention)?,
            watermark_bound_ms: duration("stream.watermark-bound", &self.stream.watermark_bound)?,
            idle_timeout_ms: duration("stream.idle-timeout", &self.stream.idle_timeout)?,
            allowed_lateness_ms: duration(
                "stream.allowed-lateness",
                &self.stream.allowed_lateness,
            )?,
            max_future_skew_ms: duration("ingest.max-future-skew", &self.ingest.max_future_skew)?,
            http_header_timeout_ms: duration("http.header-timeout", &self.http.header_timeout)?
                .max(1),
            http_body_timeout_ms: duration("http.body-timeout", &self.http.body_timeout)?.max(1),
            http_write_timeout_ms: duration("http.write-timeout", &self.http.write_timeout)?.max(1),
            checkpoint_interval_ms: duration(
                "stream.checkpoint-interval",
                &self.stream.checkpoint_interval,
            )?,
            seal_interval_ms: duration("archive.seal-interval", &self.archive.seal_interval)?
                .max(1),
            archive_retention_ms: duration("archive.retention", &self.archive.retention)?,
            query_timeout_ms: duration("query.timeout", &self.query.timeout)?.max(1),
            webhook_timeout_ms: duration("alerts.webhook-timeout", &self.alerts.webhook_timeout)?
                .max(1),
            alert_backoff_ms: duration("alerts.backoff", &self.alerts.backoff)?.max(1),
            alert_max_backoff_ms: duration("alerts.max-backoff", &self.alerts.max_backoff)?.max(1),
            alert_grace_ms: duration("alerts.wall-clock-grace", &self.alerts.wall_clock_grace)?,
            alert_live_horizon_ms: duration("alerts.live-horizon", &self.alerts.live_horizon)?,
        })
    }
}
