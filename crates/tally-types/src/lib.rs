//! Shared vocabulary of Tally: event time, the binary batch codec, partition
//! keys and stable hashes. Every other crate depends on this one; it depends
//! on no other Tally crate.

pub mod bin;
pub mod codec;
pub mod histogram;
pub mod json;
pub mod schema;
pub mod time;

pub use codec::{BatchReader, BatchWriter, CodecError, EventView, PropValue, RawEventView};
pub use time::{Clock, Millis};

/// The integer a float holds exactly (whole, within ±9e15), if any: such
/// values are written as JSON integers and accepted where integers are due.
#[inline]
pub fn integral(x: f64) -> Option<i64> {
    (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64)
}

/// Default tenant in open mode.
pub const DEFAULT_TENANT: &str = "default";

/// Stable 64-bit hash (xxh3, fixed seed): identical across processes and
/// versions, so it may be persisted (dedupe state, sketches, partitioning).
#[inline]
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    if parts.len() == 1 {
        return xxhash_rust::xxh3::xxh3_64(parts[0]);
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u32).to_le_bytes());
        h.update(p);
    }
    h.digest()
}

/// The dedupe key of an event: a 128-bit hash of (tenant, event_id). At
/// millions of events a second a 64-bit key would make two distinct live
/// events collide (one silently dropped as a duplicate) about daily; with
/// 128 bits that takes longer than the age of the universe.
#[inline]
pub fn dedupe_key(tenant: &str, event_id: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in [tenant.as_bytes(), event_id.as_bytes()] {
        h.update(&(p.len() as u32).to_le_bytes());
        h.update(p);
    }
    h.digest128()
}

/// The 64-bit dedupe key of checkpoint format 3 and before (read when a
/// state directory of that version is recovered).
#[inline]
pub fn dedupe_key64(tenant: &str, event_id: &str) -> u64 {
    stable_hash(&[tenant.as_bytes(), event_id.as_bytes()])
}

/// The partition of an event: by tenant + session, else user, else event id,
/// so that one session (or user) stays in order within one partition.
#[inline]
pub fn partition_of(
    tenant: &str,
    session_id: Option<&str>,
    user_id: Option<&str>,
    event_id: &str,
    partitions: u32,
) -> u32 {
    let (kind, key): (&[u8], &str) = match (session_id, user_id) {
        (Some(s), _) => (b"s", s),
        (None, Some(u)) => (b"u", u),
        (None, None) => (b"e", event_id),
    };
    (stable_hash(&[tenant.as_bytes(), kind, key.as_bytes()]) % partitions.max(1) as u64) as u32
}

/// Checks a tenant name: 1–64 chars of `[A-Za-z0-9_.-]`, not starting with `.`
/// (tenant names become directory names in the archive).
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && !t.starts_with('.')
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}
