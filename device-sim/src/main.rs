//! `edgecase-sim`: simulated sensor devices for trying, testing and loading Edgecase.
//!
//! A fleet of devices whose sensors follow patterns (deterministic for a `--seed`), with
//! defects and bad input injected on purpose, sent over MQTT (JSON payloads on a topic
//! template) or a serial line (a pseudo-terminal it creates, or a device path) as JSON lines
//! or in the binary firmware protocol, where each simulated device behaves like firmware:
//! it waits for ACKs, retransmits, and resumes its sequence numbers. A live rate line while
//! it runs, a summary at the end, and optionally a manifest of everything sent.

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand};
use edgecase_sim::inject::{BadInputSpec, Injector};
use edgecase_sim::model::{DefectSpec, DeviceSpec, Fleet};
use edgecase_sim::mqtt::MqttTarget;
use edgecase_sim::report::Report;
use edgecase_sim::serial::{Framing, Link, Pty, SerialOptions};
use edgecase_sim::{Plan, Scenario, Stop};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod salesforce;

#[derive(Debug, Parser)]
#[command(name = "edgecase-sim", version, max_term_width = 100)]
#[command(
    about = "Simulated peers for Edgecase: a fleet of sensor devices with patterns, defects and bad input, over MQTT or a serial line; and a local Salesforce org"
)]
#[command(after_help = "Examples:\n  \
    edgecase-sim mqtt --devices 5 --rate 50 --count 1000\n  \
    edgecase-sim serial --pty --device-id boiler-1 --rate 2\n  \
    edgecase-sim serial --pty --framing binary --devices 3 --state /var/tmp/sim-seq.json\n  \
    edgecase-sim serial --pty --framing binary --bad-input crc,p=0.02 --bad-input duplicate,p=0.01\n  \
    edgecase-sim mqtt --devices 2 --defect device=dev1,kind=stuck,at=20s --defect kind=spike,p=0.01\n  \
    edgecase-sim mqtt --scenario examples/sim/site.toml --duration 5m --manifest sent.jsonl\n  \
    edgecase-sim serial --pty --framing binary --rate 0 --count 100000 --manifest sent.jsonl   (load)\n  \
    edgecase-sim salesforce --port 8080 --latency 50ms")]
