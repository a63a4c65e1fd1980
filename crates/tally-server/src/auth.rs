//! API keys, scopes and the tenant of a request (the "Tenants and keys"
//! section of API.md).
//!
//! With no key configured the server is in *open mode*: the tenant of an
//! event is its `tenant` field and a query names its tenant with
//! `?tenant=`. With keys it is in *keyed mode*: every API request carries
//! `Authorization: Bearer <key>` (the dashboard's WebSocket, which a browser
//! cannot give headers, may send `?access_token=` instead), the key's tenant
//! is the request's tenant, and a request naming another tenant is refused
//! with 403 before any handler runs its query. Keys are kept only as their
//! SHA-256, so the lookup compares digests, never the secret itself.
//!
//! Scopes, by route: `ingest` for `POST /api/v1/events`; `read` for the
//! metrics, SQL, sessions, DLQ listing, alert listing and the live feed;
//! `admin` for changes (alert rules, silences, DLQ replay), `/api/v1/status`
//! and — unless `auth.public-metrics` — `/metrics`. `admin` allows
//! everything. `/`, `/healthz` and `/readyz` need no key.
//!
//! The same layer answers CORS preflights for `auth.cors-origins` (default
//! any origin), so a web app's pages can send events with their key.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use tally_ingest::Tenancy;
use tally_types::{DEFAULT_TENANT, valid_tenant};

use crate::config::{AuthSection, ConfigError};
use crate::http::{ApiError, one, query_pairs};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

impl Scope {
    const ALL: [Scope; 3] = [Scope::Ingest, Scope::Read, Scope::Admin];

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Ingest => 1,
            Scope::Read => 2,
            Scope::Admin => 4,
        }
    }
}

/// A configured key, found by the SHA-256 of its secret.
#[derive(Debug, Clone)]
pub struct Key {
    tenant: Arc<str>,
    scopes: u8,
    name: Arc<str>,
}

/// The configured keys; empty means open mode.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_digest: HashMap<[u8; 32], Key>,
    public_metrics: bool,
    cors_origins: Vec<String>,
}

