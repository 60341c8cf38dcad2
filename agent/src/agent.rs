//! Wires the stages for `edgecase run` and owns the shutdown order.
//!
//! Shutdown (SIGTERM, Ctrl-C) goes input first, output last, each stage bounded in time:
//! 1. ingest stops reading; messages being committed finish and are acknowledged;
//! 2. the publisher stops loading, waits briefly for outstanding confirms and releases them;
//! 3. the buffer's writer commits what it has, checkpoints and closes.
//!
//! Under systemd (`Type=notify`), `READY=1` goes out once every stage has started and
//! `STOPPING=1` when shutdown begins; in between, [`crate::watchdog`] sends keep-alives
//! only while the pipeline makes progress.
//!
//! Nothing is lost at any step: what was not acknowledged upstream is redelivered by the
//! broker or device, and what was not confirmed downstream stays in the buffer.

use crate::admin;
use crate::buffer::{self, Buffer, RulesSetup};
use crate::config::Config;
use crate::ingest::mqtt::{self, MqttIngest};
use crate::ingest::serial::SerialIngest;
use crate::metrics::Metrics;
use crate::publish::amqp::AmqpPublisher;
use crate::publish::memory::MemoryPublisher;
use crate::rules::{RuleKind, RuleSet};
use crate::watchdog::{self, Notice, Notifier};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long each shutdown step may take before the agent moves on.
const STAGE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Buffer(#[from] buffer::Error),
    #[error(transparent)]
    Mqtt(#[from] mqtt::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    /// Stop: the rules do not validate (normally caught when the config loads).
    #[error("rules: {0}")]
    Rules(String),
}

/// Where buffered messages go.
#[derive(Debug)]
pub enum Output {
    /// RabbitMQ, as `[amqp]` configures it.
    Amqp,
    /// An in-process queue standing in for the broker (`edgecase demo`).
    Memory(tokio::sync::mpsc::Sender<crate::publish::memory::Delivery>),
}

/// A running agent.
pub struct Agent {
    pub metrics: Arc<Metrics>,
    pub admin_addr: Option<std::net::SocketAddr>,
    ingest: TaskTracker,
    ingest_cancel: CancellationToken,
    output: TaskTracker,
    output_cancel: CancellationToken,
    admin_cancel: CancellationToken,
    watchdog_cancel: CancellationToken,
    notifier: Notifier,
    writer: buffer::WriterThread,
    buffer: Buffer,
}

impl Agent {
    /// Opens the buffer and starts every stage the config enables, publishing to AMQP.
    pub async fn start(config: &Config, data_dir: PathBuf) -> Result<Agent, Error> {
        Self::start_with(config, data_dir, Output::Amqp).await
    }

    /// As [`Agent::start`], with the output chosen.
    pub async fn start_with(config: &Config, data_dir: PathBuf, output_to: Output) -> Result<Agent, Error> {
        let metrics = Arc::new(Metrics::new());
        let rules = RuleSet::new(&config.rules).map_err(|problems| Error::Rules(problems.join("; ")))?;
        let silent_rules = rules.rules().iter().any(|r| r.config.kind == RuleKind::Silent);
        let setup = RulesSetup {
            rules,
            cases_exchange: config.amqp.cases_exchange.clone(),
            gateway_id: config.gateway.id.clone(),
        };
        let (buffer, writer) = Buffer::open_with_rules(&data_dir, &config.buffer, metrics.clone(), Some(setup))?;
        let admin_cancel = CancellationToken::new();
        let mut admin_addr = None;
        if config.admin.enabled {
            let (addr, server) = admin::serve(&config.admin.listen, metrics.clone(), admin_cancel.clone()).await?;
            tokio::spawn(server);
            admin_addr = Some(addr);
        }
        let output = TaskTracker::new();
        let output_cancel = CancellationToken::new();
        match output_to {
            Output::Memory(deliveries) => {
                let publisher = MemoryPublisher::new(buffer.clone(), deliveries, metrics.clone());
                output.spawn(publisher.run(output_cancel.clone()));
            }
            Output::Amqp if config.amqp.enabled => {
                let publisher =
                    AmqpPublisher::new(config.amqp.clone(), &config.gateway.id, buffer.clone(), metrics.clone());
                output.spawn(publisher.run(output_cancel.clone()));
            }
            Output::Amqp => tracing::warn!("amqp.enabled is false: readings stay in the buffer"),
        }
        let ingest = TaskTracker::new();
        let ingest_cancel = CancellationToken::new();
        if config.mqtt.enabled {
            let mqtt = MqttIngest::new(config, buffer.clone(), metrics.clone())?;
            ingest.spawn(mqtt.run(ingest_cancel.clone()));
        }
        for port in &config.serial {
            let serial = SerialIngest::new(config, port.clone(), buffer.clone(), metrics.clone());
            ingest.spawn(serial.run(ingest_cancel.clone()));
        }
        tokio::spawn(report_progress(metrics.clone(), admin_cancel.clone()));
        if silent_rules {
            // Silent devices are noticed on a clock, not on arrival. The ticks stop with
            // ingest: a stopping agent must not raise cases for devices it stopped hearing.
            let (buffer, cancel) = (buffer.clone(), ingest_cancel.clone());
            ingest.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = every.tick() => {}
                    }
                    if buffer.tick(crate::reading::now_ms()).await.is_err() {
                        return;
                    }
                }
            });
        }
        let notifier = Notifier::systemd();
        let watchdog_cancel = CancellationToken::new();
        tokio::spawn(watchdog::run(
            metrics.clone(),
            config.watchdog.clone(),
            notifier.clone(),
            watchdog_cancel.clone(),
        ));
        notifier.send(&[Notice::Ready]);
        tracing::info!(
            gateway = %config.gateway.id,
            data_dir = %data_dir.display(),
            pending = buffer.pending(),
            admin = ?admin_addr,
            mqtt = config.mqtt.enabled,
            serial_ports = config.serial.len(),
            "edgecase agent started"
        );
        Ok(Agent {
            metrics,
            admin_addr,
            ingest,
            ingest_cancel,
            output,
            output_cancel,
            admin_cancel,
            watchdog_cancel,
            notifier,
            writer,
            buffer,
        })
    }

    /// Stops in order: ingest, publisher, buffer.
    pub async fn shutdown(self) {
        tracing::info!("stopping: ingest first, then the publisher, then the buffer");
        // Shutdown is bounded by STAGE_GRACE per step (well inside the unit's
        // TimeoutStopSec), so keep-alives end here.
        self.notifier
            .send(&[Notice::Stopping, Notice::Status("stopping".into())]);
        self.watchdog_cancel.cancel();
        self.ingest_cancel.cancel();
        self.ingest.close();
        if tokio::time::timeout(STAGE_GRACE, self.ingest.wait()).await.is_err() {
            tracing::warn!("ingest did not stop in time; unacknowledged input will be redelivered");
        }
        self.output_cancel.cancel();
        self.output.close();
        if tokio::time::timeout(STAGE_GRACE, self.output.wait()).await.is_err() {
            tracing::warn!("publisher did not stop in time; unconfirmed messages stay buffered");
        }
        self.admin_cancel.cancel();
        let pending = self.buffer.pending();
        drop(self.buffer);
        // The writer exits once every handle is gone; tasks that outlived their grace still
        // hold one, so do not wait for ever.
        let join = tokio::task::spawn_blocking(move || self.writer.join());
        if tokio::time::timeout(STAGE_GRACE, join).await.is_err() {
            tracing::warn!("buffer writer still busy at exit; the WAL is replayed at next start");
        }
        tracing::info!(pending, "edgecase stopped");
    }
}

/// Logs the counts once a minute while they change, so a journal shows the agent working
/// without anyone scraping `/metrics`.
async fn report_progress(metrics: Arc<Metrics>, cancel: CancellationToken) {
    let mut last = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        let m = &metrics;
        let now = (
            m.buffer_committed.get(),
            m.publish_confirmed.get(),
            m.buffer_pending_readings.get(),
            m.buffer_dead_letters.get(),
        );
        if last != Some(now) {
            tracing::info!(
                committed = now.0,
                published = now.1,
                pending = now.2,
                dead_letters = now.3,
                mqtt_connected = m.mqtt_connected.get() == 1,
                amqp_connected = m.amqp_connected.get() == 1,
                "progress"
            );
            last = Some(now);
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