struct Cli {
    #[command(subcommand)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Output {
    /// Run a local Salesforce org (OAuth, Case REST API, SOQL) for the Salesforce connector.
    Salesforce(salesforce::SalesforceArgs),
    /// Publish JSON readings to an MQTT broker.
    Mqtt {
        /// Broker URL (mqtt://host:port).
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        url: String,
        /// Topic template; {device} and {sensor} are replaced.
        #[arg(long, default_value = "sensors/{device}/{sensor}")]
        topic: String,
        /// Topics are {prefix}/{device}/{sensor} (shorthand for --topic).
        #[arg(long, conflicts_with = "topic")]
        prefix: Option<String>,
        /// QoS level: 0 or 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Payloads without device_id and sensor (the topic names them).
        #[arg(long)]
        bare: bool,
        #[command(flatten)]
        fleet: FleetArgs,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Write readings to a serial port or a new pseudo-terminal, as JSON lines or binary frames.
    Serial {
        /// Existing serial device (e.g. /dev/ttyUSB0).
        #[arg(long, required_unless_present = "pty", conflicts_with = "pty")]
        path: Option<PathBuf>,
        /// Create a pseudo-terminal and print the path the agent should open (first line of stdout).
        #[arg(long)]
        pty: bool,
        /// Baud rate for a real serial device.
        #[arg(long, default_value_t = 115_200)]
        baud_rate: u32,
        /// json-lines, or binary (docs/serial-protocol.md: COBS frames, CRC, ACK/NACK).
        #[arg(long, default_value = "json-lines")]
        framing: Framing,
        /// Binary: frames a device may have unacknowledged (1-8).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
        window: u8,
        /// Binary: first ACK timeout; doubles per retransmission up to 8x.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        ack_timeout: Duration,
        /// Binary: a JSON file keeping each device's next sequence number, so a restarted
        /// simulator resumes them (reserved in blocks of 256, as firmware would).
        #[arg(long)]
        state: Option<PathBuf>,
        /// First sequence number of devices the state file does not know (default: random).
        #[arg(long)]
        seq_start: Option<u32>,
        /// Leave device_id out of lines and frames (the agent's [[serial]] device_id fills it).
        #[arg(long)]
        omit_device_id: bool,
        /// Binary: at the end, how long to wait for outstanding ACKs.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain: Duration,
        #[command(flatten)]
        fleet: FleetArgs,
        #[command(flatten)]
        load: LoadArgs,
    },
}

#[derive(Debug, Args)]
struct FleetArgs {
    /// A scenario file (TOML): the whole fleet with its defects and bad input.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Number of devices (named dev1, dev2, ...).
    #[arg(long, default_value_t = 3)]
    devices: u32,
    /// One device with this id (instead of --devices).
    #[arg(long)]
    device_id: Option<String>,
    /// Sensor names, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "temp,humidity")]
    sensors: Vec<String>,
    /// Pattern of every sensor: constant[:value:noise], sine[:mean:amplitude:period:noise],
    /// random-walk[:start:step], steps[:a,b,c], drift[:start:per_hour:noise]. Default: by
    /// sensor name.
    #[arg(long)]
    pattern: Option<String>,
    /// A defect, repeatable: kind=spike|stuck|dropout|out-of-range|drift with at=20s and
    /// for=30s, or probability=0.01; value=..., device=..., sensor=...
    #[arg(long = "defect")]
    defects: Vec<String>,
    /// Seed for values, defects and bad input; the same seed gives the same readings.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Readings per second, all devices together (0 = as fast as the output takes them).
    /// Default 10, or the scenario's own intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many readings (0 = no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Stop after this long (e.g. 90s, 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Bad input, repeatable: kind=malformed-json|wrong-type|crc|truncated|garbage|duplicate|
    /// out-of-order with probability=0.01 or at=10s, and device=...
    #[arg(long = "bad-input")]
    bad_input: Vec<String>,
    /// Write what was sent (one JSON object per reading and bad input, then the summary).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// No live rate line (the summary is still printed).
    #[arg(long, short)]
    quiet: bool,
}

struct Setup {
    fleet: Fleet,
    injector: Injector,
    plan: Plan,
    report: Report,
}

fn setup(fleet: &FleetArgs, load: &LoadArgs) -> Result<Setup> {
    let scenario = match &fleet.scenario {
        Some(p) => Scenario::load(p).map_err(|e| anyhow!("--scenario {e}"))?,
        None => Scenario::default(),
    };
    let seed = fleet.seed.or(scenario.seed).unwrap_or(1);
    let devices: Vec<DeviceSpec> = if fleet.scenario.is_some() {
        scenario.device_specs()
    } else {
        let defects = fleet
            .defects
            .iter()
            .map(|d| parse_defect(d))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| anyhow!("--defect: {e}"))?;
        edgecase_sim::scenario::cli_fleet(
            fleet.devices,
            fleet.device_id.as_deref(),
            &fleet.sensors,
            fleet.pattern.as_deref(),
            Duration::from_secs(1),
            &defects,
        )
        .map_err(|e| anyhow!(e))?
    };
    let mut bad = scenario.bad_input.clone();
    for b in &load.bad_input {
        bad.push(BadInputSpec::parse(b).map_err(|e| anyhow!("--bad-input {b}: {e}"))?);
    }
    let rate = match (load.rate, fleet.scenario.is_some()) {
        (Some(r), _) => Some(r),
        (None, true) => None,
        (None, false) => Some(10.0),
    };
    let plan = Plan {
        rate,
        count: (load.count > 0).then_some(load.count),
        duration: load.duration,
    };
    let report = Report::new(load.manifest.as_deref())
        .with_context(|| format!("cannot write the manifest {:?}", load.manifest))?;
    Ok(Setup {
        fleet: Fleet::new(&devices, seed),
        injector: Injector::new(bad, seed),
        plan,
        report,
    })
}

