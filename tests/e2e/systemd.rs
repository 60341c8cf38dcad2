//! The agent under systemd's notify protocol, with the test as the service manager: a
//! datagram socket at `NOTIFY_SOCKET` and a `WATCHDOG_USEC`, as `Type=notify` and
//! `WatchdogSec=` give them (systemd/edgecase.service).

use crate::harness::*;
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `WatchdogSec=` for these tests (the unit has 30 s): the agent checks every third.
const WATCHDOG: Duration = Duration::from_secs(3);

/// What the agent sent to the notify socket, each line with its arrival time.
#[derive(Clone)]
struct Manager {
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    _task: Arc<tokio::task::JoinHandle<()>>,
}

impl Manager {
    fn listen(path: &Path) -> Manager {
        let socket = tokio::net::UnixDatagram::bind(path).expect("bind the notify socket");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let now = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let mut sink = sink.lock().unwrap();
                sink.extend(text.lines().map(|l| (now, l.to_string())));
            }
        });
        Manager {
            received,
            _task: Arc::new(task),
        }
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.received.lock().unwrap().clone()
    }

    fn first(&self, line: &str) -> Option<Instant> {
        self.lines().into_iter().find(|(_, l)| l == line).map(|(t, _)| t)
    }

    async fn wait_for(&self, agent: &Agent, line: &str, within: Duration) -> Instant {
        match wait_for(within, || async { self.first(line) }).await {
            Some(t) => t,
            None => agent.fail(format!(
                "no {line} on the notify socket within {within:?}; got {:?}",
                self.lines().iter().map(|(_, l)| l).collect::<Vec<_>>()
            )),
        }
    }

    /// The keep-alives after `from`, and the longest time without one until `to`.
    fn keep_alives(&self, from: Instant, to: Instant) -> (usize, Duration) {
        let times: Vec<Instant> = self
            .lines()
            .into_iter()
            .filter(|(t, l)| l == "WATCHDOG=1" && *t >= from && *t <= to)
            .map(|(t, _)| t)
            .collect();
        let mut longest = Duration::ZERO;
        let mut last = from;
        for t in times.iter().copied().chain([to]) {
            longest = longest.max(t - last);
            last = t;
        }
        (times.len(), longest)
    }

    fn stuck(&self) -> Option<String> {
        self.lines()
            .into_iter()
            .map(|(_, l)| l)
            .find(|l| l.starts_with("STATUS=stuck") || l == "WATCHDOG=trigger")
    }
}

fn start_notified(bed: &TestBed) -> (Agent, Manager) {
    let socket = bed.dir.path().join("notify.sock");
    let manager = Manager::listen(&socket);
    bed.write_config();
    let usec = WATCHDOG.as_micros().to_string();
    let socket = socket.display().to_string();
    let agent = Agent::start_with_env(bed, &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", &usec)]);
    (agent, manager)
}

/// READY=1 once running, keep-alives while readings flow, STOPPING=1 at SIGTERM and an exit
/// well inside the unit's TimeoutStopSec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_ready_keep_alives_and_stopping() {
    let _rabbitmq = RABBITMQ.read().await;
    let bed = TestBed::new("sd-notify");
    let (mut agent, manager) = start_notified(&bed);
    let ready = manager.wait_for(&agent, "READY=1", Duration::from_secs(60)).await;
    agent.wait_connected(true).await;
    let (collector, mut publisher) = subscribed_collector(&agent, &bed.names).await;
    for seq in 0..300 {
        publisher.reading(&bed.names, "meter-1", "temp", seq).await;
    }
    collector
        .wait_distinct(300, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    // And idle for a while: an idle agent is kept alive too.
    tokio::time::sleep(WATCHDOG * 2).await;
    let now = Instant::now();
    let (count, longest) = manager.keep_alives(ready, now);
    eprintln!(
        "notify: READY=1, then {count} keep-alives over {:?}, longest gap {longest:?}",
        now - ready
    );
    if longest >= WATCHDOG {
        agent.fail(format!(
            "a gap of {longest:?} between keep-alives; systemd would have killed the agent after {WATCHDOG:?}"
        ));
    }
    if let Some(line) = manager.stuck() {
        agent.fail(format!("a healthy agent reported {line}"));
    }
    let took = agent.terminate(Duration::from_secs(30)).await;
    manager.wait_for(&agent, "STOPPING=1", Duration::from_secs(1)).await;
    eprintln!("notify: STOPPING=1, exit 0 after {took:?} (TimeoutStopSec=30s)");
    collector.close().await;
}

/// A broker that accepts connections and never answers: an outage, so the readings wait in
/// the buffer and the keep-alives go on, well past the stall timeout. The buffer fills up and
/// ingest holds input (back-pressure) for longer than the stage timeout: waiting for room is
/// idle time, not a stuck stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswering_broker_is_an_outage_not_a_stuck_pipeline() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = silent.local_addr().expect("address").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let mut bed = TestBed::new("sd-outage");
    bed.config["amqp"]["url"] = json!(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    bed.config["amqp"]["confirm_timeout"] = json!("1s");
    bed.config["watchdog"] = json!({ "stage_timeout": "10s", "stall_timeout": "2s" });
    bed.config["buffer"] = json!({ "max_readings": 10, "overflow": "refuse" });
    let (agent, manager) = start_notified(&bed);
    let ready = manager.wait_for(&agent, "READY=1", Duration::from_secs(60)).await;
    let mut publisher = Publisher::connect(&bed.names).await;
    wait_subscribed(&agent, &mut publisher, &bed.names).await;
    for seq in 0..30 {
        publisher.reading(&bed.names, "meter-1", "temp", seq).await;
    }
    agent
        .wait_metrics("a full buffer refusing input", Duration::from_secs(30), |m| {
            m.value("edgecase_buffer_pending_readings") >= 10.0 && m.value("edgecase_buffer_refused_total") >= 1.0
        })
        .await;
    // Longer than watchdog.stage_timeout.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let now = Instant::now();
    let (count, longest) = manager.keep_alives(ready, now);
    eprintln!(
        "outage: {count} keep-alives over {:?}, longest gap {longest:?}",
        now - ready
    );
    if let Some(line) = manager.stuck() {
        agent.fail(format!("a broker outage was taken for a stuck pipeline: {line}"));
    }
    if longest >= WATCHDOG {
        agent.fail(format!("a gap of {longest:?} between keep-alives during the outage"));
    }
    held.abort();
    drop(agent);
}
