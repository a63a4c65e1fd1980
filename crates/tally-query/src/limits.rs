//! Functions whose output size is chosen by their arguments (`repeat('x',
//! 1500000000)`, `lpad`, `range(1, 1e9)`, `array_repeat` …) can ask the
//! allocator for more than the machine has in one call, before DataFusion's
//! memory pool sees a byte, and a failed allocation aborts the process. Each
//! of them is wrapped: before it runs on a batch, the bytes it would build
//! for every row are added up from its arguments, and past the limit the
//! query fails with `ResourcesExhausted` naming the function, the size and
//! the setting. Everything else is DataFusion's own function, unchanged.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int64Type, IntervalMonthDayNanoType, TimeUnit};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl};
use datafusion::prelude::SessionContext;

/// How a function's output grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: `len(s) · n`.
    Repeat,
    /// `lpad(s, n[, fill])`, `rpad`: `n` characters (up to 4 bytes each).
    Pad,
    /// `replace(s, from, to)`: every match of `from` (each position when
    /// empty) becomes `to`.
    Replace,
    /// `regexp_replace(s, pattern, to[, flags])`: a pattern may match at
    /// every position.
    RegexpReplace,
    /// `array_repeat(x, n)`, `array_resize(a, n[, x])`: `n` elements.
    Elements,
    /// `range(start, stop[, step])`, `generate_series`: `(stop − start) / step` elements.
    Series,
}

const WRAPPED: [(&str, Growth); 9] = [
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("array_repeat", Growth::Elements),
    ("array_resize", Growth::Elements),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
];

/// Bytes an array element is counted as (values, offsets, validity).
const ELEMENT_BYTES: u128 = 16;

/// Replaces each argument-driven function of `ctx` by its capped version:
/// one call on one batch may build at most `limit` bytes.
pub(crate) fn cap_functions(ctx: &SessionContext, limit: usize) {
    for (name, growth) in WRAPPED {
        if let Some(inner) = ctx.state().scalar_functions().get(name).cloned() {
            ctx.register_udf(ScalarUDF::new_from_impl(Capped {
                inner,
                growth,
                limit,
            }));
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Capped {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    limit: usize,
}

/// One argument, row by row: a constant or one value per row.
enum Rows {
    Const(Option<i64>),
    Each(Vec<Option<i64>>),
}

impl Rows {
    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Rows::Const(v) => *v,
            Rows::Each(v) => v[i],
        }
    }

    fn is_const(&self) -> bool {
        matches!(self, Rows::Const(_))
    }
}

fn cast_i64(a: &ArrayRef) -> Option<Vec<Option<i64>>> {
    let c = arrow::compute::cast(a, &DataType::Int64).ok()?;
    Some(c.as_primitive::<Int64Type>().iter().collect())
}

/// Byte lengths of a text (or binary, or list: element counts) argument.
fn lengths(v: &ColumnarValue) -> Option<Rows> {
    match v {
        ColumnarValue::Scalar(s) => {
            let len = match s {
                ScalarValue::Utf8(x) | ScalarValue::LargeUtf8(x) | ScalarValue::Utf8View(x) => {
                    x.as_ref().map(|s| s.len() as i64)
                }
                ScalarValue::Binary(x)
                | ScalarValue::LargeBinary(x)
                | ScalarValue::BinaryView(x) => x.as_ref().map(|b| b.len() as i64),
                ScalarValue::Null => None,
                // Numbers and other fixed-width values.
                _ => Some(8),
            };
            Some(Rows::Const(len))
        }
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView => {
                let l = arrow::compute::kernels::length::length(a).ok()?;
                cast_i64(&l).map(Rows::Each)
            }
            _ => Some(Rows::Const(Some(8))),
        },
    }
}

/// An integer argument (counts, pads, series bounds; dates and times as
/// their integer value).
fn integers(v: &ColumnarValue) -> Option<Rows> {
    match v {
        ColumnarValue::Scalar(s) => {
            let a = s.to_array_of_size(1).ok()?;
            Some(Rows::Const(cast_i64(&a)?.first().copied().flatten()))
        }
        ColumnarValue::Array(a) => cast_i64(a).map(Rows::Each),
    }
}

