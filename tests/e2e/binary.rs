//! The binary firmware protocol end to end over a pseudo-terminal: the test plays the
//! device with the reference codec, the agent under test answers on the same line.
//! Readings arrive on the readings exchange once each, every frame is acknowledged,
//! retransmissions are acknowledged again but not stored again, damaged frames are NACKed
//! and dead-lettered with their raw bytes.

use crate::harness::*;
use edgecase_protocol::{self as protocol, Ack, Data, Deframer, Message, Nack, RawFrame, Reading};
use serde_json::json;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

/// The device's end of the line: writes frames, and a thread decodes what the agent answers.
pub struct DeviceLink {
    out: File,
    answers: mpsc::Receiver<Message>,
}

impl DeviceLink {
    pub fn new(pty: &Pty) -> DeviceLink {
        let mut input = pty.master();
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut deframer = Deframer::default();
            let mut buf = [0u8; 1024];
            // Ends when the pty hangs up (read error) or the test is gone (send error).
            while let Ok(n @ 1..) = input.read(&mut buf) {
                for f in deframer.push(&buf[..n]) {
                    if let RawFrame::Frame(f) = f
                        && let Ok(m) = protocol::decode(&f)
                        && tx.send(m).is_err()
                    {
                        return;
                    }
                }
            }
        });
        DeviceLink {
            out: pty.master(),
            answers,
        }
    }

    pub fn send(&mut self, wire: &[u8]) {
        self.out.write_all(wire).expect("write to the pty");
    }

    pub fn answer(&self) -> Message {
        self.answers
            .recv_timeout(Duration::from_secs(10))
            .expect("the agent answers within 10 s")
    }
}

/// A data frame of `device` with two readings whose values are the sequence number.
pub fn frame(device: &str, seq: u32) -> Vec<u8> {
    protocol::encode(&Message::Data(Data {
        device_id: device.into(),
        seq,
        timestamp_ms: 1_764_000_000_000 + u64::from(seq) * 1000,
        readings: vec![
            Reading {
                sensor: "temp".into(),
                value: f64::from(seq),
                unit: Some("C".into()),
                age_ms: 0,
            },
            Reading {
                sensor: "humidity".into(),
                value: f64::from(seq) / 2.0,
                unit: Some("%".into()),
                age_ms: 500,
            },
        ],
    }))
    .expect("a valid frame")
}

fn ack(device: &str, seq: u32) -> Message {
    Message::Ack(Ack {
        device_id: device.into(),
        seq,
    })
}

