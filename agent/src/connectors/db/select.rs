//! select-and-send: a read query's rows out as messages, one per row, with publisher
//! confirms; optionally incremental.
//!
//! Incremental: with `database.tracking_column`, the last value of that column among the
//! rows the broker has *confirmed* is kept in the data directory
//! (`db-connector/select-<hash>.json`, written atomically after every confirmed window),
//! and the next run sends only rows beyond it. The query is either wrapped
//! (`SELECT * FROM (query) WHERE col > :_last ORDER BY col LIMIT max_rows`, repeated
//! until a short page) or, if it names `:_last` itself, run as written with that value
//! bound. A crash re-sends at most the unconfirmed window: at least once, never a gap.

use super::Outcome;
use super::broker::{BrokerError, Session};
use super::config::DbConnectorConfig;
use super::database::{Database, DbError};
use super::format::{Cell, Rows, Value, encode_row};
use super::statement::{Compiled, Dialect, compile, quote_ident};
use crate::config::Secret;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Publishes awaiting a confirm at once.
const WINDOW: usize = 1000;

/// The remembered position of an incremental select.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrackingState {
    pub query: String,
    pub tracking_column: String,
    /// The tracking column's value in the last confirmed row.
    pub last: serde_json::Value,
    pub rows_sent: u64,
    pub updated: String,
}

/// Where the state of this query is kept.
pub fn state_path(cfg: &DbConnectorConfig, data_dir: &Path) -> PathBuf {
    let identity = format!(
        "{}\n{}\n{}",
        super::config::redact_db_url(cfg.database.url.expose()),
        cfg.database.query.as_deref().unwrap_or(""),
        cfg.database.tracking_column.as_deref().unwrap_or("")
    );
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, identity.as_bytes())
        .simple()
        .to_string();
    data_dir.join("db-connector").join(format!("select-{}.json", &id[..16]))
}

fn load_state(path: &Path) -> Result<Option<TrackingState>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e} (delete it to start again from the first row)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Write to a temporary file, fsync, rename, fsync the directory: the state is the old or
/// the new one after a crash, never half of each.
fn save_state(path: &Path, state: &TrackingState) -> Result<(), String> {
    use std::io::Write;
    let dir = path.parent().ok_or("state path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .or_else(|| n.as_f64().map(Value::Float))
            .unwrap_or_else(|| Value::Text(n.to_string())),
        serde_json::Value::String(s) => Value::Text(s.clone()),
        other => Value::Text(other.to_string()),
    }
}

/// Orders two tracking values: numbers as numbers, anything else as text (ISO dates and
/// timestamps order correctly as text).
fn compare(a: &Cell, b: &Cell) -> Ordering {
    let num = |c: &Cell| match c {
        Cell::Int(i) => Some(*i as f64),
        Cell::Float(f) => Some(*f),
        Cell::Decimal(s) => s.parse().ok(),
        _ => None,
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => a.to_text().cmp(&b.to_text()),
    }
}

/// `{column}` replaced by the row's value as text (NULL: empty).
pub fn render(template: &str, columns: &[String], row: &[Cell]) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("template {template:?}: unclosed {{"))?;
        let name = &after[..end];
        let i = columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| format!("template {template:?}: the query has no column {name:?}"))?;
        out.push_str(&row[i].to_text().unwrap_or_default());
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// One run: query, publish every row, remember where it got to.
pub async fn select_and_send(cfg: Arc<DbConnectorConfig>, amqp_url: &Secret, data_dir: &Path) -> Outcome {
    let mut db = match Database::connect(&cfg).await {
        Ok(db) => db,
        Err(e) => return Outcome::Failure(format!("cannot query the database: {e}")),
    };
    let session = match Session::open(amqp_url, "edgecase db connector (select-and-send)").await {
        Ok(s) => s,
        Err(e) => {
            db.close().await;
            return Outcome::Failure(e.to_string());
        }
    };
    let result = run(&cfg, &mut db, &session, data_dir).await;
    db.close().await;
    session.close().await;
    match result {
        Ok((0, _)) => Outcome::Empty("the query returned no rows".into()),
        Ok((n, exchange)) => Outcome::Success(format!(
            "{n} row(s) published to exchange {exchange}, each confirmed by the broker"
        )),
        Err(e) => Outcome::Failure(e),
    }
}

