//! Proof that `docs/serial-protocol.md` suffices: an implementation written from it alone,
//! in Python with the standard library only (`tests/python/`), reproduces the document's
//! worked examples and talks to the agent over a pseudo-terminal.

use crate::harness::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test]
async fn the_python_implementation_reproduces_the_documents_examples() {
    let out = tokio::process::Command::new("python3")
        .args(["-m", "unittest", "-v", "tests/python/test_vectors.py"])
        .current_dir(repo())
        .output()
        .await
        .expect("python3 runs (it is on every machine this project supports)");
    assert!(
        out.status.success(),
        "the Python implementation disagrees with the document:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_device_written_from_the_document_talks_to_the_agent_over_a_pty() {
    let _rabbitmq = RABBITMQ.read().await;
    const FRAMES: usize = 40;
    let mut device = tokio::process::Command::new("python3")
        .args(["tests/python/device.py", "--frames", &FRAMES.to_string()])
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut stdout = BufReader::new(device.stdout.take().expect("stdout")).lines();
    let path = bounded("the device's pty path", Duration::from_secs(10), stdout.next_line())
        .await
        .expect("read stdout")
        .expect("a path line");

    let mut bed = TestBed::new("python-device");
    bed.config["mqtt"]["enabled"] = json!(false);
    bed.config["serial"] = json!([{ "path": path, "framing": "binary", "device_id": "py-port" }]);
    let agent = bed.start_agent();
    agent.wait_connected(false).await;
    bind_readings_queue(&bed.names).await;
    let collector = Collector::start(&bed.names).await;
    let port_open = format!("edgecase_serial_port_open{{port=\"{path}\"}}");
    agent
        .wait_metrics("the serial port to open", Duration::from_secs(10), |m| {
            m.value(&port_open) == 1.0
        })
        .await;

    let mut stdin = device.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").await.expect("go");
    stdin.flush().await.expect("flush");
    let report = bounded(
        "the Python device's report",
        Duration::from_secs(90),
        stdout.next_line(),
    )
    .await
    .expect("read stdout")
    .unwrap_or_else(|| agent.fail("the Python device printed no report"));
    let status = bounded("the Python device to exit", Duration::from_secs(10), device.wait())
        .await
        .expect("wait");
    let report: Value = serde_json::from_str(&report).unwrap_or_else(|e| agent.fail(format!("{e}: {report}")));
    assert!(
        status.success() && report["problems"] == json!([]),
        "the Python device saw answers the document does not allow: {report:#}"
    );

    // Every acknowledged frame's three readings arrived once, with the values sent.
    let acked: Vec<u64> = report["acked"]
        .as_array()
        .expect("acked")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(acked.len(), FRAMES + 1);
    assert!(
        acked.contains(&0) && acked.contains(&4_294_967_295),
        "the sequence wrapped: {acked:?}"
    );
    let want = acked.len() * 3 + 1;
    let arrived = wait_for(Duration::from_secs(30), || async {
        (collector.readings().len() >= want).then_some(())
    })
    .await;
    if arrived.is_none() {
        agent.fail(format!("{} of {want} readings arrived", collector.readings().len()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let readings = collector.readings();
    assert_eq!(readings.len(), want, "no duplicates");
    let by_key: HashMap<(String, String, u64), Value> = readings
        .iter()
        .map(|r| {
            (
                (
                    r.device().to_string(),
                    r.sensor().to_string(),
                    r.seq().unwrap_or(u64::MAX),
                ),
                r.body.clone(),
            )
        })
        .collect();
    for seq in &acked {
        let temp = &by_key[&("py-1".to_string(), "temp".to_string(), *seq)];
        assert_eq!(temp["value"].as_f64(), Some(20.0 + *seq as f64 / 4.0), "{temp}");
        assert_eq!(temp["unit"], "C");
        let door = &by_key[&("py-1".to_string(), "door".to_string(), *seq)];
        assert!(door.get("unit").is_none(), "{door}");
        assert!(by_key.contains_key(&("py-1".to_string(), "humidity".to_string(), *seq)));
    }
    let level = &by_key[&("py-port".to_string(), "level".to_string(), 77)];
    assert_eq!(level["value"], json!(12.5));
    let invalid = report["invalid_seq"].as_u64().expect("invalid_seq");
    assert!(
        !by_key.keys().any(|(d, _, s)| d == "py-1" && *s == invalid),
        "the NaN frame stored nothing"
    );

    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    for reason in ["frame_crc", "frame_invalid"] {
        assert_eq!(
            m.value(&format!(
                "edgecase_ingest_dead_letters_total{{source=\"serial\",reason=\"{reason}\"}}"
            )),
            1.0,
            "{}",
            m.summary()
        );
    }
    assert_eq!(
        m.value(&format!(
            "edgecase_serial_frames_total{{port=\"{path}\",result=\"duplicate\"}}"
        )),
        1.0,
        "{}",
        m.summary()
    );
    collector.close().await;
}
