//! The source's settings: the seed's flat dotted property names (`salesforce.object`,
//! `salesforce.push.topic.name`, ...), as a JSON connector file or as a `[pushtopic]`
//! section of the main TOML file (nested tables are flattened to dotted names, so
//! `salesforce.object = "Case"` in TOML is the same key). AMQP replaces Kafka: `amqp.url`,
//! `amqp.exchange` and `amqp.routing.key` take the place of `kafka.topic`.
//!
//! [`PushTopicConfig::from_properties`] checks every property and reports every problem,
//! each naming its property. Confluent-only keys (`connector.class`, `kafka.*`,
//! `schema.context.name`) are accepted and ignored; unknown keys are errors.

use crate::config::Secret;
use crate::connectors::salesforce::client::Credentials;
use crate::connectors::salesforce::config::{Grant, secure_url};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Where a source starts when it has no stored replay id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum InitialStart {
    /// Only events that arrive after the start (replay `-1`).
    Latest,
    /// Every event Salesforce still retains, 24 h for PushTopics (replay `-2`).
    All,
}

impl InitialStart {
    pub fn replay_from(self) -> i64 {
        match self {
            InitialStart::Latest => -1,
            InitialStart::All => -2,
        }
    }
}

/// The body format of the AMQP messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OutputFormat {
    /// The record as a JSON object (schemaless).
    Json,
    /// Kafka Connect's JSON with an embedded schema: `{"schema": ..., "payload": ...}`.
    JsonSr,
    /// An Avro object container holding the record, the schema in its header.
    Avro,
}

#[derive(Debug, Clone)]
pub struct PushTopicConfig {
    pub name: String,
    pub credentials: Credentials,
    pub object: String,
    pub topic_name: String,
    pub topic_create: bool,
    pub notify_create: bool,
    pub notify_update: bool,
    pub notify_delete: bool,
    pub notify_undelete: bool,
    /// Fields of the PushTopic query when it is created; `None`: every field of the
    /// object's describe that a query can select.
    pub fields: Option<Vec<String>>,
    pub initial_start: InitialStart,
    /// `None` for `latest`: the newest version the org lists.
    pub version: Option<String>,
    pub connection_timeout: Duration,
    pub max_retry_time: Duration,
    pub output_format: OutputFormat,
    pub amqp_url: Secret,
    pub exchange: String,
    /// `{topic}` is replaced by the PushTopic name.
    pub routing_key: String,
    pub data_dir: PathBuf,
    pub admin_listen: Option<String>,
}

/// Keys from the Confluent file that mean nothing here (Kafka credentials, schema registry).
fn ignored(key: &str) -> bool {
    key == "connector.class" || key == "schema.context.name" || key.starts_with("kafka.") || key == "transforms"
}

const KNOWN: &[&str] = &[
    "name",
    "tasks.max",
    "salesforce.grant.type",
    "salesforce.instance",
    "salesforce.username",
    "salesforce.password",
    "salesforce.password.token",
    "salesforce.consumer.key",
    "salesforce.consumer.secret",
    "salesforce.jwt.keystore.file",
    "salesforce.jwt.keystore.password",
    "salesforce.object",
    "salesforce.object.fields",
    "salesforce.push.topic.name",
    "salesforce.push.topic.create",
    "salesforce.push.topic.notify.create",
    "salesforce.push.topic.notify.update",
    "salesforce.push.topic.notify.delete",
    "salesforce.push.topic.notify.undelete",
    "salesforce.initial.start",
    "salesforce.version",
    "connection.timeout",
    "request.max.retries.time.ms",
    "output.data.format",
    "amqp.url",
    "amqp.exchange",
    "amqp.routing.key",
    "data.dir",
    "admin.listen",
];

/// Flattens nested objects into dotted keys (`{"a": {"b": 1}}` → `a.b`).
pub fn flatten(v: &Value) -> Map<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut Map<String, Value>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = Map::new();
    walk("", v, &mut out);
    out
}

/// Whether a property holds a secret (the seed types these as passwords; the AMQP URL may
/// carry one).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "token",
        "secret",
        "keystore",
        "amqp.url",
        "consumer.key",
        "api.key",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// Serializes a `[pushtopic]` section with its secrets as `***` (for `edgecase check`).
