//! Messages to rows: decode, bind, write in one transaction, and decide each message's fate.
//!
//! The writer knows nothing about AMQP: it takes a batch of messages and returns, for each,
//! either "written" or "dead-letter, because ...". Its caller acknowledges only after this
//! returns, i.e. after the commit. Three rules:
//!
//! - A batch is one transaction. If the database refuses one message of it (bad value,
//!   constraint), the batch is rolled back and its messages are written again one per
//!   transaction, so only the culprit is dead-lettered.
//! - A database that is down is retried with capped exponential backoff, holding the batch;
//!   no message is dead-lettered for that unless `database.dead_letter_after` says so. A
//!   commit whose answer was lost is simply retried: the idempotency key makes the second
//!   write an update of the first.
//! - Message values are bound as parameters ([`super::statement`]), never spliced into SQL.

use super::config::DbConnectorConfig;
use super::database::{Bound, Database, DbError, RejectClass, WriteFailure};
use super::format::{MissingField, Record, Value, decode_message};
use super::statement::{ColumnMap, Compiled, compile, table_upsert};
use crate::backoff::Backoff;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// A message to write, as the broker (or the demo's in-process queue) delivered it.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// The AMQP `message_id` property, if the publisher set one.
    pub message_id: Option<String>,
    pub exchange: String,
    pub routing_key: String,
}

impl Incoming {
    /// The message id, or (without one) a UUID v5 of the body: a redelivery has the same.
    pub fn id(&self) -> String {
        match &self.message_id {
            Some(id) if !id.is_empty() => id.clone(),
            _ => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &self.body).to_string(),
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Committed: this many records.
    Written { records: usize },
    /// Not written; publish it to the dead-letter exchange with this reason.
    DeadLetter { class: RejectClass, reason: String },
}

/// Why [`Writer::write`] returned without a disposition for every message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Interrupted {
    /// Shutdown was asked for while the database was down; nothing is acknowledged.
    #[error("stopped while the database was unavailable")]
    Cancelled,
    /// The caller's deadline passed while the database was down.
    #[error("{0}")]
    Unavailable(String),
}

/// Counts since start.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterStats {
    pub messages: u64,
    pub records: u64,
    pub transactions: u64,
    pub dead_letters: u64,
}

pub struct Writer {
    cfg: Arc<DbConnectorConfig>,
    db: Option<Database>,
    compiled: Option<Arc<Vec<Compiled>>>,
    backoff: Backoff,
    down_since: Option<Instant>,
    pub stats: WriterStats,
}

impl Writer {
    pub fn new(cfg: Arc<DbConnectorConfig>) -> Writer {
        let backoff = Backoff::new(cfg.database.retry_min, cfg.database.retry_max);
        Writer {
            cfg,
            db: None,
            compiled: None,
            backoff,
            down_since: None,
            stats: WriterStats::default(),
        }
    }

    /// Connects now (with retries until `give_up_at`), so that configuration errors show at
    /// start rather than with the first message.
    pub async fn connect(
        &mut self,
        cancel: &CancellationToken,
        give_up_at: Option<Instant>,
    ) -> Result<(), Interrupted> {
        match self.ensure_connected(cancel, give_up_at).await {
            Ok(_) => Ok(()),
            Err(Ok(e)) => Err(e),
            Err(Err(e)) => Err(Interrupted::Unavailable(e.to_string())),
        }
    }

    pub async fn close(&mut self) {
        if let Some(db) = self.db.take() {
            db.close().await;
        }
    }

