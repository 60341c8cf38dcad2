//! The SQL database connector (`edgecase connector db ...`) against the real PostgreSQL,
//! MariaDB, SQLite and RabbitMQ of this machine.
//!
//! Each test has its own table (named after the test and the process), exchanges and
//! queues, so they run in parallel with each other and with the agent's tests.

use crate::harness::{AMQP_URL, Names, RABBITMQ, TestBed, amqp_connect, bounded, free_port, run_cli, wait_for};
use edgecase::connectors::db::format::{FormatConfig, FormatKind, Value, decode_message};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use serde_json::{Value as Json, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MARIADB_URL: &str = "mysql://root@127.0.0.1:3306/test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Postgres,
    Maria,
    Sqlite,
}

/// One test's database side: a table of its own (dropped at the end) and the URL the
/// connector uses; plus its AMQP names.
pub struct DbBed {
    pub bed: TestBed,
    pub db: Db,
    pub table: String,
    /// The connector's dead-letter queue (deleted at the end).
    pub dlq: String,
    /// A queue for select-and-send's output, bound to `names.cases_exchange`.
    pub out_queue: String,
    /// The connector reaches the database through its ODBC driver (feature `odbc`).
    pub odbc: bool,
}

impl DbBed {
    pub fn new(test: &str, db: Db) -> DbBed {
        let bed = TestBed::new(test);
        let table = bed.names.base.replace('-', "_");
        let dlq = format!("{}-dead-letters", bed.names.base);
        let out_queue = bed.names.unrouted_queue.clone();
        DbBed {
            bed,
            db,
            table,
            dlq,
            out_queue,
            odbc: false,
        }
    }

    pub fn names(&self) -> &Names {
        &self.bed.names
    }

    pub fn url(&self) -> String {
        if self.odbc {
            return match self.db {
                Db::Postgres => {
                    "odbc:Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=test;UID=postgres".into()
                }
                Db::Sqlite => format!("odbc:Driver={{SQLite3}};Database={}", self.sqlite_path().display()),
                Db::Maria => panic!("no MariaDB ODBC driver in the tests"),
            };
        }
        match self.db {
            Db::Postgres => PG_URL.into(),
            Db::Maria => MARIADB_URL.into(),
            Db::Sqlite => format!("sqlite:{}", self.sqlite_path().display()),
        }
    }

    fn sqlite_path(&self) -> PathBuf {
        self.bed.dir.path().join("connector.db")
    }

    /// The connector settings in the seed's shape; `database` and `format` merged in.
    pub fn settings(&self, database: Json, format: Json) -> Json {
        let mut db = json!({ "url": self.url(), "retry_min": "50ms", "retry_max": "500ms" });
        merge(&mut db, database);
        json!({
            "database": db,
            "broker": {
                "url": AMQP_URL,
                "source": {
                    "queue": self.names().queue,
                    "exchange": self.names().readings_exchange,
                    "binding_keys": ["#"],
                },
                "destination": {
                    "exchange": self.names().cases_exchange,
                    "routing_key": "row.{serial}",
                },
                "dead_letter": { "exchange": self.names().dead_letter_exchange, "queue": self.dlq },
            },
            "format": format,
        })
    }

