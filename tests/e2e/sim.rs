//! The simulator against the agent: simulated firmware on the binary framing (through bad
//! input and an agent restart, everything in its manifest arrives once), sequence numbers
//! resumed by a restarted simulator, and each defect kind the simulator injects raising the
//! case of the matching rule.

use crate::cases::bind_cases_queue;
use crate::harness::*;
use edgecase_sim::inject::{BadInputKind, BadInputSpec, Injector};
use edgecase_sim::model::{DefectKind, DefectSpec, DeviceSpec, Fleet, Pattern, SensorSpec};
use edgecase_sim::report::{Report, Summary};
use edgecase_sim::serial::{Framing, Link, Pty, SerialOptions};
use edgecase_sim::{Plan, Stop};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn sensor(name: &str, pattern: Pattern, defects: Vec<DefectSpec>) -> SensorSpec {
    SensorSpec {
        name: name.into(),
        unit: None,
        pattern,
        defects,
    }
}

fn walk(start: f64) -> Pattern {
    Pattern::RandomWalk {
        start,
        step: 0.5,
        min: start - 20.0,
        max: start + 20.0,
    }
}

fn fleet(n: usize, interval: Duration) -> Vec<DeviceSpec> {
    (1..=n)
        .map(|i| DeviceSpec {
            id: format!("fw-{i}"),
            interval,
            sensors: vec![
                sensor("temp", walk(20.0), vec![]),
                sensor("humidity", walk(50.0), vec![]),
                sensor("pressure", walk(2.0), vec![]),
            ],
            defects: vec![],
        })
        .collect()
}

fn binary_opts() -> SerialOptions {
    SerialOptions {
        framing: Framing::Binary,
        window: 4,
        ack_timeout: Duration::from_millis(300),
        ack_timeout_max: Duration::from_millis(2400),
        seq_start: Some(1),
        drain: Duration::from_secs(60),
        ..SerialOptions::default()
    }
}

type SimTask = tokio::task::JoinHandle<(Summary, Result<(), String>)>;

/// Runs the simulator on a blocking thread until its plan is done and every frame is
/// acknowledged (or the drain time runs out).
fn start_sim(
    pty: &Pty,
    devices: Vec<DeviceSpec>,
    plan: Plan,
    bad: Vec<BadInputSpec>,
    opts: SerialOptions,
    manifest: Option<&Path>,
) -> (SimTask, Stop) {
    let link = Link::pty(pty).expect("pty link");
    let report = Report::new(manifest).expect("manifest");
    let stop: Stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let task = tokio::task::spawn_blocking(move || {
        let r = edgecase_sim::serial::run(
            link,
            Fleet::new(&devices, 42),
            &plan,
            Injector::new(bad, 42),
            &opts,
            &report,
            &s,
        )
        .map_err(|e| e.to_string());
        (report.finish(), r)
    });
    (task, stop)
}

