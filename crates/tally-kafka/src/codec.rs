//! The records Tally writes to the aggregates topic (format version 1).
//!
//! Every key and value starts with the format version byte (`1`); the key's
//! second byte says what the record is. Integers are little-endian; a
//! string is a `u32` length and its UTF-8 bytes (`tally_types::bin`).
//!
//! **Aggregate** — the whole aggregate of one (tenant, minute, event type)
//! as counted from one partition of the events topic. Written when the
//! minute is final for that partition (its watermark past the minute and
//! the allowed lateness), while the minute is small (a first commit, a
//! quiet bucket), after 64 deltas, and again if a backfill or a replayed
//! late event changes a final minute:
//!
//! ```text
//! key:   01 'A' | u32 source partition | i64 minute (ms since epoch) | str tenant | str event type
//! value: 01 | u64 count | HLL users | HLL sessions | u32 n | n × (str property | numeric aggregate)
//!           [| u32 m | m × (str combination | aggregate without combinations)]
//! ```
//!
//! The combinations (added within version 1, flagged by bit 31 of `n`;
//! absent: none) are the same aggregate split by the tenant's declared
//! dimensions, one per combination of values that occurred, keyed
//! `name=value` pairs joined by `\x1f` (`tally_store::dims`), sorted.
//!
//! Otherwise a transaction writes what its events added to the minute as
//! a *delta* record (below), so its bytes follow its events, not the size
//! the minute has grown to. A whole value replaces the deltas before it:
//! the same transaction writes a tombstone (no value) for each of them. So a reader
//! that keeps the last value per key (a tombstone deleting its key) and
//! merges the keys of a (tenant, minute, event type) over source
//! partitions and deltas (counts and sums add, sketches merge) holds the
//! exact total after every transaction, and compaction leaves one whole
//! value per final minute and partition.
//!
//! No aggregate value passes 256 KiB (`worker::MAX_VALUE_BYTES`; a broker
//! refuses records past its `max.message.bytes`, 1 MB by default): a
//! larger one is split by combination ([`agg_values`]). A whole value's
//! record then holds the totals and the first combinations, and deltas of
//! the same transaction (new keys, tombstoned by the bucket's next whole
//! value like any delta) hold the rest, each with a count of 0 and empty
//! sketches besides its combinations; a large delta is likewise several
//! deltas. The reading above gives the same totals. (Topics written before deltas
//! were used for open minutes hold whole values in every transaction;
//! the same reading gives the same totals.)
//!
//! **Partition state** — where the processing of one source partition
//! stands after the transaction that wrote it (always the transaction's last
//! record for that partition, in the same aggregates partition as its
//! aggregates, so a reader that applies a partition's aggregates when its
//! state arrives sees whole transactions):
//!
//! ```text
//! key:   01 'S' | u32 source partition
//! value: 01 | u64 next offset | u64 replay-from offset | str node | i64 committed at (ms)
//!           | u32 n | n × (str tenant | i64 watermark or i64::MIN)
//!           | u64 counted | u64 duplicates | u64 late | bytes event clocks
//!           [| u64 raw-from offset [| i64 last message time (ms) [| i64 cut]]]
//! ```
//!
//! The cut (added within version 1; absent: none) is the start of the
//! hour before which the partition writes only deltas, never whole
//! minute values again: it rises with the wall clock by the minute
//! retention, and never falls, even across owners. Readers fold minutes
//! into hours behind the lowest cut of all partitions (less an hour).
//!
//! The raw-from offset (added within version 1; absent: the next offset)
//! is where the partition's raw events not yet in archive files begin: a
//! new owner rebuilds them from there. The last message time (added
//! within version 1; absent: none) is the timestamp of the last message
//! the state covers: how fresh the partition's numbers are.
//!
//! **Delta** — what the events of one transaction added to one (tenant,
//! minute, event type) of one partition: the aggregate of those events
//! alone, added to what readers hold (the minute, or its hour once
//! folded). Unique per transaction (the state's next offset and a
//! sequence number). From the partition's *cut* on (see the partition
//! state) the whole value that closes the minute replaces its deltas
//! with tombstones; behind the cut (a stuck tenant's event, a backfill,
//! a replayed late event) no whole value comes any more and compaction
//! keeps every delta:
//!
//! ```text
//! key:   01 'D' | u32 source partition | u64 at (next offset of the state) | u32 seq
//!           | i64 minute | str tenant | str event type
//! value: the aggregate, as for an aggregate record
//! ```
//!
//! **Sealed files** — raw events of one source partition's offsets
//! `[from, to)` sealed into Parquet files of the archive (one per tenant
//! and hour), written in the transaction that moves raw-from to `to`, so
//! the files a reader lists are exactly the committed ones:
//!
//! ```text
//! key:   01 'F' | u32 source partition | u64 from
//! value: 01 | u64 to | u32 n | n × (str path | str tenant | i64 min ts | i64 max ts | u64 rows | u64 bytes)
//! ```
//!
//! **Replaced files** — archive files of one source partition that
//! compaction merged into one (`added`), or that archive retention
//! removed (no `added`); readers stop listing `removed` and list
//! `added` (the merged file's name carries the offset range it covers).
//! Keys are new for every record: an idle partition writes several
//! rounds at one next offset, whose sequence numbers continue past the
//! last committed record at that offset, so compaction keeps each:
//!
//! ```text
//! key:   01 'K' | u32 source partition | u64 at (next offset of the state) | u32 seq
//! value: 01 | u32 n | n × str removed path | u8 0 or 1 | [u64 from | u64 to | file as above]
//! ```
//!
//! **Session changes** — closed sessions of one source partition that
//! events of one transaction changed (added within version 1; a reader
//! that does not know the kind skips it), per tenant. Sessions stay in
//! one partition (ingest keys by session or user), so its owner sees
//! them whole. Unique per transaction, like deltas:
//!
//! ```text
//! key:   01 'C' | u32 source partition | u64 at (next offset of the state) | u32 seq
//! value: 01 | str tenant | i64 told at (ms) | u32 n | n × change
//! change:  u8 0 (changed) | session old | session new
//!        | u8 1 (appeared) | session
//!        | u8 2 (merged)   | session old | str id of the session it joined
//! session: u8 derived | str id (empty if derived: `<user>:<start>`) | u8 0/1 [str user]
//!        | i64 start | i64 end | u64 events | u8 0/1 [str first page] | u8 0/1 [str last page]
//!        | u32 k | k × str event type
//!          (`tally_store::Session::encode`, the sessions journal's layout)
//! ```
//!
//! Many changes of one tenant (sessions closing together) take several
//! records of at most 256 KiB ([`sessions_values`]), in order.
//!
//! **Late events** (the late topic, JSON, not versioned bytes): one
//! message per event counted by no window, written in the same
//! transaction as the aggregates of its partition. The malformed topic
//! carries malformed events in the same layout (dedupe key 0; from the
//! events topic in the transaction of their partition, from HTTP ingest
//! as they are rejected).
//!
//! ```text
//! key:   <tenant>/<dedupe key, 32 hex digits>
//! value: {"tenant": ..., "reason": ... (names the watermark that judged it),
//!         "received_at": RFC 3339, "event": the event object as sent}
//! ```

