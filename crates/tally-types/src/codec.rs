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
//!                               re-applied from the DLQ), bit 30 = backfill
//!                               batch (history, judged by its tenant's
//!                               backfill clock), bits 0..30 = n_events
//! event  := tenant:str16 event_id:str16 event_type:str8 ts:i64
//!           user_id:opt16 session_id:opt16 n_props:u16 [schema:u32]
//!           (prop* | text)
//!                               bit 15 of n_props: the properties are kept
//!                               as `text`; bit 14: `schema` follows, the
//!                               version of the event type's registered
//!                               schema the properties were checked
//!                               against (absent: the type had none);
//!                               bits 0..14 = how many properties there are
//!                               (ingest allows 256; records written before
//!                               bit 14 meant a version never set it)
//! text   := str32               the properties object as JSON text, compact
//!                               (nothing between tokens), keys and string
//!                               values without escapes: the client's own
//!                               text, which ingest checked (see
//!                               [`BatchWriter::finish_event_json`])
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

/// Bit of `n_props` that marks properties kept as JSON text.
const TEXT_FORM: u16 = 1 << 15;
/// Bit of `n_props` that marks an event carrying its schema version.
const VERSIONED: u16 = 1 << 14;

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

/// [`PropValue`] with its texts as bytes (before the UTF-8 check).
#[derive(Clone, Copy)]
enum RawValue<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Text<'a>),
    Json(&'a [u8]),
}

/// A text of a batch, with the batch bytes that follow it: readers that
/// copy short texts a word at a time may read past its end
/// ([`push_json_in`]).
#[derive(Clone, Copy)]
struct Text<'a> {
    /// The batch from the text's first byte on.
    tail: &'a [u8],
    len: usize,
}

impl<'a> Text<'a> {
    fn bytes(self) -> &'a [u8] {
        &self.tail[..self.len]
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
    /// The version of the event type's registered schema its properties
    /// were checked against at ingest (None: the type had no schema).
    pub schema_version: Option<u32>,
    /// The properties in binary form, or their JSON text ([`TEXT_FORM`]).
    props: &'a [u8],
    n_props: u16,
    /// The JSON text of the properties in text form, checked as UTF-8.
    text: Option<&'a str>,
}

impl<'a> EventView<'a> {
    pub fn props(&self) -> PropIter<'a> {
        let left = self.n_props & !TEXT_FORM;
        PropIter {
            form: match self.text {
                Some(s) => Form::Text { s, pos: 0 },
                None => Form::Binary { buf: self.props },
            },
            left,
        }
    }

    pub fn n_props(&self) -> usize {
        (self.n_props & !TEXT_FORM) as usize
    }

    /// The properties as a JSON object text (the raw-store and DLQ form).
    pub fn props_json(&self) -> String {
        if let Some(s) = self.text {
            return s.to_owned();
        }
        let mut out = Vec::with_capacity(self.props.len() + 16);
        props_json(self.props, self.n_props, &mut out);
        // Escapes are ASCII; only a corrupt record has texts that are not
        // UTF-8, and they are replaced rather than failing the caller.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
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
        if let Some(v) = self.schema_version {
            out.push_str(",\"schema_version\":");
            out.push_str(itoa::Buffer::new().format(v));
        }
        out.push_str(",\"properties\":");
        out.push_str(&self.props_json());
        out.push('}');
        out
    }
}

/// An event as [`BatchReader::next_raw`] reads it: texts as bytes, lengths
/// checked, UTF-8 not yet.
#[derive(Debug, Clone, Copy)]
pub struct RawEventView<'a> {
    pub tenant: &'a [u8],
    pub event_id: &'a [u8],
    pub event_type: &'a [u8],
    pub ts: Millis,
    pub user_id: Option<&'a [u8]>,
    pub session_id: Option<&'a [u8]>,
    /// See [`EventView::schema_version`].
    pub schema_version: Option<u32>,
    props: &'a [u8],
    n_props: u16,
}

impl<'a> RawEventView<'a> {
    /// The properties as the client's JSON object text, when the batch
    /// holds them in that form.
    pub fn props_text(&self) -> Option<&'a [u8]> {
        (self.n_props & TEXT_FORM != 0).then_some(self.props)
    }
}

