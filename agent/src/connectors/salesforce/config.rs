//! The connector's configuration, in the seed's shape: a `tenant` section (the connected
//! app, the login URL, the AMQP connection, limits) and a `divisions` list (each with its
//! Salesforce user, default Case attributes, field mapping, queue and routing key).
//!
//! The same structure is read from a JSON file (`edgecase connector salesforce -i
//! config.json`) and from the `[salesforce]` section of the main config under `edgecase
//! run`, where the tenant's AMQP settings default to the main `[amqp]` section.

use crate::config::{AmqpConfig, Secret};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    pub tenant: TenantConfig,
    /// One entry per division (Salesforce user) cases are created for.
    pub divisions: Vec<DivisionConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The connected app's consumer key.
    pub client_id: String,
    /// The connected app's consumer secret (needed by the password grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// Read the consumer secret from this file instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// `https://login.salesforce.com`, `https://test.salesforce.com` or a My Domain URL.
    /// `http://` is accepted for loopback addresses only (the emulator).
    #[serde(default = "default_login_url")]
    pub login_url: String,
    /// REST API version, e.g. `58.0`.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default)]
    pub amqp: TenantAmqp,
    /// PEM CA bundle for https; default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// A Salesforce request not answered within this is retried.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most REST requests per second for the whole tenant (all divisions share the org's
    /// API allowance). 0 means no limit.
    #[serde(default = "default_rate")]
    pub max_requests_per_second: f64,
    /// Retries of 5xx, timeouts and connection errors back off from `retry_min` to `retry_max`.
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// After 403 REQUEST_LIMIT_EXCEEDED (daily allowance used up), wait at least this long.
    #[serde(default = "default_limit_backoff", with = "humantime_serde")]
    pub limit_backoff: Duration,
    /// `/metrics` and `/healthz` for `edgecase connector salesforce` (under `edgecase run`
    /// the main `[admin]` section serves them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
}

/// The tenant's AMQP connection. Keys left out come from the main `[amqp]` section (under
/// `edgecase run`) or from its defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantAmqp {
    /// `amqp://user:pass@host:port/vhost` or `amqps://...`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "redacted_opt_url")]
    pub url: Option<Secret>,
    /// The topic exchange cases arrive on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cases_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrouted_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unrouted_queue: Option<String>,
    /// Unacknowledged deliveries per division (AMQP prefetch). Default: enough for
    /// `concurrency` × `batch_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u16>,
    /// `classic` or `quorum` for the division queues and their dead-letter queues.
    pub queue_type: QueueType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

