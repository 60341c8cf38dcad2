//! What every end-to-end test needs: unique names, the agent as a child process, its admin
//! port, an AMQP collector, an MQTT publisher and pseudo-terminals for serial ports.
//!
//! Tests run in parallel against the one Mosquitto and the one RabbitMQ of this machine, so
//! every name a test touches (gateway id, MQTT client id and topics, exchanges, queues)
//! carries the test's name and the process id. Every wait is bounded and fails with the
//! agent's log, so a red test says what the agent did.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const MQTT_HOST: &str = "127.0.0.1";
pub const MQTT_PORT: u16 = 1883;
/// The device name of subscription probes; never counted as test data.
pub const PROBE_DEVICE: &str = "probe";

/// RabbitMQ is shared by every test in this binary. Tests that use it hold a read guard for
/// their whole run; the outage test, which stops it, holds the write guard. A tokio lock
/// works across the separate runtimes of `#[tokio::test]` functions.
pub static RABBITMQ: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Polls `probe` every 50 ms until it returns `Some`, or gives up after `timeout`. The probe
/// itself must be quick or bounded.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Awaits `fut`, panicking if it takes longer than `timeout`: for calls into client libraries
/// that have no timeout of their own.
pub async fn bounded<T>(what: &str, timeout: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {timeout:?}"),
    }
}

/// A free TCP port on loopback (bound, read and released; another process could take it in
/// between, which is unlikely enough for tests).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Every name one test uses, unique across tests and test runs.
#[derive(Debug, Clone)]
pub struct Names {
    pub base: String,
    pub gateway_id: String,
    pub client_id: String,
    /// First topic level; the agent subscribes to `{topic_root}/+/+`.
    pub topic_root: String,
    pub readings_exchange: String,
    pub cases_exchange: String,
    pub dead_letter_exchange: String,
    pub unrouted_exchange: String,
    pub unrouted_queue: String,
    /// The test's own durable queue, bound to the readings exchange with `reading.#`.
    pub queue: String,
}

impl Names {
    pub fn new(test: &str) -> Names {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let base = format!("t-{test}-{}-{n}", std::process::id());
        Names {
            gateway_id: format!("{base}-gw"),
            client_id: format!("{base}-agent"),
            topic_root: base.clone(),
            readings_exchange: format!("{base}-readings"),
            cases_exchange: format!("{base}-cases"),
            dead_letter_exchange: format!("{base}-dlx"),
            unrouted_exchange: format!("{base}-unrouted"),
            unrouted_queue: format!("{base}-unrouted"),
            queue: format!("{base}-queue"),
            base,
        }
    }

    pub fn topic(&self, device: &str, sensor: &str) -> String {
        format!("{}/{device}/{sensor}", self.topic_root)
    }
}

/// One test's world: names, a temporary directory with the config, data dir and log, and
/// the admin address. Dropping it deletes the test's exchanges and queues and the agent's
/// MQTT session; drop the [`Agent`] first (declare it after the bed).
pub struct TestBed {
    pub names: Names,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    /// The agent's configuration, written as TOML by [`TestBed::write_config`].
    pub config: Value,
}

