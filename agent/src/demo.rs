//! `edgecase demo`: the whole data path on one machine with no external service.
//!
//! An embedded MQTT broker (rumqttd) and a pseudo-terminal stand in for the site; simulated
//! devices publish readings to them, some misbehaving on purpose (a boiler overheating, a
//! humidity sensor out of range, a stuck pressure sensor, a meter that goes silent, a
//! device sending garbage). The agent runs exactly as `edgecase run` would, with the rules
//! of `examples/gateway.toml`: ingest, SQLite buffer, rules, publisher. The publisher hands
//! messages to an in-process queue (or, with `--amqp`, to a real RabbitMQ). From the
//! in-process queue, the DB connector's writer stores every reading and case event in a
//! SQLite database (`--db`, named at the end), and the cases go on to a local Salesforce
//! emulator through the Salesforce connector's upserts (with `--amqp`, the connector itself
//! consumes RabbitMQ). Live counts while it runs, each Case as it appears in the emulator,
//! a summary at the end.
//!
//! This module is compiled only with the `demo` feature, which the gateway build leaves
//! out: the embedded broker is a large dependency that a gateway does not need.

use crate::agent::{Agent, Output};
use crate::config::{Config, SerialPortConfig};
use crate::connectors::db::write::Incoming;
use crate::metrics::Metrics;
use crate::publish::memory::Delivery;
use crate::rules::{CaseAction, CaseEvent};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The example gateway config: its rules are the demo's rules.
const EXAMPLE_CONFIG: &str = include_str!("../../examples/gateway.toml");

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
    pub pending_at_exit: u64,
    pub case_subjects: Vec<String>,
    /// The SQLite database the DB connector wrote, and its rows: readings, case events.
    pub database: Option<(PathBuf, u64, u64)>,
    /// The Cases in the Salesforce emulator at the end: number, status, subject.
    pub salesforce_cases: Vec<String>,
}

/// Runs the demo until Ctrl-C, SIGTERM or the duration, and returns what happened.
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> Result<Summary, Error> {
    let started = Instant::now();
    let broker_port = free_port()?;
    start_broker(broker_port)?;
    let pty =
        nix::pty::openpty(None, None).map_err(|e| Error::Setup(format!("cannot create a pseudo-terminal: {e}")))?;
    let pty_path = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pty.slave)))
        .map_err(|e| Error::Setup(format!("cannot find the pseudo-terminal's path: {e}")))?;

    let mut config: Config =
        toml::from_str(EXAMPLE_CONFIG).map_err(|e| Error::Setup(format!("examples/gateway.toml: {e}")))?;
    config.gateway.id = "demo-gateway".into();
    config.mqtt.url = format!("mqtt://127.0.0.1:{broker_port}");
    config.mqtt.client_id = Some(format!("edgecase-demo-{}", std::process::id()));
    config.serial = vec![SerialPortConfig {
        path: pty_path.clone(),
        baud_rate: 115_200,
        device_id: Some("tank-5".into()),
        framing: Default::default(),
        max_line_bytes: 4096,
        reopen_min: Duration::from_millis(200),
        reopen_max: Duration::from_secs(2),
    }];
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
    let printer = tokio::spawn(print_salesforce_changes(changes));
    println!(
        "edgecase demo: embedded MQTT broker on 127.0.0.1:{broker_port}, serial device on {}",
        pty_path.display()
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
    println!("edgecase demo: rules from examples/gateway.toml; some devices misbehave on purpose. Ctrl-C to stop.");

    let devices = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(mqtt_devices(broker_port, devices.clone()));
    tasks.spawn(serial_device(pty, devices.clone()));
    let to_db = writers.as_ref().map(|w| (w.readings.clone(), w.cases.clone()));
    let consumer = tokio::spawn(consume(deliveries_rx, to_db, direct));

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
    devices.cancel();
    while tasks.join_next().await.is_some() {}
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
        pending_at_exit: metrics.buffer_pending_readings.get().max(0) as u64,
        case_subjects: seen,
        database,
        salesforce_cases,
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(summary)
}

fn source(s: &str) -> crate::metrics::SourceLabel {
    crate::metrics::SourceLabel { source: s.to_string() }
}