/// A series step in the unit of its bounds: an integer, or an interval
/// (months counted as 31 days, so the estimate never falls short).
fn steps(v: &ColumnarValue, bounds: &DataType) -> Option<Rows> {
    let per_day: i64 = match bounds {
        DataType::Date32 => 1,
        DataType::Date64 | DataType::Timestamp(TimeUnit::Millisecond, _) => 86_400_000,
        DataType::Timestamp(TimeUnit::Second, _) => 86_400,
        DataType::Timestamp(TimeUnit::Microsecond, _) => 86_400_000_000,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => 86_400_000_000_000,
        _ => return integers(v),
    };
    let nanos_per_unit = 86_400_000_000_000 / per_day;
    let of = |i: arrow::datatypes::IntervalMonthDayNano| {
        let days = i.months as i64 * 31 + i.days as i64;
        days.saturating_mul(per_day)
            .saturating_add(i.nanoseconds / nanos_per_unit.max(1))
    };
    let a = match v {
        ColumnarValue::Scalar(s) => s.to_array_of_size(1).ok()?,
        ColumnarValue::Array(a) => a.clone(),
    };
    let a = arrow::compute::cast(
        &a,
        &DataType::Interval(arrow::datatypes::IntervalUnit::MonthDayNano),
    )
    .ok()?;
    let vals: Vec<Option<i64>> = a
        .as_primitive::<IntervalMonthDayNanoType>()
        .iter()
        .map(|x| x.map(of))
        .collect();
    Some(match v {
        ColumnarValue::Scalar(_) => Rows::Const(vals.first().copied().flatten()),
        ColumnarValue::Array(_) => Rows::Each(vals),
    })
}

fn data_type(v: &ColumnarValue) -> DataType {
    match v {
        ColumnarValue::Scalar(s) => s.data_type(),
        ColumnarValue::Array(a) => a.data_type().clone(),
    }
}

impl Capped {
    /// Bytes the call would build for all `rows` (None: not estimable,
    /// let the function decide).
    fn estimate(&self, args: &[ColumnarValue], rows: usize) -> Option<u128> {
        let pos = |v: Option<i64>| v.unwrap_or(0).max(0) as u128;
        let arg = |i: usize| args.get(i);
        let (a, b, c): (Rows, Rows, Option<Rows>) = match self.growth {
            Growth::Repeat => (lengths(arg(0)?)?, integers(arg(1)?)?, None),
            Growth::Pad => (lengths(arg(0)?)?, integers(arg(1)?)?, None),
            Growth::Replace => (
                lengths(arg(0)?)?,
                lengths(arg(1)?)?,
                Some(lengths(arg(2)?)?),
            ),
            Growth::RegexpReplace => (lengths(arg(0)?)?, lengths(arg(2)?)?, None),
            Growth::Elements => (lengths(arg(0)?)?, integers(arg(1)?)?, None),
            Growth::Series => {
                // range(stop) counts from 0.
                let (lo, hi, step) = match args.len() {
                    1 => (Rows::Const(Some(0)), integers(arg(0)?)?, None),
                    _ => {
                        let t = data_type(arg(0)?);
                        let step = match arg(2) {
                            Some(s) => Some(steps(s, &t)?),
                            None => None,
                        };
                        (integers(arg(0)?)?, integers(arg(1)?)?, step)
                    }
                };
                (lo, hi, step)
            }
        };
        let one = |i: usize| -> u128 {
            match self.growth {
                Growth::Repeat => pos(a.get(i)).saturating_mul(pos(b.get(i))),
                Growth::Pad => pos(b.get(i)).saturating_mul(4) + pos(a.get(i)),
                Growth::Replace => {
                    let s = pos(a.get(i));
                    let from = pos(b.get(i)).max(1);
                    let to = c.as_ref().map_or(0, |c| pos(c.get(i)));
                    s + (s + 1) / from * to
                }
                Growth::RegexpReplace => {
                    let s = pos(a.get(i));
                    s + (s + 1) * pos(b.get(i))
                }
                Growth::Elements => pos(b.get(i)).saturating_mul(ELEMENT_BYTES + pos(a.get(i))),
                Growth::Series => {
                    let lo = a.get(i).unwrap_or(0) as i128;
                    let hi = b.get(i).unwrap_or(0) as i128;
                    let step = c
                        .as_ref()
                        .map_or(1, |c| c.get(i).unwrap_or(1) as i128)
                        .unsigned_abs()
                        .max(1);
                    ((hi - lo).unsigned_abs() / step + 1).saturating_mul(ELEMENT_BYTES)
                }
            }
        };
        let all_const = a.is_const() && b.is_const() && c.as_ref().is_none_or(Rows::is_const);
        if all_const {
            return Some(one(0).saturating_mul(rows.max(1) as u128));
        }
        let mut total: u128 = 0;
        for i in 0..rows {
            total = total.saturating_add(one(i));
            if total > self.limit as u128 {
                break;
            }
        }
        Some(total)
    }
}

