//! Tenant schemas: the properties a tenant declares, with their types.
//! Ingest rejects an event whose declared property has another type (to the
//! malformed DLQ, naming the property, the value and the type); properties
//! nobody declared are kept as they come, so a schema only ever constrains
//! what it names and grows by adding names. SQL shows each declared
//! property as a typed column of `events`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The type of a declared property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PropType {
    String,
    Int,
    Float,
    Bool,
}

/// What the SQL column of a registered property reads besides the
/// property itself: its older names (Avro `aliases`), then, per event
/// type, the value an event without it reads as (its schema's `default`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ColumnFill {
    pub aliases: Vec<String>,
    /// (event type, default value).
    pub defaults: Vec<(String, serde_json::Value)>,
}

/// A typed property column of `events`: its type, and what it reads where
/// an event lacks the property.
#[derive(Debug, Clone, PartialEq)]
pub struct PropColumn {
    pub ty: PropType,
    pub fill: ColumnFill,
}

impl From<PropType> for PropColumn {
    fn from(ty: PropType) -> PropColumn {
        PropColumn {
            ty,
            fill: ColumnFill::default(),
        }
    }
}

/// Declared properties (name → type) per tenant.
pub type Schemas = BTreeMap<String, BTreeMap<String, PropType>>;

/// The registered schemas of event types (the schema registry), as ingest
/// checks events against them.
pub trait PropsCheck: Send + Sync {
    /// The checker of one event type's properties at `version` (None: the
    /// latest); `Ok(None)`: the type has no schema. The parser asks once
    /// per run of events of one (tenant, type, version), not per event.
    fn checker(
        &self,
        tenant: &str,
        event_type: &str,
        version: Option<u32>,
    ) -> Result<Option<std::sync::Arc<dyn PropsChecker>>, String>;
}

/// One event type's schema, checking an event's properties.
pub trait PropsChecker: Send + Sync {
    /// `Err`: why the properties do not fit (the property, what the
    /// schema expects, what came, and the version), for the client and
    /// the DLQ.
    fn check(
        &self,
        props: &[(std::borrow::Cow<'_, str>, &serde_json::value::RawValue)],
    ) -> Result<(), String>;

    /// The version of the schema checked against, kept with each event
    /// that passed (the `schema_version` column of `events`).
    fn version(&self) -> u32;
}

impl PropType {
    pub fn name(self) -> &'static str {
        match self {
            PropType::String => "string",
            PropType::Int => "int",
            PropType::Float => "float",
            PropType::Bool => "bool",
        }
    }

    /// Whether `json`, one JSON value as text (valid JSON), is of this type.
    /// `null` is of every type: a declared property may be null or absent.
    /// An int is an integer literal that fits 64 bits; a float any number.
    pub fn admits(self, json: &str) -> bool {
        let number = json
            .as_bytes()
            .first()
            .is_some_and(|&c| c == b'-' || c.is_ascii_digit());
        json == "null"
            || match self {
                PropType::String => json.starts_with('"'),
                PropType::Bool => json == "true" || json == "false",
                PropType::Float => number,
                PropType::Int => number && json.parse::<i64>().is_ok(),
            }
    }

    /// What a client should send instead, for error messages.
    pub fn hint(self) -> &'static str {
        match self {
            PropType::String => "a JSON string",
            PropType::Int => "an integer (no fraction or exponent, within 64 bits)",
            PropType::Float => "a JSON number",
            PropType::Bool => "true or false",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PropType::*;

    #[test]
    fn types_admit_their_values_and_null() {
        for t in [String, Int, Float, Bool] {
            assert!(t.admits("null"), "{t:?}");
        }
        assert!(String.admits(r#""x""#) && !String.admits("1") && !String.admits("true"));
        assert!(Int.admits("-12") && Int.admits("0") && !Int.admits("1.5"));
        assert!(!Int.admits("1e3") && !Int.admits("99999999999999999999") && !Int.admits(r#""1""#));
        assert!(Float.admits("1.5") && Float.admits("-2e-3") && Float.admits("7"));
        assert!(!Float.admits(r#""1.5""#) && !Float.admits("{}") && !Float.admits("[1]"));
        assert!(Bool.admits("true") && Bool.admits("false") && !Bool.admits("1"));
    }
}
