//! Salesforce connector throughput: cases per second from RabbitMQ into the Salesforce
//! emulator answering every request after 50 ms, one request at a time (the baseline)
//! against several in flight and Collections batches, all under the same tenant rate limit,
//! in one run. The emulator counts the most requests it received in any second, so the
//! table shows whether the rate limit held.
//!
//! `cargo bench -p edgecase --bench salesforce` (RabbitMQ on 127.0.0.1:5672, guest/guest).
//! Each mode gets a fresh emulator and its own queue, filled before the connector starts.

use edgecase::config::AmqpConfig;
use edgecase::connectors::salesforce::{self, config::SalesforceConfig};
use edgecase::metrics::Metrics;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use salesforce_emulator::{Emulator, EmulatorConfig};
use serde_json::json;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const LATENCY_MS: u64 = 50;
const RATE_LIMIT: f64 = 20.0;
const GOAL_RATIO: f64 = 20.0;

struct Mode {
    name: &'static str,
    cases: usize,
    concurrency: usize,
    batch_size: usize,
}

struct Row {
    name: &'static str,
    cases: usize,
    seconds: f64,
    per_second: f64,
    max_per_second: u64,
    requests: u64,
    max_concurrent: u64,
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("salesforce benchmark: skipped (run it with `cargo bench -p edgecase --bench salesforce`)");
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
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("salesforce benchmark: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, String> {
    edgecase::tls::install_crypto_provider();
    let modes = [
        Mode {
            name: "one request at a time (baseline)",
            cases: 100,
            concurrency: 1,
            batch_size: 1,
        },
        Mode {
            name: "16 in flight, one Case per request",
            cases: 200,
            concurrency: 16,
            batch_size: 1,
        },
        Mode {
            name: "4 in flight, Collections batches of 200",
            cases: 10_000,
            concurrency: 4,
            batch_size: 200,
        },
    ];
    let mut rows = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        rows.push(measure(i, mode).await?);
    }
    let base = rows[0].per_second;
    println!();
    println!(
        "Salesforce connector: RabbitMQ -> emulator answering after {LATENCY_MS} ms, tenant rate limit {RATE_LIMIT} requests/s"
    );
    println!(
        "{:<42} {:>7} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "Mode", "Cases", "Seconds", "Cases/s", "Ratio", "Requests", "Max req/s", "Max conc."
    );
    println!("{}", "-".repeat(108));
    for r in &rows {
        println!(
            "{:<42} {:>7} {:>8.2} {:>9.1} {:>7.1} {:>9} {:>9} {:>9}",
            r.name,
            r.cases,
            r.seconds,
            r.per_second,
            r.per_second / base,
            r.requests,
            r.max_per_second,
            r.max_concurrent
        );
    }
    println!("{}", "-".repeat(108));
    let best = rows.iter().map(|r| r.per_second).fold(0.0, f64::max);
    let within = rows.iter().all(|r| r.max_per_second as f64 <= RATE_LIMIT);
    let pass = best / base >= GOAL_RATIO && within;
    println!(
        "Goal: at least {GOAL_RATIO}x the baseline without exceeding {RATE_LIMIT} requests/s: best {:.1}x, rate limit {} -> {}",
        best / base,
        if within { "held" } else { "EXCEEDED" },
        if pass { "PASS" } else { "MISS" }
    );
    Ok(pass)
}

async fn measure(i: usize, mode: &Mode) -> Result<Row, String> {
    let base = format!("bench-sf-{}-{i}", std::process::id());
    let amqp = AmqpConfig {
        readings_exchange: format!("{base}-readings"),
        cases_exchange: format!("{base}-cases"),
        dead_letter_exchange: format!("{base}-dlx"),
        unrouted_exchange: format!("{base}-unrouted"),
        unrouted_queue: format!("{base}-unrouted"),
        ..AmqpConfig::default()
    };
    let queue = format!("{base}-facilities");
    let dlq = format!("{queue}.dlq");
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .map_err(|e| format!("RabbitMQ at {AMQP_URL}: {e}"))?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    edgecase::publish::amqp::declare_topology(&ch, &amqp)
        .await
        .map_err(|e| e.to_string())?;
    // The division queue, declared as the connector declares it, filled before it starts.
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(amqp.dead_letter_exchange.as_str().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.queue_declare(queue.as_str().into(), durable, args)
        .await
        .map_err(|e| e.to_string())?;
    ch.queue_bind(
        queue.as_str().into(),
        amqp.cases_exchange.as_str().into(),
        "case.facilities".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut confirms = Vec::with_capacity(mode.cases);
    for n in 0..mode.cases {
        let body = json!({
            "event_id": format!("{base}-ev-{n}"), "message_id": format!("{base}-ev-{n}"), "action": "raise",
            "rule": "hot", "division": "facilities", "device_id": format!("boiler-{}", n % 50), "sensor": "temp",
            "case": {"Subject": format!("boiler-{} temp at 81.5C", n % 50), "Priority": "High"},
            "first_seen": "2026-11-25T20:00:00.000Z", "count": 3, "gateway_id": "bench"
        });
        let c = ch
            .basic_publish(
                amqp.cases_exchange.as_str().into(),
                "case.facilities".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(|e| e.to_string())?;
        confirms.push(c);
    }
    for c in confirms {
        c.await.map_err(|e| e.to_string())?;
    }

    let mut cfg = EmulatorConfig::default();
    cfg.settings.latency_ms = LATENCY_MS;
    let emulator = Emulator::start(cfg, "127.0.0.1:0".parse().map_err(|_| "address")?)
        .await
        .map_err(|e| e.to_string())?;
    let config: SalesforceConfig = serde_json::from_value(json!({
        "tenant": {
            "client_id": "edgecase-client-id", "client_secret": "edgecase-client-secret",
            "login_url": emulator.url(), "max_requests_per_second": RATE_LIMIT,
            "retry_min": "50ms", "retry_max": "1s",
            "amqp": {"url": AMQP_URL}
        },
        "divisions": [{
            "name": "facilities", "username": "integration@edgecase.example", "password": "password",
            "security_token": "TOKEN", "queue": queue, "concurrency": mode.concurrency,
            "batch_size": mode.batch_size, "batch_wait": "20ms",
            "defaults": {"Origin": "Edgecase"}, "mapping": {"Device__c": "device_id"}
        }]
    }))
    .map_err(|e| e.to_string())?;
    let resolved = config.resolve("", &amqp).map_err(|p| p.join("; "))?;
    let metrics = Arc::new(Metrics::new());
    // The clock starts with the connector (its login is one request) and stops when the
    // emulator holds every Case.
    let started = Instant::now();
    let connector = salesforce::start(resolved, metrics.clone())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = started + Duration::from_secs(120);
    let mut timed_out = None;
    while emulator.case_count() < mode.cases {
        if Instant::now() > deadline {
            timed_out = Some(format!(
                "{}: only {} of {} Cases after 120 s",
                mode.name,
                emulator.case_count(),
                mode.cases
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    connector.shutdown().await;
    let stats = emulator.org.stats();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(dlq.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(amqp.unrouted_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    for x in [
        &amqp.readings_exchange,
        &amqp.cases_exchange,
        &amqp.dead_letter_exchange,
        &amqp.unrouted_exchange,
    ] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
    if let Some(e) = timed_out {
        return Err(e);
    }
    Ok(Row {
        name: mode.name,
        cases: mode.cases,
        seconds,
        per_second: mode.cases as f64 / seconds,
        max_per_second: stats.max_per_second,
        requests: stats.rest_requests,
        max_concurrent: stats.max_concurrent,
    })
}
