//! Dimensions: the properties a tenant declares to split its rollups by.
//!
//! Each (minute, event type) aggregate keeps, besides its total, one
//! aggregate per *combination* of dimension values that occurred
//! ([`crate::Agg::by`]). A combination is keyed by a compact text: the
//! present dimensions in declared order as `name=value`, joined by the
//! unit separator `\x1f` (an event with none of them has the empty key).
//! The names travel in the key, so data written under one declaration
//! stays readable after the declaration changes: a dimension a key lacks
//! is simply missing for its events.
//!
//! # The cardinality guard
//!
//! At most [`Dimensions::max_values`] distinct values per dimension are
//! kept per tenant and bucket (minute, or hour for events that land in a
//! downsampled hour); later new values, and values longer than
//! [`Dimensions::max_value_bytes`], are folded into [`OTHER`]. Which values
//! a bucket holds is read back from its combinations, so the decision is
//! the same when a recovered processor replays the same events.
//!
//! Values alone do not bound memory: three dimensions of 1000 values each
//! make a billion combinations. So a bucket also keeps at most
//! [`Dimensions::max_combinations`] combinations (over its event types);
//! an event of a new combination past that is counted under the
//! combination of the same dimensions with every value [`OTHER`]. Hour
//! buckets built by downsampling fold the same way as minutes merge in.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tally_types::codec::PropValue;

/// The value that values past the cap are folded into.
pub const OTHER: &str = "__other__";

/// The event type that events of new types past
/// [`Dimensions::max_event_types`] are counted under.
pub const OTHER_TYPE: &str = OTHER;

/// Separates the `name=value` pairs of a combination key.
pub const SEP: char = '\x1f';

/// Most dimensions one tenant may declare (a key is built on the stack).
pub const MAX_DIMS: usize = 8;

/// Which properties are dimensions, per tenant, and the cap.
#[derive(Clone, Debug)]
pub struct Dimensions {
    default: Arc<[Box<str>]>,
    tenants: HashMap<Box<str>, Arc<[Box<str>]>>,
    /// Distinct values kept per dimension, tenant and bucket.
    pub max_values: usize,
    /// Longer values are folded into [`OTHER`].
    pub max_value_bytes: usize,
    /// Combinations kept per tenant and bucket, over its event types.
    pub max_combinations: usize,
    /// Event types kept per tenant and bucket (the event type is a
    /// dimension too: without a cap, a client inventing a type per event
    /// makes every event a new aggregate and a linear search).
    pub max_event_types: usize,
    /// Values folded into [`OTHER`], shared by every clone (the stores of
    /// one node count together).
    folded: Arc<AtomicU64>,
    /// Events of new combinations counted under the all-[`OTHER`] one.
    combos_folded: Arc<AtomicU64>,
    /// Events of new event types counted under [`OTHER_TYPE`].
    types_folded: Arc<AtomicU64>,
    /// Numeric values past [`crate::rollup::MAX_PROPERTIES`], not aggregated.
    props_dropped: Arc<AtomicU64>,
}

/// Event types kept per tenant and bucket unless configured.
pub const MAX_EVENT_TYPES: usize = 1000;

/// What the cardinality guards folded or left out so far, in events or
/// values (see each counter's method on [`Dimensions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folds {
    pub values: u64,
    pub combinations: u64,
    pub event_types: u64,
    pub properties: u64,
}

/// Combinations kept per tenant and bucket unless configured.
pub const MAX_COMBINATIONS: usize = 10_000;

/// Declarations are equal when they declare the same (the counter is not
/// content).
impl PartialEq for Dimensions {
    fn eq(&self, o: &Self) -> bool {
        self.default == o.default
            && self.tenants == o.tenants
            && self.max_values == o.max_values
            && self.max_value_bytes == o.max_value_bytes
            && self.max_combinations == o.max_combinations
            && self.max_event_types == o.max_event_types
    }
}

impl Default for Dimensions {
    /// No dimension declared: rollups are per event type only.
    fn default() -> Self {
        Dimensions {
            default: Arc::from(Vec::new()),
            tenants: HashMap::new(),
            max_values: 1000,
            max_value_bytes: 256,
            max_combinations: MAX_COMBINATIONS,
            max_event_types: MAX_EVENT_TYPES,
            folded: Arc::default(),
            combos_folded: Arc::default(),
            types_folded: Arc::default(),
            props_dropped: Arc::default(),
        }
    }
}

/// Why a declaration cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DimensionError(pub String);

