//! `edgecase-sim salesforce`: a local Salesforce org (the `salesforce-emulator` crate) for
//! trying the Salesforce connector without a real org.

use anyhow::{Context, Result, bail};
use clap::Args;
use salesforce_emulator::{Emulator, EmulatorConfig};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct SalesforceArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Connected app consumer key.
    #[arg(long, default_value = "edgecase-client-id")]
    client_id: String,
    /// Connected app consumer secret.
    #[arg(long, default_value = "edgecase-client-secret")]
    client_secret: String,
    /// PEM public key trusted for JWT bearer assertions [default: the test key in
    /// salesforce-emulator/testdata].
    #[arg(long, value_name = "FILE")]
    jwt_public_key: Option<std::path::PathBuf>,
    /// A user as USERNAME:PASSWORD:SECURITY_TOKEN; repeat for more [default:
    /// integration@edgecase.example:password:TOKEN].
    #[arg(long = "user", value_name = "USER:PASS:TOKEN")]
    users: Vec<String>,
    /// Unique external id fields on Case.
    #[arg(long = "external-id", default_value = "Edge_Event_Id__c")]
    external_ids: Vec<String>,
    /// Wait this long before answering each request, e.g. 50ms.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Sessions end this long after login (then 401 INVALID_SESSION_ID).
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// REST calls allowed before 403 REQUEST_LIMIT_EXCEEDED.
    #[arg(long, default_value_t = 1_000_000)]
    daily_api_limit: u64,
    /// Case fields every write must set (REQUIRED_FIELD_MISSING otherwise); repeatable.
    #[arg(long = "require", value_name = "FIELD")]
    required: Vec<String>,
    /// Serve https with the test certificate for 127.0.0.1 (its CA is
    /// salesforce-emulator/testdata/tls-test-ca.pem: the connector's tenant.ca_file).
    #[arg(long)]
    tls: bool,
}

pub fn run(args: &SalesforceArgs) -> Result<()> {
    let mut config = EmulatorConfig::default();
    let key = match &args.jwt_public_key {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => Some(salesforce_emulator::TEST_JWT_PUBLIC_KEY.to_string()),
    };
    config.apps = vec![(args.client_id.clone(), args.client_secret.clone(), key)];
    if !args.users.is_empty() {
        config.users = Vec::new();
        for u in &args.users {
            let mut parts = u.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(name), Some(pass), token) if !name.is_empty() => {
                    config
                        .users
                        .push((name.into(), pass.into(), token.unwrap_or("").into()))
                }
                _ => bail!("--user {u:?}: use USERNAME:PASSWORD:SECURITY_TOKEN"),
            }
        }
    }
    config.external_id_fields = args.external_ids.clone();
    config.settings.latency_ms = args.latency.as_millis() as u64;
    config.settings.token_ttl_ms = args.token_ttl.as_millis() as u64;
    config.settings.daily_api_limit = args.daily_api_limit;
    config.settings.required_case_fields = args.required.clone();
    if args.tls {
        config.tls = Some(salesforce_emulator::TlsIdentity::test());
    }
    let users: Vec<String> = config.users.iter().map(|u| u.0.clone()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let emulator = Emulator::start(config, std::net::SocketAddr::new(args.bind, args.port)).await?;
        println!("Salesforce emulator on {} (login URL and instance URL)", emulator.url());
        println!(
            "  client id {:?}, users {:?}, external id fields {:?}",
            args.client_id, users, args.external_ids
        );
        println!("  inspect: curl {}/__emulator/records/Case", emulator.url());
        println!("  Ctrl-C to stop");
        tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
        let stats = emulator.org.stats();
        println!(
            "Salesforce emulator: {} REST requests, {} token requests, {} cases",
            stats.rest_requests,
            stats.token_requests,
            emulator.cases().len()
        );
        Ok(())
    })
}
