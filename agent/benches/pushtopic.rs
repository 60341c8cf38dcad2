//! PushTopic source benchmark: `cargo bench -p edgecase --bench pushtopic`.
//!
//! Events per second from the Salesforce emulator's Streaming API to confirmed AMQP
//! publishes, compared with a ceiling measured in the same run.
//!
//! - Setup: the emulator (in-process) with a PushTopic on Case and N Cases created before
//!   the source starts, so N events are retained; RabbitMQ at 127.0.0.1:5672 with a fresh
//!   exchange and queue.
//! - Ceiling: lapin alone publishes N messages of the same size, persistent and mandatory,
//!   in batches of the emulator's connect batch size, waiting for every confirm of a batch
//!   before the next: the AMQP work the source must do, without Salesforce or JSON.
//! - Source: the real source (in-process, `salesforce.initial.start = all`): handshake,
//!   subscribe with replay -2, long polls, a JSON body per event, publish, confirms, the
//!   replay id stored (fsync) after each batch. Timed from start to the last confirmed batch.

use anyhow::{Context, Result, anyhow, bail};
use edgecase::connectors::pushtopic::{self, config::PushTopicConfig, config::flatten};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use salesforce_emulator::{Emulator, EmulatorConfig};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EVENTS: usize = 20_000;
const BATCH: usize = 1000;

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("pushtopic benchmark: skipped (run it with `cargo bench -p edgecase --bench pushtopic`)");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("benchmark: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmark: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    edgecase::tls::install_crypto_provider();
    let base = format!("bench-pushtopic-{}", std::process::id());
    let exchange = format!("{base}-x");
    let queue = format!("{base}-q");
    let emulator = Emulator::start(EmulatorConfig::default(), "127.0.0.1:0".parse()?)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    emulator.streaming.update_settings(|s| {
        s.max_batch = BATCH;
        s.connect_timeout_ms = 2000;
        s.retention_max_events = EVENTS * 2;
    });
    let uid = emulator.org.users()[0].id.clone();
    let topic = json!({"Name": "BenchCases", "Query": "SELECT Id, Subject, Status, Priority, Origin, Device__c, Sensor__c, Reading__c FROM Case", "ApiVersion": 58.0});
    emulator
        .org
        .create("PushTopic", topic.as_object().context("object")?, &uid)
        .map_err(|e| anyhow!("{e:?}"))?;
    let t = Instant::now();
    for i in 0..EVENTS {
        let c = json!({"Subject": format!("Temperature above 80 C on press line {}", i % 50), "Priority": "High",
            "Origin": "Edgecase", "Device__c": format!("press-{}", i % 50), "Sensor__c": "temperature", "Reading__c": "81.5"});
        emulator
            .org
            .create("Case", c.as_object().context("object")?, &uid)
            .map_err(|e| anyhow!("{e:?}"))?;
        // Let the emulator's streaming task keep up with its change channel (4,096 deep).
        if i % 1000 == 999 {
            while emulator.streaming.retained("/topic/BenchCases").len() < i + 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    while emulator.streaming.retained("/topic/BenchCases").len() < EVENTS {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = emulator.streaming.stats();
    if stats.changes_lagged > 0 {
        bail!("the emulator missed {} changes while setting up", stats.changes_lagged);
    }
    println!(
        "setup: {EVENTS} Cases and retained events in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .context("RabbitMQ at 127.0.0.1:5672")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;

    // Ceiling: lapin alone, same sizes and batches.
    let body = json!({"Id": "500Ed0000000001AAA", "Subject": "Temperature above 80 C on press line 7", "Status": "New",
        "Priority": "High", "Origin": "Edgecase", "Device__c": "press-7", "Sensor__c": "temperature", "Reading__c": "81.5",
        "_ObjectType": "Case", "_EventType": "created", "_ReplayId": 123456, "_EventCreatedDate": "2026-11-25T21:00:00.000Z"})
    .to_string();
    let t = Instant::now();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(BATCH) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for i in chunk {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(format!("/topic/BenchCases/{i}").into());
            confirms.push(
                ch.basic_publish(
                    exchange.as_str().into(),
                    "pushtopic.BenchCases".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    props,
                )
                .await?,
            );
        }
        for c in confirms {
            if !matches!(c.await?, Confirmation::Ack(None)) {
                bail!("ceiling: a publish was not acked");
            }
        }
    }
    let ceiling = EVENTS as f64 / t.elapsed().as_secs_f64();

    // The source.
    let dir = tempfile::tempdir()?;
    let props = flatten(&json!({
        "name": "bench",
        "salesforce.instance": emulator.url(),
        "salesforce.username": "integration@edgecase.example",
        "salesforce.password": "password",
        "salesforce.password.token": "TOKEN",
        "salesforce.consumer.key": "edgecase-client-id",
        "salesforce.consumer.secret": "edgecase-client-secret",
        "salesforce.object": "Case",
        "salesforce.push.topic.name": "BenchCases",
        "salesforce.initial.start": "all",
        "salesforce.version": "58.0",
        "amqp.url": AMQP_URL,
        "amqp.exchange": exchange,
        "data.dir": dir.path().display().to_string(),
    }));
    let config = PushTopicConfig::from_properties(&props, "").map_err(|e| anyhow!(e.join("; ")))?;
    let shared = pushtopic::open(config)?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let task = tokio::spawn(pushtopic::serve(shared.clone(), cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(300);
    while shared.stats.events_published.load(Ordering::Relaxed) < EVENTS as u64 {
        if Instant::now() > deadline || task.is_finished() {
            cancel.cancel();
            bail!(
                "the source published {} of {EVENTS} events",
                shared.stats.events_published.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t.elapsed();
    let source = EVENTS as f64 / elapsed.as_secs_f64();
    cancel.cancel();
    let _ = task.await;
    let batches = shared.stats.batches_confirmed.load(Ordering::Relaxed);
    println!();
    println!("| figure | events/s | ceiling (lapin alone) | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| PushTopic source: emulator → confirmed AMQP publishes ({EVENTS} events, {batches} batches) | {source:.0} | {ceiling:.0} | {:.2} |",
        source / ceiling
    );
    println!();
    println!(
        "source: {EVENTS} events in {:.2} s including login, PushTopic lookup, handshake and subscribe",
        elapsed.as_secs_f64()
    );
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}
