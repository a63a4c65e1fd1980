//! The Confluent Schema Registry REST API under `/api/v1/registry` (the
//! `default` tenant in open mode, `/api/v1/registry/tenants/<tenant>` for
//! another; in keyed mode the key's tenant, sent as Bearer or as the
//! password of HTTP basic auth as Confluent's clients do), and Avro
//! ingest: `POST /api/v1/events` with `Content-Type:
//! application/vnd.confluent.avro`.
//!
//! Answers and errors have Confluent's shapes (`{"error_code",
//! "message"}`, content type `application/vnd.schemaregistry.v1+json`),
//! so `SchemaRegistryClient` and the Avro serializers work unchanged.
//! The model is `tally_registry`; this is its HTTP adapter.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tally_registry::{
    Level, Outcome, Proposal, RegistryError, SchemaType, SubjectVersion, VersionRef,
};
use tally_runtime::pipeline::Shared;

use crate::auth::{Access, Caller, Routes, Scope};
use crate::http::{
    ApiError, AppState, default_tenant, ingest_mapped, ingest_response, one, query_pairs,
    read_ingest_body, tenancy,
};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// An answer of the registry API.
struct Reply(StatusCode, Json);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut r = (self.0, self.1.to_string()).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        r
    }
}

fn ok(v: Json) -> Result<Reply, Reply> {
    Ok(Reply(StatusCode::OK, v))
}

/// A registry error in Confluent's shape (`error` too, as every Tally
/// error has it).
fn fail(e: RegistryError) -> Reply {
    let msg = e.to_string();
    Reply(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"error_code": e.code(), "message": msg, "error": msg}),
    )
}

fn api_fail(e: ApiError) -> Reply {
    let (status, msg) = match e {
        ApiError::Status(s, m) => (s, m),
        ApiError::BadRequest(m) | ApiError::Field(_, m) => (StatusCode::BAD_REQUEST, m),
        ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
        other => (StatusCode::INTERNAL_SERVER_ERROR, format!("{other:?}")),
    };
    Reply(
        status,
        json!({"error_code": status.as_u16() as u32 * 100, "message": msg, "error": msg}),
    )
}

/// The path's parameters, the tenant resolved against the caller.
struct Req {
    tenant: String,
    params: HashMap<String, String>,
    pairs: Vec<(String, String)>,
}

impl Req {
    fn new(
        caller: &Caller,
        params: HashMap<String, String>,
        q: Option<String>,
    ) -> Result<Req, Reply> {
        let mut pairs = query_pairs(&q);
        // The tenant of the path, checked as `?tenant=` is everywhere.
        pairs.retain(|(k, _)| k != "tenant");
        if let Some(t) = params.get("tenant") {
            pairs.push(("tenant".into(), t.clone()));
        }
        let tenant = caller.tenant(&pairs).map_err(api_fail)?;
        Ok(Req {
            tenant,
            params,
            pairs,
        })
    }

