//! The Streaming API for PushTopics: a Bayeux (CometD) long-polling endpoint at
//! `POST /cometd/{version}` with Salesforce's replay extension, fed by the org's record
//! changes. Follows §4 and §5 of the project's `salesforce-api.md`.
//!
//! - PushTopic records are ordinary sObjects (`/sobjects/PushTopic`, SOQL over
//!   `PushTopic`); [`push_topic_schema`] describes them. `Name` is unique.
//! - Every Case (or other object) change the REST API makes is matched against each active
//!   PushTopic: its object, its `NotifyForOperation*` flags, its `WHERE` clause and, for
//!   updates, its `NotifyForFields` (`All`, `Referenced`, `Select`, `Where`). A match
//!   becomes an event on `/topic/{Name}` with `{event:{createdDate, replayId, type},
//!   sobject:{the SELECT's fields}}`. Replay ids increase with gaps (never by one
//!   throughout), as Salesforce's do. Undelete is never emitted: the emulator has no
//!   recycle bin.
//! - Events are retained per channel for [`StreamingSettings::retention_ms`] (24 h by
//!   default) and at most [`StreamingSettings::retention_max_events`]; subscribe replays
//!   them with `ext.replay` `-2` (all retained), `N` (after `N`, which must still be
//!   retained, else `400::The replayId {N} you provided was invalid...`) or `-1` (new only).
//! - Handshake sets a `BAYEUX_BROWSER` cookie that later messages must carry. The first
//!   connect answers at once with `advice {interval 0, timeout, reconnect retry}`; later
//!   ones are held up to `connect_timeout_ms` (110 s) or until events arrive. A client that
//!   does not connect again within `client_timeout_ms` (40 s) is forgotten (`403::Unknown
//!   client`, advice handshake). An expired or unknown session token gives `403::Handshake
//!   denied` (failureReason `401::Authentication invalid`) on handshake and
//!   `401::Authentication invalid` (advice none) on other messages.
//! - Test control (not Salesforce): `GET/PATCH /__emulator/streaming/settings`,
//!   `POST /__emulator/streaming/drop-clients` (as after a server restart),
//!   `POST /__emulator/streaming/expire-sessions` (ends every session and wakes held
//!   connects, so they answer `401::`), `GET /__emulator/streaming/stats`.

use crate::org::{ChangeEvent, ChangeKind, FieldDef, FieldKind, ObjectSchema, Org};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast};

/// Oldest API version the Streaming endpoint accepts.
pub const MIN_STREAMING_VERSION: f64 = 37.0;

/// Streaming settings tests change while the emulator runs.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct StreamingSettings {
    /// How long events stay replayable (PushTopic: 24 h).
    pub retention_ms: u64,
    /// At most this many events per channel are retained (oldest dropped first).
    pub retention_max_events: usize,
    /// How long a connect is held when there is nothing to deliver (Salesforce: 110 s).
    pub connect_timeout_ms: u64,
    /// A client that sends nothing for this long is forgotten (Salesforce: 40 s).
    pub client_timeout_ms: u64,
    /// At most this many events in one connect reply.
    pub max_batch: usize,
}

impl Default for StreamingSettings {
    fn default() -> Self {
        StreamingSettings {
            retention_ms: 24 * 3600 * 1000,
            retention_max_events: 100_000,
            connect_timeout_ms: 110_000,
            client_timeout_ms: 40_000,
            max_batch: 1000,
        }
    }
}

/// Counts for tests and benchmarks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamingStats {
    pub handshakes: u64,
    pub handshakes_denied: u64,
    pub connects: u64,
    pub events_emitted: u64,
    pub events_delivered: u64,
    pub invalid_replay: u64,
    pub unknown_client: u64,
    pub auth_invalid: u64,
    /// Record changes the streaming task missed because it fell behind the org's channel.
    pub changes_lagged: u64,
}