fn redacted_opt_url<S: serde::Serializer>(url: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_str(&crate::config::redact_url(u.expose())),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// OAuth 2.0 username-password flow: client id + secret, username, password + token.
    #[default]
    Password,
    /// OAuth 2.0 JWT bearer flow: an assertion signed with `private_key_file`.
    Jwt,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DivisionConfig {
    /// The division: cases with routing key `case.{name}` are created for it.
    pub name: String,
    /// The Salesforce user cases are created as.
    pub username: String,
    #[serde(default)]
    pub grant: Grant,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Appended to the password (password grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_token: Option<Secret>,
    /// PEM RSA private key whose certificate is on the connected app (JWT grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    /// JWT `aud`; default: the login URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// This division's login URL, if not the tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_url: Option<String>,
    /// The unique external id field on Case that holds the `event_id` (upsert key).
    #[serde(default = "default_external_id_field")]
    pub external_id_field: String,
    /// Case fields set when a case is raised and the message does not set them.
    #[serde(default)]
    pub defaults: BTreeMap<String, serde_json::Value>,
    /// Case field → path in the message (`device_id`, `reading.value`, `case.Subject`);
    /// an empty path leaves the field out. The message's `case` object is mapped as is.
    #[serde(default)]
    pub mapping: BTreeMap<String, String>,
    /// The queue this division consumes. Default `edgecase.salesforce.{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Binding of the queue to the cases exchange. Default `case.{name}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_key: Option<String>,
    /// Where refused messages go. Default `{queue}.dlq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    /// Salesforce requests in flight at once for this division.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Records per request: 1 upserts one Case per request; up to 200 uses the sObject
    /// Collections API.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a partial batch waits for more messages.
    #[serde(default = "default_batch_wait", with = "humantime_serde")]
    pub batch_wait: Duration,
    /// Let Salesforce's assignment rules set the owner (`Sforce-Auto-Assign`). Set false to
    /// keep the `OwnerId` you map.
    #[serde(default = "yes")]
    pub auto_assign: bool,
}

fn default_login_url() -> String {
    "https://login.salesforce.com".into()
}
fn default_api_version() -> String {
    "58.0".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_rate() -> f64 {
    25.0
}
fn default_retry_min() -> Duration {
    Duration::from_millis(500)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
fn default_limit_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_external_id_field() -> String {
    "Edge_Event_Id__c".into()
}
fn default_concurrency() -> usize {
    8
}
fn default_batch_size() -> usize {
    1
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(20)
}
fn yes() -> bool {
    true
}

/// A division with every default resolved and every secret read.
#[derive(Debug, Clone)]
pub struct Division {
    pub config: DivisionConfig,
    pub queue: String,
    pub routing_key: String,
    pub dead_letter_queue: String,
    pub login_url: String,
    pub password: Option<Secret>,
    /// The private key PEM (JWT grant).
    pub private_key: Option<Secret>,
}

/// Everything the connector runs with.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub tenant: TenantConfig,
    pub client_secret: Option<Secret>,
    pub amqp: AmqpConfig,
    pub prefetch_override: Option<u16>,
    pub divisions: Vec<Division>,
}

impl SalesforceConfig {
    /// Reads a JSON file in the seed's shape; errors name the file and the key.
    pub fn from_json_file(path: &std::path::Path) -> Result<SalesforceConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            format!("{}: key {key}: {}", path.display(), e.inner())
        })
    }

    /// Checks every value and reads the secret files; `prefix` is the key path of this
    /// section (`salesforce` under `edgecase run`, empty for `-i`). `amqp_base` supplies the
    /// AMQP settings the tenant leaves out. Reports every problem.
    pub fn resolve(&self, prefix: &str, amqp_base: &AmqpConfig) -> Result<Resolved, Vec<String>> {
        let key = |k: &str| {
            if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            }
        };
        let mut p = Vec::new();
        let t = &self.tenant;
        if t.client_id.trim().is_empty() {
            p.push(format!("{}: must not be empty", key("tenant.client_id")));
        }
        let client_secret = secret(
            &mut p,
            &key("tenant.client_secret"),
            t.client_secret.as_ref(),
            t.client_secret_file.as_ref(),
        );
        check_http_url(&mut p, &key("tenant.login_url"), &t.login_url);
        if !t
            .api_version
            .split_once('.')
            .is_some_and(|(a, b)| a.parse::<u32>().is_ok_and(|v| (20..=99).contains(&v)) && b.parse::<u32>().is_ok())
        {
            p.push(format!(
                "{}: {:?} is not an API version such as 58.0",
                key("tenant.api_version"),
                t.api_version
            ));
        }
        if !(t.max_requests_per_second >= 0.0 && t.max_requests_per_second.is_finite()) {
            p.push(format!(
                "{}: must be 0 (no limit) or a positive number",
                key("tenant.max_requests_per_second")
            ));
        }
        if t.request_timeout < Duration::from_millis(100) {
            p.push(format!("{}: must be at least 100ms", key("tenant.request_timeout")));
        }
        if t.retry_min.is_zero() || t.retry_max < t.retry_min {
            p.push(format!(
                "{}: retry_min must be > 0 and retry_max at least retry_min",
                key("tenant.retry_min")
            ));
        }
        if let Some(a) = &t.admin_listen
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            p.push(format!(
                "{}: {a:?} is not an address such as 127.0.0.1:9465",
                key("tenant.admin_listen")
            ));
        }
        if let Some(f) = t.ca_file.as_ref().filter(|f| !f.is_file()) {
            p.push(format!(
                "{}: {} is not a readable file",
                key("tenant.ca_file"),
                f.display()
            ));
        }
        let mut amqp = amqp_base.clone();
        let a = &t.amqp;
        if let Some(u) = &a.url {
            amqp.url = u.clone();
        }
        for (target, value) in [
            (&mut amqp.cases_exchange, &a.cases_exchange),
            (&mut amqp.dead_letter_exchange, &a.dead_letter_exchange),
            (&mut amqp.unrouted_exchange, &a.unrouted_exchange),
            (&mut amqp.unrouted_queue, &a.unrouted_queue),
        ] {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        match url::Url::parse(amqp.url.expose()) {
            Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {}
            _ => p.push(format!(
                "{}: {:?} is not an amqp:// or amqps:// URL",
                key("tenant.amqp.url"),
                crate::config::redact_url(amqp.url.expose())
            )),
        }
        if a.prefetch == Some(0) {
            p.push(format!("{}: must be greater than 0", key("tenant.amqp.prefetch")));
        }
        if self.divisions.is_empty() {
            p.push(format!("{}: at least one division is needed", key("divisions")));
        }
        let mut divisions = Vec::new();
        for (i, d) in self.divisions.iter().enumerate() {
            let k = |f: &str| key(&format!("divisions[{i}].{f}"));
            if d.name.trim().is_empty() || d.name.contains(['#', '*', ' ']) {
                p.push(format!(
                    "{}: {:?} must be a non-empty name without spaces, # or *",
                    k("name"),
                    d.name
                ));
            }
            if let Some(j) = self.divisions[..i].iter().position(|o| o.name == d.name) {
                p.push(format!("{}: {:?} is already divisions[{j}]", k("name"), d.name));
            }
            if d.username.trim().is_empty() {
                p.push(format!("{}: must not be empty", k("username")));
            }
            let login_url = d.login_url.clone().unwrap_or_else(|| t.login_url.clone());
            if d.login_url.is_some() {
                check_http_url(&mut p, &k("login_url"), &login_url);
            }
            let mut password = None;
            let mut private_key = None;
            match d.grant {
                Grant::Password => {
                    let pw = secret(&mut p, &k("password"), d.password.as_ref(), d.password_file.as_ref());
                    match pw {
                        Some(pw) => {
                            let token = d.security_token.as_ref().map_or("", Secret::expose);
                            password = Some(Secret::new(format!("{}{token}", pw.expose())));
                        }
                        None => p.push(format!(
                            "{}: the password grant needs password or password_file",
                            k("password")
                        )),
                    }
                    if client_secret.is_none() {
                        p.push(format!(
                            "{}: the password grant of division {:?} needs tenant.client_secret or tenant.client_secret_file",
                            key("tenant.client_secret"),
                            d.name
                        ));
                    }
                }
                Grant::Jwt => match &d.private_key_file {
                    None => p.push(format!(
                        "{}: the jwt grant needs a private key file",
                        k("private_key_file")
                    )),
                    Some(f) => match std::fs::read_to_string(f) {
                        Ok(pem) if jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).is_ok() => {
                            private_key = Some(Secret::new(pem))
                        }
                        Ok(_) => p.push(format!(
                            "{}: {} is not a PEM RSA private key",
                            k("private_key_file"),
                            f.display()
                        )),
                        Err(e) => p.push(format!("{}: cannot read {}: {e}", k("private_key_file"), f.display())),
                    },
                },
            }
            if d.external_id_field.trim().is_empty() || d.external_id_field.contains('/') {
                p.push(format!("{}: must be a field name", k("external_id_field")));
            }
            if d.concurrency == 0 || d.concurrency > 256 {
                p.push(format!("{}: must be 1 to 256", k("concurrency")));
            }
            if d.batch_size == 0 || d.batch_size > 200 {
                p.push(format!(
                    "{}: must be 1 to 200 (the sObject Collections limit)",
                    k("batch_size")
                ));
            }
            for field in d.defaults.keys().chain(d.mapping.keys()) {
                if field.trim().is_empty() || field.contains(['/', ' ']) {
                    p.push(format!("{}: {field:?} is not a field name", k("mapping")));
                }
            }
            let queue = d
                .queue
                .clone()
                .unwrap_or_else(|| format!("edgecase.salesforce.{}", d.name));
            let routing_key = d.routing_key.clone().unwrap_or_else(|| format!("case.{}", d.name));
            let dead_letter_queue = d.dead_letter_queue.clone().unwrap_or_else(|| format!("{queue}.dlq"));
            for (f, v) in [("queue", &queue), ("dead_letter_queue", &dead_letter_queue)] {
                if v.is_empty() || v.len() > 255 || v.starts_with("amq.") {
                    p.push(format!(
                        "{}: {v:?} must be 1 to 255 characters, not starting with amq.",
                        k(f)
                    ));
                }
            }
            divisions.push(Division {
                config: d.clone(),
                queue,
                routing_key,
                dead_letter_queue,
                login_url,
                password,
                private_key,
            });
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(Resolved {
            tenant: t.clone(),
            client_secret,
            amqp,
            prefetch_override: a.prefetch,
            divisions,
        })
    }
}