    fn subject(&self) -> &str {
        self.params.get("subject").map_or("", String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        one(&self.pairs, key).is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    fn version(&self) -> Result<VersionRef, Reply> {
        VersionRef::parse(self.params.get("version").map_or("", String::as_str)).map_err(fail)
    }

    fn id(&self) -> Result<u32, Reply> {
        let raw = self.params.get("id").map_or("", String::as_str);
        raw.parse::<u32>().map_err(|_| {
            fail(RegistryError::SchemaNotFound(format!(
                "Schema {raw} not found: an id is a positive integer"
            )))
        })
    }
}

/// A schema sent to register, look up or check.
#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Json>,
}

fn schema_body(body: &Bytes) -> Result<(SchemaType, String), Reply> {
    let b: SchemaBody = serde_json::from_slice(body).map_err(|e| {
        fail(RegistryError::InvalidSchema(format!(
            "the body must be a JSON object with the schema as a string in \"schema\" ({e})"
        )))
    })?;
    if !b.references.is_empty() {
        return Err(fail(RegistryError::InvalidSchema(
            "schema references are not supported by Tally's registry; inline the referenced types"
                .into(),
        )));
    }
    let t = SchemaType::parse(b.schema_type.as_deref()).map_err(fail)?;
    Ok((t, b.schema))
}

fn with_type(mut v: Json, t: SchemaType) -> Json {
    // Confluent leaves schemaType out for Avro.
    if t != SchemaType::Avro {
        v["schemaType"] = json!(t.as_str());
    }
    v
}

fn version_json(v: &SubjectVersion) -> Json {
    with_type(
        json!({
            "subject": v.subject,
            "version": v.version,
            "id": v.schema.id,
            "schema": v.schema.text,
        }),
        v.schema.schema_type,
    )
}

type P = Path<HashMap<String, String>>;
type R = Result<Reply, Reply>;

/// One registry operation: the request (tenant resolved) and its body.
type Op = fn(&Shared, &Req, &Bytes) -> R;

type Answer = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// The axum handler [`handler`] makes.
trait Handle:
    Fn(State<AppState>, Caller, P, RawQuery, Bytes) -> Answer + Clone + Send + Sync + 'static
{
}

impl<F> Handle for F where
    F: Fn(State<AppState>, Caller, P, RawQuery, Bytes) -> Answer + Clone + Send + Sync + 'static
{
}

/// A handler running `op` for the caller; `blocking` for operations that
/// write (and sync) the registry's log, off the async threads.
fn handler(op: Op, blocking: bool) -> impl Handle {
    move |State(s): State<AppState>, c: Caller, Path(p): P, RawQuery(q): RawQuery, body: Bytes| {
        Box::pin(async move {
            let shared = s.shared.clone();
            let work = move || -> R {
                let r = Req::new(&c, p, q)?;
                op(&shared, &r, &body)
            };
            let out = if blocking {
                tokio::task::spawn_blocking(work)
                    .await
                    .unwrap_or_else(|e| Err(fail(RegistryError::Storage(e.to_string()))))
            } else {
                work()
            };
            out.unwrap_or_else(|e| e)
        })
    }
}

fn root(_: &Shared, _: &Req, _: &Bytes) -> R {
    ok(json!({}))
}

fn subjects(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let mut list = sh.registry.subjects(&r.tenant, r.flag("deleted"));
    if let Some(prefix) = one(&r.pairs, "subjectPrefix") {
        list.retain(|x| x.starts_with(prefix));
    }
    ok(json!(list))
}

fn versions(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let v = sh
        .registry
        .versions(&r.tenant, r.subject(), r.flag("deleted"))
        .map_err(fail)?;
    ok(json!(v))
}

fn register(sh: &Shared, r: &Req, body: &Bytes) -> R {
    let (t, text) = schema_body(body)?;
    let done = match change(
        sh,
        Proposal::Register {
            tenant: r.tenant.clone(),
            subject: r.subject().to_string(),
            schema_type: t,
            schema: text,
        },
    )? {
        Outcome::Registered(done) => done,
        other => return Err(unexpected(other)),
    };
    tracing::info!(tenant = %r.tenant, subject = r.subject(), id = done.id, version = done.version, "schema registered");
    ok(with_type(
        json!({
            "id": done.id,
            "subject": r.subject(),
            "version": done.version,
            "schema": done.schema.text,
        }),
        t,
    ))
}

fn lookup(sh: &Shared, r: &Req, body: &Bytes) -> R {
    let (t, text) = schema_body(body)?;
    let v = sh
        .registry
        .lookup(&r.tenant, r.subject(), t, &text, r.flag("deleted"))
        .map_err(fail)?;
    ok(version_json(&v))
}

fn subject_version(sh: &Shared, r: &Req, deleted: bool) -> Result<SubjectVersion, Reply> {
    sh.registry
        .version(&r.tenant, r.subject(), r.version()?, deleted)
        .map_err(fail)
}

fn version(sh: &Shared, r: &Req, _: &Bytes) -> R {
    ok(version_json(&subject_version(sh, r, r.flag("deleted"))?))
}

fn version_schema(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let v = subject_version(sh, r, r.flag("deleted"))?;
    ok(serde_json::from_str(&v.schema.text).unwrap_or(Json::Null))
}

fn referenced_by(sh: &Shared, r: &Req, _: &Bytes) -> R {
    subject_version(sh, r, true)?;
    // No schema references: nothing refers to anything.
    ok(json!([]))
}

/// Applies a change (through the cluster's registry log in Kafka mode).
fn change(sh: &Shared, p: Proposal) -> Result<Outcome, Reply> {
    sh.registry_change(p).map_err(fail)
}

fn unexpected(o: Outcome) -> Reply {
    fail(RegistryError::Storage(format!(
        "the change answered {o:?}, not what was asked"
    )))
}

fn deleted(o: Outcome) -> Result<Vec<u32>, Reply> {
    match o {
        Outcome::Deleted(v) => Ok(v),
        other => Err(unexpected(other)),
    }
}

fn delete_version(sh: &Shared, r: &Req, _: &Bytes) -> R {
    r.version()?;
    let v = deleted(change(
        sh,
        Proposal::DeleteVersion {
            tenant: r.tenant.clone(),
            subject: r.subject().to_string(),
            version: r.params.get("version").cloned().unwrap_or_default(),
            permanent: r.flag("permanent"),
        },
    )?)?;
    ok(json!(v.first()))
}

fn delete_subject(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let v = deleted(change(
        sh,
        Proposal::DeleteSubject {
            tenant: r.tenant.clone(),
            subject: r.subject().to_string(),
            permanent: r.flag("permanent"),
        },
    )?)?;
    ok(json!(v))
}

fn set_level(sh: &Shared, r: &Req, level: Option<Level>) -> Result<Level, Reply> {
    match change(
        sh,
        Proposal::SetLevel {
            tenant: r.tenant.clone(),
            subject: r.params.get("subject").cloned(),
            level,
        },
    )? {
        Outcome::Level(l) => Ok(l),
        other => Err(unexpected(other)),
    }
}

fn schema_by_id(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let sc = sh.registry.by_id(&r.tenant, r.id()?).map_err(fail)?;
    ok(with_type(json!({"schema": sc.text}), sc.schema_type))
}

fn schema_text_by_id(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let sc = sh.registry.by_id(&r.tenant, r.id()?).map_err(fail)?;
    ok(serde_json::from_str(&sc.text).unwrap_or(Json::Null))
}

fn id_versions(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let v = sh
        .registry
        .id_versions(&r.tenant, r.id()?, r.flag("deleted"))
        .map_err(fail)?;
    ok(Json::Array(
        v.into_iter()
            .map(|(subject, version)| json!({"subject": subject, "version": version}))
            .collect(),
    ))
}

fn id_subjects(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let v = sh
        .registry
        .id_versions(&r.tenant, r.id()?, r.flag("deleted"))
        .map_err(fail)?;
    let mut subjects: Vec<String> = v.into_iter().map(|(s, _)| s).collect();
    subjects.dedup();
    ok(json!(subjects))
}

fn types(_: &Shared, _: &Req, _: &Bytes) -> R {
    ok(json!(["JSON", "AVRO"]))
}

fn contexts(_: &Shared, _: &Req, _: &Bytes) -> R {
    ok(json!(["."]))
}

fn compatibility(sh: &Shared, r: &Req, body: &Bytes) -> R {
    let (t, text) = schema_body(body)?;
    let version = match r.params.get("version") {
        Some(_) => Some(r.version()?),
        None => None,
    };
    let messages = sh
        .registry
        .compatibility(&r.tenant, r.subject(), version, t, &text)
        .map_err(fail)?;
    ok(json!({"is_compatible": messages.is_empty(), "messages": messages}))
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: Option<String>,
    #[serde(rename = "compatibilityLevel")]
    compatibility_level: Option<String>,
}

fn get_config(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let subject = r.params.get("subject").map(String::as_str);
    let l = sh
        .registry
        .level(&r.tenant, subject, r.flag("defaultToGlobal"))
        .map_err(fail)?;
    ok(json!({"compatibilityLevel": l.as_str()}))
}

fn put_config(sh: &Shared, r: &Req, body: &Bytes) -> R {
    let bad = |why: String| {
        fail(RegistryError::InvalidLevel(format!(
            "the body must be {{\"compatibility\": \"<level>\"}}{why}"
        )))
    };
    let b: ConfigBody = serde_json::from_slice(body).map_err(|e| bad(format!(" ({e})")))?;
    let text = b
        .compatibility
        .or(b.compatibility_level)
        .ok_or_else(|| bad(String::new()))?;
    let level = Level::parse(&text).map_err(fail)?;
    set_level(sh, r, Some(level))?;
    ok(json!({"compatibility": level.as_str()}))
}

fn delete_config(sh: &Shared, r: &Req, _: &Bytes) -> R {
    let before = set_level(sh, r, None)?;
    ok(json!({"compatibilityLevel": before.as_str()}))
}

fn get_mode(_: &Shared, _: &Req, _: &Bytes) -> R {
    ok(json!({"mode": "READWRITE"}))
}

fn put_mode(_: &Shared, _: &Req, body: &Bytes) -> R {
    let mode = serde_json::from_slice::<Json>(body)
        .ok()
        .and_then(|v| v.get("mode").and_then(Json::as_str).map(str::to_string));
    match mode.as_deref() {
        Some(m) if m.eq_ignore_ascii_case("READWRITE") => ok(json!({"mode": "READWRITE"})),
        other => Err(fail(RegistryError::InvalidMode(format!(
            "Invalid mode {:?}: Tally's registry is always READWRITE",
            other.unwrap_or("")
        )))),
    }
}

/// Adds the registry's routes under `/api/v1/registry` and
/// `/api/v1/registry/tenants/{tenant}`.
pub(crate) fn routes(mut r: Routes<AppState>) -> Routes<AppState> {
    let read = Access::Needs(Scope::Read);
    let write = Access::Needs(Scope::Ingest);
    let admin = Access::Needs(Scope::Admin);
    let g = |op: Op| get(handler(op, false));
    let table: Vec<(&str, Access, MethodRouter<AppState>)> = vec![
        ("", read, g(root)),
        ("/subjects", read, g(subjects)),
        ("/subjects/{subject}", write, post(handler(lookup, false))),
        (
            "/subjects/{subject}",
            admin,
            delete(handler(delete_subject, true)),
        ),
        ("/subjects/{subject}/versions", read, g(versions)),
        (
            "/subjects/{subject}/versions",
            write,
            post(handler(register, true)),
        ),
        ("/subjects/{subject}/versions/{version}", read, g(version)),
        (
            "/subjects/{subject}/versions/{version}",
            admin,
            delete(handler(delete_version, true)),
        ),
        (
            "/subjects/{subject}/versions/{version}/schema",
            read,
            g(version_schema),
        ),
        (
            "/subjects/{subject}/versions/{version}/referencedby",
            read,
            g(referenced_by),
        ),
        ("/schemas/ids/{id}", read, g(schema_by_id)),
        ("/schemas/ids/{id}/schema", read, g(schema_text_by_id)),
        ("/schemas/ids/{id}/versions", read, g(id_versions)),
        ("/schemas/ids/{id}/subjects", read, g(id_subjects)),
        ("/schemas/types", read, g(types)),
        ("/contexts", read, g(contexts)),
        (
            "/compatibility/subjects/{subject}/versions",
            write,
            post(handler(compatibility, false)),
        ),
        (
            "/compatibility/subjects/{subject}/versions/{version}",
            write,
            post(handler(compatibility, false)),
        ),
        ("/config", read, g(get_config)),
        (
            "/config",
            admin,
            put(handler(put_config, true)).delete(handler(delete_config, true)),
        ),
        ("/config/{subject}", read, g(get_config)),
        (
            "/config/{subject}",
            admin,
            put(handler(put_config, true)).delete(handler(delete_config, true)),
        ),
        ("/mode", read, g(get_mode)),
        ("/mode", admin, put(handler(put_mode, false))),
        ("/mode/{subject}", read, g(get_mode)),
    ];
    for prefix in ["/api/v1/registry", "/api/v1/registry/tenants/{tenant}"] {
        for (path, access, route) in &table {
            r = r.add(&format!("{prefix}{path}"), *access, route.clone());
        }
    }
    r
}

/// Whether a content type is Confluent-framed Avro.
pub(crate) fn is_avro(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/vnd.confluent.avro")
        })
}

