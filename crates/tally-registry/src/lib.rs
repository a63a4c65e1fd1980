//! The schema registry: per tenant, subjects with numbered versions of
//! Avro or JSON schemas under global ids, compatibility rules that gate
//! each new version, and the checks ingest makes with them.
//!
//! It is the model behind the Confluent Schema Registry REST API that the
//! HTTP crate serves, so Confluent's clients and serializers work against
//! Tally unchanged. A schema registered under subject `<event_type>`
//! describes the `properties` of that event type: ingest checks every
//! event of the type against the latest version (or the version its
//! `schema_version` names). Other subjects (e.g. `<topic>-value` of a
//! Confluent serializer) hold the schemas of Avro-framed events, which
//! [`Registry::decode_frame`] turns into JSON events.
//!
//! Ids are global (a frame carries only the id), but every id belongs to
//! one tenant: the same schema registered by two tenants gets two ids, and
//! a tenant never sees another's. Every change is appended to a log in
//! the data directory and synced before it is answered ([`store`]).

mod avro;
mod avro_text;
mod check;
mod json;
mod store;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use serde_json::value::RawValue;

use crate::avro::{Break, BreakKind};
use crate::store::{Log, Record};

/// A compatibility rule: which earlier versions a new version must be
/// able to read (backward) or be read by (forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    pub const ALL: [Level; 7] = [
        Level::None,
        Level::Backward,
        Level::BackwardTransitive,
        Level::Forward,
        Level::ForwardTransitive,
        Level::Full,
        Level::FullTransitive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// A level by name, any case.
    pub fn parse(s: &str) -> Result<Level, RegistryError> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                RegistryError::InvalidLevel(format!(
                    "Invalid compatibility level {s:?}; use one of {}",
                    Level::ALL.map(Level::as_str).join(", ")
                ))
            })
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }
}

/// The schema languages the registry takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchemaType {
    #[serde(rename = "AVRO")]
    Avro,
    #[serde(rename = "JSON")]
    Json,
}

impl SchemaType {
    pub fn as_str(self) -> &'static str {
        match self {
            SchemaType::Avro => "AVRO",
            SchemaType::Json => "JSON",
        }
    }

    /// `schemaType` of a request (absent: Avro, as in Confluent's API).
    pub fn parse(s: Option<&str>) -> Result<SchemaType, RegistryError> {
        match s.map(|s| s.trim().to_ascii_uppercase()).as_deref() {
            None | Some("AVRO") | Some("") => Ok(SchemaType::Avro),
            Some("JSON") => Ok(SchemaType::Json),
            Some("PROTOBUF") => Err(RegistryError::InvalidSchema(
                "schemaType PROTOBUF is not supported by Tally's registry; register an AVRO or JSON schema".into(),
            )),
            Some(other) => Err(RegistryError::InvalidSchema(format!(
                "schemaType {other:?} is unknown; use AVRO (the default) or JSON"
            ))),
        }
    }
}

/// Every error of the registry, with the HTTP status and the error code
/// Confluent's API gives it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {version} not found for subject '{subject}'.")]
    VersionNotFound { subject: String, version: String },
    #[error("{0}")]
    SchemaNotFound(String),
    #[error("Subject '{0}' was soft deleted. Set permanent=true to delete permanently")]
    SubjectSoftDeleted(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error(
        "Subject '{subject}' Version {version} was soft deleted. Set permanent=true to delete permanently"
    )]
    VersionSoftDeleted { subject: String, version: u32 },
    #[error(
        "Subject '{subject}' Version {version} was not deleted first before being permanently deleted"
    )]
    VersionNotSoftDeleted { subject: String, version: u32 },
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectLevelNotConfigured(String),
    #[error(
        "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" (compatibility {level}): {}",
        messages.join("; ")
    )]
    Incompatible {
        subject: String,
        level: &'static str,
        messages: Vec<String>,
    },
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error("{0}")]
    InvalidVersion(String),
    #[error("{0}")]
    InvalidLevel(String),
    #[error("{0}")]
    InvalidSubject(String),
    #[error("{0}")]
    InvalidMode(String),
    #[error("{0}")]
    Limit(String),
    #[error("registry storage: {0}")]
    Storage(String),
}

impl RegistryError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        use RegistryError::*;
        match self {
            SubjectNotFound(_)
            | VersionNotFound { .. }
            | SchemaNotFound(_)
            | SubjectSoftDeleted(_)
            | SubjectNotSoftDeleted(_)
            | VersionSoftDeleted { .. }
            | VersionNotSoftDeleted { .. }
            | SubjectLevelNotConfigured(_) => 404,
            Incompatible { .. } => 409,
            InvalidSchema(_) | InvalidVersion(_) | InvalidLevel(_) | InvalidSubject(_)
            | InvalidMode(_) | Limit(_) => 422,
            Storage(_) => 500,
        }
    }

    /// Confluent's `error_code`.
    pub fn code(&self) -> u32 {
        use RegistryError::*;
        match self {
            SubjectNotFound(_) => 40401,
            VersionNotFound { .. } => 40402,
            SchemaNotFound(_) => 40403,
            SubjectSoftDeleted(_) => 40404,
            SubjectNotSoftDeleted(_) => 40405,
            VersionSoftDeleted { .. } => 40406,
            VersionNotSoftDeleted { .. } => 40407,
            SubjectLevelNotConfigured(_) => 40408,
            Incompatible { .. } => 409,
            InvalidSchema(_) => 42201,
            InvalidVersion(_) => 42202,
            InvalidLevel(_) => 42203,
            InvalidMode(_) => 42204,
            InvalidSubject(_) => 42208,
            Limit(_) => 42209,
            Storage(_) => 50001,
        }
    }
}

/// A version named in a path: a number or `latest` (`-1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    Latest,
    Number(u32),
}

