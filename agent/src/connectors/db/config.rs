//! The DB connector's settings: the seed's three sections, `database`, `broker` and
//! `format`, either as a JSON (or TOML) file of their own or as `[connector.db]` in the
//! main config. Every section denies unknown keys and every problem is reported with its
//! key path, as for the rest of the config.

use super::format::FormatConfig;
use super::statement::ColumnMap;
use crate::config::{Config, Secret, redact_url};
use serde::{Deserialize, Serialize, Serializer};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole connector: one logical database, its broker side and its message format.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbConnectorConfig {
    pub database: DatabaseConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub format: FormatConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Which database: `postgres://user@host:5432/db`, `mysql://user@host:3306/db` (MySQL
    /// and MariaDB), `sqlite:path/to/file.db`, or with the `odbc` build
    /// `odbc:Driver={...};Server=...` (an ODBC connection string). The password is redacted
    /// in `edgecase check`.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: Secret,
    /// The password, if not in the URL.
    pub password: Option<Secret>,
    /// Read the password from this file instead (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// Statements run once after each connect, e.g. `CREATE TABLE IF NOT EXISTS ...`.
    pub setup: Vec<String>,
    /// select-and-send: the read query. `:_last` in it is the tracking column's last sent
    /// value; without it and with `tracking_column`, the query is wrapped to send only
    /// newer rows.
    pub query: Option<String>,
    /// select-and-send: the column that orders rows and whose last sent value is kept in
    /// the data directory, so that a re-run sends only newer rows.
    pub tracking_column: Option<String>,
    /// Rows read per query when tracking (the next query continues after them).
    pub max_rows: usize,
    /// select-and-send: run again this often (`--every` wins). Unset: once.
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// get/subscribe-and-write: the insert/update statements run for each record of a
    /// message, with `:field` placeholders (see the docs for field names).
    pub statements: Vec<String>,
    /// get/subscribe-and-write without `statements`: the table each record goes into...
    pub table: Option<String>,
    /// ...its columns, each `"column"` (from the field of the same name) or
    /// `"column = field.path"`...
    pub columns: Vec<String>,
    /// ...and the unique column holding the idempotency key (empty: plain inserts).
    pub key_column: String,
    /// Where the idempotency key (`:_key`) comes from: `_message_id` (the AMQP message id,
    /// else a hash of the body) or a field path of the record.
    pub key: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Backoff while the database is down: first and longest wait.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Dead-letter a message once the database has been down for this long. Unset: keep
    /// retrying (messages wait in the queue).
    #[serde(with = "humantime_serde")]
    pub dead_letter_after: Option<Duration>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: Secret::new(""),
            password: None,
            password_file: None,
            setup: Vec::new(),
            query: None,
            tracking_column: None,
            max_rows: 10_000,
            interval: None,
            statements: Vec::new(),
            table: None,
            columns: Vec::new(),
            key_column: "message_id".into(),
            key: "_message_id".into(),
            connect_timeout: Duration::from_secs(10),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            dead_letter_after: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `amqp://user:pass@host:port/vhost` or `amqps://...`. Unset: `[amqp] url` of the main
    /// config (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    #[serde(serialize_with = "serialize_redacted_opt_url")]
    pub url: Option<Secret>,
    /// Where get/subscribe-and-write take messages from.
    pub source: SourceConfig,
    /// Where select-and-send publishes rows.
    pub destination: DestinationConfig,
    /// Where messages that cannot be written go, with the reason in their headers.
    pub dead_letter: DeadLetterConfig,
    /// subscribe-and-write: most messages written in one transaction. Messages are grouped
    /// only when they are already waiting; 1 writes each in its own transaction.
    pub batch_size: usize,
    /// The agent's own exchanges (from `[amqp]`): when the source is one of them and it is
    /// missing, it is created as the agent would create it (with its alternate exchange),
    /// so that the agent can still declare it later. Not a setting.
    #[serde(skip)]
    pub agent_topology: Option<crate::config::AmqpConfig>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: None,
            source: SourceConfig::default(),
            destination: DestinationConfig::default(),
            dead_letter: DeadLetterConfig::default(),
            batch_size: 500,
            agent_topology: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// The queue to read; created (durable, default arguments) if missing.
    pub queue: String,
    /// An exchange to bind the queue to; created if missing. Empty: no binding.
    pub exchange: String,
    /// Type of the exchange if it has to be created: `topic`, `direct`, `fanout`, `headers`.
    pub exchange_type: String,
    /// Binding keys of the queue on `exchange`.
    pub binding_keys: Vec<String>,
    /// subscribe-and-write: unacknowledged messages the broker sends ahead.
    pub prefetch: u16,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            queue: String::new(),
            exchange: String::new(),
            exchange_type: "topic".into(),
            binding_keys: vec!["#".into()],
            prefetch: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationConfig {
    /// The exchange rows are published to; created if missing.
    pub exchange: String,
    /// Type of the exchange if it has to be created.
    pub exchange_type: String,
    /// Routing key of each row's message; `{column}` is replaced by the row's value.
    pub routing_key: String,
    /// The message id of each row's message, a template like `routing_key`. Unset: a UUID
    /// v5 of the query and the message body, so a re-sent row keeps its id.
    pub message_id: Option<String>,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            exchange: String::new(),
            exchange_type: "topic".into(),
            routing_key: String::new(),
            message_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Exchange for dead letters (topic; created if missing).
    pub exchange: String,
    /// Their routing key. Default: the source queue's name.
    pub routing_key: Option<String>,
    /// A durable queue bound to it with that key, so dead letters are kept. Default:
    /// `{source queue}.dead-letters`; empty: none.
    pub queue: Option<String>,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            exchange: "edgecase.dlx".into(),
            routing_key: None,
            queue: None,
        }
    }
}

