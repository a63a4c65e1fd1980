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
//! Each route declares what it needs where it is registered
//! ([`Routes::add`] takes an [`Access`]; there is no other way to add one):
//! the outer layer only establishes who presents which key (401 for an
//! unknown one), the route's own layer checks its [`Access`] (401/403) and
//! only then hands the handler a [`Caller`]. A handler reached without that
//! check has no `Caller` and refuses the request.
//!
//! CORS (`auth.cors-origins`, default none) is tower-http's `CorsLayer`
//! around everything, so a web app's pages can send events with their key
//! only where configured; the live WebSocket checks `Origin` itself.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use tally_ingest::Tenancy;
use tally_types::{DEFAULT_TENANT, valid_tenant};

use crate::http::{ApiError, one, query_pairs};
pub use tally_runtime::keys::{Key, Keys, Scope, digest, to_hex};

/// The CORS layer for `auth.cors-origins` (None: no origin configured,
/// so no browser page elsewhere may call the API). Preflights are
/// answered by it, before any key is asked for; keys travel in headers,
/// never cookies, so no credentials mode is offered.
pub(crate) fn cors_layer(keys: &Keys) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if keys.cors_origins().is_empty() {
        return None;
    }
    let origins = if keys.cors_origins().iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            keys.cors_origins()
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                header::HeaderName::from_static("x-api-key"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::HeaderName::from_static("x-tally-cache"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Whether a browser page of `origin` may open the live WebSocket of a
/// server reached as `host`: its own pages, and `auth.cors-origins`.
pub(crate) fn ws_origin_allowed(keys: &Keys, origin: &str, host: Option<&str>) -> bool {
    let same = host.is_some_and(|h| {
        origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(h))
    });
    same || keys.cors_origins().iter().any(|o| o == "*" || o == origin)
}

/// What a route needs, declared with the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key (the dashboard page, health checks).
    Public,
    /// Prometheus: no key unless `auth.public-metrics = false` (then admin).
    Metrics,
    /// A key with this scope (or admin).
    Needs(Scope),
}

/// Who presented which key, as the outer layer found it (None: no key).
#[derive(Debug, Clone)]
struct Presented(Option<Key>);

/// A router whose every route names its [`Access`].
pub(crate) struct Routes<S> {
    router: axum::Router<S>,
    keys: Arc<Keys>,
    /// Every route added: path and access (what `/api/v1/openapi.json`
    /// describes).
    recorded: Vec<(String, Access)>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub(crate) fn new(keys: Arc<Keys>) -> Self {
        Routes {
            router: axum::Router::new(),
            keys,
            recorded: Vec::new(),
        }
    }

    /// Adds `route` at `path`, behind the check of `access`.
    pub(crate) fn add(
        mut self,
        path: &str,
        access: Access,
        route: axum::routing::MethodRouter<S>,
    ) -> Self {
        let keys = self.keys.clone();
        let route = route.route_layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let keys = keys.clone();
                async move { check(&keys, access, req, next).await }
            },
        ));
        self.router = self.router.route(path, route);
        self.recorded.push((path.to_string(), access));
        self
    }

    /// [`Routes::add`] for each of `paths`.
    pub(crate) fn add_all(
        mut self,
        paths: &[&str],
        access: Access,
        route: axum::routing::MethodRouter<S>,
    ) -> Self {
        for p in paths {
            self = self.add(p, access, route.clone());
        }
        self
    }

    /// The router, with the outer layer (CORS, keys) around every route.
    pub(crate) fn finish(self) -> axum::Router<S> {
        crate::openapi::remember(self.recorded);
        let cors = cors_layer(&self.keys);
        let router = self
            .router
            .fallback(|| async {
                ApiError::NotFound("no such endpoint; see the API reference".into())
            })
            .layer(axum::middleware::from_fn_with_state(self.keys, layer));
        match cors {
            Some(c) => router.layer(c),
            None => router,
        }
    }
}