use tally_store::{Agg, Session, SessionCorrection};
use tally_types::bin::{Dec, DecodeError, Enc};
use tally_types::time::Millis;

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
const KIND_AGG: u8 = b'A';
const KIND_STATE: u8 = b'S';
const KIND_FILES: u8 = b'F';
const KIND_DELTA: u8 = b'D';
const KIND_REPLACE: u8 = b'K';
const KIND_SESSIONS: u8 = b'C';

/// One sealed archive file (a path relative to the archive root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFile {
    pub path: String,
    pub tenant: String,
    pub min_ts: Millis,
    pub max_ts: Millis,
    pub rows: u64,
    pub bytes: u64,
}

/// The files one seal of a source partition wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub partition: u32,
    pub from: u64,
    pub to: u64,
    pub files: Vec<SealedFile>,
}

/// Key of one aggregate record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggKey {
    pub partition: u32,
    pub minute: Millis,
    pub tenant: Box<str>,
    pub event_type: Box<str>,
}

/// Archive files of one source partition replaced (compaction) or
/// removed (retention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub partition: u32,
    pub at: u64,
    pub seq: u32,
    pub removed: Vec<String>,
    /// The merged file and the offset range `[from, to)` it covers.
    pub added: Option<(u64, u64, SealedFile)>,
}

/// Key of one delta record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaKey {
    pub partition: u32,
    /// The next offset of the state of its transaction.
    pub at: u64,
    pub seq: u32,
    pub minute: Millis,
    pub tenant: Box<str>,
    pub event_type: Box<str>,
}

/// Where processing of one source partition stands.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionState {
    /// The next offset of the events partition to process.
    pub next_offset: u64,
    /// The earliest offset whose events may still have live dedupe entries:
    /// a new owner re-reads from here to rebuild them.
    pub replay_from: u64,
    /// The node that committed it.
    pub node: String,
    pub committed_at: Millis,
    /// Each tenant's watermark in this partition.
    pub watermarks: Vec<(String, Option<Millis>)>,
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    /// The processor's event clocks (`Processor::export_clocks`).
    pub clocks: Vec<u8>,
    /// Raw events from this offset on are not in archive files yet.
    pub raw_from: u64,
    /// The timestamp of the last message this state covers.
    pub last_message_ms: Option<Millis>,
    /// Minutes before this are written as deltas only (`Millis::MIN`:
    /// none).
    pub cut: Millis,
}

