//! Stopping the agent, hard or gently, loses nothing: what it acknowledged is in its
//! buffer, and what it did not is still in the broker's session for it.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_loses_nothing() {
    let _rabbitmq = RABBITMQ.read().await;
    const TOTAL: u64 = 6000;
    let bed = TestBed::new("kill9");
    let mut agent = bed.start_agent();
    agent.wait_connected(true).await;
    let (collector, _probe) = subscribed_collector(&agent, &bed.names).await;

    let stream = Streaming::start(&bed.names, steady_four_devices(TOTAL, &collector)).await;
    let mut max_backlog = 0;
    for (kill, at) in [1100u64, 2700, 4400].into_iter().enumerate() {
        stream
            .wait_published(at, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| agent.fail(e));
        agent.kill9();
        let down = Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
        max_backlog = max_backlog.max(stream.published().saturating_sub(collector.distinct()));
        agent.restart();
        eprintln!(
            "kill -9 #{} at {at} published; restarted after {:?}",
            kill + 1,
            down.elapsed()
        );
        agent.wait_connected(true).await;
    }
    let published = stream
        .finish(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    assert_eq!(published, TOTAL);
    expect_all_arrived(&agent, &collector, TOTAL, Duration::from_secs(60)).await;
    eprintln!(
        "kill -9 x3: all {TOTAL} readings arrived; {} duplicates (allowed); backlog at a kill at most {max_backlog}",
        duplicates(&collector)
    );
    assert_eq!(agent.starts, 4);
    assert!(
        max_backlog < 1000,
        "the broker may have dropped readings: {max_backlog} were queued for the agent"
    );
    collector.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly() {
    let _rabbitmq = RABBITMQ.read().await;
    let bed = TestBed::new("sigterm");
    let mut agent = bed.start_agent();
    agent.wait_connected(true).await;
    let (collector, _probe) = subscribed_collector(&agent, &bed.names).await;

    let stream = Streaming::start(&bed.names, steady_four_devices(4000, &collector)).await;
    stream
        .wait_published(1500, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    // SIGTERM in the middle of the traffic; the stream stops right after, so readings are
    // in every stage (broker, ingest, buffer, publisher) when the agent gets it.
    agent.sigterm();
    stream.stop();
    let exit = agent.wait_exit(Duration::from_secs(10)).await;
    let published = stream
        .finish(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    let (status, took) = exit.unwrap_or_else(|e| agent.fail(format!("SIGTERM: {e}")));
    if !status.success() {
        agent.fail(format!("exit after SIGTERM: {status}, want status 0"));
    }
    eprintln!(
        "SIGTERM: exited 0 after {took:?}; {} of {published} readings had arrived",
        collector.distinct()
    );

    // What was left in the buffer or the broker's session arrives after a restart.
    agent.restart();
    agent.wait_connected(true).await;
    expect_all_arrived(&agent, &collector, published, Duration::from_secs(30)).await;
    // Duplicates are checked by sigterm_acknowledges_everything_it_committed.
    eprintln!(
        "SIGTERM: all {published} readings arrived; {} duplicates",
        duplicates(&collector)
    );
    collector.close().await;
}

/// The shutdown order promises that every reading committed before SIGTERM is acknowledged
/// to the broker before the agent exits, so a clean stop never causes a redelivery (a
/// redelivered reading whose first copy was already published arrives twice). Readings keep
/// streaming through every SIGTERM, so the broker always has messages in flight to the agent.
///
/// Regression: the agent used to close its MQTT socket with unread input in it, so the
/// kernel sent a reset that could reach Mosquitto before the last PUBACKs were processed
/// (about half the runs failed with the CPU busy). It now reads until the broker closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_acknowledges_everything_it_committed() {
    let _rabbitmq = RABBITMQ.read().await;
    const CYCLES: u64 = 10;
    let bed = TestBed::new("sigterm-acks");
    let mut agent = bed.start_agent();
    agent.wait_connected(true).await;
    let (collector, _probe) = subscribed_collector(&agent, &bed.names).await;

    let stream = Streaming::start(&bed.names, steady_four_devices(400 * (CYCLES + 1), &collector)).await;
    for cycle in 1..=CYCLES {
        stream
            .wait_published(400 * cycle, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| agent.fail(e));
        agent.terminate(Duration::from_secs(10)).await;
        agent.restart();
        agent.wait_connected(true).await;
    }
    let published = stream
        .finish(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    expect_all_arrived(&agent, &collector, published, Duration::from_secs(30)).await;
    let counts = arrivals(&collector.readings());
    let mut twice: Vec<u64> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|((_, seq), _)| *seq)
        .collect();
    twice.sort_unstable();
    if !twice.is_empty() {
        agent.fail(format!(
            "{} of {published} readings arrived more than once across {CYCLES} clean SIGTERM restarts: {twice:?}",
            twice.len()
        ));
    }
    collector.close().await;
}
