//! API keys as configured in `[auth]`: validated once, kept only as the
//! SHA-256 of their secret, looked up by digest. The HTTP layer decides
//! what a request presenting one may do.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tally_types::valid_tenant;

use crate::config::{AuthSection, ConfigError};

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

    pub(crate) fn bit(self) -> u8 {
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

impl Key {
    /// The tenant every request with this key acts for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The key's name (for logs; never the secret).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the key may do what `need` asks (admin may do everything).
    pub fn allows(&self, need: Scope) -> bool {
        self.scopes & (need.bit() | Scope::Admin.bit()) != 0
    }
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

    /// Origins allowed to call the API from a browser page.
    pub fn cors_origins(&self) -> &[String] {
        &self.cors_origins
    }

    /// Whether `/metrics` is served without a key.
    pub fn public_metrics(&self) -> bool {
        self.public_metrics
    }

    /// The key whose secret has this SHA-256.
    pub fn get(&self, digest: &[u8; 32]) -> Option<&Key> {
        self.by_digest.get(digest)
    }
}
