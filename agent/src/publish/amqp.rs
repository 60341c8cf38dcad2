//! The AMQP publisher: buffer → RabbitMQ, deleting a row only after the broker's confirm.
//!
//! An explicit state machine (after uplink's serializer): [`State::Connecting`] opens a
//! connection, a confirm-mode channel and declares the topology; [`State::Publishing`]
//! streams rows with many confirms in flight; any failure goes to [`State::Waiting`] with
//! capped exponential backoff and jitter, and back to connecting. Ingest never waits for
//! this loop: during an outage it keeps filling the buffer.
//!
//! Ordering and at-least-once: rows are published in buffer order. A row is released
//! (deleted) only after `Confirmation::Ack(None)`. Anything else ends the session: a
//! reconnect starts again from the oldest pending row, so a nack, a lost connection or a
//! confirm that never comes republishes rather than loses (consumers drop repeats by
//! `message_id`). A *returned* message (`Ack(Some(..))`: no queue and no alternate exchange
//! took it) was not delivered, so it is moved to the dead letters, not released as sent.

use crate::backoff::Backoff;
use crate::buffer::{Buffer, Entry, NewDeadLetter, StoredRecord};
use crate::config::AmqpConfig;
use crate::metrics::Metrics;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Connecting, opening the channel and declaring the topology, at most: a broker that
/// answers none of it is an outage, retried with backoff.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for outstanding confirms.
const CONFIRM_DRAIN: Duration = Duration::from_secs(3);
/// Rows read from the buffer per query.
const LOAD_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Retry with backoff: broker unreachable, refused, or the session broke.
    #[error("AMQP {0}")]
    Broker(String),
    /// Operator must act, retried meanwhile: an object exists with other settings.
    #[error(
        "AMQP topology: {0} (an exchange or queue exists with other settings; delete it or choose another name in [amqp])"
    )]
    Topology(String),
    /// Retry: the buffer failed to load or release.
    #[error(transparent)]
    Buffer(#[from] crate::buffer::Error),
    /// The broker refused a publish (nack); republished after reconnect.
    #[error("broker refused (nack) message {0}; republishing after reconnect")]
    Nacked(String),
    #[error("no confirm within {0:?}; reconnecting")]
    ConfirmTimeout(Duration),
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Broker(e.to_string())
    }
}

enum State {
    Connecting,
    Publishing(Box<Session>),
    Waiting(Duration),
    Stopped,
}

/// One connection and its confirm-mode channel.
struct Session {
    connection: Connection,
    channel: Channel,
}

pub struct AmqpPublisher {
    cfg: AmqpConfig,
    connection_name: String,
    buffer: Buffer,
    metrics: Arc<Metrics>,
}

impl AmqpPublisher {
    pub fn new(cfg: AmqpConfig, gateway_id: &str, buffer: Buffer, metrics: Arc<Metrics>) -> AmqpPublisher {
        AmqpPublisher {
            cfg,
            connection_name: format!("edgecase {gateway_id}"),
            buffer,
            metrics,
        }
    }

