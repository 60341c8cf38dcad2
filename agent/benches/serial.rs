//! Serial ingest benchmark: `cargo bench -p edgecase --bench serial` (no services needed).
//!
//! Readings per second from simulated devices through a pseudo-terminal into the agent's
//! buffer (committed, fsynced), with the agent's own serial ingest task and
//! `edgecase-sim`'s devices in the same process, the publisher off:
//! - binary framing, one device, window 1 (stop-and-wait: one commit per frame, the
//!   latency-bound case of small firmware);
//! - binary framing, 16 devices on one line, window 8 each (frames from many devices share
//!   each commit);
//! - JSON lines, 16 devices, for comparison (no acknowledgement at all).
//!
//! Each data frame carries the four readings of one device tick. The binary figures count
//! a reading once the device holds the ACK for its frame.

use edgecase::buffer::Buffer;
use edgecase::config::{BufferConfig, Config, SerialFraming, SerialPortConfig};
use edgecase::ingest::serial::SerialIngest;
use edgecase::metrics::Metrics;
use edgecase_sim::inject::Injector;
use edgecase_sim::model::{DeviceSpec, Fleet, Pattern, SensorSpec};
use edgecase_sim::serial::{Framing, Link, Pty, SerialOptions};
use edgecase_sim::{Plan, Report};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Case {
    name: &'static str,
    framing: Framing,
    devices: usize,
    window: usize,
    readings: u64,
}

struct Figure {
    readings_per_sec: f64,
    frames_per_sec: f64,
    commits: u64,
    retransmissions: u64,
}

fn fleet(n: usize) -> Vec<DeviceSpec> {
    (1..=n)
        .map(|i| DeviceSpec {
            id: format!("bench-{i}"),
            interval: Duration::from_secs(1),
            sensors: ["temp", "humidity", "pressure", "level"]
                .iter()
                .map(|s| SensorSpec {
                    name: (*s).into(),
                    unit: Some("u".into()),
                    pattern: Pattern::Sine {
                        mean: 20.0,
                        amplitude: 5.0,
                        period: Duration::from_secs(60),
                        noise: 0.5,
                    },
                    defects: vec![],
                })
                .collect(),
            defects: vec![],
        })
        .collect()
}

async fn measure(case: &Case) -> Result<Figure, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let metrics = Arc::new(Metrics::new());
    let (buffer, writer) =
        Buffer::open(dir.path(), &BufferConfig::default(), metrics.clone()).map_err(|e| e.to_string())?;
    let pty = Pty::create().map_err(|e| e.to_string())?;
    let port = SerialPortConfig {
        path: pty.path.clone(),
        baud_rate: 115_200,
        device_id: None,
        framing: match case.framing {
            Framing::Binary => SerialFraming::Binary,
            Framing::JsonLines => SerialFraming::JsonLines,
        },
        max_line_bytes: 4096,
        reopen_min: Duration::from_millis(100),
        reopen_max: Duration::from_secs(1),
    };
    let cancel = CancellationToken::new();
    let ingest =
        tokio::spawn(SerialIngest::new(&Config::default(), port, buffer.clone(), metrics.clone()).run(cancel.clone()));
    // Let the agent open the port before the clock starts.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let link = Link::pty(&pty).map_err(|e| e.to_string())?;
    let report = Report::new(None).map_err(|e| e.to_string())?;
    let opts = SerialOptions {
        framing: case.framing,
        window: case.window,
        seq_start: Some(1),
        drain: Duration::from_secs(60),
        ..SerialOptions::default()
    };
    let plan = Plan {
        rate: Some(0.0),
        count: Some(case.readings),
        duration: None,
    };
    let devices = fleet(case.devices);
    let r = report.clone();
    let started = Instant::now();
    let sim = tokio::task::spawn_blocking(move || {
        let stop = Arc::new(AtomicBool::new(false));
        edgecase_sim::serial::run(
            link,
            Fleet::new(&devices, 1),
            &plan,
            Injector::new(vec![], 1),
            &opts,
            &r,
            &stop,
        )
    });
    sim.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    // JSON lines have no ACK: wait for the buffer to hold them all.
    let deadline = Instant::now() + Duration::from_secs(120);
    while (metrics.buffer_committed.get()) < case.readings {
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {} readings committed after 120 s",
                metrics.buffer_committed.get(),
                case.readings
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let s = report.finish();
    cancel.cancel();
    let _ = ingest.await;
    let commits = metrics.buffer_commits.get();
    drop(buffer);
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| e.to_string())?;
    Ok(Figure {
        readings_per_sec: case.readings as f64 / secs,
        frames_per_sec: s.messages as f64 / secs,
        commits,
        retransmissions: s.retransmissions,
    })
}

fn main() -> ExitCode {
    // `cargo test --all-targets` runs bench targets without --bench: a measurement is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("serial benchmark: skipped (run it with `cargo bench -p edgecase --bench serial`)");
        return ExitCode::SUCCESS;
    }
    let cases = [
        Case {
            name: "binary, 1 device, window 1",
            framing: Framing::Binary,
            devices: 1,
            window: 1,
            readings: 20_000,
        },
        Case {
            name: "binary, 16 devices, window 8",
            framing: Framing::Binary,
            devices: 16,
            window: 8,
            readings: 200_000,
        },
        Case {
            name: "JSON lines, 16 devices (no ACK)",
            framing: Framing::JsonLines,
            devices: 16,
            window: 1,
            readings: 200_000,
        },
    ];
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("benchmark: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("Serial readings through a pty into the buffer (4 readings per device tick, fsync per commit)\n");
    println!(
        "| {:<34} | {:>12} | {:>10} | {:>9} | {:>14} |",
        "case", "readings/s", "frames/s", "commits", "retransmitted"
    );
    println!("|{:-<36}|{:->14}|{:->12}|{:->11}|{:->16}|", "", "", "", "", "");
    let mut ok = true;
    for case in &cases {
        match rt.block_on(measure(case)) {
            Ok(f) => println!(
                "| {:<34} | {:>12.0} | {:>10.0} | {:>9} | {:>14} |",
                case.name, f.readings_per_sec, f.frames_per_sec, f.commits, f.retransmissions
            ),
            Err(e) => {
                ok = false;
                println!("| {:<34} | FAILED: {e}", case.name);
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
