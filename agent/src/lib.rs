//! Edgecase: an edge gateway agent that never loses a reading.
//!
//! The data path, one module per stage:
//!
//! ```text
//! ingest::mqtt ─┐                                   ┌─> publish::amqp ──> RabbitMQ
//!               ├─> reading (parse) ─> buffer (SQLite, group commit) ─┘      (confirms)
//! ingest::serial┘        │                 ^ rows deleted only after the confirm
//!                        └─> dead letters (kept in the buffer, `edgecase buffer ...`)
//! ```
//!
//! - [`config`]: the file + environment, validated up front.
//! - [`reading`]: what a valid reading is (pure).
//! - [`buffer`]: the durable store-and-forward queue; commit before acknowledge.
//! - [`ingest`]: MQTT and serial inputs; acknowledge only after the commit.
//! - [`publish`]: the AMQP publisher; release from the buffer only after the confirm.
//! - [`admin`]: `/metrics` and `/healthz`.
//! - [`rules`]: defect rules, readings in, case events out (pure).
//! - [`agent`]: wires the stages, owns shutdown.
//! - [`connectors`]: beside the data path, `edgecase connector ...`: the Salesforce Case
//!   connector and [`connectors::db`], which moves messages between the broker and an SQL
//!   database.
//! - [`watchdog`]: systemd readiness, and keep-alives only while the pipeline makes progress.
//! - `demo` (feature `demo`): the whole path on one machine with an embedded broker.
//!
//! Errors: each library module has its own `thiserror` enum whose variants say whether to
//! retry, dead-letter or stop; `anyhow` is used only by the binary.

pub mod admin;
pub mod agent;
pub mod backoff;
pub mod buffer;
pub mod config;
pub mod connectors;
#[cfg(feature = "demo")]
pub mod demo;
pub mod ingest;
pub mod metrics;
pub mod publish;
pub mod reading;
pub mod rules;
pub mod tls;
pub mod watchdog;
