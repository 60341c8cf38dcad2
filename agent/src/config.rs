//! Configuration: a TOML or JSON file, overridden by `EDGECASE__SECTION__KEY` variables.
//!
//! Bad configuration must fail at start, never at 3 a.m. when a port first misbehaves, so
//! every section denies unknown keys and [`Config::validate`] reports *every* problem with
//! its key path, not just the first. Secrets are [`Secret`]s: their `Debug` and `Serialize`
//! print `***`, which is what `edgecase check` shows.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A value that must never be logged or printed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that hands it to a protocol library.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// The whole configuration, as resolved from file, environment and command line.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    /// Serial ports, one `[[serial]]` table each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub serial: Vec<SerialPortConfig>,
    pub buffer: BufferConfig,
    pub amqp: AmqpConfig,
    pub admin: AdminConfig,
    pub watchdog: WatchdogConfig,
    /// Defect rules, one `[[rules]]` table each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::rules::RuleConfig>,
    /// The Salesforce Case connector (`tenant` + `divisions`), run beside the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub salesforce: Option<crate::connectors::salesforce::config::SalesforceConfig>,
    /// Connectors run by `edgecase connector ...` (`[connector.db]`).
    #[serde(skip_serializing_if = "crate::connectors::ConnectorConfig::is_empty")]
    pub connector: crate::connectors::ConnectorConfig,
    /// The Salesforce PushTopic source, run beside the agent: the seed's property names as
    /// keys (`salesforce.object = "Case"` in TOML is the dotted name); checked when
    /// `edgecase run` starts it.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::connectors::pushtopic::config::serialize_redacted"
    )]
    pub pushtopic: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This gateway's identity: in every message, and in the MQTT client id. Default: the
    /// host name.
    pub id: String,
    /// Where the buffer and other state live. `--data-dir` overrides it. Default:
    /// `$STATE_DIRECTORY` (set by systemd) or `./data`.
    pub data_dir: Option<PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: default_gateway_id(),
            data_dir: None,
        }
    }
}

fn default_gateway_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "edgecase".to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `plain` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `edgecase=debug,lapin=warn`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Ingest from MQTT at all.
    pub enabled: bool,
    /// `mqtt://host:port` or `mqtts://host:port` (TLS, certificates verified).
    pub url: String,
    /// Stable client id: the broker keeps this session's subscriptions and unacknowledged
    /// messages while the agent is away. Default: `edgecase-{gateway.id}`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Read the password from this file instead (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates for mqtts; default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Topic filters, subscribed at QoS 1. The first `+` level is the device id, the second
    /// the sensor name, unless the payload names them.
    pub topics: Vec<String>,
    /// Larger payloads are dead-lettered (acknowledged, not redelivered).
    pub max_payload_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Messages received but not yet committed. Bounds memory; when full the agent stops
    /// reading from the broker (back-pressure).
    pub max_uncommitted: usize,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            topics: vec!["sensors/+/+".into()],
            max_payload_bytes: 64 * 1024,
            keep_alive: Duration::from_secs(30),
            max_uncommitted: 1000,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialFraming {
    /// One JSON reading per line, as over MQTT.
    #[default]
    JsonLines,
    /// The binary firmware protocol of `docs/serial-protocol.md`: COBS frames with a CRC,
    /// acknowledged after the commit.
    Binary,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    /// Device path, e.g. `/dev/ttyUSB0` or a stable `/dev/serial/by-id/...` link.
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    /// Device id for readings that do not name one.
    pub device_id: Option<String>,
    #[serde(default)]
    pub framing: SerialFraming,
    /// Longer lines are dead-lettered (`json-lines` framing; binary frames have the
    /// protocol's own limit).
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
    #[serde(default = "default_reopen_min", with = "humantime_serde")]
    pub reopen_min: Duration,
    #[serde(default = "default_reopen_max", with = "humantime_serde")]
    pub reopen_max: Duration,
}

fn default_baud() -> u32 {
    115_200
}
fn default_max_line() -> usize {
    4096
}
fn default_reopen_min() -> Duration {
    Duration::from_millis(200)
}
fn default_reopen_max() -> Duration {
    Duration::from_secs(10)
}

