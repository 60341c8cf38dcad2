//! PostgreSQL through tokio-postgres.
//!
//! Parameters are sent in PostgreSQL's *text* format whatever the column type, so the
//! server converts `"81.5"` to `numeric`, `"2026-11-25T17:52:29Z"` to `timestamptz` and so
//! on, as it would for a literal, but the value never becomes SQL text. A batch's
//! statements are pipelined inside one transaction: they are all sent before the first
//! answer is awaited, which is what makes batching pay on a network round trip.

use super::database::{Bound, DbError, RejectClass, WriteFailure};
use super::format::{Cell, Rows, Value};
use super::statement::Compiled;
use bytes::BytesMut;
use std::error::Error as _;
use std::time::Duration;
use tokio_postgres::types::{Format, IsNull, Kind, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

pub struct Pg {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    /// The write statements, prepared on this connection.
    prepared: Vec<Statement>,
    prepared_for: Vec<String>,
}

impl Pg {
    pub async fn connect(url: &str, password: Option<&str>, timeout: Duration) -> Result<Pg, DbError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| DbError::Unavailable(format!("bad PostgreSQL URL: {e}")))?;
        if let Some(p) = password {
            config.password(p);
        }
        config
            .connect_timeout(timeout)
            .application_name("edgecase db connector")
            .keepalives(true);
        let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
            .await
            .map_err(|_| DbError::Unavailable(format!("no answer within {timeout:?}")))?
            .map_err(|e| classify(&e))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok(Pg {
            client,
            connection,
            prepared: Vec::new(),
            prepared_for: Vec::new(),
        })
    }

    pub async fn setup(&mut self, sql: &str) -> Result<(), DbError> {
        self.client.batch_execute(sql).await.map_err(|e| classify(&e))
    }

    async fn prepare(&mut self, stmts: &[Compiled]) -> Result<(), DbError> {
        if self.prepared_for.len() == stmts.len() && self.prepared_for.iter().zip(stmts).all(|(a, b)| *a == b.sql) {
            return Ok(());
        }
        let mut prepared = Vec::with_capacity(stmts.len());
        for s in stmts {
            prepared.push(self.client.prepare(&s.sql).await.map_err(|e| classify(&e))?);
        }
        self.prepared = prepared;
        self.prepared_for = stmts.iter().map(|s| s.sql.clone()).collect();
        Ok(())
    }

    pub async fn write(&mut self, stmts: &[Compiled], messages: &[Vec<Bound>]) -> Result<(), WriteFailure> {
        self.prepare(stmts).await.map_err(WriteFailure::all)?;
        let Pg { client, prepared, .. } = self;
        let tx = client
            .transaction()
            .await
            .map_err(|e| WriteFailure::all(classify(&e)))?;
        let executions = messages.iter().enumerate().flat_map(|(m, binds)| {
            let tx = &tx;
            let prepared = &*prepared;
            binds.iter().map(move |b| async move {
                tx.execute_raw(&prepared[b.stmt], b.values.iter().map(PgParam))
                    .await
                    .map_err(|e| (m, e))
            })
        });
        let results = futures_util::future::join_all(executions).await;
        // Statements after a failed one fail too ("transaction is aborted"): the first
        // error in order is the cause.
        if let Some((m, e)) = results.into_iter().find_map(Result::err) {
            let _ = tx.rollback().await;
            return Err(WriteFailure {
                message: Some(m),
                error: classify(&e),
            });
        }
        tx.commit().await.map_err(|e| WriteFailure::all(classify(&e)))
    }

    pub async fn query(&mut self, q: &Compiled, values: &[Value]) -> Result<Rows, DbError> {
        let stmt = self.client.prepare(&q.sql).await.map_err(|e| classify(&e))?;
        let params: Vec<PgParam<'_>> = values.iter().map(PgParam).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self.client.query(&stmt, &refs).await.map_err(|e| classify(&e))?;
        let columns: Vec<String> = stmt.columns().iter().map(|c| c.name().to_string()).collect();
        let mut out = Rows {
            columns,
            rows: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            let mut cells = Vec::with_capacity(out.columns.len());
            for (i, col) in stmt.columns().iter().enumerate() {
                let cell: PgCell = row.try_get(i).map_err(|e| {
                    DbError::Rejected {
                        class: RejectClass::Statement,
                        reason: format!(
                            "column {} has PostgreSQL type {}, which the connector cannot read ({}); cast it in the query, e.g. {}::text",
                            col.name(),
                            col.type_(),
                            e.source().map_or(e.to_string(), |s| s.to_string()),
                            col.name()
                        ),
                    }
                })?;
                cells.push(cell.0);
            }
            out.rows.push(cells);
        }
        Ok(out)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn close(self) {
        drop(self.client);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connection).await;
    }
}

