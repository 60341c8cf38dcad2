//! One task per division: consume the division's queue, upsert each case in Salesforce,
//! acknowledge the delivery only after Salesforce answered 2xx (or after the message is
//! safely in the dead-letter queue), and ride out outages.
//!
//! Ordering and at-least-once: several requests are in flight per division
//! (`concurrency`), but never two for the same `event_id`: a raise and its clear reach
//! Salesforce in delivery order. A message is never dropped: a crash or a lost connection
//! leaves it unacknowledged and RabbitMQ redelivers it; the upsert on the external id makes
//! the redelivery update the same Case instead of creating a second one. A message with
//! a validation error is published to the dead-letter exchange with publisher confirms,
//! and acknowledged only after the broker confirmed that copy.

use super::client::{self, Account, Outcome, SfError};
use super::config::{Division, QueueType, Resolved};
use super::limiter::RateLimiter;
use super::mapping::{CaseRecord, case_record};
use super::metrics::SalesforceMetrics;
use crate::backoff::Backoff;
use crate::config::AmqpConfig;
use crate::metrics::Metrics;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::Value;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: a division cannot log in at start (credentials refused, or Salesforce
    /// unreachable). The message names the division, the login URL and the user.
    #[error("Salesforce connector, division {division}")]
    Login {
        division: String,
        source: client::AuthError,
    },
    /// Stop: the HTTP client cannot be built (TLS roots, CA file).
    #[error("Salesforce connector: {0}")]
    Setup(String),
}

/// The running connector.
pub struct Connector {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Logs every division in; the first refusal or unreachable login URL is an error that
/// names the division, the login URL and the user.
pub async fn log_in(resolved: &Resolved) -> Result<(reqwest::Client, Vec<Arc<Account>>), Error> {
    let http = client::http_client(resolved).map_err(Error::Setup)?;
    let mut accounts = Vec::new();
    for d in &resolved.divisions {
        let account = Arc::new(Account::new(http.clone(), resolved, d));
        account.session().await.map_err(|source| Error::Login {
            division: d.config.name.clone(),
            source,
        })?;
        accounts.push(account);
    }
    Ok((http, accounts))
}

/// Logs every division in (failing fast with a message naming it), then starts one
/// consumer task per division.
pub async fn start(resolved: Resolved, metrics: Arc<Metrics>) -> Result<Connector, Error> {
    let (http, accounts) = log_in(&resolved).await?;
    let limiter = Arc::new(RateLimiter::new(resolved.tenant.max_requests_per_second));
    let mut shared = Vec::new();
    for (d, account) in resolved.divisions.iter().zip(accounts) {
        let prefetch = resolved.prefetch_override.unwrap_or_else(|| {
            let want = d.config.concurrency * d.config.batch_size * 2;
            want.clamp(16, u16::MAX as usize) as u16
        });
        shared.push(Arc::new(Shared {
            division: d.clone(),
            account,
            http: http.clone(),
            limiter: limiter.clone(),
            metrics: metrics.clone(),
            api_version: resolved.tenant.api_version.clone(),
            amqp: resolved.amqp.clone(),
            queue_type: resolved.tenant.amqp.queue_type,
            prefetch,
            retry_min: resolved.tenant.retry_min,
            retry_max: resolved.tenant.retry_max,
            limit_backoff: resolved.tenant.limit_backoff,
            failing: AtomicBool::new(false),
        }));
    }
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    for s in shared {
        tracing::info!(
            division = %s.division.config.name,
            queue = %s.division.queue,
            user = %s.account.username,
            login_url = %s.account.login_url,
            concurrency = s.division.config.concurrency,
            batch_size = s.division.config.batch_size,
            "Salesforce division logged in"
        );
        tasks.spawn(s.run(cancel.child_token()));
    }
    tasks.close();
    Ok(Connector { cancel, tasks })
}

impl Connector {
    /// Stops consuming, lets requests in flight finish (bounded), closes the connections:
    /// whatever was not acknowledged is redelivered later.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if tokio::time::timeout(DRAIN * 2, self.tasks.wait()).await.is_err() {
            tracing::warn!("Salesforce connector did not stop in time; unacknowledged messages will be redelivered");
        }
    }
}