/// What to do when the buffer is at its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Refuse new readings: ingest stops acknowledging MQTT and stops reading serial ports,
    /// so the broker or device holds them. Loses nothing the agent acknowledged; the MQTT
    /// broker may drop what exceeds its own queue limits.
    #[default]
    Refuse,
    /// Delete the oldest buffered readings to make room. Loses old data, counted in
    /// `edgecase_buffer_dropped_total`.
    DropOldest,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferConfig {
    /// Cap on readings waiting to be published.
    pub max_readings: u64,
    /// Cap on their payload bytes.
    pub max_bytes: u64,
    pub overflow: OverflowPolicy,
    /// Most entries in one transaction. Commits group whatever is waiting, up to this.
    pub max_batch: usize,
    /// Dead letters kept; the oldest are deleted beyond this.
    pub max_dead_letters: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_readings: 1_000_000,
            max_bytes: 512 * 1024 * 1024,
            overflow: OverflowPolicy::Refuse,
            max_batch: 4096,
            max_dead_letters: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Publish to AMQP at all. Off, readings stay in the buffer (up to its cap).
    pub enabled: bool,
    /// `amqp://user:pass@host:port/vhost` or `amqps://...` (TLS, certificates verified).
    /// The password is redacted in `check` output.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: Secret,
    /// Topic exchange for readings, routing key `reading.{device_id}.{sensor}`.
    pub readings_exchange: String,
    /// Topic exchange for cases, routing key `case.{division}`.
    pub cases_exchange: String,
    /// Dead-letter exchange for consumers' queues.
    pub dead_letter_exchange: String,
    /// Alternate exchange and queue of both topic exchanges: messages no queue is bound
    /// for land here instead of vanishing.
    pub unrouted_exchange: String,
    pub unrouted_queue: String,
    /// Publishes awaiting the broker's confirm at once.
    pub max_in_flight: usize,
    /// Largest AMQP frame; the client keeps 64 frames of buffers, so this sets its memory.
    /// Bigger messages are split into several frames. A `frame_max` in the URL wins.
    pub frame_max_bytes: u32,
    /// A confirm not received within this is treated as a failed connection.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            enabled: true,
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            readings_exchange: "edgecase.readings".into(),
            cases_exchange: "edgecase.cases".into(),
            dead_letter_exchange: "edgecase.dlx".into(),
            unrouted_exchange: "edgecase.unrouted".into(),
            unrouted_queue: "edgecase.unrouted".into(),
            max_in_flight: 2048,
            frame_max_bytes: 16 * 1024,
            confirm_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/metrics` and `/healthz`.
    pub enabled: bool,
    /// Local address; keep it on loopback unless a firewall guards it.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
        }
    }
}

/// What the systemd watchdog checks before each keep-alive (see `watchdog`). Without
/// `WatchdogSec=` in the unit the checks still run and a failure is logged.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// A stage loop (MQTT ingest, a serial port, the publisher) silent this long is stuck.
    /// Waits on a broker, a port or a backoff do not count as silence.
    #[serde(with = "humantime_serde")]
    pub stage_timeout: Duration,
    /// With messages in the buffer and the publisher connected, this much connected time
    /// without one message leaving the buffer means the publisher is stuck. Time
    /// disconnected (a broker outage) is not counted.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            stage_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(120),
        }
    }
}

/// Configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: the file or the environment does not parse.
    #[error("{origin}: {message}")]
    Load { origin: String, message: String },
    /// Stop: values parse but make no sense; each line names its key.
    #[error("{origin}: invalid configuration:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { origin: String, problems: Vec<String> },
}

impl Config {
    /// Loads `file` (TOML or JSON by extension; none means defaults only) and the
    /// `EDGECASE__*` environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Config, Error> {
        Self::load_with_env(file, None)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, Error> {
        let origin = match file {
            Some(f) => f.display().to_string(),
            None => "built-in defaults".to_string(),
        };
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Load {
                    origin,
                    message: "file not found".into(),
                });
            }
            let format = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => config::FileFormat::Json,
                Some("toml") | None => config::FileFormat::Toml,
                Some(other) => {
                    return Err(Error::Load {
                        origin,
                        message: format!("unknown config file extension .{other}; use .toml or .json"),
                    });
                }
            };
            builder = builder.add_source(config::File::from(path).format(format).required(true));
        }
        Self::finish(builder, env, origin)
    }

    /// As [`Config::load`], from text already read (`json`: JSON, else TOML); `origin` names
    /// it in messages.
    pub fn load_str(
        origin: &str,
        text: &str,
        json: bool,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, Error> {
        let format = if json {
            config::FileFormat::Json
        } else {
            config::FileFormat::Toml
        };
        let builder = config::Config::builder().add_source(config::File::from_str(text, format));
        Self::finish(builder, env, origin.to_string())
    }

    /// Adds the environment, deserializes and validates.
    fn finish(
        mut builder: config::ConfigBuilder<config::builder::DefaultState>,
        env: Option<std::collections::HashMap<String, String>>,
        origin: String,
    ) -> Result<Config, Error> {
        let mut env_source = config::Environment::with_prefix("EDGECASE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("mqtt.topics");
        if let Some(vars) = env {
            env_source = env_source.source(Some(vars));
        }
        builder = builder.add_source(env_source);
        let raw = builder.build().map_err(|e| Error::Load {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        let config: Config = raw.try_deserialize().map_err(|e| Error::Load {
            origin: origin.clone(),
            message: explain(e),
        })?;
        config
            .validate()
            .map_err(|problems| Error::Invalid { origin, problems })?;
        Ok(config)
    }

    /// Every problem, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.gateway.id.trim().is_empty() {
            p.push("gateway.id: must not be empty".to_string());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(format!("log.level: {:?} is not a valid filter: {e}", self.log.level));
        }
        let m = &self.mqtt;
        if m.enabled {
            check_url(&mut p, "mqtt.url", &m.url, &["mqtt", "mqtts", "tcp", "ssl"]);
            if m.topics.is_empty() {
                p.push("mqtt.topics: at least one topic filter is needed when mqtt.enabled is true".into());
            }
            for (i, t) in m.topics.iter().enumerate() {
                if let Err(e) = check_topic_filter(t) {
                    p.push(format!("mqtt.topics[{i}]: {t:?} {e}"));
                }
            }
            if m.password.is_some() && m.password_file.is_some() {
                p.push("mqtt.password_file: set either mqtt.password or mqtt.password_file, not both".into());
            }
            for (key, file) in [("mqtt.password_file", &m.password_file), ("mqtt.ca_file", &m.ca_file)] {
                if let Some(f) = file.as_ref().filter(|f| !f.is_file()) {
                    p.push(format!("{key}: {} is not a readable file", f.display()));
                }
            }
            check_positive(&mut p, "mqtt.max_payload_bytes", m.max_payload_bytes as u64);
            check_positive(&mut p, "mqtt.max_uncommitted", m.max_uncommitted as u64);
            if m.keep_alive < Duration::from_secs(1) {
                p.push("mqtt.keep_alive: must be at least 1s".into());
            }
            check_backoff(&mut p, "mqtt", m.reconnect_min, m.reconnect_max);
        }
        for (i, s) in self.serial.iter().enumerate() {
            if s.path.as_os_str().is_empty() {
                p.push(format!("serial[{i}].path: must not be empty"));
            }
            check_positive(&mut p, &format!("serial[{i}].baud_rate"), u64::from(s.baud_rate));
            check_positive(&mut p, &format!("serial[{i}].max_line_bytes"), s.max_line_bytes as u64);
            check_backoff(&mut p, &format!("serial[{i}]"), s.reopen_min, s.reopen_max);
            if let Some(j) = self.serial[..i].iter().position(|o| o.path == s.path) {
                p.push(format!(
                    "serial[{i}].path: {} is already used by serial[{j}]",
                    s.path.display()
                ));
            }
        }
        let b = &self.buffer;
        check_positive(&mut p, "buffer.max_readings", b.max_readings);
        check_positive(&mut p, "buffer.max_bytes", b.max_bytes);
        check_positive(&mut p, "buffer.max_batch", b.max_batch as u64);
        // A reading bigger than the whole buffer would be refused for ever and stall its input.
        let largest_input = self
            .serial
            .iter()
            .map(|s| s.max_line_bytes)
            .chain([m.max_payload_bytes])
            .max()
            .unwrap_or(0);
        if b.max_bytes < largest_input as u64 * 4 {
            p.push(format!(
                "buffer.max_bytes: {} is too small for inputs of up to {largest_input} bytes (mqtt.max_payload_bytes, serial max_line_bytes); allow at least {}",
                b.max_bytes,
                largest_input as u64 * 4
            ));
        }
        let a = &self.amqp;
        if a.enabled {
            check_url(&mut p, "amqp.url", a.url.expose(), &["amqp", "amqps"]);
            for (key, name) in [
                ("amqp.readings_exchange", &a.readings_exchange),
                ("amqp.cases_exchange", &a.cases_exchange),
                ("amqp.dead_letter_exchange", &a.dead_letter_exchange),
                ("amqp.unrouted_exchange", &a.unrouted_exchange),
                ("amqp.unrouted_queue", &a.unrouted_queue),
            ] {
                if name.is_empty() || name.len() > 255 {
                    p.push(format!("{key}: must be 1 to 255 characters"));
                } else if name.starts_with("amq.") {
                    p.push(format!("{key}: {name:?} uses the reserved prefix amq."));
                }
            }
            check_positive(&mut p, "amqp.max_in_flight", a.max_in_flight as u64);
            if a.frame_max_bytes < 4096 {
                p.push("amqp.frame_max_bytes: must be at least 4096 (the AMQP minimum)".into());
            }
            check_backoff(&mut p, "amqp", a.reconnect_min, a.reconnect_max);
        }
        if let Err(problems) = crate::rules::RuleSet::new(&self.rules) {
            p.extend(problems);
        }
        if let Some(sf) = &self.salesforce
            && let Err(problems) = sf.resolve("salesforce", &self.amqp)
        {
            p.extend(problems);
        }
        if let Some(db) = &self.connector.db {
            db.validate("connector.db", &mut p);
        }
        let w = &self.watchdog;
        if w.stage_timeout < Duration::from_secs(10) {
            p.push("watchdog.stage_timeout: must be at least 10s (stage loops beat every 2s)".into());
        }
        if self.amqp.enabled && w.stall_timeout <= self.amqp.confirm_timeout {
            p.push(format!(
                "watchdog.stall_timeout: must be longer than amqp.confirm_timeout ({}), or a slow confirm restarts the agent",
                humantime::format_duration(self.amqp.confirm_timeout)
            ));
        }
        if self.admin.enabled && self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            p.push(format!(
                "admin.listen: {:?} is not an address such as 127.0.0.1:9464",
                self.admin.listen
            ));
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// The MQTT client id: configured, or derived from the gateway id.
    pub fn mqtt_client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgecase-{}", self.gateway.id))
    }

    /// Where state lives: `--data-dir`, then `gateway.data_dir`, then `$STATE_DIRECTORY`
    /// (systemd), then `./data`.
    pub fn data_dir(&self, cli: Option<&Path>) -> PathBuf {
        cli.map(Path::to_path_buf)
            .or_else(|| self.gateway.data_dir.clone())
            .or_else(|| {
                std::env::var_os("STATE_DIRECTORY")
                    .map(PathBuf::from)
                    .and_then(|p| std::env::split_paths(&p).next())
            })
            .unwrap_or_else(|| PathBuf::from("data"))
    }

    /// The resolved configuration as TOML, secrets replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

fn serialize_redacted_url<S: Serializer>(url: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose()))
}

/// `amqp://user:pass@host` → `amqp://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "***".to_string(),
    }
}

