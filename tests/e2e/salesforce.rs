//! The Salesforce Case connector against the real RabbitMQ and the Salesforce emulator
//! (started in-process, so the test reads the org's Cases and injects failures directly).
//!
//! - Case messages become exactly one Case each, with the mapped fields, across a `kill -9`
//!   of the connector, sessions that keep expiring, a burst of 503s, 500s and rate-limit
//!   answers (JWT bearer grant, several requests in flight).
//! - Validation errors land in the division's dead-letter queue with Salesforce's error in
//!   headers, one request per case and through Collections batches alike.
//! - A defect raised by the agent's rules (`edgecase run` with a `[salesforce]` section)
//!   becomes one Case.

use crate::harness::*;
use edgecase::config::AmqpConfig;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use salesforce_emulator::org::{Fault, FaultKind, ValidationRule};
use salesforce_emulator::{Emulator, EmulatorConfig};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `edgecase connector salesforce -i config.json` as a child process.
struct ConnectorProcess {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    starts: u32,
}

impl ConnectorProcess {
    fn start(dir: &std::path::Path, config: &Value) -> ConnectorProcess {
        let path = dir.join("salesforce.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config).expect("json")).expect("write connector config");
        let mut p = ConnectorProcess {
            child: None,
            config: path,
            log: dir.join("connector.log"),
            admin: format!("127.0.0.1:{}", free_port()).parse().expect("address"),
            starts: 0,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open connector log");
        writeln!(log, "===== edgecase connector salesforce, start #{} =====", self.starts).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgecase"));
        cmd.args(["connector", "salesforce", "-i"])
            .arg(&self.config)
            .arg("--admin")
            .arg(self.admin.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("EDGECASE") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        self.child = Some(cmd.spawn().expect("spawn edgecase connector salesforce"));
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[track_caller]
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!("{msg}\n----- connector log ({}) -----\n{tail}", self.log.display())
    }

    async fn metrics(&self) -> Metrics {
        http_get(self.admin, "/metrics")
            .await
            .map(|b| Metrics::parse(&b))
            .unwrap_or_default()
    }
}

impl Drop for ConnectorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn amqp_config(names: &Names) -> AmqpConfig {
    AmqpConfig {
        readings_exchange: names.readings_exchange.clone(),
        cases_exchange: names.cases_exchange.clone(),
        dead_letter_exchange: names.dead_letter_exchange.clone(),
        unrouted_exchange: names.unrouted_exchange.clone(),
        unrouted_queue: names.unrouted_queue.clone(),
        ..AmqpConfig::default()
    }
}

/// A confirm-mode channel with the topology declared (as the agent declares it).
async fn case_publisher(names: &Names) -> (lapin::Connection, Channel) {
    const T: Duration = Duration::from_secs(10);
    let conn = amqp_connect(T).await.expect("RabbitMQ");
    let ch = bounded("channel", T, conn.create_channel()).await.expect("channel");
    bounded("confirm.select", T, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm mode");
    edgecase::publish::amqp::declare_topology(&ch, &amqp_config(names))
        .await
        .expect("declare topology");
    (conn, ch)
}

/// Publishes a case message as the agent does (persistent, message_id), confirmed.
async fn publish_case(ch: &Channel, names: &Names, division: &str, body: &Value) {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(body["message_id"].as_str().unwrap_or("").into());
    let confirm = ch
        .basic_publish(
            names.cases_exchange.as_str().into(),
            format!("case.{division}").as_str().into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props,
        )
        .await
        .expect("publish case")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "broker took the case message");
}

fn case_message(event: &str, action: &str, device: &str, case: Value) -> Value {
    let message_id = if action == "raise" {
        event.to_string()
    } else {
        format!("{event}-clear")
    };
    json!({
        "event_id": event, "message_id": message_id, "action": action, "rule": "hot",
        "division": "facilities", "device_id": device, "sensor": "temp", "case": case,
        "first_seen": "2026-11-25T20:00:00.000Z", "count": 3, "gateway_id": "gw-test",
        "reading": {"message_id": format!("r-{event}"), "device_id": device, "sensor": "temp", "value": 81.5, "unit": "C"}
    })
}

/// Deletes the connector's queues when dropped, even when the test panics.
struct Queues(Vec<String>);

impl Drop for Queues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // Its own thread and runtime: this may run while a test's runtime is unwinding.
        let cleanup = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), delete_queues(&refs)).await;
                });
            }
        });
        let _ = cleanup.join();
    }
}

