//! get-and-write and subscribe-and-write: messages from the source queue into the database.
//!
//! Acknowledge after commit: a delivery is acknowledged only once the transaction holding
//! its records has committed, or once its dead letter has been confirmed by the broker. A
//! crash anywhere before that leaves it unacknowledged, so RabbitMQ delivers it again, and
//! the idempotency key turns the second write into an update of the first: every message
//! ends up in the table exactly once.
//!
//! Batching: subscribe-and-write takes whatever deliveries are already waiting (up to
//! `broker.batch_size`) into one transaction. Nothing waits for a batch to fill: a lone
//! message is written at once, and batches grow only when messages arrive faster than one
//! transaction each.

use super::Outcome;
use super::broker::{BrokerError, Session, dead_letter_properties};
use super::config::DbConnectorConfig;
use super::write::{Disposition, Incoming, Interrupted, Writer, WriterStats};
use crate::backoff::Backoff;
use crate::config::{Secret, redact_url};
use futures_util::{FutureExt, StreamExt};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn incoming(d: &Delivery) -> Incoming {
    Incoming {
        body: d.data.clone(),
        message_id: d.properties.message_id().as_ref().map(|s| s.as_str().to_string()),
        exchange: d.exchange.as_str().to_string(),
        routing_key: d.routing_key.as_str().to_string(),
    }
}

/// Gets one message, writes it, acknowledges it. Empty if the queue is empty; failure if
/// the message was dead-lettered or the database stayed down for `retry_for` (the message
/// then goes back to the queue).
pub async fn get_and_write(cfg: Arc<DbConnectorConfig>, amqp_url: &Secret, retry_for: Duration) -> Outcome {
    let deadline = Some(Instant::now() + retry_for);
    let never = CancellationToken::new();
    let mut writer = Writer::new(cfg.clone());
    if let Err(e) = writer.connect(&never, deadline).await {
        return Outcome::Failure(format!("cannot write to the database: {e}"));
    }
    let session = match Session::open(amqp_url, "edgecase db connector (get-and-write)").await {
        Ok(s) => s,
        Err(e) => {
            writer.close().await;
            return Outcome::Failure(e.to_string());
        }
    };
    let outcome = get_one(&cfg, &session, &mut writer, &never, deadline).await;
    writer.close().await;
    session.close().await;
    outcome.unwrap_or_else(|e| Outcome::Failure(e.to_string()))
}

async fn get_one(
    cfg: &DbConnectorConfig,
    session: &Session,
    writer: &mut Writer,
    cancel: &CancellationToken,
    deadline: Option<Instant>,
) -> Result<Outcome, BrokerError> {
    session.ensure_source(&cfg.broker).await?;
    let queue = cfg.broker.source.queue.as_str();
    let Some(got) = session
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    else {
        return Ok(Outcome::Empty(format!("queue {queue} is empty")));
    };
    let d = got.delivery;
    let msg = incoming(&d);
    let id = msg.id();
    match writer.write(std::slice::from_ref(&msg), cancel, deadline).await {
        Ok(dispositions) => match dispositions.into_iter().next() {
            Some(Disposition::Written { records }) => {
                session
                    .channel
                    .basic_ack(d.delivery_tag, BasicAckOptions::default())
                    .await?;
                Ok(Outcome::Success(format!(
                    "message {id} written: {records} record(s) committed, then acknowledged"
                )))
            }
            Some(Disposition::DeadLetter { class, reason }) => {
                dead_letter(cfg, session, &d, class.as_str(), &reason).await?;
                Ok(Outcome::Failure(format!(
                    "message {id} dead-lettered ({}): {reason}",
                    class.as_str()
                )))
            }
            None => Ok(Outcome::Failure("no result for the message".into())),
        },
        Err(e) => {
            session
                .channel
                .basic_reject(d.delivery_tag, BasicRejectOptions { requeue: true })
                .await?;
            Ok(Outcome::Failure(format!("message {id} returned to queue {queue}: {e}")))
        }
    }
}

