//! `edgecase connector db ...`: the command line of the three operations. Kept here, beside
//! the connector, so the binary's command enum needs one variant for it.

use super::config::{Loaded, load};
use super::{DbConnector, Operation, Outcome};
use crate::config::Config;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The operations. Exit status: 0 success, 1 failure, 3 empty (no message or no row).
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Run the read query (database.query) and publish one message per row to
    /// broker.destination.exchange; with database.tracking_column only rows newer than the
    /// last run's. Empty (exit 3) if there were no rows.
    SelectAndSend {
        #[command(flatten)]
        common: CommonArgs,
        /// Run again this often (e.g. 30s, 5m) until Ctrl-C or SIGTERM [default:
        /// database.interval, else once].
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Option<Duration>,
    },
    /// Take one message from broker.source.queue, write its records in one transaction,
    /// then acknowledge it. Empty (exit 3) if the queue was empty; failure (exit 1) if the
    /// message was dead-lettered or the database stayed unavailable.
    GetAndWrite {
        #[command(flatten)]
        common: CommonArgs,
        /// How long to retry an unavailable database before returning the message to the queue.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        retry_for: Duration,
    },
    /// Consume broker.source.queue and write every message until Ctrl-C or SIGTERM,
    /// batching messages that wait into one transaction; acknowledged after the commit.
    SubscribeAndWrite {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// The connector's settings: a JSON or TOML file with database, broker and format
    /// sections, or a main config with [connector.db].
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
    /// Where incremental state is kept [default: gateway.data_dir, else $STATE_DIRECTORY,
    /// else ./data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DbCommand {
    fn common(&self) -> &CommonArgs {
        match self {
            DbCommand::SelectAndSend { common, .. }
            | DbCommand::GetAndWrite { common, .. }
            | DbCommand::SubscribeAndWrite { common } => common,
        }
    }

    fn operation(&self) -> Operation {
        match self {
            DbCommand::SelectAndSend { .. } => Operation::SelectAndSend,
            DbCommand::GetAndWrite { .. } => Operation::GetAndWrite,
            DbCommand::SubscribeAndWrite { .. } => Operation::SubscribeAndWrite,
        }
    }

    /// Loads the settings, calls `init_logging` with them, runs the operation. Ctrl-C or
    /// SIGTERM stops the long-running ones cleanly.
    pub async fn run(self, init_logging: impl FnOnce(&Config)) -> Outcome {
        let common = self.common();
        let Loaded { config, db, prefix } = match load(&common.config) {
            Ok(l) => l,
            Err(e) => return Outcome::Failure(e.to_string()),
        };
        // A missing exchange or queue is found with a passive declare, which closes its
        // probe channel with 404; lapin logs that at error level. The connector reports
        // real failures itself, so those lines are left out unless asked for.
        let mut log_config = config.clone();
        if !log_config.log.level.contains("lapin") {
            log_config.log.level.push_str(",lapin::channel=off");
        }
        init_logging(&log_config);
        if let Err(problems) = db.validate_for(self.operation(), &prefix) {
            return Outcome::Failure(format!(
                "{}: invalid configuration:\n{}",
                common.config.display(),
                problems
                    .iter()
                    .map(|p| format!("  - {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        let data_dir = config.data_dir(common.data_dir.as_deref());
        let interval = db.database.interval;
        let mut db = db;
        db.broker.agent_topology = Some(config.amqp.clone());
        let connector = DbConnector::new(db, &config.amqp.url, data_dir);
        let cancel = CancellationToken::new();
        let signal = cancel.clone();
        let watcher = tokio::spawn(async move {
            crate::agent::shutdown_signal().await;
            tracing::info!("stopping: finishing the transaction in progress");
            signal.cancel();
        });
        let outcome = match self {
            DbCommand::SelectAndSend { every, .. } => match every.or(interval) {
                Some(every) => connector.select_and_send_every(every, cancel).await,
                None => connector.select_and_send().await,
            },
            DbCommand::GetAndWrite { retry_for, .. } => connector.get_and_write(retry_for).await,
            DbCommand::SubscribeAndWrite { .. } => connector.subscribe_and_write(cancel).await,
        };
        watcher.abort();
        outcome
    }
}
