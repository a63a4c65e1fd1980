//! The `events` table: one schema for hot batches, archive files and SQL.

use std::sync::{Arc, OnceLock};

use arrow::array::{RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use tally_types::Millis;
use tally_types::time::format_rfc3339;

/// `event_id, tenant, event_type, user_id, session_id, ts, properties,
/// received_at, schema_version`.
///
/// `schema_version` (added in archive format 2) is the version of the
/// event type's registered schema the row's properties were checked
/// against at ingest, null when the type had none. Files written before it
/// lack the column; readers see it null there ([`to_events_schema`]).
pub fn events_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
            Arc::new(Schema::new(vec![
                Field::new("event_id", DataType::Utf8, false),
                Field::new("tenant", DataType::Utf8, false),
                Field::new("event_type", DataType::Utf8, false),
                Field::new("user_id", DataType::Utf8, true),
                Field::new("session_id", DataType::Utf8, true),
                Field::new("ts", ts.clone(), false),
                Field::new("properties", DataType::Utf8, false),
                Field::new("received_at", ts, false),
                Field::new("schema_version", DataType::Int32, true),
            ]))
        })
        .clone()
}

/// A schema version as the `schema_version` column holds it (INT32):
/// versions count up from 1 per subject and never come near the limit.
pub fn version_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// Column positions in [`events_schema`].
pub(crate) mod col {
    pub(crate) const TENANT: usize = 1;
    pub(crate) const TS: usize = 5;
}

/// A batch of the `events` table as a file of any archive format holds it
/// (columns by name, in any order, later columns missing) in
/// [`events_schema`]: a missing nullable column reads as nulls. Errors name
/// a required column that is missing or a column of another type.
pub fn to_events_schema(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = events_schema();
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let mut cols = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => cols.push(c.clone()),
            Some(c) => {
                return Err(ArrowError::SchemaError(format!(
                    "column {}: {} in the file, {} expected",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                )));
            }
            None if f.is_nullable() => cols.push(new_null_array(f.data_type(), batch.num_rows())),
            None => {
                return Err(ArrowError::SchemaError(format!(
                    "column {} is missing from the file",
                    f.name()
                )));
            }
        }
    }
    RecordBatch::try_new(schema, cols)
}

/// `tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>` for the hour holding `ts`.
pub fn hive_dir(tenant: &str, ts: Millis) -> String {
    let s = format_rfc3339(tally_types::time::align_down(
        ts,
        tally_types::time::HOUR_MS,
    ));
    // "2026-11-01T12:00:00Z"
    format!("tenant={tenant}/date={}/hour={}", &s[..10], &s[11..13])
}
