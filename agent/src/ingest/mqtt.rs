//! MQTT ingest: readings from a broker, acknowledged only after they are committed.
//!
//! - Persistent session (clean session off, stable client id): while the agent is down or
//!   reconnecting, the broker keeps the subscription and every unacknowledged QoS 1 message.
//! - Manual acknowledgement: each PUBACK is sent by the task that committed the message to
//!   the buffer, after the commit. A crash before it means the broker redelivers, and the
//!   buffer's `message_id` check turns the redelivery into a counted duplicate.
//! - The PUBLISHes one network read brought in (rumqttc decodes up to ten at a time) go to
//!   the buffer as one append: one hand-over to the writer thread and one reply for all of
//!   them instead of one each (thread wake-ups were about a third of the agent's CPU under
//!   load in a profile before this; see the README's Performance section).
//! - Bad input never stalls the session: a malformed or oversized payload is committed as a
//!   dead letter and acknowledged like any other message, so it is not redelivered forever.
//!   The client accepts packets up to MQTT's own maximum, so no packet size can break the
//!   connection; `mqtt.max_payload_bytes` decides what is dead-lettered.
//! - Reconnects with capped exponential backoff and jitter; subscribes again on every
//!   CONNACK (a broker that lost the session would otherwise send nothing).

use super::{Route, finish_commit, to_entry};
use crate::backoff::Backoff;
use crate::buffer::Buffer;
use crate::config::{Config, MqttConfig};
use crate::metrics::Metrics;
use crate::reading::{Origin, now_ms};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// MQTT's largest packet (remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;
/// How long shutdown waits for in-flight commits to send their PUBACKs.
const ACK_DRAIN: Duration = Duration::from_secs(3);
/// At most this many PUBLISHes share one append.
const MAX_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: the configuration cannot produce a connection.
    #[error("mqtt.url {url:?}: {message}")]
    Url { url: String, message: String },
    /// Stop: credentials or CA could not be read.
    #[error("{key}: {message}")]
    Setting { key: &'static str, message: String },
}

/// Everything the MQTT ingest task needs.
pub struct MqttIngest {
    options: MqttOptions,
    cfg: MqttConfig,
    gateway_id: String,
    route: Route,
    buffer: Buffer,
    metrics: Arc<Metrics>,
}

impl MqttIngest {
    pub fn new(config: &Config, buffer: Buffer, metrics: Arc<Metrics>) -> Result<MqttIngest, Error> {
        let cfg = config.mqtt.clone();
        let options = options(&cfg, &config.mqtt_client_id())?;
        Ok(MqttIngest {
            options,
            cfg,
            gateway_id: config.gateway.id.clone(),
            route: Route {
                readings_exchange: config.amqp.readings_exchange.clone(),
            },
            buffer,
            metrics,
        })
    }

