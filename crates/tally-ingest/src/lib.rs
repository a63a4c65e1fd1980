//! Ingest: turns an HTTP body (one JSON object, a JSON array of objects, or
//! NDJSON) into validated events in the binary batch form of `tally-types`,
//! split by log partition, plus a list of rejections with their reasons.
//!
//! API boundary: the rules here are the event fields of `POST /api/v1/events`
//! (README, *Using it*).
//! Every rejection message starts with the field it is about (`timestamp: ...`).
//! A rejected event never affects its neighbours.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;
use tally_types::codec::clip;
use tally_types::schema::{PropsCheck, PropsChecker, Schemas};
use tally_types::time::{self, MAX_TS, Millis};
use tally_types::{BatchWriter, DEFAULT_TENANT, PropValue, partition_of, valid_tenant};

pub mod privacy;
pub use privacy::Privacy;

/// Largest number of properties per event.
pub const MAX_PROPS: usize = 256;
/// Deepest nesting of an event by default (the event object is level 1).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Levels of arrays and objects in a JSON value (its text, valid JSON).
fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in text.as_bytes() {
        if in_str {
            match b {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Rejections of one body kept whole (message, raw text for the DLQ);
/// past this they are only counted, so a body of junk lines costs no more
/// memory than its size.
pub const MAX_KEPT_REJECTIONS: usize = 1000;

/// Longest raw text kept for a rejected event in the DLQ.
pub const MAX_RAW_KEPT: usize = 8192;

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json` (or unknown): one object or an array; NDJSON is
    /// recognised too when the body is several objects on several lines.
    Json,
    /// `application/x-ndjson`: one object per line.
    Ndjson,
}

impl Format {
    pub fn from_content_type(ct: Option<&str>) -> Format {
        match ct.map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        }) {
            Some(c) if c.contains("ndjson") || c.contains("jsonl") || c.contains("json-seq") => {
                Format::Ndjson
            }
            _ => Format::Json,
        }
    }
}

/// Who the events belong to.
#[derive(Debug, Clone, Copy)]
pub enum Tenancy<'a> {
    /// Open mode: the event's `tenant` field, else `default`.
    Open,
    /// Open mode with `?tenant=`: the event's `tenant` field, else this one.
    OpenAs(&'a str),
    /// Keyed mode: the key's tenant; an event naming another tenant is rejected.
    Keyed(&'a str),
}

/// The whole body was refused; nothing from it is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body is empty: send one JSON object, a JSON array of objects, or NDJSON")]
    Empty,
    #[error("body is not JSON or NDJSON: {0}")]
    NotJson(String),
    #[error("body must be a JSON object, an array of objects, or NDJSON; got {0}")]
    WrongShape(&'static str),
}

/// One rejected event.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Position in the batch (line number − 1 for NDJSON).
    pub index: usize,
    /// `field: reason`.
    pub error: String,
    /// Tenant the rejection is filed under.
    pub tenant: String,
    /// The rejected text (cut at [`MAX_RAW_KEPT`] bytes).
    pub raw: String,
    /// Whether `raw` is a complete JSON object (shown as `event` in the DLQ).
    pub is_object: bool,
}

/// Decides, per valid event `(tenant, event_type, timestamp)`, whether the
/// server takes it now; `Some(reason)` refuses it (overload, a full late
/// DLQ): the client may send it again later, it is not malformed.
pub type Admission = Arc<dyn Fn(&str, &str, Millis) -> Option<String> + Send + Sync>;

/// The accepted events of a body, one encoded batch per partition that got any.
#[derive(Debug, Default)]
pub struct Parsed {
    pub partitions: Vec<(u32, BatchWriter)>,
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
    /// Every rejected event, those past [`MAX_KEPT_REJECTIONS`] included.
    pub rejected_total: usize,
    /// Valid events the admission refused: (index, reason); retry them.
    pub refused: Vec<(usize, String)>,
    /// Accepted events per tenant, in order of first appearance (quotas).
    pub tenants: Vec<(String, usize)>,
    /// The earliest and latest event time of each tenant in `tenants`.
    pub spans: Vec<(Millis, Millis)>,
}

/// Parser with reusable scratch space.
pub struct Parser {
    partitions: u32,
    /// `(now, skew)`: events stamped more than `skew` after `now` are rejected.
    future: Option<(Millis, Millis)>,
    admission: Option<Admission>,
    /// Deepest nesting of an event's JSON (the event object is level 1).
    max_depth: usize,
    /// Largest event, in bytes of its fields' text (None: no limit).
    max_event_bytes: Option<usize>,
    props: Vec<(Cow<'static, str>, &'static RawValue)>,
    schemas: Arc<Schemas>,
    privacy: Option<Arc<Privacy>>,
    registry: Option<Arc<dyn PropsCheck>>,
}

impl fmt::Debug for Parser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parser")
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// Parses `body` with a fresh parser (see [`Parser::parse`]).
pub fn parse_body(
    body: &[u8],
    format: Format,
    tenancy: Tenancy<'_>,
    partitions: u32,
) -> Result<Parsed, BodyError> {
    Parser::new(partitions).parse(body, format, tenancy)
}

fn first_non_ws(b: &[u8]) -> Option<u8> {
    b.iter().copied().find(|c| !c.is_ascii_whitespace())
}

fn clip_raw(s: &str) -> String {
    clip(s, MAX_RAW_KEPT).to_string()
}

impl Parser {
    pub fn new(partitions: u32) -> Self {
        Parser::with_schemas(partitions, Arc::default())
    }

    /// A parser that checks declared properties against their tenant's
    /// schema (see [`tally_types::schema`]).
    pub fn with_schemas(partitions: u32, schemas: Arc<Schemas>) -> Self {
        Parser {
            partitions: partitions.max(1),
            future: None,
            admission: None,
            max_depth: DEFAULT_MAX_DEPTH,
            max_event_bytes: None,
            props: Vec::new(),
            schemas,
            privacy: None,
            registry: None,
        }
    }

    /// Events of a type with a registered schema are checked against it
    /// (the latest version, or the one their `schema_version` names).
    pub fn with_registry(mut self, registry: Option<Arc<dyn PropsCheck>>) -> Self {
        self.registry = registry;
        self
    }

    /// Personal data is redacted by `privacy`'s rules before an event is
    /// encoded, and in rejected events before they are kept.
    pub fn with_privacy(mut self, privacy: Option<Arc<Privacy>>) -> Self {
        self.privacy = privacy;
        self
    }

    /// Rejects events stamped more than `skew_ms` after the server's clock
    /// `now` (`ingest.max-future-skew`): one client's wrong clock must not
    /// carry its tenant's watermark into the future.
    pub fn with_future_limit(mut self, now: Millis, skew_ms: Millis) -> Self {
        self.future = Some((now, skew_ms));
        self
    }

    /// Moves the "now" of the future-skew limit (a parser reused for
    /// messages of different timestamps); no limit set: nothing.
    pub fn set_now(&mut self, now: Millis) {
        if let Some((n, _)) = &mut self.future {
            *n = now;
        }
    }

    /// Events nested deeper than `depth` levels (the event object is level
    /// 1, its `properties` level 2) are rejected (`ingest.max-json-depth`).
    pub fn with_max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth.max(2);
        self
    }

    /// Events whose fields take more than `bytes` (the text of their
    /// properties and envelope strings) are rejected: in Kafka mode an
    /// event must fit one record of the events topic.
    pub fn with_max_event_bytes(mut self, bytes: Option<usize>) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// Valid events are offered to `admission` before they are taken.
    pub fn with_admission(mut self, admission: Option<Admission>) -> Self {
        self.admission = admission;
        self
    }

    pub fn parse(
        &mut self,
        body: &[u8],
        format: Format,
        tenancy: Tenancy<'_>,
    ) -> Result<Parsed, BodyError> {
        let Some(first) = first_non_ws(body) else {
            return Err(BodyError::Empty);
        };
        let mut out = Parsed::default();
        let mut slots: Vec<Option<BatchWriter>> = (0..self.partitions).map(|_| None).collect();
        let size_hint = body.len() / self.partitions as usize + 64;
        let schemas = self.schemas.clone();
        let mut sink = Sink {
            slots: &mut slots,
            size_hint,
            out: &mut out,
            parts: self.partitions,
            compact: String::new(),
            schemas: &schemas,
            future: self.future,
            admission: self.admission.clone(),
            max_depth: self.max_depth,
            max_event_bytes: self.max_event_bytes,
            index: 0,
            privacy: self.privacy.clone(),
            registry: self.registry.clone(),
            checkers: Vec::new(),
        };
        match (format, first) {
            (Format::Json, b'[') => {
                let mut de = serde_json::Deserializer::from_slice(body);
                de::DeserializeSeed::deserialize(
                    Elements {
                        tenancy,
                        sink: &mut sink,
                        props: &mut self.props,
                    },
                    &mut de,
                )
                .and_then(|_| de.end())
                .map_err(|e| BodyError::NotJson(e.to_string()))?;
            }
            (Format::Json, b'{') => match serde_json::from_slice::<&RawValue>(body) {
                Ok(raw) => self.one(0, raw.get(), tenancy, &mut sink),
                Err(e) => {
                    // Several objects on several lines without the NDJSON content type.
                    if !self.ndjson(body, tenancy, &mut sink) {
                        return Err(BodyError::NotJson(e.to_string()));
                    }
                }
            },
            (Format::Json, _) => {
                return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                    Ok(_) => Err(BodyError::WrongShape(json_kind(first))),
                    Err(e) => Err(BodyError::NotJson(e.to_string())),
                };
            }
            (Format::Ndjson, _) => {
                if !self.ndjson(body, tenancy, &mut sink) {
                    let e = serde_json::from_slice::<serde::de::IgnoredAny>(body)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "no line holds a JSON value".into());
                    return Err(BodyError::NotJson(e));
                }
            }
        }
        out.partitions = slots
            .into_iter()
            .enumerate()
            .filter_map(|(p, w)| Some((p as u32, w?)))
            .collect();
        Ok(out)
    }

    /// NDJSON: each line independently. Returns false when no line is JSON at all.
    fn ndjson(&mut self, body: &[u8], tenancy: Tenancy<'_>, sink: &mut Sink<'_>) -> bool {
        let mut any_json = false;
        for (i, line) in body.split(|&c| c == b'\n').enumerate() {
            if first_non_ws(line).is_none() {
                continue;
            }
            match std::str::from_utf8(line) {
                // Kept as evidence: invalid bytes become U+FFFD.
                Err(_) => sink.reject(
                    i,
                    "json: line is not valid UTF-8 (invalid bytes shown as U+FFFD in the DLQ)"
                        .into(),
                    None,
                    tenancy,
                    &String::from_utf8_lossy(line),
                ),
                Ok(text) => match serde_json::from_str::<&RawValue>(text.trim()) {
                    Ok(raw) => {
                        any_json = true;
                        self.one(i, raw.get(), tenancy, sink);
                    }
                    Err(e) => sink.reject(i, format!("json: {e}"), None, tenancy, text.trim()),
                },
            }
        }
        any_json
    }

    fn one(&mut self, index: usize, raw: &str, tenancy: Tenancy<'_>, sink: &mut Sink<'_>) {
        if !raw.starts_with('{') {
            let msg = not_an_object(json_kind(raw.as_bytes()[0]));
            sink.reject(index, msg, None, tenancy, raw);
            return;
        }
        // Reuse one allocation for the property pairs of every event.
        let mut props = recycle(std::mem::take(&mut self.props));
        match validate(raw, tenancy, &mut props) {
            Ok(ev) => {
                sink.index = index;
                if let Err(msg) = sink.accept(&ev, &props) {
                    sink.reject(index, msg, Some(&ev.tenant), tenancy, raw);
                }
            }
            Err((msg, tenant)) => sink.reject(index, msg, tenant.as_deref(), tenancy, raw),
        }
        self.props = recycle(props);
    }
}

/// Empties a vector and hands its allocation to a vector of another lifetime
/// (in-place collect of an empty iterator keeps the buffer).
fn recycle<'a, 'b>(mut v: Vec<(Cow<'a, str>, &'a RawValue)>) -> Vec<(Cow<'b, str>, &'b RawValue)> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector was just cleared"))
        .collect()
}

fn json_kind(first: u8) -> &'static str {
    match first {
        b'{' => "an object",
        b'[' => "an array",
        b'"' => "a string",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => "a number",
    }
}

struct Sink<'s> {
    slots: &'s mut Vec<Option<BatchWriter>>,
    size_hint: usize,
    out: &'s mut Parsed,
    parts: u32,
    /// Scratch for [`compact_text`].
    compact: String,
    schemas: &'s Schemas,
    future: Option<(Millis, Millis)>,
    admission: Option<Admission>,
    max_depth: usize,
    max_event_bytes: Option<usize>,
    /// Index of the event being accepted (for refusals).
    index: usize,
    privacy: Option<Arc<Privacy>>,
    registry: Option<Arc<dyn PropsCheck>>,
    /// The registry's answers for this body, by (tenant, event type,
    /// version): a body's events share a few, so the registry is asked
    /// once per key, not once per event.
    checkers: Vec<Checker>,
}

type Checker = (String, String, Option<u32>, Option<Arc<dyn PropsChecker>>);

impl Sink<'_> {
    /// The registry's checker of `ev`'s type (None: no schema).
    fn checker(&mut self, ev: &Valid<'_>) -> Result<Option<Arc<dyn PropsChecker>>, String> {
        let Some(registry) = &self.registry else {
            return Ok(None);
        };
        let hit = self.checkers.iter().find(|(t, ty, v, _)| {
            *v == ev.schema_version && *t == *ev.tenant && *ty == *ev.event_type
        });
        if let Some((.., c)) = hit {
            return Ok(c.clone());
        }
        let c = registry.checker(&ev.tenant, &ev.event_type, ev.schema_version)?;
        // Bounded: a body of ever new types asks each time past it.
        if self.checkers.len() < 64 {
            self.checkers.push((
                ev.tenant.to_string(),
                ev.event_type.to_string(),
                ev.schema_version,
                c.clone(),
            ));
        }
        Ok(c)
    }

    /// Adds `ev` to its partition's batch, unless a property its tenant's
    /// schema declares has another type (the error says which and why).
    fn accept(
        &mut self,
        ev: &Valid<'_>,
        props: &[(Cow<'_, str>, &RawValue)],
    ) -> Result<(), String> {
        if let Some((now, skew)) = self.future
            && ev.ts > now.saturating_add(skew)
        {
            return Err(format!(
                "timestamp: {} is {} ahead of the server's clock ({}); at most {} ahead is accepted (ingest.max-future-skew): fix the client's clock or raise the setting",
                time::format_rfc3339(ev.ts),
                time::human_approx(ev.ts - now),
                time::format_rfc3339(now),
                time::human_ms(skew),
            ));
        }
        if let Some(max) = self.max_event_bytes {
            let strings = [Some(&ev.tenant), Some(&ev.event_id), Some(&ev.event_type)]
                .into_iter()
                .chain([ev.user_id.as_ref(), ev.session_id.as_ref()])
                .flatten()
                .map(|s| s.len())
                .sum::<usize>();
            let n = strings
                + props
                    .iter()
                    .map(|(k, v)| k.len() + v.get().len())
                    .sum::<usize>();
            if n > max {
                return Err(format!(
                    "the event takes {n} bytes, more than the {max} one event may take in Kafka mode (one record of the events topic, under the brokers' max.message.bytes); keep large values out of events"
                ));
            }
        }
        if let Some(schema) = self.schemas.get(&*ev.tenant) {
            for (k, v) in props {
                if let Some(&t) = schema.get(&**k)
                    && !t.admits(v.get())
                {
                    return Err(format!(
                        "properties.{k}: expected {}, got {} (tenant {:?} declares {k} as {}; send {} or change the schema)",
                        t.name(),
                        shorten(v.get()),
                        ev.tenant,
                        t.name(),
                        t.hint(),
                    ));
                }
            }
        }
        let version = match self.checker(ev)? {
            Some(c) => {
                c.check(props)?;
                Some(c.version())
            }
            None => None,
        };
        // A number no f64 holds would be counted as nothing: refuse it.
        // Only an exponent or hundreds of digits can overflow. Nested
        // values deeper than the limit are refused too.
        for (k, v) in props {
            let t = v.get();
            if matches!(t.as_bytes()[0], b'{' | b'[') {
                let d = 2 + json_depth(t);
                if d > self.max_depth {
                    return Err(format!(
                        "properties.{k}: nested {d} levels deep (the event is level 1), at most {} (ingest.max-json-depth); flatten it",
                        self.max_depth
                    ));
                }
            }
            if matches!(t.as_bytes()[0], b'-' | b'0'..=b'9')
                && (t.contains(['e', 'E']) || t.len() > 300)
                && !t.parse::<f64>().is_ok_and(f64::is_finite)
            {
                return Err(format!(
                    "properties.{k}: {} does not fit a 64-bit float; send a smaller number, or a string",
                    shorten(t)
                ));
            }
        }
        if let Some(admit) = &self.admission
            && let Some(reason) = admit(&ev.tenant, &ev.event_type, ev.ts)
        {
            self.out.refused.push((self.index, reason));
            return Ok(());
        }
        // Personal data out before anything is encoded.
        let redacted_props: Vec<(Cow<'_, str>, Box<RawValue>)>;
        let redacted_view: Vec<(Cow<'_, str>, &RawValue)>;
        let redacted_ev: Valid<'_>;
        let (ev, props) = match self
            .privacy
            .as_deref()
            .and_then(|p| Some((p, p.rules(&ev.tenant)?)))
        {
            None => (ev, props),
            Some((p, rules)) => {
                redacted_props = redact_props(p, rules, props);
                redacted_view = redacted_props
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(&**k), &**v))
                    .collect();
                let id = |v: &Option<Cow<'_, str>>,
                          a: Option<privacy::Action>|
                 -> Option<Cow<'static, str>> {
                    let v = v.as_deref()?;
                    match a {
                        Some(a) => p.apply_str(a, v).map(Cow::Owned),
                        None => Some(Cow::Owned(v.to_string())),
                    }
                };
                redacted_ev = Valid {
                    tenant: Cow::Borrowed(&ev.tenant),
                    event_id: Cow::Borrowed(&ev.event_id),
                    event_type: Cow::Borrowed(&ev.event_type),
                    ts: ev.ts,
                    user_id: id(&ev.user_id, rules.user_id()),
                    session_id: id(&ev.session_id, rules.session_id()),
                    props_text: None,
                    schema_version: ev.schema_version,
                };
                (&redacted_ev, &redacted_view[..])
            }
        };
        let p = partition_of(
            &ev.tenant,
            ev.session_id.as_deref(),
            ev.user_id.as_deref(),
            &ev.event_id,
            self.parts,
        );
        let w = self.slots[p as usize]
            .get_or_insert_with(|| BatchWriter::with_capacity(self.size_hint));
        let at = w.begin_event(
            &ev.tenant,
            &ev.event_id,
            &ev.event_type,
            ev.ts,
            ev.user_id.as_deref(),
            ev.session_id.as_deref(),
        );
        if let Some(v) = version {
            w.schema_version(at, v);
        }
        // As JSON text when it reads back as these properties (the raw
        // store then copies it instead of rendering it): the client's own,
        // or a compact one rebuilt from the pairs; else one by one.
        let n = props.len() as u16;
        let as_text = match ev.props_text.map(|t| (t, text_form(t, props))) {
            Some((t, TextForm::AsSent)) => w.finish_event_json(at, n, t),
            Some((_, TextForm::Compact)) => {
                compact_text(props, &mut self.compact);
                w.finish_event_json(at, n, &self.compact)
            }
            _ => false,
        };
        if !as_text {
            let mut scratch = String::new();
            for (k, v) in props {
                w.prop(k, prop_value(v.get(), &mut scratch));
            }
            w.finish_event(at, props.len() as u16);
        }
        self.out.accepted += 1;
        // Batches mostly hold one tenant: compare with the last one first.
        let last = self.out.tenants.len().wrapping_sub(1);
        let i = match self.out.tenants.last() {
            Some((t, _)) if *t == *ev.tenant => last,
            _ => match self.out.tenants.iter().position(|(t, _)| *t == *ev.tenant) {
                Some(i) => i,
                None => {
                    self.out.tenants.push((ev.tenant.to_string(), 0));
                    self.out.spans.push((ev.ts, ev.ts));
                    last.wrapping_add(1)
                }
            },
        };
        self.out.tenants[i].1 += 1;
        let span = &mut self.out.spans[i];
        span.0 = span.0.min(ev.ts);
        span.1 = span.1.max(ev.ts);
        Ok(())
    }

    fn reject(
        &mut self,
        index: usize,
        error: String,
        event_tenant: Option<&str>,
        tenancy: Tenancy<'_>,
        raw: &str,
    ) {
        self.out.rejected_total += 1;
        if self.out.rejected.len() >= MAX_KEPT_REJECTIONS {
            return;
        }
        let tenant = match tenancy {
            Tenancy::Keyed(t) => t.to_string(),
            Tenancy::Open | Tenancy::OpenAs(_) => event_tenant
                .filter(|t| valid_tenant(t))
                .unwrap_or(match tenancy {
                    Tenancy::OpenAs(d) => d,
                    _ => DEFAULT_TENANT,
                })
                .to_string(),
        };
        let redacted;
        let (error, raw) = match &self.privacy {
            Some(p) => {
                let (e, r) = p.redact_rejection(&tenant, error, raw);
                redacted = r;
                (e, redacted.as_str())
            }
            None => (error, raw),
        };
        let is_object = raw.starts_with('{') && serde_json::from_str::<&RawValue>(raw).is_ok();
        self.out.rejected.push(Rejection {
            index,
            error,
            tenant,
            raw: clip_raw(raw),
            is_object,
        });
    }
}

/// The property pairs after `rules`: dropped ones gone, hashed and masked
/// ones replaced (also inside nested objects a rule reaches into).
fn redact_props<'a>(
    p: &Privacy,
    rules: &privacy::Rules,
    props: &[(Cow<'a, str>, &RawValue)],
) -> Vec<(Cow<'a, str>, Box<RawValue>)> {
    let json = |v: serde_json::Value| {
        RawValue::from_string(v.to_string()).expect("a serialized value is valid JSON")
    };
    let mut out = Vec::with_capacity(props.len());
    for (k, v) in props {
        let parsed = || serde_json::from_str::<serde_json::Value>(v.get()).unwrap_or_default();
        let kept = match rules.prop(k) {
            Some(action) => match p.apply_value(action, &parsed()) {
                Some(r) => json(r),
                None => continue,
            },
            None if v.get().starts_with('{') => match p.nested(rules, k, &parsed()) {
                Some(r) => json(r),
                None => (*v).to_owned(),
            },
            None => (*v).to_owned(),
        };
        out.push((k.clone(), kept));
    }
    out
}

/// How the `properties` object a client sent is kept
/// ([`BatchWriter::finish_event_json`]), so that it reads back as `props`.
enum TextForm {
    /// Its text as it is: compact (`{"k":v,...}`), no escaped keys, no
    /// repeated key.
    AsSent,
    /// A compact text rebuilt from `props` ([`compact_text`]): the object
    /// had whitespace between its tokens (`json.dumps` by default) or a
    /// repeated key (the last value wins in `props`).
    Compact,
    /// Value by value: no properties, an escaped key, or a value
    /// [`value_text_ok`] rules out.
    No,
}

/// Which [`TextForm`] `text`, the `properties` object as the client sent
/// it, takes. Its length tells most of it: a compact object of these pairs
/// is `{"k":v,...}` with each key's raw text two quotes longer than the key,
/// so whitespace between tokens, an escaped key or a repeated key makes the
/// text longer; a key with escapes is one serde had to decode (owned).
fn text_form(text: &str, props: &[(Cow<'_, str>, &RawValue)]) -> TextForm {
    if props.is_empty() {
        return TextForm::No;
    }
    let mut len = props.len() + 1;
    for (k, v) in props {
        let raw = v.get();
        if matches!(k, Cow::Owned(_)) || !value_text_ok(raw) {
            return TextForm::No;
        }
        len += k.len() + 3 + raw.len();
    }
    if len == text.len() {
        TextForm::AsSent
    } else {
        TextForm::Compact
    }
}

/// Whether a property value, as the client wrote it, can stand in a text
/// form object: strings without escapes, numbers an f64 holds, anything
/// else (booleans, null, nested JSON kept as text).
fn value_text_ok(raw: &str) -> bool {
    match raw.as_bytes().first() {
        Some(b'"') => !raw.as_bytes().contains(&b'\\'),
        Some(b'{' | b'[' | b't' | b'f' | b'n') => true,
        Some(_) => !matches!(tally_types::codec::number_value(raw), PropValue::Null),
        None => false,
    }
}

/// `pairs` written to `out` (cleared first) as a compact object
/// (`{"k":v,...}`, each value as the client wrote it, keys escaped where
/// they need it): the text of [`TextForm::Compact`], and of a rejected
/// array element for the DLQ.
fn compact_text(pairs: &[(Cow<'_, str>, &RawValue)], out: &mut String) {
    out.clear();
    out.push('{');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match k {
            // Borrowed from the body: a key with nothing to escape.
            Cow::Borrowed(k) => {
                out.push('"');
                out.push_str(k);
                out.push('"');
            }
            Cow::Owned(k) => tally_types::codec::push_json_str(out, k),
        }
        out.push(':');
        out.push_str(v.get());
    }
    out.push('}');
}

/// The rejection of an event that is not a JSON object.
fn not_an_object(kind: &str) -> String {
    format!("event: must be a JSON object, got {kind}")
}

/// Classifies a raw property value. Strings with escapes are decoded into `scratch`.
fn prop_value<'a>(raw: &'a str, scratch: &'a mut String) -> PropValue<'a> {
    match raw.as_bytes().first() {
        None | Some(b'n') => PropValue::Null,
        Some(b't') => PropValue::Bool(true),
        Some(b'f') => PropValue::Bool(false),
        Some(b'"') => match serde_json::from_str::<&str>(raw) {
            Ok(s) => PropValue::Str(s),
            Err(_) => {
                scratch.clear();
                scratch.push_str(&serde_json::from_str::<String>(raw).unwrap_or_default());
                PropValue::Str(scratch)
            }
        },
        Some(b'{' | b'[') => PropValue::Json(raw),
        Some(_) => tally_types::codec::number_value(raw),
    }
}

/// A validated event (fields borrowed from the raw text where possible).
struct Valid<'a> {
    tenant: Cow<'a, str>,
    event_id: Cow<'a, str>,
    event_type: Cow<'a, str>,
    ts: Millis,
    user_id: Option<Cow<'a, str>>,
    session_id: Option<Cow<'a, str>>,
    /// The `properties` object's text, when there is one.
    props_text: Option<&'a str>,
    /// The registered schema version the event names (None: the latest).
    schema_version: Option<u32>,
}

/// Top-level fields of one event object, each as raw JSON.
#[derive(Default)]
struct Fields<'a> {
    event_id: Option<&'a RawValue>,
    event_type: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    session_id: Option<&'a RawValue>,
    tenant: Option<&'a RawValue>,
    properties: Option<&'a RawValue>,
    schema_version: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
                Fields::from_map(m, None)
            }
        }
        d.deserialize_map(V)
    }
}

/// Every top-level pair of an event object, in order (for its text in the
/// DLQ when it is rejected).
type Pairs<'de> = Vec<(Cow<'de, str>, &'de RawValue)>;

impl<'de> Fields<'de> {
    /// The fields of an object; with `pairs`, every pair also goes there.
    fn from_map<A: MapAccess<'de>>(
        mut m: A,
        mut pairs: Option<&mut Pairs<'de>>,
    ) -> Result<Self, A::Error> {
        let mut f = Fields::default();
        while let Some(Key(k)) = m.next_key::<Key<'de>>()? {
            let v: &'de RawValue = m.next_value()?;
            match &*k {
                "event_id" => f.event_id = Some(v),
                "event_type" => f.event_type = Some(v),
                "timestamp" => f.timestamp = Some(v),
                "user_id" => f.user_id = Some(v),
                "session_id" => f.session_id = Some(v),
                "tenant" => f.tenant = Some(v),
                "properties" => f.properties = Some(v),
                "schema_version" => f.schema_version = Some(v),
                _ => {}
            }
            if let Some(p) = pairs.as_deref_mut() {
                p.push((k, v));
            }
        }
        Ok(f)
    }
}

/// One element of a JSON array body: an event object's fields (its pairs
/// in the [`ElementSeed`]'s list), or what else it is and its text (for
/// the rejection).
enum Element<'de> {
    Object(Fields<'de>),
    Other(&'static str, String),
}

/// Reads one [`Element`], the pairs of an object into `.0`.
struct ElementSeed<'v, 'de>(&'v mut Pairs<'de>);

impl<'de> de::DeserializeSeed<'de> for ElementSeed<'_, 'de> {
    type Value = Element<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed<'_, 'de> {
    type Value = Element<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
        self.0.clear();
        Fields::from_map(m, Some(self.0)).map(Element::Object)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        let mut text = String::from("[");
        while let Some(v) = s.next_element::<&RawValue>()? {
            if text.len() > 1 {
                text.push(',');
            }
            text.push_str(v.get());
        }
        text.push(']');
        Ok(Element::Other("an array", text))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let mut text = String::new();
        tally_types::codec::push_json_str(&mut text, v);
        Ok(Element::Other("a string", text))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Element::Other("a boolean", v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Element::Other("null", "null".into()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Element::Other("a number", v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Element::Other("a number", v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        let text = serde_json::to_string(&v).unwrap_or_else(|_| "null".into());
        Ok(Element::Other("a number", text))
    }
}

/// The elements of a JSON array body, each validated and accepted or
/// rejected as it is read: one pass over the body. A rejected object's
/// text for the DLQ is written back from its pairs (the same object, with
/// no whitespace between its tokens).
struct Elements<'a, 's> {
    tenancy: Tenancy<'a>,
    sink: &'a mut Sink<'s>,
    /// The allocation for the property pairs of every event.
    props: &'a mut Vec<(Cow<'static, str>, &'static RawValue)>,
}

impl<'de> de::DeserializeSeed<'de> for Elements<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of events")
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let mut pairs: Pairs<'de> = Vec::new();
        let mut index = 0;
        while let Some(el) = s.next_element_seed(ElementSeed(&mut pairs))? {
            match el {
                Element::Object(f) => {
                    let mut props = recycle(std::mem::take(self.props));
                    self.sink.index = index;
                    let refused = match validate_fields(f, self.tenancy, &mut props) {
                        Ok(ev) => match self.sink.accept(&ev, &props) {
                            Ok(()) => None,
                            Err(msg) => Some((msg, Some(ev.tenant.to_string()))),
                        },
                        Err(e) => Some(e),
                    };
                    if let Some((msg, tenant)) = refused {
                        let mut text = String::new();
                        compact_text(&pairs, &mut text);
                        self.sink
                            .reject(index, msg, tenant.as_deref(), self.tenancy, &text);
                    }
                    *self.props = recycle(props);
                }
                Element::Other(kind, text) => {
                    self.sink
                        .reject(index, not_an_object(kind), None, self.tenancy, &text);
                }
            }
            index += 1;
        }
        Ok(())
    }
}

/// Property pairs of the `properties` object.
struct PropPairs<'a, 'v>(&'v mut Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> de::DeserializeSeed<'de> for PropPairs<'de, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        struct V<'de, 'v>(&'v mut Vec<(Cow<'de, str>, &'de RawValue)>);
        impl<'de> Visitor<'de> for V<'de, '_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
                while let Some(Key(k)) = m.next_key::<Key<'de>>()? {
                    let v: &'de RawValue = m.next_value()?;
                    if let Some(slot) = self.0.iter_mut().find(|(key, _)| *key == k) {
                        slot.1 = v; // a repeated key: the last value wins
                    } else {
                        self.0.push((k, v));
                    }
                }
                Ok(())
            }
        }
        d.deserialize_map(V(self.0))
    }
}

/// A key of a JSON object, borrowed from the body unless it has escapes
/// (serde's own `Cow<str>` always allocates).
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

fn as_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(s) {
        Ok(b) => Some(Cow::Borrowed(b)),
        Err(_) => serde_json::from_str::<String>(s).ok().map(Cow::Owned),
    }
}

fn char_len_ok(s: &str, min: usize, max: usize) -> bool {
    // Byte length bounds character length from above and (×4) from below.
    let n = if s.len() <= max {
        s.chars().count()
    } else {
        s.chars().take(max + 1).count()
    };
    (min..=max).contains(&n)
}

fn valid_event_type(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
}

fn parse_timestamp(raw: &RawValue) -> Result<Millis, String> {
    const MSG: &str = "timestamp: not RFC 3339 or epoch ms";
    let s = raw.get();
    match s.as_bytes()[0] {
        b'"' => {
            let Some(text) = as_string(raw) else {
                return Err(MSG.into());
            };
            let t = text.trim();
            if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
                return match t.parse::<i64>() {
                    Ok(v) if v <= MAX_TS => Ok(v),
                    _ => Err(format!(
                        "timestamp: {t} is out of range (epoch ms up to year 9999)"
                    )),
                };
            }
            time::parse_rfc3339(t).map_err(|e| match e {
                time::TimeError::Syntax => format!("{MSG}: got {}", shorten(s)),
                other => format!("{MSG}: {other}: got {}", shorten(s)),
            })
        }
        b'-' | b'0'..=b'9' => {
            let v = if s.contains(['.', 'e', 'E']) {
                match s.parse::<f64>().ok().and_then(tally_types::integral) {
                    Some(i) => i,
                    None => return Err(format!("{MSG}: epoch ms must be an integer, got {s}")),
                }
            } else {
                s.parse::<i64>().map_err(|_| format!("{MSG}: got {s}"))?
            };
            if !(0..=MAX_TS).contains(&v) {
                return Err(format!(
                    "timestamp: {v} is out of range (epoch ms from 1970 to year 9999)"
                ));
            }
            Ok(v)
        }
        b'n' => Err("timestamp: required".into()),
        _ => Err(format!("{MSG}: got {}", shorten(s))),
    }
}

fn shorten(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    format!("{}...", clip(s, 61))
}

fn opt_id<'a>(raw: Option<&'a RawValue>, field: &str) -> Result<Option<Cow<'a, str>>, String> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get() == "null" {
        return Ok(None);
    }
    let Some(s) = as_string(raw) else {
        return Err(format!(
            "{field}: must be a string of at most 128 characters"
        ));
    };
    if s.is_empty() {
        return Ok(None);
    }
    if !char_len_ok(&s, 1, 128) {
        return Err(format!("{field}: longer than 128 characters"));
    }
    Ok(Some(s))
}

/// Validates one event object. On error returns the message and, when it
/// could be read, the tenant the event named (to file the rejection under).
fn validate<'a>(
    raw: &'a str,
    tenancy: Tenancy<'a>,
    props: &mut Vec<(Cow<'a, str>, &'a RawValue)>,
) -> Result<Valid<'a>, (String, Option<String>)> {
    let f: Fields<'a> = serde_json::from_str(raw).map_err(|e| (format!("json: {e}"), None))?;
    validate_fields(f, tenancy, props)
}

/// [`validate`] of the fields of an event object, read already.
fn validate_fields<'a>(
    f: Fields<'a>,
    tenancy: Tenancy<'a>,
    props: &mut Vec<(Cow<'a, str>, &'a RawValue)>,
) -> Result<Valid<'a>, (String, Option<String>)> {
    let named_tenant = match f.tenant {
        None => None,
        Some(r) if r.get() == "null" => None,
        Some(r) => match as_string(r) {
            Some(t) => Some(t),
            None => return Err(("tenant: must be a string".into(), None)),
        },
    };
    let err = |m: String| (m, named_tenant.as_ref().map(|t| t.to_string()));
    let tenant: Cow<'a, str> = match (tenancy, &named_tenant) {
        (Tenancy::Open, None) => Cow::Borrowed(DEFAULT_TENANT),
        (Tenancy::OpenAs(d), None) => Cow::Borrowed(d),
        (Tenancy::Open | Tenancy::OpenAs(_), Some(t)) => {
            if !valid_tenant(t) {
                return Err(err(format!(
                    "tenant: {:?} is not 1–64 characters of [A-Za-z0-9_.-]",
                    shorten(t)
                )));
            }
            t.clone()
        }
        (Tenancy::Keyed(k), Some(t)) if t != k => {
            return Err(err(format!(
                "tenant: event names tenant {:?} but the API key belongs to {k:?}; drop the field or use that tenant's key",
                shorten(t)
            )));
        }
        (Tenancy::Keyed(k), _) => Cow::Borrowed(k),
    };
    let event_id = match f.event_id {
        None => return Err(err("event_id: required".into())),
        Some(r) if r.get() == "null" => return Err(err("event_id: required".into())),
        Some(r) => match as_string(r) {
            Some(s) if char_len_ok(&s, 1, 128) => s,
            Some(s) if s.is_empty() => return Err(err("event_id: must not be empty".into())),
            Some(_) => return Err(err("event_id: longer than 128 characters".into())),
            None => {
                return Err(err(format!(
                    "event_id: must be a string of 1–128 characters, got {}",
                    shorten(r.get())
                )));
            }
        },
    };
    let event_type = match f.event_type {
        None => return Err(err("event_type: required".into())),
        Some(r) if r.get() == "null" => return Err(err("event_type: required".into())),
        Some(r) => match as_string(r) {
            Some(s) if valid_event_type(&s) => s,
            Some(s) => {
                return Err(err(format!(
                    "event_type: {:?} is not 1–64 characters of [A-Za-z0-9_.:-]",
                    shorten(&s)
                )));
            }
            None => {
                return Err(err(format!(
                    "event_type: must be a string, got {}",
                    shorten(r.get())
                )));
            }
        },
    };
    let ts = match f.timestamp {
        None => return Err(err("timestamp: required".into())),
        Some(r) => parse_timestamp(r).map_err(&err)?,
    };
    let user_id = opt_id(f.user_id, "user_id").map_err(&err)?;
    let session_id = opt_id(f.session_id, "session_id").map_err(&err)?;
    let mut props_text = None;
    if let Some(p) = f.properties {
        match p.get().as_bytes()[0] {
            b'n' => {}
            b'{' => {
                let mut de = serde_json::Deserializer::from_str(p.get());
                de::DeserializeSeed::deserialize(PropPairs(props), &mut de)
                    .map_err(|e| err(format!("properties: {e}")))?;
                if props.len() > MAX_PROPS {
                    return Err(err(format!(
                        "properties: {} keys, at most {MAX_PROPS} are allowed",
                        props.len()
                    )));
                }
                if let Some((k, _)) = props.iter().find(|(k, _)| k.is_empty() || k.len() > 256) {
                    return Err(err(format!(
                        "properties: key {:?} must be 1–256 bytes",
                        shorten(k)
                    )));
                }
                props_text = Some(p.get());
            }
            _ => {
                return Err(err(format!(
                    "properties: must be a JSON object, got {}",
                    json_kind(p.get().as_bytes()[0])
                )));
            }
        }
    }
    let schema_version = match f.schema_version.map(RawValue::get) {
        None | Some("null") => None,
        Some(t) => match t.parse::<u32>() {
            Ok(v) if v >= 1 => Some(v),
            _ => {
                return Err(err(format!(
                    "schema_version: must be a positive integer (a version of the event type's registered schema), got {}",
                    shorten(t)
                )));
            }
        },
    };
    Ok(Valid {
        tenant,
        event_id,
        event_type,
        ts,
        user_id,
        session_id,
        props_text,
        schema_version,
    })
}

#[cfg(test)]
mod tests;
