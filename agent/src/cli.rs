//! The command line: `run`, `check` and the operator's `buffer` commands.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use edgecase::agent::{Agent, shutdown_signal};
use edgecase::buffer::{Inspector, NewRecord, StoredDeadLetter};
use edgecase::config::{Config, LogFormat};
use edgecase::ingest::{Route, record};
use edgecase::reading::{Origin, Reading, format_ms, now_ms};
use std::path::{Path, PathBuf};

mod pushtopic;
mod salesforce;

/// Edge gateway agent: reads sensor readings from MQTT and serial ports, keeps each one in
/// a crash-safe SQLite buffer until RabbitMQ has confirmed it, and publishes them over AMQP.
#[derive(Debug, Parser)]
#[command(name = "edgecase", version, propagate_version = true, max_term_width = 100)]
#[command(
    after_help = "Start with `edgecase check --config examples/gateway.toml`, then `edgecase run` with the same file.\n\
Every setting can be overridden by an environment variable EDGECASE__SECTION__KEY, e.g. EDGECASE__AMQP__URL."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: ingest, buffer and publish until SIGTERM or Ctrl-C.
    Run(RunArgs),
    /// Validate a config file and print the resolved settings, secrets redacted.
    Check(ConfigArgs),
    /// Inspect the buffer, list dead letters, replay them.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Try the defect rules offline.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Run the whole pipeline on this machine with no external service: an embedded MQTT
    /// broker and a virtual serial port with simulated devices (some misbehaving), the
    /// buffer, the rules of examples/gateway.toml, and an in-process queue standing in for
    /// RabbitMQ. Live counts while it runs, a summary at the end; Ctrl-C stops it.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// Broker-side connectors: consume from RabbitMQ and write to Salesforce or a database,
    /// or read a database and publish.
    #[command(subcommand)]
    Connector(ConnectorCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConnectorCommand {
    /// Create (upsert) Salesforce Cases from the cases on RabbitMQ; `-i config.json` in the
    /// seed's shape (tenant + divisions).
    Salesforce(salesforce::SalesforceArgs),
    /// The SQL database connector (PostgreSQL, MySQL/MariaDB, SQLite; ODBC in builds with
    /// the `odbc` feature): select-and-send, get-and-write, subscribe-and-write.
    #[command(subcommand)]
    Db(edgecase::connectors::db::cli::DbCommand),
    /// Salesforce PushTopic events (Streaming API, with replay) to AMQP, in order, at least
    /// once, resumable; `--config FILE.json` in the seed's flat property format.
    Pushtopic(pushtopic::PushTopicArgs),
}

/// Ends the process with this status, after the command printed its own message.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Publish to this RabbitMQ (amqp://user:pass@host:port/vhost) instead of the in-process queue.
    #[arg(long, value_name = "URL")]
    pub amqp: Option<String>,
    /// Stop after this long, e.g. 90s or 5m [default: until Ctrl-C].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Keep the buffer in this directory [default: a temporary one, removed at the end].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds between live count lines.
    #[arg(long, default_value_t = 5)]
    pub report_every: u64,
    /// The SQLite database the DB connector stores readings and cases in (in-process queue
    /// only) [default: edgecase-demo-PID.sqlite in the temporary directory].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Replay readings through the config's [[rules]] and print the cases they would raise.
    ///
    /// The input has one reading per line, as JSON objects with `device_id`, `sensor`,
    /// `value` and preferably `ts` (RFC 3339 or Unix ms); lines without `ts` are taken one
    /// `--interval` apart. Nothing is published and no state is kept.
    Test {
        /// Config with the [[rules]] to try.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Readings, one JSON object per line (`-` for standard input).
        #[arg(short, long, value_name = "FILE")]
        input: PathBuf,
        /// Time between readings that carry no `ts`.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print each case as a JSON line (the payload published on the cases exchange).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML or JSON config file. Without it, built-in defaults (local Mosquitto and RabbitMQ).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Where the buffer lives [default: gateway.data_dir, else $STATE_DIRECTORY, else ./data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DataDirArg {
    /// The agent's data directory [default: $STATE_DIRECTORY, else ./data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Pending messages, age of the oldest, size on disk, dead letters.
    Stats {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List dead letters: when, from where, why, and the raw input.
    DeadLetters {
        #[command(flatten)]
        dir: DataDirArg,
        /// Only these ids.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines (raw bytes as hex) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Parse dead letters again and queue the ones that are now valid for publishing.
    /// Safe while the agent runs. Useful after raising a limit or fixing a topic mapping.
    Replay {
        #[command(flatten)]
        dir: DataDirArg,
        /// Config whose limits and exchange names apply [default: built-in defaults].
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Dead letters to replay.
        #[arg(long = "id", value_name = "ID", required_unless_present = "all")]
        ids: Vec<i64>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

impl Cli {
    /// Commands that only read local files and print (no socket, no agent): they may end
    /// quietly when their reader goes away, as `edgecase check | head` expects.
    pub fn only_prints(&self) -> bool {
        matches!(
            self.command,
            Command::Check(_) | Command::Buffer(_) | Command::Rules(RulesCommand::Test { .. })
        )
    }

    pub async fn execute(self) -> Result<()> {
        match self.command {
            Command::Run(args) => run(args).await,
            Command::Check(args) => check(args),
            Command::Buffer(cmd) => buffer(cmd),
            #[cfg(feature = "demo")]
            Command::Demo(args) => demo(args).await,
            Command::Connector(ConnectorCommand::Salesforce(args)) => salesforce::run(args).await,
            Command::Connector(ConnectorCommand::Db(cmd)) => connector_db(cmd).await,
            Command::Connector(ConnectorCommand::Pushtopic(args)) => pushtopic::run(args).await,
            Command::Rules(RulesCommand::Test {
                config,
                input,
                interval,
                json,
            }) => rules_test(&config, &input, interval, json),
        }
    }
}

fn load(path: Option<&Path>) -> Result<Config> {
    Ok(Config::load(path)?)
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // try_init also routes the `log` records of rumqttc and lapin into tracing.
    let _ = match config.log.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn run(args: RunArgs) -> Result<()> {
    let config = load(args.config.config.as_deref())?;
    init_logging(&config);
    let data_dir = config.data_dir(args.data_dir.as_deref());
    let agent = Agent::start(&config, data_dir.clone())
        .await
        .context("cannot start the agent")?;
    // The [salesforce] section runs the Salesforce connector in the same process, its
    // metrics on the same admin port.
    let salesforce = match &config.salesforce {
        Some(sf) => {
            let resolved = sf
                .resolve("salesforce", &config.amqp)
                .map_err(|p| anyhow::anyhow!("invalid [salesforce] section: {}", p.join("; ")))?;
            match edgecase::connectors::salesforce::start(resolved, agent.metrics.clone()).await {
                Ok(c) => Some(c),
                Err(e) => {
                    agent.shutdown().await;
                    return Err(e).context("cannot start the Salesforce connector");
                }
            }
        }
        None => None,
    };
    let pushtopic = match &config.pushtopic {
        Some(section) => match pushtopic::start_section(section, &config, &data_dir) {
            Ok(p) => Some(p),
            Err(e) => {
                agent.shutdown().await;
                return Err(e);
            }
        },
        None => None,
    };
    shutdown_signal().await;
    if let Some((cancel, task)) = pushtopic {
        cancel.cancel();
        let _ = task.await;
    }
    if let Some(c) = salesforce {
        c.shutdown().await;
    }
    agent.shutdown().await;
    Ok(())
}

#[cfg(feature = "demo")]
async fn demo(args: DemoArgs) -> Result<()> {
    use edgecase::demo::{DemoOptions, run};
    // The live counts are the demo's output; keep the log to warnings unless asked.
    let mut config = Config::default();
    config.log.level = "warn,rumqttd=off".into();
    init_logging(&config);
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    let opts = DemoOptions {
        amqp: args.amqp,
        duration: args.duration,
        data_dir: args.data_dir,
        report_every: std::time::Duration::from_secs(args.report_every.max(1)),
        db: args
            .db
            .unwrap_or_else(|| std::env::temp_dir().join(format!("edgecase-demo-{}.sqlite", std::process::id()))),
    };
    let s = run(opts, stop).await?;
    println!("edgecase demo: summary");
    println!("  readings in      {}", s.readings_in);
    println!(
        "  published        {} (readings and cases, each after the queue took it)",
        s.published
    );
    println!("  cases raised     {}", s.cases_raised);
    println!("  cases cleared    {}", s.cases_cleared);
    println!("  dead letters     {}", s.dead_letters);
    println!(
        "  binary frames    {} acknowledged, {} NACKed (damaged on the line, then retransmitted)",
        s.frames_acked, s.frames_nacked
    );
    println!("  left in buffer   {}", s.pending_at_exit);
    for subject in &s.case_subjects {
        println!("  case: {subject}");
    }
    if let Some((path, readings, cases)) = &s.database {
        println!(
            "  database         {} ({readings} readings, {cases} case events, written by the DB connector)",
            path.display()
        );
        println!(
            "                   sqlite3 {} 'SELECT device_id, sensor, value, ts FROM readings LIMIT 5; SELECT action, subject FROM cases'",
            path.display()
        );
    }
    println!("  cases in Salesforce {}", s.salesforce_cases.len());
    for c in &s.salesforce_cases {
        println!("  salesforce: {c}");
    }
    println!(
        "  case events back {} (PushTopic events on the broker, for {} Case changes in Salesforce)",
        s.case_events_back, s.case_changes
    );
    Ok(())
}

/// Prints the outcome (success and empty on stdout, failure on stderr) and exits with its
/// status: 0, 3 or 1.
async fn connector_db(cmd: edgecase::connectors::db::cli::DbCommand) -> Result<()> {
    use edgecase::connectors::db::Outcome;
    let outcome = cmd.run(init_logging).await;
    match &outcome {
        Outcome::Failure(_) => eprintln!("edgecase: {outcome}"),
        _ => println!("{outcome}"),
    }
    match outcome.exit_code() {
        0 => Ok(()),
        code => Err(Exit(code).into()),
    }
}

fn check(args: ConfigArgs) -> Result<()> {
    let config = load(args.config.as_deref())?;
    if let Some(section) = &config.pushtopic {
        let props = edgecase::connectors::pushtopic::config::flatten(section);
        edgecase::connectors::pushtopic::config::PushTopicConfig::from_properties(&props, "pushtopic.")
            .map_err(|p| anyhow::anyhow!("invalid [pushtopic] section:\n  - {}", p.join("\n  - ")))?;
    }
    let origin = args
        .config
        .as_deref()
        .map_or("built-in defaults".to_string(), |p| p.display().to_string());
    println!("# {origin}: OK (environment overrides applied; secrets shown as ***)");
    println!("# data directory: {}", config.data_dir(None).display());
    print!("{}", config.to_redacted_toml());
    Ok(())
}

fn data_dir(arg: &DataDirArg) -> PathBuf {
    Config::default().data_dir(arg.data_dir.as_deref())
}

fn buffer(cmd: BufferCommand) -> Result<()> {
    match cmd {
        BufferCommand::Stats { dir, json } => {
            let dir = data_dir(&dir);
            let stats = Inspector::open(&dir)?.stats()?;
            let oldest_age_s = stats.oldest_created_ms.map(|t| (now_ms() - t).max(0) as f64 / 1000.0);
            if json {
                let v = serde_json::json!({
                    "data_dir": dir,
                    "pending": stats.pending,
                    "pending_bytes": stats.pending_bytes,
                    "oldest_age_seconds": oldest_age_s,
                    "dead_letters": stats.dead_letters,
                    "file_bytes": stats.file_bytes,
                });
                println!("{v}");
            } else {
                println!("data directory   {}", dir.display());
                println!(
                    "pending          {} messages, {} bytes",
                    stats.pending, stats.pending_bytes
                );
                match (stats.oldest_created_ms, oldest_age_s) {
                    (Some(t), Some(age)) => {
                        println!("oldest pending   {} ({age:.1} s ago)", format_ms(t))
                    }
                    _ => println!("oldest pending   -"),
                }
                println!("dead letters     {}", stats.dead_letters);
                println!("size on disk     {} bytes", stats.file_bytes);
            }
            Ok(())
        }
        BufferCommand::DeadLetters { dir, ids, limit, json } => {
            let list = Inspector::open(&data_dir(&dir))?.dead_letters(&ids, limit)?;
            for d in &list {
                if json {
                    let v = serde_json::json!({
                        "id": d.id, "received": format_ms(d.received_ms), "source": d.source, "origin": d.origin,
                        "device_id": d.device_id, "sensor": d.sensor, "reason": d.reason,
                        "raw_hex": hex(&d.raw), "raw_bytes": d.raw.len(),
                    });
                    println!("{v}");
                } else {
                    println!("#{} {} {} {}", d.id, format_ms(d.received_ms), d.source, d.origin);
                    println!("    reason: {}", d.reason);
                    println!("    raw ({} bytes): {}", d.raw.len(), preview(&d.raw, 160));
                }
            }
            if !json {
                println!("{} dead letter(s) shown", list.len());
            }
            Ok(())
        }
        BufferCommand::Replay { dir, config, ids, all } => {
            let config = load(config.as_deref())?;
            let dir = data_dir(&dir);
            let mut inspector = Inspector::open(&dir)?;
            let selected = inspector.dead_letters(if all { &[] } else { &ids }, usize::MAX)?;
            if !all {
                for id in &ids {
                    if !selected.iter().any(|d| d.id == *id) {
                        bail!("no dead letter with id {id} in {}", dir.display());
                    }
                }
            }
            let route = Route {
                readings_exchange: config.amqp.readings_exchange.clone(),
            };
            let limit = config.mqtt.max_payload_bytes;
            let report = inspector.replay(&selected, |d| reparse(d, &config.gateway.id, limit, &route))?;
            for (id, why) in &report.still_failing {
                println!("#{id} still rejected: {why}");
            }
            println!(
                "replayed {} dead letter(s) into the buffer, {} still rejected",
                report.queued,
                report.still_failing.len()
            );
            Ok(())
        }
    }
}

fn rules_test(config_path: &Path, input: &Path, interval: std::time::Duration, json: bool) -> Result<()> {
    use edgecase::rules::{CaseAction, CaseEvent, Engine, RuleSet, RuleStates};
    use std::io::BufRead;
    let config = load(Some(config_path))?;
    if config.rules.is_empty() {
        bail!("{} has no [[rules]] to test", config_path.display());
    }
    let rules = RuleSet::new(&config.rules).map_err(|p| anyhow::anyhow!(p.join("; ")))?;
    let mut engine = Engine::new(rules, RuleStates::new(), &config.gateway.id);
    let reader: Box<dyn BufRead> = if input == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(input).with_context(|| format!("cannot read {}", input.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let (mut readings, mut raised, mut cleared, mut skipped) = (0u64, 0u64, 0u64, 0u64);
    let mut clock = now_ms();
    let mut print = |events: Vec<CaseEvent>| -> Result<()> {
        for e in events {
            match e.action {
                CaseAction::Raise => raised += 1,
                CaseAction::Clear => cleared += 1,
            }
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                let when = e.reading.as_ref().map_or(e.first_seen.as_str(), |r| r.ts.as_str());
                let action = if e.action == CaseAction::Raise {
                    "RAISE"
                } else {
                    "CLEAR"
                };
                println!(
                    "{when} {action} {} rule={} {}/{} event_id={}",
                    e.routing_key(),
                    e.rule,
                    e.device_id,
                    e.sensor,
                    e.event_id
                );
                for (field, value) in &e.case {
                    println!("    {field}: {value}");
                }
            }
        }
        Ok(())
    };
    let source = format!("rules-test:{}", input.display());
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let origin = Origin {
            device_id: None,
            sensor: None,
            source: &source,
            gateway_id: &config.gateway.id,
            received_ms: clock,
        };
        match Reading::parse(line.as_bytes(), &origin, usize::MAX) {
            Ok(reading) => {
                readings += 1;
                clock = reading.ts_ms.max(clock) + interval.as_millis() as i64;
                // Time passes up to this reading: silent devices are noticed first.
                print(engine.on_tick(reading.ts_ms).0)?;
                print(engine.on_reading(&reading, reading.ts_ms).0)?;
            }
            Err(e) => {
                skipped += 1;
                eprintln!("{}:{}: skipped: {e}", input.display(), n + 1);
            }
        }
    }
    eprintln!("{readings} readings, {raised} case(s) raised, {cleared} follow-up(s), {skipped} line(s) skipped");
    Ok(())
}

fn reparse(d: &StoredDeadLetter, gateway_id: &str, limit: usize, route: &Route) -> Result<NewRecord, String> {
    let source = format!("{}:{}", d.source, d.origin);
    let origin = Origin {
        device_id: d.device_id.as_deref(),
        sensor: d.sensor.as_deref(),
        source: &source,
        gateway_id,
        received_ms: d.received_ms,
    };
    Reading::parse(&d.raw, &origin, limit)
        .map(|r| record(&r, route))
        .map_err(|e| e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Printable preview: text as text, other bytes escaped, cut at `max` characters.
fn preview(bytes: &[u8], max: usize) -> String {
    let escaped: String = bytes.escape_ascii().to_string();
    if escaped.chars().count() > max {
        format!("{}... (cut)", escaped.chars().take(max).collect::<String>())
    } else {
        escaped
    }
}
