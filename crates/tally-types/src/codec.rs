//! The compact binary form of a batch of validated events.
//!
//! Ingest turns JSON into this form once; the log stores it byte for byte, the
//! processor aggregates straight from it and later stages (raw store) read it:
//! no stage after ingest parses JSON again.
//!
//! Layout of an encoded batch (all integers little-endian):
//!
//! ```text
//! batch  := head:u32 event*     head: bit 31 = correction batch (late events
//!                               re-applied from the DLQ), bits 0..31 = n_events
//! event  := tenant:str16 event_id:str16 event_type:str8 ts:i64
//!           user_id:opt16 session_id:opt16 n_props:u16 prop*
//! prop   := key:str16 tag:u8 value
//! value  := ()            tag 0 null | tag 1 false | tag 2 true
//!         | i64           tag 3 integer
//!         | f64           tag 4 float
//!         | str32         tag 5 string
//!         | str32         tag 6 nested JSON (object or array), as text
//! strN   := len:uN bytes (UTF-8)
//! opt16  := 0xFFFF (absent) | len:u16 bytes
//! ```
//!
//! Invariant: the encoder only writes what [`BatchReader`] accepts; the reader
//! still checks every length, so a corrupt record yields [`CodecError`], never
//! a panic or an out-of-bounds read.

use crate::time::Millis;

/// A property value as kept in the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PropValue<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    /// Nested object or array, kept as JSON text.
    Json(&'a str),
}

impl PropValue<'_> {
    /// The numeric value used by rollups (`sum:`, `avg:`, percentiles...).
    #[inline]
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            PropValue::Int(i) => Some(i as f64),
            PropValue::Float(f) => Some(f),
            _ => None,
        }
    }
}

/// A decoded event borrowing from the batch bytes.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub tenant: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub ts: Millis,
    pub user_id: Option<&'a str>,
    pub session_id: Option<&'a str>,
    props: &'a [u8],
    n_props: u16,
}

impl<'a> EventView<'a> {
    pub fn props(&self) -> PropIter<'a> {
        PropIter {
            buf: self.props,
            left: self.n_props,
        }
    }

    pub fn n_props(&self) -> usize {
        self.n_props as usize
    }

    /// The properties as a JSON object text (the raw-store and DLQ form).
    pub fn props_json(&self) -> String {
        let mut out = String::with_capacity(self.props.len() + 16);
        self.write_props_json(&mut out);
        out
    }

    /// Appends the properties as a JSON object text to `out`.
    pub fn write_props_json(&self, out: &mut String) {
        out.push('{');
        for (i, (k, v)) in self.props().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(out, k);
            out.push(':');
            match v {
                PropValue::Null => out.push_str("null"),
                PropValue::Bool(b) => out.push_str(if b { "true" } else { "false" }),
                PropValue::Int(i) => out.push_str(&i.to_string()),
                PropValue::Float(f) => push_f64(out, f),
                PropValue::Str(s) => push_json_str(out, s),
                PropValue::Json(j) => out.push_str(j),
            }
        }
        out.push('}');
    }

    /// The whole event as a JSON object text.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128 + self.props.len());
        out.push_str("{\"event_id\":");
        push_json_str(&mut out, self.event_id);
        out.push_str(",\"event_type\":");
        push_json_str(&mut out, self.event_type);
        out.push_str(",\"timestamp\":");
        push_json_str(&mut out, &crate::time::format_rfc3339(self.ts));
        out.push_str(",\"tenant\":");
        push_json_str(&mut out, self.tenant);
        if let Some(u) = self.user_id {
            out.push_str(",\"user_id\":");
            push_json_str(&mut out, u);
        }
        if let Some(s) = self.session_id {
            out.push_str(",\"session_id\":");
            push_json_str(&mut out, s);
        }
        out.push_str(",\"properties\":");
        out.push_str(&self.props_json());
        out.push('}');
        out
    }
}