impl VersionRef {
    pub fn parse(s: &str) -> Result<VersionRef, RegistryError> {
        if s.eq_ignore_ascii_case("latest") || s == "-1" {
            return Ok(VersionRef::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if (1..=i32::MAX as u32).contains(&n) => Ok(VersionRef::Number(n)),
            _ => Err(RegistryError::InvalidVersion(format!(
                "The specified version '{s}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
            ))),
        }
    }
}

/// A schema as parsed, ready to check and to decode with.
enum Parsed {
    /// The schema, and its fields compiled for checking properties.
    Avro(apache_avro::Schema, check::Node),
    Json(Box<jsonschema::Validator>, Json),
}

/// A registered schema.
pub struct Schema {
    pub id: u32,
    pub tenant: String,
    pub schema_type: SchemaType,
    /// The schema's text as registered (compacted JSON).
    pub text: String,
    parsed: Parsed,
    /// An Avro schema compiled for decoding records straight to JSON text
    /// (made on first use; `None` inside: it holds a type left to
    /// `apache_avro`).
    program: std::sync::OnceLock<Option<Arc<avro_text::Program>>>,
}

impl Schema {
    fn program(&self) -> Option<Arc<avro_text::Program>> {
        self.program
            .get_or_init(|| {
                avro_of(self)
                    .and_then(avro_text::Program::compile)
                    .map(Arc::new)
            })
            .clone()
    }
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("type", &self.schema_type)
            .finish()
    }
}

/// One version of a subject, as answered.
#[derive(Debug, Clone)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: u32,
    pub schema: Arc<Schema>,
}

/// Sorted-key, compact JSON: the identity of a schema (two texts of the
/// same schema, spaced or ordered differently, are one schema).
fn canonical(v: &Json) -> String {
    fn sort(v: &Json) -> Json {
        match v {
            Json::Object(o) => {
                let sorted: BTreeMap<&String, Json> = o.iter().map(|(k, v)| (k, sort(v))).collect();
                Json::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Json::Array(a) => Json::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

/// Parses a schema text of a type; answers it, its compacted text and
/// its canonical form.
fn parse_schema(t: SchemaType, text: &str) -> Result<(Parsed, String, String), RegistryError> {
    let doc: Json = serde_json::from_str(text)
        .map_err(|e| RegistryError::InvalidSchema(format!("not JSON: {e}")))?;
    let parsed = match t {
        SchemaType::Avro => {
            let s = apache_avro::Schema::parse(&doc)
                .map_err(|e| RegistryError::InvalidSchema(format!("not an Avro schema: {e}")))?;
            if let Some(name) = avro::recursive(&s) {
                return Err(RegistryError::InvalidSchema(format!(
                    "type {name} contains itself; recursive types are not supported: unroll it to a fixed depth"
                )));
            }
            let compiled = check::compile(&s);
            Parsed::Avro(s, compiled)
        }
        SchemaType::Json => {
            let v = jsonschema::validator_for(&doc)
                .map_err(|e| RegistryError::InvalidSchema(format!("not a JSON Schema: {e}")))?;
            Parsed::Json(Box::new(v), doc.clone())
        }
    };
    Ok((parsed, doc.to_string(), canonical(&doc)))
}

#[derive(Debug, Clone, Copy)]
struct Version {
    version: u32,
    id: u32,
    deleted: bool,
}

#[derive(Debug, Default)]
struct Subject {
    versions: Vec<Version>,
    level: Option<Level>,
}

impl Subject {
    fn live(&self) -> impl DoubleEndedIterator<Item = &Version> {
        self.versions.iter().filter(|v| !v.deleted)
    }

    /// [`Subject::find`], or the error naming the subject and version.
    fn get(&self, subject: &str, v: VersionRef, deleted: bool) -> Result<Version, RegistryError> {
        self.find(v, deleted)
            .ok_or_else(|| RegistryError::VersionNotFound {
                subject: subject.to_string(),
                version: version_label(v),
            })
    }

    fn find(&self, v: VersionRef, deleted: bool) -> Option<Version> {
        match v {
            VersionRef::Latest => self.live().next_back().copied(),
            VersionRef::Number(n) => self
                .versions
                .iter()
                .find(|x| x.version == n && (deleted || !x.deleted))
                .copied(),
        }
    }
}

#[derive(Debug, Default)]
struct Tenant {
    subjects: BTreeMap<String, Subject>,
    level: Option<Level>,
    /// Canonical schema → id, so one schema keeps one id in a tenant.
    ids: HashMap<(SchemaType, String), u32>,
}

#[derive(Default)]
struct State {
    tenants: HashMap<String, Tenant>,
    schemas: HashMap<u32, Arc<Schema>>,
    next_id: u32,
}

/// Limits against runaway or hostile registrations.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub subjects_per_tenant: usize,
    pub versions_per_subject: usize,
    pub schema_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            subjects_per_tenant: 10_000,
            versions_per_subject: 1_000,
            schema_bytes: 256 * 1024,
        }
    }
}

/// The registry of every tenant.
pub struct Registry {
    state: RwLock<State>,
    /// Changes applied since start (query caches follow it).
    generation: std::sync::atomic::AtomicU64,
    /// None: in memory only (tests).
    log: Option<Mutex<Log>>,
    default_level: Level,
    limits: Limits,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("default_level", &self.default_level)
            .finish()
    }
}

/// A registration: the id and the version it holds in its subject.
#[derive(Debug, Clone)]
pub struct Registered {
    pub id: u32,
    pub version: u32,
    pub schema: Arc<Schema>,
}

impl Registry {
    /// A registry kept in `dir` (created if missing), with `default_level`
    /// for tenants and subjects that set none.
    pub fn open(
        dir: &Path,
        default_level: Level,
        limits: Limits,
    ) -> Result<Registry, RegistryError> {
        cap_avro_allocations();
        let (log, records) = Log::open(dir)?;
        let r = Registry {
            state: RwLock::new(State {
                next_id: 1,
                ..State::default()
            }),
            log: Some(Mutex::new(log)),
            generation: Default::default(),
            default_level,
            limits,
        };
        {
            let mut st = r.state.write();
            for (i, rec) in records.into_iter().enumerate() {
                apply(&mut st, rec, None).map_err(|e| {
                    RegistryError::Storage(format!(
                        "{}: record {} does not apply ({e}); the file is damaged",
                        dir.join("registry.jsonl").display(),
                        i + 1
                    ))
                })?;
            }
        }
        Ok(r)
    }

    /// A registry in memory only.
    pub fn in_memory(default_level: Level) -> Registry {
        Registry::in_memory_with(default_level, Limits::default())
    }