fn check_url(p: &mut Vec<String>, key: &str, url: &str, schemes: &[&str]) {
    match url::Url::parse(url) {
        Err(e) => p.push(format!("{key}: {:?} is not a URL ({e})", redact_url(url))),
        Ok(u) if !schemes.contains(&u.scheme()) => p.push(format!(
            "{key}: scheme {:?} is not supported; use {}",
            u.scheme(),
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
        Ok(u) if u.host_str().is_none_or(str::is_empty) => p.push(format!("{key}: {:?} has no host", redact_url(url))),
        Ok(_) => {}
    }
}

fn check_positive(p: &mut Vec<String>, key: &str, v: u64) {
    if v == 0 {
        p.push(format!("{key}: must be greater than 0"));
    }
}

fn check_backoff(p: &mut Vec<String>, section: &str, min: Duration, max: Duration) {
    if min.is_zero() {
        p.push(format!("{section}.reconnect_min: must be greater than 0"));
    }
    if max < min {
        p.push(format!(
            "{section}.reconnect_max: {} is less than reconnect_min {}",
            humantime::format_duration(max),
            humantime::format_duration(min)
        ));
    }
}

fn check_topic_filter(t: &str) -> Result<(), &'static str> {
    if t.is_empty() {
        return Err("is empty");
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("uses # other than as the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("uses + other than as a whole level");
        }
    }
    Ok(())
}

/// The `config` crate reports serde errors without always saying what to do; add the
/// hint for the most common one.
fn explain(e: config::ConfigError) -> String {
    // The config crate writes array keys as `serial[0]path`; print `serial[0].path`.
    let mut s = String::new();
    let mut prev = ' ';
    for c in e.to_string().chars() {
        if prev == ']' && (c.is_alphanumeric() || c == '_') {
            s.push('.');
        }
        s.push(c);
        prev = c;
    }
    if s.contains("unknown field") {
        format!("{s} (check the spelling; `edgecase check` without --config prints every key with its default)")
    } else if s.contains("enum SerialFraming") {
        format!("{s} (framing is \"json-lines\" or \"binary\")")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn write(ext: &str, body: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().expect("tempfile");
        f.write_all(body.as_bytes()).expect("write");
        f
    }

    fn load(ext: &str, body: &str) -> Result<Config, Error> {
        let f = write(ext, body);
        Config::load_with_env(Some(f.path()), Some(HashMap::new()))
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, Some(HashMap::new())).expect("defaults");
        assert_eq!(c.mqtt.topics, vec!["sensors/+/+"]);
        assert_eq!(c.amqp.readings_exchange, "edgecase.readings");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = load(".toml", "[mqtt]\nurll = \"mqtt://x\"\n").unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");
        assert!(err.contains(".toml"), "{err}");
    }

    #[test]
    fn bad_type_names_key() {
        let err = load(".toml", "[buffer]\nmax_readings = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("buffer.max_readings"), "{err}");
    }

    #[test]
    fn array_keys_are_dotted() {
        let err = load(".toml", "[[serial]]\nbaud_rate = 9600\n").unwrap_err().to_string();
        assert!(err.contains("serial[0].path"), "{err}");
    }

    #[test]
    fn every_problem_is_reported() {
        let err = load(
            ".toml",
            "[amqp]\nurl = \"http://x\"\nmax_in_flight = 0\n[mqtt]\ntopics = [\"a/b#\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("amqp.url: scheme \"http\" is not supported"), "{err}");
        assert!(err.contains("amqp.max_in_flight"), "{err}");
        assert!(err.contains("mqtt.topics[0]"), "{err}");
    }

    #[test]
    fn json_files_work_and_env_overrides() {
        let f = write(
            ".json",
            r#"{"mqtt": {"url": "mqtt://10.0.0.1:1883"}, "serial": [{"path": "/dev/ttyUSB0"}]}"#,
        );
        let env = HashMap::from([
            ("EDGECASE__MQTT__URL".to_string(), "mqtts://broker:8883".to_string()),
            ("EDGECASE__BUFFER__MAX_READINGS".to_string(), "42".to_string()),
        ]);
        let c = Config::load_with_env(Some(f.path()), Some(env)).expect("valid");
        assert_eq!(c.mqtt.url, "mqtts://broker:8883");
        assert_eq!(c.buffer.max_readings, 42);
        assert_eq!(c.serial[0].baud_rate, 115_200);
    }

    #[test]
    fn serial_framing_is_json_lines_or_binary() {
        let c = load(
            ".toml",
            "[[serial]]\npath = \"/dev/a\"\n[[serial]]\npath = \"/dev/b\"\nframing = \"binary\"\n",
        )
        .expect("valid");
        assert_eq!(c.serial[0].framing, SerialFraming::JsonLines);
        assert_eq!(c.serial[1].framing, SerialFraming::Binary);
        assert!(c.to_redacted_toml().contains("framing = \"binary\""));
        let err = load(".toml", "[[serial]]\npath = \"/dev/a\"\nframing = \"cobs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("binary") && err.contains("json-lines"), "{err}");
    }

    #[test]
    fn check_output_hides_secrets() {
        let c = load(
            ".toml",
            "[amqp]\nurl = \"amqp://bob:hunter2@h:5672/%2f\"\n[mqtt]\npassword = \"s3cret\"\n",
        )
        .expect("valid");
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("hunter2") && !shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://bob:***@h:5672/%2f"), "{shown}");
        assert_eq!(format!("{:?}", c.mqtt.password), "Some(***)");
    }
}