/// The PushTopic sObject: `0IF` ids, `Name` unique (max 25), `Query` (max 1,300).
pub fn push_topic_schema() -> ObjectSchema {
    fn f(name: &str, kind: FieldKind, writable: bool) -> FieldDef {
        FieldDef {
            name: name.into(),
            label: name.into(),
            kind,
            createable: writable,
            updateable: writable,
            external_id: false,
        }
    }
    use FieldKind::*;
    let mut name = f("Name", Text(25), true);
    // Unique: the org's external-id check refuses a second topic with the same name.
    name.external_id = true;
    ObjectSchema {
        name: "PushTopic".into(),
        key_prefix: "0IF".into(),
        fields: vec![
            f("Id", Id, false),
            f("IsDeleted", Boolean, false),
            name,
            f("Query", Text(1300), true),
            f("ApiVersion", Double, true),
            f("IsActive", Boolean, true),
            f("Description", Text(400), true),
            f("NotifyForFields", Picklist, true),
            f("NotifyForOperationCreate", Boolean, true),
            f("NotifyForOperationUpdate", Boolean, true),
            f("NotifyForOperationDelete", Boolean, true),
            f("NotifyForOperationUndelete", Boolean, true),
            f("CreatedDate", DateTime, false),
            f("CreatedById", Reference, false),
            f("LastModifiedDate", DateTime, false),
            f("LastModifiedById", Reference, false),
            f("SystemModstamp", DateTime, false),
        ],
    }
}

struct Client {
    cookie: String,
    subscriptions: Vec<String>,
    queue: VecDeque<Value>,
    last_seen: Instant,
    connected: bool,
    wake: Arc<Notify>,
}

struct Retained {
    replay_id: i64,
    at: Instant,
    message: Value,
}

struct Shared {
    settings: StreamingSettings,
    clients: HashMap<String, Client>,
    channels: HashMap<String, VecDeque<Retained>>,
    last_replay_id: i64,
    emitted: u64,
    stats: StreamingStats,
}

/// The Streaming API's state; shared by the Bayeux handler and the task that turns record
/// changes into events.
pub struct Streaming {
    org: Arc<Org>,
    state: Mutex<Shared>,
}

/// A PushTopic as the matcher reads it.
struct Topic {
    channel: String,
    query: crate::soql::Query,
    select: Vec<String>,
    where_fields: Vec<String>,
    notify_fields: String,
    on_create: bool,
    on_update: bool,
    on_delete: bool,
}

impl Streaming {
    /// Starts the task that turns `org`'s record changes into events; it ends when the
    /// returned value is dropped.
    pub fn start(org: Arc<Org>) -> Arc<Streaming> {
        let changes = org.subscribe_changes();
        let s = Arc::new(Streaming {
            org,
            state: Mutex::new(Shared {
                settings: StreamingSettings::default(),
                clients: HashMap::new(),
                channels: HashMap::new(),
                last_replay_id: 0,
                emitted: 0,
                stats: StreamingStats::default(),
            }),
        });
        tokio::spawn(run(Arc::downgrade(&s), changes));
        s
    }

    // A std Mutex: no lock is held across an await.
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> StreamingSettings {
        self.lock().settings.clone()
    }

    pub fn update_settings(&self, f: impl FnOnce(&mut StreamingSettings)) {
        f(&mut self.lock().settings);
    }

    pub fn stats(&self) -> StreamingStats {
        self.lock().stats.clone()
    }

    /// Forgets every client, as a server restart does: their next message gets
    /// `403::Unknown client`. Held connects answer at once.
    pub fn drop_clients(&self) {
        let mut g = self.lock();
        for c in g.clients.values() {
            c.wake.notify_one();
        }
        g.clients.clear();
    }

    /// Ends every session and wakes held connects, which then answer `401::`.
    pub fn expire_sessions(&self) {
        self.org.expire_sessions();
        for c in self.lock().clients.values() {
            c.wake.notify_one();
        }
    }

    /// The replay ids retained on `channel`, oldest first.
    pub fn retained(&self, channel: &str) -> Vec<i64> {
        let g = self.lock();
        g.channels
            .get(channel)
            .map(|q| q.iter().map(|r| r.replay_id).collect())
            .unwrap_or_default()
    }

    fn topics(&self) -> Vec<Topic> {
        self.org
            .records("PushTopic")
            .iter()
            .filter(|r| r.get("IsActive").and_then(Value::as_bool) != Some(false))
            .filter_map(parse_topic)
            .collect()
    }