/// The frames of an Avro body: the whole body when it starts with the
/// magic byte 0 (one record), else a sequence of records each preceded by
/// its length as an Avro `long` (zig-zag varint) — a length is never 0,
/// so its first byte never is either.
fn frames(body: &[u8]) -> Result<Vec<&[u8]>, String> {
    if body.first() == Some(&0) {
        return Ok(vec![body]);
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let (mut n, mut shift) = (0u64, 0u32);
        loop {
            let Some(&b) = body.get(at) else {
                return Err(format!(
                    "byte {at}: the body ends inside a record's length prefix"
                ));
            };
            at += 1;
            if shift > 63 {
                return Err(format!("byte {at}: a length prefix longer than 10 bytes"));
            }
            n |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let len = (n >> 1) as i64 ^ -((n & 1) as i64);
        if len <= 0 || len as u64 > (body.len() - at) as u64 {
            return Err(format!(
                "record {}: length prefix {len} where 1 to {} bytes remain",
                out.len(),
                body.len() - at
            ));
        }
        out.push(&body[at..at + len as usize]);
        at += len as usize;
    }
    Ok(out)
}

/// `POST /api/v1/events` with Confluent-framed Avro: each record is
/// decoded with its writer's schema (resolved to the latest version of
/// its subject) into an event object, and the events go through the
/// JSON ingest path (checks, dedupe, quotas, the durable ack). Indexes
/// in `errors` are the records'.
pub(crate) async fn ingest_avro(
    s: AppState,
    caller: Caller,
    q: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let pairs = query_pairs(&q);
    let default = default_tenant(&caller, &pairs)?;
    let tenancy = tenancy(&caller, &default);
    let body = read_ingest_body(&s, &headers, body).await?;
    // Whose registry the schema ids belong to.
    let owner = caller.tenant(&pairs)?;
    let frames = frames(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "body: {e}; send one Confluent-framed record (magic byte 0, 4-byte schema id, Avro binary), or records each preceded by its length as an Avro long"
        ))
    })?;
    let mut lines = Vec::with_capacity(body.len() * 2);
    let mut index_of = Vec::with_capacity(frames.len());
    let mut undecoded = Vec::new();
    // The schemas of each id, looked up once per body.
    let mut readers: HashMap<u32, Result<tally_registry::FrameReader, String>> = HashMap::new();
    for (i, f) in frames.iter().enumerate() {
        let at = lines.len();
        let ev = tally_registry::frame_id(f).and_then(|id| {
            readers
                .entry(id)
                .or_insert_with(|| s.shared.registry.frame_reader(Some(&owner), id))
                .as_ref()
                .map_err(Clone::clone)?
                .decode_event_into(f, &mut lines)
        });
        match ev {
            Ok(()) => {
                lines.push(b'\n');
                index_of.push(i);
            }
            Err(why) => {
                lines.truncate(at);
                undecoded.push((i, undecodable(&owner, f, why)));
            }
        }
    }
    let (status, answer) =
        ingest_mapped(&s, &pairs, tenancy, lines, index_of, undecoded, started).await?;
    Ok(ingest_response(status, answer))
}