    /// Runs until `cancel`; then stops reading, lets in-flight commits send their PUBACKs,
    /// and disconnects.
    pub async fn run(self, cancel: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), self.cfg.max_uncommitted + 16);
        let tracker = TaskTracker::new();
        let (uncommitted_tx, uncommitted_rx) = mpsc::channel(self.cfg.max_uncommitted);
        // mqtt.max_uncommitted counts messages; a batch takes a permit for each of its
        // messages, given back once their PUBACKs are queued.
        let uncommitted_room = Arc::new(Semaphore::new(self.cfg.max_uncommitted));
        let max_batch = MAX_BATCH.min(self.cfg.max_uncommitted).max(1);
        // Waits on the broker, and on a buffer that is full until the broker takes messages,
        // are idle time for the watchdog; a commit that never answers stops the
        // acknowledger's heartbeat (see watchdog).
        let heartbeat = self.metrics.stages.register("mqtt ingest");
        tracker.spawn(acknowledge_in_order(
            self.metrics.stages.register("mqtt acknowledger"),
            uncommitted_rx,
            client.clone(),
            self.buffer.clone(),
            self.metrics.clone(),
            cancel.clone(),
        ));
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let mut failing_since: Option<std::time::Instant> = None;
        let broker = format!(
            "{}:{}",
            self.options.broker_address().0,
            self.options.broker_address().1
        );
        tracing::info!(%broker, client_id = self.options.client_id(), topics = ?self.cfg.topics, "MQTT ingest starting");

        loop {
            heartbeat.beat();
            let event = tokio::select! {
                _ = cancel.cancelled() => break,
                e = heartbeat.idle(eventloop.poll()) => e,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // The PUBLISHes the same network read decoded wait in the event loop's
                    // queue: take them too (no I/O, nothing awaited), in order.
                    let mut publishes = vec![publish];
                    while publishes.len() < max_batch
                        && matches!(
                            eventloop.state.events.front(),
                            Some(Event::Incoming(Packet::Publish(_)))
                        )
                    {
                        if let Some(Event::Incoming(Packet::Publish(p))) = eventloop.state.events.pop_front() {
                            publishes.push(p);
                        }
                    }
                    let entries: Vec<_> = publishes.iter().map(|p| self.entry_for(p)).collect();
                    // Queue in arrival order; the acknowledger waits for the commits in the
                    // same order. Both are bounded: when full, this loop stops polling.
                    // Neither wait is cut short by shutdown: a message queued for commit
                    // must reach the acknowledger, or it would be stored and never
                    // acknowledged, and the broker would deliver it again. Both waits end,
                    // as the writer and the acknowledger keep draining.
                    //
                    // For the watchdog these waits are idle time: while the buffer is full
                    // (the broker is away) the acknowledger holds input and the queues
                    // fill. A commit that never answers stops the acknowledger's heartbeat.
                    let Ok(room) = heartbeat
                        .idle(uncommitted_room.clone().acquire_many_owned(publishes.len() as u32))
                        .await
                    else {
                        break;
                    };
                    let queued = heartbeat.idle(self.buffer.queue(entries.clone())).await;
                    let sent = heartbeat.idle(uncommitted_tx.send(Uncommitted {
                        publishes,
                        entries,
                        queued,
                        _room: room,
                    }));
                    if sent.await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    self.metrics.mqtt_connected.set(1);
                    match failing_since.take() {
                        Some(t) => {
                            tracing::info!(%broker, session_present = ack.session_present, down_for = ?t.elapsed(), "MQTT reconnected")
                        }
                        None => {
                            tracing::info!(%broker, session_present = ack.session_present, "MQTT connected")
                        }
                    }
                    for topic in &self.cfg.topics {
                        if let Err(e) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(topic, error = %e, "subscribe request failed; retried on reconnect");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(topics = ?self.cfg.topics, "broker refused a subscription (check its ACL)");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.metrics.mqtt_connected.set(0);
                    if failing_since.is_none() {
                        failing_since = Some(std::time::Instant::now());
                        self.metrics.mqtt_reconnects.inc();
                        log_connection_error(&broker, &e);
                    } else {
                        tracing::debug!(%broker, error = %e, "MQTT still unreachable");
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = heartbeat.idle(tokio::time::sleep(delay)) => {}
                    }
                }
            }
        }

        // Shutdown: new messages are not read (the broker keeps them for the session); let
        // the ones being committed finish and send their PUBACKs, which needs the event loop.
        // The acknowledger finishes what it has, then ends with the channel.
        drop(uncommitted_tx);
        tracker.close();
        let drained = async {
            let drive = async {
                loop {
                    if let Err(e) = eventloop.poll().await {
                        tracing::debug!(error = %e, "MQTT connection error while draining acknowledgements");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            tokio::select! {
                _ = tracker.wait() => {}
                _ = drive => {}
            }
            // Send the queued PUBACKs and DISCONNECT, then keep reading until the broker
            // closes the connection. Dropping the socket while the broker's data is still
            // unread makes the kernel send a reset, and a broker that receives a reset
            // discards what it had not read yet: the last PUBACKs, so it would redeliver
            // readings that were committed and published.
            let _ = client.disconnect().await;
            let flush = async {
                loop {
                    match eventloop.poll().await {
                        // Publishes arriving now are not acknowledged: the broker keeps them.
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "MQTT connection closed after DISCONNECT");
                            break;
                        }
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(1), flush).await.is_err() {
                tracing::debug!("broker did not close the connection within 1s of DISCONNECT");
            }
        };
        if tokio::time::timeout(ACK_DRAIN, drained).await.is_err() {
            tracing::warn!("MQTT shutdown: some acknowledgements were not sent; the broker will redeliver them");
        }
        self.metrics.mqtt_connected.set(0);
        tracing::info!("MQTT ingest stopped");
    }

    fn entry_for(&self, publish: &Publish) -> crate::buffer::Entry {
        let (device_id, sensor) = identity_from_topic(&self.cfg.topics, &publish.topic);
        let source = format!("mqtt:{}", publish.topic);
        let origin = Origin {
            device_id: device_id.as_deref(),
            sensor: sensor.as_deref(),
            source: &source,
            gateway_id: &self.gateway_id,
            received_ms: now_ms(),
        };
        let mut entry = to_entry(
            &publish.payload,
            &origin,
            self.cfg.max_payload_bytes,
            &self.route,
            "mqtt",
            &self.metrics,
        );
        if let crate::buffer::Entry::DeadLetter(d) = &mut entry {
            d.origin = publish.topic.clone();
        }
        entry
    }
}

/// Messages received, queued for commit as one append, not yet acknowledged.
struct Uncommitted {
    publishes: Vec<Publish>,
    entries: Vec<crate::buffer::Entry>,
    queued: Result<crate::buffer::Queued, crate::buffer::Error>,
    /// Their share of `mqtt.max_uncommitted`, given back when this is dropped.
    _room: OwnedSemaphorePermit,
}

/// Commit, then acknowledge, in the order the messages arrived: MQTT 3.1.1 (section 4.6)
/// requires PUBACKs in PUBLISH order, and strict brokers drop a client that breaks it.
///
/// PUBACKs travel through rumqttc's request channel, which only the event loop drains, and
/// the event loop waits for this task when the uncommitted channel is full. Waiting here
/// for room in the request channel would close that circle (a deadlock seen with a broker
/// that keeps more than 1,000 messages in flight), so acknowledgements that do not fit yet
/// wait in a local queue of 2-byte packet ids while this task keeps draining its input.
async fn acknowledge_in_order(
    heartbeat: crate::watchdog::Heartbeat,
    mut uncommitted: mpsc::Receiver<Uncommitted>,
    client: AsyncClient,
    buffer: Buffer,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut unsent: VecDeque<u16> = VecDeque::new();
    let send_acks = |unsent: &mut VecDeque<u16>| {
        while let Some(pkid) = unsent.front() {
            let mut ack = Publish::new("", QoS::AtLeastOnce, Vec::new());
            ack.pkid = *pkid;
            match client.try_ack(&ack) {
                Ok(()) => {
                    unsent.pop_front();
                }
                Err(rumqttc::ClientError::TryRequest(_)) => return true,
                Err(e) => {
                    tracing::debug!(error = %e, "PUBACK not sent (connection closing); the broker will redeliver");
                    unsent.clear();
                }
            }
        }
        false
    };
    loop {
        heartbeat.beat();
        let blocked = send_acks(&mut unsent);
        let next = tokio::select! {
            // An empty channel means no input: idle, not stuck.
            u = heartbeat.idle(uncommitted.recv()) => u,
            _ = tokio::time::sleep(Duration::from_millis(2)), if blocked => continue,
        };
        let Some(u) = next else { break };
        let accepted = u.entries.iter().filter(|e| e.is_record()).count();
        if finish_commit(&buffer, u.queued, u.entries, &cancel, "mqtt", &heartbeat)
            .await
            .is_none()
        {
            // Cancelled while holding input: acknowledge nothing after it either.
            break;
        }
        if accepted > 0 {
            metrics.accepted("mqtt", accepted as u64);
        }
        // QoS 0 messages have nothing to acknowledge.
        unsent.extend(u.publishes.iter().filter(|p| p.qos != QoS::AtMostOnce).map(|p| p.pkid));
    }
    // Input is over: hand the last acknowledgements to the event loop, which shutdown keeps
    // polling for a while.
    let deadline = tokio::time::Instant::now() + ACK_DRAIN;
    while send_acks(&mut unsent) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn log_connection_error(broker: &str, e: &ConnectionError) {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            tracing::error!(%broker, ?code, "MQTT broker refused the connection (check mqtt.username / mqtt.password and the broker's ACL); retrying")
        }
        ConnectionError::Tls(e) => {
            tracing::error!(%broker, error = %e, "MQTT TLS handshake failed (check mqtt.ca_file and the broker's certificate); retrying")
        }
        other => {
            tracing::warn!(%broker, error = %other, "MQTT connection lost; reconnecting with backoff")
        }
    }
}