impl DeadLetterConfig {
    pub fn routing_key_for(&self, source_queue: &str) -> String {
        self.routing_key.clone().unwrap_or_else(|| source_queue.to_string())
    }
    pub fn queue_for(&self, source_queue: &str) -> Option<String> {
        match &self.queue {
            Some(q) if q.is_empty() => None,
            Some(q) => Some(q.clone()),
            None => Some(format!("{source_queue}.dead-letters")),
        }
    }
}

fn serialize_redacted_url<S: Serializer>(url: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_db_url(url.expose()))
}

fn serialize_redacted_opt_url<S: Serializer>(url: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_str(&redact_url(u.expose())),
        None => s.serialize_none(),
    }
}

/// A database URL for logs: the password in a URL or in an ODBC string becomes `***`.
pub fn redact_db_url(url: &str) -> String {
    if let Some(odbc) = url.strip_prefix("odbc:") {
        let parts: Vec<String> = odbc
            .split(';')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if matches!(k.trim().to_ascii_lowercase().as_str(), "pwd" | "password") => {
                    format!("{k}=***")
                }
                _ => kv.to_string(),
            })
            .collect();
        return format!("odbc:{}", parts.join(";"));
    }
    if url.starts_with("sqlite:") {
        return url.to_string();
    }
    redact_url(url)
}

/// Which operation a check is for: each needs different settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    SelectAndSend,
    GetAndWrite,
    SubscribeAndWrite,
}

