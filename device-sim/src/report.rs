//! What a run sent: counters shared by the output and the live display, the final summary,
//! and the manifest, one JSON object per line, that a test or a benchmark compares with what
//! arrived on RabbitMQ:
//!
//! ```text
//! {"device":"dev1","sensor":"temp","seq":41,"value":21.37,"unit":"C","ts":"2026-...Z"}
//! {"device":"dev2","sensor":"temp","seq":7,"value":88.0,"ts":"...","defects":["out-of-range"]}
//! {"inject":"crc","device":"dev1","seq":42}
//! {"summary":{"readings":1000,"acked":1000,...}}
//! ```
//!
//! `seq` is the reading's `seq` as the agent publishes it: the per-device reading number of
//! the JSON outputs, the frame's sequence number of the binary framing.

use crate::inject::BadInputKind;
use crate::model::SimReading;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Counters {
    readings: AtomicU64,
    messages: AtomicU64,
    transmissions: AtomicU64,
    retransmissions: AtomicU64,
    acked_readings: AtomicU64,
    acked_frames: AtomicU64,
    nacks: AtomicU64,
    dropped_by_nack: AtomicU64,
    silent: AtomicU64,
}

struct Inner {
    c: Counters,
    injected: Mutex<BTreeMap<&'static str, u64>>,
    defects: Mutex<BTreeMap<&'static str, u64>>,
    manifest: Option<Mutex<BufWriter<File>>>,
    started: Instant,
}

/// Shared by everything that sends; cheap to clone.
#[derive(Clone)]
pub struct Report(Arc<Inner>);

#[derive(Serialize)]
struct ManifestReading<'a> {
    device: &'a str,
    sensor: &'a str,
    seq: u64,
    value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<&'a str>,
    ts: String,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    defects: &'a [&'static str],
}

/// The final counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub seconds: f64,
    /// Readings sent (first transmissions).
    pub readings: u64,
    /// Lines, MQTT messages or frames (first transmissions).
    pub messages: u64,
    /// Every write of a frame, retransmissions included (binary).
    pub transmissions: u64,
    pub retransmissions: u64,
    /// Readings the agent acknowledged (binary) or the broker did (MQTT QoS 1).
    pub acked_readings: u64,
    pub acked_frames: u64,
    pub nacks: u64,
    /// Frames given up after a NACK of 16 or more (kept by the agent as dead letters).
    pub dropped_by_nack: u64,
    /// Readings not sent because of a dropout defect.
    pub silent: u64,
    pub defects: BTreeMap<String, u64>,
    pub injected: BTreeMap<String, u64>,
}

impl Report {
    pub fn new(manifest: Option<&Path>) -> std::io::Result<Report> {
        let manifest = match manifest {
            Some(p) => Some(Mutex::new(BufWriter::new(File::create(p)?))),
            None => None,
        };
        Ok(Report(Arc::new(Inner {
            c: Counters::default(),
            injected: Mutex::default(),
            defects: Mutex::default(),
            manifest,
            started: Instant::now(),
        })))
    }

    fn line(&self, value: &impl Serialize) {
        if let Some(m) = &self.0.manifest
            && let Ok(mut w) = m.lock()
            && let Ok(text) = serde_json::to_string(value)
        {
            let _ = writeln!(w, "{text}");
        }
    }

    /// A reading went out for the first time.
    pub fn reading(&self, r: &SimReading, seq: u64, ts_ms: u64) {
        self.0.c.readings.fetch_add(1, Ordering::Relaxed);
        if !r.defects.is_empty()
            && let Ok(mut d) = self.0.defects.lock()
        {
            for k in &r.defects {
                *d.entry(k).or_default() += 1;
            }
        }
        self.line(&ManifestReading {
            device: &r.device,
            sensor: &r.sensor,
            seq,
            value: r.value,
            unit: r.unit.as_deref(),
            ts: crate::rfc3339_ms(ts_ms),
            defects: &r.defects,
        });
    }

    /// A line, message or frame went out for the first time.
    pub fn message(&self) {
        self.0.c.messages.fetch_add(1, Ordering::Relaxed);
    }

    pub fn silent(&self, n: u64) {
        self.0.c.silent.fetch_add(n, Ordering::Relaxed);
    }

