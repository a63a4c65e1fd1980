//! Avro schemas: compatibility under the specification's schema
//! resolution rules (what a reader schema can read of data a writer
//! schema wrote), validation of an event's JSON properties, and decoding
//! of Avro binary into JSON.
//!
//! The checker is written here, not taken from `apache-avro`'s
//! `SchemaCompatibility`, because a refused registration must say which
//! field breaks which rule; the tests compare its verdicts with the
//! crate's over a table of cases.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::types::Value;
use serde_json::{Map, Value as Json};

/// Named types (records, enums, fixed) of a schema by full name, to
/// follow references.
pub(crate) struct Names<'a>(HashMap<String, &'a Schema>);

impl<'a> Names<'a> {
    pub(crate) fn of(schema: &'a Schema) -> Names<'a> {
        let mut n = Names(HashMap::new());
        n.collect(schema);
        n
    }

    fn collect(&mut self, s: &'a Schema) {
        match s {
            Schema::Record(r) => {
                self.0.insert(r.name.fullname(None), s);
                for f in &r.fields {
                    self.collect(&f.schema);
                }
            }
            Schema::Enum(e) => {
                self.0.insert(e.name.fullname(None), s);
            }
            Schema::Fixed(f) | Schema::Duration(f) => {
                self.0.insert(f.name.fullname(None), s);
            }
            Schema::Array(a) => self.collect(&a.items),
            Schema::Map(m) => self.collect(&m.types),
            Schema::Union(u) => {
                for v in u.variants() {
                    self.collect(v);
                }
            }
            _ => {}
        }
    }

    /// `s` with a reference followed.
    pub(crate) fn deref(&self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.0.get(&name.fullname(None)).copied().unwrap_or(s),
            _ => s,
        }
    }
}

/// The first named type that contains itself (a recursive schema), if
/// any: decoding such data recurses as deep as the data nests, so they
/// are refused at registration.
pub(crate) fn recursive(s: &Schema) -> Option<String> {
    fn walk(s: &Schema, stack: &mut Vec<String>) -> Option<String> {
        match s {
            Schema::Ref { name } => {
                let n = name.fullname(None);
                stack.contains(&n).then_some(n)
            }
            Schema::Record(r) => {
                stack.push(r.name.fullname(None));
                let found = r.fields.iter().find_map(|f| walk(&f.schema, stack));
                stack.pop();
                found
            }
            Schema::Array(a) => walk(&a.items, stack),
            Schema::Map(m) => walk(&m.types, stack),
            Schema::Union(u) => u.variants().iter().find_map(|v| walk(v, stack)),
            _ => None,
        }
    }
    walk(s, &mut Vec::new())
}

/// The SQL column type of a field's values (None: not a primitive, or a
/// union of more than one with null).
pub(crate) fn prop_type(s: &Schema) -> Option<tally_types::schema::PropType> {
    use tally_types::schema::PropType;
    let s = match s {
        Schema::Union(u) => {
            let mut branches = u.variants().iter().filter(|v| !matches!(v, Schema::Null));
            let one = branches.next()?;
            if branches.next().is_some() {
                return None;
            }
            one
        }
        other => other,
    };
    match kind(s) {
        Kind::String | Kind::Enum => Some(PropType::String),
        Kind::Int | Kind::Long => Some(PropType::Int),
        Kind::Float | Kind::Double => Some(PropType::Float),
        Kind::Boolean => Some(PropType::Bool),
        _ => None,
    }
}

/// The kinds the resolution rules compare (a logical type reads as the
/// type under it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Array,
    Map,
    Union,
    Record,
    Enum,
    Fixed,
}

pub(crate) fn kind(s: &Schema) -> Kind {
    use apache_avro::schema::{InnerDecimalSchema, UuidSchema};
    match s {
        Schema::Null => Kind::Null,
        Schema::Boolean => Kind::Boolean,
        Schema::Int | Schema::Date | Schema::TimeMillis => Kind::Int,
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Kind::Long,
        Schema::Float => Kind::Float,
        Schema::Double => Kind::Double,
        Schema::Bytes | Schema::BigDecimal => Kind::Bytes,
        Schema::Decimal(d) => match d.inner {
            InnerDecimalSchema::Bytes => Kind::Bytes,
            InnerDecimalSchema::Fixed(_) => Kind::Fixed,
        },
        Schema::Uuid(u) => match u {
            UuidSchema::String => Kind::String,
            UuidSchema::Bytes => Kind::Bytes,
            UuidSchema::Fixed(_) => Kind::Fixed,
        },
        Schema::String => Kind::String,
        Schema::Array(_) => Kind::Array,
        Schema::Map(_) => Kind::Map,
        Schema::Union(_) => Kind::Union,
        Schema::Record(_) => Kind::Record,
        Schema::Enum(_) => Kind::Enum,
        Schema::Fixed(_) | Schema::Duration(_) => Kind::Fixed,
        // Followed by the callers before they ask.
        Schema::Ref { .. } => Kind::Record,
    }
}