fn push_f64(out: &mut String, f: f64) {
    if f.is_finite() {
        let s = f.to_string();
        out.push_str(&s);
        if !s.contains(['.', 'e', 'E']) {
            out.push_str(".0");
        }
    } else {
        out.push_str("null");
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt event batch at byte {at}: {what}")]
pub struct CodecError {
    pub at: usize,
    pub what: &'static str,
}

/// Iterates over the properties of one event.
pub struct PropIter<'a> {
    buf: &'a [u8],
    left: u16,
}

impl<'a> Iterator for PropIter<'a> {
    type Item = (&'a str, PropValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The reader validated every property when it produced the event view.
        let mut c = Cursor {
            buf: self.buf,
            pos: 0,
        };
        let item = c.prop().ok()?;
        self.buf = &self.buf[c.pos..];
        Some(item)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err<T>(&self, what: &'static str) -> Result<T, CodecError> {
        Err(CodecError { at: self.pos, what })
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() - self.pos < n {
            return self.err("truncated");
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    fn i64(&mut self) -> Result<i64, CodecError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    #[inline]
    fn str(&mut self, len: usize) -> Result<&'a str, CodecError> {
        let b = self.take(len)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s),
            Err(_) => self.err("invalid UTF-8"),
        }
    }

    #[inline]
    fn opt16(&mut self) -> Result<Option<&'a str>, CodecError> {
        match self.u16()? {
            0xFFFF => Ok(None),
            n => self.str(n as usize).map(Some),
        }
    }

    fn prop(&mut self) -> Result<(&'a str, PropValue<'a>), CodecError> {
        let kl = self.u16()? as usize;
        let k = self.str(kl)?;
        let v = match self.u8()? {
            0 => PropValue::Null,
            1 => PropValue::Bool(false),
            2 => PropValue::Bool(true),
            3 => PropValue::Int(self.i64()?),
            4 => PropValue::Float(f64::from_bits(self.i64()? as u64)),
            5 => {
                let n = self.u32()? as usize;
                PropValue::Str(self.str(n)?)
            }
            6 => {
                let n = self.u32()? as usize;
                PropValue::Json(self.str(n)?)
            }
            _ => return self.err("unknown property tag"),
        };
        Ok((k, v))
    }
}

/// Reads events one by one from an encoded batch.
pub struct BatchReader<'a> {
    cur: Cursor<'a>,
    left: u32,
    correction: bool,
}

/// Bit of the batch head that marks a correction batch.
const CORRECTION_BIT: u32 = 1 << 31;

impl<'a> BatchReader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, CodecError> {
        let mut cur = Cursor { buf, pos: 0 };
        let head = cur.u32()?;
        Ok(BatchReader {
            cur,
            left: head & !CORRECTION_BIT,
            correction: head & CORRECTION_BIT != 0,
        })
    }

    /// Whether this batch holds late events re-applied as corrections.
    pub fn is_correction(&self) -> bool {
        self.correction
    }

    pub fn len(&self) -> usize {
        self.left as usize
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    fn read_event(&mut self) -> Result<EventView<'a>, CodecError> {
        let c = &mut self.cur;
        let tl = c.u16()? as usize;
        let tenant = c.str(tl)?;
        let il = c.u16()? as usize;
        let event_id = c.str(il)?;
        let tyl = c.u8()? as usize;
        let event_type = c.str(tyl)?;
        let ts = c.i64()?;
        let user_id = c.opt16()?;
        let session_id = c.opt16()?;
        let n_props = c.u16()?;
        let start = c.pos;
        for _ in 0..n_props {
            c.prop()?;
        }
        let props = &c.buf[start..c.pos];
        Ok(EventView {
            tenant,
            event_id,
            event_type,
            ts,
            user_id,
            session_id,
            props,
            n_props,
        })
    }
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<EventView<'a>, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = self.read_event();
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

