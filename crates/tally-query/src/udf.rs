//! `json_get_str`, `json_get_int`, `json_get_float`: read one value out of
//! a JSON text column (`properties`), following a path of keys:
//! `json_get_float(properties, 'duration_ms')`,
//! `json_get_str(properties, 'utm', 'source')`.
//!
//! The object is scanned byte by byte, not parsed: keys that do not match
//! and their values are skipped without decoding or allocating, the scan
//! stops at the key, and a string without escapes is returned as a slice.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Builder, Int64Builder, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Want {
    Str,
    Int,
    Float,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonGet {
    name: &'static str,
    want: Want,
    signature: Signature,
}

/// The three functions, ready to register.
pub fn json_udfs() -> Vec<ScalarUDF> {
    [
        ("json_get_str", Want::Str),
        ("json_get_int", Want::Int),
        ("json_get_float", Want::Float),
    ]
    .into_iter()
    .map(|(name, want)| {
        // (json, key[, key…]): arguments are checked and coerced to text
        // by `coerce_types`.
        ScalarUDF::new_from_impl(JsonGet {
            name,
            want,
            signature: Signature::user_defined(Volatility::Immutable),
        })
    })
    .collect()
}

impl ScalarUDFImpl for JsonGet {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if !(2..=5).contains(&arg_types.len()) {
            return plan_err!(
                "{}(json, key[, key…]) takes a JSON text and 1 to 4 keys, got {} arguments",
                self.name,
                arg_types.len()
            );
        }
        Ok(vec![DataType::Utf8; arg_types.len()])
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(match self.want {
            Want::Str => DataType::Utf8,
            Want::Int => DataType::Int64,
            Want::Float => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let mut keys = Vec::with_capacity(args.args.len() - 1);
        for a in &args.args[1..] {
            match a {
                ColumnarValue::Scalar(ScalarValue::Utf8(Some(k))) => keys.push(k.clone()),
                ColumnarValue::Scalar(ScalarValue::Utf8(None)) => {
                    return Ok(ColumnarValue::Scalar(null_of(self.want)));
                }
                _ => {
                    return exec_err!(
                        "{}: keys must be constant strings, as in {}(properties, 'duration_ms')",
                        self.name,
                        self.name
                    );
                }
            }
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let json: ArrayRef = match &args.args[0] {
            ColumnarValue::Array(a) => a.clone(),
            ColumnarValue::Scalar(s) => s.to_array_of_size(1)?,
        };
        let scalar_input = matches!(&args.args[0], ColumnarValue::Scalar(_));
        let strings = json
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| {
                datafusion::error::DataFusionError::Execution(format!(
                    "{}: the first argument must be JSON text",
                    self.name
                ))
            })?;
        let rows = if scalar_input {
            1
        } else {
            n.min(strings.len())
        };
        let out: ArrayRef = match self.want {
            Want::Str => {
                let mut b = StringBuilder::with_capacity(rows, rows * 8);
                for i in 0..rows {
                    match (!strings.is_null(i))
                        .then(|| lookup(strings.value(i), &keys))
                        .flatten()
                    {
                        Some(Found::Str(s)) => b.append_value(s),
                        Some(Found::Int(v)) => b.append_value(v.to_string()),
                        Some(Found::Float(v)) => b.append_value(v.to_string()),
                        Some(Found::Bool(v)) => b.append_value(if v { "true" } else { "false" }),
                        Some(Found::Raw(r)) => b.append_value(r),
                        Some(Found::Null) | None => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
            Want::Int => {
                let mut b = Int64Builder::with_capacity(rows);
                for i in 0..rows {
                    let v = (!strings.is_null(i))
                        .then(|| lookup(strings.value(i), &keys))
                        .flatten();
                    b.append_option(match v {
                        Some(Found::Int(v)) => Some(v),
                        Some(Found::Float(f)) if f.fract() == 0.0 && f.abs() < 9.0e18 => {
                            Some(f as i64)
                        }
                        Some(Found::Str(s)) => s.trim().parse().ok(),
                        Some(Found::Bool(v)) => Some(v as i64),
                        _ => None,
                    });
                }
                Arc::new(b.finish())
            }
            Want::Float => {
                let mut b = Float64Builder::with_capacity(rows);
                for i in 0..rows {
                    let v = (!strings.is_null(i))
                        .then(|| lookup(strings.value(i), &keys))
                        .flatten();
                    b.append_option(match v {
                        Some(Found::Int(v)) => Some(v as f64),
                        Some(Found::Float(f)) => Some(f),
                        Some(Found::Str(s)) => s.trim().parse().ok(),
                        _ => None,
                    });
                }
                Arc::new(b.finish())
            }
        };
        if scalar_input {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
        } else {
            Ok(ColumnarValue::Array(out))
        }
    }
}

fn null_of(w: Want) -> ScalarValue {
    match w {
        Want::Str => ScalarValue::Utf8(None),
        Want::Int => ScalarValue::Int64(None),
        Want::Float => ScalarValue::Float64(None),
    }
}

/// A value found at a path.
#[derive(Debug, PartialEq)]
pub(crate) enum Found<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(std::borrow::Cow<'a, str>),
    /// An object or array, as JSON text.
    Raw(&'a str),
}

/// The value at `path` in the JSON object `text` (None: missing or not JSON).
pub(crate) fn lookup<'a>(text: &'a str, path: &[&str]) -> Option<Found<'a>> {
    let mut cur = text;
    for key in path {
        cur = find_key(cur, key)?;
    }
    (!path.is_empty()).then(|| scalar(cur))
}

fn scalar(raw: &str) -> Found<'_> {
    let t = raw.trim();
    match t.as_bytes().first() {
        Some(b'"') => {
            let inner = &t[1..t.len().saturating_sub(1).max(1)];
            if t.len() >= 2 && !inner.contains('\\') {
                Found::Str(std::borrow::Cow::Borrowed(inner))
            } else {
                match serde_json::from_str::<String>(t) {
                    Ok(s) => Found::Str(std::borrow::Cow::Owned(s)),
                    Err(_) => Found::Null,
                }
            }
        }
        Some(b'{') | Some(b'[') => Found::Raw(t),
        Some(b'n') => Found::Null,
        Some(b't') => Found::Bool(true),
        Some(b'f') => Found::Bool(false),
        Some(_) => match t.parse::<i64>() {
            Ok(v) => Found::Int(v),
            Err(_) => t.parse::<f64>().map_or(Found::Null, Found::Float),
        },
        None => Found::Null,
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `b[i]` is the opening quote of a string: the index after its closing one.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', &b[i..])?;
        if b[j] == b'"' {
            return Some(j + 1);
        }
        i = j + 2;
        if i > b.len() {
            return None;
        }
    }
}

/// `b[i]` starts a value: the index after it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => tally_types::codec::skip_nested(b, i),
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// The raw text of the value of `key` in the JSON object `text` (the first
/// one if the key repeats), found by scanning bytes: keys that do not match
/// and their values are skipped without decoding or allocating (a key with
/// escapes is decoded to compare). None if `text` is not an object or has
/// no such key.
fn find_key<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return None;
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let k_end = skip_string(b, i)?;
        let raw_key = &text[i + 1..k_end - 1];
        let matches = if raw_key.contains('\\') {
            serde_json::from_str::<String>(&text[i..k_end]).is_ok_and(|k| k == key)
        } else {
            raw_key == key
        };
        i = skip_ws(b, k_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let v_start = skip_ws(b, i + 1);
        let v_end = skip_value(b, v_start)?;
        if matches {
            return Some(&text[v_start..v_end]);
        }
        i = skip_ws(b, v_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let j = r#"{"a": 1, "b": "x\"y", "c": {"d": 2.5, "e": [1,2]}, "f": null, "g": true, "big": 12345678901}"#;
        assert_eq!(lookup(j, &["a"]), Some(Found::Int(1)));
        assert_eq!(lookup(j, &["b"]), Some(Found::Str("x\"y".into())));
        assert_eq!(lookup(j, &["c", "d"]), Some(Found::Float(2.5)));
        assert_eq!(lookup(j, &["c", "e"]), Some(Found::Raw("[1,2]")));
        assert_eq!(lookup(j, &["f"]), Some(Found::Null));
        assert_eq!(lookup(j, &["g"]), Some(Found::Bool(true)));
        assert_eq!(lookup(j, &["big"]), Some(Found::Int(12345678901)));
        assert_eq!(lookup(j, &["zz"]), None);
        assert_eq!(lookup(j, &["a", "x"]), None);
        assert_eq!(lookup("not json", &["a"]), None);
        assert_eq!(lookup("[1,2]", &["a"]), None);
        assert_eq!(lookup("{}", &["a"]), None);
        assert_eq!(
            lookup(r#" { "k\u0065y" : "v\n" , "z":1}"#, &["key"]),
            Some(Found::Str("v\n".into()))
        );
        assert_eq!(
            lookup(r#"{"a": {"b": [1, {"c": "}"}]}, "d": 4}"#, &["d"]),
            Some(Found::Int(4))
        );
        assert_eq!(lookup(r#"{"a": 1, "a": 2}"#, &["a"]), Some(Found::Int(1)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]
        /// Fuzzing: any text, and any text cut out of a real object, under
        /// any path, gives a value or None — never a panic, never a slice
        /// outside the text.
        #[test]
        fn the_scanner_never_panics(
            junk in "\\PC{0,40}",
            doc in "[{}\\[\\]\"\\\\:, a-c0-9é\\n-]{0,60}",
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            path in proptest::collection::vec("[a-c\"\\\\]{0,2}", 1..4),
        ) {
            let keys: Vec<&str> = path.iter().map(String::as_str).collect();
            let _ = lookup(&junk, &keys);
            let _ = lookup(&doc, &keys);
            let real = r#"{"a": {"b": "x\"y\\", "c": [1, {"a": 2}]}, "b\u0041": -1.5e3, "c": null}"#;
            let at = cut.index(real.len() + 1);
            if real.is_char_boundary(at) {
                let _ = lookup(&real[..at], &keys);
                let _ = lookup(&real[at..], &keys);
            }
        }
    }

    /// The scanner against serde_json's full parse, on random objects with
    /// nesting, escapes and every value kind.
    #[test]
    fn scanner_agrees_with_a_full_parse() {
        use serde_json::{Map, Value, json};
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        fn text(r: &mut dyn FnMut(u64) -> u64) -> String {
            let parts = ["a", "b\"q", "c\\d", "é", "\n", "}", "{", "[", ",", ":", " "];
            (0..r(4))
                .map(|_| parts[r(parts.len() as u64) as usize])
                .collect()
        }
        fn value(r: &mut dyn FnMut(u64) -> u64, depth: u32) -> Value {
            match r(if depth > 2 { 6 } else { 8 }) {
                0 => Value::Null,
                1 => json!(r(2) == 0),
                2 => json!(r(1000) as i64 - 500),
                3 => json!((r(100000) as f64) / 7.0),
                4 | 5 => json!(text(r)),
                6 => Value::Array((0..r(3)).map(|_| value(r, depth + 1)).collect()),
                _ => {
                    let mut m = Map::new();
                    for i in 0..r(4) {
                        m.insert(format!("{}{i}", text(r)), value(r, depth + 1));
                    }
                    Value::Object(m)
                }
            }
        }
        for _ in 0..3000 {
            let mut m = Map::new();
            for i in 0..rnd(6) {
                m.insert(format!("{}{i}", text(&mut rnd)), value(&mut rnd, 0));
            }
            let v = Value::Object(m.clone());
            let s = if rnd(2) == 0 {
                v.to_string()
            } else {
                serde_json::to_string_pretty(&v).unwrap()
            };
            for (k, want) in &m {
                let got = lookup(&s, &[k]);
                let want = match want {
                    Value::Null => Found::Null,
                    Value::Bool(b) => Found::Bool(*b),
                    Value::Number(n) => match n.as_i64() {
                        Some(i) => Found::Int(i),
                        None => Found::Float(n.as_f64().unwrap()),
                    },
                    Value::String(t) => Found::Str(t.clone().into()),
                    Value::Array(_) | Value::Object(_) => {
                        let Some(Found::Raw(r)) = got else {
                            panic!("{s} {k}: {got:?}")
                        };
                        // Both through one parser (serde_json's float parse
                        // is not exact without `float_roundtrip`).
                        let parse = |t: &str| serde_json::from_str::<Value>(t).unwrap();
                        assert_eq!(parse(r), parse(&want.to_string()), "{s} {k}");
                        continue;
                    }
                };
                assert_eq!(got, Some(want), "{s} key {k:?}");
            }
            assert_eq!(lookup(&s, &["absent key"]), None, "{s}");
        }
    }
}

/// `date_trunc` with a fast path for UTC timestamps: DataFusion truncates a
/// timestamp that carries a time zone (ours are all `UTC`) to an hour or a
/// day through chrono-tz, one value at a time; in UTC an hour and a day are
/// fixed lengths, so this is a floor on the integer. Every other case
/// (months, weeks, other zones, time types, scalars) goes to DataFusion's
/// own function, which this one wraps and otherwise copies.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct UtcDateTrunc {
    inner: Arc<ScalarUDF>,
}

impl UtcDateTrunc {
    pub(crate) fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(UtcDateTrunc {
            inner: datafusion::functions::datetime::date_trunc(),
        })
    }
}

/// Milliseconds in one unit of a fixed-length granularity.
fn fixed_step_ms(granularity: &str) -> Option<i64> {
    Some(match granularity.to_ascii_lowercase().as_str() {
        "second" => 1_000,
        "minute" => 60_000,
        "hour" => 3_600_000,
        "day" => 86_400_000,
        _ => return None,
    })
}

fn is_utc(tz: &Option<Arc<str>>) -> bool {
    tz.as_deref()
        .is_none_or(|z| matches!(z, "UTC" | "utc" | "+00:00" | "Z" | "Etc/UTC"))
}

/// The `ScalarUDFImpl` methods of a wrapper that are its `inner`
/// function's own: name, aliases, signature, types. The wrapper writes
/// only what it changes (`invoke_with_args`, …).
macro_rules! delegate_to_inner {
    () => {
        fn name(&self) -> &str {
            self.inner.name()
        }

        fn aliases(&self) -> &[String] {
            self.inner.aliases()
        }

        fn signature(&self) -> &datafusion::logical_expr::Signature {
            self.inner.signature()
        }

        fn return_type(
            &self,
            arg_types: &[arrow::datatypes::DataType],
        ) -> datafusion::common::Result<arrow::datatypes::DataType> {
            self.inner.return_type(arg_types)
        }

        fn return_field_from_args(
            &self,
            args: datafusion::logical_expr::ReturnFieldArgs,
        ) -> datafusion::common::Result<arrow::datatypes::FieldRef> {
            self.inner.return_field_from_args(args)
        }

        fn coerce_types(
            &self,
            arg_types: &[arrow::datatypes::DataType],
        ) -> datafusion::common::Result<Vec<arrow::datatypes::DataType>> {
            self.inner.coerce_types(arg_types)
        }
    };
}
pub(crate) use delegate_to_inner;

impl ScalarUDFImpl for UtcDateTrunc {
    delegate_to_inner!();

    fn output_ordering(
        &self,
        inputs: &[datafusion::logical_expr::sort_properties::ExprProperties],
    ) -> Result<datafusion::logical_expr::sort_properties::SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use arrow::array::AsArray;
        use arrow::datatypes::{TimeUnit, TimestampMillisecondType};
        let step = match &args.args[0] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(g)) | ScalarValue::Utf8View(Some(g))) => {
                fixed_step_ms(g)
            }
            _ => None,
        };
        if let (Some(step), ColumnarValue::Array(a)) = (step, &args.args[1])
            && let DataType::Timestamp(TimeUnit::Millisecond, tz) = a.data_type()
            && is_utc(tz)
        {
            let out = a
                .as_primitive::<TimestampMillisecondType>()
                .unary::<_, TimestampMillisecondType>(|v| v.saturating_sub(v.rem_euclid(step)))
                .with_timezone_opt(tz.clone());
            return Ok(ColumnarValue::Array(Arc::new(out)));
        }
        self.inner.invoke_with_args(args)
    }
}
