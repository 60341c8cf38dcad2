//! One logical database behind one interface: connect, run the setup statements, write a
//! batch of messages in one transaction, run a read query.
//!
//! Every driver sorts its errors the same way ([`DbError`]): the database is unavailable
//! (retry with backoff, never dead-letter for that alone), or it refused a message's content
//! or the statement (dead-letter, with the reason and its class).

use super::config::DbConnectorConfig;
use super::format::{Rows, Value};
use super::statement::{Compiled, Dialect};
use std::time::Duration;

/// Why a database call failed, and what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DbError {
    /// Retry with backoff: unreachable, connection lost, shutting down, authentication
    /// refused, or a transient conflict (deadlock, serialization failure, lock timeout).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Dead-letter the message: the database refused what it was given.
    #[error("{reason}")]
    Rejected { class: RejectClass, reason: String },
}

/// The class of a dead letter, in its `x-error-class` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectClass {
    /// The message could not be read, or a value does not fit its column's type.
    InvalidContent,
    /// A NOT NULL, unique, foreign key or check constraint refused the record.
    ConstraintViolation,
    /// The statement itself failed (syntax, missing table or column, permissions).
    Statement,
    /// The database stayed down longer than `database.dead_letter_after`.
    DatabaseUnavailable,
}

impl RejectClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectClass::InvalidContent => "invalid-content",
            RejectClass::ConstraintViolation => "constraint-violation",
            RejectClass::Statement => "statement-failed",
            RejectClass::DatabaseUnavailable => "database-unavailable",
        }
    }
}

/// One statement execution: which statement, and its parameter values in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub stmt: usize,
    pub values: Vec<Value>,
}

/// A failed batch: the error and, when the database named it, the message that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteFailure {
    pub message: Option<usize>,
    pub error: DbError,
}

impl WriteFailure {
    /// A failure not tied to one message (connection, commit, prepare).
    pub fn all(error: DbError) -> WriteFailure {
        WriteFailure { message: None, error }
    }
}

/// A connection to the connector's database.
pub enum Database {
    Postgres(Box<super::pg::Pg>),
    MySql(super::mysql::My),
    Sqlite(super::sqlite::Lite),
    #[cfg(feature = "odbc")]
    Odbc(super::odbc::Odbc),
}

impl Database {
    /// Connects to `cfg.database.url` and runs `cfg.database.setup`.
    pub async fn connect(cfg: &DbConnectorConfig) -> Result<Database, DbError> {
        let url = cfg.database.url.expose();
        let password = cfg.password().map_err(DbError::Unavailable)?;
        let timeout = cfg.database.connect_timeout;
        let mut db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Database::Postgres(Box::new(
                super::pg::Pg::connect(url, password.as_deref(), timeout).await?,
            ))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Database::MySql(super::mysql::My::connect(url, password.as_deref(), timeout).await?)
        } else if let Some(path) = url.strip_prefix("sqlite:") {
            Database::Sqlite(super::sqlite::Lite::open(path, timeout).await?)
        } else {
            #[cfg(feature = "odbc")]
            if let Some(conn) = url.strip_prefix("odbc:") {
                return Self::finish(
                    Database::Odbc(super::odbc::Odbc::connect(conn, password.as_deref(), timeout).await?),
                    cfg,
                )
                .await;
            }
            return Err(DbError::Rejected {
                class: RejectClass::Statement,
                reason: format!(
                    "database.url {:?}: not a database this build supports",
                    super::config::redact_db_url(url)
                ),
            });
        };
        db = Self::finish(db, cfg).await?;
        Ok(db)
    }

    async fn finish(mut db: Database, cfg: &DbConnectorConfig) -> Result<Database, DbError> {
        for sql in &cfg.database.setup {
            if let Err(e) = db.setup(sql).await {
                db.close().await;
                return Err(match e {
                    DbError::Rejected { class, reason } => DbError::Rejected {
                        class,
                        reason: format!("database.setup statement failed: {reason}"),
                    },
                    e => e,
                });
            }
        }
        Ok(db)
    }

    /// The SQL spelling of this connection.
    pub fn dialect(&self) -> Dialect {
        match self {
            Database::Postgres(_) => Dialect::Postgres,
            Database::MySql(_) => Dialect::MySql,
            Database::Sqlite(_) => Dialect::Sqlite,
            #[cfg(feature = "odbc")]
            Database::Odbc(o) => Dialect::Odbc(o.flavor()),
        }
    }

    /// Runs one statement without parameters (the setup statements).
    pub async fn setup(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Database::Postgres(d) => d.setup(sql).await,
            Database::MySql(d) => d.setup(sql).await,
            Database::Sqlite(d) => d.setup(sql).await,
            #[cfg(feature = "odbc")]
            Database::Odbc(d) => d.setup(sql).await,
        }
    }

    /// Writes every message's statements in one transaction: all or nothing.
    pub async fn write(&mut self, stmts: &[Compiled], messages: &[Vec<Bound>]) -> Result<(), WriteFailure> {
        match self {
            Database::Postgres(d) => d.write(stmts, messages).await,
            Database::MySql(d) => d.write(stmts, messages).await,
            Database::Sqlite(d) => d.write(stmts, messages).await,
            #[cfg(feature = "odbc")]
            Database::Odbc(d) => d.write(stmts, messages).await,
        }
    }

    /// Runs a read query with its parameters.
    pub async fn query(&mut self, q: &Compiled, values: &[Value]) -> Result<Rows, DbError> {
        match self {
            Database::Postgres(d) => d.query(q, values).await,
            Database::MySql(d) => d.query(q, values).await,
            Database::Sqlite(d) => d.query(q, values).await,
            #[cfg(feature = "odbc")]
            Database::Odbc(d) => d.query(q, values).await,
        }
    }

    pub async fn close(self) {
        match self {
            Database::Postgres(d) => (*d).close().await,
            Database::MySql(d) => d.close().await,
            Database::Sqlite(_) => {}
            #[cfg(feature = "odbc")]
            Database::Odbc(_) => {}
        }
    }
}

/// A bounded wait for a driver call that has no timeout of its own.
pub async fn bounded<T>(timeout: Duration, fut: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(DbError::Unavailable(format!("no answer within {timeout:?}"))),
    }
}
