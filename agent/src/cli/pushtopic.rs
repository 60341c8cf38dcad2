//! `edgecase connector pushtopic --config FILE`: the Salesforce PushTopic source, configured
//! with the seed's flat JSON property file; `... offsets get|patch|delete|status` talk to a
//! running source's offsets API (its `admin.listen`).

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use edgecase::config::Config;
use edgecase::connectors::pushtopic::{self, config::PushTopicConfig};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Debug, Args)]
#[command(
    after_help = "The JSON property file (the seed's names; see README, \"Salesforce PushTopic source\"):\n  \
{\"name\": \"cases-source\", \"salesforce.grant.type\": \"PASSWORD\", \"salesforce.instance\": \"https://login.salesforce.com\",\n   \
\"salesforce.username\": \"...\", \"salesforce.password\": \"...\", \"salesforce.password.token\": \"...\",\n   \
\"salesforce.consumer.key\": \"...\", \"salesforce.consumer.secret\": \"...\", \"salesforce.object\": \"Case\",\n   \
\"salesforce.push.topic.name\": \"CaseUpdates\", \"salesforce.initial.start\": \"latest\", \"output.data.format\": \"JSON\",\n   \
\"amqp.url\": \"amqp://guest:guest@127.0.0.1:5672/%2f\", \"amqp.exchange\": \"edgecase.salesforce\",\n   \
\"amqp.routing.key\": \"pushtopic.{topic}\", \"data.dir\": \"/var/lib/edgecase/pushtopic\", \"admin.listen\": \"127.0.0.1:9402\"}"
)]
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