impl ScalarUDFImpl for Capped {
    crate::udf::delegate_to_inner!();

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(bytes) = self.estimate(&args.args, args.number_rows)
            && bytes > self.limit as u128
        {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would build {} for {} row(s), over the {} MiB a function may build at once (half of query.memory-limit)",
                self.name(),
                human_bytes(bytes),
                args.number_rows.max(1),
                self.limit >> 20
            )));
        }
        self.inner.invoke_with_args(args)
    }
}

fn human_bytes(b: u128) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(limit: usize) -> SessionContext {
        let ctx = SessionContext::new();
        cap_functions(&ctx, limit);
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<arrow::record_batch::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    #[tokio::test]
    async fn huge_outputs_fail_before_they_are_built() {
        let c = ctx(64 << 20);
        for sql in [
            "SELECT length(repeat('x', 1500000000))",
            "SELECT length(lpad('x', 2000000000, 'y'))",
            "SELECT length(rpad('x', 2000000000))",
            "SELECT cardinality(range(1, 1000000000))",
            "SELECT cardinality(generate_series(1, 1000000000))",
            "SELECT cardinality(range(TIMESTAMP '2000-01-01', TIMESTAMP '2030-01-01', INTERVAL '1 second'))",
            "SELECT cardinality(array_repeat(1, 1000000000))",
            "SELECT length(replace(repeat('ab', 1000), 'a', repeat('z', 100000)))",
            "SELECT length(regexp_replace(repeat('ab', 1000), '', repeat('z', 100000), 'g'))",
        ] {
            let e = run(&c, sql).await.expect_err(sql);
            let root = e.find_root();
            assert!(
                matches!(root, DataFusionError::ResourcesExhausted(m) if m.contains("query.memory-limit")),
                "{sql}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn ordinary_calls_give_datafusions_answers() {
        let capped = ctx(64 << 20);
        let plain = SessionContext::new();
        for sql in [
            "SELECT repeat('ab', 3), lpad('7', 3, '0'), rpad('x', 2), replace('aXa', 'X', 'yy')",
            "SELECT regexp_replace('a1b2', '[0-9]', '#', 'g'), cardinality(range(1, 10, 2)), cardinality(generate_series(5))",
            "SELECT array_repeat('q', 3), array_resize([1, 2], 4, 0)",
            "SELECT repeat(v, 2) FROM (VALUES ('a'), ('bc'), (NULL)) t(v)",
        ] {
            let want = arrow::util::pretty::pretty_format_batches(&run(&plain, sql).await.unwrap())
                .unwrap()
                .to_string();
            let got = arrow::util::pretty::pretty_format_batches(&run(&capped, sql).await.unwrap())
                .unwrap()
                .to_string();
            assert_eq!(got, want, "{sql}");
        }
    }
}
