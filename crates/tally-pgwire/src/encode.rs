//! Arrow answers as Postgres rows: each column gets the nearest Postgres
//! type and is encoded in the format the client asked for (text or binary).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Date32Type, Float64Type, Int64Type, Schema, TimeUnit, TimestampMicrosecondType,
    UInt64Type,
};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use pgwire::api::Type;
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;

use crate::user_error;

/// The Postgres type an Arrow column is sent as.
pub(crate) fn pg_type(dt: &DataType) -> Type {
    match dt {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 | DataType::Decimal32(..) | DataType::Decimal64(..) => Type::FLOAT8,
        DataType::Decimal128(..) | DataType::Decimal256(..) => Type::FLOAT8,
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => Type::BYTEA,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Date32 | DataType::Date64 => Type::DATE,
        _ => Type::TEXT,
    }
}

/// The format of column or parameter `i` (one code given applies to all;
/// past the codes given, text).
pub(crate) fn format_of(f: &Format, i: usize) -> FieldFormat {
    match f {
        Format::Individual(v) if v.len() == 1 => FieldFormat::from(v[0]),
        Format::Individual(v) if i >= v.len() => FieldFormat::Text,
        _ => f.format_for(i),
    }
}

/// The row description of `schema` in `format`.
pub(crate) fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format_of(format, i),
            )
        })
        .collect()
}

fn arrow_err(e: arrow::error::ArrowError) -> PgWireError {
    user_error("XX000", format!("encoding the answer: {e}"), None)
}

/// How a column's values are encoded.
enum Kind {
    Bool,
    /// Cast to int64, sent at the width of its Postgres type.
    Int(Type),
    /// uint64, sent as int8 when it fits.
    UInt,
    /// Cast to float64, sent as float4 or float8.
    Float(Type),
    Text,
    Bytes,
    /// Microseconds; with a time zone (timestamptz) or without.
    Micros(bool),
    Date,
    /// Anything else: its text form, formatted once per batch.
    Display(Vec<String>),
}

/// One column of a batch, converted once to what its Postgres type encodes.
struct Col {
    array: ArrayRef,
    kind: Kind,
}

fn column(a: &ArrayRef, ty: &Type) -> PgWireResult<Col> {
    let to = |dt: DataType| cast(a, &dt).map_err(arrow_err);
    let (array, kind) = match *ty {
        Type::BOOL => (a.clone(), Kind::Bool),
        Type::INT2 | Type::INT4 | Type::INT8 if a.data_type() == &DataType::UInt64 => {
            (a.clone(), Kind::UInt)
        }
        Type::INT2 | Type::INT4 | Type::INT8 => (to(DataType::Int64)?, Kind::Int(ty.clone())),
        Type::FLOAT4 | Type::FLOAT8 => (to(DataType::Float64)?, Kind::Float(ty.clone())),
        Type::BYTEA => (to(DataType::LargeBinary)?, Kind::Bytes),
        Type::TIMESTAMPTZ | Type::TIMESTAMP => (
            to(DataType::Timestamp(TimeUnit::Microsecond, None))?,
            Kind::Micros(*ty == Type::TIMESTAMPTZ),
        ),
        Type::DATE => (to(DataType::Date32)?, Kind::Date),
        _ => match a.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                (to(DataType::LargeUtf8)?, Kind::Text)
            }
            _ => {
                let f = ArrayFormatter::try_new(a.as_ref(), &FormatOptions::default())
                    .map_err(arrow_err)?;
                let text = (0..a.len()).map(|i| f.value(i).to_string()).collect();
                (a.clone(), Kind::Display(text))
            }
        },
    };
    Ok(Col { array, kind })
}