/// A decoded key of the aggregates topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Agg(AggKey),
    State(u32),
    /// Sealed files of (source partition, from offset).
    Files(u32, u64),
    Delta(DeltaKey),
    /// Replaced files of (source partition, at, seq).
    Replace(u32, u64, u32),
    /// Session changes of (source partition, at, seq).
    Sessions(u32, u64, u32),
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(
        "aggregates record of format version {0}; this build reads version {VERSION}: upgrade Tally"
    )]
    Version(u8),
    #[error("aggregates record of unknown kind {0:#04x}")]
    Kind(u8),
    #[error("aggregates record is damaged: {0}")]
    Decode(#[from] DecodeError),
}

/// Reads the format version byte: this build's, or an error naming it.
fn version(d: &mut Dec<'_>) -> Result<(), CodecError> {
    match d.u8()? {
        VERSION => Ok(()),
        v => Err(CodecError::Version(v)),
    }
}

pub fn agg_key(k: &AggKey) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u8(KIND_AGG);
    e.u32(k.partition);
    e.i64(k.minute);
    e.str(&k.tenant);
    e.str(&k.event_type);
    e.buf
}

pub fn state_key(partition: u32) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u8(KIND_STATE);
    e.u32(partition);
    e.buf
}

pub fn decode_key(b: &[u8]) -> Result<Key, CodecError> {
    let mut d = Dec::new(b);
    version(&mut d)?;
    match d.u8()? {
        KIND_AGG => Ok(Key::Agg(AggKey {
            partition: d.u32()?,
            minute: d.i64()?,
            tenant: d.str()?.into(),
            event_type: d.str()?.into(),
        })),
        KIND_STATE => Ok(Key::State(d.u32()?)),
        KIND_FILES => Ok(Key::Files(d.u32()?, d.u64()?)),
        KIND_REPLACE => Ok(Key::Replace(d.u32()?, d.u64()?, d.u32()?)),
        KIND_SESSIONS => Ok(Key::Sessions(d.u32()?, d.u64()?, d.u32()?)),
        KIND_DELTA => Ok(Key::Delta(DeltaKey {
            partition: d.u32()?,
            at: d.u64()?,
            seq: d.u32()?,
            minute: d.i64()?,
            tenant: d.str()?.into(),
            event_type: d.str()?.into(),
        })),
        k => Err(CodecError::Kind(k)),
    }
}

pub fn delta_key(k: &DeltaKey) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u8(KIND_DELTA);
    e.u32(k.partition);
    e.u64(k.at);
    e.u32(k.seq);
    e.i64(k.minute);
    e.str(&k.tenant);
    e.str(&k.event_type);
    e.buf
}

pub fn replace_key(r: &Replaced) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u8(KIND_REPLACE);
    e.u32(r.partition);
    e.u64(r.at);
    e.u32(r.seq);
    e.buf
}

/// One tenant's session changes of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionChanges {
    pub tenant: String,
    /// When the owner told them (wall clock).
    pub at: Millis,
    pub changes: Vec<SessionCorrection>,
}

pub fn sessions_key(partition: u32, at: u64, seq: u32) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u8(KIND_SESSIONS);
    e.u32(partition);
    e.u64(at);
    e.u32(seq);
    e.buf
}

pub fn sessions_value(c: &SessionChanges) -> Vec<u8> {
    let mut body = Enc::new();
    for ch in &c.changes {
        put_change(&mut body, ch);
    }
    sessions_frame(c, c.changes.len(), &body.buf)
}

/// The values of a tenant's session changes written as records of at
/// most about `limit` bytes each (several when many sessions closed at
/// once), in order: each a [`sessions_value`] of some of the changes.
pub fn sessions_values(c: &SessionChanges, limit: usize) -> Vec<Vec<u8>> {
    let header = sessions_frame(c, 0, &[]).len();
    let mut out = Vec::new();
    let mut body = Enc::new();
    let mut n = 0;
    for ch in &c.changes {
        let mark = body.buf.len();
        put_change(&mut body, ch);
        if n > 0 && header + body.buf.len() > limit {
            let last = body.buf.split_off(mark);
            out.push(sessions_frame(c, n, &body.buf));
            body.buf = last;
            n = 0;
        }
        n += 1;
    }
    if n > 0 || out.is_empty() {
        out.push(sessions_frame(c, n, &body.buf));
    }
    out
}