/// (device, sensor, seq) → value, for every reading line of a manifest.
fn manifest_readings(path: &Path) -> HashMap<(String, String, u64), f64> {
    std::fs::read_to_string(path)
        .expect("manifest")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("sensor").is_some())
        .map(|v| {
            (
                (
                    v["device"].as_str().unwrap_or_default().to_string(),
                    v["sensor"].as_str().unwrap_or_default().to_string(),
                    v["seq"].as_u64().unwrap_or_default(),
                ),
                v["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

fn binary_bed(test: &str, path: &Path) -> TestBed {
    let mut bed = TestBed::new(test);
    bed.config["mqtt"]["enabled"] = json!(false);
    bed.config["serial"] = json!([{ "path": path, "framing": "binary", "reopen_min": "100ms", "reopen_max": "500ms" }]);
    bed
}

async fn wait_port(agent: &Agent, path: &Path) {
    let port_open = format!("edgecase_serial_port_open{{port=\"{}\"}}", path.display());
    agent
        .wait_metrics("the serial port to open", Duration::from_secs(10), |m| {
            m.value(&port_open) == 1.0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_firmware_delivers_its_manifest_once_through_bad_input_and_an_agent_restart() {
    let _rabbitmq = RABBITMQ.read().await;
    const TOTAL: u64 = 3000;
    let pty = Pty::create().expect("pty");
    let bed = binary_bed("sim-firmware", &pty.path);
    let mut agent = bed.start_agent();
    agent.wait_connected(false).await;
    bind_readings_queue(&bed.names).await;
    let collector = Collector::start(&bed.names).await;
    wait_port(&agent, &pty.path).await;

    let manifest = bed.dir.path().join("manifest.jsonl");
    let bad = [
        (BadInputKind::Crc, 0.03),
        (BadInputKind::Truncated, 0.02),
        (BadInputKind::Garbage, 0.02),
        (BadInputKind::Duplicate, 0.03),
        (BadInputKind::OutOfOrder, 0.03),
        (BadInputKind::MalformedJson, 0.01),
        (BadInputKind::WrongType, 0.01),
    ]
    .map(|(kind, probability)| BadInputSpec {
        kind,
        probability,
        at: None,
        device: None,
    })
    .to_vec();
    let plan = Plan {
        rate: Some(600.0),
        count: Some(TOTAL),
        duration: None,
    };
    let (sim, _stop) = start_sim(
        &pty,
        fleet(4, Duration::from_secs(1)),
        plan,
        bad,
        binary_opts(),
        Some(&manifest),
    );

    // The agent goes away for a second in the middle: the devices keep their frames and
    // retransmit until it is back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.terminate(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.restart();
    agent.wait_connected(false).await;

    let (summary, result) = bounded("the simulator", Duration::from_secs(120), sim)
        .await
        .expect("simulator thread");
    result.unwrap_or_else(|e| agent.fail(format!("simulator: {e}")));
    assert_eq!(summary.readings, TOTAL, "{summary}");
    assert_eq!(
        summary.acked_frames, summary.messages,
        "every frame acknowledged\n{summary}"
    );
    assert_eq!(summary.acked_readings, TOTAL, "{summary}");
    assert_eq!(summary.dropped_by_nack, 0, "{summary}");
    assert!(summary.nacks > 0 && summary.retransmissions > 0, "{summary}");
    for kind in ["crc", "truncated", "garbage", "duplicate", "out-of-order"] {
        assert!(
            summary.injected.get(kind).copied().unwrap_or(0) > 0,
            "{kind} injected\n{summary}"
        );
    }

    let sent = manifest_readings(&manifest);
    assert_eq!(sent.len() as u64, TOTAL);
    let arrived = wait_for(Duration::from_secs(60), || async {
        (collector.readings().len() as u64 >= TOTAL).then_some(())
    })
    .await;
    if arrived.is_none() {
        agent.fail(format!("{} of {TOTAL} readings arrived", collector.readings().len()));
    }
    agent
        .wait_metrics("the buffer to drain", Duration::from_secs(30), |m| {
            m.value("edgecase_buffer_pending_readings") == 0.0
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let readings = collector.readings();
    // (device, sensor, seq) → (value, message ids, arrivals)
    type Arrivals = HashMap<(String, String, u64), (f64, HashSet<String>, usize)>;
    let mut got: Arrivals = HashMap::new();
    for r in &readings {
        let e = got
            .entry((r.device().to_string(), r.sensor().to_string(), r.seq().expect("seq")))
            .or_insert((r.body["value"].as_f64().unwrap_or(f64::NAN), HashSet::new(), 0));
        e.1.insert(r.message_id.clone().unwrap_or_default());
        e.2 += 1;
    }
    let missing: Vec<_> = sent.keys().filter(|k| !got.contains_key(*k)).take(10).collect();
    assert!(missing.is_empty(), "sent, never arrived: {missing:?}");
    // Retransmissions are stored once. The one exception the protocol document states: a
    // frame retransmitted across the agent's restart after its readings were published
    // arrives again, with the same message id (consumers drop it).
    let ids: Vec<_> = got.iter().filter(|(_, (_, ids, _))| ids.len() != 1).take(10).collect();
    assert!(ids.is_empty(), "one reading, several message ids: {ids:?}");
    let repeats: usize = got.values().map(|(_, _, n)| n - 1).sum();
    assert!(
        repeats <= 4 * 8 * 3,
        "{repeats} repeats: more than the frames in flight at the restart could cause"
    );
    let extra: Vec<_> = got.keys().filter(|k| !sent.contains_key(*k)).take(10).collect();
    assert!(extra.is_empty(), "arrived, never sent: {extra:?}");
    for (k, v) in &sent {
        assert_eq!(got[k].0, *v, "{k:?}");
    }
    collector.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_simulator_resumes_its_sequence_numbers() {
    let _rabbitmq = RABBITMQ.read().await;
    let pty = Pty::create().expect("pty");
    let bed = binary_bed("sim-resume", &pty.path);
    let agent = bed.start_agent();
    agent.wait_connected(false).await;
    bind_readings_queue(&bed.names).await;
    let collector = Collector::start(&bed.names).await;
    wait_port(&agent, &pty.path).await;

    let state: PathBuf = bed.dir.path().join("seq.json");
    let mut seqs = Vec::new();
    for run in 0..2 {
        let opts = SerialOptions {
            state: Some(state.clone()),
            ..binary_opts()
        };
        let plan = Plan {
            rate: Some(0.0),
            count: Some(60),
            duration: None,
        };
        let manifest = bed.dir.path().join(format!("run-{run}.jsonl"));
        let (sim, _) = start_sim(
            &pty,
            fleet(1, Duration::from_secs(1)),
            plan,
            vec![],
            opts,
            Some(&manifest),
        );
        let (summary, result) = bounded("the simulator", Duration::from_secs(60), sim)
            .await
            .expect("simulator thread");
        result.unwrap_or_else(|e| agent.fail(e));
        assert_eq!(summary.acked_readings, 60, "{summary}");
        let mut s: Vec<u64> = manifest_readings(&manifest).keys().map(|k| k.2).collect();
        s.sort_unstable();
        s.dedup();
        seqs.push(s);
    }
    assert!(
        seqs[1][0] > *seqs[0].last().expect("seqs"),
        "the second run numbers its frames after the first: {seqs:?}"
    );
    let arrived = wait_for(Duration::from_secs(30), || async {
        (collector.readings().len() >= 120).then_some(())
    })
    .await;
    if arrived.is_none() {
        agent.fail(format!(
            "{} of 120 readings arrived: a repeated sequence number was taken for a retransmission",
            collector.readings().len()
        ));
    }
    let m = agent.metrics().await.unwrap_or_else(|e| agent.fail(e));
    assert_eq!(
        m.value("edgecase_ingest_readings_total{source=\"serial\"}"),
        120.0,
        "both runs stored in full\n{}",
        m.summary()
    );
    collector.close().await;
}

/// One device per defect kind, each watched by the rule that kind should trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_defect_kind_injected_by_the_simulator_raises_its_rules_case() {
    let _rabbitmq = RABBITMQ.read().await;
    let pty = Pty::create().expect("pty");
    let mut bed = binary_bed("sim-defects", &pty.path);
    let case = |s: &str| json!({ "Subject": s });
    bed.config["rules"] = json!([
        { "name": "jump", "devices": "spiky", "kind": "rate", "max_change_per_second": 100.0,
          "division": "d", "case": case("{device_id} jumped to {value}") },
        { "name": "frozen", "devices": "frozen", "kind": "stuck", "stuck_readings": 10,
          "division": "d", "case": case("{device_id} stuck at {value}") },
        { "name": "quiet", "devices": "quiet", "kind": "silent", "silent_for": "2s",
          "division": "d", "case": case("{device_id} silent") },
        { "name": "range", "devices": "ranging", "kind": "outside", "low": 0.0, "high": 100.0,
          "division": "d", "case": case("{device_id} out of range at {value}") },
        { "name": "hot", "devices": "drifting", "kind": "above", "threshold": 60.0,
          "division": "d", "case": case("{device_id} above 60 at {value}") },
    ]);
    let agent = bed.start_agent();
    agent.wait_connected(false).await;
    let mut cases_names = bed.names.clone();
    cases_names.queue = format!("{}-cases", bed.names.base);
    bind_cases_queue(&cases_names).await;
    let collector = Collector::start(&cases_names).await;
    wait_port(&agent, &pty.path).await;

    let at = |kind: DefectKind, value: Option<f64>| DefectSpec {
        kind,
        at: Some(Duration::from_secs(1)),
        probability: 0.0,
        duration: None,
        value,
        sensor: None,
    };
    let calm = Pattern::Constant {
        value: 20.0,
        noise: 0.0,
    };
    let device = |id: &str, pattern: Pattern, defect: DefectSpec| DeviceSpec {
        id: id.into(),
        interval: Duration::from_millis(200),
        sensors: vec![sensor("temp", pattern, vec![])],
        defects: vec![defect],
    };
    let kinds = [
        ("spiky", DefectKind::Spike, "jump"),
        ("frozen", DefectKind::Stuck, "frozen"),
        ("quiet", DefectKind::Dropout, "quiet"),
        ("ranging", DefectKind::OutOfRange, "range"),
        ("drifting", DefectKind::Drift, "hot"),
    ];
    let devices = vec![
        device("spiky", calm.clone(), at(DefectKind::Spike, Some(50.0))),
        device("frozen", walk(20.0), at(DefectKind::Stuck, None)),
        device("quiet", calm.clone(), at(DefectKind::Dropout, None)),
        device("ranging", calm.clone(), at(DefectKind::OutOfRange, Some(150.0))),
        device("drifting", calm, at(DefectKind::Drift, Some(20.0))),
    ];
    let plan = Plan {
        rate: None,
        count: None,
        duration: Some(Duration::from_secs(6)),
    };
    let (sim, _) = start_sim(&pty, devices, plan, vec![], binary_opts(), None);
    let (summary, result) = bounded("the simulator", Duration::from_secs(60), sim)
        .await
        .expect("simulator thread");
    result.unwrap_or_else(|e| agent.fail(e));
    for (_, kind, _) in &kinds {
        if *kind != DefectKind::Dropout {
            assert!(
                summary.defects.contains_key(kind.name()),
                "{kind:?} injected\n{summary}"
            );
        }
    }
    assert!(summary.silent > 0, "{summary}");

    let raised = |c: &Collector| -> BTreeMap<String, String> {
        c.all()
            .iter()
            .filter(|r| r.body["action"] == "raise")
            .map(|r| {
                (
                    r.device().to_string(),
                    r.body["rule"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let all = wait_for(Duration::from_secs(20), || async {
        (raised(&collector).len() >= kinds.len()).then_some(())
    })
    .await;
    let seen = raised(&collector);
    if all.is_none() {
        agent.fail(format!("cases raised: {seen:?}"));
    }
    for (device, kind, rule) in kinds {
        assert_eq!(
            seen.get(device).map(String::as_str),
            Some(rule),
            "{kind:?} on {device} raises rule {rule}: {seen:?}"
        );
    }
    collector.close().await;
}