    /// A registry in memory only, with `limits` (Kafka mode: the topic of
    /// proposals is its durable form, replayed at start).
    pub fn in_memory_with(default_level: Level, limits: Limits) -> Registry {
        cap_avro_allocations();
        Registry {
            state: RwLock::new(State {
                next_id: 1,
                ..State::default()
            }),
            log: None,
            generation: Default::default(),
            default_level,
            limits,
        }
    }

    /// Makes `rec` durable, then applies it (under the state's write lock,
    /// which the caller holds, so changes are logged in their order).
    /// `parsed`: a registration's schema as the caller already parsed it
    /// (and its canonical form), so it is not parsed again.
    fn commit(
        &self,
        st: &mut State,
        rec: Record,
        parsed: Option<(Parsed, String)>,
    ) -> Result<(), RegistryError> {
        if let Some(log) = &self.log {
            log.lock().append(&rec)?;
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        apply(st, rec, parsed)
    }

    fn level_of(&self, st: &State, tenant: &str, subject: Option<&str>) -> Level {
        let t = st.tenants.get(tenant);
        subject
            .and_then(|s| t.and_then(|t| t.subjects.get(s)).and_then(|s| s.level))
            .or_else(|| t.and_then(|t| t.level))
            .unwrap_or(self.default_level)
    }

    /// Registers `text` (of `schema_type`) under `subject`: the version
    /// already holding the same schema, else a new version, if the
    /// subject's compatibility rule allows it.
    pub fn register(
        &self,
        tenant: &str,
        subject: &str,
        schema_type: SchemaType,
        text: &str,
    ) -> Result<Registered, RegistryError> {
        check_subject(subject)?;
        if text.len() > self.limits.schema_bytes {
            return Err(RegistryError::Limit(format!(
                "schema: {} bytes, at most {} are taken",
                text.len(),
                self.limits.schema_bytes
            )));
        }
        let (parsed, compact, canon) = parse_schema(schema_type, text)?;
        let mut st = self.state.write();
        let key = (schema_type, canon);
        // The id this schema has in the tenant, if it has one.
        let known = st
            .tenants
            .get(tenant)
            .and_then(|t| t.ids.get(&key).copied());
        // The same schema already a live version of the subject: that one.
        if let Some(id) = known
            && let Some(s) = st.tenants.get(tenant).and_then(|t| t.subjects.get(subject))
            && let Some(v) = s.live().find(|v| v.id == id)
        {
            return Ok(Registered {
                id,
                version: v.version,
                schema: st.schemas[&id].clone(),
            });
        }
        let level = self.level_of(&st, tenant, Some(subject));
        let messages = self.incompatibilities(&st, tenant, subject, None, &parsed, level);
        if !messages.is_empty() {
            return Err(RegistryError::Incompatible {
                subject: subject.to_string(),
                level: level.as_str(),
                messages,
            });
        }
        let t = st.tenants.get(tenant);
        if t.is_none_or(|t| !t.subjects.contains_key(subject))
            && t.is_some_and(|t| t.subjects.len() >= self.limits.subjects_per_tenant)
        {
            return Err(RegistryError::Limit(format!(
                "tenant {tenant:?} has {} subjects, the most it may hold; delete unused ones permanently",
                self.limits.subjects_per_tenant
            )));
        }
        let s = t.and_then(|t| t.subjects.get(subject));
        if s.is_some_and(|s| s.versions.len() >= self.limits.versions_per_subject) {
            return Err(RegistryError::Limit(format!(
                "subject {subject:?} has {} versions, the most it may hold; delete old versions permanently",
                self.limits.versions_per_subject
            )));
        }
        let version = s
            .and_then(|s| s.versions.iter().map(|v| v.version).max())
            .unwrap_or(0)
            + 1;
        let id = known.unwrap_or(st.next_id);
        self.commit(
            &mut st,
            Record::Register {
                tenant: tenant.to_string(),
                subject: subject.to_string(),
                version,
                id,
                schema_type,
                schema: compact,
            },
            Some((parsed, key.1)),
        )?;
        Ok(Registered {
            id,
            version,
            schema: st.schemas[&id].clone(),
        })
    }

    /// Why `parsed` may not become the next version of `subject` under
    /// `level` (empty: it may); against `only` alone when given (the
    /// compatibility API's single version).
    fn incompatibilities(
        &self,
        st: &State,
        tenant: &str,
        subject: &str,
        only: Option<Version>,
        parsed: &Parsed,
        level: Level,
    ) -> Vec<String> {
        if level == Level::None {
            return Vec::new();
        }
        let Some(s) = st.tenants.get(tenant).and_then(|t| t.subjects.get(subject)) else {
            return Vec::new();
        };
        let against: Vec<Version> = match only {
            Some(v) => vec![v],
            None if level.transitive() => s.live().copied().collect(),
            None => s.live().next_back().copied().into_iter().collect(),
        };
        let mut out = Vec::new();
        for v in against {
            let old = &st.schemas[&v.id];
            // Backward: the new schema reads the old one's data; forward:
            // the old one reads the new data.
            let mut both = |breaks: &dyn Fn(bool) -> Vec<Break>| {
                for (on, backward) in [(level.backward(), true), (level.forward(), false)] {
                    if on {
                        let found = breaks(backward);
                        out.extend(
                            found
                                .iter()
                                .map(|b| describe(b, backward, v.version, level)),
                        );
                    }
                }
            };
            match (&old.parsed, parsed) {
                (Parsed::Avro(o, _), Parsed::Avro(n, _)) => both(&|backward| {
                    if backward { avro::breaks(o, n) } else { avro::breaks(n, o) }
                }),
                (Parsed::Json(_, o), Parsed::Json(_, n)) => both(&|backward| {
                    if backward { json::breaks(o, n) } else { json::breaks(n, o) }
                }),
                _ => out.push(format!(
                    "version {} is a {} schema and cannot be followed by a schema of another type ({}); use a new subject",
                    v.version,
                    old.schema_type.as_str(),
                    level.as_str()
                )),
            }
        }
        out
    }

    /// `POST /compatibility/subjects/<subject>/versions[/<version>]`: why
    /// the schema could not be registered (empty: it could), against one
    /// version or, with `None`, the versions the subject's rule names.
    pub fn compatibility(
        &self,
        tenant: &str,
        subject: &str,
        version: Option<VersionRef>,
        schema_type: SchemaType,
        text: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let (parsed, _, _) = parse_schema(schema_type, text)?;
        let st = self.state.read();
        let level = self.level_of(&st, tenant, Some(subject));
        let only = match version {
            None => None,
            Some(v) => {
                let s = subject_of(&st, tenant, subject)?;
                Some(s.get(subject, v, false)?)
            }
        };
        let level = if only.is_some() && level == Level::None {
            // A named version is checked even where the rule is NONE, by
            // the default rule: the caller asked that question.
            self.default_level
        } else {
            level
        };
        Ok(self.incompatibilities(&st, tenant, subject, only, &parsed, level))
    }

    /// `POST /subjects/<subject>`: the live version holding this schema.
    pub fn lookup(
        &self,
        tenant: &str,
        subject: &str,
        schema_type: SchemaType,
        text: &str,
        deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let (_, _, canon) = parse_schema(schema_type, text)?;
        let st = self.state.read();
        let s = subject_of(&st, tenant, subject)?;
        let t = &st.tenants[tenant];
        let found = t.ids.get(&(schema_type, canon)).and_then(|id| {
            s.versions
                .iter()
                .rev()
                .find(|v| v.id == *id && (deleted || !v.deleted))
        });
        match found {
            Some(v) => Ok(SubjectVersion {
                subject: subject.to_string(),
                version: v.version,
                schema: st.schemas[&v.id].clone(),
            }),
            None => Err(RegistryError::SchemaNotFound("Schema not found".into())),
        }
    }

    /// The tenant's subjects with a live version (all, with `deleted`).
    pub fn subjects(&self, tenant: &str, deleted: bool) -> Vec<String> {
        let st = self.state.read();
        st.tenants
            .get(tenant)
            .map(|t| {
                t.subjects
                    .iter()
                    .filter(|(_, s)| {
                        !s.versions.is_empty() && (deleted || s.live().next().is_some())
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A subject's version numbers.
    pub fn versions(
        &self,
        tenant: &str,
        subject: &str,
        deleted: bool,
    ) -> Result<Vec<u32>, RegistryError> {
        let st = self.state.read();
        let s = subject_of(&st, tenant, subject)?;
        let v: Vec<u32> = s
            .versions
            .iter()
            .filter(|v| deleted || !v.deleted)
            .map(|v| v.version)
            .collect();
        if v.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_string()));
        }
        Ok(v)
    }

    /// One version of a subject.
    pub fn version(
        &self,
        tenant: &str,
        subject: &str,
        version: VersionRef,
        deleted: bool,
    ) -> Result<SubjectVersion, RegistryError> {
        let st = self.state.read();
        let s = subject_of(&st, tenant, subject)?;
        if s.live().next().is_none() && !deleted {
            return Err(RegistryError::SubjectNotFound(subject.to_string()));
        }
        let v = s.get(subject, version, deleted)?;
        Ok(SubjectVersion {
            subject: subject.to_string(),
            version: v.version,
            schema: st.schemas[&v.id].clone(),
        })
    }

    /// The schema of an id, if the tenant holds it.
    pub fn by_id(&self, tenant: &str, id: u32) -> Result<Arc<Schema>, RegistryError> {
        let st = self.state.read();
        st.schemas
            .get(&id)
            .filter(|s| s.tenant == tenant)
            .cloned()
            .ok_or_else(|| RegistryError::SchemaNotFound(format!("Schema {id} not found")))
    }

    /// The (subject, version) pairs holding an id.
    pub fn id_versions(
        &self,
        tenant: &str,
        id: u32,
        deleted: bool,
    ) -> Result<Vec<(String, u32)>, RegistryError> {
        self.by_id(tenant, id)?;
        let st = self.state.read();
        let t = &st.tenants[tenant];
        Ok(t.subjects
            .iter()
            .flat_map(|(name, s)| {
                s.versions
                    .iter()
                    .filter(move |v| v.id == id && (deleted || !v.deleted))
                    .map(move |v| (name.clone(), v.version))
            })
            .collect())
    }

    /// Deletes every version of a subject: soft (kept, hidden, its
    /// numbers not reused) or, after a soft delete, permanently.
    pub fn delete_subject(
        &self,
        tenant: &str,
        subject: &str,
        permanent: bool,
    ) -> Result<Vec<u32>, RegistryError> {
        let mut st = self.state.write();
        let s = subject_of(&st, tenant, subject)?;
        if s.versions.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_string()));
        }
        let live: Vec<u32> = s.live().map(|v| v.version).collect();
        let all: Vec<u32> = s.versions.iter().map(|v| v.version).collect();
        let targets = match (permanent, live.is_empty()) {
            (false, true) => return Err(RegistryError::SubjectSoftDeleted(subject.to_string())),
            (false, false) => live,
            (true, false) => return Err(RegistryError::SubjectNotSoftDeleted(subject.to_string())),
            (true, true) => all,
        };
        for &version in &targets {
            self.commit(
                &mut st,
                Record::Delete {
                    tenant: tenant.to_string(),
                    subject: subject.to_string(),
                    version,
                    permanent,
                },
                None,
            )?;
        }
        Ok(targets)
    }