/// Sorts a PostgreSQL error: retry, or dead-letter with which reason.
pub fn classify(e: &tokio_postgres::Error) -> DbError {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection broke, timed out or was refused.
        let detail = e.source().map_or(String::new(), |s| format!(": {s}"));
        return DbError::Unavailable(format!("{e}{detail}"));
    };
    let code = db.code().code();
    let mut reason = format!("{} (SQLSTATE {code})", db.message());
    if let Some(d) = db.detail() {
        reason.push_str(&format!("; {d}"));
    }
    if let Some(c) = db.constraint() {
        reason.push_str(&format!("; constraint {c}"));
    }
    match &code[..2] {
        "22" => DbError::Rejected {
            class: RejectClass::InvalidContent,
            reason,
        },
        "23" => DbError::Rejected {
            class: RejectClass::ConstraintViolation,
            reason,
        },
        // Connection, resources, operator intervention, system errors, auth; deadlocks and
        // serialization failures (40), lock not available (55P03): try again.
        "08" | "53" | "57" | "58" | "28" | "40" | "55" | "3D" => DbError::Unavailable(reason),
        "54" => DbError::Rejected {
            class: RejectClass::InvalidContent,
            reason,
        },
        _ => DbError::Rejected {
            class: RejectClass::Statement,
            reason,
        },
    }
}

/// A value bound in text format: PostgreSQL parses it as the parameter's type.
#[derive(Debug)]
struct PgParam<'a>(&'a Value);

impl ToSql for PgParam<'_> {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0.as_text() {
            None => Ok(IsNull::Yes),
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// Any column, decoded from PostgreSQL's binary format into a [`Cell`].
struct PgCell(Cell);

impl<'a> tokio_postgres::types::FromSql<'a> for PgCell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let cell = match *ty {
            Type::BOOL => Cell::Bool(bool::from_sql(ty, raw)?),
            Type::INT2 => Cell::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Cell::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Cell::Int(i64::from_sql(ty, raw)?),
            Type::OID => Cell::Int(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Cell::Float(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Cell::Float(f64::from_sql(ty, raw)?),
            Type::NUMERIC => Cell::Decimal(numeric(raw)?),
            Type::JSON => Cell::Json(std::str::from_utf8(raw)?.to_string()),
            Type::JSONB => match raw.split_first() {
                Some((1, rest)) => Cell::Json(std::str::from_utf8(rest)?.to_string()),
                _ => return Err("unknown jsonb version".into()),
            },
            Type::BYTEA => Cell::Bytes(raw.to_vec()),
            Type::UUID => Cell::Text(uuid::Uuid::from_slice(raw)?.to_string()),
            Type::TIMESTAMP => Cell::Text(timestamp(raw, false)?),
            Type::TIMESTAMPTZ => Cell::Text(timestamp(raw, true)?),
            Type::DATE => Cell::Text(date(raw)?),
            Type::TIME => Cell::Text(time_of_day(raw)?),
            _ if is_text(ty) => Cell::Text(String::from_utf8_lossy(raw).into_owned()),
            _ => return Err(format!("type {ty} is not supported").into()),
        };
        Ok(PgCell(cell))
    }

    fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgCell(Cell::Null))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Types whose binary format is their text: strings, names, enums, citext and the like.
fn is_text(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::CHAR
    ) || matches!(ty.kind(), Kind::Enum(_))
        || ty.name() == "citext"
}

