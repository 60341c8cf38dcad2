//! MySQL and MariaDB through mysql_async (prepared statements, cached per connection).
//!
//! The session runs with `STRICT_ALL_TABLES` added to its SQL mode, so a value that does
//! not fit its column is an error (dead-lettered) rather than silently truncated or
//! replaced by zero, and with `utf8mb4` so any Unicode text survives.

use super::database::{Bound, DbError, RejectClass, WriteFailure};
use super::format::{Cell, Rows, Value};
use super::statement::Compiled;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Params, TxOpts};
use std::time::Duration;

pub struct My {
    conn: Conn,
}

impl My {
    pub async fn connect(url: &str, password: Option<&str>, timeout: Duration) -> Result<My, DbError> {
        let url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_string(),
        };
        let opts = Opts::from_url(&url).map_err(|e| DbError::Unavailable(format!("bad MySQL URL: {e}")))?;
        let mut builder = OptsBuilder::from_opts(opts)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .init(vec![
                "SET NAMES utf8mb4",
                "SET SESSION sql_mode = CONCAT_WS(',', @@SESSION.sql_mode, 'STRICT_ALL_TABLES')",
            ]);
        if let Some(p) = password {
            builder = builder.pass(Some(p));
        }
        let conn = tokio::time::timeout(timeout, Conn::new(builder))
            .await
            .map_err(|_| DbError::Unavailable(format!("no answer within {timeout:?}")))?
            .map_err(|e| classify(&e))?;
        Ok(My { conn })
    }

    pub async fn setup(&mut self, sql: &str) -> Result<(), DbError> {
        self.conn.query_drop(sql).await.map_err(|e| classify(&e))
    }

    pub async fn write(&mut self, stmts: &[Compiled], messages: &[Vec<Bound>]) -> Result<(), WriteFailure> {
        let mut tx = self
            .conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(|e| WriteFailure::all(classify(&e)))?;
        for (m, binds) in messages.iter().enumerate() {
            for b in binds {
                let params = Params::Positional(b.values.iter().map(to_mysql).collect());
                if let Err(e) = tx.exec_drop(stmts[b.stmt].sql.as_str(), params).await {
                    let _ = tx.rollback().await;
                    return Err(WriteFailure {
                        message: Some(m),
                        error: classify(&e),
                    });
                }
            }
        }
        tx.commit().await.map_err(|e| WriteFailure::all(classify(&e)))
    }

    pub async fn query(&mut self, q: &Compiled, values: &[Value]) -> Result<Rows, DbError> {
        let params = if values.is_empty() {
            Params::Empty
        } else {
            Params::Positional(values.iter().map(to_mysql).collect())
        };
        let mut result = self
            .conn
            .exec_iter(q.sql.as_str(), params)
            .await
            .map_err(|e| classify(&e))?;
        let columns: Vec<mysql_async::Column> = result.columns_ref().to_vec();
        let rows: Vec<mysql_async::Row> = result.collect().await.map_err(|e| classify(&e))?;
        drop(result);
        let mut out = Rows {
            columns: columns.iter().map(|c| c.name_str().into_owned()).collect(),
            rows: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            let cells = row
                .unwrap()
                .into_iter()
                .zip(&columns)
                .map(|(v, c)| cell(v, c))
                .collect();
            out.rows.push(cells);
        }
        Ok(out)
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.disconnect()).await;
    }
}

fn to_mysql(v: &Value) -> mysql_async::Value {
    match v {
        Value::Null => mysql_async::Value::NULL,
        Value::Bool(b) => mysql_async::Value::Int(i64::from(*b)),
        Value::Int(i) => mysql_async::Value::Int(*i),
        Value::Float(f) => mysql_async::Value::Double(*f),
        Value::Text(s) => mysql_async::Value::Bytes(s.as_bytes().to_vec()),
    }
}

/// The binary character set: BLOB and BINARY columns, as opposed to text.
const BINARY_CHARSET: u16 = 63;

fn cell(v: mysql_async::Value, col: &mysql_async::Column) -> Cell {
    use mysql_async::Value as V;
    match v {
        V::NULL => Cell::Null,
        V::Int(i) => Cell::Int(i),
        V::UInt(u) => i64::try_from(u).map_or_else(|_| Cell::Decimal(u.to_string()), Cell::Int),
        V::Float(f) => Cell::Float(f.into()),
        V::Double(f) => Cell::Float(f),
        V::Bytes(b) => match col.column_type() {
            ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
                Cell::Decimal(String::from_utf8_lossy(&b).into_owned())
            }
            ColumnType::MYSQL_TYPE_JSON => Cell::Json(String::from_utf8_lossy(&b).into_owned()),
            ColumnType::MYSQL_TYPE_BIT => Cell::Bytes(b),
            _ if col.character_set() == BINARY_CHARSET => Cell::Bytes(b),
            _ => match String::from_utf8(b) {
                Ok(s) => Cell::Text(s),
                Err(e) => Cell::Bytes(e.into_bytes()),
            },
        },
        V::Date(y, mo, d, h, mi, s, us) => {
            if col.column_type() == ColumnType::MYSQL_TYPE_DATE {
                Cell::Text(format!("{y:04}-{mo:02}-{d:02}"))
            } else if us == 0 {
                Cell::Text(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}"))
            } else {
                Cell::Text(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"))
            }
        }
        V::Time(neg, days, h, mi, s, us) => {
            let hours = days * 24 + u32::from(h);
            let sign = if neg { "-" } else { "" };
            if us == 0 {
                Cell::Text(format!("{sign}{hours:02}:{mi:02}:{s:02}"))
            } else {
                Cell::Text(format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}"))
            }
        }
    }
}

/// Sorts a MySQL/MariaDB error: retry, or dead-letter with which reason.
pub fn classify(e: &mysql_async::Error) -> DbError {
    let mysql_async::Error::Server(s) = e else {
        // I/O, driver (connection) and URL errors: the database is not there.
        return DbError::Unavailable(e.to_string());
    };
    let reason = format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state);
    match s.code {
        // Lock wait timeout, deadlock, too many connections, server shutting down or gone,
        // read-only, access denied, unknown database.
        1205 | 1213 | 1040 | 1053 | 1077 | 1290 | 1836 | 1045 | 1049 | 2006 | 2013 => {
            return DbError::Unavailable(reason);
        }
        _ => {}
    }
    if s.state.starts_with("23") {
        DbError::Rejected {
            class: RejectClass::ConstraintViolation,
            reason,
        }
    } else if s.state.starts_with("22") || matches!(s.code, 1366 | 1292 | 1264 | 1265 | 1406 | 1411 | 3140) {
        DbError::Rejected {
            class: RejectClass::InvalidContent,
            reason,
        }
    } else if s.state.starts_with("08") || s.state.starts_with("40") {
        DbError::Unavailable(reason)
    } else {
        DbError::Rejected {
            class: RejectClass::Statement,
            reason,
        }
    }
}
