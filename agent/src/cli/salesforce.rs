//! `edgecase connector salesforce -i config.json`: the Salesforce Case connector on its own,
//! configured in the seed's JSON shape (`tenant` + `divisions`).

use anyhow::{Context, Result, anyhow};
use clap::Args;
use edgecase::config::{AmqpConfig, Config};
use edgecase::connectors::salesforce::{self, config::SalesforceConfig};
use edgecase::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
#[command(after_help = "The JSON config (see README, \"Salesforce Case connector\"):\n  \
{\"tenant\": {\"client_id\": \"...\", \"client_secret\": \"...\", \"login_url\": \"https://login.salesforce.com\",\n              \
\"amqp\": {\"url\": \"amqp://guest:guest@127.0.0.1:5672/%2f\"}},\n   \
\"divisions\": [{\"name\": \"facilities\", \"username\": \"...\", \"password\": \"...\", \"security_token\": \"...\",\n                  \
\"defaults\": {\"Origin\": \"Edgecase\"}, \"mapping\": {\"Device__c\": \"device_id\"}}]}")]
pub struct SalesforceArgs {
    /// The connector's JSON config: a `tenant` section and a `divisions` list.
    #[arg(short = 'i', long = "input", value_name = "CONFIG.json")]
    pub input: PathBuf,
    /// Serve /metrics and /healthz on this address (overrides tenant.admin_listen).
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Validate the config and log every division in, then exit (nothing is consumed).
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: SalesforceArgs) -> Result<()> {
    let path = args.input.display().to_string();
    let config = SalesforceConfig::from_json_file(&args.input).map_err(|e| anyhow!(e))?;
    let resolved = config.resolve("", &AmqpConfig::default()).map_err(|problems| {
        anyhow!(
            "{path}: invalid configuration:\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    super::init_logging(&Config::default());
    if args.check {
        salesforce::log_in(&resolved)
            .await
            .with_context(|| format!("{path}: login failed"))?;
        println!("{path}: OK, {} division(s) logged in", resolved.divisions.len());
        return Ok(());
    }
    let metrics = Arc::new(Metrics::new());
    let admin_cancel = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.admin.or_else(|| resolved.tenant.admin_listen.clone()) {
        let (bound, server) = edgecase::admin::serve(&addr, metrics.clone(), admin_cancel.clone()).await?;
        tokio::spawn(server);
        tracing::info!(admin = %bound, "serving /metrics and /healthz");
    }
    let connector = salesforce::start(resolved, metrics)
        .await
        .with_context(|| format!("cannot start the Salesforce connector of {path}"))?;
    edgecase::agent::shutdown_signal().await;
    connector.shutdown().await;
    admin_cancel.cancel();
    Ok(())
}