/// A short human name of a schema's type, for messages.
pub(crate) fn type_name(s: &Schema) -> String {
    match s {
        Schema::Record(r) => format!("record {}", r.name.name()),
        Schema::Enum(e) => format!("enum {}", e.name.name()),
        Schema::Fixed(f) => format!("fixed {}({})", f.name.name(), f.size),
        Schema::Array(a) => format!("array<{}>", type_name(&a.items)),
        Schema::Map(m) => format!("map<{}>", type_name(&m.types)),
        Schema::Union(u) => {
            let v: Vec<String> = u.variants().iter().map(type_name).collect();
            format!("[{}]", v.join(", "))
        }
        Schema::Ref { name } => name.name().to_string(),
        Schema::Date => "int (date)".into(),
        Schema::TimestampMillis => "long (timestamp-millis)".into(),
        Schema::TimestampMicros => "long (timestamp-micros)".into(),
        other => format!("{:?}", kind(other)).to_lowercase(),
    }
}

/// Why a reader schema cannot read what a writer schema wrote, at `path`
/// (dotted field names; empty: the top level).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Break {
    pub path: String,
    pub what: BreakKind,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BreakKind {
    /// The reader has a field the writer lacks, without a default.
    MissingNoDefault,
    /// The reader's type cannot read the writer's.
    Type { writer: String, reader: String },
    /// A writer's enum symbol the reader lacks (and no enum default).
    Symbol(String),
    /// Named types of different names.
    Name { writer: String, reader: String },
    /// Fixed types of different sizes.
    Size { writer: usize, reader: usize },
}

pub(crate) fn push(out: &mut Vec<Break>, path: &str, what: BreakKind) {
    out.push(Break {
        path: path.to_string(),
        what,
    });
}

fn type_break(w: &Schema, r: &Schema) -> BreakKind {
    BreakKind::Type {
        writer: type_name(w),
        reader: type_name(r),
    }
}

fn name_break(w: &apache_avro::schema::Name, r: &apache_avro::schema::Name) -> BreakKind {
    BreakKind::Name {
        writer: w.name().into(),
        reader: r.name().into(),
    }
}

pub(crate) fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn named_match(
    w: &apache_avro::schema::Name,
    r: &apache_avro::schema::Name,
    aliases: &[String],
) -> bool {
    w.name() == r.name()
        || aliases
            .iter()
            .any(|a| a == w.name() || *a == w.fullname(None))
}

fn alias_names(a: &apache_avro::schema::Aliases) -> Vec<String> {
    a.as_ref()
        .map(|v| v.iter().map(|x| x.name().to_string()).collect())
        .unwrap_or_default()
}

/// Every reason the `reader` schema cannot read data of the `writer`
/// schema (empty: it can), per the Avro specification's schema
/// resolution.
pub(crate) fn breaks(writer: &Schema, reader: &Schema) -> Vec<Break> {
    let (wn, rn) = (Names::of(writer), Names::of(reader));
    let mut out = Vec::new();
    let mut seen = Vec::new();
    check(writer, reader, &wn, &rn, "", &mut out, &mut seen);
    out
}

