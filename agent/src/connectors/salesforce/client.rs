//! Salesforce over HTTPS: OAuth 2.0 logins (username-password and JWT bearer), the cached
//! session of each division, single upserts and sObject Collections upserts, and the
//! classification of every answer into what the connector must do with the message.
//!
//! [`classify`] is the policy (pure, unit tested), following the wire facts: 2xx is done;
//! 401 means a new session then the same request again; 403 `REQUEST_LIMIT_EXCEEDED`,
//! 5xx, 408/429, `UNABLE_TO_LOCK_ROW` and `DUPLICATE_VALUE` (two upserts of one new key
//! racing) are retried; other 4xx (validation) are dead-lettered with Salesforce's error.
//! Bodies that are not JSON (an edge proxy's HTML 503) are tolerated.

use super::config::{Division, Grant, Resolved, secure_url};
use crate::config::Secret;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// What to do with a message after one answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: a new Case.
    Created(String),
    /// Done: the Case with this external id existed and was updated.
    Updated(String),
    /// Dead-letter: Salesforce refused the record; retrying cannot help.
    Rejected(SfError),
    /// Retry with backoff; `long` after the daily allowance ran out.
    Retry { reason: String, long: bool },
    /// The session ended: log in again and repeat the request.
    SessionExpired,
}

/// Salesforce's error as it answered, for dead-letter headers and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct SfError {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub fields: Vec<String>,
}

impl std::fmt::Display for SfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)?;
        if !self.fields.is_empty() {
            write!(f, " (fields {})", self.fields.join(", "))?;
        }
        Ok(())
    }
}

/// Error items of a body: `errorCode` (single record) or `statusCode` (collections).
fn error_items(v: &Value) -> Vec<(String, String, Vec<String>)> {
    let list = match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) if o.contains_key("errors") => o["errors"].as_array().cloned().unwrap_or_default(),
        Value::Object(_) => vec![v.clone()],
        _ => Vec::new(),
    };
    list.iter()
        .map(|e| {
            let code = e
                .get("errorCode")
                .or_else(|| e.get("statusCode"))
                .and_then(Value::as_str)
                .unwrap_or("UNKNOWN")
                .to_string();
            let message = e.get("message").and_then(Value::as_str).unwrap_or("").to_string();
            let fields = e
                .get("fields")
                .and_then(Value::as_array)
                .map(|f| f.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            (code, message, fields)
        })
        .collect()
}

/// Codes that are about the moment, not the record.
fn transient(code: &str) -> bool {
    matches!(
        code,
        "UNABLE_TO_LOCK_ROW" | "DUPLICATE_VALUE" | "SERVER_UNAVAILABLE" | "REQUEST_RUNNING_TOO_LONG" | "QUERY_TIMEOUT"
    )
}

