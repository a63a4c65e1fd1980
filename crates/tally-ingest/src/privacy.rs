//! Redaction of personal data at ingest (`[privacy.<tenant>]`), applied
//! before an event is written anywhere: the log, and so the rollups, the
//! archive and the late DLQ, only ever see the redacted event; a rejected
//! event goes to the malformed DLQ redacted too, and an error message never
//! quotes a redacted value.
//!
//! A rule names a field and an action:
//! - fields: `user_id`, `session_id`, `properties.<name>`. `<name>` is the
//!   property's key as sent (keys may hold dots, `context.ip`); when no key
//!   matches, a dotted name reaches into nested objects
//!   (`properties.address.street`).
//! - actions: `drop` (the field is removed), `hash` (HMAC-SHA256 under the
//!   server's key, 64 lowercase hex digits: the same input always gives the
//!   same output, so distinct counts and joins still work, while the input
//!   cannot be recovered without the key), `mask` (see [`mask`]).
//!
//! Rules under `"*"` apply to every tenant; a tenant's own rules add to
//! them and win for the same field.

use std::collections::HashMap;

use ring::hmac;
use serde_json::Value;

/// What happens to a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Drop,
    Hash,
    Mask,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "drop" => Some(Action::Drop),
            "hash" => Some(Action::Hash),
            "mask" => Some(Action::Mask),
            _ => None,
        }
    }
}

/// A rule that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivacyError {
    #[error(
        "privacy.{tenant}: field {field:?} cannot be redacted; name user_id, session_id or properties.<name>"
    )]
    Field { tenant: String, field: String },
    #[error(
        "privacy.{tenant}: {field} = {action:?} is not an action; write \"drop\", \"hash\" or \"mask\""
    )]
    Action {
        tenant: String,
        field: String,
        action: String,
    },
}

/// The redaction rules of one tenant (its own merged over `"*"`).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    user_id: Option<Action>,
    session_id: Option<Action>,
    /// `(name after "properties.", action)`.
    props: Vec<(String, Action)>,
}

impl Rules {
    fn set(&mut self, tenant: &str, field: &str, action: Action) -> Result<(), PrivacyError> {
        match field {
            "user_id" => self.user_id = Some(action),
            "session_id" => self.session_id = Some(action),
            _ => match field.strip_prefix("properties.") {
                Some(name) if !name.is_empty() => {
                    self.props.retain(|(n, _)| n != name);
                    self.props.push((name.to_string(), action));
                }
                _ => {
                    return Err(PrivacyError::Field {
                        tenant: tenant.into(),
                        field: field.into(),
                    });
                }
            },
        }
        Ok(())
    }

    /// The action for a top-level property key, if a rule names it.
    pub(crate) fn prop(&self, key: &str) -> Option<Action> {
        self.props.iter().find(|(n, _)| n == key).map(|&(_, a)| a)
    }

    /// Rules reaching inside the object held by property `key`:
    /// `(rest of the path, action)`.
    fn nested<'r>(&'r self, key: &'r str) -> impl Iterator<Item = (&'r str, Action)> + 'r {
        self.props.iter().filter_map(move |(n, a)| {
            n.strip_prefix(key)
                .and_then(|r| r.strip_prefix('.'))
                .map(|r| (r, *a))
        })
    }

    pub(crate) fn user_id(&self) -> Option<Action> {
        self.user_id
    }

    pub(crate) fn session_id(&self) -> Option<Action> {
        self.session_id
    }
}

/// Every tenant's rules and the hashing key.
pub struct Privacy {
    key: hmac::Key,
    all: Option<Rules>,
    tenants: HashMap<String, Rules>,
}

impl std::fmt::Debug for Privacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Privacy")
            .field("all", &self.all)
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

/// What stands in for a quoted value in an error message.
pub const REDACTED: &str = "[redacted]";

