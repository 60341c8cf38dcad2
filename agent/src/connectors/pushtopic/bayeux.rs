//! A CometD (Bayeux 1.0) long-polling client for Salesforce's Streaming API, with the
//! replay extension: handshake, subscribe (`ext.replay = {channel: id}`), connect,
//! disconnect. It keeps the cookies the server sets (`BAYEUX_BROWSER`, the load balancer's)
//! and returns them, as Salesforce requires, and reads every error from the reply body
//! (`successful:false`, `error:"<code>::<text>"`), where Salesforce puts them with HTTP 200.
//!
//! [`classify`] turns a failed reply into what the caller must do (pure, unit tested).

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a failed exchange asks of the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// `401::` (or a handshake denied for a `401::` reason): log in again, then handshake.
    Auth(String),
    /// `403::Unknown client` or advice `handshake`: handshake again and re-subscribe.
    Rehandshake(String),
    /// `400::The replayId {N} you provided was invalid...`: N is no longer retained.
    InvalidReplay(String),
    /// Stop: the channel does not exist, the daily event allowance is used up, or the
    /// user may not stream. Retrying the same request cannot help.
    Fatal(String),
    /// Transport trouble or a server error: retry after a pause.
    Retry(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Auth(m) => write!(f, "authentication: {m}"),
            Failure::Rehandshake(m) => write!(f, "session lost: {m}"),
            Failure::InvalidReplay(m) => write!(f, "replay id refused: {m}"),
            Failure::Fatal(m) => write!(f, "{m}"),
            Failure::Retry(m) => write!(f, "{m}"),
        }
    }
}

/// The policy for one unsuccessful Bayeux reply.
pub fn classify(reply: &Value) -> Failure {
    let error = reply["error"].as_str().unwrap_or("no error text").to_string();
    let reason = reply["ext"]["sfdc"]["failureReason"].as_str().unwrap_or_default();
    let reconnect = reply["advice"]["reconnect"].as_str().unwrap_or_default();
    let text = if reason.is_empty() {
        error.clone()
    } else {
        format!("{error} ({reason})")
    };
    if error.starts_with("401::") || reason.starts_with("401::") {
        Failure::Auth(text)
    } else if error.contains("replayId") && error.contains("invalid") {
        Failure::InvalidReplay(text)
    } else if error.starts_with("403::Unknown client") || reconnect == "handshake" {
        Failure::Rehandshake(text)
    } else if error.contains("does not exist")
        || error.contains("daily limit")
        || error.contains("not enabled for streaming")
        || error.starts_with("400::Invalid connection type")
    {
        Failure::Fatal(text)
    } else if error.contains("has established a session, but no") {
        // A lost cookie: start over with a fresh session.
        Failure::Rehandshake(text)
    } else {
        Failure::Retry(text)
    }
}

/// One PushTopic event from a connect reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub replay_id: i64,
    /// `created`, `updated`, `deleted` or `undeleted`.
    pub kind: String,
    pub created_date: String,
    pub sobject: serde_json::Map<String, Value>,
}

impl Event {
    pub fn parse(msg: &Value) -> Option<Event> {
        let data = &msg["data"];
        Some(Event {
            replay_id: data["event"]["replayId"].as_i64()?,
            kind: data["event"]["type"].as_str().unwrap_or_default().to_string(),
            created_date: data["event"]["createdDate"].as_str().unwrap_or_default().to_string(),
            sobject: data["sobject"].as_object().cloned().unwrap_or_default(),
        })
    }
}

/// Server advice, remembered across replies.
#[derive(Debug, Clone, PartialEq)]
pub struct Advice {
    pub interval: Duration,
    pub timeout: Duration,
}

pub struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
    cookies: BTreeMap<String, String>,
    client_id: Option<String>,
    next_id: u64,
    pub advice: Advice,
}