    /// Deletes one version (soft, or permanently after a soft delete).
    pub fn delete_version(
        &self,
        tenant: &str,
        subject: &str,
        version: VersionRef,
        permanent: bool,
    ) -> Result<u32, RegistryError> {
        let mut st = self.state.write();
        let s = subject_of(&st, tenant, subject)?;
        let v = s.get(subject, version, permanent)?;
        match (permanent, v.deleted) {
            (false, true) => {
                return Err(RegistryError::VersionSoftDeleted {
                    subject: subject.to_string(),
                    version: v.version,
                });
            }
            (true, false) => {
                return Err(RegistryError::VersionNotSoftDeleted {
                    subject: subject.to_string(),
                    version: v.version,
                });
            }
            _ => {}
        }
        self.commit(
            &mut st,
            Record::Delete {
                tenant: tenant.to_string(),
                subject: subject.to_string(),
                version: v.version,
                permanent,
            },
            None,
        )?;
        Ok(v.version)
    }

    /// The rule of a subject (None: the tenant's) or of the tenant; with
    /// `fallback`, a subject without its own gives the tenant's.
    pub fn level(
        &self,
        tenant: &str,
        subject: Option<&str>,
        fallback: bool,
    ) -> Result<Level, RegistryError> {
        let st = self.state.read();
        match subject {
            None => Ok(self.level_of(&st, tenant, None)),
            Some(s) => {
                let own = st
                    .tenants
                    .get(tenant)
                    .and_then(|t| t.subjects.get(s))
                    .and_then(|x| x.level);
                match own {
                    Some(l) => Ok(l),
                    None if fallback => Ok(self.level_of(&st, tenant, None)),
                    None => Err(RegistryError::SubjectLevelNotConfigured(s.to_string())),
                }
            }
        }
    }