/// SHA-256 of a key's secret.
pub fn digest(secret: &str) -> [u8; 32] {
    let d = Sha256::digest(secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(&d);
    out
}

pub fn to_hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn from_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Keys {
    /// Validates `[auth]`: every key has a secret or a digest (not both), a
    /// valid tenant and known scopes, and no two keys are the same.
    pub fn from_config(a: &AuthSection) -> Result<Keys, ConfigError> {
        let mut by_digest = HashMap::new();
        for (index, k) in a.keys.iter().enumerate() {
            let bad = |msg: String| ConfigError::Key { index, msg };
            let d = match (k.key.is_empty(), k.key_sha256.is_empty()) {
                (false, true) => digest(&k.key),
                (true, false) => from_hex(&k.key_sha256).ok_or_else(|| {
                    bad(format!(
                        "key-sha256 = {:?} is not 64 hex digits; `tally keys new` prints one",
                        k.key_sha256
                    ))
                })?,
                (true, true) => {
                    return Err(bad(
                        "needs key = \"<secret>\" or key-sha256 = \"<hex>\" (`tally keys new` makes one)".into(),
                    ));
                }
                (false, false) => {
                    return Err(bad(
                        "has both key and key-sha256; keep one (key-sha256 keeps the secret out of the file)".into(),
                    ));
                }
            };
            if !valid_tenant(&k.tenant) {
                return Err(bad(format!(
                    "tenant = {:?} is not 1–64 characters of [A-Za-z0-9_.-]",
                    k.tenant
                )));
            }
            if k.scopes.is_empty() {
                return Err(bad(
                    "scopes is empty; give some of \"ingest\", \"read\", \"admin\"".into(),
                ));
            }
            let mut scopes = 0u8;
            for s in &k.scopes {
                scopes |= Scope::parse(s)
                    .ok_or_else(|| {
                        bad(format!(
                            "scope {s:?} is not one of \"ingest\", \"read\", \"admin\""
                        ))
                    })?
                    .bit();
            }
            let name = if k.name.is_empty() {
                format!("key #{index} of {}", k.tenant)
            } else {
                k.name.clone()
            };
            let key = Key {
                tenant: k.tenant.as_str().into(),
                scopes,
                name: name.into(),
            };
            if by_digest.insert(d, key).is_some() {
                return Err(bad(
                    "is the same secret as an earlier key; every key must be distinct".into(),
                ));
            }
        }
        Ok(Keys {
            by_digest,
            public_metrics: a.public_metrics,
            cors_origins: a.cors_origins.clone(),
        })
    }

    pub fn keyed(&self) -> bool {
        !self.by_digest.is_empty()
    }

    /// The `Access-Control-Allow-Origin` for a request from `origin`, if
    /// that origin may call the API.
    fn cors_allow(&self, origin: &str) -> Option<HeaderValue> {
        if self.cors_origins.iter().any(|o| o == "*") {
            Some(HeaderValue::from_static("*"))
        } else if self.cors_origins.iter().any(|o| o == origin) {
            HeaderValue::from_str(origin).ok()
        } else {
            None
        }
    }
}

/// Browser pages of allowed origins may call the API (web apps sending
/// events, dashboards elsewhere): a preflight `OPTIONS` is answered here,
/// before any key is asked for, and every answer names the origin. Keys
/// travel in headers, never cookies, so no credentials mode is offered.
fn cors(keys: &Keys, req: &Request) -> (Option<HeaderValue>, Option<Response>) {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    else {
        return (None, None);
    };
    let Some(allow) = keys.cors_allow(origin) else {
        return (None, None);
    };
    let preflight = *req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !preflight {
        return (Some(allow), None);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, x-api-key, accept"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    (None, Some(r))
}

/// Who is asking: anyone (open mode) or the holder of a key.
#[derive(Debug, Clone)]
pub enum Caller {
    Open,
    Key(Key),
}

impl Caller {
    /// How the ingest parser assigns tenants.
    pub fn tenancy(&self) -> Tenancy<'_> {
        match self {
            Caller::Open => Tenancy::Open,
            Caller::Key(k) => Tenancy::Keyed(&k.tenant),
        }
    }

    /// The key's tenant (None in open mode: any tenant).
    pub fn key_tenant(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Key(k) => Some(&k.tenant),
        }
    }

    /// A tenant the request names, checked against the key.
    fn check(&self, named: &str) -> Result<String, ApiError> {
        match self {
            Caller::Key(k) if *k.tenant != *named => Err(ApiError::Status(
                StatusCode::FORBIDDEN,
                format!(
                    "tenant: this API key belongs to tenant {:?} and cannot reach {named:?}; drop ?tenant= or use that tenant's key",
                    k.tenant
                ),
            )),
            _ => check_tenant(named),
        }
    }

    /// The tenant of a request: `?tenant=` (it must be the key's), else the
    /// key's, else `"default"`.
    pub fn tenant(&self, pairs: &[(String, String)]) -> Result<String, ApiError> {
        match (one(pairs, "tenant"), self.key_tenant()) {
            (Some(t), _) if !t.is_empty() => self.check(t),
            (_, Some(k)) => Ok(k.to_string()),
            (_, None) => Ok(DEFAULT_TENANT.to_string()),
        }
    }

    /// The tenant of a request with a JSON body: `?tenant=` or the body's
    /// `tenant` (they must agree), else as [`Caller::tenant`].
    pub fn tenant_of(&self, pairs: &[(String, String)], body: &Json) -> Result<String, ApiError> {
        match (one(pairs, "tenant"), body.get("tenant")) {
            (_, None | Some(Json::Null)) => self.tenant(pairs),
            (Some(q), Some(Json::String(b))) if !q.is_empty() && q != b => {
                Err(ApiError::BadRequest(format!(
                    "tenant: the query says {q:?} and the body {b:?}; name one"
                )))
            }
            (_, Some(Json::String(b))) => self.check(b),
            (_, Some(v)) => Err(ApiError::BadRequest(format!(
                "tenant: {v} must be a string"
            ))),
        }
    }

    /// The tenant of a request that without `?tenant=` covers every tenant
    /// (open mode) or the key's tenant (keyed mode).
    pub fn tenant_or_all(&self, pairs: &[(String, String)]) -> Result<Option<String>, ApiError> {
        match (one(pairs, "tenant"), self.key_tenant()) {
            (None | Some(""), None) => Ok(None),
            _ => self.tenant(pairs).map(Some),
        }
    }
}