    pub fn write_settings(&self, name: &str, settings: &Json) -> PathBuf {
        let path = self.bed.dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(settings).expect("JSON")).expect("write settings");
        path
    }

    pub fn data_dir(&self) -> PathBuf {
        self.bed.data_dir()
    }

    /// Runs an SQL statement on the test's database.
    pub async fn exec(&self, sql: &str) {
        match self.db {
            Db::Postgres => {
                let (client, conn) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
                    .await
                    .expect("connect to PostgreSQL");
                tokio::spawn(conn);
                client
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            }
            Db::Maria => {
                use mysql_async::prelude::Queryable;
                let mut conn = mysql_async::Conn::from_url(MARIADB_URL)
                    .await
                    .expect("connect to MariaDB");
                conn.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
                let _ = conn.disconnect().await;
            }
            Db::Sqlite => {
                let conn = rusqlite::Connection::open(self.sqlite_path()).expect("open SQLite");
                conn.execute_batch(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }

    /// Every row of `sql`, every value as text (NULL: None).
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        match self.db {
            Db::Postgres => {
                let (client, conn) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
                    .await
                    .expect("connect to PostgreSQL");
                tokio::spawn(conn);
                let msgs = client
                    .simple_query(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
                msgs.into_iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                    .collect()
            }
            Db::Maria => {
                use mysql_async::prelude::Queryable;
                let mut conn = mysql_async::Conn::from_url(MARIADB_URL)
                    .await
                    .expect("connect to MariaDB");
                let rows: Vec<mysql_async::Row> = conn.query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
                let _ = conn.disconnect().await;
                rows.into_iter()
                    .map(|r| {
                        r.unwrap()
                            .into_iter()
                            .map(|v| match v {
                                mysql_async::Value::NULL => None,
                                mysql_async::Value::Bytes(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                                other => Some(other.as_sql(true).trim_matches('\'').to_string()),
                            })
                            .collect()
                    })
                    .collect()
            }
            Db::Sqlite => {
                let conn = rusqlite::Connection::open(self.sqlite_path()).expect("open SQLite");
                let mut st = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                let n = st.column_count();
                let mut rows = st.query([]).expect("query");
                let mut out = Vec::new();
                while let Some(r) = rows.next().expect("row") {
                    out.push(
                        (0..n)
                            .map(|i| match r.get_ref(i).expect("value") {
                                rusqlite::types::ValueRef::Null => None,
                                rusqlite::types::ValueRef::Integer(i) => Some(i.to_string()),
                                rusqlite::types::ValueRef::Real(f) => Some(f.to_string()),
                                rusqlite::types::ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                                rusqlite::types::ValueRef::Blob(b) => Some(format!("{b:?}")),
                            })
                            .collect(),
                    );
                }
                out
            }
        }
    }

    pub async fn count(&self, sql: &str) -> u64 {
        let rows = self.rows(sql).await;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for DbBed {
    fn drop(&mut self) {
        let (db, table, dlq) = (self.db, self.table.clone(), self.dlq.clone());
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    match db {
                        Db::Postgres => {
                            if let Ok((client, conn)) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls).await {
                                tokio::spawn(conn);
                                let _ = client.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await;
                            }
                        }
                        Db::Maria => {
                            use mysql_async::prelude::Queryable;
                            if let Ok(mut conn) = mysql_async::Conn::from_url(MARIADB_URL).await {
                                let _ = conn.query_drop(format!("DROP TABLE IF EXISTS {table}")).await;
                                let _ = conn.disconnect().await;
                            }
                        }
                        Db::Sqlite => {}
                    }
                    if let Ok(conn) = amqp_connect(Duration::from_secs(3)).await {
                        if let Ok(ch) = conn.create_channel().await {
                            let _ = ch
                                .queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                        let _ = conn.close(200, "cleanup".into()).await;
                    }
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

fn merge(into: &mut Json, from: Json) {
    if let (Some(a), Json::Object(b)) = (into.as_object_mut(), from) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

/// A confirm-mode channel for the test's own publishing and reading.
pub struct Amqp {
    conn: Connection,
    pub ch: Channel,
}

impl Amqp {
    pub async fn connect() -> Amqp {
        const T: Duration = Duration::from_secs(10);
        let conn = amqp_connect(Duration::from_secs(30)).await.expect("RabbitMQ");
        let ch = bounded("channel", T, conn.create_channel()).await.expect("channel");
        bounded("confirm.select", T, ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .expect("confirm mode");
        Amqp { conn, ch }
    }

    /// The source exchange and queue as the connector would create them, so messages
    /// published before it starts are kept.
    pub async fn declare_source(&self, names: &Names) {
        self.declare_exchange(&names.readings_exchange).await;
        self.declare_bound_queue(&names.queue, &names.readings_exchange, "#")
            .await;
    }

    /// A durable topic exchange.
    pub async fn declare_exchange(&self, name: &str) {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.ch
            .exchange_declare(name.into(), ExchangeKind::Topic, durable, FieldTable::default())
            .await
            .expect("declare exchange");
    }

    pub async fn declare_bound_queue(&self, queue: &str, exchange: &str, key: &str) {
        let opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.ch
            .queue_declare(queue.into(), opts, FieldTable::default())
            .await
            .expect("declare queue");
        self.ch
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
    }

    /// Publishes persistent messages with the given ids and waits for every confirm.
    pub async fn publish(&self, exchange: &str, messages: &[(String, Vec<u8>)]) {
        let mut confirms = Vec::with_capacity(messages.len());
        for (id, body) in messages {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            let c = self
                .ch
                .basic_publish(
                    exchange.into(),
                    "test.message".into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .expect("publish");
            confirms.push(c);
        }
        for c in confirms {
            bounded("publish confirm", Duration::from_secs(30), c)
                .await
                .expect("confirm");
        }
    }

    /// Takes every message now in `queue` (acknowledging them).
    pub async fn drain(&self, queue: &str) -> Vec<(BasicProperties, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        {
            let d = m.delivery;
            self.ch
                .basic_ack(d.delivery_tag, BasicAckOptions::default())
                .await
                .expect("ack");
            out.push((d.properties, d.data));
        }
        out
    }

    pub async fn message_count(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.conn.close(200, "done".into())).await;
    }
}

pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Runs `edgecase connector db OP --config FILE --data-dir DIR` to the end.
pub async fn connector(op: &str, config: &Path, data_dir: &Path) -> (i32, String) {
    let out = run_cli(
        &[
            "connector",
            "db",
            op,
            "--config",
            config.to_str().expect("path"),
            "--data-dir",
            data_dir.to_str().expect("path"),
        ],
        Duration::from_secs(60),
    )
    .await
    .expect("edgecase connector db");
    let text = format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `edgecase connector db subscribe-and-write` as a child process, logging to a file.
pub struct Subscriber {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
}

impl Subscriber {
    pub fn start(config: &Path, log: PathBuf) -> Subscriber {
        let mut s = Subscriber {
            child: None,
            config: config.to_path_buf(),
            log,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_edgecase"))
            .args(["connector", "db", "subscribe-and-write", "--config"])
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn edgecase");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit status.
    pub async fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = wait_for(Duration::from_secs(15), || {
            let s = child.try_wait().ok().flatten();
            async move { s }
        })
        .await;
        if status.is_none() {
            let _ = child.kill();
        }
        status.and_then(|s| s.code())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A message body in `kind` holding one reading: `device` (free text), `value`, `site`
/// (nested for JSON and XML) and `serial` (an attribute in XML).
fn body(kind: FormatKind, device: &str, value: &str, site: &str, serial: &str) -> Vec<u8> {
    match kind {
        FormatKind::Json => json!({ "device": device, "reading": { "value": value.parse::<f64>().unwrap(), "site": site }, "serial": serial })
            .to_string()
            .into_bytes(),
        FormatKind::Xml => {
            let e = |s: &str| quick_xml::escape::escape(s).into_owned();
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<reading serial=\"{}\">\n  <device>{}</device>\n  <value unit=\"°C\">{value}</value>\n  <location kind=\"plant\"><site>{}</site></location>\n</reading>",
                e(serial),
                e(device),
                e(site)
            )
            .into_bytes()
        }
        FormatKind::Delimited => {
            let mut w = csv::WriterBuilder::new()
                .delimiter(b';')
                .terminator(csv::Terminator::Any(b'\n'))
                .from_writer(Vec::new());
            w.write_record([device, value, site, serial]).unwrap();
            w.into_inner().unwrap()
        }
    }
}

fn format_settings(kind: FormatKind) -> Json {
    match kind {
        FormatKind::Json => json!({ "type": "json" }),
        FormatKind::Xml => json!({ "type": "xml", "root": "reading" }),
        FormatKind::Delimited => {
            json!({ "type": "delimited", "delimiter": ";", "columns": ["device", "value", "site", "serial"] })
        }
    }
}

fn columns(kind: FormatKind) -> Json {
    match kind {
        FormatKind::Json => json!(["device", "value = reading.value", "site = reading.site", "serial"]),
        FormatKind::Xml => json!(["device", "value", "site = location.site", "serial = @serial"]),
        FormatKind::Delimited => json!(["device", "value", "site", "serial"]),
    }
}

fn create_table(db: Db, table: &str) -> String {
    let _ = db;
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (message_id VARCHAR(100) PRIMARY KEY, device VARCHAR(200) NOT NULL, value NUMERIC(10, 2), site VARCHAR(200), serial VARCHAR(50))"
    )
}

/// What the test sends: Unicode, quotes, the delimiter, markup, and an SQL injection.
fn readings(table: &str) -> Vec<(String, String, String, String, String)> {
    vec![
        (
            "m1".into(),
            "Zoë \"the\" boiler; 東京 ☺".into(),
            "81.5".into(),
            "Plant Ä".into(),
            "A1".into(),
        ),
        (
            "m2".into(),
            format!("x'); DROP TABLE {table}; --"),
            "-3.25".into(),
            "Robert'); DELETE FROM users;--".into(),
            "B2".into(),
        ),
        (
            "m3".into(),
            "<b>&amp;</b> tab\there".into(),
            "0".into(),
            "Åre, \"north\"".into(),
            "C3".into(),
        ),
    ]
}

fn same_number(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() < 1e-9,
        _ => false,
    }
}

/// get-and-write, then select-and-send of what it wrote, in one format and one database.
async fn round_trip(db: Db, kind: FormatKind, odbc: bool) {
    let label = format!("{db:?}/{kind:?}{}", if odbc { " through ODBC" } else { "" });
    let mut t = DbBed::new(&format!("dbrt-{}", format!("{db:?}{kind:?}{odbc}").to_lowercase()), db);
    t.odbc = odbc;
    let table = t.table.clone();
    let settings = t.settings(
        json!({
            "setup": [create_table(db, &table)],
            "table": table,
            "columns": columns(kind),
            "query": format!("SELECT message_id, device, value, site, serial FROM {table}"),
            "tracking_column": "message_id",
        }),
        format_settings(kind),
    );
    let config = t.write_settings("connector.json", &settings);
    let data = t.data_dir();
    let amqp = Amqp::connect().await;
    amqp.declare_source(t.names()).await;
    let sent = readings(&table);
    let msgs: Vec<(String, Vec<u8>)> = sent
        .iter()
        .map(|(id, d, v, s, n)| (id.clone(), body(kind, d, v, s, n)))
        .collect();
    amqp.publish(&t.names().readings_exchange, &msgs).await;

    // get-and-write: one message per run, then empty.
    for i in 0..sent.len() {
        let (code, out) = connector("get-and-write", &config, &data).await;
        assert_eq!(code, 0, "{label}: get-and-write #{i}: {out}");
        assert!(out.contains("success: message m"), "{label}: {out}");
    }
    let (code, out) = connector("get-and-write", &config, &data).await;
    assert_eq!(code, 3, "{label}: empty queue: {out}");

    let rows = t
        .rows(&format!(
            "SELECT message_id, device, value, site, serial FROM {table} ORDER BY message_id"
        ))
        .await;
    assert_eq!(rows.len(), sent.len(), "{label}: {rows:?}");
    for (row, (id, device, value, site, serial)) in rows.iter().zip(&sent) {
        assert_eq!(row[0].as_deref(), Some(id.as_str()), "{label}");
        assert_eq!(
            row[1].as_deref(),
            Some(device.as_str()),
            "{label}: device stored as data"
        );
        assert!(
            same_number(row[2].as_deref().unwrap_or(""), value),
            "{label}: value {row:?}"
        );
        assert_eq!(row[3].as_deref(), Some(site.as_str()), "{label}");
        assert_eq!(row[4].as_deref(), Some(serial.as_str()), "{label}");
    }

    // A redelivered message (same id) updates its row instead of adding one.
    let again = vec![("m1".to_string(), body(kind, &sent[0].1, "99.5", &sent[0].3, &sent[0].4))];
    amqp.publish(&t.names().readings_exchange, &again).await;
    let (code, out) = connector("get-and-write", &config, &data).await;
    assert_eq!(code, 0, "{label}: redelivery: {out}");
    assert_eq!(t.count(&format!("SELECT COUNT(*) FROM {table}")).await, 3, "{label}");
    let v = t
        .rows(&format!("SELECT value FROM {table} WHERE message_id = 'm1'"))
        .await;
    assert!(same_number(v[0][0].as_deref().unwrap_or(""), "99.5"), "{label}: {v:?}");

    // select-and-send: the rows come back as messages in the same format.
    amqp.declare_exchange(&t.names().cases_exchange).await;
    amqp.declare_bound_queue(&t.out_queue, &t.names().cases_exchange, "row.#")
        .await;
    let (code, out) = connector("select-and-send", &config, &data).await;
    assert_eq!(code, 0, "{label}: select-and-send: {out}");
    assert!(out.contains("3 row(s) published"), "{label}: {out}");
    let got = amqp.drain(&t.out_queue).await;
    assert_eq!(got.len(), 3, "{label}: messages {got:?}");
    let fmt: FormatConfig = serde_json::from_value(json!({
        "type": format_settings(kind)["type"],
        "delimiter": ";",
        "columns": ["message_id", "device", "value", "site", "serial"],
    }))
    .unwrap();
    for ((props, data), (id, device, _, site, serial)) in got.iter().zip(&sent) {
        let rec = &decode_message(&fmt, data).unwrap_or_else(|e| panic!("{label}: {e}: {data:?}"))[0];
        assert_eq!(rec.get("message_id"), Some(&Value::Text(id.clone())), "{label}");
        assert_eq!(rec.get("device"), Some(&Value::Text(device.clone())), "{label}");
        assert_eq!(rec.get("site"), Some(&Value::Text(site.clone())), "{label}");
        assert_eq!(rec.get("serial"), Some(&Value::Text(serial.clone())), "{label}");
        assert!(props.message_id().is_some(), "{label}");
        assert_eq!(header(props, "x-connector").as_deref(), Some("edgecase db"));
    }
    // Incremental: a second run has nothing new; a new row is sent alone.
    let (code, out) = connector("select-and-send", &config, &data).await;
    assert_eq!(code, 3, "{label}: nothing new: {out}");
    t.exec(&format!(
        "INSERT INTO {table} (message_id, device, value, site, serial) VALUES ('m4', 'late', 1, 'x', 'D4')"
    ))
    .await;
    let (code, out) = connector("select-and-send", &config, &data).await;
    assert_eq!(code, 0, "{label}: {out}");
    let got = amqp.drain(&t.out_queue).await;
    assert_eq!(got.len(), 1, "{label}: only the new row");
    // The tables survived the injection attempts.
    assert_eq!(t.count(&format!("SELECT COUNT(*) FROM {table}")).await, 4, "{label}");
    amqp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_get_and_write_then_select_and_send_every_format_and_database() {
    let _rabbit = RABBITMQ.read().await;
    for db in [Db::Postgres, Db::Maria, Db::Sqlite] {
        for kind in [FormatKind::Delimited, FormatKind::Json, FormatKind::Xml] {
            round_trip(db, kind, false).await;
        }
    }
}

/// The `odbc` build, through Debian's ODBC drivers for SQLite (libsqliteodbc) and
/// PostgreSQL (odbc-postgresql).
#[cfg(feature = "odbc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_through_odbc_drivers() {
    let _rabbit = RABBITMQ.read().await;
    for db in [Db::Sqlite, Db::Postgres] {
        for kind in [FormatKind::Json, FormatKind::Delimited] {
            round_trip(db, kind, true).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_one_message_writes_several_records_in_one_transaction() {
    let _rabbit = RABBITMQ.read().await;
    for db in [Db::Postgres, Db::Maria, Db::Sqlite] {
        let t = DbBed::new(&format!("dbmulti-{db:?}").to_lowercase(), db);
        let (orders, lines) = (format!("{}_o", t.table), format!("{}_l", t.table));
        let upsert = match db {
            Db::Maria => " ON DUPLICATE KEY UPDATE qty = VALUES(qty)",
            _ => " ON CONFLICT (line_key) DO UPDATE SET qty = excluded.qty",
        };
        let settings = t.settings(
            json!({
                "setup": [
                    format!("CREATE TABLE IF NOT EXISTS {lines} (line_key VARCHAR(100) PRIMARY KEY, order_no VARCHAR(20) NOT NULL, sku VARCHAR(20) NOT NULL, qty INTEGER NOT NULL CHECK (qty > 0))"),
                ],
                "statements": [format!("INSERT INTO {lines} (line_key, order_no, sku, qty) VALUES (:_key, :@no, :@sku, :qty){upsert}")],
            }),
            json!({ "type": "xml", "records": "items.item" }),
        );
        let _ = orders;
        let config = t.write_settings("connector.json", &settings);
        let amqp = Amqp::connect().await;
        amqp.declare_source(t.names()).await;
        let good = br#"<order no="A-1"><items><item sku="x"><qty>1</qty></item><item sku="y"><qty>2</qty></item></items></order>"#;
        // The second line breaks the CHECK: neither line may be written.
        let bad = br#"<order no="B-2"><items><item sku="x"><qty>5</qty></item><item sku="y"><qty>0</qty></item></items></order>"#;
        amqp.publish(
            &t.names().readings_exchange,
            &[("o1".into(), good.to_vec()), ("o2".into(), bad.to_vec())],
        )
        .await;
        let (code, out) = connector("get-and-write", &config, &t.data_dir()).await;
        assert_eq!(code, 0, "{db:?}: {out}");
        let (code, out) = connector("get-and-write", &config, &t.data_dir()).await;
        assert_eq!(code, 1, "{db:?}: the bad order fails: {out}");
        assert!(out.contains("constraint-violation"), "{db:?}: {out}");
        let rows = t
            .rows(&format!(
                "SELECT line_key, order_no, sku, qty FROM {lines} ORDER BY line_key"
            ))
            .await;
        let want = vec![
            vec![
                Some("o1#0".into()),
                Some("A-1".into()),
                Some("x".into()),
                Some("1".into()),
            ],
            vec![
                Some("o1#1".into()),
                Some("A-1".into()),
                Some("y".into()),
                Some("2".into()),
            ],
        ];
        assert_eq!(rows, want, "{db:?}: only the good order, both its lines");
        let dead = amqp.drain(&t.dlq).await;
        assert_eq!(dead.len(), 1, "{db:?}");
        assert_eq!(dead[0].0.message_id().as_ref().map(|s| s.as_str()), Some("o2"));
        t.exec(&format!("DROP TABLE IF EXISTS {lines}")).await;
        amqp.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_bad_messages_and_constraint_violations_are_dead_lettered_and_the_consumer_goes_on() {
    let _rabbit = RABBITMQ.read().await;
    let t = DbBed::new("dbdlq", Db::Maria);
    let table = t.table.clone();
    let settings = t.settings(
        json!({
            "setup": [format!("CREATE TABLE IF NOT EXISTS {table} (message_id VARCHAR(100) PRIMARY KEY, device VARCHAR(50) NOT NULL, value DECIMAL(8, 2) CHECK (value < 1000))")],
            "table": table,
            "columns": ["device", "value"],
        }),
        json!({ "type": "json" }),
    );
    let config = t.write_settings("connector.json", &settings);
    let amqp = Amqp::connect().await;
    amqp.declare_source(t.names()).await;
    let msgs: Vec<(String, Vec<u8>)> = [
        ("g1", r#"{"device": "d1", "value": 1}"#),
        ("bad-json", r#"{"device": "d2", "value": "#),
        ("g2", r#"{"device": "d3", "value": 2}"#),
        ("no-device", r#"{"value": 3}"#),
        ("not-a-number", r#"{"device": "d4", "value": "hot"}"#),
        ("too-big", r#"{"device": "d5", "value": 5000}"#),
        ("g3", r#"{"device": "d6", "value": 3}"#),
    ]
    .iter()
    .map(|(id, b)| (id.to_string(), b.as_bytes().to_vec()))
    .collect();
    amqp.publish(&t.names().readings_exchange, &msgs).await;
    t.exec(settings["database"]["setup"][0].as_str().expect("setup")).await;
    let mut sub = Subscriber::start(&config, t.bed.dir.path().join("subscriber.log"));
    let ok = wait_for(Duration::from_secs(30), || async {
        (t.count(&format!("SELECT COUNT(*) FROM {table}")).await >= 3).then_some(())
    })
    .await;
    assert!(ok.is_some(), "3 good rows: {}", sub.log());
    let dead = wait_for(Duration::from_secs(10), || async {
        (amqp.message_count(&t.dlq).await >= 4).then_some(())
    })
    .await;
    assert!(dead.is_some(), "4 dead letters: {}", sub.log());
    let dead = amqp.drain(&t.dlq).await;
    let by_id: HashMap<String, (Option<String>, Option<String>)> = dead
        .iter()
        .map(|(p, _)| {
            (
                p.message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                (header(p, "x-error-class"), header(p, "x-error-reason")),
            )
        })
        .collect();
    let class = |id: &str| by_id.get(id).and_then(|(c, _)| c.clone()).unwrap_or_default();
    let reason = |id: &str| by_id.get(id).and_then(|(_, r)| r.clone()).unwrap_or_default();
    assert_eq!(class("bad-json"), "invalid-content", "{by_id:?}");
    assert!(reason("bad-json").contains("invalid JSON"), "{by_id:?}");
    assert_eq!(class("no-device"), "constraint-violation", "{by_id:?}");
    assert!(reason("no-device").contains("device"), "{by_id:?}");
    assert_eq!(class("not-a-number"), "invalid-content", "{by_id:?}");
    assert_eq!(class("too-big"), "constraint-violation", "{by_id:?}");
    assert_eq!(dead.len(), 4, "{by_id:?}");
    // The consumer goes on.
    amqp.publish(
        &t.names().readings_exchange,
        &[("g4".into(), br#"{"device": "d7", "value": 4}"#.to_vec())],
    )
    .await;
    let ok = wait_for(Duration::from_secs(15), || async {
        (t.count(&format!("SELECT COUNT(*) FROM {table}")).await == 4).then_some(())
    })
    .await;
    assert!(ok.is_some(), "the consumer went on: {}", sub.log());
    assert_eq!(sub.terminate().await, Some(0), "clean stop: {}", sub.log());
    assert_eq!(amqp.message_count(&t.names().queue).await, 0);
    amqp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_kill_9_mid_stream_leaves_every_message_exactly_once() {
    let _rabbit = RABBITMQ.read().await;
    const N: u64 = 5000;
    let t = DbBed::new("dbkill", Db::Postgres);
    let table = t.table.clone();
    let settings = t.settings(
        json!({
            "setup": [format!("CREATE TABLE IF NOT EXISTS {table} (message_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, writes INTEGER NOT NULL)")],
            // `writes` counts redeliveries the key absorbed.
            "statements": [format!("INSERT INTO {table} (message_id, seq, writes) VALUES (:_key, :seq, 1) ON CONFLICT (message_id) DO UPDATE SET writes = {table}.writes + 1")],
        }),
        json!({ "type": "json" }),
    );
    let mut settings = settings;
    settings["broker"]["batch_size"] = json!(100);
    let config = t.write_settings("connector.json", &settings);
    let amqp = Amqp::connect().await;
    amqp.declare_source(t.names()).await;
    let msgs: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| (format!("k-{i}"), json!({ "seq": i }).to_string().into_bytes()))
        .collect();
    amqp.publish(&t.names().readings_exchange, &msgs).await;
    // The connector creates it too (setup); here first, so the test can count from the start.
    t.exec(settings["database"]["setup"][0].as_str().expect("setup")).await;
    let count_sql = format!("SELECT COUNT(*) FROM {table}");
    let count = || t.count(&count_sql);
    let mut sub = Subscriber::start(&config, t.bed.dir.path().join("subscriber.log"));
    let some = wait_for(Duration::from_secs(60), || async {
        (count().await >= 500).then_some(())
    })
    .await;
    assert!(some.is_some(), "writing started: {}", sub.log());
    sub.kill9();
    let at_kill = count().await;
    assert!(at_kill < N, "killed mid-stream ({at_kill} of {N} written)");
    sub.restart();
    let all = wait_for(Duration::from_secs(120), || async {
        (count().await >= N).then_some(())
    })
    .await;
    assert!(all.is_some(), "{} of {N} after restart: {}", count().await, sub.log());
    // Let any redelivery finish, then check: every message once, no other row.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = t
        .rows(&format!(
            "SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq), SUM(writes) FROM {table}"
        ))
        .await;
    let s: Vec<String> = stats[0].iter().map(|v| v.clone().unwrap_or_default()).collect();
    assert_eq!(s[0], N.to_string(), "{s:?}");
    assert_eq!(s[1], N.to_string(), "{s:?}");
    assert_eq!((s[2].as_str(), s[3].as_str()), ("0", (N - 1).to_string().as_str()));
    eprintln!(
        "kill -9 at {at_kill} of {N} rows; {} writes in all ({} redelivered and absorbed by the key)",
        s[4],
        s[4].parse::<u64>().unwrap_or(N) - N
    );
    assert_eq!(sub.terminate().await, Some(0), "{}", sub.log());
    assert_eq!(amqp.message_count(&t.names().queue).await, 0);
    amqp.close().await;
}

/// A TCP forwarder to PostgreSQL that the test can cut and restore: a database outage
/// without stopping the machine's PostgreSQL.
struct Outage {
    port: u16,
    stop: Option<CancellationToken>,
}

impl Outage {
    fn new() -> Outage {
        let mut o = Outage {
            port: free_port(),
            stop: None,
        };
        o.up();
        o
    }

    fn up(&mut self) {
        let stop = CancellationToken::new();
        let (port, token) = (self.port, stop.clone());
        let bound = Arc::new(std::sync::Barrier::new(2));
        let ready = bound.clone();
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind proxy");
            ready.wait();
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        bound.wait();
        self.stop = Some(stop);
    }

    fn down(&mut self) {
        if let Some(s) = self.stop.take() {
            s.cancel();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_outage_is_retried_without_dead_lettering_good_messages() {
    let _rabbit = RABBITMQ.read().await;
    let t = DbBed::new("dboutage", Db::Postgres);
    let table = t.table.clone();
    let mut proxy = Outage::new();
    let mut settings = t.settings(
        json!({
            "setup": [format!("CREATE TABLE IF NOT EXISTS {table} (message_id TEXT PRIMARY KEY, seq BIGINT NOT NULL)")],
            "table": table,
            "columns": ["seq"],
        }),
        json!({ "type": "json" }),
    );
    settings["database"]["url"] = json!(format!("postgres://postgres@127.0.0.1:{}/test", proxy.port));
    settings["database"]["connect_timeout"] = json!("2s");
    let config = t.write_settings("connector.json", &settings);
    let amqp = Amqp::connect().await;
    amqp.declare_source(t.names()).await;
    let batch = |from: u64| -> Vec<(String, Vec<u8>)> {
        (from..from + 20)
            .map(|i| (format!("o-{i}"), json!({ "seq": i }).to_string().into_bytes()))
            .collect()
    };
    // The connector creates it too (setup); here first, so the test can count from the start.
    t.exec(settings["database"]["setup"][0].as_str().expect("setup")).await;
    let count_sql = format!("SELECT COUNT(*) FROM {table}");
    let count = || t.count(&count_sql);
    let mut sub = Subscriber::start(&config, t.bed.dir.path().join("subscriber.log"));
    amqp.publish(&t.names().readings_exchange, &batch(0)).await;
    let first = wait_for(Duration::from_secs(30), || async {
        (count().await == 20).then_some(())
    })
    .await;
    assert!(first.is_some(), "{}", sub.log());
    proxy.down();
    amqp.publish(&t.names().readings_exchange, &batch(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count().await, 20, "nothing written while the database is down");
    assert_eq!(amqp.message_count(&t.dlq).await, 0, "no dead letters: {}", sub.log());
    proxy.up();
    let rest = wait_for(Duration::from_secs(30), || async {
        (count().await == 40).then_some(())
    })
    .await;
    assert!(rest.is_some(), "{} rows after the outage: {}", count().await, sub.log());
    assert_eq!(amqp.message_count(&t.dlq).await, 0, "{}", sub.log());
    assert!(sub.log().contains("database unavailable"), "{}", sub.log());
    assert_eq!(sub.terminate().await, Some(0), "{}", sub.log());
    proxy.down();
    amqp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_select_and_send_with_its_own_last_value_placeholder() {
    let _rabbit = RABBITMQ.read().await;
    let t = DbBed::new("dblast", Db::Sqlite);
    let table = t.table.clone();
    t.exec(&format!(
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, serial TEXT, note TEXT); INSERT INTO {table} VALUES (1, 'a', 'x'), (2, 'b', NULL)"
    ))
    .await;
    let settings = t.settings(
        json!({
            "query": format!("SELECT id, serial, note FROM {table} WHERE (:_last IS NULL OR id > :_last) ORDER BY id"),
            "tracking_column": "id",
        }),
        json!({ "type": "json" }),
    );
    let config = t.write_settings("connector.json", &settings);
    let amqp = Amqp::connect().await;
    amqp.declare_exchange(&t.names().cases_exchange).await;
    amqp.declare_bound_queue(&t.out_queue, &t.names().cases_exchange, "row.#")
        .await;
    let (code, out) = connector("select-and-send", &config, &t.data_dir()).await;
    assert_eq!(code, 0, "{out}");
    let got = amqp.drain(&t.out_queue).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert_eq!(
        bodies,
        vec![
            r#"{"id":1,"serial":"a","note":"x"}"#,
            r#"{"id":2,"serial":"b","note":null}"#
        ],
        "{out}"
    );
    let (code, out) = connector("select-and-send", &config, &t.data_dir()).await;
    assert_eq!(code, 3, "{out}");
    t.exec(&format!("INSERT INTO {table} VALUES (3, 'c', 'y')")).await;
    let (code, out) = connector("select-and-send", &config, &t.data_dir()).await;
    assert_eq!(code, 0, "{out}");
    let got = amqp.drain(&t.out_queue).await;
    assert_eq!(got.len(), 1, "{out}");
    // The state file names the query and the last value sent.
    let state = std::fs::read_dir(t.data_dir().join("db-connector"))
        .expect("state directory")
        .next()
        .expect("a state file")
        .expect("entry");
    let state: Json = serde_json::from_slice(&std::fs::read(state.path()).expect("read")).expect("JSON");
    assert_eq!(state["last"], json!(3));
    assert_eq!(state["rows_sent"], json!(3));
    amqp.close().await;
}
