//! An Avro schema compiled for checking event properties at ingest: the
//! tree of what each field admits, built once at registration, walked
//! over the properties' JSON text without building a JSON value for
//! scalars (the common case: a number, a string, a boolean).

use std::borrow::Cow;

use apache_avro::Schema;
use serde_json::Value as Json;
use serde_json::value::RawValue;

use crate::avro::{Kind, Names, kind, nullable, type_name};

/// What a value must be.
#[derive(Debug)]
enum Check {
    Null,
    Bool,
    /// An integer within 32 bits.
    Int,
    /// An integer within 64 bits.
    Long,
    /// Any number.
    Num,
    /// A string (string, bytes, fixed, uuid).
    Str,
    /// A number or a string (decimals).
    Decimal,
    Enum(Box<[String]>),
    Array(Box<Node>),
    Map(Box<Node>),
    Record(Box<[Field]>),
    Union(Box<[Node]>),
}

/// A check and how messages name its type.
#[derive(Debug)]
pub(crate) struct Node {
    check: Check,
    label: String,
}

#[derive(Debug)]
struct Field {
    name: String,
    node: Node,
    /// Absent is fine: it has a default, or takes null.
    optional: bool,
}

impl Field {
    fn missing(&self) -> Mismatch {
        Mismatch {
            at: format!(".{}", self.name),
            expected: self.node.label.clone(),
            got: "nothing (the field is missing and has no default)",
        }
    }
}

/// A value that does not fit its schema: where below the checked value
/// (`.field`, `[3]`; empty: the value itself), what was expected and
/// what came.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mismatch {
    pub at: String,
    pub expected: String,
    pub got: &'static str,
}

/// Compiles a schema (references followed; recursive schemas are refused
/// at registration, so the tree is finite).
pub(crate) fn compile(s: &Schema) -> Node {
    let names = Names::of(s);
    build(s, &names)
}

fn build(s: &Schema, names: &Names<'_>) -> Node {
    let s = names.deref(s);
    let label = type_name(s);
    let check = match s {
        Schema::Union(u) => Check::Union(u.variants().iter().map(|v| build(v, names)).collect()),
        Schema::Record(r) => Check::Record(
            r.fields
                .iter()
                .map(|f| Field {
                    name: f.name.clone(),
                    node: build(&f.schema, names),
                    optional: f.default.is_some() || nullable(&f.schema),
                })
                .collect(),
        ),
        Schema::Enum(e) => Check::Enum(e.symbols.clone().into_boxed_slice()),
        Schema::Array(a) => Check::Array(Box::new(build(&a.items, names))),
        Schema::Map(m) => Check::Map(Box::new(build(&m.types, names))),
        Schema::Decimal(_) | Schema::BigDecimal => Check::Decimal,
        other => match kind(other) {
            Kind::Null => Check::Null,
            Kind::Boolean => Check::Bool,
            Kind::Int => Check::Int,
            Kind::Long => Check::Long,
            Kind::Float | Kind::Double => Check::Num,
            _ => Check::Str,
        },
    };
    Node { check, label }
}

/// What kind of JSON text `t` is, for messages.
fn text_kind(t: &str) -> &'static str {
    match t.as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ if is_integer(t) => "an integer",
        _ => "a fractional number",
    }
}

fn is_integer(t: &str) -> bool {
    !t.contains(['.', 'e', 'E'])
}

/// `m` one level further down, at `.field` or `[i]` (built only for an
/// error: the success path allocates nothing).
fn field(name: &str) -> impl FnOnce(Mismatch) -> Mismatch + '_ {
    move |mut m| {
        m.at = format!(".{name}{}", m.at);
        m
    }
}

fn index(i: usize) -> impl FnOnce(Mismatch) -> Mismatch {
    move |mut m| {
        m.at = format!("[{i}]{}", m.at);
        m
    }
}

impl Node {
    fn wrong(&self, got: &'static str) -> Mismatch {
        Mismatch {
            at: String::new(),
            expected: self.label.clone(),
            got,
        }
    }

