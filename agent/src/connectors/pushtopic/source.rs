//! The source's loop: log in, find or create the PushTopic, then handshake, subscribe from
//! the stored replay id and long-poll; each batch of events is published to AMQP in order
//! (persistent, mandatory, publisher confirms) and the replay id of its last event is
//! stored only once every publish of the batch is confirmed.
//!
//! ```text
//!  login ─> PushTopic ─> handshake ─> subscribe(replay) ─> connect ─┬─> events ─> AMQP ─> confirms ─> store id
//!    ^          401:: ──────┘   ^        403::Unknown client ───────┤
//!    └───────── 401:: ──────────┴──────── offset request ───────────┘
//! ```
//!
//! Policies: `401::Authentication invalid` (an expired session) → new token, new
//! handshake; `403::Unknown client` or advice `handshake` (server restart, 40 s without a
//! connect) → new handshake and subscribe from the stored id; transport errors and 5xx →
//! retry with capped backoff; a stored replay id that Salesforce refuses (older than the
//! 24 h retention, or deleted) → logged as an error with the gap it may leave, counted, and
//! the subscription continues from the earliest retained event (`-2`), dropping events at
//! or below the stored id so that no duplicate is published.

use super::bayeux::{self, Event, Failure};
use super::config::PushTopicConfig;
use super::format;
use super::offsets::{Change, Phase, Requests, Store, Stored};
use crate::connectors::salesforce::client::{Account, AuthError, Session, describe_reqwest};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Counts on `GET /connectors/{name}/status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub events_published: AtomicU64,
    pub batches_confirmed: AtomicU64,
    pub handshakes: AtomicU64,
    pub logins: AtomicU64,
    pub auth_failures: AtomicU64,
    pub rehandshakes: AtomicU64,
    pub invalid_replay: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub amqp_reconnects: AtomicU64,
    pub last_replay_id: AtomicI64,
    pub connected: AtomicU64,
}

impl Stats {
    pub fn json(&self) -> Value {
        json!({
            "events_published": self.events_published.load(Relaxed),
            "batches_confirmed": self.batches_confirmed.load(Relaxed),
            "handshakes": self.handshakes.load(Relaxed),
            "logins": self.logins.load(Relaxed),
            "auth_failures": self.auth_failures.load(Relaxed),
            "rehandshakes": self.rehandshakes.load(Relaxed),
            "invalid_replay": self.invalid_replay.load(Relaxed),
            "duplicates_dropped": self.duplicates_dropped.load(Relaxed),
            "amqp_reconnects": self.amqp_reconnects.load(Relaxed),
            "last_replay_id": self.last_replay_id.load(Relaxed),
            "connected": self.connected.load(Relaxed) == 1,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: the configuration cannot work (credentials refused, PushTopic missing, ...).
    #[error("{0}")]
    Fatal(String),
    /// Stop: the offset cannot be stored, so progress cannot be recorded.
    #[error(transparent)]
    Store(#[from] super::offsets::StoreError),
}

/// What the source shares with the admin API.
pub struct Shared {
    pub config: PushTopicConfig,
    pub destination: Destination,
    pub store: Store,
    pub requests: Requests,
    pub stats: Stats,
}

/// Where the events go.
pub enum Destination {
    /// RabbitMQ at `amqp.url`: persistent, mandatory, with publisher confirms.
    Amqp,
    /// `edgecase demo`'s in-process stand-in for the broker: an event counts as delivered
    /// once the channel took it, as the agent's in-process publisher does.
    InProcess(tokio::sync::mpsc::Sender<crate::publish::memory::Delivery>),
}

/// The PushTopic as found or created: its fields and their types, for the schema.
#[derive(Debug, Clone, Serialize)]
pub struct Topic {
    pub id: String,
    pub query: String,
    pub fields: Vec<(String, String)>,
}

struct Ctx {
    shared: Arc<Shared>,
    http: reqwest::Client,
    account: Account,
    version: String,
    cancel: CancellationToken,
    /// Set once the first subscription succeeded.
    started: bool,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(7)).min(15_000))
}

impl Ctx {
    fn cfg(&self) -> &PushTopicConfig {
        &self.shared.config
    }

    /// A session, retrying unreachable logins until `request.max.retries.time.ms`.
    async fn session(&self) -> Result<Arc<Session>, Error> {
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            match self.account.session().await {
                Ok(s) => return Ok(s),
                // Refused credentials stop a source that never ran; a running one (say, a
                // password changed under it) keeps trying, loudly, so it resumes once fixed.
                Err(e @ AuthError::Refused { .. }) if !self.started => return Err(Error::Fatal(e.to_string())),
                Err(e @ AuthError::Refused { .. }) => {
                    tracing::error!(error = %e, "Salesforce refused the login; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt).max(Duration::from_secs(5))).await;
                }
                Err(e) if start.elapsed() >= self.cfg().max_retry_time => {
                    return Err(Error::Fatal(format!(
                        "{e} (gave up after request.max.retries.time.ms = {} ms)",
                        self.cfg().max_retry_time.as_millis()
                    )));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Salesforce login failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// One REST call: a 401 renews the session once; 5xx and transport errors are retried
    /// until `request.max.retries.time.ms`.
    async fn rest(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, Error> {
        let start = Instant::now();
        let mut attempt = 0;
        let mut session = self.session().await?;
        let mut renewed = false;
        loop {
            let url = format!("{}/services/data/v{}{path}", session.instance_url, self.version);
            let mut req = self
                .http
                .request(method.clone(), &url)
                .timeout(self.cfg().connection_timeout)
                .bearer_auth(session.access_token.expose());
            if let Some(b) = body {
                req = req.json(b);
            }
            let (status, text) = match req.send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    (s, r.text().await.unwrap_or_default())
                }
                Err(e) => (0, describe_reqwest(&e)),
            };
            match status {
                200..=299 => return Ok(serde_json::from_str(&text).unwrap_or(Value::Null)),
                401 if !renewed => {
                    renewed = true;
                    session = self
                        .account
                        .renew(&session)
                        .await
                        .map_err(|e| Error::Fatal(e.to_string()))?;
                    continue;
                }
                0 | 500..=599 if start.elapsed() < self.cfg().max_retry_time => {
                    tracing::warn!(status, url, error = %text, "Salesforce request failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                }
                _ => return Err(Error::Fatal(format!("{method} {url}: HTTP {status}: {text}"))),
            }
        }
    }

    /// Finds the PushTopic by name, or creates it (`salesforce.push.topic.create`).
    async fn ensure_topic(&self) -> Result<Topic, Error> {
        let cfg = self.cfg();
        let q = format!(
            "SELECT Id, Name, Query, ApiVersion, IsActive FROM PushTopic WHERE Name = '{}'",
            cfg.topic_name
        );
        let found = self
            .rest(reqwest::Method::GET, &format!("/query?q={}", urlencode(&q)), None)
            .await?;
        let describe = self
            .rest(
                reqwest::Method::GET,
                &format!("/sobjects/{}/describe", cfg.object),
                None,
            )
            .await
            .map_err(|e| Error::Fatal(format!("salesforce.object {}: cannot describe it: {e}", cfg.object)))?;
        let types: Vec<(String, String)> = describe["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| Some((f["name"].as_str()?.to_string(), f["type"].as_str()?.to_string())))
            .collect();
        let type_of = |n: &str| {
            types
                .iter()
                .find(|(f, _)| f.eq_ignore_ascii_case(n))
                .map_or("string".to_string(), |(_, t)| t.clone())
        };
        if let Some(r) = found["records"].as_array().and_then(|a| a.first()) {
            let query = r["Query"].as_str().unwrap_or_default().to_string();
            if r["IsActive"].as_bool() == Some(false) {
                return Err(Error::Fatal(format!(
                    "salesforce.push.topic.name: the PushTopic {} exists but is not active",
                    cfg.topic_name
                )));
            }
            let fields = select_fields(&query)
                .into_iter()
                .map(|f| {
                    let t = type_of(&f);
                    (f, t)
                })
                .collect();
            tracing::info!(topic = %cfg.topic_name, query, "using the existing PushTopic");
            return Ok(Topic {
                id: r["Id"].as_str().unwrap_or_default().to_string(),
                query,
                fields,
            });
        }
        if !cfg.topic_create {
            return Err(Error::Fatal(format!(
                "salesforce.push.topic.name: no PushTopic named {} exists and salesforce.push.topic.create is false",
                cfg.topic_name
            )));
        }
        // Every field a PushTopic query may select (not textareas over 255, not compound
        // address/location fields), within the 1,300 characters a query may have.
        let wanted: Vec<String> = match &cfg.fields {
            Some(f) => f.clone(),
            None => describe["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| {
                    let t = f["type"].as_str().unwrap_or_default();
                    !matches!(t, "textarea" | "address" | "location" | "base64")
                })
                .filter_map(|f| f["name"].as_str().map(String::from))
                .collect(),
        };
        let mut fields: Vec<String> = Vec::new();
        for f in wanted {
            let len: usize = fields.iter().map(|x| x.len() + 2).sum::<usize>() + f.len() + 20 + cfg.object.len();
            if len > 1300 {
                break;
            }
            fields.push(f);
        }
        let query = format!("SELECT {} FROM {}", fields.join(", "), cfg.object);
        let api: f64 = self.version.parse().unwrap_or(58.0);
        let created = self
            .rest(
                reqwest::Method::POST,
                "/sobjects/PushTopic/",
                Some(&json!({
                    "Name": cfg.topic_name,
                    "Query": query,
                    "ApiVersion": api,
                    "NotifyForOperationCreate": cfg.notify_create,
                    "NotifyForOperationUpdate": cfg.notify_update,
                    "NotifyForOperationDelete": cfg.notify_delete,
                    "NotifyForOperationUndelete": cfg.notify_undelete,
                    "NotifyForFields": "Referenced",
                    "Description": format!("created by edgecase source {}", cfg.name),
                })),
            )
            .await?;
        tracing::info!(topic = %cfg.topic_name, query, "created the PushTopic");
        Ok(Topic {
            id: created["id"].as_str().unwrap_or_default().to_string(),
            fields: fields
                .into_iter()
                .map(|f| {
                    let t = type_of(&f);
                    (f, t)
                })
                .collect(),
            query,
        })
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The SELECT list of a PushTopic query.
pub fn select_fields(query: &str) -> Vec<String> {
    let lower = query.to_ascii_lowercase();
    let (Some(s), Some(f)) = (lower.find("select"), lower.find(" from ")) else {
        return Vec::new();
    };
    query[s + 6..f]
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// The newest API version the org lists (for `salesforce.version = latest`).
async fn latest_version(http: &reqwest::Client, instance: &str) -> Result<String, String> {
    let url = format!("{instance}/services/data/");
    let v: Value = http
        .get(&url)
        .send()
        .await
        .map_err(|e| describe_reqwest(&e))?
        .json()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    v.as_array()
        .and_then(|a| a.last())
        .and_then(|x| x["version"].as_str())
        .map(String::from)
        .ok_or_else(|| format!("{url}: no version listed"))
}

/// An AMQP channel in confirm mode, with the destination exchange declared.
struct Amqp {
    _connection: Connection,
    channel: Channel,
}

async fn amqp_connect(cfg: &PushTopicConfig) -> Result<Amqp, String> {
    crate::tls::install_crypto_provider();
    let props = ConnectionProperties::default().with_connection_name(format!("edgecase pushtopic {}", cfg.name).into());
    let connection = tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect(cfg.amqp_url.expose(), props),
    )
    .await
    .map_err(|_| "AMQP connect timed out after 15s".to_string())?
    .map_err(|e| format!("AMQP connect: {e}"))?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    channel
        .exchange_declare(
            cfg.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("amqp.exchange {}: {e}", cfg.exchange))?;
    Ok(Amqp {
        _connection: connection,
        channel,
    })
}

/// The AMQP `message_id` of an event: stable across redeliveries, so consumers can drop
/// the duplicates a crash can cause.
fn message_id(cfg: &PushTopicConfig, e: &Event) -> String {
    format!("{}/{}", cfg.channel(), e.replay_id)
}

/// Hands a batch to the in-process queue, in order.
async fn hand_over(
    queue: &tokio::sync::mpsc::Sender<crate::publish::memory::Delivery>,
    cfg: &PushTopicConfig,
    events: &[Event],
    bodies: &[Vec<u8>],
) -> Result<(), Error> {
    for (e, payload) in events.iter().zip(bodies) {
        let delivery = crate::publish::memory::Delivery {
            exchange: cfg.exchange.clone(),
            routing_key: cfg.routing_key(),
            message_id: message_id(cfg, e),
            device_id: String::new(),
            payload: payload.clone(),
        };
        queue
            .send(delivery)
            .await
            .map_err(|_| Error::Fatal("the in-process queue is closed".into()))?;
    }
    Ok(())
}

/// Publishes a batch in order and waits for every confirm. Unroutable (returned) or nacked
/// messages fail the batch: it is published again, never skipped.
async fn publish_batch(
    amqp: &Amqp,
    cfg: &PushTopicConfig,
    content_type: &str,
    events: &[Event],
    bodies: &[Vec<u8>],
) -> Result<(), String> {
    let mut confirms = Vec::with_capacity(events.len());
    let rk = cfg.routing_key();
    for (e, body) in events.iter().zip(bodies) {
        let mut headers = FieldTable::default();
        headers.insert("x-replay-id".into(), AMQPValue::LongLongInt(e.replay_id));
        headers.insert("x-event-type".into(), AMQPValue::LongString(e.kind.as_str().into()));
        headers.insert(
            "x-pushtopic".into(),
            AMQPValue::LongString(cfg.topic_name.as_str().into()),
        );
        if let Some(id) = e.sobject.get("Id").and_then(Value::as_str) {
            headers.insert("x-sobject-id".into(), AMQPValue::LongString(id.into()));
        }
        let props = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_delivery_mode(2)
            .with_message_id(message_id(cfg, e).into())
            .with_timestamp((crate::reading::now_ms() / 1000).max(0) as u64)
            .with_headers(headers);
        let c = amqp
            .channel
            .basic_publish(
                ShortString::from(cfg.exchange.as_str()),
                ShortString::from(rk.as_str()),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await
            .map_err(|e| format!("publish: {e}"))?;
        confirms.push(c);
    }
    for c in confirms {
        match tokio::time::timeout(Duration::from_secs(30), c).await {
            Err(_) => return Err("no confirm within 30s".into()),
            Ok(Err(e)) => return Err(format!("confirm: {e}")),
            Ok(Ok(Confirmation::Nack(_))) => return Err("the broker nacked a publish".into()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => {
                return Err(format!(
                    "unroutable: no queue is bound to exchange {} for routing key {rk}; bind one (events stay in Salesforce for 24 h)",
                    cfg.exchange
                ));
            }
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}

/// Runs the source until `cancel`; returns only on a fatal error or cancellation.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) -> Result<(), Error> {
    let cfg = &shared.config;
    let tls = crate::tls::client_config(None).map_err(|e| Error::Fatal(e.to_string()))?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .connect_timeout(cfg.connection_timeout)
        .user_agent(concat!("edgecase/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Fatal(format!("cannot build the HTTP client: {e}")))?;
    let account = Account::from_credentials(http.clone(), cfg.credentials.clone());
    let mut ctx = Ctx {
        shared: shared.clone(),
        http: http.clone(),
        account,
        version: String::new(),
        cancel: cancel.clone(),
        started: false,
    };
    let session = ctx.session().await?;
    shared.stats.logins.fetch_add(1, Relaxed);
    ctx.version = match &cfg.version {
        Some(v) => v.clone(),
        None => latest_version(&http, &session.instance_url)
            .await
            .map_err(|e| Error::Fatal(format!("salesforce.version latest: {e}")))?,
    };
    let topic = ctx.ensure_topic().await?;
    let encoder = format::Encoder::new(cfg.output_format, &cfg.object, &topic.fields).map_err(Error::Fatal)?;
    let stored = shared.store.get();
    tracing::info!(
        topic = %cfg.topic_name,
        replay_id = ?stored.replay_id,
        initial_start = ?cfg.initial_start,
        "PushTopic source starting (stored replay id {})",
        stored.replay_id.map_or("none".into(), |n| n.to_string())
    );
    let mut amqp: Option<Amqp> = None;
    let mut attempt = 0u32;
    // The offset that a request replaced, while its outcome is unknown.
    let mut applying: Option<Stored> = None;
    while !cancel.is_cancelled() {
        // A pending offset request is applied before (re)subscribing.
        if applying.is_none()
            && let Some(change) = shared.requests.pending()
        {
            let previous = shared.requests.begin(shared.store.get());
            match change {
                Change::Patch(n) => shared.store.set(Some(n))?,
                Change::Delete => shared.store.set(None)?,
            }
            tracing::info!(?change, previous = ?previous.replay_id, "applying an offset request");
            applying = Some(previous);
        }
        let session = ctx.session().await?;
        let url = format!("{}/cometd/{}", session.instance_url, ctx.version);
        let mut client = bayeux::Client::new(http.clone(), url, session.access_token.expose().to_string());
        let stored = shared.store.get().replay_id;
        let from = stored.unwrap_or(cfg.initial_start.replay_from());
        let subscribed = async {
            client.handshake(cfg.connection_timeout).await?;
            shared.stats.handshakes.fetch_add(1, Relaxed);
            match client.subscribe(&cfg.channel(), from, cfg.connection_timeout).await {
                Err(Failure::InvalidReplay(msg)) if applying.is_some() => Err(Failure::InvalidReplay(msg)),
                Err(Failure::InvalidReplay(msg)) => {
                    shared.stats.invalid_replay.fetch_add(1, Relaxed);
                    tracing::error!(
                        replay_id = from,
                        error = %msg,
                        "Salesforce no longer retains the stored replay id (older than its 24 h retention, or deleted): events between it and the earliest retained one may be lost; continuing from the earliest retained event (-2)"
                    );
                    client.subscribe(&cfg.channel(), -2, cfg.connection_timeout).await
                }
                other => other,
            }
        }
        .await;
        match subscribed {
            Ok(()) => {
                attempt = 0;
                ctx.started = true;
                if let Some(previous) = applying.take() {
                    shared.requests.finish(
                        Phase::Applied,
                        format!("subscribed to {} from replay id {from}", cfg.channel()),
                        previous,
                    );
                }
            }
            Err(f) => {
                if matches!(f, Failure::InvalidReplay(_))
                    && let Some(previous) = applying.take()
                {
                    // The request cannot be applied: restore the offset it replaced.
                    shared.store.set(previous.replay_id)?;
                    shared.requests.finish(
                        Phase::Failed,
                        format!("Salesforce refused replay id {from}: {f}; the previous offset is kept"),
                        previous,
                    );
                    continue;
                }
                handle_failure(&ctx, &session, f, &mut attempt).await?;
                continue;
            }
        }
        shared.stats.connected.store(1, Relaxed);
        // The connect loop of one Bayeux session. A batch is published while the next
        // long poll is out (the two overlap); batches still go out one after the other, in
        // order, and an offset request is applied only between two batches.
        let mut batch: Option<Vec<Event>> = None;
        loop {
            let polled = match batch.take() {
                Some(events) => {
                    let both = async {
                        tokio::join!(
                            deliver(&shared, &mut amqp, &encoder, &events, &cancel),
                            client.connect()
                        )
                    };
                    tokio::select! {
                        (delivered, r) = both => {
                            delivered?;
                            Some(r)
                        }
                        _ = cancel.cancelled() => None,
                    }
                }
                None => tokio::select! {
                    r = client.connect() => Some(r),
                    _ = shared.requests.changed() => None,
                    _ = cancel.cancelled() => None,
                },
            };
            if cancel.is_cancelled() {
                client.disconnect().await;
                shared.stats.connected.store(0, Relaxed);
                return Ok(());
            }
            if shared.requests.pending().is_some() {
                // Apply it in a new session; events of an abandoned poll come again from
                // the stored (or requested) replay id.
                client.disconnect().await;
                break;
            }
            let Some(result) = polled else {
                continue;
            };
            match result {
                Ok(messages) => {
                    let last = shared.store.get().replay_id;
                    let mut events = Vec::with_capacity(messages.len());
                    for m in &messages {
                        match Event::parse(m) {
                            Some(e) if last.is_some_and(|l| e.replay_id <= l) => {
                                shared.stats.duplicates_dropped.fetch_add(1, Relaxed);
                            }
                            Some(e) => events.push(e),
                            None => tracing::warn!(message = %m, "ignoring a message that is not a PushTopic event"),
                        }
                    }
                    if !events.is_empty() {
                        batch = Some(events);
                    }
                    let interval = client.advice.interval;
                    if !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                }
                Err(f) => {
                    shared.stats.connected.store(0, Relaxed);
                    if let Failure::Retry(msg) = &f {
                        // A transport error: the server keeps the client for 40 s, so
                        // retry the connect before starting over.
                        tracing::warn!(error = %msg, "connect failed; retrying");
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                        if attempt < 4 {
                            continue;
                        }
                    }
                    handle_failure(&ctx, &session, f, &mut attempt).await?;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Reacts to a failure outside the happy path; the caller starts a new session after.
async fn handle_failure(ctx: &Ctx, session: &Session, f: Failure, attempt: &mut u32) -> Result<(), Error> {
    let stats = &ctx.shared.stats;
    match f {
        Failure::Auth(msg) => {
            stats.auth_failures.fetch_add(1, Relaxed);
            tracing::info!(reason = %msg, "streaming session no longer authenticated; logging in again");
            match ctx.account.renew(session).await {
                Ok(_) => {
                    stats.logins.fetch_add(1, Relaxed);
                }
                // The next round logs in again (and stops only if the source never ran).
                Err(e) => {
                    tracing::warn!(error = %e, "logging in again failed");
                    *attempt += 1;
                    tokio::time::sleep(backoff(*attempt)).await;
                }
            }
        }
        Failure::Rehandshake(msg) => {
            stats.rehandshakes.fetch_add(1, Relaxed);
            tracing::info!(reason = %msg, "handshaking again");
        }
        Failure::Fatal(msg) => return Err(Error::Fatal(format!("Streaming API: {msg}"))),
        Failure::InvalidReplay(msg) | Failure::Retry(msg) => {
            *attempt += 1;
            tracing::warn!(error = %msg, "Streaming API request failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(backoff(*attempt)) => {}
                _ = ctx.cancel.cancelled() => {}
            }
        }
    }
    Ok(())
}

/// Publishes until confirmed (reconnecting as needed), then stores the last replay id.
async fn deliver(
    shared: &Shared,
    amqp: &mut Option<Amqp>,
    encoder: &format::Encoder,
    events: &[Event],
    cancel: &CancellationToken,
) -> Result<(), Error> {
    let cfg = &shared.config;
    // An event that cannot be encoded stops the source before anything of its batch is
    // published: it stays in Salesforce (24 h) while the format is changed.
    let bodies = events
        .iter()
        .map(|e| encoder.body(e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::Fatal)?;
    let mut attempt = 0;
    loop {
        if let Destination::InProcess(queue) = &shared.destination {
            tokio::select! {
                r = hand_over(queue, cfg, events, &bodies) => { r?; break }
                _ = cancel.cancelled() => return Ok(()),
            }
        }
        if amqp.is_none() {
            match amqp_connect(cfg).await {
                Ok(a) => *amqp = Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "AMQP unavailable; retrying");
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(attempt)) => continue,
                        _ = cancel.cancelled() => return Ok(()),
                    }
                }
            }
        }
        let Some(a) = amqp.as_ref() else { continue };
        match publish_batch(a, cfg, encoder.content_type(), events, &bodies).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "publishing failed; publishing the batch again");
                shared.stats.amqp_reconnects.fetch_add(1, Relaxed);
                *amqp = None;
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = cancel.cancelled() => return Ok(()),
                }
            }
        }
    }
    let last = events.last().map(|e| e.replay_id);
    shared.store.set(last)?;
    shared.stats.events_published.fetch_add(events.len() as u64, Relaxed);
    shared.stats.batches_confirmed.fetch_add(1, Relaxed);
    if let Some(l) = last {
        shared.stats.last_replay_id.store(l, Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_list_of_a_query() {
        assert_eq!(
            select_fields("SELECT Id, Subject,Status FROM Case WHERE Priority = 'High'"),
            vec!["Id", "Subject", "Status"]
        );
        assert!(select_fields("nonsense").is_empty());
    }
}