/// The policy: one HTTP answer to an upsert → what to do with the message.
pub fn classify(status: u16, body: &[u8]) -> Outcome {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let id = || {
        json.as_ref()
            .and_then(|v| v.get("id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match status {
        201 => Outcome::Created(id()),
        200 => match json.as_ref().and_then(|v| v.get("created")).and_then(Value::as_bool) {
            Some(true) => Outcome::Created(id()),
            _ => Outcome::Updated(id()),
        },
        // Before API v46 an upsert that updated answers 204 with no body.
        204 => Outcome::Updated(String::new()),
        _ => {
            let items = json.as_ref().map(error_items).unwrap_or_default();
            let (code, message, fields) = items.into_iter().next().unwrap_or_else(|| {
                let text = String::from_utf8_lossy(body);
                let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
                (format!("HTTP_{status}"), text.chars().take(200).collect(), Vec::new())
            });
            if status == 401 {
                return Outcome::SessionExpired;
            }
            if code == "REQUEST_LIMIT_EXCEEDED" {
                return Outcome::Retry {
                    reason: format!("{status} {code}: {message}"),
                    long: true,
                };
            }
            if status >= 500 || status == 408 || status == 429 || transient(&code) {
                return Outcome::Retry {
                    reason: format!("{status} {code}"),
                    long: false,
                };
            }
            Outcome::Rejected(SfError {
                status,
                code,
                message,
                fields,
            })
        }
    }
}

/// Per-record results of a collections upsert: one [`Outcome`] per record in order, or
/// `Err` with the outcome for the whole request when it failed as a whole.
pub fn classify_collection(status: u16, body: &[u8], count: usize) -> Result<Vec<Outcome>, Outcome> {
    if status != 200 {
        return Err(classify(status, body));
    }
    let results: Vec<Value> = match serde_json::from_slice(body) {
        Ok(Value::Array(a)) if a.len() == count => a,
        _ => {
            return Err(Outcome::Retry {
                reason: "collections answer is not one result per record".into(),
                long: false,
            });
        }
    };
    Ok(results
        .iter()
        .map(|r| {
            let id = r.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
            if r.get("success").and_then(Value::as_bool) == Some(true) {
                if r.get("created").and_then(Value::as_bool) == Some(true) {
                    Outcome::Created(id)
                } else {
                    Outcome::Updated(id)
                }
            } else {
                let (code, message, fields) =
                    error_items(r)
                        .into_iter()
                        .next()
                        .unwrap_or(("UNKNOWN".into(), String::new(), Vec::new()));
                if code == "REQUEST_LIMIT_EXCEEDED" {
                    Outcome::Retry {
                        reason: code,
                        long: true,
                    }
                } else if transient(&code) || code == "ALL_OR_NONE_OPERATION_ROLLED_BACK" {
                    Outcome::Retry {
                        reason: code,
                        long: false,
                    }
                } else {
                    Outcome::Rejected(SfError {
                        status: 200,
                        code,
                        message,
                        fields,
                    })
                }
            }
        })
        .collect())
}

/// A login that did not give a session.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Stop at start, back off at run time: Salesforce refused these credentials.
    #[error("login to {login_url} as {username} refused: {error}: {description}")]
    Refused {
        login_url: String,
        username: String,
        error: String,
        description: String,
    },
    /// Retry: Salesforce could not be reached or answered nonsense.
    #[error("login to {login_url} as {username} failed: {reason}")]
    Unreachable {
        login_url: String,
        username: String,
        reason: String,
    },
}

/// A live session: where the org's REST API is and the token for it.
#[derive(Debug)]
pub struct Session {
    pub access_token: Secret,
    pub instance_url: String,
    /// Bumped at each login, so a 401 renews the session only once however many requests
    /// saw it.
    pub generation: u64,
}

/// One division's identity and cached session.
pub struct Account {
    http: reqwest::Client,
    pub username: String,
    pub login_url: String,
    client_id: String,
    client_secret: Option<Secret>,
    grant: Grant,
    password: Option<Secret>,
    private_key: Option<Secret>,
    audience: String,
    session: Mutex<Option<Arc<Session>>>,
    generation: std::sync::atomic::AtomicU64,
}

/// What a login needs, independent of any connector's config shape: the Case connector
/// builds it from a division, the PushTopic source from its flat properties.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    /// The login host, e.g. `https://login.salesforce.com`.
    pub login_url: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub grant: Grant,
    /// The password with the security token appended (password grant).
    pub password: Option<Secret>,
    /// The PEM private key that signs JWT bearer assertions.
    pub private_key: Option<Secret>,
    /// The JWT `aud`; the login host when `None`.
    pub audience: Option<String>,
}

impl Account {
    pub fn new(http: reqwest::Client, resolved: &Resolved, d: &Division) -> Account {
        Account {
            http,
            username: d.config.username.clone(),
            login_url: d.login_url.trim_end_matches('/').to_string(),
            client_id: resolved.tenant.client_id.clone(),
            client_secret: resolved.client_secret.clone(),
            grant: d.config.grant,
            password: d.password.clone(),
            private_key: d.private_key.clone(),
            audience: d.config.audience.clone().unwrap_or_else(|| d.login_url.clone()),
            session: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn from_credentials(http: reqwest::Client, c: Credentials) -> Account {
        let login_url = c.login_url.trim_end_matches('/').to_string();
        Account {
            http,
            username: c.username,
            audience: c.audience.unwrap_or_else(|| login_url.clone()),
            login_url,
            client_id: c.client_id,
            client_secret: c.client_secret,
            grant: c.grant,
            password: c.password,
            private_key: c.private_key,
            session: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The cached session, logging in first if there is none.
    pub async fn session(&self) -> Result<Arc<Session>, AuthError> {
        let mut guard = self.session.lock().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.clone());
        }
        let s = Arc::new(self.login().await?);
        *guard = Some(s.clone());
        Ok(s)
    }

    /// Drops the session that got a 401 (unless another request already replaced it) and
    /// logs in again.
    pub async fn renew(&self, expired: &Session) -> Result<Arc<Session>, AuthError> {
        {
            let mut guard = self.session.lock().await;
            if guard.as_ref().is_some_and(|s| s.generation == expired.generation) {
                *guard = None;
            }
        }
        self.session().await
    }

    async fn login(&self) -> Result<Session, AuthError> {
        let url = format!("{}/services/oauth2/token", self.login_url);
        let unreachable = |reason: String| AuthError::Unreachable {
            login_url: self.login_url.clone(),
            username: self.username.clone(),
            reason,
        };
        let form: Vec<(&str, String)> = match self.grant {
            Grant::Password => vec![
                ("grant_type", "password".into()),
                ("client_id", self.client_id.clone()),
                (
                    "client_secret",
                    self.client_secret
                        .as_ref()
                        .map(|s| s.expose().to_string())
                        .unwrap_or_default(),
                ),
                ("username", self.username.clone()),
                (
                    "password",
                    self.password
                        .as_ref()
                        .map(|s| s.expose().to_string())
                        .unwrap_or_default(),
                ),
            ],
            Grant::Jwt => vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
                ("assertion", self.assertion().map_err(unreachable)?),
            ],
        };
        let response = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(|e| unreachable(describe_reqwest(&e)))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| unreachable(describe_reqwest(&e)))?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != 200 {
            if (400..500).contains(&status) {
                return Err(AuthError::Refused {
                    login_url: self.login_url.clone(),
                    username: self.username.clone(),
                    error: json["error"].as_str().unwrap_or(&format!("HTTP {status}")).to_string(),
                    description: json["error_description"].as_str().unwrap_or_default().to_string(),
                });
            }
            return Err(unreachable(format!("HTTP {status}")));
        }
        let (Some(token), Some(instance)) = (json["access_token"].as_str(), json["instance_url"].as_str()) else {
            return Err(unreachable(
                "the token answer has no access_token or instance_url".into(),
            ));
        };
        secure_url(instance).map_err(|e| unreachable(format!("instance_url {e}")))?;
        Ok(Session {
            access_token: Secret::new(token),
            instance_url: instance.trim_end_matches('/').to_string(),
            generation: self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
        })
    }