impl TestBed {
    pub fn new(test: &str) -> TestBed {
        let names = Names::new(test);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", names.base))
            .tempdir()
            .expect("tempdir");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let config = base_config(&names, admin);
        TestBed {
            names,
            dir,
            admin,
            config,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("edgecase.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn write_config(&self) -> PathBuf {
        let path = self.config_path();
        write_toml(&path, &self.config);
        path
    }

    /// Writes the config and starts `edgecase run` on it.
    pub fn start_agent(&self) -> Agent {
        self.write_config();
        Agent::start(self)
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let names = self.names.clone();
        // Its own thread and runtime: this may run while a test's runtime is unwinding.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), delete_amqp_objects(&names)).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), forget_mqtt_session(&names.client_id)).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A valid agent configuration using the test's names; tests change what they need.
pub fn base_config(names: &Names, admin: SocketAddr) -> Value {
    json!({
        "gateway": { "id": names.gateway_id },
        // E2E_AGENT_LOG_LEVEL (e.g. `info,edgecase=debug`) when investigating a failure.
        "log": { "level": std::env::var("E2E_AGENT_LOG_LEVEL").unwrap_or_else(|_| "info".into()) },
        "mqtt": {
            "url": format!("mqtt://{MQTT_HOST}:{MQTT_PORT}"),
            "client_id": names.client_id,
            "topics": [format!("{}/+/+", names.topic_root)],
            "reconnect_min": "100ms",
            "reconnect_max": "1s",
        },
        "amqp": {
            "url": AMQP_URL,
            "readings_exchange": names.readings_exchange,
            "cases_exchange": names.cases_exchange,
            "dead_letter_exchange": names.dead_letter_exchange,
            "unrouted_exchange": names.unrouted_exchange,
            "unrouted_queue": names.unrouted_queue,
            "reconnect_min": "100ms",
            "reconnect_max": "1s",
        },
        "admin": { "listen": admin.to_string() },
    })
}

pub fn write_toml(path: &Path, config: &Value) {
    let text = toml::to_string(config).expect("config renders as TOML");
    std::fs::write(path, text).expect("write config");
}

/// The command that runs `edgecase`: the binary Cargo built, or `EDGECASE_BIN` when set: a
/// program and its leading arguments, split on spaces, e.g. `qemu-aarch64-static
/// target/cross/aarch64-unknown-linux-gnu/release/edgecase` to test the ARM build.
/// (qemu-user runs the guest in its own process: signals and `kill -9` reach the agent.)
pub fn edgecase_command() -> Command {
    match std::env::var("EDGECASE_BIN") {
        Ok(spec) if !spec.trim().is_empty() => {
            let mut words = spec.split_whitespace();
            let mut cmd = Command::new(words.next().unwrap_or_default());
            cmd.args(words);
            cmd
        }
        _ => Command::new(env!("CARGO_BIN_EXE_edgecase")),
    }
}

/// Runs the `edgecase` binary with `args` to completion, killed after `timeout`.
pub async fn run_cli(args: &[&str], timeout: Duration) -> Result<std::process::Output, String> {
    let mut cmd = tokio::process::Command::from(edgecase_command());
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    clean_env(cmd.as_std_mut());
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("cannot run edgecase {args:?}: {e}")),
        Err(_) => Err(format!("edgecase {args:?} did not finish within {timeout:?}")),
    }
}

/// The agent must see only the test's config: no `EDGECASE__*` overrides, `RUST_LOG` or
/// systemd variables from the developer's shell.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let systemd = k == "NOTIFY_SOCKET" || k.starts_with("WATCHDOG_") || k == "STATE_DIRECTORY";
        if k.starts_with("EDGECASE") || k == "RUST_LOG" || systemd {
            cmd.env_remove(key);
        }
    }
}

/// `edgecase run` as a child process, its stderr appended to the bed's log file.
pub struct Agent {
    child: Option<Child>,
    config_path: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    pub admin: SocketAddr,
    pub starts: u32,
    /// Extra environment for every start (e.g. systemd's NOTIFY_SOCKET).
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn start(bed: &TestBed) -> Agent {
        Self::start_with_env(bed, &[])
    }

    /// As [`Agent::start`], with these variables added to the agent's environment.
    pub fn start_with_env(bed: &TestBed, env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent {
            child: None,
            config_path: bed.config_path(),
            data_dir: bed.data_dir(),
            log_path: bed.log_path(),
            admin: bed.admin,
            starts: 0,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open agent log");
        writeln!(log, "===== edgecase run, start #{} =====", self.starts).expect("write agent log");
        let mut cmd = edgecase_command();
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        clean_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().expect("spawn edgecase"));
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        let child = self.child.as_ref().expect("agent is running");
        nix::unistd::Pid::from_raw(child.id() as i32)
    }