impl Dimensions {
    /// Checks and takes a declaration: `default` for every tenant without
    /// a list of its own in `tenants`.
    pub fn new(
        default: &[String],
        tenants: &[(String, Vec<String>)],
        max_values: usize,
        max_value_bytes: usize,
    ) -> Result<Dimensions, DimensionError> {
        let list = |who: &str, names: &[String]| -> Result<Arc<[Box<str>]>, DimensionError> {
            if names.len() > MAX_DIMS {
                return Err(DimensionError(format!(
                    "{who}: {} dimensions declared, at most {MAX_DIMS} are supported; keep the properties you break down by",
                    names.len()
                )));
            }
            let mut out: Vec<Box<str>> = Vec::with_capacity(names.len());
            for n in names {
                let n = n.trim();
                if n.is_empty()
                    || n == "event_type"
                    || n.contains(['=', SEP, ',', ':'])
                    || n.len() > 128
                {
                    return Err(DimensionError(format!(
                        "{who}: {n:?} cannot be a dimension: name a property (no '=', ',' or ':', not event_type, which is always one)"
                    )));
                }
                if out.iter().any(|x| &**x == n) {
                    return Err(DimensionError(format!("{who}: {n:?} is declared twice")));
                }
                out.push(n.into());
            }
            Ok(Arc::from(out))
        };
        let max_values = at_least_one(max_values, "max-values", 1000)?;
        let mut by_tenant = HashMap::new();
        for (t, names) in tenants {
            by_tenant.insert(
                t.as_str().into(),
                list(&format!("dimensions.tenants.{t}"), names)?,
            );
        }
        Ok(Dimensions {
            default: list("dimensions.default", default)?,
            tenants: by_tenant,
            max_values,
            max_value_bytes: max_value_bytes.max(1),
            max_combinations: MAX_COMBINATIONS,
            max_event_types: MAX_EVENT_TYPES,
            folded: Arc::default(),
            combos_folded: Arc::default(),
            types_folded: Arc::default(),
            props_dropped: Arc::default(),
        })
    }

    /// The same declaration keeping at most `n` event types per tenant and
    /// bucket.
    pub fn with_max_event_types(mut self, n: usize) -> Result<Dimensions, DimensionError> {
        self.max_event_types = at_least_one(n, "max-event-types", MAX_EVENT_TYPES)?;
        Ok(self)
    }

    /// Events of new event types counted under [`OTHER_TYPE`], by every
    /// store sharing this declaration.
    pub fn event_types_folded(&self) -> u64 {
        self.types_folded.load(Relaxed)
    }

    /// Numeric values not aggregated (see [`crate::rollup::MAX_PROPERTIES`]).
    pub fn properties_dropped(&self) -> u64 {
        self.props_dropped.load(Relaxed)
    }