impl DbConnectorConfig {
    /// Problems that hold whatever the operation, each naming its key under `prefix`.
    pub fn validate(&self, prefix: &str, p: &mut Vec<String>) {
        let d = &self.database;
        let url = d.url.expose();
        let scheme_ok = [
            "postgres://",
            "postgresql://",
            "mysql://",
            "mariadb://",
            "sqlite:",
            "odbc:",
        ]
        .iter()
        .any(|s| url.starts_with(s));
        if url.is_empty() {
            p.push(format!(
                "{prefix}.database.url: required, e.g. postgres://user@127.0.0.1/db or sqlite:data.db"
            ));
        } else if !scheme_ok {
            p.push(format!(
                "{prefix}.database.url: {:?} is not a postgres://, mysql://, sqlite: or odbc: URL",
                redact_db_url(url)
            ));
        } else if url.starts_with("odbc:") && !cfg!(feature = "odbc") {
            p.push(format!(
                "{prefix}.database.url: odbc: needs an edgecase built with `--features odbc`"
            ));
        }
        if d.password.is_some() && d.password_file.is_some() {
            p.push(format!(
                "{prefix}.database.password_file: set either password or password_file, not both"
            ));
        }
        if let Some(f) = d.password_file.as_ref().filter(|f| !f.is_file()) {
            p.push(format!(
                "{prefix}.database.password_file: {} is not a readable file",
                f.display()
            ));
        }
        if d.tracking_column.is_some() && d.query.is_none() {
            p.push(format!("{prefix}.database.tracking_column: needs database.query"));
        }
        if d.max_rows == 0 {
            p.push(format!("{prefix}.database.max_rows: must be greater than 0"));
        }
        if !d.statements.is_empty() && d.table.is_some() {
            p.push(format!(
                "{prefix}.database.table: set either statements or table, not both"
            ));
        }
        if d.table.is_some() && d.columns.is_empty() {
            p.push(format!("{prefix}.database.columns: database.table needs its columns"));
        }
        for (i, c) in d.columns.iter().enumerate() {
            if let Err(e) = ColumnMap::parse(c) {
                p.push(format!("{prefix}.database.columns[{i}]: {e}"));
            }
        }
        if d.key.is_empty() {
            p.push(format!(
                "{prefix}.database.key: must not be empty (default _message_id)"
            ));
        }
        if d.retry_min.is_zero() || d.retry_max < d.retry_min {
            p.push(format!(
                "{prefix}.database.retry_min/retry_max: want 0 < retry_min <= retry_max"
            ));
        }
        let b = &self.broker;
        if let Some(u) = &b.url
            && !(u.expose().starts_with("amqp://") || u.expose().starts_with("amqps://"))
        {
            p.push(format!("{prefix}.broker.url: use amqp:// or amqps://"));
        }
        for (key, t) in [
            ("source.exchange_type", &b.source.exchange_type),
            ("destination.exchange_type", &b.destination.exchange_type),
        ] {
            if !matches!(t.as_str(), "topic" | "direct" | "fanout" | "headers") {
                p.push(format!(
                    "{prefix}.broker.{key}: {t:?} is not topic, direct, fanout or headers"
                ));
            }
        }
        if b.batch_size == 0 {
            p.push(format!("{prefix}.broker.batch_size: must be greater than 0"));
        }
        if b.source.prefetch == 0 {
            p.push(format!("{prefix}.broker.source.prefetch: must be greater than 0"));
        }
        if b.dead_letter.exchange.is_empty() {
            p.push(format!("{prefix}.broker.dead_letter.exchange: must not be empty"));
        }
        self.format.validate(&format!("{prefix}.format"), p);
    }

    /// What `op` needs on top of [`DbConnectorConfig::validate`].
    pub fn validate_for(&self, op: Operation, prefix: &str) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        self.validate(prefix, &mut p);
        match op {
            Operation::SelectAndSend => {
                if self.database.query.is_none() {
                    p.push(format!("{prefix}.database.query: select-and-send needs the read query"));
                }
                if self.broker.destination.exchange.is_empty() {
                    p.push(format!(
                        "{prefix}.broker.destination.exchange: select-and-send needs the exchange to publish to"
                    ));
                }
            }
            Operation::GetAndWrite | Operation::SubscribeAndWrite => {
                if self.broker.source.queue.is_empty() {
                    p.push(format!("{prefix}.broker.source.queue: needed to read messages"));
                }
                if self.database.statements.is_empty() && self.database.table.is_none() {
                    p.push(format!(
                        "{prefix}.database.statements: needed to write messages (or database.table and database.columns)"
                    ));
                }
            }
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// The database password: `password`, else `password_file`, else none (it may be in
    /// the URL).
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.database.password {
            return Ok(Some(p.expose().to_string()));
        }
        if let Some(f) = &self.database.password_file {
            let s = std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            return Ok(Some(s.trim_end_matches(['\n', '\r']).to_string()));
        }
        Ok(None)
    }
}

/// Settings loaded for one run: the connector's section and the main config around it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub db: DbConnectorConfig,
    /// The key path of the section, for messages: `connector.db` or the file's own keys.
    pub prefix: String,
}