fn check<'a>(
    w: &'a Schema,
    r: &'a Schema,
    wn: &Names<'a>,
    rn: &Names<'a>,
    path: &str,
    out: &mut Vec<Break>,
    // Record pairs under way (recursive types).
    seen: &mut Vec<(*const Schema, *const Schema)>,
) {
    let (w, r) = (wn.deref(w), rn.deref(r));
    let (wk, rk) = (kind(w), kind(r));
    // A writer's union: every branch must be readable.
    if let Schema::Union(wu) = w {
        for b in wu.variants() {
            check(b, r, wn, rn, path, out, seen);
        }
        return;
    }
    if let Schema::Union(ru) = r {
        // Some branch of the reader reads the writer's type.
        let fits = ru.variants().iter().any(|b| {
            let mut sub = Vec::new();
            check(w, b, wn, rn, path, &mut sub, seen);
            sub.is_empty()
        });
        if !fits {
            push(out, path, type_break(w, r));
        }
        return;
    }
    let promotes = matches!(
        (wk, rk),
        (Kind::Int, Kind::Long | Kind::Float | Kind::Double)
            | (Kind::Long, Kind::Float | Kind::Double)
            | (Kind::Float, Kind::Double)
            | (Kind::String, Kind::Bytes)
            | (Kind::Bytes, Kind::String)
    );
    if promotes {
        return;
    }
    if wk != rk {
        push(out, path, type_break(w, r));
        return;
    }
    match (w, r) {
        (Schema::Array(a), Schema::Array(b)) => {
            check(&a.items, &b.items, wn, rn, &format!("{path}[]"), out, seen)
        }
        (Schema::Map(a), Schema::Map(b)) => check(
            &a.types,
            &b.types,
            wn,
            rn,
            &format!("{path}{{}}"),
            out,
            seen,
        ),
        (Schema::Enum(a), Schema::Enum(b)) => {
            if !named_match(&a.name, &b.name, &alias_names(&b.aliases)) {
                push(out, path, name_break(&a.name, &b.name));
                return;
            }
            if b.default.is_none() {
                for s in a.symbols.iter().filter(|s| !b.symbols.contains(s)) {
                    push(out, path, BreakKind::Symbol(s.clone()));
                }
            }
        }
        (Schema::Fixed(a) | Schema::Duration(a), Schema::Fixed(b) | Schema::Duration(b)) => {
            if !named_match(&a.name, &b.name, &alias_names(&b.aliases)) {
                push(out, path, name_break(&a.name, &b.name));
            } else if a.size != b.size {
                push(
                    out,
                    path,
                    BreakKind::Size {
                        writer: a.size,
                        reader: b.size,
                    },
                );
            }
        }
        (Schema::Record(a), Schema::Record(b)) => {
            let key = (w as *const Schema, r as *const Schema);
            if seen.contains(&key) {
                return;
            }
            // The top level record's name is the subject's business (a
            // properties record renamed is still that event type's).
            if !path.is_empty() && !named_match(&a.name, &b.name, &alias_names(&b.aliases)) {
                push(out, path, name_break(&a.name, &b.name));
                return;
            }
            seen.push(key);
            for rf in &b.fields {
                let wf = a
                    .fields
                    .iter()
                    .find(|wf| wf.name == rf.name)
                    .or_else(|| a.fields.iter().find(|wf| rf.aliases.contains(&wf.name)));
                let p = join(path, &rf.name);
                match wf {
                    Some(wf) => check(&wf.schema, &rf.schema, wn, rn, &p, out, seen),
                    None if rf.default.is_some() => {}
                    None => push(out, &p, BreakKind::MissingNoDefault),
                }
            }
            seen.pop();
        }
        _ => {}
    }
}

/// Whether a schema takes null.
pub(crate) fn nullable(s: &Schema) -> bool {
    match s {
        Schema::Null => true,
        Schema::Union(u) => u.variants().iter().any(|v| matches!(v, Schema::Null)),
        _ => false,
    }
}

/// What kind of JSON value `v` is, for messages.
pub(crate) fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_f64() => "a fractional number",
        Json::Number(_) => "an integer",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// An Avro value as JSON: timestamps as epoch milliseconds, dates as
/// `YYYY-MM-DD`-free day numbers, bytes and fixed as (lossy) text, enums
/// as their symbol, unions as their value.
pub(crate) fn to_json(v: Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(i),
        Value::Long(i)
        | Value::TimeMicros(i)
        | Value::TimestampMillis(i)
        | Value::LocalTimestampMillis(i) => Json::from(i),
        Value::TimestampMicros(i) | Value::LocalTimestampMicros(i) => {
            Json::from(i.div_euclid(1000))
        }
        Value::TimestampNanos(i) | Value::LocalTimestampNanos(i) => {
            Json::from(i.div_euclid(1_000_000))
        }
        Value::Float(f) => serde_json::Number::from_f64(f as f64).map_or(Json::Null, Json::Number),
        Value::Double(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Value::Bytes(b) | Value::Fixed(_, b) => {
            Json::String(String::from_utf8_lossy(&b).into_owned())
        }
        Value::String(s) => Json::String(s),
        Value::Enum(_, s) => Json::String(s),
        Value::Union(_, b) => to_json(*b),
        Value::Array(a) => Json::Array(a.into_iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(m.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        Value::Record(fields) => {
            let mut o = Map::with_capacity(fields.len());
            for (k, v) in fields {
                o.insert(k, to_json(v));
            }
            Json::Object(o)
        }
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Decimal(d) => {
            let bytes: Vec<u8> = Vec::<u8>::try_from(d).unwrap_or_default();
            Json::String(bytes.iter().map(|b| format!("{b:02x}")).collect())
        }
        Value::BigDecimal(d) => Json::String(d.to_string()),
        Value::Duration(d) => {
            let months: u32 = d.months().into();
            let days: u32 = d.days().into();
            let ms: u32 = d.millis().into();
            serde_json::json!({"months": months, "days": days, "millis": ms})
        }
    }
}