/// A serial-only agent with one binary port.
fn binary_bed(test: &str, pty: &Pty) -> TestBed {
    let mut bed = TestBed::new(test);
    bed.config["mqtt"]["enabled"] = json!(false);
    bed.config["serial"] = json!([{ "path": pty.path, "framing": "binary", "device_id": "tank-5" }]);
    bed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_acked_after_commit_once_each_and_damage_is_nacked() {
    let _rabbitmq = RABBITMQ.read().await;
    const FRAMES: u32 = 150;
    let pty = Pty::open();
    let bed = binary_bed("binary-e2e", &pty);
    let agent = bed.start_agent();
    agent.wait_connected(false).await;
    bind_readings_queue(&bed.names).await;
    let collector = Collector::start(&bed.names).await;
    let port_open = format!("edgecase_serial_port_open{{port=\"{}\"}}", pty.path.display());
    agent
        .wait_metrics("the serial port to open", Duration::from_secs(10), |m| {
            m.value(&port_open) == 1.0
        })
        .await;

    let mut link = DeviceLink::new(&pty);
    let damaged = tokio::task::spawn_blocking(move || {
        // A lone delimiter first, as after a device reset.
        link.send(&[0]);
        // Stop-and-wait; every tenth frame is sent twice, as when an ACK was lost.
        for seq in 1..=FRAMES {
            let f = frame("boiler-7", seq);
            link.send(&f);
            assert_eq!(link.answer(), ack("boiler-7", seq));
            if seq % 10 == 0 {
                link.send(&f);
                assert_eq!(
                    link.answer(),
                    ack("boiler-7", seq),
                    "a retransmission is acknowledged again"
                );
            }
        }
        // A window of five frames sent back to back: answered in order.
        for seq in FRAMES + 1..=FRAMES + 5 {
            link.send(&frame("boiler-7", seq));
        }
        for seq in FRAMES + 1..=FRAMES + 5 {
            assert_eq!(link.answer(), ack("boiler-7", seq));
        }
        // Line noise in the CRC: NACK 1, naming nobody; the device retransmits the frame.
        let good = frame("boiler-7", FRAMES + 6);
        let mut damaged = good.clone();
        let crc_byte = damaged.len() - 2;
        damaged[crc_byte] ^= 0x10;
        link.send(&damaged);
        assert_eq!(
            link.answer(),
            Message::Nack(Nack {
                reason: 1,
                device_id: None,
                seq: None
            })
        );
        link.send(&good);
        assert_eq!(link.answer(), ack("boiler-7", FRAMES + 6));
        // Garbage from a booting device, ended by a delimiter: NACKed as damage.
        link.send(b"\x13boot v1.2\x00");
        match link.answer() {
            Message::Nack(n) => assert!(n.reason < 16, "{n:?}"),
            other => panic!("garbage answered with {other:?}"),
        }
        // A frame without a device id takes the port's.
        link.send(&frame("", 1));
        assert_eq!(link.answer(), ack("", 1));
        damaged[..damaged.len() - 1].to_vec()
    })
    .await
    .unwrap_or_else(|e| agent.fail(format!("device: {e}")));

    let want = 2 * (FRAMES as usize + 6) + 2;
    let arrived = wait_for(Duration::from_secs(30), || async {
        (collector.readings().len() >= want).then_some(())
    })
    .await;
    if arrived.is_none() {
        agent.fail(format!("{} of {want} readings arrived", collector.readings().len()));
    }
    agent
        .wait_metrics("the buffer to drain", Duration::from_secs(30), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
                && m.value("edgecase_publish_confirmed_total") as usize == collector.all().len()
        })
        .await;
    let readings = collector.readings();
    let mut seen: HashMap<(String, String, u64), usize> = HashMap::new();
    for r in &readings {
        *seen
            .entry((r.device().to_string(), r.sensor().to_string(), r.seq().expect("seq")))
            .or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "stored more than once: {repeated:?}");
    assert_eq!(readings.len(), want, "every reading exactly once");
    for seq in 1..=u64::from(FRAMES) + 6 {
        for sensor in ["temp", "humidity"] {
            assert_eq!(
                seen.get(&("boiler-7".into(), sensor.into(), seq)),
                Some(&1),
                "{sensor} {seq}"
            );
        }
    }
    assert_eq!(seen.get(&("tank-5".into(), "temp".into(), 1)), Some(&1));
    let r = readings
        .iter()
        .find(|r| r.device() == "boiler-7" && r.sensor() == "humidity" && r.seq() == Some(3))
        .expect("boiler-7 humidity 3");
    assert_eq!(r.body["value"], json!(1.5));
    assert_eq!(r.body["unit"], json!("%"));
    assert_eq!(
        r.body["ts"],
        json!("2025-11-24T16:00:02.500Z"),
        "timestamp_ms + 3 s - age 500 ms"
    );
    assert_eq!(r.body["source"], json!(format!("serial:{}", pty.path.display())));
    assert_eq!(r.routing_key, routing_key("boiler-7", "humidity"));

    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    let frames = |result: &str| {
        m.value(&format!(
            "edgecase_serial_frames_total{{port=\"{}\",result=\"{result}\"}}",
            pty.path.display()
        ))
    };
    assert_eq!(frames("acked"), f64::from(FRAMES + 7), "{}", m.summary());
    assert_eq!(frames("duplicate"), f64::from(FRAMES / 10), "{}", m.summary());
    assert_eq!(frames("nacked"), 2.0, "{}", m.summary());
    assert_eq!(
        m.value("edgecase_ingest_dead_letters_total{source=\"serial\",reason=\"frame_crc\"}"),
        1.0,
        "{}",
        m.summary()
    );

    // The damaged frame is kept as it came off the wire.
    let data_dir = bed.data_dir();
    let out = run_cli(
        &[
            "buffer",
            "dead-letters",
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--json",
        ],
        Duration::from_secs(20),
    )
    .await
    .unwrap_or_else(|e| agent.fail(e));
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let hex: String = damaged.iter().map(|b| format!("{b:02x}")).collect();
    let d = listed
        .iter()
        .find(|d| d["raw_hex"] == hex.as_str())
        .unwrap_or_else(|| agent.fail(format!("the damaged frame is not among the dead letters: {listed:#?}")));
    assert_eq!(d["source"], "serial");
    assert_eq!(d["origin"], pty.path.to_str().expect("utf-8"));
    assert!(d["reason"].as_str().unwrap_or_default().contains("(crc)"), "{d}");
    assert_eq!(listed.len(), 2, "the damaged frame and the garbage: {listed:#?}");
    collector.close().await;
}
