//! `edgecase demo`: the whole data path on one machine with no external service.
//!
//! An embedded MQTT broker (rumqttd) and two pseudo-terminals stand in for the site; the
//! devices are `edgecase-sim`'s: the fleet of `examples/sim/site.toml` over MQTT, some
//! misbehaving on purpose (a boiler overheating, a humidity sensor drifting out of range, a
//! stuck pressure sensor, a meter that goes silent, a device sending garbage), a tank
//! sensor sending JSON lines on one serial line and a pump controller speaking the binary
//! firmware protocol on the other (with a damaged frame now and then, NACKed and
//! retransmitted). The agent runs exactly as `edgecase run` would, with the rules
//! of `examples/gateway.toml`: ingest, SQLite buffer, rules, publisher. The publisher hands
//! messages to an in-process queue (or, with `--amqp`, to a real RabbitMQ). From the
//! in-process queue, the DB connector's writer stores every reading and case event in a
//! SQLite database (`--db`, named at the end), and the cases go on to a local Salesforce
//! emulator through the Salesforce connector's upserts (with `--amqp`, the connector itself
//! consumes RabbitMQ). The loop closes through the PushTopic source ([`pushtopic`]): each
//! Case created or updated in the emulator comes back onto the broker as a PushTopic event.
//! Live counts while it runs, each Case as it appears in the emulator and as its event
//! comes back, a summary at the end.
//!
//! This module is compiled only with the `demo` feature, which the gateway build leaves
//! out: the embedded broker is a large dependency that a gateway does not need.

mod pushtopic;

use crate::agent::{Agent, Output};
use crate::config::{Config, SerialFraming, SerialPortConfig};
use crate::connectors::db::write::Incoming;
use crate::metrics::Metrics;
use crate::publish::memory::Delivery;
use crate::rules::{CaseAction, CaseEvent};
use edgecase_sim::inject::{BadInputKind, BadInputSpec, Injector};
use edgecase_sim::model::{DeviceSpec, Fleet, Pattern, SensorSpec};
use edgecase_sim::serial::{Framing, Link, Pty, SerialOptions};
use edgecase_sim::{Plan, Report, Scenario, Stop};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The example gateway config: its rules are the demo's rules.
const EXAMPLE_CONFIG: &str = include_str!("../../../examples/gateway.toml");
/// The MQTT devices: the example site of the simulator.
const SITE: &str = include_str!("../../../examples/sim/site.toml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("demo: {0}")]
    Setup(String),
    #[error(transparent)]
    Agent(#[from] crate::agent::Error),
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Publish to this RabbitMQ instead of the in-process queue.
    pub amqp: Option<String>,
    /// Stop after this long (default: until Ctrl-C).
    pub duration: Option<Duration>,
    /// Keep the buffer here (default: a fresh temporary directory, removed at the end).
    pub data_dir: Option<PathBuf>,
    /// Seconds between live count lines.
    pub report_every: Duration,
    /// Where the DB connector stores readings and cases (in-process queue only).
    pub db: PathBuf,
}

/// Counts the demo's consumer saw.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub readings_in: u64,
    pub published: u64,
    pub cases_raised: u64,
    pub cases_cleared: u64,
    pub dead_letters: u64,
    /// Binary serial frames acknowledged (retransmissions included) and NACKed.
    pub frames_acked: u64,
    pub frames_nacked: u64,
    pub pending_at_exit: u64,
    pub case_subjects: Vec<String>,
    /// The SQLite database the DB connector wrote, and its rows: readings, case events.
    pub database: Option<(PathBuf, u64, u64)>,
    /// The Cases in the Salesforce emulator at the end: number, status, subject.
    pub salesforce_cases: Vec<String>,
    /// Case changes in the emulator (created, updated), and the PushTopic events that came
    /// back onto the broker for them.
    pub case_changes: u64,
    pub case_events_back: u64,
}