    /// A JWT bearer assertion: RS256, `iss` the consumer key, `sub` the user, `aud` the
    /// login host, `exp` within Salesforce's 3 minutes.
    fn assertion(&self) -> Result<String, String> {
        let pem = self.private_key.as_ref().ok_or("no private key")?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose().as_bytes())
            .map_err(|e| format!("private key: {e}"))?;
        let now = crate::reading::now_ms() / 1000;
        let claims = json!({"iss": self.client_id, "sub": self.username, "aud": self.audience, "exp": now + 150});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .map_err(|e| format!("signing the assertion: {e}"))
    }
}

/// The answer to one request: status, body, and the `Sforce-Limit-Info` usage if present.
pub struct Answer {
    pub status: u16,
    pub body: bytes::Bytes,
    pub api_usage: Option<(u64, u64)>,
}

/// `Sforce-Limit-Info: api-usage=18/5000;per-app-api-usage=...` → (18, 5000).
pub fn parse_limit_info(v: &str) -> Option<(u64, u64)> {
    v.split([';', ','])
        .map(str::trim)
        .find_map(|part| part.strip_prefix("api-usage="))
        .and_then(|u| u.split_once('/'))
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
}

/// Upserts one Case on `field` = `value`.
pub async fn upsert(
    http: &reqwest::Client,
    session: &Session,
    api_version: &str,
    field: &str,
    value: &str,
    fields: &Map<String, Value>,
    auto_assign: bool,
) -> Result<Answer, String> {
    let url = format!(
        "{}/services/data/v{api_version}/sobjects/Case/{}/{}",
        session.instance_url,
        encode(field),
        encode(value)
    );
    send(http.patch(url).json(fields), session, auto_assign).await
}

/// Upserts up to 200 Cases on `field` through the sObject Collections API.
pub async fn upsert_collection(
    http: &reqwest::Client,
    session: &Session,
    api_version: &str,
    field: &str,
    records: Vec<Value>,
    auto_assign: bool,
) -> Result<Answer, String> {
    let url = format!(
        "{}/services/data/v{api_version}/composite/sobjects/Case/{}",
        session.instance_url,
        encode(field)
    );
    let body = json!({"allOrNone": false, "records": records});
    send(http.patch(url).json(&body), session, auto_assign).await
}