pub(crate) fn check_tenant(t: &str) -> Result<String, ApiError> {
    if !valid_tenant(t) {
        return Err(ApiError::BadRequest(format!(
            "tenant: {t:?} is not 1–64 characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(t.to_string())
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    /// The caller the auth layer established. A route outside that layer
    /// would have none: refused rather than treated as open.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::Status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request did not pass the auth layer".into(),
            )
        })
    }
}

/// The scope a route needs; None: no key needed.
fn required(keys: &Keys, method: &Method, path: &str) -> Option<Scope> {
    match path {
        "/" | "/healthz" | "/readyz" | "/favicon.ico" => None,
        "/metrics" if keys.public_metrics => None,
        "/metrics" | "/api/v1/status" | "/api/v1/dlq/replay" => Some(Scope::Admin),
        "/api/v1/events" => Some(Scope::Ingest),
        p if p.starts_with("/api/v1/alerts") && *method != Method::GET => Some(Scope::Admin),
        _ => Some(Scope::Read),
    }
}

fn refuse(status: StatusCode, msg: String) -> Response {
    let mut r = (status, axum::Json(json!({ "error": msg }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tally\""),
        );
    }
    r
}

/// The digest of the secret a request presents: `Authorization: Bearer`,
/// `X-Api-Key`, or (the live WebSocket only) `?access_token=`.
fn presented(req: &Request) -> Result<Option<[u8; 32]>, String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| "Authorization: not ASCII".to_string())?;
        let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || rest.trim().is_empty() {
            return Err("Authorization: expected \"Bearer <key>\"".to_string());
        }
        return Ok(Some(digest(rest.trim())));
    }
    if let Some(v) = req.headers().get("x-api-key") {
        return Ok(v.to_str().ok().map(|s| digest(s.trim())));
    }
    if req.uri().path() == "/api/v1/live" {
        let pairs = query_pairs(&req.uri().query().map(str::to_string));
        return Ok(one(&pairs, "access_token").map(digest));
    }
    Ok(None)
}

/// The layer in front of every route: answers CORS preflights, establishes
/// the [`Caller`] and refuses a missing key (401), an unknown key (401) or a
/// key without the route's scope (403).
pub(crate) async fn layer(State(keys): State<Arc<Keys>>, req: Request, next: Next) -> Response {
    let (allow, preflight) = cors(&keys, &req);
    if let Some(r) = preflight {
        return r;
    }
    let mut resp = authorize(&keys, req, next).await;
    if let Some(allow) = allow {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after, x-tally-cache"),
        );
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

async fn authorize(keys: &Keys, mut req: Request, next: Next) -> Response {
    if !keys.keyed() {
        req.extensions_mut().insert(Caller::Open);
        return next.run(req).await;
    }
    let need = required(keys, req.method(), req.uri().path());
    let presented = match presented(&req) {
        Ok(d) => d,
        Err(msg) => return refuse(StatusCode::UNAUTHORIZED, msg),
    };
    let caller = match presented.map(|d| keys.by_digest.get(&d)) {
        Some(Some(k)) => Caller::Key(k.clone()),
        Some(None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unknown API key; check the key or ask an admin for one".into(),
            );
        }
        None if need.is_none() => Caller::Open,
        None => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "missing API key: send Authorization: Bearer <key>".into(),
            );
        }
    };
    if let (Some(need), Caller::Key(k)) = (need, &caller) {
        let allowed = k.scopes & (need.bit() | Scope::Admin.bit()) != 0;
        if !allowed {
            tracing::debug!(key = %k.name, path = %req.uri().path(), "scope refused");
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "this API key lacks the {:?} scope that {} {} needs",
                    need.as_str(),
                    req.method(),
                    req.uri().path()
                ),
            );
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}