    /// Matches one change against the topics and records the events.
    fn on_change(&self, change: &ChangeEvent) {
        let topics = self.topics();
        let mut g = self.lock();
        expire(&mut g);
        for t in topics
            .iter()
            .filter(|t| t.query.object.eq_ignore_ascii_case(&change.object))
        {
            let kind = match change.kind {
                ChangeKind::Created if t.on_create => "created",
                ChangeKind::Updated if t.on_update => "updated",
                ChangeKind::Deleted if t.on_delete => "deleted",
                _ => continue,
            };
            if let Some(filter) = &t.query.filter
                && !crate::soql::matches(filter, &change.record)
            {
                continue;
            }
            if change.kind == ChangeKind::Updated {
                let watched: Vec<&String> = match t.notify_fields.to_ascii_lowercase().as_str() {
                    "all" => Vec::new(),
                    "select" => t.select.iter().collect(),
                    "where" => t.where_fields.iter().collect(),
                    _ => t.select.iter().chain(t.where_fields.iter()).collect(),
                };
                let all = t.notify_fields.eq_ignore_ascii_case("all");
                if !all
                    && !change
                        .changed_fields
                        .iter()
                        .any(|c| watched.iter().any(|w| w.eq_ignore_ascii_case(c)))
                {
                    continue;
                }
            }
            // Replay ids increase, with gaps: clients must store them, never compute them.
            g.emitted += 1;
            g.last_replay_id += if g.emitted.is_multiple_of(4) { 2 } else { 1 };
            let replay_id = g.last_replay_id;
            let mut sobject = Map::new();
            for f in &t.select {
                let (k, v) = change
                    .record
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(f))
                    .map_or((f.clone(), Value::Null), |(k, v)| (k.clone(), v.clone()));
                sobject.insert(k, v);
            }
            let message = json!({
                "channel": t.channel,
                "data": {
                    "event": {
                        "createdDate": crate::org::sf_datetime(change.at_ms),
                        "replayId": replay_id,
                        "type": kind,
                    },
                    "sobject": sobject,
                },
            });
            g.stats.events_emitted += 1;
            let max = g.settings.retention_max_events.max(1);
            let log = g.channels.entry(t.channel.clone()).or_default();
            log.push_back(Retained {
                replay_id,
                at: Instant::now(),
                message: message.clone(),
            });
            while log.len() > max {
                log.pop_front();
            }
            for c in g.clients.values_mut() {
                if c.subscriptions.contains(&t.channel) {
                    c.queue.push_back(message.clone());
                    c.wake.notify_one();
                }
            }
        }
    }
}

fn parse_topic(r: &Map<String, Value>) -> Option<Topic> {
    let name = r.get("Name")?.as_str()?;
    let query = crate::soql::parse(r.get("Query")?.as_str()?).ok()?;
    let select = match &query.selection {
        crate::soql::Selection::Fields(f) => f.clone(),
        crate::soql::Selection::Count => return None,
    };
    let n_select = select.len();
    let where_fields = query.fields().into_iter().skip(n_select).collect();
    let flag = |k: &str| r.get(k).and_then(Value::as_bool).unwrap_or(true);
    Some(Topic {
        channel: format!("/topic/{name}"),
        select,
        where_fields,
        notify_fields: r
            .get("NotifyForFields")
            .and_then(Value::as_str)
            .unwrap_or("Referenced")
            .to_string(),
        on_create: flag("NotifyForOperationCreate"),
        on_update: flag("NotifyForOperationUpdate"),
        on_delete: flag("NotifyForOperationDelete"),
        query,
    })
}

/// Drops events past retention and clients that went quiet.
fn expire(g: &mut Shared) {
    let now = Instant::now();
    let retention = Duration::from_millis(g.settings.retention_ms);
    for log in g.channels.values_mut() {
        while log.front().is_some_and(|r| now.duration_since(r.at) > retention) {
            log.pop_front();
        }
    }
    let quiet = Duration::from_millis(g.settings.client_timeout_ms);
    g.clients.retain(|_, c| now.duration_since(c.last_seen) <= quiet);
}