/// Loads `path`: either a connector file of its own (JSON or TOML with top-level
/// `database`, `broker` and `format`: the seed's shape) or a main config with a
/// `[connector.db]` section. `EDGECASE__CONNECTOR__DB__...` variables override either.
pub fn load(path: &Path) -> Result<Loaded, crate::config::Error> {
    let origin = path.display().to_string();
    let load_err = |message: String| crate::config::Error::Load {
        origin: origin.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| load_err(format!("cannot read: {e}")))?;
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let top: Vec<String> = if is_json {
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            Ok(_) => return Err(load_err("want a JSON object".into())),
            Err(e) => return Err(load_err(format!("invalid JSON: {e}"))),
        }
    } else {
        match text.parse::<toml::Table>() {
            Ok(t) => t.keys().cloned().collect(),
            Err(e) => return Err(load_err(format!("invalid TOML: {e}"))),
        }
    };
    let standalone = top.iter().any(|k| k == "database");
    let config = if standalone {
        // The seed's shape: wrap it as [connector.db] of an otherwise default config.
        let wrapped = if is_json {
            format!("{{\"connector\": {{\"db\": {text}}}}}")
        } else {
            let table: toml::Table = text.parse().map_err(|e| load_err(format!("invalid TOML: {e}")))?;
            let mut db = toml::Table::new();
            db.insert("db".into(), toml::Value::Table(table));
            let mut root = toml::Table::new();
            root.insert("connector".into(), toml::Value::Table(db));
            toml::to_string(&root).map_err(|e| load_err(e.to_string()))?
        };
        Config::load_str(&origin, &wrapped, is_json, None)?
    } else {
        Config::load(Some(path))?
    };
    let db = config.connector.db.clone().ok_or_else(|| {
        load_err("no DB connector settings: want top-level database/broker/format sections, or [connector.db]".into())
    })?;
    Ok(Loaded {
        config,
        db,
        prefix: if standalone {
            String::new()
        } else {
            "connector.db".into()
        },
    })
}

/// `prefix.key`, or `key` for a connector file of its own.
pub fn key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(ext: &str, body: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(body.as_bytes()).unwrap();
        f
    }

    #[test]
    fn the_seed_json_shape_is_accepted_as_is() {
        let f = file(
            ".json",
            r#"{
              "database": {"url": "postgres://edge@127.0.0.1/test", "query": "SELECT * FROM t", "tracking_column": "id"},
              "broker": {"url": "amqp://guest:guest@127.0.0.1:5672/%2f",
                         "source": {"queue": "in", "exchange": "edgecase.readings", "binding_keys": ["reading.#"]},
                         "destination": {"exchange": "rows", "routing_key": "row.{id}"}},
              "format": {"type": "delimited", "delimiter": "|"}
            }"#,
        );
        let l = load(f.path()).expect("loads");
        assert_eq!(l.db.format.delimiter, "|");
        assert_eq!(l.db.broker.source.queue, "in");
        assert_eq!(l.db.database.tracking_column.as_deref(), Some("id"));
        assert!(l.prefix.is_empty());
        l.db.validate_for(Operation::SelectAndSend, &l.prefix).expect("valid");
    }

    #[test]
    fn the_same_settings_work_in_the_main_toml() {
        let f = file(
            ".toml",
            "[connector.db.database]\nurl = \"sqlite:x.db\"\ntable = \"readings\"\ncolumns = [\"device_id\", \"value\"]\n[connector.db.broker.source]\nqueue = \"q\"\n[connector.db.format]\ntype = \"xml\"\n",
        );
        let l = load(f.path()).expect("loads");
        assert_eq!(l.prefix, "connector.db");
        assert_eq!(l.db.format.kind, super::super::format::FormatKind::Xml);
        l.db.validate_for(Operation::SubscribeAndWrite, &l.prefix)
            .expect("valid");
        let err = l.db.validate_for(Operation::SelectAndSend, &l.prefix).unwrap_err();
        assert!(
            err.iter().any(|e| e.starts_with("connector.db.database.query")),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = file(".json", r#"{"database": {"url": "sqlite:x.db", "querry": "x"}}"#);
        let e = load(f.path()).unwrap_err().to_string();
        assert!(e.contains("querry"), "{e}");
        let f = file(
            ".json",
            r#"{"database": {"url": "oracle://x"}, "format": {"type": "delimited", "delimiter": "ab"}}"#,
        );
        let e = load(f.path()).unwrap_err().to_string();
        assert!(e.contains("connector.db.database.url"), "{e}");
        assert!(e.contains("connector.db.format.delimiter"), "{e}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_db_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact_db_url("odbc:Driver={PostgreSQL Unicode};Server=h;PWD=x;UID=u"),
            "odbc:Driver={PostgreSQL Unicode};Server=h;PWD=***;UID=u"
        );
    }
}
