//! `GET /api/v1/openapi.json`: an OpenAPI 3.1 description of the routes
//! this server serves. The paths and who may call them come from the
//! router itself (every route is added through `auth::Routes`, which
//! records them); what each method does and takes comes from [`DOCS`]. A
//! route without a description shows as "(not described)", which the HTTP
//! contract test refuses, so the document cannot fall behind the router.

use std::sync::OnceLock;

use serde_json::{Map, Value as Json, json};

use crate::auth::{Access, Scope};

/// The routes as the router was built: path and access.
static ROUTES: OnceLock<Vec<(String, Access)>> = OnceLock::new();

/// Remembers the router's routes (the first router built wins; every
/// server of a process has the same ones).
pub(crate) fn remember(routes: Vec<(String, Access)>) {
    let _ = ROUTES.set(routes);
}

/// A parameter: name, where (`query`, `header`), required, description.
type Param = (&'static str, &'static str, bool, &'static str);

/// Method, path (registry paths relative to `/api/v1/registry`, marked by
/// a leading `~`), summary, parameters.
type Doc = (&'static str, &'static str, &'static str, &'static [Param]);

const TENANT: Param = (
    "tenant",
    "query",
    false,
    "Tenant (open mode; default `default`). With a key, the key's tenant.",
);
const RANGE: [Param; 2] = [
    (
        "start",
        "query",
        false,
        "Inclusive start: RFC 3339, a date, epoch ms, or relative (`now-1h`).",
    ),
    ("end", "query", false, "Exclusive end, as `start`."),
];

pub(crate) const DOCS: &[Doc] = &[
    ("get", "/", "The live dashboard (HTML).", &[]),
    ("get", "/healthz", "Liveness: `ok`.", &[]),
    (
        "get",
        "/readyz",
        "Readiness: 200 once recovery is done and storage is writable, else 503.",
        &[],
    ),
    (
        "get",
        "/metrics",
        "Prometheus text exposition of the node's metrics.",
        &[],
    ),
    (
        "post",
        "/api/v1/events",
        "Ingest events: one JSON object, a JSON array or NDJSON (gzip allowed), or Confluent-framed Avro. 200 once durable, with accepted/rejected counts and per-event errors.",
        &[
            TENANT,
            (
                "backfill",
                "query",
                false,
                "`true`: history, judged by the tenant's backfill clock.",
            ),
        ],
    ),
    (
        "get",
        "/api/v1/metrics",
        "A metric per bucket from the rollups: count, unique_users, unique_sessions, sum/avg/min/max/pN of a property, or a session metric; grouped, filtered, over a sliding window, or as a ratio.",
        &[
            (
                "metric",
                "query",
                true,
                "e.g. `count`, `unique_users`, `p95:duration_ms`, `sessions`.",
            ),
            RANGE[0],
            RANGE[1],
            ("granularity", "query", false, "`1m`, `5m`, `1h`, `1d`."),
            (
                "event_type",
                "query",
                false,
                "Filter, repeatable or comma-separated.",
            ),
            (
                "group_by",
                "query",
                false,
                "Comma-separated: `event_type` and declared dimensions.",
            ),
            (
                "where",
                "query",
                false,
                "`<dimension>:<value>`, repeatable.",
            ),
            (
                "over",
                "query",
                false,
                "Denominator metric of a ratio, without the `where` filters.",
            ),
            (
                "window",
                "query",
                false,
                "Sliding window ending at each bucket's end, e.g. `5m`.",
            ),
            TENANT,
        ],
    ),
    (
        "get",
        "/api/v1/dlq",
        "Dead letters: malformed or late events, newest first.",
        &[
            ("kind", "query", false, "`malformed` (default) or `late`."),
            ("limit", "query", false, "At most this many entries."),
            TENANT,
        ],
    ),
    (
        "post",
        "/api/v1/dlq/replay",
        "Apply the late dead letters to their closed windows as corrections.",
        &[("kind", "query", true, "`late`."), TENANT],
    ),
    (
        "get",
        "/api/v1/status",
        "Pipeline status: ingest, lag, watermarks, storage, archive, cluster, registry.",
        &[],
    ),
    (
        "post",
        "/api/v1/query",
        "SQL over `events`, `rollups_1m`, `rollups_1h` and `sessions` (DataFusion), tenant-scoped, with limits. Body `{\"sql\": ...}`.",
        &[
            (
                "format",
                "query",
                false,
                "`json` (default), `csv`, `ndjson`, `arrow`.",
            ),
            TENANT,
        ],
    ),
    (
        "get",
        "/api/v1/sessions",
        "Sessions (by session id, else per user split by the gap) with events in the range.",
        &[
            ("user_id", "query", false, "Only this user's sessions."),
            RANGE[0],
            RANGE[1],
            ("gap", "query", false, "Inactivity gap, default `30m`."),
            ("limit", "query", false, "At most this many sessions."),
            TENANT,
        ],
    ),
    (
        "get",
        "/api/v1/catalog",
        "Event types in the window with their properties, JSON types, distinct values and ranges.",
        &[
            RANGE[0],
            RANGE[1],
            ("limit", "query", false, "Raw events read at most."),
            TENANT,
        ],
    ),
    (
        "get",
        "/api/v1/changes",
        "Closed buckets and sessions whose value changed after they were first published, after a version.",
        &[
            (
                "since",
                "query",
                false,
                "The `version` of the previous answer (default 0).",
            ),
            ("limit", "query", false, "At most this many changes."),
            TENANT,
        ],
    ),
    (
        "post",
        "/v1/{kind}",
        "Segment's HTTP tracking API (`batch`, `track`, `page`, `screen`, `identify`, `group`, `alias`); the write key as basic-auth user name.",
        &[TENANT],
    ),
    (
        "post",
        "/batch",
        "PostHog capture: `{\"api_key\", \"batch\": [...]}`.",
        &[TENANT],
    ),
    (
        "post",
        "/batch/",
        "PostHog capture: `{\"api_key\", \"batch\": [...]}`.",
        &[TENANT],
    ),
    (
        "post",
        "/capture",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/capture/",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/e",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/e/",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/i/v0/e",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/i/v0/e/",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/track",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "post",
        "/track/",
        "PostHog capture: one event or a batch.",
        &[TENANT],
    ),
    (
        "get",
        "/api/v1/alerts",
        "Alert rules with their state (and each series' for grouped rules).",
        &[TENANT],
    ),
    (
        "post",
        "/api/v1/alerts",
        "Create or (same name) update an alert rule; 400 names the field.",
        &[TENANT],
    ),
    (
        "get",
        "/api/v1/live",
        "WebSocket: minute counts as they change, corrections, status and alerts of a tenant.",
        &[
            TENANT,
            (
                "access_token",
                "query",
                false,
                "The API key (browsers cannot set headers on WebSockets).",
            ),
        ],
    ),
    (
        "get",
        "/api/v1/alerts/history",
        "State changes, delivery outcomes and corrections of alert rules, newest first.",
        &[
            ("rule_id", "query", false, "Only this rule."),
            ("limit", "query", false, "At most this many entries."),
            TENANT,
        ],
    ),
    (
        "get",
        "/api/v1/alerts/{id}",
        "One alert rule with its state.",
        &[TENANT],
    ),
    (
        "delete",
        "/api/v1/alerts/{id}",
        "Remove an alert rule.",
        &[TENANT],
    ),
    (
        "post",
        "/api/v1/alerts/{id}/silence",
        "Silence a rule: `{\"for\": \"1h\"}`.",
        &[TENANT],
    ),
    (
        "delete",
        "/api/v1/alerts/{id}/silence",
        "End a rule's silence.",
        &[TENANT],
    ),
    ("get", "/api/v1/openapi.json", "This document.", &[]),
    // The Confluent Schema Registry API, under both registry prefixes.
    ("get", "~", "Registry root: `{}`.", &[]),
    (
        "get",
        "~/subjects",
        "Subjects.",
        &[("deleted", "query", false, "`true`: soft-deleted ones too.")],
    ),
    (
        "post",
        "~/subjects/{subject}",
        "The version holding a schema, or 404 (40403).",
        &[],
    ),
    (
        "delete",
        "~/subjects/{subject}",
        "Delete a subject (soft, then `permanent=true`).",
        &[("permanent", "query", false, "Hard delete.")],
    ),
    (
        "get",
        "~/subjects/{subject}/versions",
        "A subject's versions.",
        &[],
    ),
    (
        "post",
        "~/subjects/{subject}/versions",
        "Register a schema; 409 if incompatible under the subject's rule, naming the field and the rule.",
        &[],
    ),
    (
        "get",
        "~/subjects/{subject}/versions/{version}",
        "One version (`latest` too).",
        &[],
    ),
    (
        "delete",
        "~/subjects/{subject}/versions/{version}",
        "Delete one version.",
        &[("permanent", "query", false, "Hard delete.")],
    ),
    (
        "get",
        "~/subjects/{subject}/versions/{version}/schema",
        "One version's schema text.",
        &[],
    ),
    (
        "get",
        "~/subjects/{subject}/versions/{version}/referencedby",
        "Ids of schemas referencing it (none: references are not supported).",
        &[],
    ),
    ("get", "~/schemas/ids/{id}", "A schema by global id.", &[]),
    (
        "get",
        "~/schemas/ids/{id}/schema",
        "A schema's text by global id.",
        &[],
    ),
    (
        "get",
        "~/schemas/ids/{id}/versions",
        "Subject versions holding an id.",
        &[],
    ),
    (
        "get",
        "~/schemas/ids/{id}/subjects",
        "Subjects holding an id.",
        &[],
    ),
    (
        "get",
        "~/schemas/types",
        "Schema types: `JSON`, `AVRO`.",
        &[],
    ),
    ("get", "~/contexts", "Contexts: `[\".\"]`.", &[]),
    (
        "post",
        "~/compatibility/subjects/{subject}/versions",
        "Whether a schema is compatible with the subject's versions under its rule.",
        &[("verbose", "query", false, "Messages naming what breaks.")],
    ),
    (
        "post",
        "~/compatibility/subjects/{subject}/versions/{version}",
        "Whether a schema is compatible with one version.",
        &[("verbose", "query", false, "Messages naming what breaks.")],
    ),
    ("get", "~/config", "The tenant's compatibility rule.", &[]),
    (
        "put",
        "~/config",
        "Set the tenant's compatibility rule.",
        &[],
    ),
    (
        "delete",
        "~/config",
        "Reset the tenant's compatibility rule to the server's.",
        &[],
    ),
    (
        "get",
        "~/config/{subject}",
        "A subject's compatibility rule.",
        &[(
            "defaultToGlobal",
            "query",
            false,
            "Fall back to the tenant's rule.",
        )],
    ),
    (
        "put",
        "~/config/{subject}",
        "Set a subject's compatibility rule.",
        &[],
    ),
    (
        "delete",
        "~/config/{subject}",
        "Remove a subject's rule.",
        &[],
    ),
    ("get", "~/mode", "`{\"mode\": \"READWRITE\"}`.", &[]),
    ("put", "~/mode", "Only `READWRITE` is taken.", &[]),
    (
        "get",
        "~/mode/{subject}",
        "`{\"mode\": \"READWRITE\"}`.",
        &[],
    ),
];

/// The registry prefixes registry paths are documented under.
const REGISTRY_PREFIXES: [&str; 2] = ["/api/v1/registry", "/api/v1/registry/tenants/{tenant}"];

/// Every documented (method, full path) with its summary and parameters.
fn documented() -> Vec<(String, &'static str, &'static str, &'static [Param])> {
    let mut out = Vec::new();
    for (method, path, summary, params) in DOCS {
        match path.strip_prefix('~') {
            Some(rest) => {
                for p in REGISTRY_PREFIXES {
                    out.push((format!("{p}{rest}"), *method, *summary, *params));
                }
            }
            None => out.push((path.to_string(), *method, *summary, *params)),
        }
    }
    out
}

/// The document.
pub(crate) fn document() -> Json {
    let routes = ROUTES.get().cloned().unwrap_or_default();
    let docs = documented();
    let mut paths = Map::new();
    for (path, _) in &routes {
        if paths.contains_key(path) {
            continue;
        }
        // The accesses the router gives this path (one per route added).
        let accesses: Vec<Access> = routes
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, a)| *a)
            .collect();
        let mut entry = Map::new();
        let mine: Vec<_> = docs.iter().filter(|d| &d.0 == path).collect();
        if mine.is_empty() {
            entry.insert(
                "get".into(),
                json!({"summary": "(not described)", "responses": {"200": {"description": "OK"}}}),
            );
        }
        for (_, method, summary, params) in mine {
            let access = access_of(&accesses, method);
            entry.insert(
                (*method).to_string(),
                operation(path, summary, params, access),
            );
        }
        paths.insert(path.clone(), Json::Object(entry));
    }
    // Described but not served: dead documentation, shown so that the
    // contract test catches it.
    let unrouted: Vec<String> = docs
        .iter()
        .map(|d| d.0.clone())
        .filter(|p| !routes.iter().any(|(r, _)| r == p))
        .collect();
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Tally",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Real-time analytics: ingest, rollups, SQL, sessions, alerts, and the Segment, PostHog and Confluent Schema Registry APIs. Reference: docs/API.md in the repository.",
        },
        "paths": paths,
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A Tally API key (keyed mode)."},
            "basic": {"type": "http", "scheme": "basic", "description": "The key as the password (or as the user name with an empty password)."},
        }},
    });
    if !unrouted.is_empty() {
        doc["x-tally-unrouted"] = json!(unrouted);
    }
    doc
}