    pub(crate) fn note_properties_dropped(&self, n: u64) {
        if n > 0 {
            self.props_dropped.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn note_event_types_folded(&self, events: u64) {
        self.types_folded.fetch_add(events, Relaxed);
    }

    /// The same declaration keeping at most `n` combinations per tenant
    /// and bucket.
    pub fn with_max_combinations(mut self, n: usize) -> Result<Dimensions, DimensionError> {
        self.max_combinations = at_least_one(n, "max-combinations", MAX_COMBINATIONS)?;
        Ok(self)
    }

    /// Events of new combinations counted under the all-[`OTHER`] one,
    /// by every store sharing this declaration.
    pub fn combinations_folded(&self) -> u64 {
        self.combos_folded.load(Relaxed)
    }

    pub(crate) fn note_combination_folded(&self) {
        self.combos_folded.fetch_add(1, Relaxed);
    }

    /// The dimensions `tenant` declared (in declared order).
    #[inline]
    pub fn of(&self, tenant: &str) -> &Arc<[Box<str>]> {
        if self.tenants.is_empty() {
            return &self.default;
        }
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// Every guard's count at once.
    pub fn folds(&self) -> Folds {
        Folds {
            values: self.values_folded(),
            combinations: self.combinations_folded(),
            event_types: self.event_types_folded(),
            properties: self.properties_dropped(),
        }
    }

    /// Values folded into [`OTHER`] by every store sharing this declaration.
    pub fn values_folded(&self) -> u64 {
        self.folded.load(Relaxed)
    }

    pub(crate) fn note_folded(&self, n: u64) {
        if n > 0 {
            self.folded.fetch_add(n, Relaxed);
        }
    }

    /// True when no tenant declares any dimension.
    pub fn is_empty(&self) -> bool {
        self.default.is_empty() && self.tenants.values().all(|d| d.is_empty())
    }

    /// What a query may group by or filter on for `tenant`, for messages:
    /// `event_type, country, device`.
    pub fn describe(&self, tenant: &str) -> String {
        let mut s = String::from("event_type");
        for d in self.of(tenant).iter() {
            s.push_str(", ");
            s.push_str(d);
        }
        s
    }

    /// True when `name` is `event_type` or one of `tenant`'s dimensions.
    pub fn declares(&self, tenant: &str, name: &str) -> bool {
        name == "event_type" || self.of(tenant).iter().any(|d| &**d == name)
    }
}

/// A cap of `[dimensions]` as given, refused when 0.
fn at_least_one(n: usize, key: &str, default: usize) -> Result<usize, DimensionError> {
    if n == 0 {
        return Err(DimensionError(format!(
            "dimensions.{key}: must be at least 1 (the default is {default})"
        )));
    }
    Ok(n)
}

/// The text of a property value as a dimension value: strings as they are,
/// numbers and booleans as JSON writes them; null, objects and arrays are
/// no value (the dimension is missing for the event).
#[inline]
pub fn value_text<'a>(v: &PropValue<'a>) -> Option<Cow<'a, str>> {
    match *v {
        PropValue::Str(s) => Some(Cow::Borrowed(s)),
        PropValue::Int(i) => Some(Cow::Owned(i.to_string())),
        PropValue::Float(f) if f.is_finite() => Some(Cow::Owned(
            tally_types::integral(f).map_or_else(|| f.to_string(), |i| i.to_string()),
        )),
        PropValue::Bool(b) => Some(Cow::Borrowed(if b { "true" } else { "false" })),
        _ => None,
    }
}

/// Appends `name=value` to a combination key under construction; a unit
/// separator inside the value (which would split the key) is replaced.
#[inline]
pub fn push_pair(key: &mut String, name: &str, value: &str) {
    if !key.is_empty() {
        key.push(SEP);
    }
    key.push_str(name);
    key.push('=');
    if value.contains(SEP) {
        key.push_str(&value.replace(SEP, "\u{fffd}"));
    } else {
        key.push_str(value);
    }
}

/// The `(name, value)` pairs of a combination key.
#[inline]
pub fn pairs(key: &str) -> impl Iterator<Item = (&str, &str)> {
    key.split(SEP)
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
}

/// Writes into `out` the key of the same dimensions as `key` with every
/// value [`OTHER`]; answers how many values that changed.
pub fn fold_all(key: &str, out: &mut String) -> u64 {
    out.clear();
    let mut changed = 0;
    for (n, v) in pairs(key) {
        if v != OTHER {
            changed += 1;
        }
        push_pair(out, n, OTHER);
    }
    changed
}

/// The value of `name` in a combination key, if present.
#[inline]
pub fn value_of<'k>(key: &'k str, name: &str) -> Option<&'k str> {
    pairs(key).find(|(n, _)| *n == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_separators_in_values_cannot_split_them() {
        let mut k = String::new();
        push_pair(&mut k, "country", "DE");
        push_pair(&mut k, "page", "/a=b\x1fdevice=x");
        let got: Vec<_> = pairs(&k).collect();
        assert_eq!(
            got,
            vec![("country", "DE"), ("page", "/a=b\u{fffd}device=x")]
        );
        assert_eq!(value_of(&k, "device"), None);
        assert_eq!(value_of(&k, "page"), Some("/a=b\u{fffd}device=x"));
        assert_eq!(pairs("").count(), 0);
    }

    #[test]
    fn declarations_are_checked_and_name_the_way_out() {
        let d = Dimensions::new(
            &["country".into(), "device".into()],
            &[("acme".into(), vec!["plan".into()])],
            10,
            64,
        )
        .unwrap();
        assert_eq!(&*d.of("other")[0], "country");
        assert_eq!(&*d.of("acme")[0], "plan");
        assert!(d.declares("acme", "event_type"));
        assert!(!d.declares("acme", "country"));
        assert_eq!(d.describe("x"), "event_type, country, device");
        for bad in ["event_type", "a=b", "", "x,y"] {
            let e = Dimensions::new(&[bad.into()], &[], 10, 64).unwrap_err();
            assert!(e.0.contains("dimensions.default"), "{e}");
        }
        let e = Dimensions::new(&["a".into(), "a".into()], &[], 10, 64).unwrap_err();
        assert!(e.0.contains("twice"), "{e}");
        assert!(Dimensions::new(&[], &[], 0, 64).is_err());
    }

    #[test]
    fn values_are_texts_of_scalars() {
        assert_eq!(value_text(&PropValue::Str("x")).as_deref(), Some("x"));
        assert_eq!(value_text(&PropValue::Int(-3)).as_deref(), Some("-3"));
        assert_eq!(value_text(&PropValue::Float(2.0)).as_deref(), Some("2"));
        assert_eq!(value_text(&PropValue::Float(2.5)).as_deref(), Some("2.5"));
        assert_eq!(value_text(&PropValue::Bool(true)).as_deref(), Some("true"));
        assert_eq!(value_text(&PropValue::Null), None);
        assert_eq!(value_text(&PropValue::Json("{}")), None);
    }
}