    /// Sets (Some) or removes (None) the rule of a subject or the tenant;
    /// answers the rule it had.
    pub fn set_level(
        &self,
        tenant: &str,
        subject: Option<&str>,
        level: Option<Level>,
    ) -> Result<Level, RegistryError> {
        if let Some(s) = subject {
            check_subject(s)?;
        }
        let mut st = self.state.write();
        let before = match subject {
            None => self.level_of(&st, tenant, None),
            Some(s) => {
                let own = st
                    .tenants
                    .get(tenant)
                    .and_then(|t| t.subjects.get(s))
                    .and_then(|x| x.level);
                match (own, level) {
                    (None, None) => {
                        return Err(RegistryError::SubjectLevelNotConfigured(s.to_string()));
                    }
                    (o, _) => o.unwrap_or_else(|| self.level_of(&st, tenant, None)),
                }
            }
        };
        self.commit(
            &mut st,
            Record::Config {
                tenant: tenant.to_string(),
                subject: subject.map(String::from),
                level,
            },
            None,
        )?;
        Ok(before)
    }

    /// Changes since start: grows with every registration, delete and
    /// rule change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The typed columns SQL shows for a tenant's properties: every field
    /// of a primitive type (or a union of one with null) in the latest
    /// version of the tenant's subjects, by its JSON form (strings and
    /// enums, integers, floats, booleans). A name two subjects give
    /// different types is left out (an int and a float make a float).
    /// Records with a `properties` field (whole events, as a serializer's
    /// envelope) are passed over. Where a row lacks the field the column
    /// reads its older names (the field's `aliases` in any subject), then
    /// the default of the event type's latest version (Avro `default`,
    /// JSON Schema `default`; a null default adds nothing), else null.
    pub fn property_columns(
        &self,
        tenant: &str,
    ) -> BTreeMap<String, tally_types::schema::PropColumn> {
        use tally_types::schema::{ColumnFill, PropColumn, PropType};
        let st = self.state.read();
        let Some(t) = st.tenants.get(tenant) else {
            return BTreeMap::new();
        };
        // None: two subjects disagree on the type.
        let mut types: BTreeMap<String, Option<PropType>> = BTreeMap::new();
        let mut fills: BTreeMap<String, ColumnFill> = BTreeMap::new();
        for (subject, s) in &t.subjects {
            let Some(v) = s.live().next_back() else {
                continue;
            };
            for p in properties_of(&st.schemas[&v.id].parsed) {
                let fill = fills.entry(p.name.to_string()).or_default();
                for a in p.aliases {
                    if !fill.aliases.contains(a) {
                        fill.aliases.push(a.clone());
                    }
                }
                if let Some(d) = p.default.filter(|d| !d.is_null()) {
                    fill.defaults.push((subject.clone(), d.clone()));
                }
                let Some(ty) = p.ty else { continue };
                let merged = match types.get(p.name) {
                    None => Some(ty),
                    Some(None) => None,
                    Some(Some(prev)) if *prev == ty => Some(ty),
                    Some(Some(PropType::Int | PropType::Float))
                        if matches!(ty, PropType::Int | PropType::Float) =>
                    {
                        Some(PropType::Float)
                    }
                    Some(Some(_)) => None,
                };
                types.insert(p.name.to_string(), merged);
            }
        }
        types
            .into_iter()
            .filter_map(|(name, ty)| {
                let fill = fills.remove(&name).unwrap_or_default();
                Some((name, PropColumn { ty: ty?, fill }))
            })
            .collect()
    }

    /// Per tenant, each subject's live versions (the status page).
    pub fn summary(&self) -> BTreeMap<String, BTreeMap<String, Vec<u32>>> {
        let st = self.state.read();
        let mut out = BTreeMap::new();
        for (t, ten) in &st.tenants {
            let subjects: BTreeMap<String, Vec<u32>> = ten
                .subjects
                .iter()
                .filter_map(|(name, s)| {
                    let v: Vec<u32> = s.live().map(|v| v.version).collect();
                    (!v.is_empty()).then(|| (name.clone(), v))
                })
                .collect();
            if !subjects.is_empty() {
                out.insert(t.clone(), subjects);
            }
        }
        out
    }

    /// The schema (and version) of an event type's properties: the
    /// version named, else the latest; None: the type has no schema.
    fn event_schema(
        &self,
        tenant: &str,
        event_type: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, Arc<Schema>)>, String> {
        let st = self.state.read();
        let subject = st
            .tenants
            .get(tenant)
            .and_then(|t| t.subjects.get(event_type));
        let Some(s) = subject.filter(|s| s.live().next().is_some()) else {
            return match version {
                None => Ok(None),
                Some(v) => Err(format!(
                    "schema_version: {v} names a version, but event type {event_type:?} of tenant {tenant:?} has no registered schema; register one under subject {event_type:?} or drop schema_version"
                )),
            };
        };
        let v = match version {
            None => s.live().next_back().copied(),
            Some(n) => s.find(VersionRef::Number(n), false),
        };
        match v {
            Some(v) => Ok(Some((v.version, st.schemas[&v.id].clone()))),
            None => {
                let have: Vec<String> = s.live().map(|v| v.version.to_string()).collect();
                Err(format!(
                    "schema_version: event type {event_type:?} has no version {} (versions: {}); name one of them or drop schema_version",
                    version.unwrap_or(0),
                    have.join(", ")
                ))
            }
        }
    }

    /// The checker of an event type's properties (see
    /// [`Registry::event_schema`]); None: the type has no schema.
    pub fn event_checker(
        &self,
        tenant: &str,
        event_type: &str,
        version: Option<u32>,
    ) -> Result<Option<EventChecker>, String> {
        Ok(self
            .event_schema(tenant, event_type, version)?
            .map(|(version, schema)| EventChecker {
                tenant: tenant.to_string(),
                event_type: event_type.to_string(),
                version,
                schema,
            }))
    }