fn sessions_frame(c: &SessionChanges, n: usize, changes: &[u8]) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.str(&c.tenant);
    e.i64(c.at);
    e.u32(n as u32);
    e.buf.extend_from_slice(changes);
    e.buf
}

fn put_change(e: &mut Enc, ch: &SessionCorrection) {
    match ch {
        SessionCorrection::Changed { old, new } => {
            e.u8(0);
            old.encode(e);
            new.encode(e);
        }
        SessionCorrection::Appeared(s) => {
            e.u8(1);
            s.encode(e);
        }
        SessionCorrection::MergedInto { old, into } => {
            e.u8(2);
            old.encode(e);
            e.str(into);
        }
    }
}

pub fn decode_sessions(b: &[u8]) -> Result<SessionChanges, CodecError> {
    let mut d = Dec::new(b);
    version(&mut d)?;
    let tenant = d.str()?.to_string();
    let at = d.i64()?;
    let n = d.count(1)?;
    let mut changes = Vec::with_capacity(n);
    for _ in 0..n {
        changes.push(match d.u8()? {
            0 => SessionCorrection::Changed {
                old: Session::decode(&mut d)?,
                new: Session::decode(&mut d)?,
            },
            1 => SessionCorrection::Appeared(Session::decode(&mut d)?),
            2 => SessionCorrection::MergedInto {
                old: Session::decode(&mut d)?,
                into: d.str()?.to_string(),
            },
            k => return Err(CodecError::Kind(k)),
        });
    }
    Ok(SessionChanges {
        tenant,
        at,
        changes,
    })
}

fn put_file(e: &mut Enc, f: &SealedFile) {
    e.str(&f.path);
    e.str(&f.tenant);
    e.i64(f.min_ts);
    e.i64(f.max_ts);
    e.u64(f.rows);
    e.u64(f.bytes);
}

fn get_file(d: &mut Dec<'_>) -> Result<SealedFile, CodecError> {
    Ok(SealedFile {
        path: d.str()?.to_string(),
        tenant: d.str()?.to_string(),
        min_ts: d.i64()?,
        max_ts: d.i64()?,
        rows: d.u64()?,
        bytes: d.u64()?,
    })
}

pub fn replace_value(r: &Replaced) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u32(r.removed.len() as u32);
    for p in &r.removed {
        e.str(p);
    }
    match &r.added {
        Some((from, to, f)) => {
            e.u8(1);
            e.u64(*from);
            e.u64(*to);
            put_file(&mut e, f);
        }
        None => e.u8(0),
    }
    e.buf
}

pub fn decode_replace(partition: u32, at: u64, seq: u32, b: &[u8]) -> Result<Replaced, CodecError> {
    let mut d = Dec::new(b);
    version(&mut d)?;
    let n = d.count(4)?;
    let mut removed = Vec::with_capacity(n);
    for _ in 0..n {
        removed.push(d.str()?.to_string());
    }
    let added = if d.u8()? == 1 {
        let from = d.u64()?;
        let to = d.u64()?;
        Some((from, to, get_file(&mut d)?))
    } else {
        None
    };
    Ok(Replaced {
        partition,
        at,
        seq,
        removed,
        added,
    })
}

pub fn agg_value(a: &Agg) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    a.encode(&mut e);
    e.buf
}

/// The values of an aggregate written as records of at most about `limit`
/// bytes each: one value, or the parts of [`Agg::split`] (its sketches,
/// properties and dimension combinations spread over them), which a
/// reader merges like deltas.
pub fn agg_values(a: &Agg, limit: usize) -> Vec<Vec<u8>> {
    let v = agg_value(a);
    if v.len() <= limit {
        return vec![v];
    }
    a.split(limit.saturating_sub(1))
        .iter()
        .map(agg_value)
        .collect()
}

pub fn decode_agg(b: &[u8]) -> Result<Agg, CodecError> {
    let mut d = Dec::new(b);
    version(&mut d)?;
    Ok(Agg::decode(&mut d)?)
}

pub fn state_value(s: &PartitionState) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u64(s.next_offset);
    e.u64(s.replay_from);
    e.str(&s.node);
    e.i64(s.committed_at);
    e.u32(s.watermarks.len() as u32);
    for (t, w) in &s.watermarks {
        e.str(t);
        e.i64(w.unwrap_or(Millis::MIN));
    }
    e.u64(s.counted);
    e.u64(s.duplicates);
    e.u64(s.late);
    e.bytes(&s.clocks);
    e.u64(s.raw_from);
    e.opt_i64(s.last_message_ms);
    e.i64(s.cut);
    e.buf
}

pub fn files_key(partition: u32, from: u64) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u8(KIND_FILES);
    e.u32(partition);
    e.u64(from);
    e.buf
}

