//! SQLite through rusqlite: the agent's own binding (one `libsqlite3-sys` in the binary).
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool while holding the
//! one connection (a std `Mutex`: it is held only inside those blocking calls, never across
//! an `.await`). The database is opened in WAL mode with `synchronous=FULL`, like the
//! buffer: a commit is on disk before the message is acknowledged.

use super::database::{Bound, DbError, RejectClass, WriteFailure};
use super::format::{Cell, Rows, Value};
use super::statement::Compiled;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Lite {
    conn: Arc<Mutex<Connection>>,
}

impl Lite {
    /// `path` as in `sqlite:path` (`sqlite:///abs/file.db` and `sqlite://rel.db` work too).
    pub async fn open(path: &str, busy_timeout: Duration) -> Result<Lite, DbError> {
        let path = path.strip_prefix("//").unwrap_or(path);
        let path = path.split('?').next().unwrap_or(path).to_string();
        let conn = blocking(move || {
            let conn = Connection::open(&path).map_err(|e| classify(&e))?;
            conn.busy_timeout(busy_timeout).map_err(|e| classify(&e))?;
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| classify(&e))?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(|e| classify(&e))?;
            Ok(conn)
        })
        .await?;
        Ok(Lite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub async fn setup(&mut self, sql: &str) -> Result<(), DbError> {
        let (conn, sql) = (self.conn.clone(), sql.to_string());
        blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            conn.execute_batch(&sql).map_err(|e| classify(&e))
        })
        .await
    }

    pub async fn write(&mut self, stmts: &[Compiled], messages: &[Vec<Bound>]) -> Result<(), WriteFailure> {
        let conn = self.conn.clone();
        let sqls: Vec<String> = stmts.iter().map(|s| s.sql.clone()).collect();
        let messages = messages.to_vec();
        let run = move || -> Result<(), WriteFailure> {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| WriteFailure::all(classify(&e)))?;
            for (m, binds) in messages.iter().enumerate() {
                for b in binds {
                    let fail = |e: rusqlite::Error| WriteFailure {
                        message: Some(m),
                        error: classify(&e),
                    };
                    let mut st = tx.prepare_cached(&sqls[b.stmt]).map_err(fail)?;
                    st.execute(rusqlite::params_from_iter(b.values.iter().map(LiteParam)))
                        .map_err(fail)?;
                }
            }
            tx.commit().map_err(|e| WriteFailure::all(classify(&e)))
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(r) => r,
            Err(e) => Err(WriteFailure::all(DbError::Unavailable(format!(
                "SQLite task failed: {e}"
            )))),
        }
    }

    pub async fn query(&mut self, q: &Compiled, values: &[Value]) -> Result<Rows, DbError> {
        let (conn, sql, values) = (self.conn.clone(), q.sql.clone(), values.to_vec());
        blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let mut st = conn.prepare(&sql).map_err(|e| classify(&e))?;
            let columns: Vec<String> = st.column_names().iter().map(|s| s.to_string()).collect();
            let n = columns.len();
            let mut rows = st
                .query(rusqlite::params_from_iter(values.iter().map(LiteParam)))
                .map_err(|e| classify(&e))?;
            let mut out = Rows {
                columns,
                rows: Vec::new(),
            };
            while let Some(row) = rows.next().map_err(|e| classify(&e))? {
                let mut cells = Vec::with_capacity(n);
                for i in 0..n {
                    let v = row.get_ref(i).map_err(|e| classify(&e))?;
                    cells.push(match v {
                        ValueRef::Null => Cell::Null,
                        ValueRef::Integer(i) => Cell::Int(i),
                        ValueRef::Real(f) => Cell::Float(f),
                        ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                        ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
                    });
                }
                out.rows.push(cells);
            }
            Ok(out)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, DbError> + Send + 'static) -> Result<T, DbError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(DbError::Unavailable(format!("SQLite task failed: {e}"))),
    }
}

struct LiteParam<'a>(&'a Value);

impl rusqlite::ToSql for LiteParam<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Float(f) => ToSqlOutput::Borrowed(ValueRef::Real(*f)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// Sorts a SQLite error: retry, or dead-letter with which reason.
pub fn classify(e: &rusqlite::Error) -> DbError {
    let reason = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => DbError::Rejected {
            class: RejectClass::ConstraintViolation,
            reason,
        },
        Some(ErrorCode::TypeMismatch | ErrorCode::TooBig) => DbError::Rejected {
            class: RejectClass::InvalidContent,
            reason,
        },
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly
            | ErrorCode::OutOfMemory
            | ErrorCode::PermissionDenied
            | ErrorCode::FileLockingProtocolFailed,
        ) => DbError::Unavailable(reason),
        _ => DbError::Rejected {
            class: RejectClass::Statement,
            reason,
        },
    }
}