    /// Checks an event's properties against the schema of its type; the
    /// error names the property, what the schema expects, what came, and
    /// the version.
    pub fn check_event(
        &self,
        tenant: &str,
        event_type: &str,
        version: Option<u32>,
        props: &[(Cow<'_, str>, &RawValue)],
    ) -> Result<(), String> {
        match self.event_checker(tenant, event_type, version)? {
            Some(c) => c.check_props(props),
            None => Ok(()),
        }
    }

    /// Decodes one Confluent-framed Avro record (magic byte 0, the schema
    /// id as 4 bytes big-endian, the Avro binary) of `tenant` into JSON,
    /// read with the writer's schema and resolved to the latest version of
    /// the subject that holds it.
    pub fn decode_frame(&self, tenant: &str, frame: &[u8]) -> Result<Json, String> {
        self.frame_reader(Some(tenant), frame_id(frame)?)?
            .decode(frame)
    }

    /// A frame as an event of the tenant that owns its schema id (Kafka
    /// messages carry no tenant), that tenant filled in when the record
    /// names none.
    pub fn decode_owned_event(
        &self,
        frame: &[u8],
    ) -> Result<serde_json::Map<String, Json>, String> {
        let reader = self.frame_reader(None, frame_id(frame)?)?;
        let mut ev = reader.decode_event(frame)?;
        ev.entry("tenant")
            .or_insert_with(|| Json::String(reader.writer.tenant.clone()));
        Ok(ev)
    }

    /// [`Registry::decode_owned_event`] as JSON text appended to `out`,
    /// decoded straight to text where the frame's schema allows (see
    /// [`FrameReader::decode_event_into`]).
    pub fn decode_owned_event_into(&self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let reader = self.frame_reader(None, frame_id(frame)?)?;
        let at = out.len();
        if let Some(p) = &reader.fast
            && !p.has_root_field("tenant")
            && p.decode_event(&frame[5..], out).is_ok()
        {
            // `{...}` → `{"tenant":"t",...}`.
            let mut kv = br#""tenant":"#.to_vec();
            serde_json::to_writer(&mut kv, &reader.writer.tenant).map_err(|e| e.to_string())?;
            if out.get(at + 1) != Some(&b'}') {
                kv.push(b',');
            }
            out.splice(at + 1..at + 1, kv);
            return Ok(());
        }
        let ev = self.decode_owned_event(frame)?;
        serde_json::to_writer(out, &ev).map_err(|e| e.to_string())
    }

    /// The schemas frames of schema id `id` are read with: the writer's,
    /// and the latest live version of the subject that holds it (the
    /// reader's). `tenant`: the id must be that tenant's (None: any). A
    /// caller decoding many frames asks once per id.
    pub fn frame_reader(&self, tenant: Option<&str>, id: u32) -> Result<FrameReader, String> {
        let st = self.state.read();
        let writer = st
            .schemas
            .get(&id)
            .filter(|s| tenant.is_none_or(|t| s.tenant == t))
            .cloned()
            .ok_or_else(|| match tenant {
                Some(t) => format!(
                    "schema id {id} is not registered for tenant {t:?}; register the schema with this registry first"
                ),
                None => format!("schema id {id} is not registered with this node's registry"),
            })?;
        if !matches!(writer.parsed, Parsed::Avro(..)) {
            return Err(format!(
                "schema id {id} is a {} schema; an Avro frame needs an Avro schema",
                writer.schema_type.as_str()
            ));
        }
        let latest = st.tenants.get(&writer.tenant).and_then(|t| {
            let (_, s) = t
                .subjects
                .iter()
                .find(|(_, s)| s.live().any(|v| v.id == id))?;
            s.live().next_back()
        });
        // Written with the latest version: nothing to resolve.
        let reader = latest
            .filter(|v| v.id != id)
            .and_then(|v| st.schemas.get(&v.id).cloned());
        let fast = match reader {
            None => writer.program(),
            Some(_) => None,
        };
        Ok(FrameReader {
            id,
            writer,
            reader,
            fast,
        })
    }
}

/// The schema id of a Confluent frame (its magic byte checked).
pub fn frame_id(frame: &[u8]) -> Result<u32, String> {
    if frame.len() < 5 {
        return Err(format!(
            "a Confluent frame is a magic byte 0, a 4-byte schema id and the Avro record; got {} bytes",
            frame.len()
        ));
    }
    if frame[0] != 0 {
        return Err(format!(
            "magic byte {} where 0 was expected: not a Confluent-framed record",
            frame[0]
        ));
    }
    Ok(u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]))
}

fn avro_of(s: &Schema) -> Option<&apache_avro::Schema> {
    match &s.parsed {
        Parsed::Avro(a, _) => Some(a),
        Parsed::Json(..) => None,
    }
}

/// The writer's and reader's schemas of one schema id (see
/// [`Registry::frame_reader`]).
#[derive(Clone)]
pub struct FrameReader {
    id: u32,
    writer: Arc<Schema>,
    /// None: the writer's schema is the latest.
    reader: Option<Arc<Schema>>,
    /// The writer's schema compiled, when it is the latest and every type
    /// in it is one [`avro_text`] decodes.
    fast: Option<Arc<avro_text::Program>>,
}

impl FrameReader {
    /// Decodes a frame of this reader's schema id into JSON.
    pub fn decode(&self, frame: &[u8]) -> Result<Json, String> {
        let id = frame_id(frame)?;
        if id != self.id {
            return Err(format!("schema id {id}, where {} was expected", self.id));
        }
        let ws = avro_of(&self.writer).ok_or("the writer's schema is not Avro")?;
        let rs = self.reader.as_deref().and_then(avro_of);
        let mut body = &frame[5..];
        let value = apache_avro::reader::datum::GenericDatumReader::builder(ws)
            .maybe_reader_schema(rs)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(|e| format!("schema id {id}: the Avro record does not decode: {e}"))?;
        if !body.is_empty() {
            return Err(format!(
                "schema id {id}: {} bytes follow the Avro record; send one record per frame",
                body.len()
            ));
        }
        Ok(avro::to_json(value))
    }