async fn run(streaming: Weak<Streaming>, mut changes: broadcast::Receiver<ChangeEvent>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            change = changes.recv() => {
                let Some(s) = streaming.upgrade() else { return };
                match change {
                    Ok(c) => s.on_change(&c),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "Streaming API emulation fell behind the record changes");
                        s.lock().stats.changes_lagged += n;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
            _ = tick.tick() => {
                let Some(s) = streaming.upgrade() else { return };
                expire(&mut s.lock());
            }
        }
    }
}

/// The HTTP routes of the Streaming API and its test controls.
pub fn router(streaming: Arc<Streaming>) -> Router {
    Router::new()
        .route("/cometd", post(no_version))
        .route("/cometd/", post(no_version))
        .route("/cometd/{version}", post(bayeux))
        .route(
            "/__emulator/streaming/settings",
            get(get_settings).patch(patch_settings),
        )
        .route("/__emulator/streaming/stats", get(get_stats))
        .route("/__emulator/streaming/drop-clients", post(drop_clients))
        .route("/__emulator/streaming/expire-sessions", post(expire_sessions))
        .with_state(streaming)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    r
}

async fn no_version() -> Response {
    (
        StatusCode::BAD_REQUEST,
        "API version in the URI is mandatory. URI format: '/cometd/37.0'",
    )
        .into_response()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn reply(msg: &Map<String, Value>, channel: &str) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("channel".into(), json!(channel));
    if let Some(id) = msg.get("id") {
        // Echo the id as sent: a string in traffic, a number in the docs.
        r.insert("id".into(), id.clone());
    }
    if let Some(c) = msg.get("clientId") {
        r.insert("clientId".into(), c.clone());
    }
    r
}

fn failure(mut r: Map<String, Value>, error: String, advice: Option<Value>) -> Value {
    r.insert("successful".into(), json!(false));
    r.insert("error".into(), json!(error));
    if let Some(a) = advice {
        r.insert("advice".into(), a);
    }
    Value::Object(r)
}

async fn bayeux(
    State(s): State<Arc<Streaming>>,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match version.parse::<f64>() {
        Ok(v) if (MIN_STREAMING_VERSION..=crate::http::MAX_VERSION).contains(&v) => {}
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                format!("Unsupported API version. Only versions {MIN_STREAMING_VERSION:.1} and above are supported: {version}"),
            )
                .into_response();
        }
    }
    if body.len() > 32_768 {
        return (StatusCode::PAYLOAD_TOO_LARGE, "Maximum Request Size Exceeded").into_response();
    }
    let messages: Vec<Map<String, Value>> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(a)) => a
            .into_iter()
            .filter_map(|m| match m {
                Value::Object(o) => Some(o),
                _ => None,
            })
            .collect(),
        Ok(Value::Object(o)) => vec![o],
        _ => return (StatusCode::BAD_REQUEST, "Bayeux messages must be a JSON array").into_response(),
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("OAuth ")))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let browser = cookie(&headers, "BAYEUX_BROWSER");
    let mut replies = Vec::new();
    let mut set_cookie = None;
    let mut connect = None;
    for msg in messages {
        let channel = msg
            .get("channel")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if channel == "/meta/connect" && connect.is_none() {
            // Answered last: it may be held until events arrive.
            connect = Some(msg);
            continue;
        }
        let r = match channel.as_str() {
            "/meta/handshake" => {
                let (r, c) = handshake(&s, &msg, &token);
                set_cookie = c.or(set_cookie);
                r
            }
            "/meta/subscribe" | "/meta/unsubscribe" | "/meta/disconnect" => {
                match check_client(&s, &msg, &channel, &token, browser.as_deref()) {
                    Err(e) => e,
                    Ok(client_id) => match channel.as_str() {
                        "/meta/subscribe" => subscribe(&s, &msg, &client_id),
                        "/meta/unsubscribe" => {
                            let sub = msg.get("subscription").and_then(Value::as_str).unwrap_or_default();
                            if let Some(c) = s.lock().clients.get_mut(&client_id) {
                                c.subscriptions.retain(|x| x != sub);
                            }
                            let mut r = reply(&msg, &channel);
                            r.insert("subscription".into(), json!(sub));
                            r.insert("successful".into(), json!(true));
                            Value::Object(r)
                        }
                        _ => {
                            s.lock().clients.remove(&client_id);
                            let mut r = reply(&msg, &channel);
                            r.insert("successful".into(), json!(true));
                            Value::Object(r)
                        }
                    },
                }
            }
            _ => failure(reply(&msg, &channel), "403::Publish denied".into(), None),
        };
        replies.push(r);
    }
    if let Some(msg) = connect {
        let (events, r) = connect_reply(&s, &msg, &token, browser.as_deref()).await;
        replies.extend(events);
        replies.push(r);
    }
    let mut resp = json_response(StatusCode::OK, &Value::Array(replies));
    if let Some(c) = set_cookie
        && let Ok(v) = HeaderValue::from_str(&format!("BAYEUX_BROWSER={c}; Path=/; HttpOnly"))
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