/// Builds an encoded batch. Callers validate lengths first (see `tally-ingest`);
/// over-long values are cut at a character boundary rather than corrupting the batch.
#[derive(Debug, Default, Clone)]
pub struct BatchWriter {
    buf: Vec<u8>,
    n: u32,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl BatchWriter {
    pub fn new() -> Self {
        BatchWriter {
            buf: vec![0; 4],
            n: 0,
        }
    }

    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(4));
        buf.extend_from_slice(&[0; 4]);
        BatchWriter { buf, n: 0 }
    }

    pub fn len(&self) -> usize {
        self.n as usize
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }

    /// Starts an event; add its properties with [`BatchWriter::prop`] and then
    /// call [`BatchWriter::finish_event`] with the number of properties written.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_event(
        &mut self,
        tenant: &str,
        event_id: &str,
        event_type: &str,
        ts: Millis,
        user_id: Option<&str>,
        session_id: Option<&str>,
    ) -> usize {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0; 4]);
        }
        let tenant = clip(tenant, u16::MAX as usize);
        self.buf
            .extend_from_slice(&(tenant.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(tenant.as_bytes());
        let event_id = clip(event_id, 0xFFFE);
        self.buf
            .extend_from_slice(&(event_id.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(event_id.as_bytes());
        let event_type = clip(event_type, 255);
        self.buf.push(event_type.len() as u8);
        self.buf.extend_from_slice(event_type.as_bytes());
        self.buf.extend_from_slice(&ts.to_le_bytes());
        for o in [user_id, session_id] {
            match o {
                None => self.buf.extend_from_slice(&0xFFFFu16.to_le_bytes()),
                Some(s) => {
                    let s = clip(s, 0xFFFE);
                    self.buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
                    self.buf.extend_from_slice(s.as_bytes());
                }
            }
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        at
    }

    pub fn prop(&mut self, key: &str, v: PropValue<'_>) {
        let key = clip(key, u16::MAX as usize);
        self.buf
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(key.as_bytes());
        match v {
            PropValue::Null => self.buf.push(0),
            PropValue::Bool(false) => self.buf.push(1),
            PropValue::Bool(true) => self.buf.push(2),
            PropValue::Int(i) => {
                self.buf.push(3);
                self.buf.extend_from_slice(&i.to_le_bytes());
            }
            PropValue::Float(f) => {
                self.buf.push(4);
                self.buf.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            PropValue::Str(s) | PropValue::Json(s) => {
                self.buf
                    .push(if matches!(v, PropValue::Str(_)) { 5 } else { 6 });
                let s = clip(s, u32::MAX as usize);
                self.buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
                self.buf.extend_from_slice(s.as_bytes());
            }
        }
    }

    /// Ends the event started at `at` (the value `begin_event` returned).
    pub fn finish_event(&mut self, at: usize, n_props: u16) {
        self.buf[at..at + 2].copy_from_slice(&n_props.to_le_bytes());
        self.n += 1;
    }

    /// Drops everything written since `len` bytes (used to undo a half-written event).
    pub fn truncate_to(&mut self, len: usize) {
        self.buf.truncate(len);
    }

    /// Copies one already-encoded event.
    pub fn push_view(&mut self, e: &EventView<'_>) {
        let at = self.begin_event(
            e.tenant,
            e.event_id,
            e.event_type,
            e.ts,
            e.user_id,
            e.session_id,
        );
        self.buf.extend_from_slice(e.props);
        self.finish_event(at, e.n_props);
    }

    pub fn finish(self) -> Vec<u8> {
        self.finish_with(0)
    }

    /// Finishes a correction batch (see [`BatchReader::is_correction`]).
    pub fn finish_correction(self) -> Vec<u8> {
        self.finish_with(CORRECTION_BIT)
    }

    fn finish_with(mut self, flags: u32) -> Vec<u8> {
        if self.buf.len() < 4 {
            self.buf.resize(4, 0);
        }
        let head = (self.n & !CORRECTION_BIT) | flags;
        self.buf[0..4].copy_from_slice(&head.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut w = BatchWriter::new();
        let at = w.begin_event("t1", "e1", "click", 42, Some("u1"), None);
        w.prop("n", PropValue::Int(-3));
        w.prop("f", PropValue::Float(1.5));
        w.prop("s", PropValue::Str("hé\"llo"));
        w.prop("j", PropValue::Json("{\"a\":[1,2]}"));
        w.prop("b", PropValue::Bool(true));
        w.prop("z", PropValue::Null);
        w.finish_event(at, 6);
        let at = w.begin_event("t1", "e2", "view", 43, None, Some("s"));
        w.finish_event(at, 0);
        let bytes = w.finish();
        let evs: Vec<_> = BatchReader::new(&bytes)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].event_id, "e1");
        assert_eq!(evs[0].user_id, Some("u1"));
        assert_eq!(evs[0].session_id, None);
        let props: Vec<_> = evs[0].props().collect();
        assert_eq!(props[0], ("n", PropValue::Int(-3)));
        assert_eq!(props[1], ("f", PropValue::Float(1.5)));
        assert_eq!(
            evs[0].props_json(),
            r#"{"n":-3,"f":1.5,"s":"hé\"llo","j":{"a":[1,2]},"b":true,"z":null}"#
        );
        assert_eq!(evs[1].session_id, Some("s"));
        assert_eq!(evs[1].n_props(), 0);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let mut w = BatchWriter::new();
        let at = w.begin_event("t", "e", "x", 1, None, None);
        w.prop("k", PropValue::Str("v"));
        w.finish_event(at, 1);
        let bytes = w.finish();
        for cut in 0..bytes.len() {
            let r = BatchReader::new(&bytes[..cut]).map(|r| r.collect::<Result<Vec<_>, _>>());
            assert!(matches!(r, Err(_) | Ok(Err(_))), "cut at {cut}");
        }
    }
}