    /// Appends a frame's event object as JSON text to `out` (what
    /// [`FrameReader::decode_event`] gives, written as JSON): decoded
    /// straight to text when the writer's schema is the latest, through
    /// `apache_avro` values otherwise, or when the direct decoder declines
    /// a record (which also gives the error).
    pub fn decode_event_into(&self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(p) = &self.fast
            && frame_id(frame)? == self.id
            && p.decode_event(&frame[5..], out).is_ok()
        {
            return Ok(());
        }
        let ev = self.decode_event(frame)?;
        serde_json::to_writer(out, &ev).map_err(|e| e.to_string())
    }

    /// Decodes a frame into an event object (the envelope's fields and
    /// `properties`; a null `properties` left out).
    pub fn decode_event(&self, frame: &[u8]) -> Result<serde_json::Map<String, Json>, String> {
        match self.decode(frame)? {
            Json::Object(mut o) => {
                if o.get("properties").is_some_and(Json::is_null) {
                    o.remove("properties");
                }
                Ok(o)
            }
            other => Err(format!(
                "the record decodes to {other}, not a record of the event's fields"
            )),
        }
    }
}

/// The fuzz target's differential check of the direct Avro decoder: false
/// when it decodes a frame of `tenant` to anything but what the
/// `apache_avro` path gives.
#[doc(hidden)]
pub fn avro_text_agrees(registry: &Registry, tenant: &str, frame: &[u8]) -> bool {
    let Ok(reader) = frame_id(frame).and_then(|id| registry.frame_reader(Some(tenant), id)) else {
        return true;
    };
    let Some(p) = &reader.fast else {
        return true;
    };
    let mut out = Vec::new();
    if p.decode_event(&frame[5..], &mut out).is_err() {
        return out.is_empty();
    }
    let fast: Option<Json> = serde_json::from_slice(&out).ok();
    let want = reader.decode_event(frame).ok().map(Json::Object);
    fast.is_some() && fast == want
}

/// The fuzz target's entry to the log reader: the records a log file's
/// bytes hold, or the error naming the damaged line.
#[doc(hidden)]
pub fn parse_log_bytes(bytes: &[u8]) -> Result<usize, String> {
    store::parse(bytes).map(|(records, _)| records.len())
}

/// A hostile length prefix in an Avro record must not allocate more than
/// a request body could hold (the crate's default allows 512 MiB).
fn cap_avro_allocations() {
    apache_avro::util::max_allocation_bytes(16 << 20);
}

fn version_label(v: VersionRef) -> String {
    match v {
        VersionRef::Latest => "latest".into(),
        VersionRef::Number(n) => n.to_string(),
    }
}

fn subject_of<'s>(
    st: &'s State,
    tenant: &str,
    subject: &str,
) -> Result<&'s Subject, RegistryError> {
    st.tenants
        .get(tenant)
        .and_then(|t| t.subjects.get(subject))
        .ok_or_else(|| RegistryError::SubjectNotFound(subject.to_string()))
}