/// Writes the properties `c` holds as a JSON object text to `out`, checking
/// lengths and tags as it goes (one pass over the bytes, for readers that
/// want the text anyway). Texts are copied as the batch holds them, without
/// a UTF-8 check: callers that need `str` check the result once. On an
/// error `out` holds part of the object.
#[inline]
fn write_props_json(c: &mut Cursor<'_>, n_props: u16, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(b'{');
    for i in 0..n_props {
        if i > 0 {
            out.push(b',');
        }
        let (k, v) = c.prop_raw()?;
        push_json_in(out, k);
        out.push(b':');
        match v {
            RawValue::Null => out.extend_from_slice(b"null"),
            RawValue::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
            RawValue::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
            RawValue::Float(f) => push_f64(out, f),
            RawValue::Str(s) => push_json_in(out, s),
            RawValue::Json(j) => out.extend_from_slice(j),
        }
    }
    out.push(b'}');
    Ok(())
}

/// [`write_props_json`] over properties a reader already checked.
fn props_json(props: &[u8], n_props: u16, out: &mut Vec<u8>) {
    // The text is about as long as the binary form: one reservation.
    out.reserve(props.len() + 8 * n_props as usize + 2);
    let mut c = Cursor { buf: props, pos: 0 };
    if write_props_json(&mut c, n_props, out).is_err() {
        // Unreachable for checked properties; keep the text an object.
        out.push(b'}');
    }
}

fn push_f64(out: &mut Vec<u8>, f: f64) {
    use std::io::Write as _;
    if f.is_finite() {
        let from = out.len();
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{f}");
        if !out[from..].iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
            out.extend_from_slice(b".0");
        }
    } else {
        out.extend_from_slice(b"null");
    }
}

/// The bytes a JSON string literal cannot hold as they are.
#[inline]
fn needs_escape(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// The escape sequence for a byte [`needs_escape`] names (all ASCII;
/// `\u00XX` is written into `buf`).
fn escape(b: u8, buf: &mut [u8; 6]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => "\\\"",
        b'\\' => "\\\\",
        b'\n' => "\\n",
        b'\r' => "\\r",
        b'\t' => "\\t",
        _ => {
            *buf = *b"\\u00__";
            buf[4] = HEX[(b >> 4) as usize];
            buf[5] = HEX[(b & 15) as usize];
            std::str::from_utf8(buf).unwrap_or("\\ufffd")
        }
    }
}

/// A piece of a text written as a JSON string literal.
enum Piece<'e> {
    /// Bytes of the text that need no escape (whole characters).
    Plain(std::ops::Range<usize>),
    Escape(&'e str),
}