/// As [`select_and_send`], again every `every` until `cancel`. The last run's outcome is
/// returned; each run's is logged.
pub async fn select_and_send_every(
    cfg: Arc<DbConnectorConfig>,
    amqp_url: &Secret,
    data_dir: &Path,
    every: Duration,
    cancel: CancellationToken,
) -> Outcome {
    loop {
        let outcome = select_and_send(cfg.clone(), amqp_url, data_dir).await;
        match &outcome {
            Outcome::Failure(e) => {
                tracing::warn!(error = %e, "select-and-send failed; trying again at the next interval")
            }
            o => tracing::info!(outcome = %o, "select-and-send run"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return outcome,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The query to run and whether it pages (wrapped with ORDER BY and LIMIT).
fn plan(cfg: &DbConnectorConfig, dialect: Dialect, has_last: bool) -> Result<(Compiled, bool), String> {
    let query = cfg.database.query.as_deref().unwrap_or_default();
    let query = query.trim().trim_end_matches(';');
    let compiled = |sql: &str| compile(sql, dialect).map_err(|e| format!("database.query: {e}"));
    let Some(col) = &cfg.database.tracking_column else {
        return Ok((compiled(query)?, false));
    };
    let own = compiled(query)?;
    if own.params.iter().any(|p| p == "_last") {
        return Ok((own, false));
    }
    let col = quote_ident(col, dialect);
    let filter = if has_last {
        format!(" WHERE {col} > :_last")
    } else {
        String::new()
    };
    let wrapped = format!(
        "SELECT * FROM ({query}) AS edgecase_rows{filter} ORDER BY {col} LIMIT {}",
        cfg.database.max_rows
    );
    Ok((compiled(&wrapped)?, true))
}

async fn run(
    cfg: &DbConnectorConfig,
    db: &mut Database,
    session: &Session,
    data_dir: &Path,
) -> Result<(u64, String), String> {
    let dest = &cfg.broker.destination;
    session
        .ensure_exchange(&dest.exchange, &dest.exchange_type)
        .await
        .map_err(|e| e.to_string())?;
    let path = state_path(cfg, data_dir);
    let mut state = match &cfg.database.tracking_column {
        Some(_) => load_state(&path)?,
        None => None,
    };
    let mut sent = 0u64;
    loop {
        let last = state.as_ref().map(|s| json_to_value(&s.last));
        let (query, pages) = plan(cfg, db.dialect(), last.is_some())?;
        let values: Vec<Value> = query
            .params
            .iter()
            .map(|p| match p.as_str() {
                "_last" => Ok(last.clone().unwrap_or(Value::Null)),
                other => Err(format!("database.query: unknown placeholder :{other} (only :_last)")),
            })
            .collect::<Result<_, _>>()?;
        let rows = db.query(&query, &values).await.map_err(|e| match e {
            DbError::Unavailable(e) => format!("database unavailable: {e}"),
            DbError::Rejected { reason, .. } => format!("the query failed: {reason}"),
        })?;
        let n = rows.rows.len();
        sent += publish_rows(cfg, session, &rows, &query.sql, &path, &mut state).await?;
        if !pages || n < cfg.database.max_rows {
            return Ok((sent, dest.exchange.clone()));
        }
    }
}

/// Publishes the rows with a window of confirms, saving the tracking state after each
/// confirmed window. Returns how many were confirmed.
async fn publish_rows(
    cfg: &DbConnectorConfig,
    session: &Session,
    rows: &Rows,
    sql: &str,
    path: &Path,
    state: &mut Option<TrackingState>,
) -> Result<u64, String> {
    let dest = &cfg.broker.destination;
    let tracking = match &cfg.database.tracking_column {
        Some(col) => Some(
            rows.columns
                .iter()
                .position(|c| c == col)
                .ok_or_else(|| format!("database.tracking_column: the query has no column {col:?}"))?,
        ),
        None => None,
    };
    let mut in_flight = FuturesOrdered::new();
    let mut confirmed = 0u64;
    let mut best: Option<Cell> = None;
    let mut since_save = 0usize;
    for (i, row) in rows.rows.iter().enumerate() {
        let body = encode_row(&cfg.format, &rows.columns, row).map_err(|e| format!("row {}: {e}", i + 1))?;
        let routing_key = render(&dest.routing_key, &rows.columns, row)?;
        let message_id = match &dest.message_id {
            Some(t) => render(t, &rows.columns, row)?,
            None => {
                let mut seed = sql.as_bytes().to_vec();
                seed.push(0);
                seed.extend_from_slice(&body);
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &seed).to_string()
            }
        };
        let mut headers = FieldTable::default();
        headers.insert("x-connector".into(), AMQPValue::LongString("edgecase db".into()));
        let props = BasicProperties::default()
            .with_content_type(cfg.format.content_type().into())
            .with_message_id(message_id.as_str().into())
            .with_timestamp((crate::reading::now_ms() / 1000).max(0) as u64)
            .with_headers(headers);
        let confirm = session
            .publish(&dest.exchange, &routing_key, &body, props)
            .await
            .map_err(|e| e.to_string())?;
        let track = tracking.map(|t| row[t].clone());
        in_flight.push_back(async move { (confirm.await, routing_key, track) });
        while in_flight.len() >= WINDOW || (i + 1 == rows.rows.len() && !in_flight.is_empty()) {
            let Some((c, key, track)) = in_flight.next().await else {
                break;
            };
            match super::broker::confirmed(c) {
                Ok(true) => {}
                Ok(false) => {
                    save(cfg, path, state, &best, since_save)?;
                    return Err(format!(
                        "row returned unroutable: no queue is bound to exchange {} for routing key {key:?} ({confirmed} row(s) confirmed before it)",
                        dest.exchange
                    ));
                }
                Err(BrokerError::Unavailable(e) | BrokerError::Topology(e)) => {
                    save(cfg, path, state, &best, since_save)?;
                    return Err(format!("{e} ({confirmed} row(s) confirmed before it)"));
                }
            }
            confirmed += 1;
            since_save += 1;
            if let Some(t) = track.filter(|t| *t != Cell::Null)
                && best.as_ref().is_none_or(|b| compare(&t, b) == Ordering::Greater)
            {
                best = Some(t);
            }
            if since_save >= WINDOW {
                save(cfg, path, state, &best, since_save)?;
                since_save = 0;
            }
        }
    }
    save(cfg, path, state, &best, since_save)?;
    Ok(confirmed)
}

fn save(
    cfg: &DbConnectorConfig,
    path: &Path,
    state: &mut Option<TrackingState>,
    best: &Option<Cell>,
    newly: usize,
) -> Result<(), String> {
    let (Some(col), Some(best)) = (&cfg.database.tracking_column, best) else {
        return Ok(());
    };
    let rows_sent = state.as_ref().map_or(0, |s| s.rows_sent) + newly as u64;
    let new = TrackingState {
        query: cfg.database.query.clone().unwrap_or_default(),
        tracking_column: col.clone(),
        last: best.to_json(),
        rows_sent,
        updated: crate::reading::format_ms(crate::reading::now_ms()),
    };
    save_state(path, &new)?;
    *state = Some(new);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_use_row_values() {
        let cols = vec!["id".to_string(), "device".to_string()];
        let row = vec![Cell::Int(3), Cell::Text("b-1".into())];
        assert_eq!(render("row.{device}.{id}", &cols, &row).unwrap(), "row.b-1.3");
        assert!(render("{nope}", &cols, &row).unwrap_err().contains("no column"));
    }

    #[test]
    fn wrapped_incremental_query() {
        let mut c: DbConnectorConfig = serde_json::from_value(serde_json::json!({
            "database": {"url": "sqlite:x", "query": "SELECT id, v FROM t;", "tracking_column": "id", "max_rows": 5}
        }))
        .unwrap();
        let (q, pages) = plan(&c, Dialect::Postgres, true).unwrap();
        assert!(pages);
        assert_eq!(
            q.sql,
            "SELECT * FROM (SELECT id, v FROM t) AS edgecase_rows WHERE \"id\" > $1 ORDER BY \"id\" LIMIT 5"
        );
        let (q, _) = plan(&c, Dialect::MySql, false).unwrap();
        assert_eq!(
            q.sql,
            "SELECT * FROM (SELECT id, v FROM t) AS edgecase_rows ORDER BY `id` LIMIT 5"
        );
        c.database.query = Some("SELECT * FROM t WHERE id > :_last ORDER BY id".into());
        let (q, pages) = plan(&c, Dialect::Sqlite, true).unwrap();
        assert!(!pages);
        assert_eq!(q.params, vec!["_last"]);
    }

    #[test]
    fn state_survives_a_round_trip_and_orders_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db-connector").join("s.json");
        let s = TrackingState {
            query: "q".into(),
            tracking_column: "id".into(),
            last: serde_json::json!(42),
            rows_sent: 3,
            updated: "now".into(),
        };
        save_state(&path, &s).unwrap();
        assert_eq!(load_state(&path).unwrap(), Some(s));
        assert_eq!(compare(&Cell::Int(10), &Cell::Int(9)), Ordering::Greater);
        assert_eq!(compare(&Cell::Decimal("10.5".into()), &Cell::Int(9)), Ordering::Greater);
        assert_eq!(
            compare(&Cell::Text("2026-01-02".into()), &Cell::Text("2026-01-01".into())),
            Ordering::Greater
        );
    }
}
