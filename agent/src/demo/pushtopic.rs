//! The demo's closed loop: the Cases that the Case connector writes into the Salesforce
//! emulator come back as PushTopic events, through the PushTopic source, onto the broker
//! (the in-process queue, or RabbitMQ with `--amqp`).
//!
//! ```text
//! device defect ─> rule ─> case event ─> Case connector ─> emulator Case
//!                                                             │ PushTopic
//!            broker <─ PushTopic source <─ Streaming API <────┘
//! ```

use super::Error;
use crate::connectors::pushtopic::{self, config::PushTopicConfig, source::Destination};
use crate::publish::memory::Delivery;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The PushTopic the demo creates: every Case created or updated.
pub const TOPIC: &str = "EdgecaseDemoCases";

/// The running source and, with `--amqp`, the consumer that reads its events back.
pub struct CaseEvents {
    pub shared: Arc<pushtopic::source::Shared>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Events read back from the broker.
    pub seen: Arc<AtomicU64>,
}

/// The source's settings in the seed's property names, for the emulator's default app and
/// user.
fn config(emulator_url: &str, data_dir: &Path, amqp: Option<&str>) -> Result<PushTopicConfig, Error> {
    let mut props = serde_json::json!({
        "name": "demo-case-events",
        "salesforce.grant.type": "PASSWORD",
        "salesforce.instance": emulator_url,
        "salesforce.username": "integration@edgecase.example",
        "salesforce.password": "password",
        "salesforce.password.token": "TOKEN",
        "salesforce.consumer.key": "edgecase-client-id",
        "salesforce.consumer.secret": "edgecase-client-secret",
        "salesforce.object": "Case",
        "salesforce.object.fields": "Id, CaseNumber, Subject, Status, Priority, Device__c",
        "salesforce.push.topic.name": TOPIC,
        "salesforce.initial.start": "all",
        "output.data.format": "JSON",
        "data.dir": data_dir.join("pushtopic").display().to_string(),
    });
    if let Some(url) = amqp {
        props["amqp.url"] = serde_json::Value::String(url.to_string());
    }
    let flat = pushtopic::config::flatten(&props);
    PushTopicConfig::from_properties(&flat, "").map_err(|p| Error::Setup(format!("PushTopic source: {}", p.join("; "))))
}

impl CaseEvents {
    /// Starts the source: into `queue` (the in-process broker), or into RabbitMQ at `amqp`
    /// with a private queue bound to its routing key, whose events are printed.
    pub async fn start(
        emulator_url: &str,
        data_dir: &Path,
        amqp: Option<&str>,
        queue: Option<mpsc::Sender<Delivery>>,
    ) -> Result<CaseEvents, Error> {
        let cfg = config(emulator_url, data_dir, amqp)?;
        let seen = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let destination = match (amqp, queue) {
            (Some(url), _) => {
                // Bound before the first event: the source publishes as mandatory.
                let consumer = amqp_consumer(url, &cfg).await?;
                tasks.push(tokio::spawn(read_back(consumer, seen.clone(), cancel.clone())));
                Destination::Amqp
            }
            (None, Some(q)) => Destination::InProcess(q),
            (None, None) => return Err(Error::Setup("PushTopic source: no destination".into())),
        };
        let shared = pushtopic::open_to(cfg, destination).map_err(|e| Error::Setup(e.to_string()))?;
        let (s, c) = (shared.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = pushtopic::source::run(s, c).await {
                println!("  PUSHTOPIC source stopped: {e}");
            }
        }));
        Ok(CaseEvents {
            shared,
            cancel,
            tasks,
            seen,
        })
    }

    /// Waits until the source has subscribed (so that no Case precedes it), up to `limit`.
    pub async fn subscribed(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.shared.stats.connected.load(Ordering::Relaxed) == 1 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Gives the Case changes (`expected`, counted as they happen) `grace` to come back,
    /// then stops; returns the events that came back: handed to the in-process queue, or
    /// read back from RabbitMQ.
    pub async fn finish(self, expected: &AtomicU64, grace: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + grace;
        let delivered = || self.shared.stats.events_published.load(Ordering::Relaxed);
        while tokio::time::Instant::now() < deadline && delivered() < expected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // With RabbitMQ, the consumer reads back what was confirmed.
        while tokio::time::Instant::now() < deadline
            && !matches!(self.shared.destination, Destination::InProcess(_))
            && self.seen.load(Ordering::Relaxed) < delivered()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.cancel.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        match self.shared.destination {
            Destination::InProcess(_) => delivered(),
            Destination::Amqp => self.seen.load(Ordering::Relaxed),
        }
    }
}

/// A private queue (deleted with its connection) bound to the source's routing key.
async fn amqp_consumer(url: &str, cfg: &PushTopicConfig) -> Result<(lapin::Connection, lapin::Consumer), Error> {
    let fail = |what: &str, e: lapin::Error| Error::Setup(format!("PushTopic read-back {what}: {e}"));
    crate::tls::install_crypto_provider();
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| fail("connect", e))?;
    let ch = conn.create_channel().await.map_err(|e| fail("channel", e))?;
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail(&format!("exchange {}", cfg.exchange), e))?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| fail("queue", e))?;
    ch.queue_bind(
        q.name().clone(),
        cfg.exchange.as_str().into(),
        cfg.routing_key().as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| fail("bind", e))?;
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "edgecase-demo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| fail("consume", e))?;
    Ok((conn, consumer))
}

async fn read_back(
    (conn, mut consumer): (lapin::Connection, lapin::Consumer),
    seen: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = cancel.cancelled() => break,
        };
        let Some(Ok(d)) = delivery else { break };
        print_event(d.exchange.as_str(), d.routing_key.as_str(), &d.data);
        seen.fetch_add(1, Ordering::Relaxed);
        let _ = d.ack(BasicAckOptions::default()).await;
    }
    let _ = conn.close(200, "demo done".into()).await;
}

/// One line per event, as a consumer of the broker receives it.
pub fn print_event(exchange: &str, routing_key: &str, payload: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        println!("  PUSHTOPIC event that is not JSON on {exchange} {routing_key}");
        return;
    };
    let f = |k: &str| v[k].as_str().unwrap_or("").to_string();
    println!(
        "  PUSHTOPIC /topic/{TOPIC} replay {} -> {exchange} {routing_key}: Case {} {} (device {}) Status={:?}",
        v["_ReplayId"],
        f("CaseNumber"),
        f("_EventType"),
        f("Device__c"),
        f("Status"),
    );
}