/// Runs the demo until Ctrl-C, SIGTERM or the duration, and returns what happened.
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> Result<Summary, Error> {
    let started = Instant::now();
    let broker_port = free_port()?;
    start_broker(broker_port)?;
    let json_pty = Pty::create().map_err(|e| Error::Setup(format!("cannot create a pseudo-terminal: {e}")))?;
    let binary_pty = Pty::create().map_err(|e| Error::Setup(format!("cannot create a pseudo-terminal: {e}")))?;
    let site = Scenario::parse(SITE).map_err(|e| Error::Setup(format!("examples/sim/site.toml: {e}")))?;

    let mut config: Config =
        toml::from_str(EXAMPLE_CONFIG).map_err(|e| Error::Setup(format!("examples/gateway.toml: {e}")))?;
    config.gateway.id = "demo-gateway".into();
    config.mqtt.url = format!("mqtt://127.0.0.1:{broker_port}");
    config.mqtt.client_id = Some(format!("edgecase-demo-{}", std::process::id()));
    let port = |path: &PathBuf, framing| SerialPortConfig {
        path: path.clone(),
        baud_rate: 115_200,
        device_id: None,
        framing,
        max_line_bytes: 4096,
        reopen_min: Duration::from_millis(200),
        reopen_max: Duration::from_secs(2),
    };
    config.serial = vec![
        port(&json_pty.path, SerialFraming::JsonLines),
        port(&binary_pty.path, SerialFraming::Binary),
    ];
    config.admin.enabled = false;
    if let Some(url) = &opts.amqp {
        config.amqp.url = crate::config::Secret::new(url.clone());
    }
    config.validate().map_err(|p| Error::Setup(p.join("; ")))?;

    // The Salesforce leg: a local emulator and a division per rule division.
    let emulator = salesforce_emulator::Emulator::start(
        salesforce_emulator::EmulatorConfig::default(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .map_err(|e| Error::Setup(e.to_string()))?;
    let sf_queues: Vec<String> = ["facilities", "field-service"]
        .iter()
        .map(|d| format!("edgecase.demo.salesforce.{d}.{}", std::process::id()))
        .collect();
    let sf_config = salesforce_config(emulator.url(), &sf_queues, &config)?;

    let (data_dir, temporary) = match &opts.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("edgecase-demo-{}", std::process::id())),
            true,
        ),
    };
    let (deliveries_tx, deliveries_rx) = mpsc::channel(1024);
    // The PushTopic source shares the in-process queue with the agent.
    let events_tx = opts.amqp.is_none().then(|| deliveries_tx.clone());
    let output = match opts.amqp {
        Some(_) => {
            // Nothing feeds the in-process consumer; it ends at once.
            drop(deliveries_tx);
            Output::Amqp
        }
        None => Output::Memory(deliveries_tx),
    };
    // The DB connector's writers, one per table, fed by the in-process consumer.
    let writers = match &opts.amqp {
        None => Some(DbWriters::start(&opts.db)?),
        Some(_) => None,
    };
    let agent = Agent::start_with(&config, data_dir.clone(), output).await?;
    let metrics = agent.metrics.clone();
    // Through RabbitMQ, the connector consumes its own queues; in-process, the consumer
    // below hands each case to the same upserts.
    let (connector, direct) = if opts.amqp.is_some() {
        match crate::connectors::salesforce::start(sf_config.clone(), metrics.clone()).await {
            Ok(c) => (Some(c), None),
            Err(e) => {
                agent.shutdown().await;
                return Err(Error::Setup(format!("{e}: {}", error_chain(&e))));
            }
        }
    } else {
        match crate::connectors::salesforce::direct::DirectSink::start(&sf_config).await {
            Ok(d) => (None, Some(std::sync::Arc::new(d))),
            Err(e) => {
                agent.shutdown().await;
                return Err(Error::Setup(format!("{e}: {}", error_chain(&e))));
            }
        }
    };
    let changes = emulator.org.subscribe_changes();
    let case_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let printer = tokio::spawn(print_salesforce_changes(changes, case_changes.clone()));
    let case_events =
        match pushtopic::CaseEvents::start(emulator.url(), &data_dir, opts.amqp.as_deref(), events_tx).await {
            Ok(c) => c,
            Err(e) => {
                agent.shutdown().await;
                return Err(e);
            }
        };
    if !case_events.subscribed(Duration::from_secs(10)).await {
        println!("edgecase demo: the PushTopic source has not subscribed yet; its events come when it does");
    }
    println!(
        "edgecase demo: embedded MQTT broker on 127.0.0.1:{broker_port}, serial devices on {} (JSON lines) and {} (binary frames)",
        json_pty.path.display(),
        binary_pty.path.display()
    );
    println!(
        "edgecase demo: buffer in {}; publishing to {}",
        data_dir.display(),
        opts.amqp
            .as_deref()
            .map(crate::config::redact_url)
            .unwrap_or_else(|| "an in-process queue".into())
    );
    println!(
        "edgecase demo: Salesforce emulator on {} takes the cases (inspect: curl {}/__emulator/records/Case)",
        emulator.url(),
        emulator.url()
    );
    println!(
        "edgecase demo: PushTopic {} on the emulator sends each Case change back to {}, exchange {}, routing key {}",
        pushtopic::TOPIC,
        if opts.amqp.is_some() { "RabbitMQ" } else { "the queue" },
        case_events.shared.config.exchange,
        case_events.shared.config.routing_key()
    );
    println!("edgecase demo: rules from examples/gateway.toml; some devices misbehave on purpose. Ctrl-C to stop.");

    let devices: Stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(mqtt_devices(broker_port, site, devices.clone()));
    let (d, p) = (devices.clone(), json_pty);
    tasks.spawn_blocking(move || serial_devices(&p, Framing::JsonLines, &d));
    let (d, p) = (devices.clone(), binary_pty);
    tasks.spawn_blocking(move || serial_devices(&p, Framing::Binary, &d));
    let to_db = writers.as_ref().map(|w| (w.readings.clone(), w.cases.clone()));
    let events_exchange = case_events.shared.config.exchange.clone();
    let consumer = tokio::spawn(consume(deliveries_rx, to_db, direct, events_exchange));

    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut every = tokio::time::interval(opts.report_every);
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(deadline) => break,
            _ = every.tick() => println!("{}", live_line(&metrics, started.elapsed())),
        }
    }
    // The agent stops first so that it takes in everything the devices sent.
    agent.shutdown().await;
    devices.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    // In-process, the consumer ends once the source has stopped too (they share the
    // queue): the source first gets the time to bring the last Case changes back.
    let grace = Duration::from_secs(5);
    let mut case_events = Some(case_events);
    let mut case_events_back = 0;
    if opts.amqp.is_none()
        && let Some(c) = case_events.take()
    {
        case_events_back = c.finish(&case_changes, grace).await;
    }
    let seen = consumer.await.unwrap_or_default();
    // A database that could not be written is reported, not a failed demo.
    let database = match writers {
        Some(w) => match w.finish(&opts.db).await {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("edgecase demo: {e}");
                None
            }
        },
        None => None,
    };
    if let Some(c) = connector {
        // Give cases published at the end the time to reach the emulator.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline && salesforce_busy(&metrics) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.shutdown().await;
        if let Some(url) = &opts.amqp {
            delete_queues(url, &sf_queues).await;
        }
    }
    if let Some(c) = case_events.take() {
        case_events_back = c.finish(&case_changes, grace).await;
    }
    printer.abort();
    let salesforce_cases = emulator
        .cases()
        .iter()
        .map(|c| {
            let f = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            format!("{} {:<6} {}", f("CaseNumber"), f("Status"), f("Subject"))
        })
        .collect();
    let summary = Summary {
        readings_in: metrics.ingest_readings.get_or_create(&source("mqtt")).get()
            + metrics.ingest_readings.get_or_create(&source("serial")).get(),
        published: metrics.publish_confirmed.get(),
        cases_raised: count_cases(&metrics, "raise"),
        cases_cleared: count_cases(&metrics, "clear"),
        dead_letters: metrics.buffer_dead_letters.get().max(0) as u64,
        frames_acked: frames(&metrics, "acked") + frames(&metrics, "duplicate"),
        frames_nacked: frames(&metrics, "nacked"),
        pending_at_exit: metrics.buffer_pending_readings.get().max(0) as u64,
        case_subjects: seen,
        database,
        salesforce_cases,
        case_changes: case_changes.load(Ordering::Relaxed),
        case_events_back,
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(summary)
}