    /// Whether the process is still alive (reaps it if not).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    /// SIGKILL, then reap: no shutdown code runs.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM; see [`Agent::wait_exit`].
    pub fn sigterm(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).expect("send SIGTERM to the agent");
    }

    /// Waits up to `within` for the process to exit; returns its status and how long it took.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<(ExitStatus, Duration), String> {
        let started = Instant::now();
        let child = self.child.as_mut().expect("agent is running");
        let status = wait_for(within, || {
            let s = child.try_wait().ok().flatten();
            async move { s }
        })
        .await;
        match status {
            Some(s) => {
                self.child = None;
                Ok((s, started.elapsed()))
            }
            None => Err(format!("agent still running after {within:?}")),
        }
    }

    /// SIGTERM and wait for the exit; fails the test unless it exits with status 0 in time.
    pub async fn terminate(&mut self, within: Duration) -> Duration {
        self.sigterm();
        match self.wait_exit(within).await {
            Ok((status, took)) if status.success() => took,
            Ok((status, _)) => self.fail(format!("exit after SIGTERM: {status}, want status 0")),
            Err(e) => self.fail(format!("SIGTERM: {e}")),
        }
    }

    /// Starts the agent again with the same config and data directory.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// The agent's whole log (every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// Panics with `msg` and the end of the agent's log (the last 80 lines, or
    /// `E2E_LOG_LINES`).
    #[track_caller]
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let keep = std::env::var("E2E_LOG_LINES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(80);
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(keep)..].join("\n");
        panic!(
            "{msg}\n----- agent log ({}, last {keep} lines) -----\n{tail}",
            self.log_path.display()
        )
    }

    pub async fn metrics(&self) -> Result<Metrics, String> {
        http_get(self.admin, "/metrics").await.map(|body| Metrics::parse(&body))
    }

    pub async fn healthz(&self) -> Result<Value, String> {
        let body = http_get(self.admin, "/healthz").await?;
        serde_json::from_str(&body).map_err(|e| format!("/healthz is not JSON ({e}): {body}"))
    }

    /// Scrapes `/metrics` until `ok` holds; panics with the last scrape and the log.
    #[track_caller]
    pub fn wait_metrics<'a>(
        &'a self,
        what: &'a str,
        timeout: Duration,
        ok: impl Fn(&Metrics) -> bool + 'a,
    ) -> impl Future<Output = Metrics> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let last = Mutex::new(String::from("(no scrape succeeded)"));
            let got = wait_for(timeout, || async {
                match self.metrics().await {
                    Ok(m) if ok(&m) => Some(m),
                    Ok(m) => {
                        *last.lock().unwrap() = m.summary();
                        None
                    }
                    Err(e) => {
                        *last.lock().unwrap() = e;
                        None
                    }
                }
            })
            .await;
            match got {
                Some(m) => m,
                None => {
                    let last = last.into_inner().unwrap();
                    self.fail(format!(
                        "{caller}: timed out after {timeout:?} waiting for {what}; last /metrics:\n{last}"
                    ))
                }
            }
        }
    }

    /// Waits until the agent is connected to RabbitMQ (so it has declared the readings
    /// exchange) and, if `mqtt` is set, to Mosquitto.
    pub async fn wait_connected(&self, mqtt: bool) -> Metrics {
        self.wait_metrics("the agent to connect", Duration::from_secs(20), |m| {
            m.value("edgecase_amqp_connected") == 1.0 && (!mqtt || m.value("edgecase_mqtt_connected") == 1.0)
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain HTTP/1.0 GET (the response is then close-delimited, never chunked).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("malformed response: {text}"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!("GET {path}: {head}"));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .unwrap_or_else(|_| Err(format!("GET http://{addr}{path} timed out")))
}

/// One scrape of `/metrics`, keyed by the series as printed (`name{labels}`).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub series: HashMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_string(), value.parse().ok()?))
            })
            .collect();
        Metrics { series }
    }

    pub fn get(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }

    /// The series' value, 0 when the agent has not created it yet.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }

    /// Sum of every series of metric `name` whose labels contain `label_filter` (e.g.
    /// `source="mqtt"`; empty for all).
    pub fn sum(&self, name: &str, label_filter: &str) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| (k.as_str() == name || k.starts_with(&format!("{name}{{"))) && k.contains(label_filter))
            .map(|(_, v)| v)
            .sum()
    }

    /// The agent's own series, without histogram buckets, sorted: for failure messages.
    pub fn summary(&self) -> String {
        let mut lines: Vec<String> = self
            .series
            .iter()
            .filter(|(k, _)| k.starts_with("edgecase_") && !k.contains("_bucket"))
            .map(|(k, v)| format!("  {k} {v}"))
            .collect();
        lines.sort();
        lines.join("\n")
    }
}