/// The route's own check: its [`Access`] against the key presented.
async fn check(keys: &Keys, access: Access, mut req: Request, next: Next) -> Response {
    let presented = req
        .extensions()
        .get::<Presented>()
        .cloned()
        .and_then(|p| p.0);
    let need = match access {
        Access::Public => None,
        Access::Metrics if keys.public_metrics() => None,
        Access::Metrics => Some(Scope::Admin),
        Access::Needs(s) => Some(s),
    };
    let caller = match (keys.keyed(), presented, need) {
        (false, _, _) => Caller::Open,
        (true, Some(k), Some(need)) => {
            if !k.allows(need) {
                tracing::debug!(key = %k.name(), path = %req.uri().path(), "scope refused");
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
            Caller::Key(k)
        }
        (true, Some(k), None) => Caller::Key(k),
        (true, None, None) => Caller::Open,
        (true, None, Some(_)) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "missing API key: send Authorization: Bearer <key>".into(),
            );
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
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
            Caller::Key(k) => Tenancy::Keyed(k.tenant()),
        }
    }

    /// The key's tenant (None in open mode: any tenant).
    pub fn key_tenant(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Key(k) => Some(k.tenant()),
        }
    }

    /// A tenant the request names, checked against the key.
    fn check(&self, named: &str) -> Result<String, ApiError> {
        match self {
            Caller::Key(k) if k.tenant() != named => Err(ApiError::Status(
                StatusCode::FORBIDDEN,
                format!(
                    "tenant: this API key belongs to tenant {:?} and cannot reach {named:?}; drop ?tenant= or use that tenant's key",
                    k.tenant()
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

    /// The caller the route's access check established. A handler
    /// reached without one (a route registered without an [`Access`]) has
    /// none: refused rather than treated as open.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::Status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "this route declares no access; the request was refused".into(),
            )
        })
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
/// HTTP basic auth (the key as the password, or as the user name with an
/// empty password: how Segment's SDKs send a write key), `X-Api-Key`, or
/// (the live WebSocket only) `?access_token=`.
fn presented(req: &Request) -> Result<Option<[u8; 32]>, String> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
        let v = v
            .to_str()
            .map_err(|_| "Authorization: not ASCII".to_string())?;
        let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return basic_secret(rest.trim()).map(|k| Some(digest(&k)));
        }
        if !scheme.eq_ignore_ascii_case("bearer") || rest.trim().is_empty() {
            return Err(
                "Authorization: expected \"Bearer <key>\" (or basic auth with the key as the password)"
                    .to_string(),
            );
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

/// The key in HTTP basic credentials: the password, or the user name when
/// the password is empty.
fn basic_secret(b64: &str) -> Result<String, String> {
    use base64::Engine as _;
    let bad = || "Authorization: basic credentials are not base64 of user:password".to_string();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (user, pass) = text.split_once(':').unwrap_or((&text, ""));
    let key = if pass.is_empty() { user } else { pass };
    if key.trim().is_empty() {
        return Err("Authorization: basic credentials carry no key (give it as the user name or the password)".into());
    }
    Ok(key.trim().to_string())
}

/// The layer in front of every route: establishes which key a request
/// presents and refuses a malformed or unknown one (401); each route's own
/// check then applies its [`Access`].
async fn layer(State(keys): State<Arc<Keys>>, req: Request, next: Next) -> Response {
    authorize(&keys, req, next).await
}

async fn authorize(keys: &Keys, mut req: Request, next: Next) -> Response {
    if !keys.keyed() {
        req.extensions_mut().insert(Presented(None));
        return next.run(req).await;
    }
    let presented = match presented(&req) {
        Ok(d) => d,
        Err(msg) => return refuse(StatusCode::UNAUTHORIZED, msg),
    };
    let key = match presented.map(|d| keys.get(&d)) {
        Some(Some(k)) => Some(k.clone()),
        Some(None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unknown API key; check the key or ask an admin for one".into(),
            );
        }
        None => None,
    };
    req.extensions_mut().insert(Presented(key));
    next.run(req).await
}
