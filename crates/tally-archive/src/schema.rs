//! The `events` table: one schema for hot batches, archive files and SQL.

use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use tally_types::Millis;
use tally_types::time::format_rfc3339;

/// `event_id, tenant, event_type, user_id, session_id, ts, properties, received_at`.
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
            ]))
        })
        .clone()
}

/// Column positions in [`events_schema`].
pub(crate) mod col {
    pub(crate) const TENANT: usize = 1;
    pub(crate) const TS: usize = 5;
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