async fn delete_queues(names: &[&str]) {
    if let Ok(conn) = amqp_connect(Duration::from_secs(5)).await {
        for q in names {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch.queue_delete((*q).into(), QueueDeleteOptions::default()).await;
            }
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

fn text(v: &Map<String, Value>, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn by_event(cases: &[Map<String, Value>]) -> HashMap<String, Vec<Map<String, Value>>> {
    let mut out: HashMap<String, Vec<Map<String, Value>>> = HashMap::new();
    for c in cases {
        out.entry(text(c, "Edge_Event_Id__c")).or_default().push(c.clone());
    }
    out
}

fn key_file() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../salesforce-emulator/testdata/jwt-test-key.pem"
    )
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_becomes_one_salesforce_case_across_kill_dash_nine_expiring_sessions_and_outages() {
    let _rabbitmq = RABBITMQ.read().await;
    let bed = TestBed::new("sf-crash");
    let mut cfg = EmulatorConfig::default();
    cfg.settings.latency_ms = 15;
    // Sessions end every 400 ms: the connector must renew them mid-stream.
    cfg.settings.token_ttl_ms = 400;
    let emulator = Emulator::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator");
    let queue = format!("{}-sf-facilities", bed.names.base);
    let dlq = format!("{queue}.dlq");
    let _queues = Queues(vec![queue.clone(), dlq.clone()]);
    let config = json!({
        "tenant": {
            "client_id": "edgecase-client-id",
            "login_url": emulator.url(),
            "amqp": {"url": AMQP_URL, "cases_exchange": bed.names.cases_exchange,
                     "dead_letter_exchange": bed.names.dead_letter_exchange,
                     "unrouted_exchange": bed.names.unrouted_exchange, "unrouted_queue": bed.names.unrouted_queue},
            "request_timeout": "2s", "retry_min": "20ms", "retry_max": "200ms", "limit_backoff": "300ms",
            "max_requests_per_second": 0
        },
        "divisions": [{
            "name": "facilities", "username": "integration@edgecase.example",
            "grant": "jwt", "private_key_file": key_file(), "audience": "https://login.salesforce.com",
            "queue": queue, "concurrency": 4,
            "defaults": {"Origin": "Edgecase", "Status": "New"},
            "mapping": {"Device__c": "device_id", "Reading__c": "reading.value", "Rule__c": "rule"}
        }]
    });
    let mut connector = ConnectorProcess::start(bed.dir.path(), &config);
    let (conn, ch) = case_publisher(&bed.names).await;
    // The connector declares and binds its queue when it starts consuming.
    let consuming = wait_for(Duration::from_secs(20), || async {
        (connector
            .metrics()
            .await
            .value("edgecase_salesforce_amqp_connected{division=\"facilities\"}")
            == 1.0)
            .then_some(())
    })
    .await;
    if consuming.is_none() {
        connector.fail("the connector did not start consuming within 20 s");
    }

    // 150 raises, a clear for the first 30, and every 10th raise published twice (as a
    // redelivering broker or a restarted agent would).
    const N: usize = 150;
    for i in 0..N {
        let event = format!("{}-ev-{i}", bed.names.base);
        let body = case_message(
            &event,
            "raise",
            &format!("boiler-{}", i % 7),
            json!({"Subject": format!("boiler-{} temp at 81.5C", i % 7), "Priority": "High"}),
        );
        publish_case(&ch, &bed.names, "facilities", &body).await;
        if i % 10 == 0 {
            publish_case(&ch, &bed.names, "facilities", &body).await;
        }
        if i < 30 {
            let clear = case_message(
                &event,
                "clear",
                &format!("boiler-{}", i % 7),
                json!({"Status": "Closed", "Comments": "temp back to 60C"}),
            );
            publish_case(&ch, &bed.names, "facilities", &clear).await;
        }
    }
    // Kill the connector hard mid-stream, then start it again.
    let partway = wait_for(Duration::from_secs(30), || {
        let n = emulator.cases().len();
        async move { (n >= 40).then_some(()) }
    })
    .await;
    if partway.is_none() {
        connector.fail(format!("only {} Cases after 30 s", emulator.cases().len()));
    }
    connector.kill9();
    let at_kill = emulator.cases().len();
    // While it is down: Salesforce answers with a burst of failures.
    emulator.org.inject(Fault {
        kind: FaultKind::Unavailable,
        count: 6,
        stall_ms: None,
    });
    emulator.org.inject(Fault {
        kind: FaultKind::RateLimit,
        count: 3,
        stall_ms: None,
    });
    emulator.org.inject(Fault {
        kind: FaultKind::ServerError,
        count: 3,
        stall_ms: None,
    });
    connector.spawn();
    let done = wait_for(Duration::from_secs(60), || {
        let cases = emulator.cases();
        let closed = cases
            .iter()
            .filter(|c| c.get("Status").and_then(Value::as_str) == Some("Closed"))
            .count();
        async move { (cases.len() >= N && closed >= 30).then_some(()) }
    })
    .await;
    if done.is_none() {
        connector.fail(format!("{} of {N} Cases after 60 s", emulator.cases().len()));
    }
    // Let anything wrong (a second Case) show up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cases = emulator.cases();
    let grouped = by_event(&cases);
    let doubles: Vec<&String> = grouped.iter().filter(|(_, v)| v.len() > 1).map(|(k, _)| k).collect();
    assert!(doubles.is_empty(), "events with more than one Case: {doubles:?}");
    assert_eq!(cases.len(), N, "one Case per event, no more, no fewer");
    for i in 0..N {
        let event = format!("{}-ev-{i}", bed.names.base);
        let c = &grouped.get(&event).unwrap_or_else(|| panic!("no Case for {event}"))[0];
        assert_eq!(text(c, "Subject"), format!("boiler-{} temp at 81.5C", i % 7));
        assert_eq!(text(c, "Device__c"), format!("boiler-{}", i % 7));
        assert_eq!(text(c, "Reading__c"), "81.5");
        assert_eq!(text(c, "Rule__c"), "hot");
        assert_eq!(text(c, "Origin"), "Edgecase");
        assert_eq!(text(c, "Priority"), "High");
        let want_status = if i < 30 { "Closed" } else { "New" };
        assert_eq!(text(c, "Status"), want_status, "{event}");
    }
    let m = connector.metrics().await;
    let d = "{division=\"facilities\"}";
    let renewals = m.value(&format!("edgecase_salesforce_session_renewals_total{d}"));
    let retries = m.sum("edgecase_salesforce_retries_total", "division=\"facilities\"");
    let stats = emulator.org.stats();
    eprintln!(
        "salesforce crash test: {at_kill} Cases at the kill, {} after; second run: created {} updated {} renewals {renewals} retries {retries}; emulator: {} REST, {} token requests, {} faults served",
        cases.len(),
        m.value(&format!("edgecase_salesforce_cases_created_total{d}")),
        m.value(&format!("edgecase_salesforce_cases_updated_total{d}")),
        stats.rest_requests,
        stats.token_requests,
        stats.faults_served
    );
    assert!(at_kill < N, "the kill came mid-stream");
    assert_eq!(stats.faults_served, 12, "every injected failure was answered");
    assert!(retries >= 12.0, "the failures were retried: {}", m.summary());
    assert!(stats.token_requests >= 3, "sessions expired and were renewed");
    assert_eq!(
        m.sum("edgecase_salesforce_dead_lettered_total", ""),
        0.0,
        "{}",
        m.summary()
    );

    let _ = conn.close(200, "done".into()).await;
    drop(connector);
}

/// Reads every message of `queue` (basic.get), waiting until `n` arrived.
async fn drain(queue: &str, n: usize) -> Vec<(Value, HashMap<String, String>)> {
    let conn = amqp_connect(Duration::from_secs(10)).await.expect("RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while out.len() < n && std::time::Instant::now() < deadline {
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            Ok(Some(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.delivery.properties.headers() {
                    for (k, v) in h.inner() {
                        let text = match v {
                            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                            AMQPValue::ShortString(s) => s.as_str().to_string(),
                            AMQPValue::LongInt(i) => i.to_string(),
                            other => format!("{other:?}"),
                        };
                        headers.insert(k.as_str().to_string(), text);
                    }
                }
                let body = serde_json::from_slice(&m.delivery.data)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.delivery.data).into_owned()));
                out.push((body, headers));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_are_dead_lettered_with_the_salesforce_error() {
    let _rabbitmq = RABBITMQ.read().await;
    let bed = TestBed::new("sf-dlq");
    let mut cfg = EmulatorConfig::default();
    cfg.settings.required_case_fields = vec!["Subject".into()];
    cfg.settings.validation_rules = vec![ValidationRule {
        object: "Case".into(),
        field: "Description".into(),
        contains: "forbidden".into(),
        message: "Descriptions must not say forbidden".into(),
    }];
    let emulator = Emulator::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator");
    // The same messages through one request per case and through Collections batches.
    let division = |name: &str, batch: usize| {
        json!({
            "name": name, "username": "integration@edgecase.example", "password": "password",
            "security_token": "TOKEN", "queue": format!("{}-{name}", bed.names.base), "batch_size": batch,
            "batch_wait": "200ms", "mapping": {"Device__c": "device_id"}
        })
    };
    let config = json!({
        "tenant": {
            "client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret",
            "login_url": emulator.url(),
            "amqp": {"url": AMQP_URL, "cases_exchange": bed.names.cases_exchange,
                     "dead_letter_exchange": bed.names.dead_letter_exchange,
                     "unrouted_exchange": bed.names.unrouted_exchange, "unrouted_queue": bed.names.unrouted_queue},
            "retry_min": "20ms", "retry_max": "200ms"
        },
        "divisions": [division("single", 1), division("batched", 10)]
    });
    let _queues = Queues(
        ["single", "batched"]
            .iter()
            .flat_map(|d| {
                let q = format!("{}-{d}", bed.names.base);
                [format!("{q}.dlq"), q]
            })
            .collect(),
    );
    let connector = ConnectorProcess::start(bed.dir.path(), &config);
    let (conn, ch) = case_publisher(&bed.names).await;
    let ready = wait_for(Duration::from_secs(20), || async {
        let m = connector.metrics().await;
        (m.sum("edgecase_salesforce_amqp_connected", "") == 2.0).then_some(())
    })
    .await;
    if ready.is_none() {
        connector.fail("the connector did not start consuming within 20 s");
    }
    for div in ["single", "batched"] {
        let ev = |s: &str| format!("{}-{div}-{s}", bed.names.base);
        let msgs = [
            case_message(&ev("ok"), "raise", "pump-1", json!({"Subject": "pump-1 stuck"})),
            case_message(&ev("nosubject"), "raise", "pump-2", json!({"Priority": "High"})),
            case_message(
                &ev("badfield"),
                "raise",
                "pump-3",
                json!({"Subject": "x", "Pressure__c": "2.4"}),
            ),
            case_message(
                &ev("rule"),
                "raise",
                "pump-4",
                json!({"Subject": "y", "Description": "a forbidden word"}),
            ),
        ];
        for m in &msgs {
            publish_case(&ch, &bed.names, div, m).await;
        }
        // Not a case message at all.
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish(
            bed.names.cases_exchange.as_str().into(),
            format!("case.{div}").as_str().into(),
            BasicPublishOptions::default(),
            b"not json",
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    for div in ["single", "batched"] {
        let dlq = format!("{}-{div}.dlq", bed.names.base);
        let dead = drain(&dlq, 4).await;
        if dead.len() != 4 {
            connector.fail(format!("{div}: {} of 4 messages in {dlq}: {dead:?}", dead.len()));
        }
        let mut codes: Vec<String> = dead
            .iter()
            .map(|(_, h)| {
                h.get("x-salesforce-error-code")
                    .cloned()
                    .unwrap_or_else(|| format!("edgecase: {}", h.get("x-edgecase-error").cloned().unwrap_or_default()))
            })
            .collect();
        codes.sort();
        assert_eq!(
            codes[..3],
            [
                "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                "INVALID_FIELD",
                "REQUIRED_FIELD_MISSING"
            ],
            "{div}: {dead:?}"
        );
        assert!(
            codes[3].starts_with("edgecase: the message is not JSON"),
            "{div}: {codes:?}"
        );
        let missing = dead
            .iter()
            .find(|(_, h)| h.get("x-salesforce-error-code").map(String::as_str) == Some("REQUIRED_FIELD_MISSING"))
            .expect("REQUIRED_FIELD_MISSING");
        assert_eq!(missing.1["x-salesforce-error-fields"], "Subject");
        assert_eq!(
            missing.1["x-salesforce-error-message"],
            "Required fields are missing: [Subject]"
        );
        assert_eq!(missing.1["x-edgecase-division"], div);
        assert_eq!(
            missing.0["device_id"], "pump-2",
            "the original message is kept as it was"
        );
        let rule = dead
            .iter()
            .find(|(_, h)| {
                h.get("x-salesforce-error-code").map(String::as_str) == Some("FIELD_CUSTOM_VALIDATION_EXCEPTION")
            })
            .expect("validation rule");
        assert_eq!(
            rule.1["x-salesforce-error-message"],
            "Descriptions must not say forbidden"
        );
    }
    // The valid ones are Cases; nothing else is.
    let cases = emulator.cases();
    let mut events: Vec<String> = cases.iter().map(|c| text(c, "Edge_Event_Id__c")).collect();
    events.sort();
    assert_eq!(
        events,
        vec![
            format!("{}-batched-ok", bed.names.base),
            format!("{}-single-ok", bed.names.base)
        ]
    );
    let m = connector.metrics().await;
    assert_eq!(
        m.sum("edgecase_salesforce_dead_lettered_total", ""),
        8.0,
        "{}",
        m.summary()
    );
    let _ = conn.close(200, "done".into()).await;
    drop(connector);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_defect_from_the_rules_becomes_one_salesforce_case_under_edgecase_run() {
    let _rabbitmq = RABBITMQ.read().await;
    let mut bed = TestBed::new("sf-run");
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator");
    let queue = format!("{}-sf", bed.names.base);
    let _queues = Queues(vec![queue.clone(), format!("{queue}.dlq")]);
    bed.config["rules"] = json!([{
        "name": "hot", "sensors": "temp", "kind": "above", "threshold": 50.0, "clear_level": 40.0,
        "debounce_readings": 2, "division": "facilities",
        "case": { "Subject": "{device_id}: {sensor} at {value}{unit}", "Priority": "High",
                  "Description": "{sensor} on {device_id} above {threshold} since {first_seen}" },
        "on_clear": { "Status": "Closed" }
    }]);
    // The tenant's AMQP settings come from the main [amqp] section.
    bed.config["salesforce"] = json!({
        "tenant": {"client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret",
                   "login_url": emulator.url(), "retry_min": "20ms", "retry_max": "200ms"},
        "divisions": [{
            "name": "facilities", "username": "integration@edgecase.example", "password": "password",
            "security_token": "TOKEN", "queue": queue,
            "defaults": {"Origin": "Edgecase", "Status": "New"},
            "mapping": {"Device__c": "device_id", "Sensor__c": "sensor", "Gateway__c": "gateway_id"}
        }]
    });
    let agent = bed.start_agent();
    agent.wait_connected(true).await;
    // The connector binds its queue when it starts consuming; cases raised before would
    // go to the unrouted queue.
    agent
        .wait_metrics("the connector to consume", Duration::from_secs(20), |m| {
            m.value("edgecase_salesforce_amqp_connected{division=\"facilities\"}") == 1.0
        })
        .await;
    let mut mqtt = Publisher::connect(&bed.names).await;
    wait_subscribed(&agent, &mut mqtt, &bed.names).await;
    // Two readings above 50 raise the case; more high readings keep it open (no second
    // case); three low ones clear it.
    for (seq, v) in [55.0, 56.5, 57.0, 58.0, 30.0, 30.0, 30.0].iter().enumerate() {
        mqtt.publish(
            &bed.names.topic("boiler-9", "temp"),
            json!({"value": v, "unit": "C", "seq": seq}).to_string(),
        )
        .await;
    }
    mqtt.wait_acked(Duration::from_secs(10))
        .await
        .expect("broker took the readings");
    let closed =
        wait_for(Duration::from_secs(30), || {
            let cases = emulator.cases();
            async move {
                (cases.len() == 1 && cases[0].get("Status").and_then(Value::as_str) == Some("Closed")).then_some(())
            }
        })
        .await;
    if closed.is_none() {
        agent.fail(format!("want one closed Case, the emulator has {:?}", emulator.cases()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cases = emulator.cases();
    assert_eq!(cases.len(), 1, "{cases:?}");
    let c = &cases[0];
    assert_eq!(text(c, "Subject"), "boiler-9: temp at 56.5C");
    assert_eq!(text(c, "Priority"), "High");
    assert_eq!(text(c, "Origin"), "Edgecase");
    assert_eq!(text(c, "Device__c"), "boiler-9");
    assert_eq!(text(c, "Sensor__c"), "temp");
    assert_eq!(text(c, "Gateway__c"), bed.names.gateway_id);
    assert!(text(c, "Description").starts_with("temp on boiler-9 above 50 since "));
    assert!(!text(c, "Edge_Event_Id__c").is_empty());
    let m = agent
        .wait_metrics("the clear counted", Duration::from_secs(10), |m| {
            m.value("edgecase_salesforce_cases_updated_total{division=\"facilities\"}") >= 1.0
        })
        .await;
    assert_eq!(
        m.value("edgecase_salesforce_cases_created_total{division=\"facilities\"}"),
        1.0
    );
    mqtt.disconnect().await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_unreachable_salesforce_and_bad_keys_fail_at_start_naming_them() {
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let cases: [(&str, Value, &[&str]); 4] = [
        (
            "wrong password",
            json!({"tenant": {"client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret", "login_url": emulator.url()},
                   "divisions": [{"name": "facilities", "username": "integration@edgecase.example", "password": "nope"}]}),
            &[
                "division facilities",
                emulator.url(),
                "integration@edgecase.example",
                "invalid_grant",
            ],
        ),
        (
            "unknown consumer key",
            json!({"tenant": {"client_id": "who", "client_secret": "x", "login_url": emulator.url()},
                   "divisions": [{"name": "field", "username": "integration@edgecase.example", "password": "password", "security_token": "TOKEN"}]}),
            &["division field", "invalid_client_id"],
        ),
        (
            "unreachable login URL",
            json!({"tenant": {"client_id": "edgecase-client-id", "client_secret": "s", "login_url": closed},
                   "divisions": [{"name": "facilities", "username": "u@x", "password": "p"}]}),
            &["division facilities", &closed, "cannot connect"],
        ),
        (
            "unknown key",
            json!({"tenant": {"client_id": "c", "client_secret": "s", "login_url": emulator.url(), "loginurl": "x"},
                   "divisions": []}),
            &["key tenant", "unknown field `loginurl`"],
        ),
    ];
    for (what, config, want) in cases {
        let path = dir.path().join("bad.json");
        std::fs::write(&path, config.to_string()).expect("write");
        let path = path.to_string_lossy().into_owned();
        let out = run_cli(
            &["connector", "salesforce", "-i", &path, "--check"],
            Duration::from_secs(30),
        )
        .await
        .expect("edgecase runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        for w in want {
            assert!(stderr.contains(w), "{what}: want {w:?} in:\n{stderr}");
        }
        assert!(
            !stderr.contains("edgecase-client-secret"),
            "{what}: a secret leaked:\n{stderr}"
        );
    }
    // And a good one logs in.
    let path = dir.path().join("good.json");
    let good = json!({"tenant": {"client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret", "login_url": emulator.url()},
                      "divisions": [{"name": "facilities", "username": "integration@edgecase.example", "password": "password", "security_token": "TOKEN"}]});
    std::fs::write(&path, good.to_string()).expect("write");
    let path = path.to_string_lossy().into_owned();
    let out = run_cli(
        &["connector", "salesforce", "-i", &path, "--check"],
        Duration::from_secs(30),
    )
    .await
    .expect("edgecase runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK, 1 division(s) logged in"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_over_https_is_verified_against_the_configured_ca() {
    let cfg = EmulatorConfig {
        tls: Some(salesforce_emulator::TlsIdentity::test()),
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator");
    assert!(emulator.url().starts_with("https://127.0.0.1:"));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, salesforce_emulator::TEST_TLS_CA).expect("write CA");
    let config = |ca_file: Option<&std::path::Path>| {
        let mut c = json!({
            "tenant": {"client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret", "login_url": emulator.url()},
            "divisions": [{"name": "facilities", "username": "integration@edgecase.example", "password": "password", "security_token": "TOKEN"}]
        });
        if let Some(f) = ca_file {
            c["tenant"]["ca_file"] = json!(f);
        }
        c
    };
    // The system's roots do not know the emulator's CA: the handshake must fail.
    let path = dir.path().join("untrusted.json");
    std::fs::write(&path, config(None).to_string()).expect("write");
    let out = run_cli(
        &["connector", "salesforce", "-i", &path.to_string_lossy(), "--check"],
        Duration::from_secs(30),
    )
    .await
    .expect("edgecase runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("division facilities") && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
    // With the CA configured, login and REST calls go through.
    let path = dir.path().join("trusted.json");
    std::fs::write(&path, config(Some(&ca)).to_string()).expect("write");
    let out = run_cli(
        &["connector", "salesforce", "-i", &path.to_string_lossy(), "--check"],
        Duration::from_secs(30),
    )
    .await
    .expect("edgecase runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let raw: edgecase::connectors::salesforce::config::SalesforceConfig =
        serde_json::from_value(config(Some(&ca))).expect("config");
    let resolved = raw.resolve("", &AmqpConfig::default()).expect("valid");
    let sink = edgecase::connectors::salesforce::direct::DirectSink::start(&resolved)
        .await
        .expect("log in over https");
    let body = case_message("tls-ev-1", "raise", "boiler-1", json!({"Subject": "over https"}));
    let outcome = sink
        .deliver("case.facilities", body.to_string().as_bytes())
        .await
        .expect("upsert over https");
    assert!(
        matches!(
            outcome,
            Some(edgecase::connectors::salesforce::client::Outcome::Created(_))
        ),
        "{outcome:?}"
    );
    assert_eq!(text(&emulator.cases()[0], "Subject"), "over https");
}
