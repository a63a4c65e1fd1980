//! Answers in the formats a client asks for with `Accept`: JSON (default,
//! `{"columns": [...], "rows": [[...]]}`), CSV, NDJSON, Arrow IPC stream.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::Value;
use tally_types::time::format_rfc3339;

use crate::QueryResult;

/// The output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Ndjson,
    Arrow,
}

impl Format {
    /// Picks the format from an `Accept` header (the first one named that
    /// is supported; JSON when none is).
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(a) = accept else { return Format::Json };
        for part in a.split(',') {
            let mime = part
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match mime.as_str() {
                "application/json" => return Format::Json,
                "text/csv" => return Format::Csv,
                "application/x-ndjson" | "application/ndjson" | "application/jsonlines" => {
                    return Format::Ndjson;
                }
                "application/vnd.apache.arrow.stream" | "application/vnd.apache.arrow.file" => {
                    return Format::Arrow;
                }
                _ => {}
            }
        }
        Format::Json
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Encodes a result.
pub fn encode(r: &QueryResult, f: Format) -> Result<Vec<u8>, arrow::error::ArrowError> {
    match f {
        Format::Json => {
            let mut v = serde_json::json!({
                "columns": r.schema.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>(),
                "rows": rows(r),
            });
            if r.truncated {
                v["truncated"] = Value::Bool(true);
            }
            v["elapsed_ms"] = serde_json::json!((r.elapsed_ms * 1000.0).round() / 1000.0);
            if r.cached {
                v["cached"] = Value::Bool(true);
            }
            Ok(serde_json::to_vec(&v).unwrap_or_default())
        }
        Format::Ndjson => {
            let names: Vec<&String> = r.schema.fields().iter().map(|f| f.name()).collect();
            let mut out = Vec::new();
            for row in rows(r) {
                let obj: serde_json::Map<String, Value> =
                    names.iter().map(|n| (*n).clone()).zip(row).collect();
                serde_json::to_writer(&mut out, &obj).unwrap_or_default();
                out.push(b'\n');
            }
            Ok(out)
        }
        Format::Csv => {
            let mut out = Vec::new();
            let names: Vec<String> = r
                .schema
                .fields()
                .iter()
                .map(|f| csv_cell(f.name()))
                .collect();
            out.extend_from_slice(names.join(",").as_bytes());
            out.push(b'\n');
            for row in rows(r) {
                let cells: Vec<String> = row
                    .into_iter()
                    .map(|v| match v {
                        Value::Null => String::new(),
                        Value::String(s) => csv_cell(&s),
                        other => csv_cell(&other.to_string()),
                    })
                    .collect();
                out.extend_from_slice(cells.join(",").as_bytes());
                out.push(b'\n');
            }
            Ok(out)
        }
        Format::Arrow => {
            let mut out = Vec::new();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &r.schema)?;
                for b in &r.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            Ok(out)
        }
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Rows as JSON values: numbers as numbers, timestamps as RFC 3339 UTC,
/// anything else as its display text.
pub fn rows(r: &QueryResult) -> Vec<Vec<Value>> {
    let mut out = Vec::with_capacity(r.rows);
    for b in &r.batches {
        let cols: Vec<Vec<Value>> = b.columns().iter().map(column_values).collect();
        for i in 0..b.num_rows() {
            out.push(cols.iter().map(|c| c[i].clone()).collect());
        }
    }
    out
}

fn num(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// One column as JSON values.
pub fn column_values(a: &ArrayRef) -> Vec<Value> {
    let n = a.len();
    macro_rules! prim {
        ($t:ty, $conv:expr) => {{
            let p = a.as_primitive::<$t>();
            (0..n)
                .map(|i| {
                    if p.is_null(i) {
                        Value::Null
                    } else {
                        $conv(p.value(i))
                    }
                })
                .collect()
        }};
    }
    match a.data_type() {
        DataType::Int8 => prim!(Int8Type, |v: i8| Value::from(v)),
        DataType::Int16 => prim!(Int16Type, |v: i16| Value::from(v)),
        DataType::Int32 => prim!(Int32Type, |v: i32| Value::from(v)),
        DataType::Int64 => prim!(Int64Type, |v: i64| Value::from(v)),
        DataType::UInt8 => prim!(UInt8Type, |v: u8| Value::from(v)),
        DataType::UInt16 => prim!(UInt16Type, |v: u16| Value::from(v)),
        DataType::UInt32 => prim!(UInt32Type, |v: u32| Value::from(v)),
        DataType::UInt64 => prim!(UInt64Type, |v: u64| Value::from(v)),
        DataType::Float32 => prim!(Float32Type, |v: f32| num(v as f64)),
        DataType::Float64 => prim!(Float64Type, num),
        DataType::Boolean => {
            let b = a.as_boolean();
            (0..n)
                .map(|i| {
                    if b.is_null(i) {
                        Value::Null
                    } else {
                        Value::Bool(b.value(i))
                    }
                })
                .collect()
        }
        DataType::Utf8 => {
            let s = a.as_string::<i32>();
            (0..n)
                .map(|i| {
                    if s.is_null(i) {
                        Value::Null
                    } else {
                        Value::from(s.value(i))
                    }
                })
                .collect()
        }
        DataType::LargeUtf8 | DataType::Utf8View => {
            match arrow::compute::cast(a, &DataType::Utf8) {
                Ok(s) => column_values(&s),
                Err(_) => display(a),
            }
        }
        DataType::Timestamp(_, _) => {
            let ms = arrow::compute::cast(a, &DataType::Timestamp(TimeUnit::Millisecond, None));
            match ms {
                Ok(ms) => {
                    let p = ms.as_primitive::<arrow::datatypes::TimestampMillisecondType>();
                    (0..n)
                        .map(|i| {
                            if p.is_null(i) {
                                Value::Null
                            } else {
                                Value::from(format_rfc3339(p.value(i)))
                            }
                        })
                        .collect()
                }
                Err(_) => display(a),
            }
        }
        DataType::Decimal128(_, _) | DataType::Decimal256(_, _) => {
            match arrow::compute::cast(a, &DataType::Float64) {
                Ok(f) => column_values(&f),
                Err(_) => display(a),
            }
        }
        DataType::Null => vec![Value::Null; n],
        _ => display(a),
    }
}

fn display(a: &ArrayRef) -> Vec<Value> {
    let opts = FormatOptions::default();
    match ArrayFormatter::try_new(a.as_ref(), &opts) {
        Ok(f) => (0..a.len())
            .map(|i| {
                if a.is_null(i) {
                    Value::Null
                } else {
                    Value::from(f.value(i).to_string())
                }
            })
            .collect(),
        Err(_) => vec![Value::Null; a.len()],
    }
}