fn handshake(s: &Streaming, msg: &Map<String, Value>, token: &str) -> (Value, Option<String>) {
    let r = reply(msg, "/meta/handshake");
    if s.org.session(token).is_none() {
        s.lock().stats.handshakes_denied += 1;
        let reason = if token.is_empty() {
            "401::Request requires authentication"
        } else {
            "401::Authentication invalid"
        };
        let mut r = r;
        r.insert("ext".into(), json!({"sfdc": {"failureReason": reason}}));
        return (
            failure(r, "403::Handshake denied".into(), Some(json!({"reconnect": "none"}))),
            None,
        );
    }
    let supported = msg
        .get("supportedConnectionTypes")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|t| t.as_str() == Some("long-polling")));
    if !supported {
        return (failure(r, "400::Invalid connection type".into(), None), None);
    }
    let client_id = random_id(27);
    let cookie = random_id(22);
    let mut g = s.lock();
    g.stats.handshakes += 1;
    g.clients.insert(
        client_id.clone(),
        Client {
            cookie: cookie.clone(),
            subscriptions: Vec::new(),
            queue: VecDeque::new(),
            last_seen: Instant::now(),
            connected: false,
            wake: Arc::new(Notify::new()),
        },
    );
    let mut r = r;
    r.insert("clientId".into(), json!(client_id));
    r.insert("version".into(), json!("1.0"));
    r.insert("minimumVersion".into(), json!("1.0"));
    r.insert("supportedConnectionTypes".into(), json!(["long-polling"]));
    r.insert("ext".into(), json!({"replay": true, "payload.format": true}));
    r.insert("successful".into(), json!(true));
    (Value::Object(r), Some(cookie))
}

/// The client id of a message from a live client with a live session, or the error reply.
fn check_client(
    s: &Streaming,
    msg: &Map<String, Value>,
    channel: &str,
    token: &str,
    browser: Option<&str>,
) -> Result<String, Value> {
    let r = reply(msg, channel);
    if s.org.session(token).is_none() {
        s.lock().stats.auth_invalid += 1;
        return Err(failure(
            r,
            "401::Authentication invalid".into(),
            Some(json!({"reconnect": "none", "interval": 0})),
        ));
    }
    let client_id = msg
        .get("clientId")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut g = s.lock();
    expire(&mut g);
    let Some(c) = g.clients.get_mut(&client_id) else {
        g.stats.unknown_client += 1;
        return Err(failure(
            r,
            "403::Unknown client".into(),
            Some(json!({"reconnect": "handshake", "interval": 0})),
        ));
    };
    if browser != Some(c.cookie.as_str()) {
        return Err(failure(
            r,
            format!("400::Client {client_id} has established a session, but no BAYEUX_BROWSER cookie present"),
            None,
        ));
    }
    c.last_seen = Instant::now();
    Ok(client_id)
}

