//! Reading one value out of a JSON object's text by a path of keys,
//! without parsing it: keys that do not match and their values are skipped
//! byte by byte, the scan stops at the key, and a string without escapes is
//! returned as a slice of the text. The `json_get_*` SQL functions are
//! built on it; its reference in tests is serde_json's full parse.

/// A value found at a path.
#[derive(Debug, PartialEq)]
pub enum Found<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(std::borrow::Cow<'a, str>),
    /// An object or array, as JSON text.
    Raw(&'a str),
}

/// The value at `path` in the JSON object `text` (None: missing or not JSON).
pub fn lookup<'a>(text: &'a str, path: &[&str]) -> Option<Found<'a>> {
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
            // A whole string without escapes is its own text; anything
            // else (escapes, or text that is not a closed string: any
            // user text reaches here through SQL) is decoded, or NULL.
            if t.len() >= 2 && t.ends_with('"') {
                let inner = &t[1..t.len() - 1];
                if !inner.contains(['\\', '"']) {
                    return Found::Str(std::borrow::Cow::Borrowed(inner));
                }
            }
            match serde_json::from_str::<String>(t) {
                Ok(s) => Found::Str(std::borrow::Cow::Owned(s)),
                Err(_) => Found::Null,
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
        b'{' | b'[' => crate::codec::skip_nested(b, i),
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
        // Found by cargo fuzz: a value that is an unclosed string ending
        // inside a multi-byte character (user text, through SQL).
        assert_eq!(
            lookup("{\"k\":\u{b}\"\u{fffd}*\u{fffd}\u{b}}", &["k"]),
            Some(Found::Null)
        );
        assert_eq!(lookup("{\"k\":\"\u{e9}", &["k"]), None);
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