/// Splits `s` into [`Piece`]s for `f`. Texts without anything to escape
/// (nearly all) are found 8 bytes at a time and passed as one piece.
/// Every byte that needs an escape is ASCII, so each plain range starts and
/// ends on a character boundary.
#[inline]
fn escape_pieces(s: &[u8], mut f: impl FnMut(Piece<'_>)) {
    if !any_escape(s) {
        f(Piece::Plain(0..s.len()));
        return;
    }
    let mut from = 0;
    let mut buf = [0u8; 6];
    for (i, &b) in s.iter().enumerate() {
        if needs_escape(b) {
            f(Piece::Plain(from..i));
            f(Piece::Escape(escape(b, &mut buf)));
            from = i + 1;
        }
    }
    f(Piece::Plain(from..s.len()));
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    escape_pieces(s.as_bytes(), |p| match p {
        Piece::Plain(r) => out.push_str(&s[r]),
        Piece::Escape(e) => out.push_str(e),
    });
    out.push('"');
}

/// [`push_json_str`] over UTF-8 bytes.
#[inline]
pub fn push_json_bytes(out: &mut Vec<u8>, s: &[u8]) {
    push_json_in(
        out,
        Text {
            tail: s,
            len: s.len(),
        },
    )
}

/// [`push_json_bytes`] for a text of a batch: short texts are checked and
/// copied as whole 8- and 16-byte words read from the batch, past the
/// text's end where the batch goes on (the extra bytes are masked out of
/// the check and cut off the output), instead of a byte loop and a
/// `memcpy` call per text.
#[inline(always)]
fn push_json_in(out: &mut Vec<u8>, t: Text<'_>) {
    let (buf, n) = (t.tail, t.len);
    if any_escape_prefix(buf, n) {
        return push_escaped_bytes(out, t.bytes());
    }
    out.reserve(n + 18);
    out.push(b'"');
    match buf.get(..16) {
        Some(w) if n <= 16 => {
            let len = out.len();
            let w: &[u8; 16] = w.try_into().unwrap_or(&[0; 16]);
            out.extend_from_slice(w);
            out.truncate(len + n);
        }
        _ => out.extend_from_slice(t.bytes()),
    }
    out.push(b'"');
}

/// Whether any of the first `n` bytes of `buf` [`needs_escape`]; the
/// bytes after them are read where `buf` has them and masked out.
#[inline(always)]
fn any_escape_prefix(buf: &[u8], n: usize) -> bool {
    let mut at = 0;
    while at + 8 <= n {
        if word_mask(word(&buf[at..at + 8])) != 0 {
            return true;
        }
        at += 8;
    }
    if at == n {
        return false;
    }
    match buf.get(at..at + 8) {
        // The kept bytes are the low ones (little-endian); a borrow in the
        // mask only runs upwards, so masking the others off is exact.
        Some(w) => word_mask(word(w)) & ((1u64 << (8 * (n - at))) - 1) != 0,
        None => buf[at..n].iter().any(|&b| needs_escape(b)),
    }
}

#[inline(always)]
fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

#[cold]
fn push_escaped_bytes(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    escape_pieces(s, |p| match p {
        Piece::Plain(r) => out.extend_from_slice(&s[r]),
        Piece::Escape(e) => out.extend_from_slice(e.as_bytes()),
    });
    out.push(b'"');
}

/// Whether any byte of `s` [`needs_escape`], a word at a time: a byte
/// below 0x20, or equal to `"` or `\\` (classic has-zero-byte tricks).
#[inline]
fn any_escape(s: &[u8]) -> bool {
    any_escape_prefix(s, s.len())
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// Bit 7 of each byte of the word `x` that [`needs_escape`] (classic
/// has-zero-byte tricks). Exact as a yes/no answer; a byte above one that
/// needs escaping may be marked too (a borrow), never one below it.
#[inline(always)]
fn word_mask(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    // Bytes < 0x20: (x - 0x20) borrows into bit 7 where x's bit 7 is 0.
    let low = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    low | zero(x ^ (ONES * b'"' as u64)) | zero(x ^ (ONES * b'\\' as u64))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt event batch at byte {at}: {what}")]
pub struct CodecError {
    pub at: usize,
    pub what: &'static str,
}

/// Iterates over the properties of one event.
pub struct PropIter<'a> {
    form: Form<'a>,
    left: u16,
}

enum Form<'a> {
    Binary {
        buf: &'a [u8],
    },
    /// `s` is the object's text, `pos` where the next pair's separator
    /// (`{` or `,`) is.
    Text {
        s: &'a str,
        pos: usize,
    },
}

impl<'a> Iterator for PropIter<'a> {
    type Item = (&'a str, PropValue<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let item = match &mut self.form {
            // The reader checked the lengths and tags when it produced the
            // view; a text that is not UTF-8 (a corrupt record) ends the
            // iteration.
            Form::Binary { buf } => {
                let mut c = Cursor { buf, pos: 0 };
                let item = c.prop().ok();
                *buf = &buf[c.pos..];
                item
            }
            // Text that is not what ingest wrote (a corrupt record) ends
            // the iteration too.
            Form::Text { s, pos } => text_prop(s, pos),
        };
        if item.is_none() {
            self.left = 0;
        }
        item
    }
}

/// The pair of a properties text at `*pos` (its `{` or `,`), moving `*pos`
/// past it. The text is compact and its keys and strings hold no escapes
/// ([`BatchWriter::finish_event_json`]); anything else is `None`.
fn text_prop<'a>(s: &'a str, pos: &mut usize) -> Option<(&'a str, PropValue<'a>)> {
    let b = s.as_bytes();
    let at = *pos;
    if !matches!(b.get(at)?, b'{' | b',') || *b.get(at + 1)? != b'"' {
        return None;
    }
    let k0 = at + 2;
    let k1 = k0 + b.get(k0..)?.iter().position(|&c| c == b'"')?;
    if *b.get(k1 + 1)? != b':' {
        return None;
    }
    let key = s.get(k0..k1)?;
    let v0 = k1 + 2;
    let (v, end) = match *b.get(v0)? {
        b'"' => {
            let v1 = v0 + 1 + b.get(v0 + 1..)?.iter().position(|&c| c == b'"')?;
            (PropValue::Str(s.get(v0 + 1..v1)?), v1 + 1)
        }
        b't' => (PropValue::Bool(true), v0 + 4),
        b'f' => (PropValue::Bool(false), v0 + 5),
        b'n' => (PropValue::Null, v0 + 4),
        b'{' | b'[' => {
            let end = skip_nested(b, v0)?;
            (PropValue::Json(s.get(v0..end)?), end)
        }
        _ => {
            let n = b
                .get(v0..)?
                .iter()
                .position(|&c| !matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))?;
            (number_value(s.get(v0..v0 + n)?), v0 + n)
        }
    };
    if !matches!(b.get(end)?, b',' | b'}') {
        return None;
    }
    *pos = end;
    Some((key, v))
}