async fn send(req: reqwest::RequestBuilder, session: &Session, auto_assign: bool) -> Result<Answer, String> {
    let mut req = req.bearer_auth(session.access_token.expose());
    if !auto_assign {
        req = req.header("Sforce-Auto-Assign", "FALSE");
    }
    let response = req.send().await.map_err(|e| describe_reqwest(&e))?;
    let status = response.status().as_u16();
    let api_usage = response
        .headers()
        .get("Sforce-Limit-Info")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_limit_info);
    let body = response.bytes().await.map_err(|e| describe_reqwest(&e))?;
    Ok(Answer {
        status,
        body,
        api_usage,
    })
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A transport error in a few words: timeout, connect, or the error chain.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The shared HTTP client: rustls with certificate verification, the tenant's timeouts.
pub fn http_client(resolved: &Resolved) -> Result<reqwest::Client, String> {
    let tls = crate::tls::client_config(resolved.tenant.ca_file.as_deref()).map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(resolved.tenant.request_timeout)
        .connect_timeout(Duration::from_secs(10).min(resolved.tenant.request_timeout))
        .pool_max_idle_per_host(64)
        .user_agent(concat!("edgecase/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(o: Outcome) -> SfError {
        match o {
            Outcome::Rejected(e) => e,
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[test]
    fn successes() {
        assert_eq!(
            classify(201, br#"{"id":"500A","success":true,"errors":[],"created":true}"#),
            Outcome::Created("500A".into())
        );
        assert_eq!(
            classify(200, br#"{"id":"500A","success":true,"errors":[],"created":false}"#),
            Outcome::Updated("500A".into())
        );
        assert_eq!(classify(204, b""), Outcome::Updated(String::new()));
    }

    #[test]
    fn validation_errors_are_dead_lettered_with_salesforce_error() {
        let e = rejected(classify(
            400,
            br#"[{"message":"Required fields are missing: [Subject]","errorCode":"REQUIRED_FIELD_MISSING","fields":["Subject"]}]"#,
        ));
        assert_eq!(e.code, "REQUIRED_FIELD_MISSING");
        assert_eq!(e.fields, vec!["Subject"]);
        for code in [
            "INVALID_FIELD",
            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
            "MALFORMED_ID",
            "STRING_TOO_LONG",
        ] {
            let body = format!(r#"[{{"message":"m","errorCode":"{code}"}}]"#);
            assert_eq!(rejected(classify(400, body.as_bytes())).code, code);
        }
        assert_eq!(
            rejected(classify(404, br#"[{"message":"x","errorCode":"NOT_FOUND"}]"#)).code,
            "NOT_FOUND"
        );
        assert_eq!(
            rejected(classify(300, b"[\"/services/data/v58.0/sobjects/Case/500A\"]")).status,
            300
        );
    }

    #[test]
    fn limits_outages_and_races_are_retried() {
        assert_eq!(
            classify(
                403,
                br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#
            ),
            Outcome::Retry {
                reason: "403 REQUEST_LIMIT_EXCEEDED: TotalRequests Limit exceeded.".into(),
                long: true
            }
        );
        assert!(matches!(
            classify(503, b"<html>Service Unavailable</html>"),
            Outcome::Retry { long: false, .. }
        ));
        assert!(matches!(
            classify(500, br#"[{"errorCode":"UNKNOWN_EXCEPTION","message":"x"}]"#),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(400, br#"[{"errorCode":"UNABLE_TO_LOCK_ROW","message":"x"}]"#),
            Outcome::Retry { .. }
        ));
        assert!(matches!(
            classify(400, br#"[{"errorCode":"DUPLICATE_VALUE","message":"x"}]"#),
            Outcome::Retry { .. }
        ));
        assert_eq!(
            classify(
                401,
                br#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#
            ),
            Outcome::SessionExpired
        );
    }

    #[test]
    fn collections_results_one_by_one() {
        let body = br#"[{"id":"500A","success":true,"errors":[],"created":true},
            {"success":false,"errors":[{"statusCode":"REQUIRED_FIELD_MISSING","message":"Required fields are missing: [Subject]","fields":["Subject"]}]},
            {"id":"500B","success":true,"errors":[],"created":false},
            {"success":false,"errors":[{"statusCode":"UNABLE_TO_LOCK_ROW","message":"x","fields":[]}]}]"#;
        let r = classify_collection(200, body, 4).unwrap();
        assert_eq!(r[0], Outcome::Created("500A".into()));
        assert_eq!(rejected(r[1].clone()).code, "REQUIRED_FIELD_MISSING");
        assert_eq!(r[2], Outcome::Updated("500B".into()));
        assert!(matches!(r[3], Outcome::Retry { .. }));
        assert!(matches!(classify_collection(503, b"", 4), Err(Outcome::Retry { .. })));
        assert!(classify_collection(200, b"[]", 4).is_err());
    }

    #[test]
    fn limit_info_header() {
        assert_eq!(parse_limit_info("api-usage=18/5000"), Some((18, 5000)));
        assert_eq!(
            parse_limit_info("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-app)"),
            Some((25, 5000))
        );
        assert_eq!(parse_limit_info("nothing"), None);
    }
}
