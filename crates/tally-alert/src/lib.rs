//! Alerts: rules over the metrics of the rollup store, evaluated when
//! buckets close (pushed by the processor, carried on by the wall clock when
//! data stops), with `for` / `resolve_after` hysteresis, silences, and
//! webhook deliveries that survive restarts and retry with backoff.
//!
//! ```text
//! processor ──watermark crossed a minute──▶ Engine::advance ──▶ outbox (persisted)
//!                                              │ reads the same numbers      │
//!                                              ▼ as GET /api/v1/metrics      ▼
//!                                         RollupStore::query          deliver::run ──POST──▶ webhook
//! ```

pub mod deliver;
pub mod engine;
pub mod progress;
pub mod rule;
pub mod targets;

pub use deliver::{DeliveryConfig, LatencyFn, Mailer, SmtpSettings};
pub use engine::{
    AlertError, Change, Delivery, Engine, EngineConfig, HistoryEntry, Labels, MAX_SERIES, Outcome,
    RuleState, Source, State, Stats, labels_json,
};
pub use progress::Progress;
pub use rule::{Detector, Direction, Format, Op, Rule, RuleError, Target};
pub use targets::{Allowed, TargetPolicy};

#[cfg(test)]
mod tests;
