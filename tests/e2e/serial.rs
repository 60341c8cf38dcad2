//! Serial ingest over pseudo-terminals: newline-delimited JSON readings arrive exactly once
//! with the device id from the config, and a port that disappears is reopened while the
//! other ports keep working.

use crate::harness::*;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

fn port_open(port: &Path) -> String {
    format!("edgecase_serial_port_open{{port=\"{}\"}}", port.display())
}

fn reopens(port: &Path) -> String {
    format!("edgecase_serial_reopens_total{{port=\"{}\"}}", port.display())
}

/// A serial-only agent: MQTT off.
fn serial_bed(test: &str, ports: serde_json::Value) -> TestBed {
    let mut bed = TestBed::new(test);
    bed.config["mqtt"]["enabled"] = json!(false);
    bed.config["serial"] = ports;
    bed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_readings_arrive_exactly_once() {
    let _rabbitmq = RABBITMQ.read().await;
    const TOTAL: u64 = 2000;
    let pty = Pty::open();
    let bed = serial_bed(
        "serial-once",
        json!([{ "path": pty.path, "baud_rate": 115200, "device_id": "boiler-1" }]),
    );
    let agent = bed.start_agent();
    agent.wait_connected(false).await;
    bind_readings_queue(&bed.names).await;
    let collector = Collector::start(&bed.names).await;
    agent
        .wait_metrics("the serial port to open", Duration::from_secs(10), |m| {
            m.value(&port_open(&pty.path)) == 1.0
        })
        .await;

    pty.write_lines(serial_lines(0..TOTAL))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    collector
        .wait_distinct(TOTAL, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    // Every confirmed message consumed and nothing pending: no late duplicate can follow.
    agent
        .wait_metrics("the buffer to drain", Duration::from_secs(30), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
                && m.value("edgecase_publish_confirmed_total") as usize == collector.all().len()
        })
        .await;

    let readings = collector.readings();
    let counts = arrivals(&readings);
    let missing: Vec<u64> = (0..TOTAL)
        .filter(|n| !counts.contains_key(&("boiler-1".to_string(), *n)))
        .collect();
    assert!(missing.is_empty(), "missing seqs: {missing:?}");
    assert_eq!(readings.len() as u64, TOTAL, "each line exactly once");
    for r in &readings {
        let n = r.seq().expect("seq");
        assert_eq!(r.device(), "boiler-1", "device id from the config: {r:?}");
        assert_eq!(r.sensor(), "temp", "{r:?}");
        assert_eq!(r.body["value"].as_f64(), Some(n as f64), "{r:?}");
        assert_eq!(r.routing_key, routing_key("boiler-1", "temp"), "{r:?}");
        assert_eq!(
            r.body["source"],
            json!(format!("serial:{}", pty.path.display())),
            "{r:?}"
        );
        assert_eq!(r.device_header.as_deref(), Some("boiler-1"), "{r:?}");
        assert_eq!(r.delivery_mode, Some(2), "{r:?}");
    }
    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    assert_eq!(
        m.value("edgecase_ingest_readings_total{source=\"serial\"}"),
        TOTAL as f64,
        "{}",
        m.summary()
    );
    collector.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_port_that_disappears_is_reopened() {
    let _rabbitmq = RABBITMQ.read().await;
    let pty_a = Pty::open();
    let pty_b = Pty::open();
    // Port A is configured by a stable link, as /dev/serial/by-id/... would be; the device
    // behind it goes away and comes back as a different pty.
    let link_dir = tempfile::tempdir().expect("tempdir");
    let link = link_dir.path().join("port-a");
    std::os::unix::fs::symlink(&pty_a.path, &link).expect("symlink");
    let bed = serial_bed(
        "serial-reopen",
        json!([
            { "path": link, "baud_rate": 115200, "device_id": "dev-a", "reopen_min": "100ms", "reopen_max": "500ms" },
            { "path": pty_b.path, "baud_rate": 115200, "device_id": "dev-b" },
        ]),
    );
    let agent = bed.start_agent();
    agent.wait_connected(false).await;
    bind_readings_queue(&bed.names).await;
    let collector = Collector::start(&bed.names).await;
    agent
        .wait_metrics("both serial ports to open", Duration::from_secs(10), |m| {
            m.value(&port_open(&link)) == 1.0 && m.value(&port_open(&pty_b.path)) == 1.0
        })
        .await;

    pty_a
        .write_lines(serial_lines(0..300))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    pty_b
        .write_lines(serial_lines(0..300))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    // Unplugging loses what the device sent but the host had not read; wait until read.
    collector
        .wait_distinct(600, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| agent.fail(e));

    // Unplug A: its pty closes and the link dangles, then goes.
    drop(pty_a);
    std::fs::remove_file(&link).expect("remove link");
    agent
        .wait_metrics("port A to be seen as lost", Duration::from_secs(10), |m| {
            m.value(&port_open(&link)) == 0.0
        })
        .await;

    // B keeps delivering while A is gone.
    pty_b
        .write_lines(serial_lines(300..600))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    collector
        .wait_distinct(900, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    assert_eq!(m.value(&port_open(&link)), 0.0, "port A is still gone\n{}", m.summary());
    assert_eq!(
        m.value(&port_open(&pty_b.path)),
        1.0,
        "port B is still open\n{}",
        m.summary()
    );

    // Plug A back in: a new pty behind the same link.
    let pty_a2 = Pty::open();
    std::os::unix::fs::symlink(&pty_a2.path, &link).expect("symlink");
    agent
        .wait_metrics("port A to be reopened", Duration::from_secs(15), |m| {
            m.value(&port_open(&link)) == 1.0
        })
        .await;
    pty_a2
        .write_lines(serial_lines(300..600))
        .await
        .unwrap_or_else(|e| agent.fail(e));
    collector
        .wait_distinct(1200, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| agent.fail(e));

    let counts = arrivals(&collector.readings());
    for device in ["dev-a", "dev-b"] {
        for n in 0..600 {
            match counts.get(&(device.to_string(), n)) {
                Some(1) => {}
                other => panic!("{device} seq {n} arrived {other:?} times, want exactly once"),
            }
        }
    }
    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    assert!(m.value(&reopens(&link)) >= 1.0, "reopen counted\n{}", m.summary());
    assert_eq!(
        m.value(&reopens(&pty_b.path)),
        0.0,
        "port B never lost\n{}",
        m.summary()
    );
    collector.close().await;
}