pub fn files_value(s: &Sealed) -> Vec<u8> {
    let mut e = Enc::new();
    e.u8(VERSION);
    e.u64(s.to);
    e.u32(s.files.len() as u32);
    for f in &s.files {
        put_file(&mut e, f);
    }
    e.buf
}

/// The value of a [`Key::Files`] record.
pub fn decode_files(partition: u32, from: u64, b: &[u8]) -> Result<Sealed, CodecError> {
    let mut d = Dec::new(b);
    version(&mut d)?;
    let to = d.u64()?;
    let n = d.count(40)?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        files.push(get_file(&mut d)?);
    }
    Ok(Sealed {
        partition,
        from,
        to,
        files,
    })
}

pub fn decode_state(b: &[u8]) -> Result<PartitionState, CodecError> {
    let mut d = Dec::new(b);
    version(&mut d)?;
    let next_offset = d.u64()?;
    let replay_from = d.u64()?;
    let node = d.str()?.to_string();
    let committed_at = d.i64()?;
    let n = d.count(12)?;
    let mut watermarks = Vec::with_capacity(n);
    for _ in 0..n {
        let t = d.str()?.to_string();
        let w = d.i64()?;
        watermarks.push((t, (w != Millis::MIN).then_some(w)));
    }
    let counted = d.u64()?;
    let duplicates = d.u64()?;
    let late = d.u64()?;
    let clocks = d.bytes()?.to_vec();
    let raw_from = if d.is_empty() { next_offset } else { d.u64()? };
    let last_message_ms = if d.is_empty() { None } else { d.opt_i64()? };
    let cut = if d.is_empty() { Millis::MIN } else { d.i64()? };
    Ok(PartitionState {
        next_offset,
        replay_from,
        node,
        committed_at,
        watermarks,
        counted,
        duplicates,
        late,
        clocks,
        raw_from,
        last_message_ms,
        cut,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg() -> Agg {
        let mut a = Agg {
            count: 3,
            ..Agg::default()
        };
        a.users.insert(42);
        a.sessions.insert(7);
        let mut n = tally_store::NumAgg::default();
        n.add(12.5);
        a.props.push(("revenue".into(), n));
        a
    }

    fn state() -> PartitionState {
        PartitionState {
            next_offset: 42,
            replay_from: 17,
            node: "n1".into(),
            committed_at: 5,
            watermarks: vec![("acme".into(), Some(9)), ("b".into(), None)],
            counted: 1,
            duplicates: 2,
            late: 3,
            clocks: vec![1, 2, 3],
            raw_from: 40,
            last_message_ms: Some(1_700_000_000_000),
            cut: 1_699_000_000_000,
        }
    }

    /// An archive file of partition 2's offsets `[from, to)`.
    fn file(from: u64, to: u64) -> SealedFile {
        SealedFile {
            path: format!("tenant=a/date=2026-11-01/hour=12/kafka-ev-p2-{from}-{to}.parquet"),
            tenant: "a".into(),
            min_ts: 1,
            max_ts: 9,
            rows: 80,
            bytes: 4096,
        }
    }

    fn replaced(added: Option<(u64, u64, SealedFile)>) -> Replaced {
        Replaced {
            partition: 2,
            at: 91,
            seq: 1,
            removed: vec!["x.parquet".into(), "y.parquet".into()],
            added,
        }
    }

    /// Changes of every kind, over explicit, derived and userless sessions.
    fn changes() -> SessionChanges {
        let s = |id: &str, user: Option<&str>, events: u64, page: Option<&str>| Session {
            session_id: id.into(),
            derived: user.is_some_and(|u| id.starts_with(u)),
            user_id: user.map(Into::into),
            start: 1_700_000_000_000,
            end: 1_700_000_000_000 + 60_000 * events as i64,
            events,
            first_page: page.map(Into::into),
            last_page: None,
            event_types: ["click", "page_view"].map(String::from).into(),
        };
        SessionChanges {
            tenant: "acme".into(),
            at: 1_700_000_500_000,
            changes: vec![
                SessionCorrection::Changed {
                    old: s("s1", Some("u1"), 2, Some("/home")),
                    new: s("s1", Some("u1"), 3, Some("/home")),
                },
                SessionCorrection::Appeared(s("u2:1700000000000", Some("u2"), 1, None)),
                SessionCorrection::MergedInto {
                    old: s("u3:1700000000000", Some("u3"), 4, Some("/é")),
                    into: "u3:1699999000000".into(),
                },
                SessionCorrection::Appeared(s("anon", None, 1, None)),
            ],
        }
    }

    #[test]
    fn keys_and_values_round_trip() {
        let k = AggKey {
            partition: 7,
            minute: 1_700_000_040_000,
            tenant: "acme".into(),
            event_type: "page_view".into(),
        };
        assert_eq!(decode_key(&agg_key(&k)).unwrap(), Key::Agg(k));
        assert_eq!(decode_key(&state_key(3)).unwrap(), Key::State(3));
        let a = agg();
        assert_eq!(decode_agg(&agg_value(&a)).unwrap(), a);
        let s = state();
        assert_eq!(decode_state(&state_value(&s)).unwrap(), s);
        // A state written before the cut existed has none.
        let mut old = state_value(&s);
        old.truncate(old.len() - 8);
        let back = decode_state(&old).unwrap();
        assert_eq!(back.cut, Millis::MIN);
        assert_eq!(back.last_message_ms, s.last_message_ms);
        // One written before raw-from existed reads as all sealed.
        old.truncate(old.len() - 8 - 9);
        let back = decode_state(&old).unwrap();
        assert_eq!(back.raw_from, s.next_offset);
        let dk = DeltaKey {
            partition: 3,
            at: 99,
            seq: 4,
            minute: 1_700_000_040_000,
            tenant: "acme".into(),
            event_type: "click".into(),
        };
        assert_eq!(decode_key(&delta_key(&dk)).unwrap(), Key::Delta(dk));
        for added in [None, Some((10, 90, file(10, 90)))] {
            let r = replaced(added);
            assert_eq!(
                decode_key(&replace_key(&r)).unwrap(),
                Key::Replace(2, 91, 1)
            );
            assert_eq!(decode_replace(2, 91, 1, &replace_value(&r)).unwrap(), r);
        }
        let f = Sealed {
            partition: 2,
            from: 100,
            to: 180,
            files: vec![file(100, 180)],
        };
        assert_eq!(decode_key(&files_key(2, 100)).unwrap(), Key::Files(2, 100));
        assert_eq!(decode_files(2, 100, &files_value(&f)).unwrap(), f);
    }

    #[test]
    fn session_changes_round_trip() {
        let c = changes();
        assert_eq!(
            decode_key(&sessions_key(4, 120, 2)).unwrap(),
            Key::Sessions(4, 120, 2)
        );
        let v = sessions_value(&c);
        assert_eq!(decode_sessions(&v).unwrap(), c);
        // Cut short anywhere: an error, never a panic or a wrong value.
        for n in 0..v.len() {
            assert!(decode_sessions(&v[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn many_session_changes_take_several_records_in_order() {
        let c = changes();
        let whole = sessions_value(&c);
        assert_eq!(sessions_values(&c, 1 << 20), vec![whole.clone()]);
        // A limit of about two changes: several records, each within it
        // (but for a single change larger than the limit), that give the
        // changes back in their order.
        let limit = whole.len() / 2;
        let parts = sessions_values(&c, limit);
        assert!(parts.len() >= 2, "{} parts", parts.len());
        let mut back = Vec::new();
        for p in &parts {
            let d = decode_sessions(p).unwrap();
            assert!(
                p.len() <= limit || d.changes.len() == 1,
                "{} bytes",
                p.len()
            );
            assert_eq!((d.tenant.as_str(), d.at), (c.tenant.as_str(), c.at));
            back.extend(d.changes);
        }
        assert_eq!(back, c.changes);
        // No changes: one empty record, as before.
        let none = SessionChanges {
            changes: Vec::new(),
            ..c
        };
        assert_eq!(sessions_values(&none, 10), vec![sessions_value(&none)]);
    }

    #[test]
    fn a_wide_aggregate_takes_several_records_that_merge_back() {
        let mut a = agg();
        for i in 0..300u64 {
            let mut c = Agg {
                count: 1,
                ..Agg::default()
            };
            c.users.insert(i);
            a.by.insert(format!("country=c{i}").into(), c);
        }
        a.count = 300;
        let whole = agg_value(&a);
        assert_eq!(agg_values(&a, whole.len()), vec![whole.clone()]);
        let limit = 1024;
        let parts = agg_values(&a, limit);
        assert!(parts.len() >= whole.len() / limit, "{} parts", parts.len());
        let mut merged = Agg::default();
        for p in &parts {
            assert!(p.len() <= limit, "{} bytes", p.len());
            merged.merge(&decode_agg(p).unwrap());
        }
        assert_eq!(merged, a);
    }

    /// One valid record of every kind: keys, then values.
    fn samples() -> Vec<Vec<u8>> {
        let r = replaced(Some((10, 90, file(10, 90))));
        vec![
            agg_key(&AggKey {
                partition: 1,
                minute: 60_000,
                tenant: "acme".into(),
                event_type: "click".into(),
            }),
            state_key(3),
            files_key(2, 10),
            replace_key(&r),
            sessions_key(2, 9, 0),
            agg_value(&agg()),
            state_value(&state()),
            files_value(&Sealed {
                partition: 2,
                from: 10,
                to: 90,
                files: vec![file(10, 90)],
            }),
            replace_value(&r),
            sessions_value(&changes()),
        ]
    }

    /// Every reader of the aggregates topic on `b`: an answer or an
    /// error, never a panic.
    fn read_all(b: &[u8]) {
        let _ = decode_key(b);
        let _ = decode_agg(b);
        let _ = decode_state(b);
        let _ = decode_files(1, 2, b);
        let _ = decode_replace(1, 2, 3, b);
        let _ = decode_sessions(b);
        let _ = decode_late_record(b, b);
    }

    proptest::proptest! {
        /// Every record kind, damaged (bytes changed, or cut anywhere) or
        /// replaced by noise, is read without a panic: each node reads the
        /// aggregates topic whoever wrote to it.
        #[test]
        fn damaged_records_never_panic(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            flips in proptest::collection::vec((0usize..4096, 1u8..=255), 1..4),
            cut in 0usize..4096,
        ) {
            read_all(&noise);
            for valid in samples() {
                let mut v = valid.clone();
                for &(i, x) in &flips {
                    let n = v.len();
                    v[i % n] ^= x;
                }
                read_all(&v);
                read_all(&valid[..cut % (valid.len() + 1)]);
            }
        }
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let mut k = state_key(1);
        k[0] = 2;
        let e = decode_key(&k).unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
        assert!(decode_key(&[1, b'Z']).is_err());
        assert!(decode_state(&[1, 0, 0]).is_err());
    }
}

/// The key of a DLQ entry on the late or the malformed topic.
pub fn dlq_key(e: &tally_stream::DlqEntry) -> String {
    format!("{}/{:032x}", e.tenant, e.key)
}

/// The largest DLQ record written with its event whole. Past it (an
/// event of most of a megabyte, or raw text that JSON escaping inflates)
/// the record would pass a broker's `max.message.bytes`, and a refused
/// record aborts its transaction again at every retry: the event is cut
/// to its first [`DLQ_CUT`] bytes, as raw text, and the reason says so.
pub const DLQ_MAX_BYTES: usize = 512 * 1024;
/// What is kept of an event too large for a DLQ record.
pub const DLQ_CUT: usize = 16 * 1024;

/// The value of a DLQ entry on the late or the malformed topic.
pub fn dlq_value(e: &tally_stream::DlqEntry) -> String {
    use tally_stream::DlqBody;
    let event = match &e.body {
        DlqBody::Event(s) => serde_json::from_str::<serde_json::Value>(s)
            .unwrap_or_else(|_| serde_json::Value::String(s.clone())),
        DlqBody::Raw(s) => serde_json::Value::String(s.clone()),
    };
    let value = dlq_json(e, &e.reason, event);
    if value.len() <= DLQ_MAX_BYTES {
        return value;
    }
    let (DlqBody::Event(text) | DlqBody::Raw(text)) = &e.body;
    let cut = tally_types::codec::clip(text, DLQ_CUT);
    let reason = format!(
        "{} (the event's {} bytes were cut to their first {}: too large for one Kafka record)",
        tally_types::codec::clip(&e.reason, 4096),
        text.len(),
        cut.len()
    );
    dlq_json(e, &reason, serde_json::Value::String(cut.to_string()))
}

fn dlq_json(e: &tally_stream::DlqEntry, reason: &str, event: serde_json::Value) -> String {
    serde_json::json!({
        "tenant": e.tenant,
        "reason": reason,
        "received_at": tally_types::time::format_rfc3339(e.received_at),
        "event": event,
    })
    .to_string()
}

/// The late topic's record that a late event was replayed: applied to its
/// window, or skipped (already counted or already applied). Same key as
/// the event's late record.
pub fn replayed_value(tenant: &str, event_id: &str, applied: bool) -> String {
    serde_json::json!({
        "tenant": tenant,
        "event_id": event_id,
        "replayed": true,
        "applied": applied,
    })
    .to_string()
}

/// A record of the late topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LateRecord {
    /// A late event.
    Entry(tally_stream::DlqEntry),
    /// A late event was replayed (see [`replayed_value`]).
    Replayed {
        tenant: String,
        key: u128,
        applied: bool,
    },
}

/// A late-topic message back (`None`: not one).
pub fn decode_late_record(key: &[u8], value: &[u8]) -> Option<LateRecord> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    if v["replayed"] == true {
        let k = std::str::from_utf8(key).ok()?;
        let (_, hex) = k.rsplit_once('/')?;
        return Some(LateRecord::Replayed {
            tenant: v["tenant"].as_str()?.to_string(),
            key: u128::from_str_radix(hex, 16).ok()?,
            applied: v["applied"] == true,
        });
    }
    decode_late(key, value).map(LateRecord::Entry)
}

/// A late-topic message back as a late DLQ entry (`None`: not one).
pub fn decode_late(key: &[u8], value: &[u8]) -> Option<tally_stream::DlqEntry> {
    decode_dlq(key, value, tally_stream::DlqKind::Late)
}

/// A late- or malformed-topic message back as a DLQ entry of `kind`
/// (both topics carry the late-topic layout; a malformed entry's key
/// holds a zero dedupe key).
pub fn decode_dlq(
    key: &[u8],
    value: &[u8],
    kind: tally_stream::DlqKind,
) -> Option<tally_stream::DlqEntry> {
    use tally_stream::{DlqBody, DlqEntry};
    let key = std::str::from_utf8(key).ok()?;
    let (_, hex) = key.rsplit_once('/')?;
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let body = match &v["event"] {
        serde_json::Value::String(s) => DlqBody::Raw(s.clone()),
        serde_json::Value::Null => return None,
        other => DlqBody::Event(other.to_string()),
    };
    Some(DlqEntry {
        kind,
        tenant: v["tenant"].as_str()?.to_string(),
        reason: v["reason"].as_str().unwrap_or_default().to_string(),
        received_at: v["received_at"]
            .as_str()
            .and_then(|s| tally_types::time::parse_rfc3339(s).ok())
            .unwrap_or_default(),
        body,
        key: u128::from_str_radix(hex, 16).ok()?,
        replayed: false,
    })
}

#[cfg(test)]
mod late_tests {
    use tally_stream::{DlqBody, DlqEntry, DlqKind};

    #[test]
    fn a_late_record_reads_back_as_the_entry_it_was() {
        let e = DlqEntry {
            kind: DlqKind::Late,
            tenant: "acme".into(),
            reason: "late: 2026-11-01T12:00:00Z is before the watermark".into(),
            received_at: 1_793_534_400_123,
            body: DlqBody::Event(r#"{"event_id":"e1","event_type":"x"}"#.into()),
            key: 0xdead_beef_0123_4567_89ab_cdef_0011_2233,
            replayed: false,
        };
        let back = super::decode_late(
            super::dlq_key(&e).as_bytes(),
            super::dlq_value(&e).as_bytes(),
        );
        assert_eq!(back, Some(e.clone()));
        assert_eq!(super::decode_late(b"acme/zz", b"{}"), None);
        let done = super::replayed_value("acme", "e1", true);
        assert_eq!(
            super::decode_late_record(super::dlq_key(&e).as_bytes(), done.as_bytes()),
            Some(super::LateRecord::Replayed {
                tenant: "acme".into(),
                key: e.key,
                applied: true
            })
        );
        assert_eq!(super::decode_late(b"x", b"not json"), None);
    }

    #[test]
    fn an_entry_too_large_for_a_record_keeps_its_start_and_says_so() {
        // Control characters: JSON escapes each into six bytes.
        let raw = "\u{1}".repeat(200_000) + "é";
        let e = DlqEntry {
            kind: DlqKind::Malformed,
            tenant: "acme".into(),
            reason: "kafka message user_events/0/7, event 3: not JSON".into(),
            received_at: 1_793_534_400_123,
            body: DlqBody::Raw(raw.clone()),
            key: 0,
            replayed: false,
        };
        let v = super::dlq_value(&e);
        assert!(v.len() <= super::DLQ_MAX_BYTES, "{} bytes", v.len());
        let back = super::decode_dlq(
            super::dlq_key(&e).as_bytes(),
            v.as_bytes(),
            DlqKind::Malformed,
        )
        .unwrap();
        let DlqBody::Raw(kept) = &back.body else {
            panic!("{:?}", back.body)
        };
        assert_eq!(kept.as_str(), &raw[..super::DLQ_CUT]);
        assert!(back.reason.starts_with(&e.reason), "{}", back.reason);
        assert!(
            back.reason
                .contains("200002 bytes were cut to their first 16384"),
            "{}",
            back.reason
        );
        // An object event as large: cut the same way.
        let big = format!(
            r#"{{"event_id":"e1","event_type":"x","properties":{{"blob":"{}"}}}}"#,
            "a".repeat(600_000)
        );
        let e = DlqEntry {
            body: DlqBody::Event(big),
            ..e
        };
        assert!(super::dlq_value(&e).len() <= super::DLQ_MAX_BYTES);
    }
}
