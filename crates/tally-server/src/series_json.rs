//! The body of a metrics answer, written straight into bytes.
//!
//! A day of 1-minute points split by a dimension is tens of thousands of
//! points; building a `serde_json::Value` tree for them (a string per
//! timestamp, a vector per point) cost as much as the query itself. This
//! writes the same JSON, keys in the same (sorted) order, in one pass;
//! the tests keep the `serde_json::Value` path as the reference.

use tally_store::{Series, Value};
use tally_types::Millis;
use tally_types::time::write_rfc3339;

/// What a metrics answer says besides its series.
pub(crate) struct Answer<'a> {
    pub metric: &'a str,
    pub granularity: &'a str,
    pub series: &'a [Series],
    /// Why a metric of a property has no points.
    pub note: Option<&'a str>,
    /// Minutes before this were folded into hours.
    pub downsampled_before: Option<Millis>,
}

/// `{"downsampled_before"?, "granularity", "metric", "note"?, "series":
/// [{"labels": {...}, "points": [[time, value], ...]}, ...]}`.
pub(crate) fn write(a: &Answer<'_>) -> Vec<u8> {
    let points: usize = a.series.iter().map(|s| s.points.len()).sum();
    let mut out = String::with_capacity(64 + points * 32);
    out.push('{');
    if let Some(t) = a.downsampled_before {
        out.push_str("\"downsampled_before\":\"");
        write_rfc3339(&mut out, t);
        out.push_str("\",");
    }
    out.push_str("\"granularity\":");
    string(&mut out, a.granularity);
    out.push_str(",\"metric\":");
    string(&mut out, a.metric);
    if let Some(n) = a.note {
        out.push_str(",\"note\":");
        string(&mut out, n);
    }
    out.push_str(",\"series\":[");
    // Floats go through serde_json's writer (its digits) into this buffer,
    // reused, rather than a string per point.
    let mut scratch = Vec::with_capacity(32);
    for (i, s) in a.series.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"labels\":{");
        // Keys sorted, as a JSON object map orders them.
        let mut labels: Vec<&(String, Option<String>)> = s.labels.iter().collect();
        labels.sort_by(|x, y| x.0.cmp(&y.0));
        labels.dedup_by(|x, y| x.0 == y.0);
        for (j, (k, v)) in labels.into_iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            string(&mut out, k);
            out.push(':');
            match v {
                Some(v) => string(&mut out, v),
                None => out.push_str("null"),
            }
        }
        out.push_str("},\"points\":[");
        for (j, &(t, v)) in s.points.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str("[\"");
            write_rfc3339(&mut out, t);
            out.push_str("\",");
            number(&mut out, &mut scratch, v);
            out.push(']');
        }
        out.push_str("]}");
    }
    out.push_str("]}");
    out.into_bytes()
}

/// A JSON string, escaped as serde_json escapes it.
fn string(out: &mut String, s: &str) {
    let needs = s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\');
    if needs {
        // Rare: labels and names with quotes or control characters.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "null".into()));
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

/// A point's value: integers (and integral floats) as integers, other
/// finite floats as serde_json writes them, non-finite ones as `null`.
fn number(out: &mut String, scratch: &mut Vec<u8>, v: Value) {
    use std::fmt::Write;
    match v {
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => match tally_types::integral(f) {
            Some(i) => {
                let _ = write!(out, "{i}");
            }
            None => {
                scratch.clear();
                if serde_json::to_writer(&mut *scratch, &f).is_ok()
                    && let Ok(text) = std::str::from_utf8(scratch)
                {
                    out.push_str(text);
                } else {
                    out.push_str("null");
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value as Json, json};
    use tally_types::time::format_rfc3339;

    /// The reference: the answer as a `serde_json::Value` tree.
    fn reference(a: &Answer<'_>) -> Json {
        let number = |v: Value| match v {
            Value::Int(i) => json!(i),
            Value::Float(f) => tally_types::integral(f).map_or_else(|| json!(f), |i| json!(i)),
        };
        let series: Vec<Json> = a
            .series
            .iter()
            .map(|s| {
                let labels: serde_json::Map<String, Json> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().map_or(Json::Null, Json::String)))
                    .collect();
                let points: Vec<Json> = s
                    .points
                    .iter()
                    .map(|&(t, v)| json!([format_rfc3339(t), number(v)]))
                    .collect();
                json!({ "labels": labels, "points": points })
            })
            .collect();
        let mut body =
            json!({ "metric": a.metric, "granularity": a.granularity, "series": series });
        if let Some(n) = a.note {
            body["note"] = json!(n);
        }
        if let Some(t) = a.downsampled_before {
            body["downsampled_before"] = json!(format_rfc3339(t));
        }
        body
    }

    fn text(rng: &mut StdRng) -> String {
        const PARTS: [&str; 9] = [
            "DE",
            "mobile",
            "/a\"b",
            "back\\slash",
            "tab\t",
            "é",
            "\u{1f}",
            "",
            "x y",
        ];
        (0..rng.random_range(1..3))
            .map(|_| PARTS[rng.random_range(0..PARTS.len())])
            .collect()
    }

    fn value(rng: &mut StdRng) -> Value {
        match rng.random_range(0..7) {
            0 => Value::Int(rng.random()),
            1 => Value::Float(rng.random_range(-1e6..1e6)),
            2 => Value::Float(rng.random_range(-5..5) as f64),
            3 => Value::Float(f64::NAN),
            4 => Value::Float(f64::INFINITY),
            5 => Value::Float(1e300 * rng.random_range(-2.0..2.0)),
            _ => Value::Float(rng.random::<f64>() * 1e-9),
        }
    }

    /// Byte for byte the text serde_json writes for the same answer.
    #[test]
    fn matches_the_serde_json_tree() {
        let mut rng = StdRng::seed_from_u64(30);
        for round in 0..300 {
            let series: Vec<Series> = (0..rng.random_range(0..4))
                .map(|_| Series {
                    labels: (0..rng.random_range(0..3))
                        .map(|i| {
                            let k = ["country", "event_type", "page"][i];
                            (k.to_string(), rng.random_bool(0.8).then(|| text(&mut rng)))
                        })
                        .rev()
                        .collect(),
                    points: (0..rng.random_range(0..6))
                        .map(|_| {
                            let t = rng.random_range(-1_000_000_000_000i64..300_000_000_000_000);
                            let t = if rng.random_bool(0.7) {
                                t - t.rem_euclid(60_000)
                            } else {
                                t
                            };
                            (t, value(&mut rng))
                        })
                        .collect(),
                })
                .collect();
            let note = text(&mut rng);
            let a = Answer {
                metric: if round % 2 == 0 {
                    "count"
                } else {
                    "p95:dur\"ation"
                },
                granularity: "1m",
                series: &series,
                note: rng.random_bool(0.3).then_some(note.as_str()),
                downsampled_before: rng
                    .random_bool(0.3)
                    .then(|| rng.random_range(0..2_000_000_000_000)),
            };
            let got = write(&a);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                reference(&a).to_string(),
                "round {round}"
            );
        }
    }
}
