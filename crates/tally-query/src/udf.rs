//! `json_get_str`, `json_get_int`, `json_get_float`, `json_get_json`: read
//! one value out of a JSON text column (`properties`), following a path of
//! keys: `json_get_float(properties, 'duration_ms')`,
//! `json_get_str(properties, 'utm', 'source')`. `json_get_json` answers the
//! value as JSON text (a string quoted), as Postgres' `->` does; the
//! operators `->` and `->>` are planned onto these ([`JsonOperators`]).
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
use tally_types::json::{Found, lookup};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Want {
    Str,
    Int,
    Float,
    Json,
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
        ("json_get_json", Want::Json),
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
            Want::Str | Want::Json => DataType::Utf8,
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
            Want::Json => {
                let mut b = StringBuilder::with_capacity(rows, rows * 8);
                for i in 0..rows {
                    match (!strings.is_null(i))
                        .then(|| lookup(strings.value(i), &keys))
                        .flatten()
                    {
                        Some(Found::Str(s)) => b.append_value(
                            serde_json::to_string(&*s).unwrap_or_else(|_| "null".into()),
                        ),
                        Some(Found::Int(v)) => b.append_value(v.to_string()),
                        Some(Found::Float(v)) => b.append_value(
                            serde_json::Number::from_f64(v)
                                .map_or("null".into(), |n| n.to_string()),
                        ),
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
        Want::Str | Want::Json => ScalarValue::Utf8(None),
        Want::Int => ScalarValue::Int64(None),
        Want::Float => ScalarValue::Float64(None),
    }
}

/// Plans Postgres' JSON operators onto the functions above:
/// `properties->>'k'` is `json_get_str(properties, 'k')` and
/// `properties->'k'` is `json_get_json(properties, 'k')`; chains such as
/// `properties->'utm'->>'source'` read nested values.
#[derive(Debug)]
pub(crate) struct JsonOperators;

impl datafusion::logical_expr::planner::ExprPlanner for JsonOperators {
    fn plan_binary_op(
        &self,
        expr: datafusion::logical_expr::planner::RawBinaryExpr,
        _schema: &datafusion::common::DFSchema,
    ) -> Result<
        datafusion::logical_expr::planner::PlannerResult<
            datafusion::logical_expr::planner::RawBinaryExpr,
        >,
    > {
        use datafusion::logical_expr::planner::PlannerResult;
        use datafusion::sql::sqlparser::ast::BinaryOperator;
        let want = match expr.op {
            BinaryOperator::LongArrow => Want::Str,
            BinaryOperator::Arrow => Want::Json,
            _ => return Ok(PlannerResult::Original(expr)),
        };
        let name = if want == Want::Str {
            "json_get_str"
        } else {
            "json_get_json"
        };
        let f = ScalarUDF::new_from_impl(JsonGet {
            name,
            want,
            signature: Signature::user_defined(Volatility::Immutable),
        });
        Ok(PlannerResult::Planned(f.call(vec![expr.left, expr.right])))
    }

    /// `properties.country`: `properties` is JSON text, not a struct; the
    /// query is refused at planning with the function to use instead.
    fn plan_compound_identifier(
        &self,
        field: &arrow::datatypes::Field,
        _qualifier: Option<&datafusion::common::TableReference>,
        nested_names: &[String],
    ) -> Result<datafusion::logical_expr::planner::PlannerResult<Vec<datafusion::logical_expr::Expr>>>
    {
        use datafusion::logical_expr::planner::PlannerResult;
        if field.name() != "properties" || field.data_type() != &DataType::Utf8 {
            return Ok(PlannerResult::Original(Vec::new()));
        }
        // An error here would be passed over (the next planner would
        // plan a struct access); a function that refuses to be typed
        // fails the query's planning instead.
        let hint = ScalarUDF::new_from_impl(PropertyAsColumn {
            key: nested_names.join("."),
            signature: Signature::nullary(Volatility::Immutable),
        });
        Ok(PlannerResult::Planned(hint.call(Vec::new())))
    }
}

/// What `properties.<key>` plans into: planning it fails with the fix.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PropertyAsColumn {
    key: String,
    signature: Signature,
}

impl ScalarUDFImpl for PropertyAsColumn {
    fn name(&self) -> &str {
        "properties_field"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        let key = &self.key;
        plan_err!(
            "properties.{key} is not a column: properties is JSON text; read the property with json_get_str(properties, '{key}') (json_get_int, json_get_float for numbers) or properties->>'{key}'"
        )
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let key = &self.key;
        exec_err!("properties.{key} is not a column; use json_get_str(properties, '{key}')")
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