    pub fn injected(&self, kind: BadInputKind, device: &str, seq: Option<u64>) {
        if let Ok(mut i) = self.0.injected.lock() {
            *i.entry(kind.name()).or_default() += 1;
        }
        self.line(&serde_json::json!({"inject": kind.name(), "device": device, "seq": seq}));
    }

    pub fn transmitted(&self, n: u64, retransmissions: u64) {
        self.0.c.transmissions.fetch_add(n, Ordering::Relaxed);
        self.0.c.retransmissions.fetch_add(retransmissions, Ordering::Relaxed);
    }

    pub fn acked(&self, frames: u64, readings: u64) {
        self.0.c.acked_frames.fetch_add(frames, Ordering::Relaxed);
        self.0.c.acked_readings.fetch_add(readings, Ordering::Relaxed);
    }

    pub fn nacked(&self, dropped: bool) {
        self.0.c.nacks.fetch_add(1, Ordering::Relaxed);
        if dropped {
            self.0.c.dropped_by_nack.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn readings_sent(&self) -> u64 {
        self.0.c.readings.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.0.started.elapsed()
    }

    pub fn summary(&self) -> Summary {
        let c = &self.0.c;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let map = |m: &Mutex<BTreeMap<&'static str, u64>>| {
            m.lock()
                .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default()
        };
        Summary {
            seconds: self.elapsed().as_secs_f64(),
            readings: get(&c.readings),
            messages: get(&c.messages),
            transmissions: get(&c.transmissions),
            retransmissions: get(&c.retransmissions),
            acked_readings: get(&c.acked_readings),
            acked_frames: get(&c.acked_frames),
            nacks: get(&c.nacks),
            dropped_by_nack: get(&c.dropped_by_nack),
            silent: get(&c.silent),
            defects: map(&self.0.defects),
            injected: map(&self.0.injected),
        }
    }

    /// Writes the summary as the manifest's last line and flushes it.
    pub fn finish(&self) -> Summary {
        let s = self.summary();
        self.line(&serde_json::json!({ "summary": s }));
        if let Some(m) = &self.0.manifest
            && let Ok(mut w) = m.lock()
        {
            let _ = w.flush();
        }
        s
    }

    /// Prints a live line to stderr every second until `stop` is set.
    pub fn live(&self, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let report = self.clone();
        std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.0.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                let s = report.summary();
                let now_rate = (s.readings - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), s.readings);
                eprintln!("{}", live_line(&s, now_rate));
            }
        })
    }
}

pub fn live_line(s: &Summary, now_rate: f64) -> String {
    let mut line = format!(
        "[{:>5.0}s] sent {} readings ({:.0}/s now, {:.0}/s average)",
        s.seconds,
        s.readings,
        now_rate,
        s.readings as f64 / s.seconds.max(1e-3)
    );
    if s.transmissions > 0 || s.acked_readings > 0 {
        line.push_str(&format!(
            " | acked {} | retransmitted {} | NACKs {}",
            s.acked_readings, s.retransmissions, s.nacks
        ));
    }
    let injected: u64 = s.injected.values().sum();
    if injected > 0 {
        line.push_str(&format!(" | bad input {injected}"));
    }
    line
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "edgecase-sim: summary")?;
        writeln!(f, "  duration          {:.1} s", self.seconds)?;
        writeln!(
            f,
            "  readings sent     {} ({:.0}/s)",
            self.readings,
            self.readings as f64 / self.seconds.max(1e-3)
        )?;
        writeln!(f, "  messages/frames   {}", self.messages)?;
        if self.transmissions > 0 {
            writeln!(
                f,
                "  transmissions     {} ({} retransmissions)",
                self.transmissions, self.retransmissions
            )?;
            writeln!(
                f,
                "  acknowledged      {} readings in {} frames",
                self.acked_readings, self.acked_frames
            )?;
            writeln!(
                f,
                "  NACKs             {} ({} frames given up, kept by the agent as dead letters)",
                self.nacks, self.dropped_by_nack
            )?;
        } else if self.acked_readings > 0 {
            writeln!(f, "  acknowledged      {} (by the broker)", self.acked_readings)?;
        }
        if self.silent > 0 {
            writeln!(f, "  silenced          {} readings (dropout)", self.silent)?;
        }
        for (k, v) in &self.defects {
            writeln!(f, "  defect {k:<11} {v} readings")?;
        }
        for (k, v) in &self.injected {
            writeln!(f, "  bad input {k:<8} {v}")?;
        }
        Ok(())
    }
}
