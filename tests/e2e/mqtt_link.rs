//! A lost MQTT connection loses nothing: messages the agent committed but had not yet
//! acknowledged come back from the broker's session after it reconnects, and the buffer
//! turns them into counted duplicates. The connection runs through a TCP relay that the
//! test cuts while readings stream in (Mosquitto itself is shared with the other tests).

use crate::harness::*;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Relays TCP connections to an upstream address until [`Relay::cut`] drops them all.
struct Relay {
    port: u16,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let links = links.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let link = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    links.lock().unwrap().push(link);
                }
            })
        };
        Relay { port, links, accept }
    }

    /// Drops every relayed connection at once (both sides see it close); returns how many
    /// were open.
    fn cut(&self) -> usize {
        let mut links = self.links.lock().unwrap();
        let open = links.iter().filter(|l| !l.is_finished()).count();
        for link in links.drain(..) {
            link.abort();
        }
        open
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_mqtt_connection_loses_nothing() {
    let _rabbitmq = RABBITMQ.read().await;
    const TOTAL: u64 = 6000;
    let relay = Relay::start(format!("{MQTT_HOST}:{MQTT_PORT}").parse().expect("address")).await;
    let mut bed = TestBed::new("mqtt-cut");
    bed.config["mqtt"]["url"] = json!(format!("mqtt://127.0.0.1:{}", relay.port));
    let mut agent = bed.start_agent();
    agent.wait_connected(true).await;
    let (collector, _probe) = subscribed_collector(&agent, &bed.names).await;

    let stream = Streaming::start(&bed.names, steady_four_devices(TOTAL, &collector)).await;
    for (n, at) in [1100u64, 2700, 4400].into_iter().enumerate() {
        stream
            .wait_published(at, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| agent.fail(e));
        let cut = relay.cut();
        assert_eq!(cut, 1, "the agent's MQTT connection should be the one relayed");
        agent
            .wait_metrics("the agent to reconnect to MQTT", Duration::from_secs(20), |m| {
                m.value("edgecase_mqtt_reconnects_total") >= (n + 1) as f64 && m.value("edgecase_mqtt_connected") == 1.0
            })
            .await;
    }
    let published = stream
        .finish(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    assert_eq!(published, TOTAL);

    expect_all_arrived(&agent, &collector, TOTAL, Duration::from_secs(60)).await;
    assert!(agent.is_running(), "the agent exited");
    assert_eq!(agent.starts, 1);
    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    eprintln!(
        "3 cuts: all {TOTAL} readings arrived; {} duplicates on the exchange (allowed), {} redeliveries the buffer dropped",
        duplicates(&collector),
        m.value("edgecase_buffer_duplicates_total")
    );
    collector.close().await;
}