/// A frame that made no event, for the answer and the malformed DLQ (its
/// bytes as base64, the first 3 KiB).
fn undecodable(tenant: &str, frame: &[u8], why: String) -> tally_ingest::Rejection {
    use base64::Engine as _;
    let kept = &frame[..frame.len().min(3072)];
    tally_ingest::Rejection {
        index: 0,
        error: format!("avro: {why}"),
        tenant: tenant.to_string(),
        raw: format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(kept)
        ),
        is_object: false,
    }
}

#[cfg(test)]
mod tests {
    use super::frames;

    #[test]
    fn one_frame_or_length_prefixed_frames() {
        let one = [0u8, 0, 0, 0, 1, 2, 4];
        assert_eq!(frames(&one).unwrap(), vec![&one[..]]);
        // Two frames of 6 and 5 bytes: prefixes 12 and 10 (zig-zag).
        let body = [12u8, 0, 0, 0, 0, 1, 9, 10, 0, 0, 0, 0, 1];
        let f = frames(&body).unwrap();
        assert_eq!(f, vec![&body[1..7], &body[8..13]]);
        assert!(
            frames(&[12u8, 0, 0])
                .unwrap_err()
                .contains("length prefix 6")
        );
        assert!(frames(&[0x80u8]).unwrap_err().contains("ends inside"));
        assert!(frames(&[1u8]).unwrap_err().contains("length prefix -1"));
    }
}