fn source(s: &str) -> crate::metrics::SourceLabel {
    crate::metrics::SourceLabel { source: s.to_string() }
}

/// The sum of a counter family's series whose `label` is `value`, read from the exposition
/// text (the families are small: one series per rule and action, or per port and result).
fn sum_series(m: &Metrics, family: &str, label: &str, value: &str) -> u64 {
    let (prefix, matcher) = (format!("{family}{{"), format!("{label}=\"{value}\""));
    m.encode()
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&matcher))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn frames(m: &Metrics, result: &str) -> u64 {
    sum_series(m, "edgecase_serial_frames_total", "result", result)
}

fn count_cases(m: &Metrics, action: &str) -> u64 {
    sum_series(m, "edgecase_rules_cases_total", "action", action)
}

fn live_line(m: &Metrics, elapsed: Duration) -> String {
    format!(
        "[{:>4}s] readings in {:>5} (mqtt {}, serial {}) | buffered {:>3} | published {:>5} | cases raised {} cleared {} | dead letters {}",
        elapsed.as_secs(),
        m.ingest_readings.get_or_create(&source("mqtt")).get()
            + m.ingest_readings.get_or_create(&source("serial")).get(),
        m.ingest_readings.get_or_create(&source("mqtt")).get(),
        m.ingest_readings.get_or_create(&source("serial")).get(),
        m.buffer_pending_readings.get(),
        m.publish_confirmed.get(),
        count_cases(m, "raise"),
        count_cases(m, "clear"),
        m.buffer_dead_letters.get(),
    )
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The DB connector in the demo: readings and case events into two tables of a SQLite
/// database, through the connector's own writer (decode, bind, batch, commit).
struct DbWriters {
    readings: mpsc::Sender<Incoming>,
    cases: mpsc::Sender<Incoming>,
    tasks: Vec<tokio::task::JoinHandle<Result<crate::connectors::db::write::WriterStats, String>>>,
}

impl DbWriters {
    fn start(path: &std::path::Path) -> Result<DbWriters, Error> {
        let url = format!("sqlite:{}", path.display());
        let readings = serde_json::json!({
            "database": {
                "url": url,
                "setup": ["CREATE TABLE IF NOT EXISTS readings (message_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, sensor TEXT NOT NULL, value REAL NOT NULL, unit TEXT, ts TEXT NOT NULL, seq INTEGER, gateway_id TEXT, source TEXT)"],
                "table": "readings",
                "columns": ["device_id", "sensor", "value", "unit", "ts", "seq", "gateway_id", "source"],
            },
            "format": { "type": "json" },
        });
        let cases = serde_json::json!({
            "database": {
                "url": url,
                "setup": ["CREATE TABLE IF NOT EXISTS cases (message_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, action TEXT NOT NULL, rule TEXT NOT NULL, division TEXT, device_id TEXT, sensor TEXT, subject TEXT, priority TEXT, status TEXT, first_seen TEXT, readings INTEGER, gateway_id TEXT)"],
                "table": "cases",
                "columns": ["event_id", "action", "rule", "division", "device_id", "sensor", "subject = case.Subject", "priority = case.Priority", "status = case.Status", "first_seen", "readings = count", "gateway_id"],
            },
            "format": { "type": "json" },
        });
        let mut tasks = Vec::new();
        let mut senders = Vec::new();
        for settings in [readings, cases] {
            let cfg: crate::connectors::db::DbConnectorConfig =
                serde_json::from_value(settings).map_err(|e| Error::Setup(format!("DB connector settings: {e}")))?;
            let (tx, rx) = mpsc::channel(1024);
            senders.push(tx);
            tasks.push(tokio::spawn(crate::connectors::db::consume::write_channel(
                std::sync::Arc::new(cfg),
                rx,
                CancellationToken::new(),
            )));
        }
        let cases = senders.pop().ok_or_else(|| Error::Setup("no writer".into()))?;
        let readings = senders.pop().ok_or_else(|| Error::Setup("no writer".into()))?;
        Ok(DbWriters { readings, cases, tasks })
    }

    /// Waits for the writers (their channels are closed) and counts what they stored.
    async fn finish(self, path: &std::path::Path) -> Result<(PathBuf, u64, u64), Error> {
        drop(self.readings);
        drop(self.cases);
        for t in self.tasks {
            match t.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Error::Setup(format!("DB connector: {e}"))),
                Err(e) => return Err(Error::Setup(format!("DB connector task: {e}"))),
            }
        }
        let count = |table: &str| -> Result<u64, Error> {
            let conn =
                rusqlite::Connection::open(path).map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
            conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0))
                .map(|n| n.max(0) as u64)
                .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))
        };
        Ok((path.to_path_buf(), count("readings")?, count("cases")?))
    }
}