/// Which of a path's routes serves `method`: the only one; else reads
/// (`get`) are the read route and changes the others — `post` the
/// non-admin one where there is one (registering a schema needs `ingest`,
/// deleting it `admin`).
fn access_of(accesses: &[Access], method: &str) -> Access {
    let is_read = |a: &Access| {
        matches!(
            a,
            Access::Public | Access::Metrics | Access::Needs(Scope::Read)
        )
    };
    let admin = Access::Needs(Scope::Admin);
    match accesses {
        [] => Access::Public,
        [one] => *one,
        many => match method {
            "get" => many.iter().copied().find(is_read).unwrap_or(many[0]),
            "post" => many
                .iter()
                .copied()
                .find(|a| !is_read(a) && *a != admin)
                .or_else(|| many.iter().copied().find(|a| *a == admin))
                .unwrap_or(many[0]),
            _ => many
                .iter()
                .copied()
                .find(|a| *a == admin)
                .unwrap_or(many[0]),
        },
    }
}

fn operation(path: &str, summary: &str, params: &[Param], access: Access) -> Json {
    let mut parameters: Vec<Json> = path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    parameters.extend(params.iter().map(|(name, at, required, description)| {
        json!({"name": name, "in": at, "required": required, "description": description, "schema": {"type": "string"}})
    }));
    let scope = match access {
        Access::Public => None,
        Access::Metrics => Some("admin (unless auth.public-metrics)"),
        Access::Needs(Scope::Read) => Some("read"),
        Access::Needs(Scope::Ingest) => Some("ingest"),
        Access::Needs(Scope::Admin) => Some("admin"),
    };
    let mut op = json!({
        "summary": summary,
        "parameters": parameters,
        "responses": {
            "200": {"description": "OK"},
            "400": {"description": "A bad request: `{\"error\"}` (and `field`) naming what to fix."},
        },
    });
    if let Some(s) = scope {
        op["security"] = json!([{"bearer": []}, {"basic": []}]);
        op["x-tally-scope"] = json!(s);
        op["responses"]["401"] = json!({"description": "Keyed mode: no key, or an unknown one."});
        op["responses"]["403"] =
            json!({"description": format!("The key lacks the {s} scope or the tenant.")});
    }
    op
}
