//! The Salesforce Case connector: cases from RabbitMQ (`edgecase.cases`, routing key
//! `case.{division}`) become Salesforce Cases, once each.
//!
//! ```text
//! RabbitMQ queue per division ─> consumer (prefetch) ─> mapping ─> upsert on Edge_Event_Id__c
//!        ^ ack after 2xx                 │                         (one request per case, or
//!        └─ dead-letter queue <─ 4xx ────┘                          Collections batches ≤ 200)
//! ```
//!
//! The guarantee: a case message is acknowledged only after Salesforce answered 2xx for it
//! (or after a validation error was copied, with Salesforce's error in headers, to the
//! division's dead-letter queue and the broker confirmed the copy). Upserting on the
//! external id keyed by `event_id` makes every redelivery land on the same Case, so a
//! crash at any moment gives neither a lost nor a second Case.
//!
//! - [`config`]: the seed's `tenant` + `divisions` shape, validated.
//! - [`mapping`]: message → Case fields (pure).
//! - [`client`]: OAuth logins, the cached session, REST calls, and [`client::classify`]:
//!   the policy for every answer (pure).
//! - [`limiter`]: the tenant's request rate.
//! - [`consumer`]: the per-division dispatcher, retries, acknowledgements, dead letters.
//! - [`metrics`]: `edgecase_salesforce_*` on `/metrics`.
//! - [`direct`]: the same upserts without a broker (the demo's in-process queue).

pub mod client;
pub mod config;
pub mod consumer;
pub mod direct;
pub mod limiter;
pub mod mapping;
pub mod metrics;

pub use consumer::{Connector, Error, log_in, start};
