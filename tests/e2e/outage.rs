//! A RabbitMQ outage is ridden out: the agent keeps ingesting into its buffer and publishes
//! the backlog when the broker is back.
//!
//! This test stops RabbitMQ for everyone, so it holds the write guard of
//! [`RABBITMQ`]: no other test that needs RabbitMQ runs meanwhile.

use crate::harness::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Stops the RabbitMQ application, and starts it again when told or when dropped, so a
/// failing test never leaves the machine without its broker.
struct RabbitMqStopped {
    running: bool,
}

impl RabbitMqStopped {
    async fn stop() -> RabbitMqStopped {
        // The guard exists before the stop: a stop that fails halfway is undone too.
        let guard = RabbitMqStopped { running: false };
        tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
            .await
            .expect("join")
            .expect("stop RabbitMQ");
        guard
    }

    async fn start(&mut self) {
        tokio::task::spawn_blocking(start_rabbitmq)
            .await
            .expect("join")
            .expect("start RabbitMQ");
        self.running = true;
    }
}

fn start_rabbitmq() -> Result<(), String> {
    rabbitmqctl(&["start_app"])?;
    rabbitmqctl(&["await_startup"])
}

impl Drop for RabbitMqStopped {
    fn drop(&mut self) {
        if !self.running
            && let Err(e) = start_rabbitmq()
        {
            eprintln!("could not start RabbitMQ again: {e}");
        }
    }
}

fn one_device(_: u64) -> (String, String) {
    ("dev-outage".to_string(), "temp".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_outage_is_ridden_out() {
    let _rabbitmq = RABBITMQ.write().await;
    let bed = TestBed::new("outage");
    let mut agent = bed.start_agent();
    agent.wait_connected(true).await;
    // Durable queue, persistent messages: what reached it before the outage survives.
    bind_readings_queue(&bed.names).await;
    let mut probe = Publisher::connect(&bed.names).await;
    wait_subscribed(&agent, &mut probe, &bed.names).await;

    let plan = StreamPlan {
        total: 20_000,
        per_second: Some(200.0),
        identity: one_device,
        lead: None,
    };
    let stream = Streaming::start(&bed.names, plan).await;
    stream
        .wait_published(400, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| agent.fail(e));

    let mut rabbitmq = RabbitMqStopped::stop().await;
    agent
        .wait_metrics("the agent to notice the outage", Duration::from_secs(15), |m| {
            m.value("edgecase_amqp_connected") == 0.0
        })
        .await;
    let outage = Instant::now();
    let ingest = "edgecase_ingest_readings_total{source=\"mqtt\"}";
    let first = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    let mut last = first.clone();
    while outage.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !agent.is_running() {
            agent.fail("the agent exited during the RabbitMQ outage");
        }
        let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
        if m.value(ingest) <= last.value(ingest) {
            agent.fail(format!("ingest stalled during the outage:\n{}", m.summary()));
        }
        if m.value("edgecase_buffer_pending_readings") <= 0.0 {
            agent.fail(format!("nothing buffered during the outage:\n{}", m.summary()));
        }
        last = m;
    }
    let health = agent.healthz().await.unwrap_or_else(|e| agent.fail(e));
    assert_eq!(health["amqp_connected"], false, "{health}");
    let ingested = last.value(ingest) - first.value(ingest);
    let pending = last.value("edgecase_buffer_pending_readings");
    if ingested < 2000.0 || pending < ingested {
        agent.fail(format!(
            "in 20 s of outage at 200 readings/s: {ingested} ingested, {pending} pending:\n{}",
            last.summary()
        ));
    }
    eprintln!(
        "outage: {ingested} ingested and {pending} pending after {:?}",
        outage.elapsed()
    );

    rabbitmq.start().await;
    amqp_connect(Duration::from_secs(60))
        .await
        .expect("RabbitMQ accepts connections again");
    agent
        .wait_metrics("the agent to reconnect", Duration::from_secs(20), |m| {
            m.value("edgecase_amqp_connected") == 1.0
        })
        .await;
    let now = stream.published();
    stream
        .wait_published(now + 200, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    stream.stop();
    let published = stream
        .finish(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| agent.fail(e));

    let collector = Collector::start(&bed.names).await;
    if let Err(e) = collector.wait_distinct(published, Duration::from_secs(60)).await {
        let counts = arrivals(&collector.readings());
        let gone: Vec<u64> = (0..published)
            .filter(|i| !counts.contains_key(&("dev-outage".to_string(), *i)))
            .collect();
        agent.fail(format!(
            "{e}; {} missing, first: {:?}",
            gone.len(),
            &gone[..gone.len().min(20)]
        ));
    }
    agent
        .wait_metrics("the backlog to drain", Duration::from_secs(30), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
        })
        .await;
    let dups: usize = arrivals(&collector.readings()).values().map(|n| n - 1).sum();
    eprintln!("outage: all {published} readings arrived; {dups} duplicates (allowed)");
    collector.close().await;
}