/// Publishes `d` to the dead-letter exchange with the reason, waits for the confirm, then
/// acknowledges the original.
async fn dead_letter(
    cfg: &DbConnectorConfig,
    session: &Session,
    d: &Delivery,
    class: &str,
    reason: &str,
) -> Result<(), BrokerError> {
    let queue = &cfg.broker.source.queue;
    let dl = &cfg.broker.dead_letter;
    let props = dead_letter_properties(
        &d.properties,
        class,
        reason,
        d.exchange.as_str(),
        d.routing_key.as_str(),
        queue,
    );
    let routed = session
        .publish_confirmed(&dl.exchange, &dl.routing_key_for(queue), &d.data, props)
        .await?;
    if routed {
        session
            .channel
            .basic_ack(d.delivery_tag, BasicAckOptions::default())
            .await?;
    } else {
        tracing::error!(exchange = %dl.exchange, %reason, "no queue takes the dead letter; rejecting the message to the queue's own dead-lettering, if any");
        session
            .channel
            .basic_reject(d.delivery_tag, BasicRejectOptions { requeue: false })
            .await?;
    }
    Ok(())
}

/// Consumes the source queue until `cancel`, writing in batches. Reconnects to the broker
/// and the database with backoff; returns failure only for settings that cannot work.
pub async fn subscribe_and_write(cfg: Arc<DbConnectorConfig>, amqp_url: &Secret, cancel: CancellationToken) -> Outcome {
    let mut writer = Writer::new(cfg.clone());
    match writer.connect(&cancel, None).await {
        Ok(()) => {}
        Err(Interrupted::Cancelled) => return Outcome::Success("stopped before the database was reachable".into()),
        Err(e) => return Outcome::Failure(format!("cannot write to the database: {e}")),
    }
    let target = redact_url(amqp_url.expose());
    let mut backoff = Backoff::new(cfg.database.retry_min, cfg.database.retry_max);
    let mut down_since: Option<Instant> = None;
    let mut report = Report::new();
    let outcome = loop {
        if cancel.is_cancelled() {
            break Outcome::Success(summary(&writer.stats));
        }
        let session = match Session::open(amqp_url, "edgecase db connector (subscribe-and-write)").await {
            Ok(s) => s,
            Err(e) => {
                if down_since.is_none() {
                    down_since = Some(Instant::now());
                    tracing::warn!(broker = %target, error = %e, "AMQP unavailable; retrying with backoff");
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                continue;
            }
        };
        match down_since.take() {
            Some(t) => tracing::info!(broker = %target, down_for = ?t.elapsed(), "AMQP reconnected"),
            None => tracing::info!(broker = %target, queue = %cfg.broker.source.queue, "AMQP connected; consuming"),
        }
        backoff.reset();
        let result = consume(&cfg, &session, &mut writer, &cancel, &mut report).await;
        session.close().await;
        match result {
            Ok(()) => break Outcome::Success(summary(&writer.stats)),
            Err(BrokerError::Topology(e)) => break Outcome::Failure(format!("AMQP topology: {e}")),
            Err(e) => {
                down_since = Some(Instant::now());
                tracing::warn!(broker = %target, error = %e, "AMQP session ended; unacknowledged messages will be redelivered; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    };
    writer.close().await;
    outcome
}

fn summary(s: &WriterStats) -> String {
    format!(
        "{} message(s) written ({} record(s), {} transaction(s)), {} dead-lettered",
        s.messages, s.records, s.transactions, s.dead_letters
    )
}

/// Logs the counts once a minute while they change.
struct Report {
    last: Instant,
    logged: u64,
}

impl Report {
    fn new() -> Report {
        Report {
            last: Instant::now(),
            logged: 0,
        }
    }

    fn tick(&mut self, s: &WriterStats) {
        let total = s.messages + s.dead_letters;
        if self.last.elapsed() >= Duration::from_secs(60) && total != self.logged {
            tracing::info!(
                messages = s.messages,
                records = s.records,
                transactions = s.transactions,
                dead_letters = s.dead_letters,
                "db connector progress"
            );
            self.last = Instant::now();
            self.logged = total;
        }
    }
}

/// One session's consumer loop. `Ok` on cancel; `Err` when the session broke.
async fn consume(
    cfg: &DbConnectorConfig,
    session: &Session,
    writer: &mut Writer,
    cancel: &CancellationToken,
    report: &mut Report,
) -> Result<(), BrokerError> {
    session.ensure_source(&cfg.broker).await?;
    session
        .channel
        .basic_qos(cfg.broker.source.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = session
        .channel
        .basic_consume(
            cfg.broker.source.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max = cfg.broker.batch_size;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = consumer.next() => next,
        };
        let mut batch: Vec<Delivery> = Vec::with_capacity(max.min(1024));
        match first {
            Some(Ok(d)) => batch.push(d),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(BrokerError::Unavailable("the broker cancelled the consumer".into())),
        }
        // Whatever is already waiting joins this transaction.
        while batch.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) => return Err(e.into()),
                _ => break,
            }
        }
        let messages: Vec<Incoming> = batch.iter().map(incoming).collect();
        let dispositions = match writer.write(&messages, cancel, None).await {
            Ok(d) => d,
            // Stopped during an outage: nothing is acknowledged; the broker redelivers.
            Err(Interrupted::Cancelled) => return Ok(()),
            Err(Interrupted::Unavailable(e)) => return Err(BrokerError::Unavailable(e)),
        };
        let mut confirms = Vec::new();
        for (d, disposition) in batch.iter().zip(&dispositions) {
            if let Disposition::DeadLetter { class, reason } = disposition {
                let queue = &cfg.broker.source.queue;
                let props: BasicProperties = dead_letter_properties(
                    &d.properties,
                    class.as_str(),
                    reason,
                    d.exchange.as_str(),
                    d.routing_key.as_str(),
                    queue,
                );
                let dl = &cfg.broker.dead_letter;
                let confirm = session
                    .publish(&dl.exchange, &dl.routing_key_for(queue), &d.data, props)
                    .await?;
                confirms.push((d.delivery_tag, confirm));
            }
        }
        // Dead letters are confirmed before anything is acknowledged.
        let mut unroutable = Vec::new();
        for (tag, confirm) in confirms {
            if !super::broker::confirmed(confirm.await)? {
                unroutable.push(tag);
            }
        }
        if unroutable.is_empty() {
            let last = batch.last().map_or(0, |d| d.delivery_tag);
            session
                .channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
        } else {
            tracing::error!(
                exchange = %cfg.broker.dead_letter.exchange,
                "no queue takes the dead letters; rejecting those messages to the queue's own dead-lettering, if any"
            );
            for d in &batch {
                if unroutable.contains(&d.delivery_tag) {
                    session
                        .channel
                        .basic_reject(d.delivery_tag, BasicRejectOptions { requeue: false })
                        .await?;
                } else {
                    session
                        .channel
                        .basic_ack(d.delivery_tag, BasicAckOptions::default())
                        .await?;
                }
            }
        }
        report.tick(&writer.stats);
    }
}

/// The demo's writer: messages from an in-process channel, batched the same way; there is
/// nothing to acknowledge. Runs until the channel closes or `cancel`.
pub async fn write_channel(
    cfg: Arc<DbConnectorConfig>,
    mut rx: mpsc::Receiver<Incoming>,
    cancel: CancellationToken,
) -> Result<WriterStats, String> {
    let mut writer = Writer::new(cfg.clone());
    writer.connect(&cancel, None).await.map_err(|e| e.to_string())?;
    let max = cfg.broker.batch_size;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => None,
            m = rx.recv() => m,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if writer.write(&batch, &cancel, None).await.is_err() {
            break;
        }
    }
    writer.close().await;
    Ok(writer.stats)
}