/// The Salesforce connector's configuration for the demo: the emulator's default app and
/// user, one division per rule division.
fn salesforce_config(
    url: &str,
    queues: &[String],
    config: &Config,
) -> Result<crate::connectors::salesforce::config::Resolved, Error> {
    let division = |name: &str, queue: &str| {
        serde_json::json!({
            "name": name, "username": "integration@edgecase.example", "password": "password",
            "security_token": "TOKEN", "queue": queue,
            "defaults": {"Origin": "Edgecase", "Status": "New"},
            "mapping": {"Device__c": "device_id", "Sensor__c": "sensor", "Rule__c": "rule", "Gateway__c": "gateway_id"}
        })
    };
    let raw: crate::connectors::salesforce::config::SalesforceConfig = serde_json::from_value(serde_json::json!({
        "tenant": {"client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret", "login_url": url},
        "divisions": [division("facilities", &queues[0]), division("field-service", &queues[1])]
    }))
    .map_err(|e| Error::Setup(format!("Salesforce config: {e}")))?;
    raw.resolve("salesforce", &config.amqp)
        .map_err(|p| Error::Setup(p.join("; ")))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

fn salesforce_busy(m: &Metrics) -> bool {
    m.encode()
        .lines()
        .filter(|l| l.starts_with("edgecase_salesforce_in_flight{"))
        .any(|l| !l.ends_with(" 0"))
}

async fn delete_queues(url: &str, queues: &[String]) {
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in queues {
            for name in [q.clone(), format!("{q}.dlq")] {
                let _ = ch
                    .queue_delete(name.as_str().into(), lapin::options::QueueDeleteOptions::default())
                    .await;
            }
        }
    }
    let _ = conn.close(200, "demo done".into()).await;
}