    /// Writes `batch` (one transaction if it all goes in) and returns one disposition per
    /// message, in order. Returns early only if `cancel` fires or `give_up_at` passes
    /// while the database is down; then nothing of the batch was committed... or, for a
    /// commit whose answer was lost, it was, and the redelivery will update it.
    pub async fn write(
        &mut self,
        batch: &[Incoming],
        cancel: &CancellationToken,
        give_up_at: Option<Instant>,
    ) -> Result<Vec<Disposition>, Interrupted> {
        let mut out: Vec<Option<Disposition>> = vec![None; batch.len()];
        let mut decoded: Vec<(usize, Vec<Record>)> = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            match decode_message(&self.cfg.format, &msg.body) {
                Ok(records) => decoded.push((i, records)),
                Err(e) => {
                    out[i] = Some(Disposition::DeadLetter {
                        class: RejectClass::InvalidContent,
                        reason: e.0,
                    })
                }
            }
        }
        // Bind needs the statements, which need the dialect, which needs a connection.
        let mut pending: Vec<(usize, Vec<Bound>, usize)> = Vec::new();
        if !decoded.is_empty() {
            let compiled = match self.ensure_connected(cancel, give_up_at).await {
                Ok(c) => c,
                Err(Ok(stop)) => return Err(stop),
                Err(Err(e)) => {
                    // The statements themselves are wrong: every message would fail alike.
                    for (i, _) in &decoded {
                        out[*i] = Some(Disposition::DeadLetter {
                            class: RejectClass::Statement,
                            reason: e.to_string(),
                        });
                    }
                    return Ok(finish(out, &mut self.stats));
                }
            };
            for (i, records) in decoded {
                match bind(&self.cfg, &compiled, &batch[i], &records) {
                    Ok(binds) => pending.push((i, binds, records.len())),
                    Err(reason) => {
                        out[i] = Some(Disposition::DeadLetter {
                            class: RejectClass::InvalidContent,
                            reason,
                        })
                    }
                }
            }
        }
        if !pending.is_empty() {
            let binds: Vec<Vec<Bound>> = pending.iter().map(|(_, b, _)| b.clone()).collect();
            match self.write_retrying(&binds, cancel, give_up_at).await? {
                Ok(()) => {
                    for (i, _, n) in &pending {
                        out[*i] = Some(Disposition::Written { records: *n });
                    }
                }
                Err(error) if pending.len() == 1 => {
                    out[pending[0].0] = Some(dead(error));
                }
                Err(_) => {
                    // One of them was refused: each on its own, so only the culprit goes.
                    for (i, b, n) in &pending {
                        let one = std::slice::from_ref(b);
                        out[*i] = Some(match self.write_retrying(one, cancel, give_up_at).await? {
                            Ok(()) => Disposition::Written { records: *n },
                            Err(error) => dead(error),
                        });
                    }
                }
            }
        }
        Ok(finish(out, &mut self.stats))
    }

    /// One transaction, retried while the database is unavailable. The outer `Err` stops
    /// the caller; the inner is the database's refusal.
    async fn write_retrying(
        &mut self,
        binds: &[Vec<Bound>],
        cancel: &CancellationToken,
        give_up_at: Option<Instant>,
    ) -> Result<Result<(), DbError>, Interrupted> {
        loop {
            let compiled = match self.ensure_connected(cancel, give_up_at).await {
                Ok(c) => c,
                Err(Ok(stop)) => return Err(stop),
                Err(Err(e)) => return Ok(Err(e)),
            };
            let Some(db) = self.db.as_mut() else { continue };
            let result = db.write(&compiled, binds).await;
            self.stats.transactions += 1;
            match result {
                Ok(()) => return Ok(Ok(())),
                Err(WriteFailure {
                    error: DbError::Unavailable(e),
                    ..
                }) => {
                    self.lost(&e).await;
                    if let Some(after) = self.cfg.database.dead_letter_after
                        && self.down_since.is_some_and(|t| t.elapsed() >= after)
                    {
                        return Ok(Err(DbError::Rejected {
                            class: RejectClass::DatabaseUnavailable,
                            reason: format!("database unavailable for more than {after:?}: {e}"),
                        }));
                    }
                    self.pause(cancel, give_up_at, &e).await?;
                }
                Err(WriteFailure { error, .. }) => return Ok(Err(error)),
            }
        }
    }

    /// The connection and compiled statements, connecting (with backoff) if needed. The
    /// outer `Err` stops the caller; the inner is a configuration the database refuses.
    async fn ensure_connected(
        &mut self,
        cancel: &CancellationToken,
        give_up_at: Option<Instant>,
    ) -> Result<Arc<Vec<Compiled>>, Result<Interrupted, DbError>> {
        loop {
            if let (Some(_), Some(c)) = (&self.db, &self.compiled) {
                return Ok(c.clone());
            }
            let url = super::config::redact_db_url(self.cfg.database.url.expose());
            match Database::connect(&self.cfg).await {
                Ok(db) => {
                    match self.down_since.take() {
                        Some(t) => tracing::info!(database = %url, down_for = ?t.elapsed(), "database reachable again"),
                        None => tracing::info!(database = %url, "database connected"),
                    }
                    self.backoff.reset();
                    let compiled = match compile_statements(&self.cfg, db.dialect()) {
                        Ok(c) => Arc::new(c),
                        Err(reason) => {
                            db.close().await;
                            return Err(Err(DbError::Rejected {
                                class: RejectClass::Statement,
                                reason,
                            }));
                        }
                    };
                    self.db = Some(db);
                    self.compiled = Some(compiled);
                }
                Err(DbError::Unavailable(e)) => {
                    self.lost(&e).await;
                    self.pause(cancel, give_up_at, &e).await.map_err(Ok)?;
                }
                Err(e) => return Err(Err(e)),
            }
        }
    }

    /// Drops the connection after a failure; logs the first failure of an outage.
    async fn lost(&mut self, e: &str) {
        if let Some(db) = self.db.take() {
            db.close().await;
        }
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(error = %e, "database unavailable; holding messages and retrying with backoff");
        } else {
            tracing::debug!(error = %e, "database still unavailable");
        }
    }

    async fn pause(
        &mut self,
        cancel: &CancellationToken,
        give_up_at: Option<Instant>,
        e: &str,
    ) -> Result<(), Interrupted> {
        let delay = self.backoff.next_delay();
        if let Some(limit) = give_up_at
            && Instant::now() + delay > limit
        {
            return Err(Interrupted::Unavailable(format!("database unavailable: {e}")));
        }
        tokio::select! {
            _ = cancel.cancelled() => Err(Interrupted::Cancelled),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

fn dead(error: DbError) -> Disposition {
    match error {
        DbError::Rejected { class, reason } => Disposition::DeadLetter { class, reason },
        DbError::Unavailable(reason) => Disposition::DeadLetter {
            class: RejectClass::DatabaseUnavailable,
            reason,
        },
    }
}

fn finish(out: Vec<Option<Disposition>>, stats: &mut WriterStats) -> Vec<Disposition> {
    out.into_iter()
        .map(|d| {
            let d = d.unwrap_or(Disposition::DeadLetter {
                class: RejectClass::Statement,
                reason: "not written (internal error)".into(),
            });
            match &d {
                Disposition::Written { records } => {
                    stats.messages += 1;
                    stats.records += *records as u64;
                }
                Disposition::DeadLetter { class, reason } => {
                    stats.dead_letters += 1;
                    tracing::warn!(class = class.as_str(), %reason, "message dead-lettered");
                }
            }
            d
        })
        .collect()
}

/// The write statements in `dialect`: the configured ones, or the upsert of
/// `database.table`.
pub fn compile_statements(
    cfg: &DbConnectorConfig,
    dialect: super::statement::Dialect,
) -> Result<Vec<Compiled>, String> {
    let d = &cfg.database;
    let sources: Vec<String> = match &d.table {
        Some(table) => {
            let columns = d
                .columns
                .iter()
                .map(|c| ColumnMap::parse(c))
                .collect::<Result<Vec<_>, _>>()?;
            let key = (!d.key_column.is_empty()).then_some(d.key_column.as_str());
            vec![table_upsert(table, key, &columns, dialect)]
        }
        None => d.statements.clone(),
    };
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| compile(s, dialect).map_err(|e| format!("database.statements[{i}]: {e}")))
        .collect()
}

/// The fields every record has besides its own.
fn special_fields(
    cfg: &DbConnectorConfig,
    msg: &Incoming,
    rec: &Record,
    index: usize,
    count: usize,
) -> Result<Record, String> {
    let id = msg.id();
    let key = if cfg.database.key == "_message_id" {
        if count > 1 {
            Value::Text(format!("{id}#{index}"))
        } else {
            Value::Text(id.clone())
        }
    } else {
        match rec.get(&cfg.database.key) {
            Some(Value::Null) | None => {
                return Err(format!(
                    "record {} has no `{}` (database.key) for its idempotency key",
                    index + 1,
                    cfg.database.key
                ));
            }
            Some(v) => v.clone(),
        }
    };
    let mut f = Record::new();
    f.insert("_key".into(), key);
    f.insert("_message_id".into(), Value::Text(id));
    f.insert("_index".into(), Value::Int(index as i64));
    f.insert("_routing_key".into(), Value::Text(msg.routing_key.clone()));
    f.insert("_exchange".into(), Value::Text(msg.exchange.clone()));
    f.insert(
        "_body".into(),
        Value::Text(String::from_utf8_lossy(&msg.body).into_owned()),
    );
    Ok(f)
}

/// The statement executions of one message: every statement for every record.
fn bind(cfg: &DbConnectorConfig, stmts: &[Compiled], msg: &Incoming, records: &[Record]) -> Result<Vec<Bound>, String> {
    let mut out = Vec::with_capacity(records.len() * stmts.len());
    for (index, rec) in records.iter().enumerate() {
        let special = special_fields(cfg, msg, rec, index, records.len())?;
        for (s, stmt) in stmts.iter().enumerate() {
            let mut values = Vec::with_capacity(stmt.params.len());
            for name in &stmt.params {
                let v = if name.starts_with('_') {
                    special.get(name).or_else(|| rec.get(name))
                } else {
                    rec.get(name)
                };
                match (v, cfg.format.missing) {
                    (Some(v), _) => values.push(v.clone()),
                    (None, MissingField::Null) => values.push(Value::Null),
                    (None, MissingField::Reject) => {
                        return Err(format!("record {} has no field `{name}`", index + 1));
                    }
                }
            }
            out.push(Bound { stmt: s, values });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::db::statement::Dialect;

    fn cfg(statements: &[&str]) -> DbConnectorConfig {
        let mut c: DbConnectorConfig = serde_json::from_value(serde_json::json!({
            "database": {"url": "sqlite::memory:"}
        }))
        .unwrap();
        c.database.statements = statements.iter().map(|s| s.to_string()).collect();
        c
    }

    fn msg(body: &str, id: Option<&str>) -> Incoming {
        Incoming {
            body: body.as_bytes().to_vec(),
            message_id: id.map(str::to_string),
            exchange: "x".into(),
            routing_key: "r.k".into(),
        }
    }

    #[test]
    fn binds_fields_and_special_fields_by_name() {
        let c = cfg(&["INSERT INTO t VALUES (:_key, :device_id, :value, :missing, :_routing_key)"]);
        let stmts = compile_statements(&c, Dialect::Postgres).unwrap();
        let m = msg(r#"{"device_id": "d'; DROP TABLE t; --", "value": 1.5}"#, Some("m-1"));
        let recs = decode_message(&c.format, &m.body).unwrap();
        let b = bind(&c, &stmts, &m, &recs).unwrap();
        assert_eq!(
            b[0].values,
            vec![
                Value::Text("m-1".into()),
                Value::Text("d'; DROP TABLE t; --".into()),
                Value::Float(1.5),
                Value::Null,
                Value::Text("r.k".into())
            ]
        );
    }

    #[test]
    fn several_records_get_indexed_keys_and_missing_can_reject() {
        let mut c = cfg(&["INSERT INTO t VALUES (:_key, :a)"]);
        let stmts = compile_statements(&c, Dialect::Sqlite).unwrap();
        let m = msg(r#"[{"a": 1}, {"a": 2}]"#, None);
        let recs = decode_message(&c.format, &m.body).unwrap();
        let b = bind(&c, &stmts, &m, &recs).unwrap();
        let id = m.id();
        assert_eq!(b[1].values[0], Value::Text(format!("{id}#1")));
        assert_eq!(
            m.id(),
            msg(r#"[{"a": 1}, {"a": 2}]"#, None).id(),
            "stable without a message id"
        );
        c.format.missing = MissingField::Reject;
        let e = bind(
            &c,
            &compile_statements(&c, Dialect::Sqlite).unwrap(),
            &m,
            &[Record::new()],
        )
        .unwrap_err();
        assert!(e.contains("no field `a`"), "{e}");
    }

    #[test]
    fn a_key_field_must_be_present() {
        let mut c = cfg(&["INSERT INTO t VALUES (:_key)"]);
        c.database.key = "event_id".into();
        let stmts = compile_statements(&c, Dialect::Sqlite).unwrap();
        let m = msg(r#"{"x": 1}"#, Some("m"));
        let recs = decode_message(&c.format, &m.body).unwrap();
        assert!(bind(&c, &stmts, &m, &recs).unwrap_err().contains("event_id"));
    }
}