fn subscribe(s: &Streaming, msg: &Map<String, Value>, client_id: &str) -> Value {
    let sub = msg
        .get("subscription")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut r = reply(msg, "/meta/subscribe");
    r.insert("subscription".into(), json!(sub));
    let exists = sub
        .strip_prefix("/topic/")
        .is_some_and(|name| s.topics().iter().any(|t| t.channel == sub && !name.is_empty()));
    if !exists {
        return failure(
            r,
            format!("400::The channel you requested to subscribe to does not exist {{{sub}}}"),
            None,
        );
    }
    // The replay map may name every channel of the client: take this subscription's entry.
    let from = msg
        .get("ext")
        .and_then(|e| e.get("replay"))
        .and_then(|m| m.get(&sub))
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    let mut g = s.lock();
    let backlog: Vec<Value> = {
        let log = g.channels.get(&sub);
        let retained = || log.into_iter().flatten();
        match from {
            -1 => Vec::new(),
            -2 => retained().map(|e| e.message.clone()).collect(),
            n if retained().any(|e| e.replay_id == n) => retained()
                .filter(|e| e.replay_id > n)
                .map(|e| e.message.clone())
                .collect(),
            n => {
                g.stats.invalid_replay += 1;
                return failure(
                    r,
                    format!(
                        "400::The replayId {{{n}}} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."
                    ),
                    None,
                );
            }
        }
    };
    if let Some(c) = g.clients.get_mut(client_id) {
        if !c.subscriptions.contains(&sub) {
            c.subscriptions.push(sub.clone());
        }
        c.queue.extend(backlog);
        if !c.queue.is_empty() {
            c.wake.notify_one();
        }
    }
    r.insert("successful".into(), json!(true));
    Value::Object(r)
}

async fn connect_reply(
    s: &Streaming,
    msg: &Map<String, Value>,
    token: &str,
    browser: Option<&str>,
) -> (Vec<Value>, Value) {
    let client_id = match check_client(s, msg, "/meta/connect", token, browser) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), e),
    };
    if let Some(t) = msg.get("connectionType").and_then(Value::as_str)
        && t != "long-polling"
    {
        return (
            Vec::new(),
            failure(
                reply(msg, "/meta/connect"),
                format!("400::Invalid connection type {t}"),
                None,
            ),
        );
    }
    let (first, wake, timeout) = {
        let mut g = s.lock();
        g.stats.connects += 1;
        let timeout = g.settings.connect_timeout_ms;
        let Some(c) = g.clients.get_mut(&client_id) else {
            return (
                Vec::new(),
                failure(reply(msg, "/meta/connect"), "403::Unknown client".into(), None),
            );
        };
        let first = !c.connected;
        c.connected = true;
        // A held connect keeps the client alive: the 40 s without a connect count from the
        // end of the hold (110 s by default), not its start.
        c.last_seen = Instant::now() + Duration::from_millis(timeout);
        (first, c.wake.clone(), timeout)
    };
    let advice = json!({"interval": 0, "timeout": timeout, "reconnect": "retry"});
    let ok = |events: Vec<Value>| {
        let mut r = reply(msg, "/meta/connect");
        r.insert("successful".into(), json!(true));
        r.insert("advice".into(), advice.clone());
        (events, Value::Object(r))
    };
    if first {
        if let Some(c) = s.lock().clients.get_mut(&client_id) {
            c.last_seen = Instant::now();
        }
        return ok(Vec::new());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
    loop {
        // Register interest before looking, so a wake between the look and the wait counts.
        let notified = wake.notified();
        {
            let mut g = s.lock();
            let max = g.settings.max_batch.max(1);
            let Some(c) = g.clients.get_mut(&client_id) else {
                g.stats.unknown_client += 1;
                return (
                    Vec::new(),
                    failure(
                        reply(msg, "/meta/connect"),
                        "403::Unknown client".into(),
                        Some(json!({"reconnect": "handshake", "interval": 0})),
                    ),
                );
            };
            if !c.queue.is_empty() {
                c.last_seen = Instant::now();
                let n = c.queue.len().min(max);
                let events: Vec<Value> = c.queue.drain(..n).collect();
                g.stats.events_delivered += events.len() as u64;
                return ok(events);
            }
        }
        if s.org.session(token).is_none() {
            s.lock().stats.auth_invalid += 1;
            return (
                Vec::new(),
                failure(
                    reply(msg, "/meta/connect"),
                    "401::Authentication invalid".into(),
                    Some(json!({"reconnect": "none", "interval": 0})),
                ),
            );
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            if let Some(c) = s.lock().clients.get_mut(&client_id) {
                c.last_seen = Instant::now();
            }
            return ok(Vec::new());
        }
    }
}