/// Prints each Case as the emulator creates or updates it, and counts those changes.
async fn print_salesforce_changes(
    mut changes: tokio::sync::broadcast::Receiver<salesforce_emulator::org::ChangeEvent>,
    count: Arc<std::sync::atomic::AtomicU64>,
) {
    use salesforce_emulator::org::ChangeKind;
    loop {
        let e = match changes.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let f = |k: &str| e.record.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let what = match e.kind {
            ChangeKind::Created => "created",
            ChangeKind::Updated => "updated",
            ChangeKind::Deleted => "deleted",
        };
        if e.object != "Case" {
            continue;
        }
        if !matches!(e.kind, ChangeKind::Deleted) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        println!(
            "  SALESFORCE Case {} {what} (device {}): Status={:?} Subject={:?}",
            f("CaseNumber"),
            f("Device__c"),
            f("Status"),
            f("Subject")
        );
    }
}

/// The demo's stand-in for the broker's consumers: hands every reading and case to the DB
/// connector, prints each case and hands it to the Salesforce upserts, prints the PushTopic
/// events (on `events_exchange`). Returns the subjects of the cases raised.
async fn consume(
    mut rx: mpsc::Receiver<Delivery>,
    to_db: Option<(mpsc::Sender<Incoming>, mpsc::Sender<Incoming>)>,
    salesforce: Option<std::sync::Arc<crate::connectors::salesforce::direct::DirectSink>>,
    events_exchange: String,
) -> Vec<String> {
    let mut subjects = Vec::new();
    while let Some(d) = rx.recv().await {
        if d.exchange == events_exchange {
            pushtopic::print_event(&d.exchange, &d.routing_key, &d.payload);
            continue;
        }
        let is_case = d.routing_key.starts_with("case.");
        if let Some((readings, cases)) = &to_db {
            let incoming = Incoming {
                body: d.payload.clone(),
                message_id: Some(d.message_id.clone()),
                exchange: d.exchange.clone(),
                routing_key: d.routing_key.clone(),
            };
            let _ = if is_case { cases } else { readings }.send(incoming).await;
        }
        if !is_case {
            continue;
        }
        let Ok(case) = serde_json::from_slice::<CaseEvent>(&d.payload) else {
            continue;
        };
        let fields = case
            .case
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        match case.action {
            CaseAction::Raise => {
                println!(
                    "  CASE raised  -> {} (event {}): {fields}",
                    d.routing_key,
                    short(&case.event_id)
                );
                subjects.push(case.case.get("Subject").cloned().unwrap_or_default());
            }
            CaseAction::Clear => {
                println!(
                    "  CASE cleared -> {} (event {}): {fields}",
                    d.routing_key,
                    short(&case.event_id)
                )
            }
        }
        if let Some(sink) = &salesforce {
            match sink.deliver(&d.routing_key, &d.payload).await {
                Ok(Some(crate::connectors::salesforce::client::Outcome::Rejected(e))) => {
                    println!("  SALESFORCE refused event {}: {e}", short(&case.event_id))
                }
                Ok(_) => {}
                Err(e) => println!("  SALESFORCE failed for event {}: {e}", short(&case.event_id)),
            }
        }
    }
    subjects
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Setup(format!("no free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Setup(e.to_string()))
}

/// Starts rumqttd on its own threads, listening on loopback only.
fn start_broker(port: u16) -> Result<(), Error> {
    let toml_text = format!(
        r#"
        id = 0
        [router]
        id = 0
        max_connections = 64
        max_outgoing_packet_count = 200
        max_segment_size = 10485760
        max_segment_count = 10
        [v4.1]
        name = "demo"
        listen = "127.0.0.1:{port}"
        next_connection_delay_ms = 1
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = 65536
        max_inflight_count = 200
        dynamic_filters = true
        "#
    );
    let config: rumqttd::Config =
        toml::from_str(&toml_text).map_err(|e| Error::Setup(format!("embedded broker config: {e}")))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| Error::Setup(format!("cannot start the embedded broker: {e}")))?;
    // Wait until it accepts connections.
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::Setup(format!(
        "the embedded broker did not listen on 127.0.0.1:{port}"
    )))
}