/// Device id and sensor from the `+` levels of the first filter the topic matches: the first
/// `+` is the device, the second the sensor.
pub fn identity_from_topic(filters: &[String], topic: &str) -> (Option<String>, Option<String>) {
    for filter in filters {
        if let Some(wild) = match_filter(filter, topic) {
            let mut it = wild.into_iter();
            return (it.next().map(str::to_string), it.next().map(str::to_string));
        }
    }
    (None, None)
}

/// The topic levels matched by `+` if `topic` matches `filter`.
fn match_filter<'t>(filter: &str, topic: &'t str) -> Option<Vec<&'t str>> {
    let mut wild = Vec::new();
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return Some(wild),
            "+" => wild.push(t.next()?),
            level => {
                if t.next()? != level {
                    return None;
                }
            }
        }
    }
    if t.next().is_some() { None } else { Some(wild) }
}

fn options(cfg: &MqttConfig, client_id: &str) -> Result<MqttOptions, Error> {
    let url_err = |message: String| Error::Url {
        url: cfg.url.clone(),
        message,
    };
    let url = url::Url::parse(&cfg.url).map_err(|e| url_err(e.to_string()))?;
    let tls = match url.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => {
            return Err(url_err(format!(
                "scheme {other:?} is not supported; use mqtt:// or mqtts://"
            )));
        }
    };
    let host = url.host_str().ok_or_else(|| url_err("no host".into()))?;
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MQTT_MAX_PACKET, 1024 * 1024);
    let password = match (&cfg.password, &cfg.password_file) {
        (Some(p), _) => Some(p.expose().to_string()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map_err(|e| Error::Setting {
                    key: "mqtt.password_file",
                    message: format!("{}: {e}", file.display()),
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), password.unwrap_or_default());
    }
    if tls {
        let client = crate::tls::client_config(cfg.ca_file.as_deref()).map_err(|e| Error::Setting {
            key: "mqtt.ca_file",
            message: e.to_string(),
        })?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(client)));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels_give_identity() {
        let f = vec!["sensors/+/+".to_string()];
        assert_eq!(
            identity_from_topic(&f, "sensors/dev1/temp"),
            (Some("dev1".into()), Some("temp".into()))
        );
        assert_eq!(identity_from_topic(&f, "sensors/dev1"), (None, None));
        assert_eq!(identity_from_topic(&f, "other/dev1/temp"), (None, None));
        let f = vec!["site/+/#".to_string()];
        assert_eq!(identity_from_topic(&f, "site/d/x/y"), (Some("d".into()), None));
    }

    #[test]
    fn mqtts_urls_get_tls_and_default_port() {
        let cfg = MqttConfig {
            url: "mqtts://broker.example".into(),
            ..MqttConfig::default()
        };
        let o = options(&cfg, "id").expect("options");
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 8883));
        assert!(matches!(o.transport(), Transport::Tls(_)));
        assert!(!o.clean_session());
        assert!(o.manual_acks());
    }
}