/// NUMERIC's binary format (base-10000 digits) as decimal text.
fn numeric(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    if raw.len() < 8 {
        return Err("short numeric".into());
    }
    let word = |i: usize| i16::from_be_bytes([raw[i], raw[i + 1]]);
    let ndigits = word(0).max(0) as usize;
    let weight = word(2) as i64;
    let sign = u16::from_be_bytes([raw[4], raw[5]]);
    let dscale = u16::from_be_bytes([raw[6], raw[7]]) as usize;
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => {}
    }
    if raw.len() < 8 + 2 * ndigits {
        return Err("short numeric".into());
    }
    let digit = |k: i64| -> i64 {
        if k >= 0 && (k as usize) < ndigits {
            word(8 + 2 * k as usize) as i64
        } else {
            0
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for k in 0..=weight {
            if k == 0 {
                s.push_str(&digit(k).to_string());
            } else {
                s.push_str(&format!("{:04}", digit(k)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut j = 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(weight + j)));
            j += 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Ok(s)
}

const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

fn timestamp(raw: &[u8], tz: bool) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let micros = i64::from_be_bytes(raw.try_into()?);
    match micros {
        i64::MAX => return Ok("infinity".into()),
        i64::MIN => return Ok("-infinity".into()),
        _ => {}
    }
    let nanos = (PG_EPOCH_UNIX_SECONDS as i128 * 1_000_000 + micros as i128) * 1000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)?;
    if tz {
        Ok(t.format(&time::format_description::well_known::Rfc3339)?)
    } else {
        let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]");
        Ok(t.format(&f)?)
    }
}

fn date(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let days = i32::from_be_bytes(raw.try_into()?);
    match days {
        i32::MAX => return Ok("infinity".into()),
        i32::MIN => return Ok("-infinity".into()),
        _ => {}
    }
    let d = time::Date::from_calendar_date(2000, time::Month::January, 1)?
        .checked_add(time::Duration::days(days.into()))
        .ok_or("date out of range")?;
    Ok(d.format(time::macros::format_description!("[year]-[month]-[day]"))?)
}

fn time_of_day(raw: &[u8]) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let micros = i64::from_be_bytes(raw.try_into()?);
    let (h, rem) = (micros / 3_600_000_000, micros % 3_600_000_000);
    let (m, rem) = (rem / 60_000_000, rem % 60_000_000);
    let (s, us) = (rem / 1_000_000, rem % 1_000_000);
    Ok(format!("{h:02}:{m:02}:{s:02}.{us:06}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_bytes(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [ndigits as u16, weight as u16, sign, dscale] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_binary_to_text() {
        // 12345.678 = [1, 2345, 6780], weight 1, dscale 3
        assert_eq!(
            numeric(&numeric_bytes(3, 1, 0, 3, &[1, 2345, 6780])).unwrap(),
            "12345.678"
        );
        // -0.0012 = [12], weight -1, dscale 4
        assert_eq!(numeric(&numeric_bytes(1, -1, 0x4000, 4, &[12])).unwrap(), "-0.0012");
        // 10000 = [1], weight 1, dscale 0
        assert_eq!(numeric(&numeric_bytes(1, 1, 0, 0, &[1])).unwrap(), "10000");
        // 0.50 (dscale 2)
        assert_eq!(numeric(&numeric_bytes(1, -1, 0, 2, &[5000])).unwrap(), "0.50");
        assert_eq!(numeric(&numeric_bytes(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
    }

    #[test]
    fn timestamps_and_dates() {
        assert_eq!(timestamp(&0i64.to_be_bytes(), true).unwrap(), "2000-01-01T00:00:00Z");
        assert_eq!(
            timestamp(&1_500_000i64.to_be_bytes(), false).unwrap(),
            "2000-01-01T00:00:01.500000"
        );
        assert_eq!(date(&366i32.to_be_bytes()).unwrap(), "2001-01-01");
        assert_eq!(time_of_day(&3_723_000_001i64.to_be_bytes()).unwrap(), "01:02:03.000001");
    }
}