fn count_cases(m: &Metrics, action: &str) -> u64 {
    // The family is small (one series per rule and action): sum the matching series.
    let text = m.encode();
    text.lines()
        .filter(|l| l.starts_with("edgecase_rules_cases_total{") && l.contains(&format!("action=\"{action}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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

/// Prints each Case as the emulator creates or updates it.
async fn print_salesforce_changes(
    mut changes: tokio::sync::broadcast::Receiver<salesforce_emulator::org::ChangeEvent>,
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
        println!(
            "  SALESFORCE Case {} {what} (device {}): Status={:?} Subject={:?}",
            f("CaseNumber"),
            f("Device__c"),
            f("Status"),
            f("Subject")
        );
    }
}

/// The demo's stand-in for the broker's consumers: hands every message to the DB
/// connector, prints each case and hands it to the Salesforce upserts. Returns the subjects
/// of the cases raised.
async fn consume(
    mut rx: mpsc::Receiver<Delivery>,
    to_db: Option<(mpsc::Sender<Incoming>, mpsc::Sender<Incoming>)>,
    salesforce: Option<std::sync::Arc<crate::connectors::salesforce::direct::DirectSink>>,
) -> Vec<String> {
    let mut subjects = Vec::new();
    while let Some(d) = rx.recv().await {
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

/// Simulated MQTT devices, two readings a second each, misbehaving on a schedule.
async fn mqtt_devices(port: u16, stop: CancellationToken) {
    let mut opts = MqttOptions::new(format!("demo-devices-{}", std::process::id()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let t = start.elapsed().as_secs_f64();
        seq += 1;
        let wave = (t / 7.0).sin();
        // boiler-1 overheats from 8 s to 40 s, then cools down (raise, then clear).
        let boiler = if (8.0..40.0).contains(&t) {
            78.0 + (t - 8.0).min(10.0)
        } else {
            66.0 + 2.0 * wave
        };
        // hvac-2's humidity leaves the 20-70 % range after 5 s (raised after 30 s out).
        let humidity = if t < 5.0 { 45.0 + 3.0 * wave } else { 85.0 + wave };
        // pump-3's pressure sensor freezes after 3 s (stuck: 20 identical readings).
        let pressure = if t < 3.0 { 2.5 + 0.1 * wave } else { 2.47 };
        let mut out = vec![
            (
                "boiler-1",
                "temp",
                serde_json::json!({"value": round(boiler), "unit": "C", "seq": seq}),
            ),
            (
                "hvac-2",
                "humidity",
                serde_json::json!({"value": round(humidity), "unit": "%", "seq": seq}),
            ),
            (
                "hvac-2",
                "temp",
                serde_json::json!({"value": round(21.0 + wave), "unit": "C", "seq": seq}),
            ),
            (
                "pump-3",
                "pressure",
                serde_json::json!({"value": pressure, "unit": "bar", "seq": seq}),
            ),
        ];
        // meter-4 reports for a second, then goes silent (raised a minute later).
        if t < 1.0 {
            out.push((
                "meter-4",
                "power",
                serde_json::json!({"value": round(3.2 + wave), "unit": "kW", "seq": seq}),
            ));
        }
        for (device, sensor, body) in out {
            let _ = client
                .publish(
                    format!("sensors/{device}/{sensor}"),
                    QoS::AtLeastOnce,
                    false,
                    body.to_string(),
                )
                .await;
        }
        // Every 15 s a device sends garbage: dead-lettered, never a crash.
        if seq.is_multiple_of(30) {
            let _ = client
                .publish("sensors/boiler-1/temp", QoS::AtLeastOnce, false, "{\"value\": \"hot\"}")
                .await;
        }
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    driver.abort();
}

/// A tank level sensor on a serial line (newline-delimited JSON), with one garbage line.
async fn serial_device(pty: nix::pty::OpenptyResult, stop: CancellationToken) {
    let Ok(master) = pty.master.try_clone() else { return };
    let mut master = std::fs::File::from(master);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        seq += 1;
        let level = 60.0 + 10.0 * (start.elapsed().as_secs_f64() / 11.0).sin();
        let line = if seq == 12 {
            "level=61.2 (a firmware debug line, not JSON)".to_string()
        } else {
            serde_json::json!({"sensor": "level", "value": round(level), "unit": "%", "seq": seq}).to_string()
        };
        // The pty buffer is small and the agent drains it; a write that fails means the
        // agent has closed the port (shutting down).
        if writeln!(master, "{line}").is_err() {
            break;
        }
    }
    drop(pty.slave);
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}