fn random_id(n: usize) -> String {
    use rand::{Rng, SeedableRng};
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::StdRng::from_os_rng();
    (0..n)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

async fn get_settings(State(s): State<Arc<Streaming>>) -> Response {
    json_response(StatusCode::OK, &json!(s.settings()))
}

async fn patch_settings(State(s): State<Arc<Streaming>>, body: Bytes) -> Response {
    let mut current = json!(s.settings());
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(p)) => Value::Object(p),
        _ => return (StatusCode::BAD_REQUEST, "expected a JSON object of settings").into_response(),
    };
    if let (Value::Object(c), Value::Object(p)) = (&mut current, patch) {
        c.extend(p);
    }
    match serde_json::from_value::<StreamingSettings>(current) {
        Ok(new) => {
            s.update_settings(|x| *x = new.clone());
            json_response(StatusCode::OK, &json!(new))
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("bad streaming settings: {e}")).into_response(),
    }
}

async fn get_stats(State(s): State<Arc<Streaming>>) -> Response {
    json_response(StatusCode::OK, &json!(s.stats()))
}

async fn drop_clients(State(s): State<Arc<Streaming>>) -> Response {
    s.drop_clients();
    StatusCode::NO_CONTENT.into_response()
}

async fn expire_sessions(State(s): State<Arc<Streaming>>) -> Response {
    s.expire_sessions();
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Emulator, EmulatorConfig};

    struct Bayeux {
        s: Arc<Streaming>,
        token: String,
        cookie: Option<String>,
    }

    impl Bayeux {
        async fn send(&mut self, version: &str, msgs: Value) -> (StatusCode, Value) {
            let mut h = HeaderMap::new();
            if !self.token.is_empty() {
                h.insert(header::AUTHORIZATION, format!("OAuth {}", self.token).parse().unwrap());
            }
            if let Some(c) = &self.cookie {
                h.insert(header::COOKIE, format!("BAYEUX_BROWSER={c}").parse().unwrap());
            }
            let r = bayeux(
                State(self.s.clone()),
                Path(version.to_string()),
                h,
                Bytes::from(msgs.to_string()),
            )
            .await;
            let status = r.status();
            if let Some(c) = r.headers().get(header::SET_COOKIE) {
                let v = c.to_str().unwrap();
                self.cookie = Some(
                    v.split(';')
                        .next()
                        .unwrap()
                        .trim_start_matches("BAYEUX_BROWSER=")
                        .to_string(),
                );
            }
            let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }

        async fn handshake(&mut self) -> String {
            let (_, r) = self
                .send("58.0", json!([{"channel": "/meta/handshake", "version": "1.0", "supportedConnectionTypes": ["long-polling"], "id": "1"}]))
                .await;
            r[0]["clientId"].as_str().unwrap_or_default().to_string()
        }

        async fn subscribe(&mut self, client: &str, replay: i64) -> Value {
            let (_, r) = self
                .send("58.0", json!([{"channel": "/meta/subscribe", "clientId": client, "subscription": "/topic/T", "ext": {"replay": {"/topic/T": replay}}}]))
                .await;
            r[0].clone()
        }

        async fn connect(&mut self, client: &str) -> Vec<Value> {
            let (_, r) = self
                .send("58.0", json!([{"channel": "/meta/connect", "clientId": client, "connectionType": "long-polling", "id": 7}]))
                .await;
            r.as_array().cloned().unwrap_or_default()
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[tokio::test]
    async fn errors_retention_notify_fields_and_deletes() {
        let e = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        e.streaming.update_settings(|s| s.connect_timeout_ms = 200);
        let uid = e.org.users()[0].id.clone();
        let token = e.org.open_session(&uid, "edgecase-client-id");
        let mut b = Bayeux {
            s: e.streaming.clone(),
            token: String::new(),
            cookie: None,
        };
        // Versions before 37.0 and no token.
        assert_eq!(b.send("30.0", json!([])).await.0, StatusCode::BAD_REQUEST);
        let (_, r) = b
            .send(
                "58.0",
                json!([{"channel": "/meta/handshake", "supportedConnectionTypes": ["long-polling"]}]),
            )
            .await;
        assert_eq!(r[0]["error"], "403::Handshake denied");
        assert_eq!(
            r[0]["ext"]["sfdc"]["failureReason"],
            "401::Request requires authentication"
        );
        b.token = token;
        let client = b.handshake().await;
        assert!(!client.is_empty());
        // A topic that notifies updates of selected fields only, and deletes.
        e.org
            .create(
                "PushTopic",
                &obj(json!({"Name": "T", "Query": "SELECT Id, Status FROM Case", "ApiVersion": 58.0, "NotifyForFields": "Select"})),
                &uid,
            )
            .unwrap();
        // The cookie is required.
        let cookie = b.cookie.take();
        let r = b.subscribe(&client, -1).await;
        assert!(r["error"].as_str().unwrap().contains("no BAYEUX_BROWSER cookie"), "{r}");
        b.cookie = cookie;
        assert_eq!(b.subscribe(&client, -1).await["successful"], true);
        assert_eq!(b.connect(&client).await.last().unwrap()["advice"]["reconnect"], "retry");
        let id = e.org.create("Case", &obj(json!({"Subject": "x"})), &uid).unwrap();
        e.org
            .update("Case", &id, &obj(json!({"Subject": "not selected"})), &uid)
            .unwrap();
        e.org
            .update("Case", &id, &obj(json!({"Status": "Working"})), &uid)
            .unwrap();
        e.org.delete("Case", &id).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = b.connect(&client).await;
        let kinds: Vec<&str> = got.iter().filter_map(|m| m["data"]["event"]["type"].as_str()).collect();
        assert_eq!(kinds, ["created", "updated", "deleted"], "{got:?}");
        assert_eq!(got[1]["data"]["sobject"], json!({"Id": id, "Status": "Working"}));
        assert_eq!(got.last().unwrap()["id"], 7, "the id is echoed as sent");
        let first = got[0]["data"]["event"]["replayId"].as_i64().unwrap();
        // Past the retention window the id is refused; -2 then replays nothing.
        e.streaming.update_settings(|s| s.retention_ms = 0);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c2 = b.handshake().await;
        let r = b.subscribe(&c2, first).await;
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .starts_with(&format!("400::The replayId {{{first}}} you provided was invalid")),
            "{r}"
        );
        assert_eq!(b.subscribe(&c2, -2).await["successful"], true);
        assert_eq!(b.connect(&c2).await.len(), 1, "only the connect reply");
        // A forgotten client, then an expired session.
        e.streaming.drop_clients();
        let r = b.connect(&c2).await;
        assert_eq!(r[0]["error"], "403::Unknown client");
        assert_eq!(r[0]["advice"]["reconnect"], "handshake");
        let c3 = b.handshake().await;
        b.connect(&c3).await;
        e.streaming.expire_sessions();
        let r = b.connect(&c3).await;
        assert_eq!(r[0]["error"], "401::Authentication invalid");
        assert_eq!(r[0]["advice"]["reconnect"], "none");
        let (_, r) = b
            .send(
                "58.0",
                json!([{"channel": "/meta/handshake", "supportedConnectionTypes": ["long-polling"]}]),
            )
            .await;
        assert_eq!(r[0]["ext"]["sfdc"]["failureReason"], "401::Authentication invalid");
    }

    #[tokio::test]
    async fn a_held_connect_keeps_its_client_alive() {
        let e = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        // Holds longer than the client timeout, as Salesforce's 110 s and 40 s.
        e.streaming.update_settings(|s| {
            s.connect_timeout_ms = 700;
            s.client_timeout_ms = 200;
        });
        let uid = e.org.users()[0].id.clone();
        let mut b = Bayeux {
            s: e.streaming.clone(),
            token: e.org.open_session(&uid, "edgecase-client-id"),
            cookie: None,
        };
        let c = b.handshake().await;
        b.connect(&c).await;
        let held = b.connect(&c).await;
        assert_eq!(held[0]["successful"], true, "{held:?}");
        let next = b.connect(&c).await;
        assert_eq!(
            next[0]["successful"], true,
            "the client survived its own hold: {next:?}"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        let late = b.connect(&c).await;
        assert_eq!(late[0]["error"], "403::Unknown client", "{late:?}");
    }
}