/// The index after the JSON object or array that starts at `b[at]` (None
/// when it does not end within `b`).
pub fn skip_nested(b: &[u8], at: usize) -> Option<usize> {
    let (mut depth, mut in_str, mut i) = (0usize, false, at);
    while let Some(&c) = b.get(i) {
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// A JSON number's text as a property value: an integer when it has no
/// fraction or exponent and fits in an i64, else a float; a number no f64
/// holds is null. Ingest and the text form of properties both read numbers
/// this way, so the two forms give the same values.
pub fn number_value(raw: &str) -> PropValue<'_> {
    if !raw.contains(['.', 'e', 'E'])
        && let Ok(i) = raw.parse::<i64>()
    {
        return PropValue::Int(i);
    }
    match raw.parse::<f64>() {
        Ok(f) if f.is_finite() => PropValue::Float(f),
        _ => PropValue::Null,
    }
}

/// `b` as text; not UTF-8 is a [`CodecError`] at `at` (the item's start).
fn utf8_at(b: &[u8], at: usize) -> Result<&str, CodecError> {
    std::str::from_utf8(b).map_err(|_| CodecError {
        at,
        what: "invalid UTF-8",
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[cold]
    fn err<T>(&self, what: &'static str) -> Result<T, CodecError> {
        Err(CodecError { at: self.pos, what })
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() - self.pos < n {
            return self.err("truncated");
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// `n` bytes as a [`Text`] (with the bytes after them).
    #[inline(always)]
    fn text(&mut self, n: usize) -> Result<Text<'a>, CodecError> {
        let tail = &self.buf[self.pos..];
        self.take(n)?;
        Ok(Text { tail, len: n })
    }

    #[inline(always)]
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    #[inline(always)]
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    #[inline(always)]
    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline(always)]
    fn i64(&mut self) -> Result<i64, CodecError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    #[inline]
    fn opt16_raw(&mut self) -> Result<Option<&'a [u8]>, CodecError> {
        match self.u16()? {
            0xFFFF => Ok(None),
            n => self.take(n as usize).map(Some),
        }
    }

    fn prop(&mut self) -> Result<(&'a str, PropValue<'a>), CodecError> {
        let at = self.pos;
        let (k, v) = self.prop_raw()?;
        let utf8 = |b| utf8_at(b, at);
        let v = match v {
            RawValue::Null => PropValue::Null,
            RawValue::Bool(b) => PropValue::Bool(b),
            RawValue::Int(i) => PropValue::Int(i),
            RawValue::Float(f) => PropValue::Float(f),
            RawValue::Str(s) => PropValue::Str(utf8(s.bytes())?),
            RawValue::Json(j) => PropValue::Json(utf8(j)?),
        };
        Ok((utf8(k.bytes())?, v))
    }

    /// One property with its texts as bytes, not checked as UTF-8.
    #[inline(always)]
    fn prop_raw(&mut self) -> Result<(Text<'a>, RawValue<'a>), CodecError> {
        let kl = self.u16()? as usize;
        let k = self.text(kl)?;
        let v = match self.u8()? {
            0 => RawValue::Null,
            1 => RawValue::Bool(false),
            2 => RawValue::Bool(true),
            3 => RawValue::Int(self.i64()?),
            4 => RawValue::Float(f64::from_bits(self.i64()? as u64)),
            5 => {
                let n = self.u32()? as usize;
                RawValue::Str(self.text(n)?)
            }
            6 => {
                let n = self.u32()? as usize;
                RawValue::Json(self.take(n)?)
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
    backfill: bool,
}

/// Bit of the batch head that marks a correction batch.
const CORRECTION_BIT: u32 = 1 << 31;
/// Bit of the batch head that marks a backfill batch.
const BACKFILL_BIT: u32 = 1 << 30;
const FLAG_BITS: u32 = CORRECTION_BIT | BACKFILL_BIT;

impl<'a> BatchReader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<Self, CodecError> {
        let mut cur = Cursor { buf, pos: 0 };
        let head = cur.u32()?;
        Ok(BatchReader {
            cur,
            left: head & !FLAG_BITS,
            correction: head & CORRECTION_BIT != 0,
            backfill: head & BACKFILL_BIT != 0,
        })
    }

    /// Whether this batch is history sent as a backfill
    /// (`POST /api/v1/events?backfill=true`).
    pub fn is_backfill(&self) -> bool {
        self.backfill
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

    /// [`BatchReader::next_raw`] that also gives the event's properties as
    /// a JSON object text: the client's own text, when the batch holds it,
    /// by [`RawEventView::props_text`] (`json` is left empty); else written
    /// to `json` (cleared first) in the same pass that checks them.
    pub fn next_raw_rendered(
        &mut self,
        json: &mut Vec<u8>,
    ) -> Option<Result<RawEventView<'a>, CodecError>> {
        json.clear();
        self.step(|r| r.read_raw_with(Some(json)))
    }

    fn read_raw(&mut self) -> Result<RawEventView<'a>, CodecError> {
        self.read_raw_with(None)
    }

    #[inline(always)]
    fn read_raw_with(
        &mut self,
        json: Option<&mut Vec<u8>>,
    ) -> Result<RawEventView<'a>, CodecError> {
        let c = &mut self.cur;
        let tl = c.u16()? as usize;
        let tenant = c.take(tl)?;
        let il = c.u16()? as usize;
        let event_id = c.take(il)?;
        let tyl = c.u8()? as usize;
        let event_type = c.take(tyl)?;
        let ts = c.i64()?;
        let user_id = c.opt16_raw()?;
        let session_id = c.opt16_raw()?;
        let n_props = c.u16()?;
        let schema_version = if n_props & VERSIONED != 0 {
            Some(c.u32()?)
        } else {
            None
        };
        let n_props = n_props & !VERSIONED;
        let props = if n_props & TEXT_FORM != 0 {
            let n = c.u32()? as usize;
            c.take(n)?
        } else {
            let start = c.pos;
            // Lengths and tags are checked here; property texts are checked
            // as UTF-8 when they are read as `str` (`props()`), not twice.
            match json {
                Some(out) => write_props_json(c, n_props, out)?,
                None => {
                    for _ in 0..n_props {
                        c.prop_raw()?;
                    }
                }
            }
            &c.buf[start..c.pos]
        };
        Ok(RawEventView {
            tenant,
            event_id,
            event_type,
            ts,
            user_id,
            session_id,
            schema_version,
            props,
            n_props,
        })
    }

    fn read_event(&mut self) -> Result<EventView<'a>, CodecError> {
        let at = self.cur.pos;
        let r = self.read_raw()?;
        let utf8 = |b| utf8_at(b, at);
        Ok(EventView {
            tenant: utf8(r.tenant)?,
            event_id: utf8(r.event_id)?,
            event_type: utf8(r.event_type)?,
            ts: r.ts,
            user_id: r.user_id.map(utf8).transpose()?,
            session_id: r.session_id.map(utf8).transpose()?,
            schema_version: r.schema_version,
            props: r.props,
            n_props: r.n_props,
            text: if r.n_props & TEXT_FORM != 0 {
                Some(utf8(r.props)?)
            } else {
                None
            },
        })
    }

    /// The next event with its texts as bytes, not checked as UTF-8: for
    /// callers that check whole columns at once (the raw store). Lengths
    /// are checked as in [`Iterator::next`].
    pub fn next_raw(&mut self) -> Option<Result<RawEventView<'a>, CodecError>> {
        self.step(Self::read_raw)
    }

    /// One event read by `read`; after an error the batch ends.
    #[inline]
    fn step<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, CodecError>,
    ) -> Option<Result<T, CodecError>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = read(self);
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<EventView<'a>, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step(Self::read_event)
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

    /// Records the version of the registered schema the event started at
    /// `at` was checked against; call it right after
    /// [`BatchWriter::begin_event`], before any property.
    pub fn schema_version(&mut self, at: usize, version: u32) {
        debug_assert_eq!(at + 2, self.buf.len(), "schema version after a property");
        // The flag waits in the count's slot; `finish_event` keeps it.
        self.buf[at..at + 2].copy_from_slice(&VERSIONED.to_le_bytes());
        self.buf.extend_from_slice(&version.to_le_bytes());
    }

    /// The [`VERSIONED`] flag of the event started at `at`.
    fn versioned(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.buf[at], self.buf[at + 1]]) & VERSIONED
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
        debug_assert!(
            n_props & !TEXT_FORM < VERSIONED,
            "{n_props} properties do not fit the count"
        );
        let flag = self.versioned(at);
        self.buf[at..at + 2].copy_from_slice(&(n_props | flag).to_le_bytes());
        self.n += 1;
    }

    /// Ends the event started at `at` with its `n_props` properties given
    /// as `text`, the JSON text of the object as the client sent it, instead
    /// of [`BatchWriter::prop`]s: the raw store then copies the text instead
    /// of rendering it. The caller checks that `text` is compact (nothing
    /// between tokens), that its keys and string values hold no escapes,
    /// that its numbers are ones an f64 holds and that it has no repeated
    /// keys; reading it back then gives what the binary form would.
    /// Returns false (nothing written) when `n_props` or `text` is too long
    /// for the form; write the properties one by one then.
    pub fn finish_event_json(&mut self, at: usize, n_props: u16, text: &str) -> bool {
        // Right after the count, or after the schema version behind it.
        let props_at = at + if self.versioned(at) != 0 { 6 } else { 2 };
        if n_props >= VERSIONED || props_at != self.buf.len() || u32::try_from(text.len()).is_err()
        {
            return false;
        }
        self.buf
            .extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(text.as_bytes());
        self.finish_event(at, n_props | TEXT_FORM);
        true
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
        if let Some(v) = e.schema_version {
            self.schema_version(at, v);
        }
        if e.text.is_some() {
            // Read from a u32 length, so it fits one.
            self.buf
                .extend_from_slice(&(e.props.len() as u32).to_le_bytes());
        }
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

    /// Finishes a backfill batch (see [`BatchReader::is_backfill`]).
    pub fn finish_backfill(self) -> Vec<u8> {
        self.finish_with(BACKFILL_BIT)
    }

    fn finish_with(mut self, flags: u32) -> Vec<u8> {
        if self.buf.len() < 4 {
            self.buf.resize(4, 0);
        }
        let head = (self.n & !FLAG_BITS) | flags;
        self.buf[0..4].copy_from_slice(&head.to_le_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Vec<EventView<'_>> {
        BatchReader::new(bytes)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn schema_versions_read_back_in_both_forms_and_survive_a_copy() {
        let mut w = BatchWriter::new();
        let at = w.begin_event("t", "e1", "buy", 1, None, None);
        w.schema_version(at, 3);
        w.prop("n", PropValue::Int(7));
        w.finish_event(at, 1);
        let at = w.begin_event("t", "e2", "buy", 2, None, None);
        w.schema_version(at, 70_000);
        assert!(w.finish_event_json(at, 2, r#"{"a":1,"b":"x"}"#));
        // Unversioned after versioned: the flag does not carry over.
        let at = w.begin_event("t", "e3", "view", 3, None, None);
        assert!(w.finish_event_json(at, 0, "{}"));
        // A half-written versioned event undone leaves nothing behind.
        let len = w.byte_len();
        let at = w.begin_event("t", "e4", "buy", 4, None, None);
        w.schema_version(at, 9);
        w.truncate_to(len);
        let at = w.begin_event("t", "e5", "view", 5, None, None);
        w.finish_event(at, 0);
        let bytes = w.finish();
        let evs = read_all(&bytes);
        let got: Vec<_> = evs.iter().map(|e| (e.event_id, e.schema_version)).collect();
        assert_eq!(
            got,
            [
                ("e1", Some(3)),
                ("e2", Some(70_000)),
                ("e3", None),
                ("e5", None)
            ]
        );
        assert_eq!(
            evs[0].props().collect::<Vec<_>>(),
            [("n", PropValue::Int(7))]
        );
        assert_eq!(evs[1].props_json(), r#"{"a":1,"b":"x"}"#);
        assert_eq!(evs[1].n_props(), 2);
        assert!(evs[0].to_json().contains(r#""schema_version":3,"#));
        assert!(!evs[2].to_json().contains("schema_version"));
        let mut r = BatchReader::new(&bytes).unwrap();
        let mut json = Vec::new();
        let raw = r.next_raw_rendered(&mut json).unwrap().unwrap();
        assert_eq!(
            (raw.schema_version, &json[..]),
            (Some(3), &br#"{"n":7}"#[..])
        );
        let raw = r.next_raw_rendered(&mut json).unwrap().unwrap();
        assert_eq!(raw.schema_version, Some(70_000));
        assert_eq!(raw.props_text(), Some(&br#"{"a":1,"b":"x"}"#[..]));
        // A copy keeps the versions.
        let mut c = BatchWriter::new();
        for e in &evs {
            c.push_view(e);
        }
        let copied = c.finish();
        assert_eq!(copied, bytes);
    }

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
        let evs = read_all(&bytes);
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

        // The raw reading gives the same bytes and the same JSON.
        let mut r = BatchReader::new(&bytes).unwrap();
        for ev in &evs {
            let mut json = vec![b'x'; 3];
            let raw = r.next_raw_rendered(&mut json).unwrap().unwrap();
            assert_eq!(raw.tenant, ev.tenant.as_bytes());
            assert_eq!(raw.event_id, ev.event_id.as_bytes());
            assert_eq!(raw.event_type, ev.event_type.as_bytes());
            assert_eq!(raw.ts, ev.ts);
            assert_eq!(raw.user_id, ev.user_id.map(str::as_bytes));
            assert_eq!(raw.session_id, ev.session_id.map(str::as_bytes));
            assert_eq!(raw.props_text(), None);
            assert_eq!(json, ev.props_json().into_bytes());
        }
        assert!(r.next_raw().is_none());
    }

    /// Properties kept as JSON text read like the same properties written
    /// one by one, and are copied as they are.
    #[test]
    fn text_form_reads_like_the_binary_form() {
        let text = r#"{"n":-3,"f":1.5,"s":"hé€","j":{"a":[1,"]\"}"]},"b":true,"z":null}"#;
        let mut w = BatchWriter::new();
        let at = w.begin_event("t1", "e1", "click", 42, Some("u1"), None);
        w.prop("n", PropValue::Int(-3));
        w.prop("f", PropValue::Float(1.5));
        w.prop("s", PropValue::Str("hé€"));
        w.prop("j", PropValue::Json(r#"{"a":[1,"]\"}"]}"#));
        w.prop("b", PropValue::Bool(true));
        w.prop("z", PropValue::Null);
        w.finish_event(at, 6);
        let at = w.begin_event("t1", "e2", "click", 42, Some("u1"), None);
        assert!(w.finish_event_json(at, 6, text));
        let at = w.begin_event("t1", "e3", "view", 43, None, Some("s"));
        w.finish_event(at, 0);
        let bytes = w.finish();
        let evs = read_all(&bytes);
        fn props<'a>(e: &EventView<'a>) -> Vec<(&'a str, PropValue<'a>)> {
            e.props().collect()
        }
        assert_eq!(props(&evs[1]).len(), 6);
        assert_eq!(props(&evs[0]), props(&evs[1]));
        assert_eq!(evs[1].n_props(), 6);
        assert_eq!(evs[0].props_json(), text);
        assert_eq!(evs[1].props_json(), text);
        assert_eq!(evs[2].event_type, "view", "the event after it is read");
        let mut r = BatchReader::new(&bytes).unwrap();
        let mut json = Vec::new();
        // Rendered only where the batch holds no text: the same JSON.
        for ev in &evs {
            let raw = r.next_raw_rendered(&mut json).unwrap().unwrap();
            assert_eq!(raw.props_text().is_some(), json.is_empty());
            let got = raw.props_text().unwrap_or(&json);
            assert_eq!(got, ev.props_json().as_bytes());
        }
        // Copied event by event, both forms stay as they were.
        let mut w = BatchWriter::new();
        for e in &evs {
            w.push_view(e);
        }
        let copy = w.finish();
        assert_eq!(copy, bytes);
    }

    #[test]
    fn corrupt_text_form_is_an_error_not_a_panic() {
        let mut w = BatchWriter::new();
        let at = w.begin_event("t", "e", "x", 1, None, None);
        assert!(w.finish_event_json(at, 2, r#"{"a":1,"b":"x"}"#));
        let bytes = w.finish();
        for cut in 0..bytes.len() {
            let r = BatchReader::new(&bytes[..cut]).map(|r| r.collect::<Result<Vec<_>, _>>());
            assert!(matches!(r, Err(_) | Ok(Err(_))), "cut at {cut}");
        }
        // A count larger than the text holds ends with the text.
        let mut w = BatchWriter::new();
        let at = w.begin_event("t", "e", "x", 1, None, None);
        assert!(w.finish_event_json(at, 9, r#"{"a":1,"b":"x"}"#));
        let bytes = w.finish();
        let e = BatchReader::new(&bytes).unwrap().next().unwrap().unwrap();
        assert_eq!(e.props().count(), 2);
    }

    /// A batch of one event with one string property.
    fn one_event(id: &str, v: &str) -> Vec<u8> {
        let mut w = BatchWriter::new();
        let at = w.begin_event("t", id, "x", 1, None, None);
        w.prop("k", PropValue::Str(v));
        w.finish_event(at, 1);
        w.finish()
    }

    #[test]
    fn raw_reading_checks_utf8_later() {
        let mut bytes = one_event("e\u{e9}", "v\u{e9}");
        // Cut the two-byte "é" of the event id in half: no longer UTF-8.
        let pos = bytes.windows(2).position(|p| p == [0xC3, 0xA9]).unwrap();
        bytes[pos + 1] = b'!';
        let raw = BatchReader::new(&bytes)
            .unwrap()
            .next_raw()
            .unwrap()
            .unwrap();
        assert_eq!(raw.event_id, b"e\xC3!");
        assert!(BatchReader::new(&bytes).unwrap().next().unwrap().is_err());
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let bytes = one_event("e", "v");
        for cut in 0..bytes.len() {
            let r = BatchReader::new(&bytes[..cut]).map(|r| r.collect::<Result<Vec<_>, _>>());
            assert!(matches!(r, Err(_) | Ok(Err(_))), "cut at {cut}");
            // The raw reading checks every length too.
            if let Ok(mut r) = BatchReader::new(&bytes[..cut]) {
                assert!(matches!(r.next_raw(), Some(Err(_))), "raw, cut at {cut}");
            }
            if let Ok(mut r) = BatchReader::new(&bytes[..cut]) {
                let mut json = Vec::new();
                assert!(
                    matches!(r.next_raw_rendered(&mut json), Some(Err(_))),
                    "json, cut at {cut}"
                );
                assert!(
                    r.next_raw_rendered(&mut json).is_none(),
                    "the batch ends after an error"
                );
            }
        }
    }

    /// The escaping as it was first written: char by char.
    fn reference_escape(s: &str) -> String {
        let mut out = String::from("\"");
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
        out
    }

    /// Floats keep a decimal point or exponent (they read back as floats),
    /// and what JSON cannot hold is null.
    #[test]
    fn floats_stay_floats_in_json() {
        let mut w = BatchWriter::new();
        let at = w.begin_event("t", "e", "x", 1, None, None);
        for (k, f) in [
            ("a", 3.0),
            ("b", -0.5),
            ("c", 1e300),
            ("d", f64::NAN),
            ("e", 2.5e-8),
        ] {
            w.prop(k, PropValue::Float(f));
        }
        w.finish_event(at, 5);
        let bytes = w.finish();
        let mut json = Vec::new();
        BatchReader::new(&bytes)
            .unwrap()
            .next_raw_rendered(&mut json)
            .unwrap()
            .unwrap();
        let text = String::from_utf8(json).unwrap();
        let want = format!(
            r#"{{"a":3.0,"b":-0.5,"c":{}.0,"d":null,"e":{}}}"#,
            1e300, 2.5e-8
        );
        assert_eq!(text, want);
    }

    proptest::proptest! {
        /// The word-at-a-time escape check and both escapers agree with the
        /// char-by-char reference, on texts full of quotes, backslashes,
        /// control characters and multi-byte characters.
        #[test]
        fn escaping_matches_the_reference(s in "[a-z\"\\\\\\x00-\\x1f\\x7f é€😀]{0,40}") {
            let want = reference_escape(&s);
            let mut bytes = Vec::new();
            push_json_bytes(&mut bytes, s.as_bytes());
            proptest::prop_assert_eq!(String::from_utf8(bytes).unwrap(), want.clone());
            let mut text = String::new();
            push_json_str(&mut text, &s);
            proptest::prop_assert_eq!(text, want);
            proptest::prop_assert_eq!(any_escape(s.as_bytes()), s.bytes().any(needs_escape));
        }

        /// Whatever text a damaged record holds in text form, reading its
        /// properties never panics and never gives more than it names.
        #[test]
        fn any_text_form_reads_without_panic(
            text in "[{}\\[\\],:\"\\\\a-c0-9.eE+tfnul é-]{0,40}",
            n in 0u16..8,
        ) {
            let mut w = BatchWriter::new();
            let at = w.begin_event("t", "e", "x", 1, None, None);
            proptest::prop_assert!(w.finish_event_json(at, n, &text));
            let bytes = w.finish();
            let e = BatchReader::new(&bytes).unwrap().next().unwrap().unwrap();
            proptest::prop_assert!(e.props().count() <= n as usize);
            proptest::prop_assert_eq!(e.props_json(), text);
        }

        /// Texts inside a longer buffer (as in a batch) are checked and
        /// copied with words that read past their end: whatever follows
        /// (quotes, control bytes, nothing) changes nothing.
        #[test]
        fn escaping_inside_a_buffer_ignores_what_follows(
            s in "[a-z\"\\\\\\x00-\\x1f é€]{0,40}",
            before in proptest::collection::vec(proptest::num::u8::ANY, 0..9),
            after in proptest::collection::vec(proptest::sample::select(vec![0u8, b'"', b'\\', b'a', 0x1f, 0xff]), 0..20),
        ) {
            let want = reference_escape(&s);
            let buf: Vec<u8> = before.iter().chain(s.as_bytes()).chain(&after).copied().collect();
            let inner = Text { tail: &buf[before.len()..], len: s.len() };
            let mut out = b"x".to_vec();
            push_json_in(&mut out, inner);
            proptest::prop_assert_eq!(String::from_utf8(out[1..].to_vec()).unwrap(), want);
            proptest::prop_assert_eq!(any_escape_prefix(&buf[before.len()..], s.len()), s.bytes().any(needs_escape));
        }
    }
}
