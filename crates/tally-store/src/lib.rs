//! Storage of aggregates: mergeable sketches and the minute rollup store with
//! the metrics query (the dashboard hot path).

pub mod cache;
pub mod dims;
pub mod rollup;
pub mod session_index;
pub mod sessions;
pub mod sketch;

pub use cache::MetricsCache;
pub use dims::Dimensions;
pub use rollup::{
    Agg, CHANGES_KEPT, Change, Changed, DimAggs, Downsampled, Granularity, Marginal, Metric,
    MetricQuery, MinuteBucket, NumAgg, Part, QueryError, RollupStore, Series, Summary, Value,
    parse_group_by, parse_where,
};
pub use session_index::{DEFAULT_MAX_SESSIONS, INDEX_REACH_MS, SessionIndex};
pub use sessions::{
    DEFAULT_SESSION_GAP_MS, Session, SessionCorrection, SessionTouch, TOUCHES_KEPT, session_changes,
};
