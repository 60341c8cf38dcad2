//! `edgecase connector pushtopic --config FILE`: the Salesforce PushTopic source, configured
//! with the seed's flat JSON property file; `... offsets get|patch|delete|status` talk to a
//! running source's offsets API (its `admin.listen`).

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use edgecase::config::Config;
use edgecase::connectors::pushtopic::{self, config::PushTopicConfig};
use serde_json::{Value, json};
use std::path::PathBuf;

const AFTER_HELP: &str = r#"The JSON property file, with the seed's names (README, "Salesforce PushTopic source"):
{
  "name": "cases-source",
  "salesforce.grant.type": "PASSWORD",
  "salesforce.instance": "https://login.salesforce.com",
  "salesforce.username": "...",
  "salesforce.password": "...",
  "salesforce.password.token": "...",
  "salesforce.consumer.key": "...",
  "salesforce.consumer.secret": "...",
  "salesforce.object": "Case",
  "salesforce.push.topic.name": "CaseUpdates",
  "salesforce.initial.start": "latest",
  "output.data.format": "JSON",
  "amqp.url": "amqp://guest:guest@127.0.0.1:5672/%2f",
  "amqp.exchange": "edgecase.salesforce",
  "amqp.routing.key": "pushtopic.{topic}",
  "data.dir": "/var/lib/edgecase/pushtopic",
  "admin.listen": "127.0.0.1:9402"
}
output.data.format: JSON, JSON_SR (the schema embedded) or AVRO (an Avro container with its schema).
Offsets of a running source: ... --config FILE offsets get | status | delete | patch --replay-id N"#;

#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct PushTopicArgs {
    /// The connector's JSON property file (flat dotted names, as in the seed).
    #[arg(short = 'c', long = "config", value_name = "FILE.json")]
    pub config: PathBuf,
    /// Validate the file and exit.
    #[arg(long)]
    pub check: bool,
    #[command(subcommand)]
    pub command: Option<OffsetsCommand>,
}

#[derive(Debug, Subcommand)]
pub enum OffsetsCommand {
    /// Manage the running source's offset (the replay id it resumes from).
    #[command(subcommand)]
    Offsets(Offsets),
}

#[derive(Debug, Subcommand)]
pub enum Offsets {
    /// Print the stored replay id and when it was observed.
    Get(AdminArg),
    /// Request that the source resume after REPLAY_ID (applied asynchronously; see `status`).
    Patch {
        #[arg(long, value_name = "REPLAY_ID")]
        replay_id: i64,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Request that the source forget its offset and start per salesforce.initial.start.
    Delete(AdminArg),
    /// Print the status of the last request: PENDING, APPLIED or FAILED, with the offsets it replaced.
    Status(AdminArg),
}

#[derive(Debug, Args)]
pub struct AdminArg {
    /// The source's admin address (default: admin.listen of the file).
    #[arg(long, value_name = "HOST:PORT")]
    pub admin: Option<String>,
}

fn load(path: &std::path::Path) -> Result<PushTopicConfig> {
    PushTopicConfig::from_json_file(path).map_err(|problems| {
        anyhow!(
            "{}: invalid configuration:\n{}",
            path.display(),
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

pub async fn run(args: PushTopicArgs) -> Result<()> {
    let config = load(&args.config)?;
    if let Some(OffsetsCommand::Offsets(cmd)) = args.command {
        return offsets(&config, cmd).await;
    }
    if args.check {
        println!(
            "{}: OK (source {}, channel {})",
            args.config.display(),
            config.name,
            config.channel()
        );
        return Ok(());
    }
    super::init_logging(&Config::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        edgecase::agent::shutdown_signal().await;
        stop.cancel();
    });
    pushtopic::run(config, cancel)
        .await
        .with_context(|| format!("the PushTopic source of {} stopped", args.config.display()))
}

async fn offsets(config: &PushTopicConfig, cmd: Offsets) -> Result<()> {
    let admin = |a: &AdminArg| -> Result<String> {
        a.admin
            .clone()
            .or_else(|| config.admin_listen.clone())
            .ok_or_else(|| anyhow!("no admin address: set admin.listen in the file or pass --admin"))
    };
    edgecase::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let base = |addr: String| format!("http://{addr}/connectors/{}/offsets", config.name);
    let response = match &cmd {
        Offsets::Get(a) => http.get(base(admin(a)?)).send().await,
        Offsets::Status(a) => http.get(format!("{}/request/status", base(admin(a)?))).send().await,
        Offsets::Patch { replay_id, admin: a } => {
            http.post(format!("{}/request", base(admin(a)?)))
                .json(&json!({"type": "PATCH", "offsets": [{"partition": {}, "offset": {"replayId": replay_id}}]}))
                .send()
                .await
        }
        Offsets::Delete(a) => {
            http.post(format!("{}/request", base(admin(a)?)))
                .json(&json!({"type": "DELETE"}))
                .send()
                .await
        }
    }
    .context("cannot reach the source's admin address (is it running?)")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("HTTP {status}");
    }
    Ok(())
}

/// The `[pushtopic]` section under `edgecase run`: validated now, run in the background.
/// `data.dir` defaults to `{data_dir}/pushtopic`, `amqp.url` to the agent's `[amqp] url`.
pub fn start_section(
    section: &Value,
    config: &Config,
    data_dir: &std::path::Path,
) -> Result<(tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>)> {
    let mut props = edgecase::connectors::pushtopic::config::flatten(section);
    props
        .entry("data.dir")
        .or_insert_with(|| json!(data_dir.join("pushtopic").display().to_string()));
    props
        .entry("amqp.url")
        .or_insert_with(|| json!(config.amqp.url.expose()));
    let c = PushTopicConfig::from_properties(&props, "pushtopic.")
        .map_err(|p| anyhow!("invalid [pushtopic] section: {}", p.join("; ")))?;
    let shared = pushtopic::open(c).context("cannot open the PushTopic source's data directory")?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = pushtopic::serve(shared, stop).await {
            tracing::error!(error = %format!("{e:#}"), "the PushTopic source stopped");
        }
    });
    Ok((cancel, task))
}