impl Privacy {
    /// `rules`: per tenant (`"*"`: every tenant), `(field, action)` pairs
    /// as configured. `key` is the HMAC key of `hash`.
    pub fn new<T, F>(key: &[u8], rules: T) -> Result<Privacy, PrivacyError>
    where
        T: IntoIterator<Item = (String, F)>,
        F: IntoIterator<Item = (String, String)>,
    {
        let mut parsed: HashMap<String, Rules> = HashMap::new();
        for (tenant, fields) in rules {
            let r = parsed.entry(tenant.clone()).or_default();
            for (field, action) in fields {
                let a = Action::parse(&action).ok_or_else(|| PrivacyError::Action {
                    tenant: tenant.clone(),
                    field: field.clone(),
                    action: action.clone(),
                })?;
                r.set(&tenant, &field, a)?;
            }
        }
        let all = parsed.remove("*");
        let tenants = parsed
            .into_iter()
            .map(|(t, own)| {
                let mut merged = all.clone().unwrap_or_default();
                merged.user_id = own.user_id.or(merged.user_id);
                merged.session_id = own.session_id.or(merged.session_id);
                for (n, a) in own.props {
                    merged.props.retain(|(m, _)| *m != n);
                    merged.props.push((n, a));
                }
                (t, merged)
            })
            .collect();
        Ok(Privacy {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            all,
            tenants,
        })
    }

    /// Whether any rule hashes (then the key matters).
    pub fn hashes(&self) -> bool {
        self.all.iter().chain(self.tenants.values()).any(|r| {
            r.user_id == Some(Action::Hash)
                || r.session_id == Some(Action::Hash)
                || r.props.iter().any(|(_, a)| *a == Action::Hash)
        })
    }

    /// The rules for `tenant`, if any apply.
    pub fn rules(&self, tenant: &str) -> Option<&Rules> {
        self.tenants.get(tenant).or(self.all.as_ref())
    }

    /// HMAC-SHA256 of `input` under the key, in lowercase hex.
    pub fn hash(&self, input: &str) -> String {
        let tag = hmac::sign(&self.key, input.as_bytes());
        let mut out = String::with_capacity(64);
        for b in tag.as_ref() {
            out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            out.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
        }
        out
    }

    /// The redacted form of a string value (`None`: dropped).
    pub fn apply_str(&self, action: Action, s: &str) -> Option<String> {
        match action {
            Action::Drop => None,
            Action::Hash => Some(self.hash(s)),
            Action::Mask => Some(mask(s)),
        }
    }

    /// The redacted form of a JSON value (`None`: dropped). Strings are
    /// hashed or masked as their text, other values as their JSON text;
    /// `null` stays `null`.
    pub fn apply_value(&self, action: Action, v: &Value) -> Option<Value> {
        match v {
            Value::Null => (action != Action::Drop).then_some(Value::Null),
            Value::String(s) => self.apply_str(action, s).map(Value::String),
            other => self
                .apply_str(action, &other.to_string())
                .map(Value::String),
        }
    }

    /// Redacts property `value` (held by key `key`) where a rule reaches
    /// inside it. Returns `None` when no rule does.
    pub(crate) fn nested(&self, rules: &Rules, key: &str, value: &Value) -> Option<Value> {
        let mut inner: Vec<(&str, Action)> = rules.nested(key).collect();
        if inner.is_empty() || !value.is_object() {
            return None;
        }
        let mut v = value.clone();
        inner.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (path, action) in inner {
            self.apply_path(&mut v, path, action);
        }
        Some(v)
    }

    /// Applies `action` at `path` (dot-separated, a key with dots matched
    /// whole first) inside object `v`.
    fn apply_path(&self, v: &mut Value, path: &str, action: Action) {
        let Some(obj) = v.as_object_mut() else { return };
        if let Some(x) = obj.get_mut(path) {
            match self.apply_value(action, x) {
                Some(r) => *x = r,
                None => {
                    obj.remove(path);
                }
            }
            return;
        }
        for (i, _) in path.match_indices('.') {
            let (head, rest) = (&path[..i], &path[i + 1..]);
            if let Some(child) = obj.get_mut(head)
                && child.is_object()
            {
                self.apply_path(child, rest, action);
                return;
            }
        }
    }