    /// Checks an event's properties (name, JSON text) against a record
    /// schema field by field; another schema sees them as one object.
    pub(crate) fn check_props(&self, props: &[(Cow<'_, str>, &RawValue)]) -> Result<(), Mismatch> {
        let Check::Record(fields) = &self.check else {
            let mut o = serde_json::Map::with_capacity(props.len());
            for (k, v) in props {
                o.insert(
                    k.to_string(),
                    serde_json::from_str(v.get()).unwrap_or(Json::Null),
                );
            }
            return self.check_json(&Json::Object(o));
        };
        for f in fields.iter() {
            match props.iter().find(|(k, _)| *k == f.name) {
                Some((_, v)) => f.node.check_text(v.get()).map_err(field(&f.name))?,
                None if f.optional => {}
                None => return Err(f.missing()),
            }
        }
        Ok(())
    }

    /// Checks one value given as JSON text (valid JSON).
    fn check_text(&self, t: &str) -> Result<(), Mismatch> {
        let first = t.as_bytes().first().copied().unwrap_or(b'n');
        match (&self.check, first) {
            // A scalar that fits a branch (a nullable field's value, most
            // often) is settled without building the other branches' errors.
            (Check::Union(branches), _) if branches.iter().any(|b| b.fits_scalar(t)) => Ok(()),
            (Check::Union(branches), _) => {
                self.check_union(branches, |b| b.check_text(t), text_kind(t))
            }
            (_, b'{' | b'[') => {
                let v: Json = serde_json::from_str(t).unwrap_or(Json::Null);
                self.check_json(&v)
            }
            (Check::Null, b'n') | (Check::Bool, b't' | b'f') => Ok(()),
            (Check::Num | Check::Decimal, b'-' | b'0'..=b'9') => Ok(()),
            (Check::Int, b'-' | b'0'..=b'9') if is_integer(t) && t.parse::<i32>().is_ok() => Ok(()),
            (Check::Long, b'-' | b'0'..=b'9') if is_integer(t) && t.parse::<i64>().is_ok() => {
                Ok(())
            }
            (Check::Str | Check::Decimal, b'"') => Ok(()),
            (Check::Enum(symbols), b'"') => {
                let s: Cow<'_, str> = serde_json::from_str(t).unwrap_or(Cow::Borrowed(""));
                self.check_symbol(symbols, &s)
            }
            _ => Err(self.wrong(text_kind(t))),
        }
    }

    /// Whether a scalar's JSON text fits this (non-union) node, without
    /// allocating; containers and unions answer false (checked in full).
    fn fits_scalar(&self, t: &str) -> bool {
        let first = t.as_bytes().first().copied().unwrap_or(b'n');
        match (&self.check, first) {
            (Check::Null, b'n') | (Check::Bool, b't' | b'f') => true,
            (Check::Num | Check::Decimal, b'-' | b'0'..=b'9') => true,
            (Check::Int, b'-' | b'0'..=b'9') => is_integer(t) && t.parse::<i32>().is_ok(),
            (Check::Long, b'-' | b'0'..=b'9') => is_integer(t) && t.parse::<i64>().is_ok(),
            (Check::Str | Check::Decimal, b'"') => true,
            _ => false,
        }
    }

    fn check_symbol(&self, symbols: &[String], s: &str) -> Result<(), Mismatch> {
        if symbols.iter().any(|x| x == s) {
            Ok(())
        } else {
            Err(Mismatch {
                at: String::new(),
                expected: format!("a symbol of {} ({})", self.label, symbols.join(", ")),
                got: "another string",
            })
        }
    }

    /// A union: the first branch that fits; else the error of a branch of
    /// the value's own shape (a record's missing field says more than the
    /// list of branches).
    fn check_union(
        &self,
        branches: &[Node],
        mut try_one: impl FnMut(&Node) -> Result<(), Mismatch>,
        got: &'static str,
    ) -> Result<(), Mismatch> {
        let mut inner = None;
        for b in branches {
            match try_one(b) {
                Ok(()) => return Ok(()),
                Err(m) if !m.at.is_empty() => {
                    inner.get_or_insert(m);
                }
                Err(_) => {}
            }
        }
        Err(inner.unwrap_or_else(|| Mismatch {
            at: String::new(),
            expected: format!("one of {}", self.label),
            got,
        }))
    }

    /// Checks one JSON value.
    fn check_json(&self, v: &Json) -> Result<(), Mismatch> {
        let got = crate::avro::json_kind(v);
        match (&self.check, v) {
            (Check::Union(branches), _) => self.check_union(branches, |b| b.check_json(v), got),
            (Check::Null, Json::Null) | (Check::Bool, Json::Bool(_)) => Ok(()),
            (Check::Num | Check::Decimal, Json::Number(_)) => Ok(()),
            (Check::Int, Json::Number(n))
                if n.as_i64().is_some_and(|x| i32::try_from(x).is_ok()) =>
            {
                Ok(())
            }
            (Check::Long, Json::Number(n)) if n.is_i64() => Ok(()),
            (Check::Str | Check::Decimal, Json::String(_)) => Ok(()),
            (Check::Enum(symbols), Json::String(s)) => self.check_symbol(symbols, s),
            (Check::Array(item), Json::Array(items)) => {
                for (i, x) in items.iter().enumerate() {
                    item.check_json(x).map_err(index(i))?;
                }
                Ok(())
            }
            (Check::Map(value), Json::Object(o)) => {
                for (k, x) in o {
                    value.check_json(x).map_err(field(k))?;
                }
                Ok(())
            }
            (Check::Record(fields), Json::Object(o)) => {
                for f in fields.iter() {
                    match o.get(&f.name) {
                        Some(x) => f.node.check_json(x).map_err(field(&f.name))?,
                        None if f.optional => {}
                        None => return Err(f.missing()),
                    }
                }
                Ok(())
            }
            _ => Err(self.wrong(got)),
        }
    }
}