    /// Runs until `cancel`, then waits briefly for outstanding confirms and closes.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let mut down_since: Option<Instant> = None;
        let target = crate::config::redact_url(self.cfg.url.expose());
        let mut state = State::Connecting;
        // Waits for the broker (connecting, bounded by CONNECT_TIMEOUT; backoff; confirms)
        // are idle time; a publish or a buffer call that never ends stops the heartbeat (see
        // watchdog).
        let heartbeat = self.metrics.stages.register("publisher");
        loop {
            heartbeat.beat();
            state = match state {
                State::Connecting => match heartbeat.idle(self.connect()).await {
                    Ok(session) => {
                        backoff.reset();
                        self.metrics.amqp_connected.set(1);
                        match down_since.take() {
                            Some(t) => {
                                tracing::info!(broker = %target, down_for = ?t.elapsed(), pending = self.buffer.pending(), "AMQP reconnected; publishing the backlog")
                            }
                            None => {
                                tracing::info!(broker = %target, pending = self.buffer.pending(), "AMQP connected")
                            }
                        }
                        State::Publishing(Box::new(session))
                    }
                    Err(e) => {
                        if down_since.is_none() {
                            down_since = Some(Instant::now());
                            tracing::warn!(broker = %target, error = %e, "AMQP unavailable; buffering and retrying with backoff");
                        } else {
                            tracing::debug!(broker = %target, error = %e, "AMQP still unavailable");
                        }
                        State::Waiting(backoff.next_delay())
                    }
                },
                State::Publishing(session) => {
                    let result = self.publish(&session, &cancel, &heartbeat).await;
                    self.metrics.amqp_connected.set(0);
                    self.metrics.publish_in_flight.set(0);
                    // Best effort: the broker may already be gone.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        session.connection.close(200, "edgecase stopping".into()),
                    )
                    .await;
                    match result {
                        Ok(()) => State::Stopped,
                        Err(e) => {
                            self.metrics.publish_reconnects.inc();
                            down_since = Some(Instant::now());
                            tracing::warn!(broker = %target, error = %e, pending = self.buffer.pending(), "AMQP session ended; reconnecting with backoff");
                            State::Waiting(backoff.next_delay())
                        }
                    }
                }
                State::Waiting(delay) => tokio::select! {
                    _ = cancel.cancelled() => State::Stopped,
                    _ = heartbeat.idle(tokio::time::sleep(delay)) => State::Connecting,
                },
                State::Stopped => break,
            };
            if cancel.is_cancelled() && !matches!(state, State::Publishing(_)) {
                break;
            }
        }
        tracing::info!(pending = self.buffer.pending(), "AMQP publisher stopped");
    }

    async fn connect(&self) -> Result<Session, Error> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.open_session())
            .await
            .map_err(|_| {
                Error::Broker(format!(
                    "no session within {CONNECT_TIMEOUT:?} (connect, channel, topology)"
                ))
            })?
    }

    async fn open_session(&self) -> Result<Session, Error> {
        crate::tls::install_crypto_provider();
        let props = ConnectionProperties::default().with_connection_name(self.connection_name.clone().into());
        let url = with_frame_max(self.cfg.url.expose(), self.cfg.frame_max_bytes);
        let connect = Connection::connect(&url, props);
        let connection = tokio::time::timeout(Duration::from_secs(15), connect)
            .await
            .map_err(|_| Error::Broker("connect timed out after 15s".into()))??;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        declare_topology(&channel, &self.cfg).await?;
        Ok(Session { connection, channel })
    }

    /// Publishes until cancelled (`Ok`) or the session fails (`Err`).
    async fn publish(
        &self,
        session: &Session,
        cancel: &CancellationToken,
        heartbeat: &crate::watchdog::Heartbeat,
    ) -> Result<(), Error> {
        let max = self.cfg.max_in_flight;
        let mut cursor = 0i64;
        let mut in_flight = FuturesOrdered::new();
        let mut sent_at: VecDeque<Instant> = VecDeque::new();
        let mut releases: JoinSet<Result<(), crate::buffer::Error>> = JoinSet::new();
        let mut confirmed: Vec<i64> = Vec::new();
        let result = loop {
            heartbeat.beat();
            // Fill the window from the buffer.
            let mut loaded_all = true;
            if in_flight.len() < max && !cancel.is_cancelled() {
                let want = (max - in_flight.len()).min(LOAD_CHUNK);
                let rows = self.buffer.load_after(cursor, want).await?;
                loaded_all = rows.len() < want;
                let confirms = publish_rows(&session.channel, &rows).await;
                for (row, confirm) in rows.into_iter().zip(confirms) {
                    let confirm = confirm?;
                    cursor = row.id;
                    let (id, created_ms) = (row.id, row.created_ms);
                    in_flight.push_back(async move { (id, created_ms, row, confirm.await) });
                    sent_at.push_back(Instant::now());
                }
                self.metrics.publish_in_flight.set(in_flight.len() as i64);
            }
            if cancel.is_cancelled() && in_flight.is_empty() {
                break Ok(());
            }
            let head_deadline = sent_at.front().map(|t| *t + self.cfg.confirm_timeout);
            tokio::select! {
                biased;
                next = in_flight.next(), if !in_flight.is_empty() => {
                    let Some(first) = next else { continue };
                    sent_at.pop_front();
                    self.settle(first, &mut confirmed).await?;
                    // Take every confirm that is already there in the same pass.
                    while let Some(Some(more)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
                        sent_at.pop_front();
                        self.settle(more, &mut confirmed).await?;
                    }
                    self.metrics.publish_in_flight.set(in_flight.len() as i64);
                }
                _ = sleep_until_opt(head_deadline) => break Err(Error::ConfirmTimeout(self.cfg.confirm_timeout)),
                _ = cancel.cancelled() => {
                    if !in_flight.is_empty() {
                        tracing::info!(in_flight = in_flight.len(), "AMQP publisher waiting for outstanding confirms");
                    }
                    let drain = async {
                        while let Some(c) = in_flight.next().await {
                            self.settle(c, &mut confirmed).await?;
                        }
                        Ok::<(), Error>(())
                    };
                    let r = tokio::time::timeout(CONFIRM_DRAIN, drain).await;
                    break match r { Ok(r) => r, Err(_) => Ok(()) };
                }
                _ = self.buffer.wait_for_data(), if loaded_all && in_flight.len() < max => {}
                _ = tokio::time::sleep(Duration::from_secs(1)), if loaded_all => {}
                // A full window waits on the broker's confirms (bounded by confirm_timeout):
                // go round now and then so the heartbeat shows the loop alive.
                _ = tokio::time::sleep(crate::watchdog::BEAT_EVERY), if !loaded_all => {}
            }
            if !confirmed.is_empty() {
                let ids = std::mem::take(&mut confirmed);
                let buffer = self.buffer.clone();
                releases.spawn(async move { buffer.release(ids).await });
                // Keep a few releases in flight; their commits group with ingest's.
                while releases.len() > 4 {
                    if let Some(r) = releases.join_next().await {
                        flatten(r)?;
                    }
                }
            }
            while let Some(r) = releases.try_join_next() {
                flatten(r)?;
            }
        };
        // Whatever happened, confirmed rows must be released before a reconnect reloads the
        // buffer from the start, or they would be published again.
        if !confirmed.is_empty() {
            self.buffer.release(std::mem::take(&mut confirmed)).await?;
        }
        while let Some(r) = releases.join_next().await {
            flatten(r)?;
        }
        result
    }

    /// Handles one confirm: confirmed rows are queued for release.
    async fn settle(
        &self,
        (id, created_ms, row, confirmation): (i64, i64, StoredRecord, lapin::Result<Confirmation>),
        confirmed: &mut Vec<i64>,
    ) -> Result<(), Error> {
        match confirmation? {
            Confirmation::Ack(None) | Confirmation::NotRequested => {
                confirmed.push(id);
                self.metrics.publish_confirmed.inc();
                let age_ms = crate::reading::now_ms().saturating_sub(created_ms).max(0);
                self.metrics.publish_latency_seconds.observe(age_ms as f64 / 1000.0);
                Ok(())
            }
            Confirmation::Ack(Some(returned)) => {
                self.metrics.publish_unrouted.inc();
                let reason = format!(
                    "returned by the broker as unroutable ({} {}) from exchange {} with routing key {}",
                    returned.reply_code, returned.reply_text, row.exchange, row.routing_key
                );
                tracing::warn!(message_id = %row.message_id, %reason, "message dead-lettered");
                self.buffer
                    .append(vec![Entry::DeadLetter(NewDeadLetter {
                        source: "amqp".into(),
                        origin: format!("{}/{}", row.exchange, row.routing_key),
                        device_id: Some(row.device_id.clone()),
                        sensor: None,
                        reason,
                        raw: row.payload,
                    })])
                    .await?;
                confirmed.push(id);
                Ok(())
            }
            Confirmation::Nack(_) => {
                self.metrics.publish_nacked.inc();
                Err(Error::Nacked(row.message_id))
            }
        }
    }
}