impl Client {
    /// `url` is `{instance_url}/cometd/{version}`.
    pub fn new(http: reqwest::Client, url: String, token: String) -> Client {
        Client {
            http,
            url,
            token,
            cookies: BTreeMap::new(),
            client_id: None,
            next_id: 0,
            advice: Advice {
                interval: Duration::ZERO,
                timeout: Duration::from_secs(110),
            },
        }
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// Posts messages; returns the replies. `hold` is how long the server may keep the
    /// request (the advice timeout for a connect).
    async fn send(&mut self, messages: Value, hold: Duration) -> Result<Vec<Value>, Failure> {
        let mut req = self
            .http
            .post(&self.url)
            .timeout(hold + Duration::from_secs(30))
            .header("Authorization", format!("Bearer {}", self.token))
            .json(&messages);
        if !self.cookies.is_empty() {
            let c: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header("Cookie", c.join("; "));
        }
        let resp = req.send().await.map_err(|e| {
            Failure::Retry(format!(
                "POST {}: {}",
                self.url,
                crate::connectors::salesforce::client::describe_reqwest(&e)
            ))
        })?;
        for v in resp.headers().get_all("set-cookie") {
            if let Some((k, v)) = v
                .to_str()
                .ok()
                .and_then(|s| s.split(';').next())
                .and_then(|kv| kv.split_once('='))
            {
                self.cookies.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| Failure::Retry(format!("reading the answer of {}: {e}", self.url)))?;
        if status == 401 {
            return Err(Failure::Auth(format!("HTTP 401 from {}", self.url)));
        }
        if status == 400 && !body.starts_with(b"[") {
            // A wrong URL or version: repeating it cannot help.
            return Err(Failure::Fatal(format!(
                "HTTP 400 from {}: {}",
                self.url,
                String::from_utf8_lossy(&body)
            )));
        }
        if status != 200 {
            return Err(Failure::Retry(format!(
                "HTTP {status} from {}: {}",
                self.url,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )));
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Array(a)) => Ok(a),
            Ok(o @ Value::Object(_)) => Ok(vec![o]),
            _ => Err(Failure::Retry(format!("{}: the answer is not Bayeux JSON", self.url))),
        }
    }

    fn take_advice(&mut self, reply: &Value) {
        if let Some(i) = reply["advice"]["interval"].as_u64() {
            self.advice.interval = Duration::from_millis(i);
        }
        if let Some(t) = reply["advice"]["timeout"].as_u64() {
            self.advice.timeout = Duration::from_millis(t);
        }
    }

    /// The reply on `channel`, or a failure if it is missing or unsuccessful.
    fn reply_on<'a>(replies: &'a [Value], channel: &str) -> Result<&'a Value, Failure> {
        let r = replies
            .iter()
            .find(|r| r["channel"] == channel)
            .ok_or_else(|| Failure::Retry(format!("no {channel} reply")))?;
        if r["successful"].as_bool() == Some(true) {
            Ok(r)
        } else {
            Err(classify(r))
        }
    }

    /// Starts a session; fails unless the server offers the replay extension.
    pub async fn handshake(&mut self, timeout: Duration) -> Result<(), Failure> {
        self.client_id = None;
        self.cookies.clear();
        let id = self.id();
        let msg = json!([{"channel": "/meta/handshake", "version": "1.0", "minimumVersion": "1.0",
            "supportedConnectionTypes": ["long-polling"], "ext": {"replay": true}, "id": id}]);
        let replies = self.send(msg, timeout).await?;
        let r = Self::reply_on(&replies, "/meta/handshake")?.clone();
        if r["ext"]["replay"].as_bool() != Some(true) {
            return Err(Failure::Fatal(
                "the server does not offer the replay extension; resuming after a restart would lose events".into(),
            ));
        }
        self.take_advice(&r);
        self.client_id = r["clientId"].as_str().map(String::from);
        if self.client_id.is_none() {
            return Err(Failure::Retry("handshake reply without clientId".into()));
        }
        Ok(())
    }

    /// Subscribes to `channel` from `replay` (-1 new, -2 all retained, N after N).
    pub async fn subscribe(&mut self, channel: &str, replay: i64, timeout: Duration) -> Result<(), Failure> {
        let id = self.id();
        let msg = json!([{"channel": "/meta/subscribe", "clientId": self.client_id, "subscription": channel,
            "ext": {"replay": {channel: replay}}, "id": id}]);
        let replies = self.send(msg, timeout).await?;
        Self::reply_on(&replies, "/meta/subscribe").map(|_| ())
    }

    /// One long poll: the events it brought, in the server's order.
    pub async fn connect(&mut self) -> Result<Vec<Value>, Failure> {
        let id = self.id();
        let msg = json!([{"channel": "/meta/connect", "clientId": self.client_id,
            "connectionType": "long-polling", "id": id}]);
        let hold = self.advice.timeout;
        let replies = self.send(msg, hold).await?;
        let r = Self::reply_on(&replies, "/meta/connect")?.clone();
        self.take_advice(&r);
        Ok(replies
            .into_iter()
            .filter(|m| m["channel"].as_str().is_some_and(|c| !c.starts_with("/meta/")))
            .collect())
    }

    /// Ends the session (best effort).
    pub async fn disconnect(&mut self) {
        if self.client_id.is_some() {
            let id = self.id();
            let msg = json!([{"channel": "/meta/disconnect", "clientId": self.client_id, "id": id}]);
            let _ = self.send(msg, Duration::from_secs(5)).await;
            self.client_id = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salesforce_errors_map_to_actions() {
        assert!(matches!(
            classify(&json!({"error": "401::Authentication invalid", "advice": {"reconnect": "none"}})),
            Failure::Auth(_)
        ));
        assert!(matches!(
            classify(
                &json!({"ext":{"sfdc":{"failureReason":"401::Authentication invalid"}},"advice":{"reconnect":"none"},"error":"403::Handshake denied","successful":false})
            ),
            Failure::Auth(_)
        ));
        assert!(matches!(
            classify(&json!({"error": "403::Unknown client", "advice": {"reconnect": "handshake", "interval": 0}})),
            Failure::Rehandshake(_)
        ));
        // Salesforce's text has a double space after "invalid." in some traffic.
        assert!(matches!(
            classify(
                &json!({"error": "400::The replayId {12} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."})
            ),
            Failure::InvalidReplay(_)
        ));
        assert!(matches!(
            classify(&json!({"error": "400::The channel you requested to subscribe to does not exist {/topic/X}"})),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            classify(&json!({"error": "403::Organization total events daily limit exceeded"})),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            classify(&json!({"error": "503::Server is too busy"})),
            Failure::Retry(_)
        ));
    }

    #[test]
    fn events_are_read_from_the_data() {
        let e = Event::parse(&json!({"channel": "/topic/C", "data": {"event": {"createdDate": "2021-08-05T17:49:08.990Z", "replayId": 7, "type": "created"}, "sobject": {"Id": "500A"}}})).unwrap();
        assert_eq!(e.replay_id, 7);
        assert_eq!(e.kind, "created");
        assert_eq!(e.sobject["Id"], "500A");
        assert!(Event::parse(&json!({"channel": "/topic/C", "data": {}})).is_none());
    }
}