pub fn serialize_redacted<S: serde::Serializer>(v: &Option<Value>, s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    let redacted = v.as_ref().map(|v| {
        let mut flat = flatten(v);
        for (k, val) in flat.iter_mut() {
            if is_secret(k) && !val.is_null() {
                *val = Value::String("***".into());
            }
        }
        Value::Object(flat)
    });
    redacted.serialize(s)
}

impl PushTopicConfig {
    /// Reads a JSON connector file (the seed's example works as-is, with the AMQP keys).
    pub fn from_json_file(path: &std::path::Path) -> Result<PushTopicConfig, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        let v: Value = serde_json::from_str(&text).map_err(|e| vec![format!("{}: not JSON: {e}", path.display())])?;
        PushTopicConfig::from_properties(&flatten(&v), "")
    }

    /// Checks every property; `prefix` names the section in messages (`pushtopic.` under
    /// the main config). Reports every problem, each naming its property.
    pub fn from_properties(p: &Map<String, Value>, prefix: &str) -> Result<PushTopicConfig, Vec<String>> {
        let mut errs = Vec::new();
        let key = |k: &str| format!("{prefix}{k}");
        for k in p.keys() {
            if !KNOWN.contains(&k.as_str()) && !ignored(k) {
                errs.push(format!("{}: unknown property", key(k)));
            }
        }
        // Values may be strings (as Confluent writes them) or JSON scalars.
        let text = |k: &str| -> Option<String> {
            match p.get(k) {
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Bool(b)) => Some(b.to_string()),
                _ => None,
            }
        };
        let boolean = |k: &str, default: bool, errs: &mut Vec<String>| match text(k).as_deref() {
            None => default,
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            Some(v) => {
                errs.push(format!("{}: {v:?} is not true or false", key(k)));
                default
            }
        };
        let required = |k: &str, errs: &mut Vec<String>| {
            text(k).unwrap_or_else(|| {
                errs.push(format!("{}: required", key(k)));
                String::new()
            })
        };
        let millis = |k: &str, default: u64, min: u64, max: u64, errs: &mut Vec<String>| match text(k) {
            None => Duration::from_millis(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Duration::from_millis(n),
                _ => {
                    errs.push(format!(
                        "{}: {v:?} must be a number of milliseconds in [{min}, {max}]",
                        key(k)
                    ));
                    Duration::from_millis(default)
                }
            },
        };
        if let Some(t) = text("tasks.max")
            && t != "1"
        {
            errs.push(format!(
                "{}: {t:?}: the source runs exactly one task (1)",
                key("tasks.max")
            ));
        }
        let grant = match text("salesforce.grant.type")
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("PASSWORD") => Grant::Password,
            Some("JWT_BEARER") => Grant::Jwt,
            Some(other) => {
                errs.push(format!(
                    "{}: {other:?} is not PASSWORD or JWT_BEARER",
                    key("salesforce.grant.type")
                ));
                Grant::Password
            }
        };
        let login_url = text("salesforce.instance").unwrap_or_else(|| "https://login.salesforce.com".into());
        if let Err(e) = secure_url(&login_url) {
            errs.push(format!("{}: {e}", key("salesforce.instance")));
        }
        let username = required("salesforce.username", &mut errs);
        let client_id = required("salesforce.consumer.key", &mut errs);
        let (mut password, mut private_key) = (None, None);
        let client_secret = match grant {
            Grant::Password => {
                let pw = required("salesforce.password", &mut errs);
                let token = required("salesforce.password.token", &mut errs);
                password = Some(Secret::new(format!("{pw}{token}")));
                Some(Secret::new(required("salesforce.consumer.secret", &mut errs)))
            }
            Grant::Jwt => {
                let file = required("salesforce.jwt.keystore.file", &mut errs);
                let pass = text("salesforce.jwt.keystore.password").unwrap_or_default();
                if !file.is_empty() {
                    match super::keystore::private_key_pem(&file, &pass) {
                        Ok(pem) => private_key = Some(Secret::new(pem)),
                        Err(e) => errs.push(format!("{}: {e}", key("salesforce.jwt.keystore.file"))),
                    }
                }
                text("salesforce.consumer.secret").map(Secret::new)
            }
        };
        let object = required("salesforce.object", &mut errs);
        let topic_name = required("salesforce.push.topic.name", &mut errs);
        if topic_name.chars().count() > 25 || topic_name.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            errs.push(format!(
                "{}: {topic_name:?}: a PushTopic name is at most 25 letters, digits or underscores",
                key("salesforce.push.topic.name")
            ));
        }
        let topic_create = boolean("salesforce.push.topic.create", true, &mut errs);
        let notify_create = boolean("salesforce.push.topic.notify.create", true, &mut errs);
        let notify_update = boolean("salesforce.push.topic.notify.update", true, &mut errs);
        let notify_delete = boolean("salesforce.push.topic.notify.delete", true, &mut errs);
        let notify_undelete = boolean("salesforce.push.topic.notify.undelete", true, &mut errs);
        if topic_create && !(notify_create || notify_update || notify_delete || notify_undelete) {
            errs.push(format!(
                "{}: every salesforce.push.topic.notify.* is false: the created PushTopic would never send an event",
                key("salesforce.push.topic.create")
            ));
        }
        let fields = text("salesforce.object.fields").map(|f| {
            let mut v: Vec<String> = f
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect();
            if !v.iter().any(|x| x.eq_ignore_ascii_case("Id")) {
                v.insert(0, "Id".into());
            }
            v
        });
        let initial_start = match text("salesforce.initial.start")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("latest") => InitialStart::Latest,
            Some("all") => InitialStart::All,
            Some(other) => {
                errs.push(format!(
                    "{}: {other:?} is not latest or all",
                    key("salesforce.initial.start")
                ));
                InitialStart::Latest
            }
        };
        let version = match text("salesforce.version") {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("latest") => None,
            Some(v) => {
                let n = v.trim_start_matches('v');
                match n.parse::<f64>() {
                    Ok(x) if x >= 37.0 => Some(format!("{x:.1}")),
                    _ => {
                        errs.push(format!(
                            "{}: {v:?}: the Streaming API with replay needs version 37.0 or later (or latest)",
                            key("salesforce.version")
                        ));
                        None
                    }
                }
            }
        };
        let connection_timeout = millis("connection.timeout", 30_000, 100, 3_600_000, &mut errs);
        let max_retry_time = millis("request.max.retries.time.ms", 30_000, 1_000, 250_000, &mut errs);
        let output_format = match text("output.data.format")
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("JSON") => OutputFormat::Json,
            Some("JSON_SR") => OutputFormat::JsonSr,
            Some("AVRO") if cfg!(feature = "avro") => OutputFormat::Avro,
            Some("AVRO") => {
                errs.push(format!(
                    "{}: this build has no Avro support (the cargo feature `avro`, in the default build, is left out of the gateway build); use JSON_SR or JSON",
                    key("output.data.format")
                ));
                OutputFormat::Json
            }
            Some("PROTOBUF") => {
                errs.push(format!(
                    "{}: PROTOBUF is not offered: a Protobuf message cannot carry its schema (in the seed it lives in a Schema Registry, and there is none on the AMQP side); use AVRO (the schema in each message), JSON_SR or JSON",
                    key("output.data.format")
                ));
                OutputFormat::Json
            }
            Some(other) => {
                errs.push(format!(
                    "{}: {other:?} is not JSON, JSON_SR or AVRO",
                    key("output.data.format")
                ));
                OutputFormat::Json
            }
        };
        let amqp_url = text("amqp.url").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            errs.push(format!("{}: must start with amqp:// or amqps://", key("amqp.url")));
        }
        let exchange = text("amqp.exchange").unwrap_or_else(|| "edgecase.salesforce".into());
        let routing_key = text("amqp.routing.key").unwrap_or_else(|| "pushtopic.{topic}".into());
        let name = text("name").unwrap_or_else(|| format!("pushtopic-{topic_name}"));
        let data_dir = PathBuf::from(text("data.dir").unwrap_or_else(|| format!("pushtopic-data/{name}")));
        let admin_listen = text("admin.listen");
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(PushTopicConfig {
            name,
            credentials: Credentials {
                username,
                login_url,
                client_id,
                client_secret,
                grant,
                password,
                private_key,
                audience: None,
            },
            object,
            topic_name,
            topic_create,
            notify_create,
            notify_update,
            notify_delete,
            notify_undelete,
            fields,
            initial_start,
            version,
            connection_timeout,
            max_retry_time,
            output_format,
            amqp_url: Secret::new(amqp_url),
            exchange,
            routing_key,
            data_dir,
            admin_listen,
        })
    }

    pub fn channel(&self) -> String {
        format!("/topic/{}", self.topic_name)
    }

    pub fn routing_key(&self) -> String {
        self.routing_key.replace("{topic}", &self.topic_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed() -> Map<String, Value> {
        // The seed's example, as written (strings everywhere), plus the AMQP destination.
        flatten(&json!({
            "connector.class": "SalesforcePushTopicSource",
            "name": "SalesforcePushTopicSource_0",
            "kafka.auth.mode": "KAFKA_API_KEY",
            "kafka.api.key": "k",
            "kafka.api.secret": "s",
            "salesforce.grant.type": "PASSWORD",
            "salesforce.username": "u@example.com",
            "salesforce.password": "pw",
            "salesforce.password.token": "TOKEN",
            "salesforce.consumer.key": "ck",
            "salesforce.consumer.secret": "cs",
            "salesforce.object": "Case",
            "salesforce.push.topic.name": "CaseUpdates",
            "output.data.format": "JSON",
            "tasks.max": "1",
            "amqp.exchange": "x"
        }))
    }

    #[test]
    fn the_seed_example_is_accepted() {
        let c = PushTopicConfig::from_properties(&seed(), "").unwrap();
        assert_eq!(c.credentials.password.as_ref().unwrap().expose(), "pwTOKEN");
        assert_eq!(c.initial_start, InitialStart::Latest);
        assert!(c.topic_create && c.notify_delete);
        assert_eq!(c.channel(), "/topic/CaseUpdates");
        assert_eq!(c.routing_key(), "pushtopic.CaseUpdates");
        assert_eq!(c.max_retry_time, Duration::from_secs(30));
    }

    #[test]
    fn every_problem_names_its_property() {
        let mut p = seed();
        p.remove("salesforce.password.token");
        p.insert("salesforce.initial.start".into(), json!("earliest"));
        p.insert("request.max.retries.time.ms".into(), json!("10"));
        p.insert("output.data.format".into(), json!("PROTOBUF"));
        p.insert("tasks.max".into(), json!("2"));
        p.insert("salesforce.bogus".into(), json!("1"));
        p.insert("salesforce.version".into(), json!("30.0"));
        let errs = PushTopicConfig::from_properties(&p, "pushtopic.").unwrap_err();
        for k in [
            "pushtopic.salesforce.password.token: required",
            "pushtopic.salesforce.initial.start",
            "pushtopic.request.max.retries.time.ms",
            "pushtopic.output.data.format: PROTOBUF is not offered",
            "pushtopic.tasks.max",
            "pushtopic.salesforce.bogus: unknown property",
            "pushtopic.salesforce.version",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(k)), "{k} missing from {errs:?}");
        }
    }

    #[test]
    fn check_output_hides_secrets() {
        let mut out = Vec::new();
        let mut ser = serde_json::Serializer::new(&mut out);
        serialize_redacted(&Some(Value::Object(seed())), &mut ser).unwrap();
        let text = String::from_utf8(out).unwrap();
        for secret in ["\"pw\"", "TOKEN", "\"cs\"", "\"s\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("\"salesforce.object\":\"Case\""), "{text}");
    }

    #[test]
    fn jwt_needs_a_keystore_and_toml_tables_flatten() {
        let mut p = seed();
        p.insert("salesforce.grant.type".into(), json!("JWT_BEARER"));
        let errs = PushTopicConfig::from_properties(&p, "").unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("salesforce.jwt.keystore.file: required")),
            "{errs:?}"
        );
        let nested = flatten(&json!({"salesforce": {"object": "Case"}, "amqp": {"routing": {"key": "a.b"}}}));
        assert_eq!(nested.get("salesforce.object"), Some(&json!("Case")));
        assert_eq!(nested.get("amqp.routing.key"), Some(&json!("a.b")));
    }
}