pub async fn amqp_connect(timeout: Duration) -> Result<Connection, String> {
    edgecase::tls::install_crypto_provider();
    let mut last = String::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(AMQP_URL, ConnectionProperties::default()),
        );
        match attempt.await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "connect timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("cannot connect to RabbitMQ within {timeout:?}: {last}"))
}

/// Declares the test's durable queue and binds it to the readings exchange with
/// `reading.#`, so every reading is routed. The exchange must exist: wait for
/// [`Agent::wait_connected`] first.
pub async fn bind_readings_queue(names: &Names) {
    const T: Duration = Duration::from_secs(10);
    let conn = amqp_connect(T).await.expect("RabbitMQ");
    let ch = bounded("AMQP channel", T, conn.create_channel())
        .await
        .expect("channel");
    let declare = ch.queue_declare(
        names.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    );
    bounded("queue.declare", T, declare).await.expect("declare test queue");
    let bind = ch.queue_bind(
        names.queue.as_str().into(),
        names.readings_exchange.as_str().into(),
        "reading.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    bounded("queue.bind", T, bind)
        .await
        .expect("bind test queue to the readings exchange");
    let _ = tokio::time::timeout(T, conn.close(200, "bound".into())).await;
}

/// Deletes what the test and the agent declared. Missing objects are not an error.
async fn delete_amqp_objects(names: &Names) {
    let Ok(conn) = amqp_connect(Duration::from_secs(3)).await else {
        return;
    };
    for queue in [&names.queue, &names.unrouted_queue] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for exchange in [
        &names.readings_exchange,
        &names.cases_exchange,
        &names.dead_letter_exchange,
        &names.unrouted_exchange,
    ] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// Ends the agent's persistent MQTT session so the broker stops keeping it.
async fn forget_mqtt_session(client_id: &str) {
    let mut opts = MqttOptions::new(client_id, MQTT_HOST, MQTT_PORT);
    opts.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// A message as a consumer of the readings exchange sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub device_header: Option<String>,
    pub body: Value,
    /// The body as received (for formats other than JSON).
    pub raw: Vec<u8>,
}

impl Received {
    pub fn device(&self) -> &str {
        self.body["device_id"].as_str().unwrap_or("")
    }
    pub fn sensor(&self) -> &str {
        self.body["sensor"].as_str().unwrap_or("")
    }
    pub fn seq(&self) -> Option<u64> {
        self.body["seq"].as_u64()
    }
}

#[derive(Default)]
struct Collected {
    all: Vec<Received>,
    /// (device, seq) of every reading with a seq, probes excluded.
    distinct: HashSet<(String, u64)>,
    /// Why consuming stopped, if it did.
    ended: Option<String>,
}

/// Consumes the test's queue in the background and keeps every message.
pub struct Collector {
    conn: Connection,
    state: Arc<Mutex<Collected>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(names: &Names) -> Collector {
        const T: Duration = Duration::from_secs(10);
        let conn = amqp_connect(Duration::from_secs(30)).await.expect("RabbitMQ");
        let ch = bounded("AMQP channel", T, conn.create_channel())
            .await
            .expect("channel");
        let consume = ch.basic_consume(
            names.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        );
        let mut consumer = bounded("basic.consume", T, consume)
            .await
            .expect("consume the test queue");
        let state = Arc::new(Mutex::new(Collected::default()));
        let sink = state.clone();
        let task = tokio::spawn(async move {
            let ended = loop {
                let d = match consumer.next().await {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break e.to_string(),
                    None => break "consumer cancelled".to_string(),
                };
                let p = &d.properties;
                let device_header = p.headers().as_ref().and_then(|h| match h.inner().get("x-device-id") {
                    Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                    Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
                    _ => None,
                });
                let received = Received {
                    routing_key: d.routing_key.as_str().to_string(),
                    message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
                    content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
                    delivery_mode: *p.delivery_mode(),
                    device_header,
                    body: serde_json::from_slice(&d.data).unwrap_or_else(
                        |e| json!({ "unparsable": e.to_string(), "raw": String::from_utf8_lossy(&d.data) }),
                    ),
                    raw: d.data.clone(),
                };
                let mut s = sink.lock().unwrap();
                if let Some(seq) = received.seq()
                    && received.device() != PROBE_DEVICE
                {
                    s.distinct.insert((received.device().to_string(), seq));
                }
                s.all.push(received);
            };
            sink.lock().unwrap().ended = Some(ended);
        });
        Collector { conn, state, task }
    }

    /// Every message so far, probes included.
    pub fn all(&self) -> Vec<Received> {
        self.state.lock().unwrap().all.clone()
    }

    /// Messages so far, probes excluded.
    pub fn readings(&self) -> Vec<Received> {
        self.all().into_iter().filter(|r| r.device() != PROBE_DEVICE).collect()
    }

    /// Distinct (device, seq) pairs so far, probes excluded.
    pub fn distinct(&self) -> u64 {
        self.state.lock().unwrap().distinct.len() as u64
    }

    /// A cheap handle on [`Collector::distinct`] for publishers that keep a bounded lead.
    pub fn progress(&self) -> Progress {
        let state = self.state.clone();
        Arc::new(move || state.lock().unwrap().distinct.len() as u64)
    }

    /// Waits until `n` distinct readings arrived; `Err` says how many did.
    pub async fn wait_distinct(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let done = wait_for(timeout, || {
            let d = self.distinct();
            async move { (d >= n).then_some(()) }
        })
        .await;
        done.ok_or_else(|| {
            let s = self.state.lock().unwrap();
            let ended = s
                .ended
                .as_deref()
                .map(|e| format!(" (the test's consumer stopped: {e})"))
                .unwrap_or_default();
            format!(
                "{} of {n} distinct readings arrived within {timeout:?}{ended}",
                s.distinct.len()
            )
        })
    }

    pub async fn close(self) {
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.close(200, "done".into())).await;
    }
}

/// How many readings have arrived: lets a publisher keep the broker's backlog bounded.
pub type Progress = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Counts per (device, seq) of the readings received, probes excluded.
pub fn arrivals(readings: &[Received]) -> HashMap<(String, u64), usize> {
    let mut counts = HashMap::new();
    for r in readings {
        if let Some(seq) = r.seq() {
            *counts.entry((r.device().to_string(), seq)).or_insert(0) += 1;
        }
    }
    counts
}

/// An independent MQTT client publishing at QoS 1, counting the broker's PUBACKs.
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    sent: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(names: &Names) -> Publisher {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let mut opts = MqttOptions::new(format!("{}-pub-{n}", names.base), MQTT_HOST, MQTT_PORT);
        opts.set_clean_session(true)
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 200);
        let acked = Arc::new(AtomicU64::new(0));
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("test publisher: MQTT error: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), connected_rx)
            .await
            .expect("test publisher connects to Mosquitto within 10 s")
            .expect("test publisher event loop");
        Publisher {
            client,
            acked,
            sent: 0,
            task,
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        let publish = self.client.publish(topic, QoS::AtLeastOnce, false, payload.into());
        bounded("MQTT publish (client queue full)", Duration::from_secs(30), publish)
            .await
            .expect("queue MQTT publish");
        self.sent += 1;
    }

    /// `{"value": seq / 2, "seq": seq}` on `{root}/{device}/{sensor}`.
    pub async fn reading(&mut self, names: &Names, device: &str, sensor: &str, seq: u64) {
        let payload = json!({ "value": seq as f64 / 2.0, "seq": seq }).to_string();
        self.publish(&names.topic(device, sensor), payload).await;
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Waits until the broker acknowledged everything sent.
    pub async fn wait_acked(&self, timeout: Duration) -> Result<(), String> {
        let done = wait_for(timeout, || {
            let a = self.acked.load(Ordering::Relaxed);
            async move { (a >= self.sent).then_some(()) }
        })
        .await;
        done.ok_or_else(|| {
            format!(
                "broker acknowledged {} of {} publishes",
                self.acked.load(Ordering::Relaxed),
                self.sent
            )
        })
    }

    pub async fn disconnect(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes probe readings until the agent has ingested one: proves its subscription is
/// in place (CONNACK comes before SUBACK, so "connected" alone does not).
pub async fn wait_subscribed(agent: &Agent, publisher: &mut Publisher, names: &Names) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seq = 0;
    while Instant::now() < deadline {
        publisher.reading(names, PROBE_DEVICE, PROBE_DEVICE, seq).await;
        seq += 1;
        let ingested = wait_for(Duration::from_millis(300), || async {
            let m = agent.metrics().await.ok()?;
            (m.value("edgecase_ingest_readings_total{source=\"mqtt\"}") >= 1.0).then_some(())
        })
        .await;
        if ingested.is_some() {
            return;
        }
    }
    agent.fail("the agent ingested none of the probe readings within 15 s (not subscribed?)")
}

/// The usual start of a readings test: the test's queue bound to the readings exchange, a
/// collector consuming it, and a publisher whose probe proved the agent is subscribed.
pub async fn subscribed_collector(agent: &Agent, names: &Names) -> (Collector, Publisher) {
    bind_readings_queue(names).await;
    let collector = Collector::start(names).await;
    let mut publisher = Publisher::connect(names).await;
    wait_subscribed(agent, &mut publisher, names).await;
    (collector, publisher)
}

/// What a background stream publishes: reading `i` goes to `identity(i)` with seq `i`.
pub struct StreamPlan {
    pub total: u64,
    /// Readings per second; `None` for as fast as the lead allows.
    pub per_second: Option<f64>,
    pub identity: fn(u64) -> (String, String),
    /// Publish no more than `lead` readings ahead of what `progress` reports arrived.
    pub lead: Option<(u64, Progress)>,
}

/// A publisher running in the background; see [`StreamPlan`].
pub struct Streaming {
    published: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<Publisher, String>>,
}

impl Streaming {
    pub async fn start(names: &Names, plan: StreamPlan) -> Streaming {
        let mut publisher = Publisher::connect(names).await;
        let published = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (names, count, token) = (names.clone(), published.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..plan.total {
                if token.is_cancelled() {
                    break;
                }
                if let Some(rate) = plan.per_second {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
                }
                if let Some((lead, progress)) = &plan.lead {
                    let ok = wait_for(Duration::from_secs(60), || {
                        let behind = i.saturating_sub(progress());
                        async move { (behind < *lead).then_some(()) }
                    })
                    .await;
                    if ok.is_none() {
                        return Err(format!("after {i} readings, none arrived for 60 s (lead {lead})"));
                    }
                }
                let (device, sensor) = (plan.identity)(i);
                publisher.reading(&names, &device, &sensor, i).await;
                count.store(i + 1, Ordering::Release);
            }
            Ok(publisher)
        });
        Streaming { published, stop, task }
    }

    /// Readings handed to the MQTT client so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Waits until at least `n` were published.
    pub async fn wait_published(&self, n: u64, timeout: Duration) -> Result<(), String> {
        wait_for(timeout, || {
            let p = self.published();
            async move { (p >= n).then_some(()) }
        })
        .await
        .ok_or_else(|| format!("only {} of {n} readings published within {timeout:?}", self.published()))
    }

    /// Stops early; readings already published stay published.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits for the stream to end and the broker to acknowledge every publish; returns how
    /// many were published.
    pub async fn finish(self, timeout: Duration) -> Result<u64, String> {
        let publisher = tokio::time::timeout(timeout, self.task)
            .await
            .map_err(|_| format!("stream not done within {timeout:?}"))?
            .map_err(|e| format!("stream task failed: {e}"))??;
        publisher.wait_acked(Duration::from_secs(10)).await?;
        let sent = publisher.sent();
        publisher.disconnect().await;
        Ok(sent)
    }
}

/// A pseudo-terminal standing in for a serial device: the agent opens the slave by path,
/// the test writes to the master.
pub struct Pty {
    master: File,
    /// Held so the slave stays valid while the agent reopens it.
    _slave: OwnedFd,
    pub path: PathBuf,
}

impl Pty {
    pub fn open() -> Pty {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        // Not `openpty`: its descriptors lack close-on-exec, so every agent any test spawns
        // meanwhile would inherit the master and a closed pty would never hang up.
        let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).expect("posix_openpt");
        nix::pty::grantpt(&master).expect("grantpt");
        nix::pty::unlockpt(&master).expect("unlockpt");
        let path = PathBuf::from(nix::pty::ptsname_r(&master).expect("ptsname"));
        // std opens with O_CLOEXEC.
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(&path)
            .expect("open pty slave");
        // Raw mode, so nothing is echoed back into the master (which nobody reads) and no
        // line editing applies, even before the agent opens the port.
        let mut t = nix::sys::termios::tcgetattr(&slave).expect("tcgetattr");
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t).expect("tcsetattr");
        Pty {
            master: File::from(OwnedFd::from(master)),
            _slave: OwnedFd::from(slave),
            path,
        }
    }

    /// Another handle on the master side: the device's end of the line.
    pub fn master(&self) -> File {
        self.master.try_clone().expect("duplicate the pty master")
    }

    /// Writes `lines`, each followed by `\n`, from a blocking thread (the pty's buffer is
    /// small; writes wait for the agent to read).
    pub async fn write_lines(&self, lines: Vec<String>) -> Result<(), String> {
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(l.as_bytes());
            bytes.push(b'\n');
        }
        let mut master = self.master.try_clone().map_err(|e| e.to_string())?;
        let write = tokio::task::spawn_blocking(move || master.write_all(&bytes).and_then(|()| master.flush()));
        match tokio::time::timeout(Duration::from_secs(30), write).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("write to pty master: {e}")),
            Ok(Err(e)) => Err(format!("writer thread: {e}")),
            Err(_) => Err("writing to the pty blocked for 30 s: the agent is not reading the port".into()),
        }
    }
}

