//! The connector's AMQP side: connect, create what is missing, publish with confirms,
//! dead-letter with the reason in the headers.
//!
//! "Create what is missing" is literal: an exchange or queue is first declared *passively*;
//! only a 404 makes the connector declare it (durable, default arguments). So an exchange the
//! agent created with an alternate exchange, or a queue with a TTL, is used as it is instead
//! of failing on different arguments.

use super::config::BrokerConfig;
use crate::config::{Secret, redact_url};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Retry with backoff: unreachable, refused, or the session broke.
    #[error("AMQP {0}")]
    Unavailable(String),
    /// Operator must act: an exchange or queue cannot be created or bound.
    #[error("AMQP topology: {0}")]
    Topology(String),
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Unavailable(e.to_string())
    }
}

/// One connection and a confirm-mode channel.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
}

impl Session {
    pub async fn open(url: &Secret, name: &str) -> Result<Session, BrokerError> {
        crate::tls::install_crypto_provider();
        let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
        let connect = Connection::connect(url.expose(), props);
        let connection = tokio::time::timeout(Duration::from_secs(15), connect)
            .await
            .map_err(|_| {
                BrokerError::Unavailable(format!("connect to {} timed out after 15s", redact_url(url.expose())))
            })?
            .map_err(|e| BrokerError::Unavailable(format!("{}: {e}", redact_url(url.expose()))))?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Session { connection, channel })
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.connection.close(200, "edgecase db connector stopping".into()),
        )
        .await;
    }

    /// The exchange, created (durable, `kind`) if it does not exist.
    pub async fn ensure_exchange(&self, name: &str, kind: &str) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Ok(());
        }
        let probe = self.connection.create_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match probe
            .exchange_declare(name.into(), exchange_kind(kind), passive, FieldTable::default())
            .await
        {
            Ok(()) => {
                let _ = probe.close(200, "ok".into()).await;
                Ok(())
            }
            Err(e) if is_not_found(&e) => {
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                self.channel
                    .exchange_declare(name.into(), exchange_kind(kind), durable, FieldTable::default())
                    .await
                    .map_err(|e| BrokerError::Topology(format!("cannot create exchange {name}: {e}")))?;
                tracing::info!(exchange = name, kind, "created missing exchange");
                Ok(())
            }
            Err(e) => Err(BrokerError::Topology(format!("exchange {name}: {e}"))),
        }
    }

    /// The queue, created (durable, default arguments) if it does not exist, and bound to
    /// `exchange` with each of `keys` (bindings are idempotent).
    pub async fn ensure_queue(&self, queue: &str, exchange: &str, keys: &[String]) -> Result<(), BrokerError> {
        let probe = self.connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match probe.queue_declare(queue.into(), passive, FieldTable::default()).await {
            Ok(_) => {
                let _ = probe.close(200, "ok".into()).await;
            }
            Err(e) if is_not_found(&e) => {
                let durable = QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                };
                self.channel
                    .queue_declare(queue.into(), durable, FieldTable::default())
                    .await
                    .map_err(|e| BrokerError::Topology(format!("cannot create queue {queue}: {e}")))?;
                tracing::info!(queue, "created missing queue");
            }
            Err(e) => return Err(BrokerError::Topology(format!("queue {queue}: {e}"))),
        }
        if !exchange.is_empty() {
            for key in keys {
                self.channel
                    .queue_bind(
                        queue.into(),
                        exchange.into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        BrokerError::Topology(format!("cannot bind queue {queue} to {exchange} ({key}): {e}"))
                    })?;
            }
        }
        Ok(())
    }

    /// Source queue (and its exchange and binding) and the dead-letter exchange and queue.
    pub async fn ensure_source(&self, cfg: &BrokerConfig) -> Result<(), BrokerError> {
        let s = &cfg.source;
        if let Some(agent) = &cfg.agent_topology
            && [&agent.readings_exchange, &agent.cases_exchange].contains(&&s.exchange)
        {
            // On a channel of its own: a clash closes the channel it happens on.
            let ch = self.connection.create_channel().await?;
            match crate::publish::amqp::declare_topology(&ch, agent).await {
                Ok(()) => {
                    let _ = ch.close(200, "ok".into()).await;
                }
                Err(e) => tracing::warn!(error = %e, "cannot declare the agent's exchanges; using what exists"),
            }
        }
        self.ensure_exchange(&s.exchange, &s.exchange_type).await?;
        self.ensure_queue(&s.queue, &s.exchange, &s.binding_keys).await?;
        let d = &cfg.dead_letter;
        self.ensure_exchange(&d.exchange, "topic").await?;
        if let Some(q) = d.queue_for(&s.queue) {
            self.ensure_queue(&q, &d.exchange, &[d.routing_key_for(&s.queue)])
                .await?;
        }
        Ok(())
    }

    /// Publishes and waits for the broker's confirm. `Ok(false)`: returned as unroutable.
    pub async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<bool, BrokerError> {
        let confirm = self.publish(exchange, routing_key, body, props).await?;
        confirmed(confirm.await)
    }

    /// Publishes (persistent, mandatory); await the returned confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<lapin::PublisherConfirm, BrokerError> {
        let opts = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        Ok(self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                opts,
                body,
                props.with_delivery_mode(2),
            )
            .await?)
    }
}

/// A confirm's outcome: `Ok(true)` delivered, `Ok(false)` returned unroutable.
pub fn confirmed(c: lapin::Result<Confirmation>) -> Result<bool, BrokerError> {
    match c? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(true),
        Confirmation::Ack(Some(_)) => Ok(false),
        Confirmation::Nack(_) => Err(BrokerError::Unavailable("the broker refused (nack) a publish".into())),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404)
}

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Topic,
    }
}

/// A delivery's properties with the dead-letter headers added: why, what class, and where
/// it came from. The original headers, message id and content type are kept.
pub fn dead_letter_properties(
    original: &BasicProperties,
    class: &str,
    reason: &str,
    exchange: &str,
    routing_key: &str,
    queue: &str,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    // Header values are bounded: a reason quoting a huge value stays readable.
    let reason: String = reason.chars().take(2000).collect();
    headers.insert("x-error-reason".into(), text(&reason));
    headers.insert("x-error-class".into(), text(class));
    headers.insert("x-original-exchange".into(), text(exchange));
    headers.insert("x-original-routing-key".into(), text(routing_key));
    headers.insert("x-original-queue".into(), text(queue));
    headers.insert("x-connector".into(), text("edgecase db"));
    headers.insert(
        "x-dead-lettered-at".into(),
        text(&crate::reading::format_ms(crate::reading::now_ms())),
    );
    original.clone().with_headers(headers)
}

/// A header's text value, if present.
pub fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
