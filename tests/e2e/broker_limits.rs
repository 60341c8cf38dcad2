//! A broker tuned as the README recommends (1,000 messages in flight per client) sends
//! faster than one commit at a time: ingest must keep up and never stall.

use crate::harness::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A private Mosquitto with the recommended limits, stopped on drop.
struct TunedMosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TunedMosquitto {
    fn start() -> TunedMosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\n\
                 max_queued_messages 100000\npersistence false\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (scripts/services.sh installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return TunedMosquitto { child, port, _dir: dir };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("private mosquitto did not listen on {port}");
    }
}

impl Drop for TunedMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_keeps_up_with_a_broker_that_keeps_many_messages_in_flight() {
    let _rabbitmq = RABBITMQ.read().await;
    const N: u64 = 10_000;
    let broker = TunedMosquitto::start();
    let mut bed = TestBed::new("tuned-broker");
    bed.config["mqtt"]["url"] = format!("mqtt://127.0.0.1:{}", broker.port).into();
    let agent = bed.start_agent();
    agent.wait_connected(true).await;
    // Subscribed once a probe goes through (CONNACK comes before SUBACK).
    let mut opts = MqttOptions::new(format!("{}-pub", bed.names.base), "127.0.0.1", broker.port);
    opts.set_inflight(1000).set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let driver = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < N + 1 {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let probe = bed.names.topic(PROBE_DEVICE, PROBE_DEVICE);
    client
        .publish(probe, QoS::AtLeastOnce, false, "1")
        .await
        .expect("probe");
    agent
        .wait_metrics("the probe", Duration::from_secs(15), |m| {
            m.value("edgecase_ingest_readings_total{source=\"mqtt\"}") >= 1.0
        })
        .await;
    for seq in 0..N {
        let payload = serde_json::json!({ "value": 1.0, "seq": seq }).to_string();
        client
            .publish(bed.names.topic("fast", "temp"), QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }
    // Everything acknowledged after its commit, well within the time one commit per
    // message would allow; a stalled ingest stops short.
    agent
        .wait_metrics("all readings ingested", Duration::from_secs(60), |m| {
            m.value("edgecase_ingest_readings_total{source=\"mqtt\"}") >= (N + 1) as f64
        })
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
    drop(agent);
}