/// The example site's devices over MQTT, as `edgecase-sim mqtt --scenario
/// examples/sim/site.toml` runs them, until the demo stops.
async fn mqtt_devices(port: u16, site: Scenario, stop: Stop) {
    let target = edgecase_sim::mqtt::MqttTarget {
        host: "127.0.0.1".into(),
        port,
        client_id: format!("demo-devices-{}", std::process::id()),
        topic: "sensors/{device}/{sensor}".into(),
        qos: 1,
        bare: false,
    };
    let seed = site.seed.unwrap_or(1);
    let report = match Report::new(None) {
        Ok(r) => r,
        Err(_) => return,
    };
    let fleet = Fleet::new(&site.device_specs(), seed);
    let injector = Injector::new(site.bad_input.clone(), seed);
    if let Err(e) = edgecase_sim::mqtt::run(&target, fleet, &Plan::default(), injector, &report, &stop).await {
        tracing::warn!(error = %e, "demo MQTT devices stopped");
    }
}

/// A serial line: a tank level sensor sending JSON lines (with a firmware debug line at
/// 12 s), or a pump controller speaking the binary protocol (two damaged frames, NACKed and
/// retransmitted).
fn serial_devices(pty: &Pty, framing: Framing, stop: &Stop) {
    let sensor = |name: &str, unit: &str, pattern: Pattern| SensorSpec {
        name: name.into(),
        unit: Some(unit.into()),
        pattern,
        defects: vec![],
    };
    let once = |kind, secs| BadInputSpec {
        kind,
        probability: 0.0,
        at: Some(Duration::from_secs(secs)),
        device: None,
    };
    let (device, bad) = match framing {
        Framing::JsonLines => (
            DeviceSpec {
                id: "tank-5".into(),
                interval: Duration::from_secs(1),
                sensors: vec![sensor(
                    "level",
                    "%",
                    Pattern::Sine {
                        mean: 60.0,
                        amplitude: 10.0,
                        period: Duration::from_secs(70),
                        noise: 0.2,
                    },
                )],
                defects: vec![],
            },
            vec![once(BadInputKind::MalformedJson, 12)],
        ),
        Framing::Binary => (
            DeviceSpec {
                id: "pump-6".into(),
                interval: Duration::from_secs(1),
                sensors: vec![
                    sensor(
                        "flow",
                        "m3/h",
                        Pattern::RandomWalk {
                            start: 12.0,
                            step: 0.3,
                            min: 8.0,
                            max: 16.0,
                        },
                    ),
                    sensor(
                        "pressure",
                        "bar",
                        Pattern::Sine {
                            mean: 3.0,
                            amplitude: 0.2,
                            period: Duration::from_secs(30),
                            noise: 0.02,
                        },
                    ),
                ],
                defects: vec![],
            },
            vec![once(BadInputKind::Crc, 10), once(BadInputKind::Crc, 40)],
        ),
    };
    let Ok(link) = Link::pty(pty) else { return };
    let Ok(report) = Report::new(None) else { return };
    let opts = SerialOptions {
        framing,
        drain: Duration::ZERO,
        ..SerialOptions::default()
    };
    let fleet = Fleet::new(&[device], 5);
    if let Err(e) = edgecase_sim::serial::run(
        link,
        fleet,
        &Plan::default(),
        Injector::new(bad, 5),
        &opts,
        &report,
        stop,
    ) {
        tracing::warn!(error = %e, "demo serial device stopped");
    }
}