fn flatten(r: Result<Result<(), crate::buffer::Error>, tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok(r) => Ok(r?),
        Err(e) => Err(Error::Broker(format!("release task failed: {e}"))),
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Adds `frame_max` to the URL unless it names one. lapin keeps 64 frames of buffers per
/// connection, so RabbitMQ's default of 128 KiB frames costs 8 MiB of memory; readings are
/// a few hundred bytes, and larger messages are split into several frames anyway.
fn with_frame_max(url: &str, frame_max: u32) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.query_pairs().any(|(k, _)| k == "frame_max") => {
            u.query_pairs_mut().append_pair("frame_max", &frame_max.to_string());
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Publishes `rows` in order and returns their pending confirms, in the same order.
///
/// lapin's `basic_publish` queues the frames (and takes the delivery tag) synchronously on
/// its first poll, then waits until its I/O thread has written them. Awaiting each publish
/// in turn costs two thread hand-overs per message, which showed as a third of the agent's
/// CPU in profiles. So each publish is polled once, in row order (the order of the frames
/// on the wire and of the delivery tags), and then all of them are awaited together: the
/// I/O thread writes the whole chunk in one wake-up.
async fn publish_rows(channel: &Channel, rows: &[StoredRecord]) -> Vec<Result<lapin::PublisherConfirm, Error>> {
    use std::future::Future;
    use std::task::Poll;
    let mut sends: Vec<_> = rows.iter().map(|row| Box::pin(publish_row(channel, row))).collect();
    let mut done: Vec<Option<Result<lapin::PublisherConfirm, Error>>> = (0..rows.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        // Every pass goes in row order, so the first pass queues the frames in row order.
        for (send, slot) in sends.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match send.as_mut().poll(cx) {
                    Poll::Ready(r) => *slot = Some(r),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    done.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Broker("publish did not complete".into()))))
        .collect()
}

/// Publishes one row: persistent, mandatory, with its stable `message_id`.
async fn publish_row(channel: &Channel, row: &StoredRecord) -> Result<lapin::PublisherConfirm, Error> {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-device-id".into(),
        AMQPValue::LongString(row.device_id.as_str().into()),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(row.message_id.as_str().into())
        .with_timestamp((row.created_ms / 1000).max(0) as u64)
        .with_headers(headers);
    let opts = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    Ok(channel
        .basic_publish(
            ShortString::from(row.exchange.as_str()),
            ShortString::from(row.routing_key.as_str()),
            opts,
            &row.payload,
            props,
        )
        .await?)
}

/// Declares the brief's topology, idempotently: the readings and cases topic exchanges
/// (each with the unrouted alternate exchange), the dead-letter exchange, and the durable
/// queue that keeps unrouted messages.
pub async fn declare_topology(channel: &Channel, cfg: &AmqpConfig) -> Result<(), Error> {
    declare_exchanges(channel, cfg, &[&cfg.readings_exchange, &cfg.cases_exchange]).await
}

/// The topology with only the given topic exchanges (each with the unrouted alternate
/// exchange): a connector declares the ones it uses with the agent's arguments, so either
/// may start first.
pub async fn declare_exchanges(channel: &Channel, cfg: &AmqpConfig, topic_exchanges: &[&str]) -> Result<(), Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let topology = |what: &str, e: lapin::Error| Error::Topology(format!("{what}: {e}"));
    channel
        .exchange_declare(
            cfg.unrouted_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(&format!("exchange {}", cfg.unrouted_exchange), e))?;
    channel
        .queue_declare(
            cfg.unrouted_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(&format!("queue {}", cfg.unrouted_queue), e))?;
    channel
        .queue_bind(
            cfg.unrouted_queue.as_str().into(),
            cfg.unrouted_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut with_ae = FieldTable::default();
    with_ae.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(cfg.unrouted_exchange.as_str().into()),
    );
    for name in topic_exchanges {
        channel
            .exchange_declare((*name).into(), ExchangeKind::Topic, durable, with_ae.clone())
            .await
            .map_err(|e| topology(&format!("exchange {name}"), e))?;
    }
    channel
        .exchange_declare(
            cfg.dead_letter_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(&format!("exchange {}", cfg.dead_letter_exchange), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_max_is_added_unless_the_url_names_one() {
        assert_eq!(
            with_frame_max("amqp://guest:guest@127.0.0.1:5672/%2f", 16384),
            "amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=16384"
        );
        let own = "amqps://h/%2f?frame_max=65536&heartbeat=10";
        assert_eq!(with_frame_max(own, 16384), own);
    }
}