/// `device=dev1,kind=stuck,at=20s` → (Some("dev1"), the defect).
fn parse_defect(s: &str) -> Result<(Option<String>, DefectSpec), String> {
    let mut device = None;
    let mut pairs = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected key=value"))?;
        if k == "device" {
            device = Some(v.to_string());
        } else {
            pairs.push((k.to_string(), v.to_string()));
        }
    }
    Ok((device, DefectSpec::parse_kv(&pairs)?))
}

fn stop_on_ctrl_c(rt: &tokio::runtime::Runtime) -> Stop {
    let stop: Stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            s.store(true, Ordering::Relaxed);
            // The binary framing then waits for outstanding ACKs; a second Ctrl-C quits.
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("edgecase-sim: stopped without waiting for the outstanding acknowledgements");
                std::process::exit(130);
            }
        }
    });
    stop
}

fn run(cli: Cli) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stop = stop_on_ctrl_c(&rt);
    let (s, quiet) = match &cli.output {
        Output::Mqtt { fleet, load, .. } | Output::Serial { fleet, load, .. } => (setup(fleet, load)?, load.quiet),
        Output::Salesforce(args) => return salesforce::run(args),
    };
    let live_stop = Arc::new(AtomicBool::new(false));
    let live = (!quiet).then(|| s.report.live(live_stop.clone()));
    let result = match cli.output {
        Output::Mqtt {
            url,
            topic,
            prefix,
            qos,
            bare,
            ..
        } => {
            let topic = prefix.map(|p| format!("{p}/{{device}}/{{sensor}}")).unwrap_or(topic);
            let mut target = MqttTarget::from_url(&url, &topic, qos).map_err(|e| anyhow!(e))?;
            target.bare = bare;
            eprintln!(
                "edgecase-sim: publishing to {url} on {topic} ({} devices)",
                s.fleet.len()
            );
            rt.block_on(edgecase_sim::mqtt::run(
                &target, s.fleet, &s.plan, s.injector, &s.report, &stop,
            ))
            .map_err(|e| anyhow!(e))
        }
        Output::Salesforce(args) => salesforce::run(&args),
        Output::Serial {
            path,
            pty,
            baud_rate,
            framing,
            window,
            ack_timeout,
            state,
            seq_start,
            omit_device_id,
            drain,
            ..
        } => {
            let opts = SerialOptions {
                framing,
                window: usize::from(window),
                ack_timeout,
                ack_timeout_max: ack_timeout * 8,
                state,
                seq_start,
                omit_device_id,
                drain,
            };
            let (link, _pty) = if pty {
                let p = Pty::create().context("cannot create a pseudo-terminal")?;
                println!("{}", p.path.display());
                std::io::stdout().flush()?;
                eprintln!(
                    "edgecase-sim: {} devices on pseudo-terminal {} ({}; put it in a [[serial]] path{})",
                    s.fleet.len(),
                    p.path.display(),
                    if framing == Framing::Binary {
                        "binary frames"
                    } else {
                        "JSON lines"
                    },
                    if framing == Framing::Binary {
                        " with framing = \"binary\""
                    } else {
                        ""
                    },
                );
                (Link::pty(&p)?, Some(p))
            } else {
                let p = path.unwrap_or_default();
                (Link::device(&p, baud_rate)?, None)
            };
            let Setup {
                fleet,
                injector,
                plan,
                report,
            } = s;
            let r = report.clone();
            let st = stop.clone();
            let res = rt
                .block_on(async {
                    tokio::task::spawn_blocking(move || {
                        edgecase_sim::serial::run(link, fleet, &plan, injector, &opts, &r, &st)
                    })
                    .await
                })
                .context("the serial output thread failed")?
                .context("serial output");
            if pty && framing == Framing::JsonLines {
                // Give the reader time to drain the pty before it closes.
                std::thread::sleep(Duration::from_secs(1));
            }
            let summary = report.finish();
            live_stop.store(true, Ordering::Relaxed);
            if let Some(l) = live {
                let _ = l.join();
            }
            eprint!("{summary}");
            return res;
        }
    };
    let summary = s.report.finish();
    live_stop.store(true, Ordering::Relaxed);
    if let Some(l) = live {
        let _ = l.join();
    }
    eprint!("{summary}");
    result
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgecase-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