/// `{"sensor":"temp","value":N,"seq":N}` for each N in `seqs`.
pub fn serial_lines(seqs: std::ops::Range<u64>) -> Vec<String> {
    seqs.map(|n| format!("{{\"sensor\":\"temp\",\"value\":{n},\"seq\":{n}}}"))
        .collect()
}

/// The readings exchange routing key the agent must use.
pub fn routing_key(device: &str, sensor: &str) -> String {
    format!("reading.{device}.{sensor}")
}

/// Readings `0..total` from [`four_devices`] at about 1,000/s, never more than 500 ahead of
/// what arrived: while the agent is down or reconnecting, the broker queues at most that
/// many for its session (its limit is 1000).
pub fn steady_four_devices(total: u64, collector: &Collector) -> StreamPlan {
    StreamPlan {
        total,
        per_second: Some(1000.0),
        identity: four_devices,
        lead: Some((500, collector.progress())),
    }
}

/// Reading `i` comes from `dev{i % 4}`'s `temp` sensor.
pub fn four_devices(i: u64) -> (String, String) {
    (format!("dev{}", i % 4), "temp".to_string())
}

/// The readings of `0..total` (from [`four_devices`]) that have not arrived.
pub fn missing(collector: &Collector, total: u64) -> Vec<u64> {
    let counts = arrivals(&collector.readings());
    (0..total)
        .filter(|i| !counts.contains_key(&(four_devices(*i).0, *i)))
        .collect()
}

/// How many readings arrived more than once, counting each extra copy.
pub fn duplicates(collector: &Collector) -> usize {
    arrivals(&collector.readings()).values().map(|n| n - 1).sum()
}

/// Waits until readings `0..total` (from [`four_devices`]) all arrived (failing with the missing ones), then until
/// the agent's buffer is empty.
pub async fn expect_all_arrived(agent: &Agent, collector: &Collector, total: u64, within: Duration) {
    if let Err(e) = collector.wait_distinct(total, within).await {
        let gone = missing(collector, total);
        agent.fail(format!(
            "{e}; {} missing, first: {:?}",
            gone.len(),
            &gone[..gone.len().min(20)]
        ));
    }
    let gone = missing(collector, total);
    assert!(gone.is_empty(), "lost: {gone:?}");
    agent
        .wait_metrics("the buffer to drain", Duration::from_secs(30), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
        })
        .await;
}