    /// A rejected event's text as the malformed DLQ may keep it, and the
    /// error message with every redacted value replaced by [`REDACTED`].
    /// `tenant` is the one it is filed under; the tenant the event names,
    /// when it has rules, wins. Text that is not a JSON object cannot be
    /// redacted field by field: for a tenant with rules it is withheld.
    pub fn redact_rejection(&self, tenant: &str, error: String, raw: &str) -> (String, String) {
        let parsed: Option<Value> = serde_json::from_str(raw).ok();
        let named = parsed
            .as_ref()
            .and_then(|v| v.get("tenant"))
            .and_then(Value::as_str);
        let rules = named
            .and_then(|t| self.tenants.get(t))
            .or_else(|| self.rules(tenant));
        let Some(rules) = rules else {
            return (error, raw.to_string());
        };
        let Some(Value::Object(mut obj)) = parsed else {
            let withheld = format!(
                "[withheld: {} bytes that are not a JSON object, so the privacy rules of tenant {tenant:?} could not be applied field by field]",
                raw.len()
            );
            return (scrub_unparsed(error), withheld);
        };
        let mut originals: Vec<String> = Vec::new();
        for (field, action) in [("user_id", rules.user_id), ("session_id", rules.session_id)] {
            let Some(action) = action else { continue };
            if let Some(v) = obj.get(field) {
                collect_strings(v, &mut originals);
                match self.apply_value(action, v) {
                    Some(r) => {
                        obj.insert(field.into(), r);
                    }
                    None => {
                        obj.remove(field);
                    }
                }
            }
        }
        if let Some(Value::Object(props)) = obj.get_mut("properties") {
            let keys: Vec<String> = props.keys().cloned().collect();
            for k in keys {
                if let Some(action) = rules.prop(&k) {
                    if let Some(v) = props.get(&k) {
                        collect_strings(v, &mut originals);
                        match self.apply_value(action, v) {
                            Some(r) => {
                                props.insert(k, r);
                            }
                            None => {
                                props.remove(&k);
                            }
                        }
                    }
                } else if let Some(v) = props.get(&k)
                    && let Some(r) = self.nested(rules, &k, v)
                {
                    collect_changed(v, &r, &mut originals);
                    props.insert(k, r);
                }
            }
        }
        let raw = Value::Object(obj).to_string();
        (scrub(error, &originals), raw)
    }
}

/// The string forms of `v` (itself, or its leaves) that a message could quote.
fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Null => {}
        Value::String(s) => {
            if !s.is_empty() {
                out.push(s.clone());
                // Messages quote values as JSON text, escapes and all.
                let quoted = Value::String(s.clone()).to_string();
                out.push(quoted[1..quoted.len() - 1].to_string());
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        other => out.push(other.to_string()),
    }
}

/// The leaves of `before` that `after` no longer holds.
fn collect_changed(before: &Value, after: &Value, out: &mut Vec<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, bv) in b {
                match a.get(k) {
                    Some(av) => collect_changed(bv, av, out),
                    None => collect_strings(bv, out),
                }
            }
        }
        (b, a) if b != a => collect_strings(b, out),
        _ => {}
    }
}

/// `msg` with every occurrence of a value in `values` (longest first) replaced.
fn scrub(mut msg: String, values: &[String]) -> String {
    let mut vs: Vec<&String> = values.iter().filter(|v| !v.is_empty()).collect();
    vs.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in vs {
        if msg.contains(v.as_str()) {
            msg = msg.replace(v.as_str(), REDACTED);
        }
    }
    msg
}

/// A message about text that is not a JSON object may quote any of it:
/// keep the field name before the first `:` only.
fn scrub_unparsed(msg: String) -> String {
    match msg.split_once(':') {
        Some((field, _)) => format!("{field}: {REDACTED} (tenant has privacy rules)"),
        None => msg,
    }
}

