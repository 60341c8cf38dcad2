//! Any other database, through ODBC (cargo feature `odbc`; links unixODBC).
//!
//! `database.url = "odbc:Driver={PostgreSQL Unicode};Server=...;Database=...;UID=..."` (any
//! ODBC connection string after `odbc:`). Values are bound as text parameters (the driver
//! converts them to the column types), rows are read back as text. The driver is blocking,
//! so every call runs on tokio's blocking pool with the one connection. Upserts for
//! `database.table` use the syntax of the database the driver reports (PostgreSQL, SQLite,
//! MySQL/MariaDB); for any other, plain inserts, and a redelivered message then fails on
//! the key with a constraint violation.

use super::database::{Bound, DbError, RejectClass, WriteFailure};
use super::format::{Cell, Rows, Value};
use super::statement::{Compiled, Dialect};
use odbc_api::buffers::TextRowSet;
use odbc_api::parameter::VarCharBox;
use odbc_api::{ConnectionOptions, Cursor, ResultSetMetadata};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Odbc {
    conn: Arc<Mutex<odbc_api::Connection<'static>>>,
    flavor: Option<&'static Dialect>,
}

/// Longest text read from one column value.
const MAX_TEXT: usize = 64 * 1024;

impl Odbc {
    pub async fn connect(conn_str: &str, password: Option<&str>, timeout: Duration) -> Result<Odbc, DbError> {
        let mut conn_str = conn_str.to_string();
        if let Some(p) = password {
            conn_str = format!("{};PWD={{{p}}}", conn_str.trim_end_matches(';'));
        }
        let (conn, flavor) = blocking(move || {
            let env = odbc_api::environment().map_err(|e| classify(&e))?;
            let options = ConnectionOptions {
                login_timeout_sec: Some(timeout.as_secs().max(1) as u32),
                ..ConnectionOptions::default()
            };
            let conn = env
                .connect_with_connection_string(&conn_str, options)
                .map_err(|e| classify(&e))?;
            conn.set_autocommit(false).map_err(|e| classify(&e))?;
            let name = conn
                .database_management_system_name()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let flavor: Option<&'static Dialect> = if name.contains("postgres") {
                Some(&Dialect::Postgres)
            } else if name.contains("sqlite") {
                Some(&Dialect::Sqlite)
            } else if name.contains("mysql") || name.contains("mariadb") {
                Some(&Dialect::MySql)
            } else {
                None
            };
            tracing::info!(dbms = %name, "ODBC connected");
            Ok((conn, flavor))
        })
        .await?;
        Ok(Odbc {
            conn: Arc::new(Mutex::new(conn)),
            flavor,
        })
    }

    /// The database behind the driver, when it is one whose upsert syntax is known.
    pub fn flavor(&self) -> Option<&'static Dialect> {
        self.flavor
    }

    pub async fn setup(&mut self, sql: &str) -> Result<(), DbError> {
        let (conn, sql) = (self.conn.clone(), sql.to_string());
        blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let r = conn.execute(&sql, (), None).map(|_| ()).map_err(|e| classify(&e));
            finish(&conn, r)
        })
        .await
    }

    pub async fn write(&mut self, stmts: &[Compiled], messages: &[Vec<Bound>]) -> Result<(), WriteFailure> {
        let conn = self.conn.clone();
        let sqls: Vec<String> = stmts.iter().map(|s| s.sql.clone()).collect();
        let messages = messages.to_vec();
        let run = move || -> Result<(), WriteFailure> {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            for (m, binds) in messages.iter().enumerate() {
                for b in binds {
                    let params: Vec<VarCharBox> = b.values.iter().map(param).collect();
                    if let Err(e) = conn.execute(&sqls[b.stmt], &params[..], None) {
                        let _ = conn.rollback();
                        return Err(WriteFailure {
                            message: Some(m),
                            error: classify(&e),
                        });
                    }
                }
            }
            conn.commit().map_err(|e| WriteFailure::all(classify(&e)))
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(r) => r,
            Err(e) => Err(WriteFailure::all(DbError::Unavailable(format!(
                "ODBC task failed: {e}"
            )))),
        }
    }

    pub async fn query(&mut self, q: &Compiled, values: &[Value]) -> Result<Rows, DbError> {
        let (conn, sql) = (self.conn.clone(), q.sql.clone());
        let params: Vec<VarCharBox> = values.iter().map(param).collect();
        blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let r = read(&conn, &sql, &params);
            finish(&conn, r)
        })
        .await
    }
}

fn read(conn: &odbc_api::Connection<'static>, sql: &str, params: &[VarCharBox]) -> Result<Rows, DbError> {
    let Some(mut cursor) = conn.execute(sql, params, None).map_err(|e| classify(&e))? else {
        return Ok(Rows::default());
    };
    let columns: Vec<String> = cursor
        .column_names()
        .map_err(|e| classify(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| classify(&e))?;
    let buffer = TextRowSet::for_cursor(256, &mut cursor, Some(MAX_TEXT)).map_err(|e| classify(&e))?;
    let mut block = cursor.bind_buffer(buffer).map_err(|e| classify(&e))?;
    let mut out = Rows {
        columns,
        rows: Vec::new(),
    };
    while let Some(batch) = block.fetch().map_err(|e| classify(&e))? {
        for row in 0..batch.num_rows() {
            let cells = (0..batch.num_cols())
                .map(|col| match batch.at(col, row) {
                    None => Cell::Null,
                    Some(bytes) => Cell::Text(String::from_utf8_lossy(bytes).into_owned()),
                })
                .collect();
            out.rows.push(cells);
        }
    }
    Ok(out)
}

/// Ends the implicit transaction of a statement run outside [`Odbc::write`] (autocommit is
/// off): commit after success, roll back after failure.
fn finish<T>(conn: &odbc_api::Connection<'static>, r: Result<T, DbError>) -> Result<T, DbError> {
    match r {
        Ok(v) => conn.commit().map(|()| v).map_err(|e| classify(&e)),
        Err(e) => {
            let _ = conn.rollback();
            Err(e)
        }
    }
}

fn param(v: &Value) -> VarCharBox {
    match v.as_text() {
        Some(s) => VarCharBox::from_string(s),
        None => VarCharBox::null(),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, DbError> + Send + 'static) -> Result<T, DbError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(DbError::Unavailable(format!("ODBC task failed: {e}"))),
    }
}

/// Sorts an ODBC error by its SQLSTATE.
fn classify(e: &odbc_api::Error) -> DbError {
    let reason = e.to_string().replace('\n', " ");
    let state = match e {
        odbc_api::Error::Diagnostics { record, .. } => record.state.as_str().to_string(),
        _ => return DbError::Unavailable(reason),
    };
    match &state[..2] {
        "23" => DbError::Rejected {
            class: RejectClass::ConstraintViolation,
            reason,
        },
        "22" => DbError::Rejected {
            class: RejectClass::InvalidContent,
            reason,
        },
        "08" | "40" | "57" | "53" => DbError::Unavailable(reason),
        _ if state.starts_with("HYT") => DbError::Unavailable(reason),
        _ => DbError::Rejected {
            class: RejectClass::Statement,
            reason,
        },
    }
}