struct Shared {
    division: Division,
    account: Arc<Account>,
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
    api_version: String,
    amqp: AmqpConfig,
    queue_type: QueueType,
    prefetch: u16,
    retry_min: Duration,
    retry_max: Duration,
    limit_backoff: Duration,
    /// Set while Salesforce requests fail, so only the first failure and the recovery
    /// are logged.
    failing: AtomicBool,
}

struct AmqpSession {
    connection: Connection,
    /// Confirm-mode channel for dead-letter publishes.
    publish: Channel,
    consumer: lapin::Consumer,
}

/// A delivery and the Case it becomes.
struct Work {
    delivery: Delivery,
    record: CaseRecord,
}

impl Shared {
    fn name(&self) -> &str {
        &self.division.config.name
    }

    fn sf(&self) -> &SalesforceMetrics {
        &self.metrics.salesforce
    }

    async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.amqp.reconnect_min, self.amqp.reconnect_max);
        let broker = crate::config::redact_url(self.amqp.url.expose());
        let mut down_since: Option<Instant> = None;
        let connected = self
            .sf()
            .amqp_connected
            .get_or_create(&SalesforceMetrics::division(self.name()))
            .clone();
        loop {
            match self.connect().await {
                Ok(session) => {
                    backoff.reset();
                    connected.set(1);
                    match down_since.take() {
                        Some(t) => {
                            tracing::info!(division = %self.name(), %broker, down_for = ?t.elapsed(), "Salesforce connector reconnected to RabbitMQ")
                        }
                        None => {
                            tracing::info!(division = %self.name(), %broker, queue = %self.division.queue, "Salesforce connector consuming")
                        }
                    }
                    let result = self.clone().consume(&session, &cancel).await;
                    connected.set(0);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        session.connection.close(200, "edgecase connector stopping".into()),
                    )
                    .await;
                    match result {
                        Ok(()) => break,
                        Err(e) => {
                            down_since = Some(Instant::now());
                            tracing::warn!(division = %self.name(), %broker, error = %e, "RabbitMQ session ended; unacknowledged messages will be redelivered; reconnecting");
                        }
                    }
                }
                Err(e) => {
                    if down_since.is_none() {
                        down_since = Some(Instant::now());
                        tracing::warn!(division = %self.name(), %broker, error = %e, "RabbitMQ unavailable; retrying with backoff");
                    } else {
                        tracing::debug!(division = %self.name(), error = %e, "RabbitMQ still unavailable");
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        tracing::info!(division = %self.name(), "Salesforce division stopped");
    }

    async fn connect(&self) -> Result<AmqpSession, String> {
        crate::tls::install_crypto_provider();
        let props =
            ConnectionProperties::default().with_connection_name(format!("edgecase salesforce {}", self.name()).into());
        let connection = tokio::time::timeout(
            Duration::from_secs(15),
            Connection::connect(self.amqp.url.expose(), props),
        )
        .await
        .map_err(|_| "connect timed out after 15s".to_string())?
        .map_err(|e| e.to_string())?;
        let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
        declare_exchanges(&channel, &self.amqp).await?;
        let d = &self.division;
        let mut type_args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            type_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(d.dead_letter_queue.as_str().into(), durable, type_args.clone())
            .await
            .map_err(|e| format!("queue {}: {e}", d.dead_letter_queue))?;
        channel
            .queue_bind(
                d.dead_letter_queue.as_str().into(),
                self.amqp.dead_letter_exchange.as_str().into(),
                d.dead_letter_queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        // Messages an operator rejects, or that outlive a delivery limit, land in the same
        // dead-letter queue.
        let mut args = type_args;
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.amqp.dead_letter_exchange.as_str().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(d.dead_letter_queue.as_str().into()),
        );
        channel
            .queue_declare(d.queue.as_str().into(), durable, args)
            .await
            .map_err(|e| {
                format!(
                    "queue {}: {e} (if it exists with other arguments, delete it or choose another divisions[].queue)",
                    d.queue
                )
            })?;
        channel
            .queue_bind(
                d.queue.as_str().into(),
                self.amqp.cases_exchange.as_str().into(),
                d.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let publish = connection.create_channel().await.map_err(|e| e.to_string())?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let tag = format!("edgecase-salesforce-{}-{}", self.name(), std::process::id());
        let consumer = channel
            .basic_consume(
                d.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(AmqpSession {
            connection,
            publish,
            consumer,
        })
    }

    /// The dispatcher: admits deliveries while there is room, keeps one request per
    /// event id, groups records into batches, and collects finished jobs.
    async fn consume(self: Arc<Self>, session: &AmqpSession, cancel: &CancellationToken) -> Result<(), String> {
        let capacity = self.division.config.concurrency;
        let batch_size = self.division.config.batch_size;
        let batch_wait = self.division.config.batch_wait;
        let mut consumer = session.consumer.clone();
        let mut jobs: JoinSet<Result<Vec<String>, String>> = JoinSet::new();
        let mut busy: HashSet<String> = HashSet::new();
        let mut parked: VecDeque<Work> = VecDeque::new();
        let mut batch: Vec<Work> = Vec::new();
        let mut batch_deadline: Option<tokio::time::Instant> = None;
        let in_flight = self
            .sf()
            .in_flight
            .get_or_create(&SalesforceMetrics::division(self.name()))
            .clone();
        let job_cancel = cancel.child_token();
        let result = loop {
            // Send a batch that is full, or old enough, when a request slot is free.
            if !batch.is_empty()
                && jobs.len() < capacity
                && (batch.len() >= batch_size || batch_deadline.is_some_and(|d| d <= tokio::time::Instant::now()))
            {
                let works = std::mem::take(&mut batch);
                batch_deadline = None;
                jobs.spawn(
                    self.clone()
                        .process_batch(session.publish.clone(), works, job_cancel.clone()),
                );
            }
            in_flight.set((busy.len()) as i64);
            let can_read = if batch_size == 1 {
                jobs.len() < capacity
            } else {
                batch.len() < batch_size
            };
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                done = jobs.join_next(), if !jobs.is_empty() => {
                    match done {
                        Some(Ok(Ok(ids))) => {
                            for id in ids {
                                busy.remove(&id);
                            }
                        }
                        Some(Ok(Err(e))) => break Err(e),
                        Some(Err(e)) => break Err(format!("a Salesforce job failed: {e}")),
                        None => {}
                    }
                    // Messages waiting for their event id (or for a free slot) may go now, in
                    // arrival order: one still waiting holds back later ones of its event.
                    let waiting = std::mem::take(&mut parked);
                    let mut held: HashSet<String> = HashSet::new();
                    for work in waiting {
                        let id = &work.record.event_id;
                        let full = if batch_size == 1 {
                            jobs.len() >= capacity
                        } else {
                            batch.len() >= batch_size
                        };
                        if full || busy.contains(id) || held.contains(id) {
                            held.insert(id.clone());
                            parked.push_back(work);
                        } else {
                            self.admit(work, &mut busy, &mut batch, &mut batch_deadline, batch_wait, &mut jobs, &session.publish, &job_cancel);
                        }
                    }
                }
                next = consumer.next(), if can_read => {
                    let delivery = match next {
                        None => break Err("the broker cancelled the consumer".into()),
                        Some(Err(e)) => break Err(e.to_string()),
                        Some(Ok(d)) => d,
                    };
                    match case_record(&delivery.data, &self.division.config) {
                        Err(bad) => {
                            // Not a case message: dead-lettered with the reason, off the dispatcher.
                            let (me, publish) = (self.clone(), session.publish.clone());
                            jobs.spawn(async move {
                                me.dead_letter(&publish, &delivery, Reason::BadMessage(bad.0)).await?;
                                ack(&delivery).await?;
                                Ok(Vec::new())
                            });
                        }
                        Ok(record) => {
                            let work = Work { delivery, record };
                            let id = &work.record.event_id;
                            if busy.contains(id) || parked.iter().any(|w| &w.record.event_id == id) {
                                parked.push_back(work);
                            } else {
                                self.admit(work, &mut busy, &mut batch, &mut batch_deadline, batch_wait, &mut jobs, &session.publish, &job_cancel);
                            }
                        }
                    }
                }
                _ = sleep_until_opt(batch_deadline), if !batch.is_empty() && jobs.len() < capacity => {}
            }
        };
        in_flight.set(0);
        if result.is_ok() && !jobs.is_empty() {
            // Stopping: requests in flight may finish and be acknowledged; the rest is
            // redelivered after restart.
            let drain = async { while jobs.join_next().await.is_some() {} };
            if tokio::time::timeout(DRAIN, drain).await.is_err() {
                tracing::info!(division = %self.name(), "stopping with requests in flight; they will be redelivered");
            }
        }
        job_cancel.cancel();
        jobs.abort_all();
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        self: &Arc<Self>,
        work: Work,
        busy: &mut HashSet<String>,
        batch: &mut Vec<Work>,
        batch_deadline: &mut Option<tokio::time::Instant>,
        batch_wait: Duration,
        jobs: &mut JoinSet<Result<Vec<String>, String>>,
        publish: &Channel,
        cancel: &CancellationToken,
    ) {
        busy.insert(work.record.event_id.clone());
        if self.division.config.batch_size == 1 {
            jobs.spawn(self.clone().process_one(publish.clone(), work, cancel.clone()));
        } else {
            if batch.is_empty() {
                *batch_deadline = Some(tokio::time::Instant::now() + batch_wait);
            }
            batch.push(work);
        }
    }

    /// One message, one upsert (retried until Salesforce settles it).
    async fn process_one(
        self: Arc<Self>,
        publish: Channel,
        work: Work,
        cancel: CancellationToken,
    ) -> Result<Vec<String>, String> {
        let id = work.record.event_id.clone();
        let Some(outcome) = self.upsert_until_settled(&work.record, &cancel).await else {
            return Ok(vec![id]);
        };
        self.settle(&publish, &work, outcome).await?;
        Ok(vec![id])
    }

    /// Acknowledges a settled message (after dead-lettering it if Salesforce refused it).
    async fn settle(&self, publish: &Channel, work: &Work, outcome: Outcome) -> Result<(), String> {
        let label = SalesforceMetrics::division(self.name());
        match outcome {
            Outcome::Created(sf_id) => {
                tracing::debug!(division = %self.name(), event_id = %work.record.event_id, case = %sf_id, "Case created");
                self.sf().created.get_or_create(&label).inc();
            }
            Outcome::Updated(sf_id) => {
                tracing::debug!(division = %self.name(), event_id = %work.record.event_id, case = %sf_id, "Case updated");
                self.sf().updated.get_or_create(&label).inc();
            }
            Outcome::Rejected(e) => {
                self.dead_letter(publish, &work.delivery, Reason::Salesforce(e)).await?;
            }
            other => return Err(format!("unsettled outcome {other:?}")),
        }
        ack(&work.delivery).await
    }

    /// Retries until Salesforce answers something final: created, updated or refused.
    /// `None` when cancelled first (the message stays unacknowledged).
    async fn upsert_until_settled(&self, record: &CaseRecord, cancel: &CancellationToken) -> Option<Outcome> {
        let mut backoff = Backoff::new(self.retry_min, self.retry_max);
        let mut renewals = 0u32;
        let field = &self.division.config.external_id_field;
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            let session = match self.account.session().await {
                Ok(s) => s,
                Err(e) => {
                    self.failed("login", &e.to_string(), matches!(e, client::AuthError::Refused { .. }));
                    let delay = backoff.next_delay();
                    if !pause(delay, cancel).await {
                        return None;
                    }
                    continue;
                }
            };
            self.limiter.acquire().await;
            let started = Instant::now();
            let label = SalesforceMetrics::division(self.name());
            self.sf().requests.get_or_create(&label).inc();
            let answer = client::upsert(
                &self.http,
                &session,
                &self.api_version,
                field,
                &record.event_id,
                &record.fields,
                self.division.config.auto_assign,
            )
            .await;
            self.sf()
                .request_latency
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
            let outcome = match answer {
                Ok(a) => {
                    self.note_usage(a.api_usage);
                    client::classify(a.status, &a.body)
                }
                Err(e) => Outcome::Retry { reason: e, long: false },
            };
            match outcome {
                Outcome::SessionExpired => {
                    renewals += 1;
                    self.sf().session_renewals.get_or_create(&label).inc();
                    tracing::info!(division = %self.name(), "Salesforce session expired (401 INVALID_SESSION_ID); logging in again");
                    if renewals > 3 && !pause(backoff.next_delay(), cancel).await {
                        return None;
                    }
                    // A failed login is handled at the top of the loop.
                    let _ = self.account.renew(&session).await;
                }
                Outcome::Retry { reason, long } => {
                    self.failed(&reason_class(&reason), &reason, false);
                    let mut delay = backoff.next_delay();
                    if long {
                        delay = delay.max(self.limit_backoff);
                    }
                    if !pause(delay, cancel).await {
                        return None;
                    }
                }
                done => {
                    self.recovered();
                    return Some(done);
                }
            }
        }
    }

    /// A batch through the sObject Collections API; records Salesforce answers for one by
    /// one, the ones to retry go again.
    async fn process_batch(
        self: Arc<Self>,
        publish: Channel,
        works: Vec<Work>,
        cancel: CancellationToken,
    ) -> Result<Vec<String>, String> {
        let ids: Vec<String> = works.iter().map(|w| w.record.event_id.clone()).collect();
        let field = self.division.config.external_id_field.clone();
        let mut pending = works;
        let mut backoff = Backoff::new(self.retry_min, self.retry_max);
        let label = SalesforceMetrics::division(self.name());
        while !pending.is_empty() {
            if cancel.is_cancelled() {
                return Ok(ids);
            }
            let session = match self.account.session().await {
                Ok(s) => s,
                Err(e) => {
                    self.failed("login", &e.to_string(), matches!(e, client::AuthError::Refused { .. }));
                    if !pause(backoff.next_delay(), &cancel).await {
                        return Ok(ids);
                    }
                    continue;
                }
            };
            let records: Vec<Value> = pending
                .iter()
                .map(|w| {
                    let mut m = w.record.fields.clone();
                    m.insert("attributes".into(), serde_json::json!({"type": "Case"}));
                    m.insert(field.clone(), Value::String(w.record.event_id.clone()));
                    Value::Object(m)
                })
                .collect();
            self.limiter.acquire().await;
            let started = Instant::now();
            self.sf().requests.get_or_create(&label).inc();
            let answer = client::upsert_collection(
                &self.http,
                &session,
                &self.api_version,
                &field,
                records,
                self.division.config.auto_assign,
            )
            .await;
            self.sf()
                .request_latency
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
            let results = match answer {
                Ok(a) => {
                    self.note_usage(a.api_usage);
                    client::classify_collection(a.status, &a.body, pending.len())
                }
                Err(e) => Err(Outcome::Retry { reason: e, long: false }),
            };
            match results {
                Ok(outcomes) => {
                    let mut again = Vec::new();
                    let mut long = false;
                    for (work, outcome) in pending.into_iter().zip(outcomes) {
                        match outcome {
                            Outcome::Retry { reason, long: l } => {
                                self.failed(&reason_class(&reason), &reason, false);
                                long |= l;
                                again.push(work);
                            }
                            Outcome::SessionExpired => again.push(work),
                            done => self.settle(&publish, &work, done).await?,
                        }
                    }
                    pending = again;
                    if pending.is_empty() {
                        self.recovered();
                    } else {
                        let mut delay = backoff.next_delay();
                        if long {
                            delay = delay.max(self.limit_backoff);
                        }
                        if !pause(delay, &cancel).await {
                            return Ok(ids);
                        }
                    }
                }
                Err(Outcome::SessionExpired) => {
                    self.sf().session_renewals.get_or_create(&label).inc();
                    tracing::info!(division = %self.name(), "Salesforce session expired (401 INVALID_SESSION_ID); logging in again");
                    let _ = self.account.renew(&session).await;
                }
                Err(Outcome::Rejected(e)) => {
                    // The request as a whole was refused: find out record by record.
                    tracing::warn!(division = %self.name(), error = %e, records = pending.len(), "collections request refused; upserting its records one by one");
                    for work in std::mem::take(&mut pending) {
                        let Some(outcome) = self.upsert_until_settled(&work.record, &cancel).await else {
                            return Ok(ids);
                        };
                        self.settle(&publish, &work, outcome).await?;
                    }
                }
                Err(Outcome::Retry { reason, long }) => {
                    self.failed(&reason_class(&reason), &reason, false);
                    let mut delay = backoff.next_delay();
                    if long {
                        delay = delay.max(self.limit_backoff);
                    }
                    if !pause(delay, &cancel).await {
                        return Ok(ids);
                    }
                }
                Err(other) => {
                    self.failed("unexpected", &format!("{other:?}"), false);
                    if !pause(backoff.next_delay(), &cancel).await {
                        return Ok(ids);
                    }
                }
            }
        }
        Ok(ids)
    }

    fn note_usage(&self, usage: Option<(u64, u64)>) {
        if let Some((used, max)) = usage {
            let label = SalesforceMetrics::division(self.name());
            self.sf().api_usage.get_or_create(&label).set(used as i64);
            self.sf().api_limit.get_or_create(&label).set(max as i64);
        }
    }

    /// Counts a retry; logs the first failure of a run of them.
    fn failed(&self, class: &str, detail: &str, operator_must_act: bool) {
        self.sf()
            .retries
            .get_or_create(&SalesforceMetrics::reason(self.name(), class))
            .inc();
        if !self.failing.swap(true, Ordering::Relaxed) {
            if operator_must_act {
                tracing::error!(division = %self.name(), error = %detail, "Salesforce refused the login; check the division's credentials; retrying with backoff");
            } else {
                tracing::warn!(division = %self.name(), error = %detail, "Salesforce request failed; retrying with backoff");
            }
        } else {
            tracing::debug!(division = %self.name(), error = %detail, "Salesforce request failed again");
        }
    }

    fn recovered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(division = %self.name(), "Salesforce requests succeed again");
        }
    }

    /// Publishes the message to the dead-letter exchange (routing key = the division's
    /// dead-letter queue) with the reason in headers, and waits for the broker's confirm.
    async fn dead_letter(&self, publish: &Channel, delivery: &Delivery, reason: Reason) -> Result<(), String> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        let code = match &reason {
            Reason::Salesforce(e) => {
                headers.insert("x-salesforce-status".into(), AMQPValue::LongInt(i32::from(e.status)));
                headers.insert("x-salesforce-error-code".into(), text(&e.code));
                headers.insert("x-salesforce-error-message".into(), text(&e.message));
                headers.insert("x-salesforce-error-fields".into(), text(&e.fields.join(",")));
                e.code.clone()
            }
            Reason::BadMessage(why) => {
                headers.insert("x-edgecase-error".into(), text(why));
                "bad_message".to_string()
            }
        };
        headers.insert("x-edgecase-division".into(), text(self.name()));
        headers.insert("x-edgecase-original-exchange".into(), text(delivery.exchange.as_str()));
        headers.insert(
            "x-edgecase-original-routing-key".into(),
            text(delivery.routing_key.as_str()),
        );
        let p = &delivery.properties;
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
            .with_content_type(
                p.content_type()
                    .clone()
                    .unwrap_or_else(|| ShortString::from("application/json")),
            );
        if let Some(id) = p.message_id() {
            props = props.with_message_id(id.clone());
        }
        if let Some(ts) = p.timestamp() {
            props = props.with_timestamp(*ts);
        }
        let confirm = publish
            .basic_publish(
                self.amqp.dead_letter_exchange.as_str().into(),
                self.division.dead_letter_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                props,
            )
            .await
            .map_err(|e| format!("dead-letter publish: {e}"))?
            .await
            .map_err(|e| format!("dead-letter confirm: {e}"))?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(_)) => {
                return Err(format!(
                    "dead-letter queue {} is not bound to {}",
                    self.division.dead_letter_queue, self.amqp.dead_letter_exchange
                ));
            }
            Confirmation::Nack(_) => return Err("the broker refused the dead-letter copy".into()),
        }
        self.sf()
            .dead_lettered
            .get_or_create(&SalesforceMetrics::reason(self.name(), &code))
            .inc();
        match reason {
            Reason::Salesforce(e) => {
                tracing::warn!(division = %self.name(), queue = %self.division.dead_letter_queue, message_id = ?p.message_id().as_ref().map(|s| s.as_str()), error = %e, "Salesforce refused the case; dead-lettered")
            }
            Reason::BadMessage(why) => {
                tracing::warn!(division = %self.name(), queue = %self.division.dead_letter_queue, reason = %why, "not a case message; dead-lettered")
            }
        }
        Ok(())
    }
}