fn check_subject(s: &str) -> Result<(), RegistryError> {
    if s.is_empty() || s.len() > 255 || s.chars().any(char::is_control) {
        return Err(RegistryError::InvalidSubject(format!(
            "subject {:?}: must be 1–255 characters without control characters",
            s.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// Applies one record to the state (at open, and after each change is
/// logged).
fn apply(
    st: &mut State,
    rec: Record,
    parsed: Option<(Parsed, String)>,
) -> Result<(), RegistryError> {
    match rec {
        Record::Register {
            tenant,
            subject,
            version,
            id,
            schema_type,
            schema,
        } => {
            if let std::collections::hash_map::Entry::Vacant(slot) = st.schemas.entry(id) {
                let (parsed, canon) = match parsed {
                    Some(p) => p,
                    None => {
                        let (p, _, canon) = parse_schema(schema_type, &schema)?;
                        (p, canon)
                    }
                };
                // Logged compacted: the text as answered.
                slot.insert(Arc::new(Schema {
                    id,
                    tenant: tenant.clone(),
                    schema_type,
                    text: schema,
                    parsed,
                    program: std::sync::OnceLock::new(),
                }));
                st.tenants
                    .entry(tenant.clone())
                    .or_default()
                    .ids
                    .insert((schema_type, canon), id);
            }
            st.next_id = st.next_id.max(id + 1);
            let s = st
                .tenants
                .entry(tenant)
                .or_default()
                .subjects
                .entry(subject)
                .or_default();
            s.versions.push(Version {
                version,
                id,
                deleted: false,
            });
        }
        Record::Delete {
            tenant,
            subject,
            version,
            permanent,
        } => {
            let t = st
                .tenants
                .get_mut(&tenant)
                .ok_or_else(|| RegistryError::SubjectNotFound(subject.clone()))?;
            let s = t
                .subjects
                .get_mut(&subject)
                .ok_or_else(|| RegistryError::SubjectNotFound(subject.clone()))?;
            if permanent {
                s.versions.retain(|v| v.version != version);
                if s.versions.is_empty() {
                    t.subjects.remove(&subject);
                }
            } else if let Some(v) = s.versions.iter_mut().find(|v| v.version == version) {
                v.deleted = true;
            }
        }
        Record::Config {
            tenant,
            subject,
            level,
        } => {
            let t = st.tenants.entry(tenant).or_default();
            match subject {
                None => t.level = level,
                Some(s) => {
                    let sub = t.subjects.entry(s.clone()).or_default();
                    sub.level = level;
                    if sub.versions.is_empty() && level.is_none() {
                        t.subjects.remove(&s);
                    }
                }
            }
        }
    }
    Ok(())
}

/// A change asked of the registry, as data: in Kafka mode every node
/// applies the same proposals in the order of one topic partition, so
/// every node's registry (ids, versions, rules) is the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Proposal {
    Register {
        tenant: String,
        subject: String,
        schema_type: SchemaType,
        schema: String,
    },
    DeleteSubject {
        tenant: String,
        subject: String,
        permanent: bool,
    },
    DeleteVersion {
        tenant: String,
        subject: String,
        /// A number, or `latest`.
        version: String,
        permanent: bool,
    },
    SetLevel {
        tenant: String,
        subject: Option<String>,
        level: Option<Level>,
    },
}

/// What a [`Proposal`] did.
#[derive(Debug, Clone)]
pub enum Outcome {
    Registered(Registered),
    /// Versions deleted.
    Deleted(Vec<u32>),
    /// The rule before the change.
    Level(Level),
}

impl Proposal {
    /// Applies the proposal (the same on every node given the same state).
    pub fn apply(&self, r: &Registry) -> Result<Outcome, RegistryError> {
        match self {
            Proposal::Register {
                tenant,
                subject,
                schema_type,
                schema,
            } => r
                .register(tenant, subject, *schema_type, schema)
                .map(Outcome::Registered),
            Proposal::DeleteSubject {
                tenant,
                subject,
                permanent,
            } => r
                .delete_subject(tenant, subject, *permanent)
                .map(Outcome::Deleted),
            Proposal::DeleteVersion {
                tenant,
                subject,
                version,
                permanent,
            } => r
                .delete_version(tenant, subject, VersionRef::parse(version)?, *permanent)
                .map(|v| Outcome::Deleted(vec![v])),
            Proposal::SetLevel {
                tenant,
                subject,
                level,
            } => r
                .set_level(tenant, subject.as_deref(), *level)
                .map(Outcome::Level),
        }
    }
}

impl tally_types::schema::PropsCheck for Registry {
    fn checker(
        &self,
        tenant: &str,
        event_type: &str,
        version: Option<u32>,
    ) -> Result<Option<Arc<dyn tally_types::schema::PropsChecker>>, String> {
        Ok(self
            .event_checker(tenant, event_type, version)?
            .map(|c| Arc::new(c) as Arc<dyn tally_types::schema::PropsChecker>))
    }
}

/// One event type's schema at one version, as ingest checks events of the
/// type against it.
pub struct EventChecker {
    tenant: String,
    event_type: String,
    version: u32,
    schema: Arc<Schema>,
}

impl EventChecker {
    fn check_props(&self, props: &[(Cow<'_, str>, &RawValue)]) -> Result<(), String> {
        let whose = || {
            format!(
                "schema of event type {:?}, version {}, tenant {:?}; send a matching value or register a new version",
                self.event_type, self.version, self.tenant
            )
        };
        match &self.schema.parsed {
            Parsed::Avro(_, node) => node.check_props(props).map_err(|m| {
                format!(
                    "properties{}: expected {}, got {} ({})",
                    m.at,
                    m.expected,
                    m.got,
                    whose()
                )
            }),
            Parsed::Json(validator, _) => {
                let mut obj = serde_json::Map::with_capacity(props.len());
                for (k, raw) in props {
                    let val: Json = serde_json::from_str(raw.get()).unwrap_or(Json::Null);
                    obj.insert(k.to_string(), val);
                }
                json::validate(validator, &Json::Object(obj))
                    .map_err(|e| format!("{e} ({})", whose()))
            }
        }
    }
}

impl tally_types::schema::PropsChecker for EventChecker {
    fn check(&self, props: &[(Cow<'_, str>, &RawValue)]) -> Result<(), String> {
        self.check_props(props)
    }

    fn version(&self) -> u32 {
        self.version
    }
}

/// Formats one break for a registration: `backward` — the new schema
/// reads data of `version`; else `version`'s readers read the new data.
fn describe(b: &Break, backward: bool, version: u32, level: Level) -> String {
    let l = level.as_str();
    let at = |p: &str| {
        if p.is_empty() {
            "the schema".to_string()
        } else {
            format!("field `{p}`")
        }
    };
    let f = at(&b.path);
    match (&b.what, backward) {
        (BreakKind::MissingNoDefault, true) => format!(
            "{f} was added without a default: data written with version {version} has no `{}` ({l}); give it a default",
            b.path
        ),
        (BreakKind::MissingNoDefault, false) => format!(
            "{f} was removed, but version {version} has no default for it, so its readers cannot read new data ({l}); give it a default in a version first, or keep it"
        ),
        (BreakKind::Type { writer, reader }, true) => format!(
            "{f} changed type: {reader} cannot read the {writer} written with version {version} ({l}); only widenings are compatible (int → long → float → double, string ↔ bytes, a type into a union holding it)"
        ),
        (BreakKind::Type { writer, reader }, false) => format!(
            "{f} changed type from {reader} (version {version}) to {writer}, which readers on version {version} cannot read ({l}); only widenings of the old type are compatible"
        ),
        (BreakKind::Symbol(s), true) => format!(
            "{f}: symbol {s} of version {version} is gone ({l}); keep it or give the enum a default"
        ),
        (BreakKind::Symbol(s), false) => format!(
            "{f}: symbol {s} is new and readers on version {version} do not know it ({l}); give the enum a default in a version first"
        ),
        (BreakKind::Name { writer, reader }, _) => format!(
            "{f}: named type {writer} became {reader} ({l}, against version {version}); keep the name or add the old one as an alias"
        ),
        (BreakKind::Size { writer, reader }, _) => {
            format!("{f}: fixed size {writer} became {reader} ({l}, against version {version})")
        }
    }
}

/// One property a schema declares (Avro record field or JSON Schema
/// property), as SQL columns see it.
struct PropertyDef<'a> {
    name: &'a str,
    ty: Option<tally_types::schema::PropType>,
    aliases: &'a [String],
    default: Option<&'a Json>,
}

/// The properties of a properties schema (an Avro record without a
/// `properties` field — a whole event's envelope is not one — or a JSON
/// Schema object).
fn properties_of(parsed: &Parsed) -> Vec<PropertyDef<'_>> {
    use tally_types::schema::PropType;
    match parsed {
        Parsed::Avro(apache_avro::Schema::Record(r), _)
            if !r.fields.iter().any(|f| f.name == "properties") =>
        {
            r.fields
                .iter()
                .map(|f| PropertyDef {
                    name: &f.name,
                    ty: avro::prop_type(&f.schema),
                    aliases: &f.aliases,
                    default: f.default.as_ref(),
                })
                .collect()
        }
        Parsed::Json(_, doc) => doc
            .get("properties")
            .and_then(Json::as_object)
            .into_iter()
            .flatten()
            .map(|(name, p)| PropertyDef {
                name,
                ty: match p.get("type").and_then(Json::as_str) {
                    Some("string") => Some(PropType::String),
                    Some("integer") => Some(PropType::Int),
                    Some("number") => Some(PropType::Float),
                    Some("boolean") => Some(PropType::Bool),
                    _ => None,
                },
                aliases: &[],
                default: p.get("default"),
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
