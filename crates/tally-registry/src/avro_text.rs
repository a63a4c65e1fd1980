//! Avro binary straight to JSON text, for Confluent frames written with the
//! latest schema of their subject (nothing to resolve). The writer's schema
//! is compiled once into a small program of nodes; decoding walks it over
//! the bytes and writes the event object the ingest parser reads, without
//! building `apache_avro` values or `serde_json` values on the way.
//!
//! What it writes is what `apache_avro`'s decoder followed by
//! [`crate::avro::to_json`] gives (tests compare the two over generated
//! records and damaged bytes). Schemas with types it does not handle
//! (bytes, fixed, decimal, uuid, duration) are not compiled, and any
//! record it cannot decode is left to that reference path, which then
//! gives the answer or the error: a success here is always the same JSON.

use std::collections::HashMap;
use std::io::Write;

use apache_avro::Schema;

/// Items of one array or map block at most, and nesting depth at most:
/// past them the record goes to the reference decoder (which has its own
/// limits), so a hostile count cannot loop long here.
const MAX_BLOCK: u64 = 1 << 20;
const MAX_DEPTH: usize = 64;

#[derive(Debug)]
enum Node {
    Null,
    Boolean,
    /// An int (also `date`, `time-millis`).
    Int,
    /// A long divided (`div_euclid`) by this: 1, or 1,000 for
    /// microseconds and 1,000,000 for nanoseconds of a timestamp.
    Long(i64),
    Float,
    Double,
    String,
    /// Symbols as JSON text.
    Enum(Vec<String>),
    Array(usize),
    Map(usize),
    Union(Vec<usize>),
    /// Fields: `"name":` as JSON text, and the node.
    Record(Vec<(String, usize)>),
    /// A named type not compiled yet (replaced before use).
    Pending,
}

/// A compiled writer schema whose root is a record.
#[derive(Debug)]
pub(crate) struct Program {
    nodes: Vec<Node>,
}

impl Program {
    /// Compiles `schema`, or `None` when its root is not a record or it
    /// holds a type this decoder leaves to the reference one.
    pub(crate) fn compile(schema: &Schema) -> Option<Program> {
        if !matches!(schema, Schema::Record(_)) {
            return None;
        }
        let mut c = Compiler {
            nodes: Vec::new(),
            named: HashMap::new(),
        };
        c.node(schema, None)?;
        Some(Program { nodes: c.nodes })
    }

    /// Whether the root record has a field of this name.
    pub(crate) fn has_root_field(&self, name: &str) -> bool {
        let Node::Record(fields) = &self.nodes[0] else {
            return false;
        };
        // Keys are `"name":`; Avro names need no escaping.
        fields
            .iter()
            .any(|(k, _)| k.strip_prefix('"').and_then(|k| k.strip_suffix("\":")) == Some(name))
    }

    /// Appends the event object of one record (`body`, without the frame
    /// header) to `out`: the root record's fields, a null `properties`
    /// left out. `Err` leaves `out` as it was: the reference decoder
    /// decides.
    pub(crate) fn decode_event(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
        let start = out.len();
        let mut d = Dec { b: body, depth: 0 };
        let r = (|| {
            let Node::Record(fields) = &self.nodes[0] else {
                return Err(());
            };
            out.push(b'{');
            let mut first = true;
            for (key, n) in fields {
                let at = out.len();
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(key.as_bytes());
                let v = out.len();
                self.value(*n, &mut d, out)?;
                if key == "\"properties\":" && &out[v..] == b"null" {
                    out.truncate(at);
                    continue;
                }
                first = false;
            }
            out.push(b'}');
            if d.b.is_empty() { Ok(()) } else { Err(()) }
        })();
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn value(&self, n: usize, d: &mut Dec<'_>, out: &mut Vec<u8>) -> Result<(), ()> {
        match &self.nodes[n] {
            Node::Null => out.extend_from_slice(b"null"),
            Node::Boolean => match d.byte()? {
                0 => out.extend_from_slice(b"false"),
                1 => out.extend_from_slice(b"true"),
                _ => return Err(()),
            },
            Node::Int => {
                let v = i32::try_from(d.long()?).map_err(|_| ())?;
                write!(out, "{v}").map_err(|_| ())?;
            }
            Node::Long(div) => {
                let v = d.long()?.div_euclid(*div);
                write!(out, "{v}").map_err(|_| ())?;
            }
            Node::Float => {
                let v = f32::from_le_bytes(d.take(4)?.try_into().map_err(|_| ())?);
                number(out, v as f64)?;
            }
            Node::Double => {
                let v = f64::from_le_bytes(d.take(8)?.try_into().map_err(|_| ())?);
                number(out, v)?;
            }
            Node::String => {
                let s = d.string()?;
                serde_json::to_writer(&mut *out, s).map_err(|_| ())?;
            }
            Node::Enum(symbols) => {
                let i = usize::try_from(d.long()?).map_err(|_| ())?;
                out.extend_from_slice(symbols.get(i).ok_or(())?.as_bytes());
            }
            Node::Union(variants) => {
                let i = usize::try_from(d.long()?).map_err(|_| ())?;
                let v = *variants.get(i).ok_or(())?;
                self.nested(v, d, out)?;
            }
            Node::Array(item) => {
                out.push(b'[');
                let mut first = true;
                loop {
                    let n = d.block()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        self.nested(*item, d, out)?;
                    }
                }
                out.push(b']');
            }
            Node::Map(item) => {
                out.push(b'{');
                // A key twice: the reference keeps the last; leave it that.
                let mut keys: Vec<&str> = Vec::new();
                loop {
                    let n = d.block()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let k = d.string()?;
                        if keys.contains(&k) {
                            return Err(());
                        }
                        keys.push(k);
                        if keys.len() > 1 {
                            out.push(b',');
                        }
                        serde_json::to_writer(&mut *out, k).map_err(|_| ())?;
                        out.push(b':');
                        self.nested(*item, d, out)?;
                    }
                }
                out.push(b'}');
            }
            Node::Record(fields) => {
                out.push(b'{');
                for (i, (key, f)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(key.as_bytes());
                    self.nested(*f, d, out)?;
                }
                out.push(b'}');
            }
            Node::Pending => return Err(()),
        }
        Ok(())
    }

    fn nested(&self, n: usize, d: &mut Dec<'_>, out: &mut Vec<u8>) -> Result<(), ()> {
        d.depth += 1;
        if d.depth > MAX_DEPTH {
            return Err(());
        }
        let r = self.value(n, d, out);
        d.depth -= 1;
        r
    }
}

