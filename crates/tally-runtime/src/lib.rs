//! A Tally node without its HTTP face: the configuration, the pipeline
//! threads that move events from the log (the embedded log or Kafka)
//! through the processor into the rollups, the raw archive and the alert
//! engine, and the node's telemetry. `tally-server` is the HTTP adapter
//! over what this crate runs; `tally-cli` starts both.
//!
//! Both modes hand the HTTP layer the same [`pipeline::Shared`]: ingest goes
//! in as [`pipeline::WriteReq`] on one channel (answered once the events
//! are durable: fsynced to the embedded log, or acknowledged by the
//! brokers), and rollups, the DLQ, the alert engine and the raw store are
//! read from it the same way whichever log is underneath.

pub mod config;
pub mod keys;
pub mod pipeline;
pub mod telemetry;

pub use config::Config;