fn secret(p: &mut Vec<String>, key: &str, value: Option<&Secret>, file: Option<&PathBuf>) -> Option<Secret> {
    match (value, file) {
        (Some(_), Some(_)) => {
            p.push(format!("{key}: set either {key} or {key}_file, not both"));
            None
        }
        (Some(v), None) => Some(v.clone()),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(s) => Some(Secret::new(s.trim_end_matches(['\n', '\r']))),
            Err(e) => {
                p.push(format!("{key}_file: cannot read {}: {e}", f.display()));
                None
            }
        },
        (None, None) => None,
    }
}

/// https, or http to a loopback address (the emulator); never plain http over a network.
pub fn check_http_url(p: &mut Vec<String>, key: &str, url: &str) {
    if let Err(e) = secure_url(url) {
        p.push(format!("{key}: {e}"));
    }
}

pub fn secure_url(url: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    match u.scheme() {
        "https" => Ok(u),
        "http" if is_loopback(&u) => Ok(u),
        "http" => Err(format!(
            "{url:?}: plain http is allowed only to a loopback address (a local emulator); use https://"
        )),
        other => Err(format!("{url:?}: scheme {other:?} is not supported; use https://")),
    }
}

fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> SalesforceConfig {
        serde_json::from_value(v).expect("parses")
    }

    #[test]
    fn seed_shape_resolves_with_defaults() {
        let c = parse(serde_json::json!({
            "tenant": {"client_id": "cid", "client_secret": "s3cret", "login_url": "http://127.0.0.1:9"},
            "divisions": [{"name": "facilities", "username": "u@x", "password": "pw", "security_token": "TOK",
                           "defaults": {"Origin": "Edgecase"}, "mapping": {"Device__c": "device_id"}}]
        }));
        let r = c.resolve("", &AmqpConfig::default()).expect("valid");
        let d = &r.divisions[0];
        assert_eq!(d.queue, "edgecase.salesforce.facilities");
        assert_eq!(d.routing_key, "case.facilities");
        assert_eq!(d.dead_letter_queue, "edgecase.salesforce.facilities.dlq");
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("pwTOK"));
        assert_eq!(r.amqp.cases_exchange, "edgecase.cases");
        assert_eq!(format!("{:?}", r.client_secret), "Some(***)");
    }

    #[test]
    fn every_problem_is_named() {
        let c = parse(serde_json::json!({
            "tenant": {"client_id": "", "login_url": "http://salesforce.example.com", "api_version": "v58"},
            "divisions": [{"name": "a b", "username": "", "batch_size": 500},
                          {"name": "j", "username": "u", "grant": "jwt"}]
        }));
        let problems = c.resolve("salesforce", &AmqpConfig::default()).unwrap_err().join("\n");
        for want in [
            "salesforce.tenant.client_id",
            "salesforce.tenant.login_url: \"http://salesforce.example.com\": plain http",
            "salesforce.tenant.api_version",
            "salesforce.divisions[0].name",
            "salesforce.divisions[0].username",
            "salesforce.divisions[0].password",
            "salesforce.divisions[0].batch_size",
            "salesforce.divisions[1].private_key_file",
            "salesforce.tenant.client_secret",
        ] {
            assert!(problems.contains(want), "missing {want} in:\n{problems}");
        }
    }
}