/// A value with most of it hidden:
/// - an IPv4 address keeps its first three octets (`203.0.113.0`), an IPv6
///   address its first three groups (`2001:db8:85a3::`): the network, not
///   the host;
/// - an e-mail address keeps the first character and the domain
///   (`a***@example.com`);
/// - anything else keeps its last 4 characters when it has more than 8
///   (`************1111`), else nothing (`*****`).
pub fn mask(s: &str) -> String {
    if let Ok(ip) = s.parse::<std::net::Ipv4Addr>() {
        let o = ip.octets();
        return std::net::Ipv4Addr::new(o[0], o[1], o[2], 0).to_string();
    }
    if let Ok(ip) = s.parse::<std::net::Ipv6Addr>() {
        let g = ip.segments();
        return std::net::Ipv6Addr::new(g[0], g[1], g[2], 0, 0, 0, 0, 0).to_string();
    }
    if let Some((local, domain)) = s.split_once('@')
        && !local.is_empty()
        && domain.contains('.')
        && !domain.contains('@')
    {
        let first = local.chars().next().unwrap_or('*');
        return format!("{first}***@{domain}");
    }
    let n = s.chars().count();
    if n > 8 {
        let keep: String = s.chars().skip(n - 4).collect();
        format!("{}{keep}", "*".repeat(n - 4))
    } else {
        "*".repeat(n.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn privacy(rules: &[(&str, &[(&str, &str)])]) -> Privacy {
        Privacy::new(
            b"k",
            rules.iter().map(|(t, f)| {
                (
                    t.to_string(),
                    f.iter()
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .collect::<Vec<_>>(),
                )
            }),
        )
        .unwrap()
    }

    #[test]
    fn hash_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let p = Privacy::new(b"Jefe", Vec::<(String, Vec<(String, String)>)>::new()).unwrap();
        assert_eq!(
            p.hash("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask("203.0.113.77"), "203.0.113.0");
        assert_eq!(mask("2001:db8:85a3:1:2:3:4:5"), "2001:db8:85a3::");
        assert_eq!(mask("alice@example.com"), "a***@example.com");
        assert_eq!(mask("4111111111111111"), "************1111");
        assert_eq!(mask("secret"), "******");
        assert_eq!(mask(""), "*");
    }

    #[test]
    fn tenant_rules_merge_over_star() {
        let p = privacy(&[
            ("*", &[("user_id", "hash"), ("properties.email", "drop")]),
            ("acme", &[("properties.email", "mask")]),
        ]);
        let acme = p.rules("acme").unwrap();
        assert_eq!(acme.user_id(), Some(Action::Hash));
        assert_eq!(acme.prop("email"), Some(Action::Mask));
        assert_eq!(p.rules("other").unwrap().prop("email"), Some(Action::Drop));
        assert!(p.hashes());
    }

    #[test]
    fn bad_rules_name_the_fix() {
        let e = Privacy::new(
            b"k",
            [(
                "acme".to_string(),
                [("email".to_string(), "drop".to_string())],
            )],
        )
        .unwrap_err();
        assert!(e.to_string().contains("properties.<name>"), "{e}");
        let e = Privacy::new(
            b"k",
            [(
                "acme".to_string(),
                [("user_id".to_string(), "encrypt".to_string())],
            )],
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"mask\""), "{e}");
    }

    #[test]
    fn rejections_are_redacted_and_messages_scrubbed() {
        let p = privacy(&[(
            "acme",
            &[
                ("user_id", "hash"),
                ("properties.email", "drop"),
                ("properties.geo.ip", "mask"),
            ],
        )]);
        let raw = r#"{"event_id":"1","tenant":"acme","user_id":"bob-secret","properties":{"email":"bob@corp.example","geo":{"ip":"198.51.100.23","city":"x"}}}"#;
        let (err, kept) = p.redact_rejection(
            "default",
            "properties.email: expected int, got \"bob@corp.example\"".into(),
            raw,
        );
        assert!(!err.contains("bob@corp"), "{err}");
        assert!(err.contains(REDACTED));
        for secret in ["bob-secret", "bob@corp.example", "198.51.100.23"] {
            assert!(!kept.contains(secret), "{kept}");
        }
        assert!(kept.contains("198.51.100.0"), "{kept}");
        assert!(kept.contains(&p.hash("bob-secret")), "{kept}");

        let (_, kept) = p.redact_rejection("acme", "json: eof".into(), "{\"user_id\": \"bob-sec");
        assert!(kept.starts_with("[withheld"), "{kept}");
        // No rules: as it was; the tenant an event names wins.
        let other = raw.replace("\"acme\"", "\"beta\"");
        let (_, kept) = p.redact_rejection("beta", "x: y".into(), &other);
        assert_eq!(kept, other);
        let (_, kept) = p.redact_rejection("beta", "x: y".into(), raw);
        assert!(!kept.contains("bob-secret"), "{kept}");
    }
}
