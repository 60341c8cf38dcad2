//! The SQL database connector: between the broker and one logical database.
//!
//! Three operations, each a library call here and a subcommand of `edgecase connector db`:
//!
//! - [`DbConnector::select_and_send`]: a read query's rows out, one message per row, to the
//!   destination exchange; once, on an interval, or incrementally ([`select`]).
//! - [`DbConnector::get_and_write`]: one message from the source queue into the database
//!   with the configured statements, one transaction ([`consume`]).
//! - [`DbConnector::subscribe_and_write`]: the same continuously, batching messages that
//!   wait into one transaction ([`consume`]).
//!
//! Each returns an [`Outcome`] (success, failure or empty, the seed's True/False/None) and
//! never panics or returns early with an error: every failure is an outcome with its
//! reason, also logged. The guarantees (acknowledge after commit, idempotent writes,
//! dead letters with reasons, outages retried) are in [`write`] and [`consume`]; the
//! row/message mapping in [`format`]; databases in [`database`]. Users' documentation:
//! `docs/db-connector.md`.

pub mod broker;
pub mod cli;
pub mod config;
pub mod consume;
pub mod database;
pub mod format;
mod mysql;
#[cfg(feature = "odbc")]
mod odbc;
mod pg;
pub mod select;
mod sqlite;
pub mod statement;
pub mod write;

pub use config::{DbConnectorConfig, Operation};

use crate::config::Secret;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What an operation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: rows published, or a message's records committed (and acknowledged).
    Success(String),
    /// Not done, with the reason (also logged). A message involved was dead-lettered or
    /// returned to its queue.
    Failure(String),
    /// Nothing to do: the queue was empty or the query returned no rows.
    Empty(String),
}

impl Outcome {
    /// Exit status for the command line: 0 success, 1 failure, 3 empty (2 is the command
    /// line's own usage errors).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Success(_) => 0,
            Outcome::Failure(_) => 1,
            Outcome::Empty(_) => 3,
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Success(s) => write!(f, "success: {s}"),
            Outcome::Failure(s) => write!(f, "failure: {s}"),
            Outcome::Empty(s) => write!(f, "empty: {s}"),
        }
    }
}

/// One configured connector: its settings, the broker URL and the data directory.
#[derive(Debug, Clone)]
pub struct DbConnector {
    cfg: Arc<DbConnectorConfig>,
    amqp_url: Secret,
    data_dir: PathBuf,
}

impl DbConnector {
    /// `amqp_default` is used when `broker.url` is unset (the main config's `amqp.url`).
    pub fn new(cfg: DbConnectorConfig, amqp_default: &Secret, data_dir: PathBuf) -> DbConnector {
        let amqp_url = cfg.broker.url.clone().unwrap_or_else(|| amqp_default.clone());
        DbConnector {
            cfg: Arc::new(cfg),
            amqp_url,
            data_dir,
        }
    }

    pub fn config(&self) -> &DbConnectorConfig {
        &self.cfg
    }

    fn check(&self, op: Operation) -> Option<Outcome> {
        self.cfg
            .validate_for(op, "")
            .err()
            .map(|p| Outcome::Failure(format!("invalid settings: {}", p.join("; "))))
    }

    /// Runs the read query once and publishes each row; see [`select`].
    pub async fn select_and_send(&self) -> Outcome {
        if let Some(o) = self.check(Operation::SelectAndSend) {
            return o;
        }
        logged(select::select_and_send(self.cfg.clone(), &self.amqp_url, &self.data_dir).await)
    }

    /// [`DbConnector::select_and_send`] every `every` until `cancel`.
    pub async fn select_and_send_every(&self, every: Duration, cancel: CancellationToken) -> Outcome {
        if let Some(o) = self.check(Operation::SelectAndSend) {
            return o;
        }
        select::select_and_send_every(self.cfg.clone(), &self.amqp_url, &self.data_dir, every, cancel).await
    }

    /// Gets one message and writes it; the database is retried for up to `retry_for`.
    pub async fn get_and_write(&self, retry_for: Duration) -> Outcome {
        if let Some(o) = self.check(Operation::GetAndWrite) {
            return o;
        }
        logged(consume::get_and_write(self.cfg.clone(), &self.amqp_url, retry_for).await)
    }

    /// Consumes and writes until `cancel`.
    pub async fn subscribe_and_write(&self, cancel: CancellationToken) -> Outcome {
        if let Some(o) = self.check(Operation::SubscribeAndWrite) {
            return o;
        }
        logged(consume::subscribe_and_write(self.cfg.clone(), &self.amqp_url, cancel).await)
    }
}

fn logged(o: Outcome) -> Outcome {
    match &o {
        Outcome::Failure(e) => tracing::error!(error = %e, "db connector failed"),
        other => tracing::info!(outcome = %other, "db connector done"),
    }
    o
}