/// The cases exchange, its alternate exchange and queue, and the dead-letter exchange,
/// with the same arguments the agent uses, so either may start first.
async fn declare_exchanges(channel: &Channel, cfg: &AmqpConfig) -> Result<(), String> {
    crate::publish::amqp::declare_exchanges(channel, cfg, &[&cfg.cases_exchange])
        .await
        .map_err(|e| match e {
            crate::publish::amqp::Error::Topology(what) => {
                format!("{what} (it exists with other settings; delete it or choose another name in tenant.amqp)")
            }
            other => other.to_string(),
        })
}

enum Reason {
    Salesforce(SfError),
    BadMessage(String),
}

async fn ack(delivery: &Delivery) -> Result<(), String> {
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("ack: {e}"))
}

/// Sleeps, unless cancelled first (then false).
async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A short label for a retry reason: the error code, `timeout` or `connect`.
fn reason_class(reason: &str) -> String {
    if reason.starts_with("timed out") {
        "timeout".into()
    } else if reason.starts_with("cannot connect") {
        "connect".into()
    } else if let Some(code) = reason.split_whitespace().nth(1).filter(|c| {
        c.chars()
            .all(|ch| ch.is_ascii_uppercase() || ch == '_' || ch == ':' || ch.is_ascii_digit())
    }) {
        code.trim_end_matches(':').to_string()
    } else {
        "other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_reasons_are_classes() {
        assert_eq!(reason_class("503 HTTP_503"), "HTTP_503");
        assert_eq!(
            reason_class("403 REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded."),
            "REQUEST_LIMIT_EXCEEDED"
        );
        assert_eq!(reason_class("timed out: operation timed out"), "timeout");
        assert_eq!(reason_class("cannot connect: refused"), "connect");
    }
}