fn encode_cell(enc: &mut DataRowEncoder, col: &Col, i: usize) -> PgWireResult<()> {
    let a = &col.array;
    if a.is_null(i) {
        return enc.encode_field(&None::<i64>);
    }
    match &col.kind {
        Kind::Bool => enc.encode_field(&a.as_boolean().value(i)),
        Kind::Int(ty) => {
            let v = a.as_primitive::<Int64Type>().value(i);
            match *ty {
                Type::INT2 => enc.encode_field(&(v as i16)),
                Type::INT4 => enc.encode_field(&(v as i32)),
                _ => enc.encode_field(&v),
            }
        }
        Kind::UInt => {
            let v = a.as_primitive::<UInt64Type>().value(i);
            let v = i64::try_from(v).map_err(|_| {
                user_error(
                    "22003",
                    format!("{v} does not fit Postgres' int8"),
                    Some("CAST the column to DOUBLE or VARCHAR"),
                )
            })?;
            enc.encode_field(&v)
        }
        Kind::Float(ty) => {
            let v = a.as_primitive::<Float64Type>().value(i);
            if *ty == Type::FLOAT4 {
                enc.encode_field(&(v as f32))
            } else {
                enc.encode_field(&v)
            }
        }
        Kind::Text => enc.encode_field(&a.as_string::<i64>().value(i)),
        Kind::Bytes => enc.encode_field(&a.as_binary::<i64>().value(i)),
        Kind::Micros(tz) => {
            let us = a.as_primitive::<TimestampMicrosecondType>().value(i);
            let t =
                chrono::DateTime::<chrono::Utc>::from_timestamp_micros(us).ok_or_else(|| {
                    user_error("22008", format!("timestamp {us} µs is out of range"), None)
                })?;
            if *tz {
                enc.encode_field(&t)
            } else {
                enc.encode_field(&t.naive_utc())
            }
        }
        Kind::Date => {
            let days = a.as_primitive::<Date32Type>().value(i);
            let d = chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .ok_or_else(|| user_error("22008", format!("date {days} is out of range"), None))?;
            enc.encode_field(&d)
        }
        Kind::Display(text) => enc.encode_field(&text[i]),
    }
}

/// Every row of `batches`, encoded per `fields`.
pub(crate) fn rows(
    batches: &[RecordBatch],
    fields: &Arc<Vec<FieldInfo>>,
) -> PgWireResult<Vec<PgWireResult<DataRow>>> {
    let mut out = Vec::new();
    let mut enc = DataRowEncoder::new(fields.clone());
    for b in batches {
        let cols = b
            .columns()
            .iter()
            .zip(fields.iter())
            .map(|(a, f)| column(a, f.datatype()))
            .collect::<PgWireResult<Vec<Col>>>()?;
        for i in 0..b.num_rows() {
            for c in &cols {
                encode_cell(&mut enc, c, i)?;
            }
            out.push(Ok(enc.take_row()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        BooleanArray, Float64Array, Int64Array, StringArray, TimestampMillisecondArray, UInt64Array,
    };
    use arrow::datatypes::Field;

    #[test]
    fn every_common_type_encodes_in_both_formats() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("b", DataType::Boolean, true),
            Field::new("i", DataType::Int64, true),
            Field::new("u", DataType::UInt64, true),
            Field::new("f", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(BooleanArray::from(vec![Some(true), None])),
                Arc::new(Int64Array::from(vec![Some(-5), None])),
                Arc::new(UInt64Array::from(vec![Some(7), None])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                Arc::new(StringArray::from(vec![Some("x"), None])),
                Arc::new(
                    TimestampMillisecondArray::from(vec![Some(1_793_534_400_000), None])
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        for format in [Format::UnifiedText, Format::UnifiedBinary] {
            let f = Arc::new(fields(&schema, &format));
            assert_eq!(
                f.iter().map(|f| f.datatype().clone()).collect::<Vec<_>>(),
                vec![
                    Type::BOOL,
                    Type::INT8,
                    Type::INT8,
                    Type::FLOAT8,
                    Type::TEXT,
                    Type::TIMESTAMPTZ
                ]
            );
            let rows = rows(std::slice::from_ref(&batch), &f).unwrap();
            assert_eq!(rows.len(), 2);
            assert!(rows.iter().all(Result::is_ok));
        }
        let big = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("u", DataType::UInt64, false)])),
            vec![Arc::new(UInt64Array::from(vec![u64::MAX]))],
        )
        .unwrap();
        let f = Arc::new(fields(&big.schema(), &Format::UnifiedText));
        assert!(rows(&[big], &f).is_err());
    }
}
