//! The Salesforce PushTopic source (`edgecase connector pushtopic --config FILE`) against
//! the real RabbitMQ and the Salesforce emulator's Streaming API (in-process, so the test
//! writes Cases, expires sessions and drops Bayeux clients directly).
//!
//! - Events reach AMQP in order, persistent, and none is missing across a `kill -9` and
//!   restart (duplicates counted), sessions expired during the connect loop (`401::`), and
//!   a server that forgets its clients (`403::Unknown client`); `initial.start=all` replays
//!   what was retained before the first start; the PushTopic is created when missing.
//! - The offsets API (and the CLI on top of it) reads the position, moves it with PATCH,
//!   resets it with DELETE, and reports a replay id Salesforce refuses as FAILED, keeping
//!   the previous offset. (One change at a time is a unit test of `offsets::Requests`.)

use crate::harness::*;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use salesforce_emulator::{Emulator, EmulatorConfig};
use serde_json::{Map, Value, json};
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const TOPIC: &str = "EdgeCases";

/// `edgecase connector pushtopic --config FILE` as a child process.
struct Source {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    name: String,
    starts: u32,
}

impl Source {
    fn start(dir: &Path, config: &Value) -> Source {
        let path = dir.join("pushtopic.json");
        std::fs::write(&path, serde_json::to_vec_pretty(config).expect("json")).expect("write source config");
        let mut s = Source {
            child: None,
            config: path,
            log: dir.join("source.log"),
            admin: config["admin.listen"]
                .as_str()
                .expect("admin.listen")
                .parse()
                .expect("address"),
            name: config["name"].as_str().expect("name").to_string(),
            starts: 0,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open source log");
        writeln!(log, "===== edgecase connector pushtopic, start #{} =====", self.starts).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgecase"));
        cmd.args(["connector", "pushtopic", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("EDGECASE") {
                cmd.env_remove(key);
            }
        }
        self.child = Some(cmd.spawn().expect("spawn edgecase connector pushtopic"));
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
        panic!("{msg}\n----- source log ({}) -----\n{tail}", self.log.display())
    }

    async fn api(&self, path: &str) -> Value {
        let url = format!("/connectors/{}{path}", self.name);
        http_get(self.admin, &url)
            .await
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null)
    }

    async fn wait_connected(&self) {
        let ok = wait_for(Duration::from_secs(30), || async {
            (self.api("/status").await["connected"] == true).then_some(())
        })
        .await;
        if ok.is_none() {
            self.fail("the source did not subscribe within 30 s");
        }
    }

    async fn cli(&self, args: &[&str]) -> (bool, Value) {
        let config = self.config.display().to_string();
        let mut all = vec!["connector", "pushtopic", "--config", config.as_str(), "offsets"];
        all.extend_from_slice(args);
        let out = run_cli(&all, Duration::from_secs(20)).await.expect("run the CLI");
        let body = serde_json::from_slice(&out.stdout).unwrap_or_else(
            |_| json!({"stdout": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr)}),
        );
        (out.status.success(), body)
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The seed's property file, pointed at the emulator and the test's exchange.
fn properties(emulator: &Emulator, names: &Names, dir: &Path, initial: &str) -> Value {
    json!({
        "connector.class": "SalesforcePushTopicSource",
        "name": format!("{}-src", names.base),
        "kafka.auth.mode": "KAFKA_API_KEY",
        "salesforce.grant.type": "PASSWORD",
        "salesforce.instance": emulator.url(),
        "salesforce.username": "integration@edgecase.example",
        "salesforce.password": "password",
        "salesforce.password.token": "TOKEN",
        "salesforce.consumer.key": "edgecase-client-id",
        "salesforce.consumer.secret": "edgecase-client-secret",
        "salesforce.object": "Case",
        "salesforce.object.fields": "Id, Subject, Status, Priority, Device__c",
        "salesforce.push.topic.name": TOPIC,
        "salesforce.push.topic.notify.delete": "false",
        "salesforce.initial.start": initial,
        "salesforce.version": "58.0",
        "request.max.retries.time.ms": "20000",
        "output.data.format": "JSON",
        "tasks.max": "1",
        "amqp.url": AMQP_URL,
        "amqp.exchange": names.cases_exchange,
        "amqp.routing.key": "pushtopic.{topic}",
        "data.dir": dir.join("data").display().to_string(),
        "admin.listen": format!("127.0.0.1:{}", free_port()),
    })
}

/// The exchange and the test's queue bound to it, before the source publishes (mandatory).
async fn bind_queue(names: &Names, exchange: &str) -> lapin::Connection {
    const T: Duration = Duration::from_secs(10);
    let conn = amqp_connect(T).await.expect("RabbitMQ");
    let ch = bounded("channel", T, conn.create_channel()).await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .expect("declare the exchange");
    ch.queue_declare(
        names.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the queue");
    ch.queue_bind(
        names.queue.as_str().into(),
        exchange.into(),
        "pushtopic.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind the queue");
    conn
}

async fn start_emulator() -> Emulator {
    let e = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse().expect("address"))
        .await
        .expect("start the Salesforce emulator");
    // Short long polls: more connect cycles in a short test.
    e.streaming.update_settings(|s| s.connect_timeout_ms = 2000);
    e
}

fn case(subject: &str, device: &str) -> Map<String, Value> {
    json!({"Subject": subject, "Priority": "High", "Device__c": device})
        .as_object()
        .cloned()
        .expect("object")
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn user(e: &Emulator) -> String {
    e.org.users()[0].id.clone()
}

/// Replay ids received, in arrival order.
fn replay_ids(c: &Collector) -> Vec<i64> {
    c.all().iter().filter_map(|r| r.body["_ReplayId"].as_i64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushtopic_events_reach_amqp_in_order_across_kill9_expired_sessions_and_lost_clients() {
    let _rabbit = RABBITMQ.read().await;
    let names = Names::new("pushtopic-crash");
    let dir = tempfile::tempdir().expect("tempdir");
    let emulator = start_emulator().await;
    let _amqp = bind_queue(&names, &names.cases_exchange).await;
    let collector = Collector::start(&names).await;
    let uid = user(&emulator);
    // The PushTopic exists already (the source uses it), and Cases written before the
    // first start are retained: initial.start=all replays them.
    emulator
        .org
        .create(
            "PushTopic",
            json!({"Name": TOPIC, "Query": "SELECT Id, Subject, Status, Device__c FROM Case WHERE Priority = 'High'",
                   "ApiVersion": 58.0, "NotifyForOperationDelete": false, "NotifyForFields": "Referenced"})
            .as_object()
            .expect("object"),
            &uid,
        )
        .expect("create the PushTopic");
    const BEFORE: usize = 5;
    for i in 0..BEFORE {
        emulator
            .org
            .create("Case", &case(&format!("before {i}"), "d0"), &uid)
            .expect("case");
    }
    let mut source = Source::start(dir.path(), &properties(&emulator, &names, dir.path(), "all"));
    source.wait_connected().await;
    assert_eq!(
        emulator.org.records("PushTopic").len(),
        1,
        "the existing PushTopic is used"
    );

    // Writers keep creating and updating Cases while the source is killed, its sessions
    // expire and the server forgets its clients.
    const CASES: usize = 240;
    let org = emulator.org.clone();
    let writer = tokio::spawn(async move {
        for i in 0..CASES {
            let id = org
                .create("Case", &case(&format!("case {i}"), &format!("d{}", i % 7)), &uid)
                .expect("create");
            if i % 3 == 0 {
                let upd = json!({"Status": "Working"}).as_object().cloned().expect("object");
                org.update("Case", &id, &upd, &uid).expect("update");
            }
            tokio::time::sleep(Duration::from_millis(12)).await;
        }
    });
    let channel = format!("/topic/{TOPIC}");
    let progress = |n: usize| {
        let c = &collector;
        async move {
            wait_for(Duration::from_secs(30), || async {
                (replay_ids(c).len() >= n).then_some(())
            })
            .await
        }
    };
    if progress(40).await.is_none() {
        source.fail("fewer than 40 events on AMQP");
    }
    source.kill9();
    tokio::time::sleep(Duration::from_millis(700)).await;
    source.spawn();
    source.wait_connected().await;
    if progress(120).await.is_none() {
        source.fail("the source did not resume after kill -9");
    }
    // 401:: on the held connect: the source logs in again and handshakes.
    emulator.streaming.expire_sessions();
    if progress(170).await.is_none() {
        source.fail("no progress after the sessions expired");
    }
    // A server restart: every client forgotten, 403::Unknown client.
    emulator.streaming.drop_clients();
    writer.await.expect("writer");
    let want = BEFORE + CASES + CASES.div_ceil(3);
    let emitted = wait_for(Duration::from_secs(5), || async {
        let r = emulator.streaming.retained(&channel);
        (r.len() >= want).then_some(r)
    })
    .await
    .unwrap_or_else(|| emulator.streaming.retained(&channel));
    assert_eq!(
        emitted.len(),
        BEFORE + CASES + CASES.div_ceil(3),
        "one event per create and per update"
    );
    let done = wait_for(Duration::from_secs(30), || async {
        let got: std::collections::BTreeSet<i64> = replay_ids(&collector).into_iter().collect();
        emitted.iter().all(|id| got.contains(id)).then_some(())
    })
    .await;
    let received = replay_ids(&collector);
    if done.is_none() {
        let got: std::collections::BTreeSet<i64> = received.iter().copied().collect();
        let missing: Vec<&i64> = emitted.iter().filter(|id| !got.contains(id)).collect();
        source.fail(format!(
            "{} of {} events missing: {missing:?}",
            missing.len(),
            emitted.len()
        ));
    }
    // In order: each arrival is newer than the one before, except where a restart replays
    // from the stored id (a duplicate of something already received).
    let mut seen = std::collections::BTreeSet::new();
    let mut duplicates = 0;
    let mut newest = i64::MIN;
    for id in &received {
        if !seen.insert(*id) {
            duplicates += 1;
            continue;
        }
        assert!(
            *id > newest,
            "event {id} arrived after {newest}: out of order ({received:?})"
        );
        newest = *id;
    }
    let stats = source.api("/status").await;
    eprintln!(
        "pushtopic: {} events emitted, {} messages received, {duplicates} duplicates; source stats {stats}",
        emitted.len(),
        received.len()
    );
    assert!(
        stats["auth_failures"].as_u64() >= Some(1),
        "the expired session was noticed: {stats}"
    );
    assert!(
        stats["rehandshakes"].as_u64() >= Some(1),
        "the lost client was noticed: {stats}"
    );
    // Persistent JSON messages with the event's metadata.
    let all = collector.all();
    let first = &all[0];
    assert_eq!(first.delivery_mode, Some(2));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        first.message_id.as_deref(),
        Some(format!("{channel}/{}", emitted[0]).as_str())
    );
    assert_eq!(first.body["_ObjectType"], "Case");
    assert!(
        all.iter()
            .any(|r| r.body["_EventType"] == "updated" && r.body["Status"] == "Working")
    );
    // The stored offset becomes the last event (written just after the broker's confirm,
    // which may be after the message reached the test's consumer).
    let want = json!(emitted.last().copied());
    let stored = wait_for(Duration::from_secs(5), || async {
        let o = source.api("/offsets").await;
        (o["offsets"][0]["offset"]["replayId"] == want).then_some(())
    })
    .await;
    assert!(stored.is_some(), "stored offset: {}", source.api("/offsets").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushtopic_offsets_api_moves_resets_and_reports() {
    let _rabbit = RABBITMQ.read().await;
    let names = Names::new("pushtopic-offsets");
    let dir = tempfile::tempdir().expect("tempdir");
    let emulator = start_emulator().await;
    let _amqp = bind_queue(&names, &names.cases_exchange).await;
    let collector = Collector::start(&names).await;
    let uid = user(&emulator);
    // Written before the source starts: with initial.start=latest, never delivered.
    emulator.org.create("Case", &case("before", "d"), &uid).expect("case");
    // The JWT bearer grant, with the key in a PKCS#12 keystore given inline as in the seed.
    let mut props = properties(&emulator, &names, dir.path(), "latest");
    let p12 =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../salesforce-emulator/testdata/jwt-test-key.p12"))
            .expect("read the test keystore");
    let o = props.as_object_mut().expect("object");
    for k in [
        "salesforce.password",
        "salesforce.password.token",
        "salesforce.consumer.secret",
    ] {
        o.remove(k);
    }
    o.insert("salesforce.grant.type".into(), json!("JWT_BEARER"));
    o.insert(
        "salesforce.jwt.keystore.file".into(),
        json!(format!("data:text/plain;base64,{}", b64(&p12))),
    );
    o.insert("salesforce.jwt.keystore.password".into(), json!("changeit"));
    let source = Source::start(dir.path(), &props);
    source.wait_connected().await;
    // No PushTopic existed: the source created it from its properties.
    let topics = emulator.org.records("PushTopic");
    assert_eq!(topics.len(), 1, "the source creates its PushTopic");
    assert_eq!(
        topics[0]["Query"],
        "SELECT Id, Subject, Status, Priority, Device__c FROM Case"
    );
    assert_eq!(topics[0]["NotifyForOperationDelete"], false);
    // The status endpoint has nothing before the first request.
    let (ok, _) = source.cli(&["status"]).await;
    assert!(!ok, "status before any request is an error (404)");
    for i in 0..4 {
        emulator
            .org
            .create("Case", &case(&format!("o{i}"), "d"), &uid)
            .expect("case");
    }
    let channel = format!("/topic/{TOPIC}");
    // The emulator turns changes into events asynchronously.
    let emitted = wait_for(Duration::from_secs(5), || async {
        let r = emulator.streaming.retained(&channel);
        (r.len() == 4).then_some(r)
    })
    .await
    .expect("four events emitted");
    if wait_for(Duration::from_secs(20), || async {
        (replay_ids(&collector).len() >= 4).then_some(())
    })
    .await
    .is_none()
    {
        source.fail("the four events did not arrive");
    }
    let want = json!(emitted[3]);
    wait_for(Duration::from_secs(5), || async {
        (source.api("/offsets").await["offsets"][0]["offset"]["replayId"] == want).then_some(())
    })
    .await;
    let (ok, got) = source.cli(&["get"]).await;
    assert!(ok, "{got}");
    assert_eq!(got["offsets"][0]["offset"]["replayId"], json!(emitted[3]));
    assert!(got["metadata"]["observed_at"].is_string());

    // PATCH back to the first event: the three after it come again.
    let (ok, req) = source.cli(&["patch", "--replay-id", &emitted[0].to_string()]).await;
    assert!(ok, "{req}");
    assert_eq!(req["type"], "PATCH");
    let applied = |want: &'static str| {
        let s = &source;
        async move {
            wait_for(Duration::from_secs(20), || async {
                let st = s.api("/offsets/request/status").await;
                (st["status"]["phase"] == want).then_some(st)
            })
            .await
        }
    };
    let Some(st) = applied("APPLIED").await else {
        source.fail("the PATCH was not applied");
    };
    assert_eq!(st["previous_offsets"][0]["offset"]["replayId"], json!(emitted[3]));
    if wait_for(Duration::from_secs(20), || async {
        (replay_ids(&collector).len() >= 7).then_some(())
    })
    .await
    .is_none()
    {
        source.fail(format!(
            "after the PATCH, events 2-4 were not replayed: {:?}",
            replay_ids(&collector)
        ));
    }
    assert_eq!(replay_ids(&collector)[4..7], emitted[1..4]);

    // A replay id Salesforce never gave: FAILED, the previous offset kept.
    let (ok, _) = source.cli(&["patch", "--replay-id", "987654"]).await;
    assert!(ok);
    let Some(st) = applied("FAILED").await else {
        source.fail("the PATCH to an unknown replay id did not fail");
    };
    assert!(
        st["status"]["message"].as_str().unwrap_or_default().contains("987654"),
        "{st}"
    );
    let (_, got) = source.cli(&["get"]).await;
    assert_eq!(
        got["offsets"][0]["offset"]["replayId"],
        json!(emitted[3]),
        "the previous offset is kept"
    );

    // DELETE: back to initial.start (latest): nothing replayed, the offset is empty until
    // the next event.
    let before = replay_ids(&collector).len();
    let (ok, req) = source.cli(&["delete"]).await;
    assert!(ok, "{req}");
    if applied("APPLIED").await.is_none() {
        source.fail("the DELETE was not applied");
    }
    let (_, got) = source.cli(&["get"]).await;
    assert_eq!(got["offsets"], json!([]), "{got}");
    emulator
        .org
        .create("Case", &case("after delete", "d"), &uid)
        .expect("case");
    let last = wait_for(Duration::from_secs(5), || async {
        let r = emulator.streaming.retained(&channel);
        (r.len() == 5).then(|| r[4])
    })
    .await
    .expect("the fifth event");
    if wait_for(Duration::from_secs(20), || async {
        replay_ids(&collector).contains(&last).then_some(())
    })
    .await
    .is_none()
    {
        source.fail("no event after the DELETE");
    }
    assert_eq!(
        replay_ids(&collector).len(),
        before + 1,
        "latest: nothing replayed after DELETE"
    );
}

#[tokio::test]
async fn pushtopic_config_errors_name_the_property() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.json");
    std::fs::write(
        &path,
        json!({"salesforce.grant.type": "JWT_BEARER", "salesforce.username": "u", "salesforce.consumer.key": "k",
               "salesforce.object": "Case", "salesforce.push.topic.name": "T", "salesforce.initial.start": "earliest",
               "output.data.format": "PROTOBUF", "kafka.topic": "ignored"})
        .to_string(),
    )
    .expect("write");
    let p = path.display().to_string();
    let out = run_cli(
        &["connector", "pushtopic", "--config", &p, "--check"],
        Duration::from_secs(20),
    )
    .await
    .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for key in [
        "salesforce.jwt.keystore.file: required",
        "salesforce.initial.start",
        "output.data.format: PROTOBUF is not offered",
    ] {
        assert!(err.contains(key), "{key} not in:\n{err}");
    }
}

/// `output.data.format = AVRO`: each body is an Avro object container carrying its schema,
/// read back by an independent reader (Python's fastavro) given no schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushtopic_avro_bodies_carry_their_schema() {
    let _rabbit = RABBITMQ.read().await;
    let names = Names::new("pushtopic-avro");
    let dir = tempfile::tempdir().expect("tempdir");
    let emulator = start_emulator().await;
    let uid = user(&emulator);
    let _amqp = bind_queue(&names, &names.cases_exchange).await;
    let collector = Collector::start(&names).await;
    let mut props = properties(&emulator, &names, dir.path(), "all");
    props["output.data.format"] = json!("AVRO");
    let source = Source::start(dir.path(), &props);
    // The source creates the PushTopic: only later changes have events.
    source.wait_connected().await;
    for i in 0..3 {
        emulator
            .org
            .create("Case", &case(&format!("avro {i}"), &format!("dev-{i}")), &uid)
            .expect("case");
    }
    if wait_for(Duration::from_secs(30), || async {
        (collector.all().len() >= 3).then_some(())
    })
    .await
    .is_none()
    {
        source.fail("the three events did not arrive as Avro");
    }
    let mut paths = Vec::new();
    for (i, r) in collector.all().iter().enumerate() {
        assert_eq!(r.content_type.as_deref(), Some("avro/binary"));
        assert_eq!(r.delivery_mode, Some(2));
        let path = dir.path().join(format!("event-{i}.avro"));
        std::fs::write(&path, &r.raw).expect("write the body");
        paths.push(path);
    }
    const READ: &str = r#"
import fastavro, json, sys
out = []
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        r = fastavro.reader(f)
        out.append({"schema": r.writer_schema["name"], "records": list(r)})
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(READ)
        .args(&paths)
        .output()
        .expect("python3 (scripts/salesforce-clients.sh installs fastavro)");
    assert!(
        out.status.success(),
        "fastavro could not read the bodies: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoded: Value = serde_json::from_slice(&out.stdout).expect("fastavro's JSON");
    let decoded = decoded.as_array().expect("one entry per message");
    assert_eq!(decoded.len(), 3, "{decoded:?}");
    for (i, d) in decoded.iter().enumerate() {
        assert_eq!(d["schema"], "io.edgecase.salesforce.Case", "{d}");
        let records = d["records"].as_array().expect("records");
        assert_eq!(records.len(), 1, "one record per message: {d}");
        let rec = &records[0];
        assert_eq!(rec["Subject"], format!("avro {i}"), "{d}");
        assert_eq!(rec["Device__c"], format!("dev-{i}"), "{d}");
        assert_eq!(rec["Priority"], "High", "{d}");
        assert_eq!(rec["_EventType"], "created", "{d}");
        assert_eq!(rec["_ObjectType"], "Case", "{d}");
        assert!(rec["_ReplayId"].as_i64().is_some_and(|n| n > 0), "{d}");
        assert!(rec["Id"].as_str().is_some_and(|s| !s.is_empty()), "{d}");
    }
}

/// The same source as a `[pushtopic]` section of the agent's TOML under `edgecase run`
/// (quoted dotted keys, as `salesforce.password` and `salesforce.password.token` cannot both
/// be TOML tables), with `data.dir` and `amqp.url` from the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushtopic_section_runs_under_edgecase_run() {
    let _rabbit = RABBITMQ.read().await;
    let mut bed = TestBed::new("pushtopic-run");
    let emulator = start_emulator().await;
    // Not the agent's cases exchange: the agent declares that one with its own arguments.
    let exchange = format!("{}-sf", bed.names.base);
    let amqp = bind_queue(&bed.names, &exchange).await;
    let collector = Collector::start(&bed.names).await;
    let mut section = properties(&emulator, &bed.names, bed.dir.path(), "all");
    let o = section.as_object_mut().expect("object");
    for k in ["amqp.url", "data.dir", "connector.class", "kafka.auth.mode"] {
        o.remove(k);
    }
    o.insert("amqp.exchange".into(), json!(exchange));
    let admin: SocketAddr = o["admin.listen"].as_str().expect("admin").parse().expect("address");
    let name = o["name"].as_str().expect("name").to_string();
    bed.config["pushtopic"] = section;
    let agent = bed.start_agent();
    let uid = user(&emulator);
    let subscribed = wait_for(Duration::from_secs(30), || async {
        let s = http_get(admin, &format!("/connectors/{name}/status")).await.ok()?;
        (serde_json::from_str::<Value>(&s).ok()?["connected"] == true).then_some(())
    })
    .await;
    if subscribed.is_none() {
        agent.fail("the [pushtopic] section did not start a subscribed source");
    }
    for i in 0..3 {
        emulator
            .org
            .create("Case", &case(&format!("run {i}"), "d"), &uid)
            .expect("case");
    }
    if wait_for(Duration::from_secs(20), || async {
        (replay_ids(&collector).len() >= 3).then_some(())
    })
    .await
    .is_none()
    {
        agent.fail("the three events did not arrive");
    }
    assert!(
        bed.data_dir().join("pushtopic/offset.json").is_file(),
        "data.dir defaults under the agent's data dir"
    );
    drop(agent);
    if let Ok(ch) = amqp.create_channel().await {
        let _ = ch
            .exchange_delete(
                exchange.as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// A stored replay id that Salesforce no longer retains: reported, counted, and the source
/// continues from the earliest retained event (the documented policy), losing nothing that
/// is still retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushtopic_stored_replay_id_past_retention_resumes_from_the_earliest_retained() {
    let _rabbit = RABBITMQ.read().await;
    let names = Names::new("pushtopic-retention");
    let dir = tempfile::tempdir().expect("tempdir");
    let emulator = start_emulator().await;
    let _amqp = bind_queue(&names, &names.cases_exchange).await;
    let collector = Collector::start(&names).await;
    let uid = user(&emulator);
    let mut source = Source::start(dir.path(), &properties(&emulator, &names, dir.path(), "latest"));
    source.wait_connected().await;
    for i in 0..2 {
        emulator
            .org
            .create("Case", &case(&format!("old {i}"), "d"), &uid)
            .expect("case");
    }
    let arrived = |n: usize| {
        let c = &collector;
        async move {
            wait_for(Duration::from_secs(20), || async {
                (replay_ids(c).len() >= n).then_some(())
            })
            .await
        }
    };
    if arrived(2).await.is_none() {
        source.fail("the first two events did not arrive");
    }
    wait_for(Duration::from_secs(5), || async {
        (source.api("/offsets").await["offsets"][0]["offset"]["replayId"].as_i64()
            == replay_ids(&collector).last().copied())
        .then_some(())
    })
    .await;
    source.kill9();
    // While it is down, everything it saw leaves the retention window; two new events come.
    emulator.streaming.update_settings(|s| s.retention_ms = 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    emulator
        .streaming
        .update_settings(|s| s.retention_ms = 24 * 3600 * 1000);
    for i in 0..2 {
        emulator
            .org
            .create("Case", &case(&format!("new {i}"), "d"), &uid)
            .expect("case");
    }
    source.spawn();
    if arrived(4).await.is_none() {
        source.fail("the events retained after the gap did not arrive");
    }
    let stats = source.api("/status").await;
    assert_eq!(stats["invalid_replay"], 1, "{stats}");
    let log = std::fs::read_to_string(&source.log).unwrap_or_default();
    assert!(
        log.contains("no longer retains the stored replay id"),
        "the gap is reported:\n{log}"
    );
    let ids = replay_ids(&collector);
    assert_eq!(ids.len(), 4, "no duplicate: {ids:?}");
}