/// A JSON number as `serde_json` writes an `f64` (`null` when not finite,
/// as `to_json` makes it).
fn number(out: &mut Vec<u8>, v: f64) -> Result<(), ()> {
    if v.is_finite() {
        serde_json::to_writer(&mut *out, &v).map_err(|_| ())
    } else {
        out.extend_from_slice(b"null");
        Ok(())
    }
}

struct Compiler {
    nodes: Vec<Node>,
    /// Named types compiled (or being compiled) by full name.
    named: HashMap<String, usize>,
}

impl Compiler {
    fn push(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn node(&mut self, s: &Schema, ns: Option<&str>) -> Option<usize> {
        Some(match s {
            Schema::Null => self.push(Node::Null),
            Schema::Boolean => self.push(Node::Boolean),
            Schema::Int | Schema::Date | Schema::TimeMillis => self.push(Node::Int),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::LocalTimestampMillis => self.push(Node::Long(1)),
            Schema::TimestampMicros | Schema::LocalTimestampMicros => self.push(Node::Long(1000)),
            Schema::TimestampNanos | Schema::LocalTimestampNanos => {
                self.push(Node::Long(1_000_000))
            }
            Schema::Float => self.push(Node::Float),
            Schema::Double => self.push(Node::Double),
            Schema::String => self.push(Node::String),
            Schema::Enum(e) => {
                let symbols = e
                    .symbols
                    .iter()
                    .map(|s| serde_json::to_string(s).ok())
                    .collect::<Option<Vec<_>>>()?;
                let i = self.push(Node::Enum(symbols));
                self.named.insert(e.name.fullname(ns), i);
                i
            }
            Schema::Array(a) => {
                let i = self.push(Node::Pending);
                let item = self.node(&a.items, ns)?;
                self.nodes[i] = Node::Array(item);
                i
            }
            Schema::Map(m) => {
                let i = self.push(Node::Pending);
                let item = self.node(&m.types, ns)?;
                self.nodes[i] = Node::Map(item);
                i
            }
            Schema::Union(u) => {
                let i = self.push(Node::Pending);
                let variants = u
                    .variants()
                    .iter()
                    .map(|v| self.node(v, ns))
                    .collect::<Option<Vec<_>>>()?;
                self.nodes[i] = Node::Union(variants);
                i
            }
            Schema::Record(r) => {
                let name = r.name.fullname(ns);
                let i = self.push(Node::Pending);
                self.named.insert(name, i);
                let inner = r
                    .name
                    .namespace()
                    .map(str::to_string)
                    .or(ns.map(str::to_string));
                let mut fields = Vec::with_capacity(r.fields.len());
                for f in &r.fields {
                    let key = format!("{}:", serde_json::to_string(&f.name).ok()?);
                    fields.push((key, self.node(&f.schema, inner.as_deref())?));
                }
                self.nodes[i] = Node::Record(fields);
                i
            }
            Schema::Ref { name } => *self.named.get(&name.fullname(ns))?,
            _ => return None,
        })
    }
}

/// The bytes of one record, read front to back.
struct Dec<'a> {
    b: &'a [u8],
    depth: usize,
}

impl<'a> Dec<'a> {
    fn byte(&mut self) -> Result<u8, ()> {
        let (&x, rest) = self.b.split_first().ok_or(())?;
        self.b = rest;
        Ok(x)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        if self.b.len() < n {
            return Err(());
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(x)
    }

    /// A zigzag varint long.
    fn long(&mut self) -> Result<i64, ()> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let x = self.byte()?;
            z |= u64::from(x & 0x7f) << (7 * i);
            if x & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err(())
    }

    fn string(&mut self) -> Result<&'a str, ()> {
        let n = usize::try_from(self.long()?).map_err(|_| ())?;
        std::str::from_utf8(self.take(n)?).map_err(|_| ())
    }

    /// The item count of the next array or map block (0: the end); a
    /// negative count is followed by the block's size in bytes.
    fn block(&mut self) -> Result<u64, ()> {
        let n = self.long()?;
        let n = if n < 0 {
            self.long()?;
            n.unsigned_abs()
        } else {
            n as u64
        };
        if n > MAX_BLOCK {
            return Err(());
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
