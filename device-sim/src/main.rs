//! `edgecase-sim`: simulated sensor devices for trying and testing Edgecase.
//!
//! Each simulated device has a few sensors whose values follow a slow sine with noise,
//! deterministic for a given `--seed`, and numbers its readings with `seq` so a consumer
//! can check that every reading arrived. Readings go to an MQTT broker (JSON payloads on
//! `{prefix}/{device}/{sensor}`) or to a serial port as newline-delimited JSON, either an
//! existing device path or a pseudo-terminal the simulator creates (it prints the path to
//! put in the agent's `[[serial]]` table).

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::io::Write;
use std::time::{Duration, Instant};

mod salesforce;

#[derive(Debug, Parser)]
#[command(name = "edgecase-sim", version, max_term_width = 100)]
#[command(
    about = "Simulated peers for Edgecase: sensor devices over MQTT or a serial port, and a local Salesforce org"
)]
#[command(after_help = "Examples:\n  \
    edgecase-sim mqtt --devices 5 --rate 50 --count 1000\n  \
    edgecase-sim serial --pty --device-id boiler-1 --rate 2\n  \
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
        /// Topics are {prefix}/{device}/{sensor}.
        #[arg(long, default_value = "sensors")]
        prefix: String,
        /// QoS level: 0 or 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        #[command(flatten)]
        fleet: Fleet,
    },
    /// Write newline-delimited JSON readings to a serial port or a new pseudo-terminal.
    Serial {
        /// Existing serial device (e.g. /dev/ttyUSB0).
        #[arg(long, required_unless_present = "pty", conflicts_with = "pty")]
        path: Option<String>,
        /// Create a pseudo-terminal and print the path the agent should open.
        #[arg(long)]
        pty: bool,
        /// Baud rate for a real serial device.
        #[arg(long, default_value_t = 115_200)]
        baud_rate: u32,
        /// Leave device_id out of each line (the agent's port config supplies it).
        #[arg(long)]
        device_id: Option<String>,
        #[command(flatten)]
        fleet: Fleet,
    },
}

#[derive(Debug, Args)]
struct Fleet {
    /// Number of devices (named dev1, dev2, ...).
    #[arg(long, default_value_t = 3)]
    devices: u32,
    /// Sensor names, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "temp,humidity")]
    sensors: Vec<String>,
    /// Readings per second, all devices together (0 = as fast as possible).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Stop after this many readings (0 = run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Seed for the values; the same seed gives the same readings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Deterministic value generator: a sine per sensor plus splitmix64 noise.
struct Values {
    state: u64,
}

impl Values {
    fn next_noise(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    fn value(&mut self, sensor_index: usize, seq: u64) -> f64 {
        let base = 20.0 + 10.0 * sensor_index as f64;
        let v = base + 5.0 * ((seq as f64) / 60.0).sin() + self.next_noise();
        (v * 100.0).round() / 100.0
    }
}

/// The n-th reading of the fleet: which device and sensor, and its JSON object.
fn reading(
    fleet: &Fleet,
    values: &mut Values,
    n: u64,
    with_device: Option<&str>,
) -> (String, String, serde_json::Value) {
    let sensors = fleet.sensors.len().max(1) as u64;
    let device = format!("dev{}", n / sensors % u64::from(fleet.devices.max(1)) + 1);
    let s_idx = (n % sensors) as usize;
    let sensor = fleet.sensors.get(s_idx).cloned().unwrap_or_else(|| "value".into());
    let mut obj = serde_json::json!({ "value": values.value(s_idx, n), "seq": n });
    if let Some(map) = obj.as_object_mut() {
        map.insert("sensor".into(), sensor.clone().into());
        if let Some(d) = with_device {
            map.insert("device_id".into(), d.into());
        }
    }
    (device, sensor, obj)
}

/// Paces a loop at `rate` per second without drifting.
struct Pacer {
    start: Instant,
    rate: f64,
}

impl Pacer {
    async fn wait(&self, n: u64) {
        if self.rate > 0.0 {
            let due = self.start + Duration::from_secs_f64(n as f64 / self.rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

async fn run_mqtt(url: &str, prefix: &str, qos: u8, fleet: &Fleet) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed = url::Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "mqtt" && u.host_str().is_some());
    let Some(parsed) = parsed else {
        bail!("--url {url}: not an MQTT URL such as mqtt://127.0.0.1:1883")
    };
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let mut opts = MqttOptions::new(
        format!("edgecase-sim-{}", std::process::id()),
        host,
        parsed.port().unwrap_or(1883),
    );
    opts.set_keep_alive(Duration::from_secs(30)).set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let qos = if qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
    let want = fleet.count;
    // The event loop runs beside the producer; count PUBACKs so we exit only when the
    // broker has every reading.
    let acks = tokio::spawn(async move {
        let mut acked = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if want > 0 && acked >= want {
                        return Ok(acked);
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                    acked += 1;
                    if want > 0 && acked >= want {
                        return Ok(acked);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("MQTT connection failed: {e}")),
            }
        }
    });
    let mut values = Values { state: fleet.seed };
    let pacer = Pacer {
        start: Instant::now(),
        rate: fleet.rate,
    };
    let mut n = 0;
    eprintln!(
        "edgecase-sim: publishing to {url} on {prefix}/<device>/<sensor> ({} devices, {:?})",
        fleet.devices, fleet.sensors
    );
    while fleet.count == 0 || n < fleet.count {
        pacer.wait(n).await;
        let (device, sensor, obj) = reading(fleet, &mut values, n, None);
        client
            .publish(format!("{prefix}/{device}/{sensor}"), qos, false, obj.to_string())
            .await?;
        n += 1;
        if acks.is_finished() {
            break;
        }
    }
    let acked = tokio::time::timeout(Duration::from_secs(30), acks)
        .await
        .context("the broker did not acknowledge every reading within 30 s")???;
    eprintln!("edgecase-sim: {acked} readings acknowledged by the broker");
    Ok(())
}

fn run_serial(path: Option<&str>, pty: bool, baud_rate: u32, device_id: Option<&str>, fleet: &Fleet) -> Result<()> {
    let (mut port, _keep): (Box<dyn Write>, Option<nix::pty::OpenptyResult>) = if pty {
        let p = nix::pty::openpty(None, None).context("cannot create a pseudo-terminal")?;
        let name = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&p.slave)))
            .context("cannot find the pseudo-terminal's path")?;
        println!("{}", name.display());
        std::io::stdout().flush()?;
        eprintln!(
            "edgecase-sim: writing to pseudo-terminal {} (put it in a [[serial]] path)",
            name.display()
        );
        let master = std::fs::File::from(p.master.try_clone().context("cannot duplicate the pty")?);
        (Box::new(master), Some(p))
    } else {
        let Some(path) = path else {
            bail!("give --path or --pty")
        };
        let port = serialport::new(path, baud_rate)
            .timeout(Duration::from_secs(5))
            .open()
            .with_context(|| format!("cannot open serial port {path}"))?;
        (Box::new(port), None)
    };
    let mut values = Values { state: fleet.seed };
    let start = Instant::now();
    let mut n = 0;
    while fleet.count == 0 || n < fleet.count {
        if fleet.rate > 0.0 {
            let due = start + Duration::from_secs_f64(n as f64 / fleet.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let (_, _, obj) = reading(fleet, &mut values, n, device_id);
        writeln!(port, "{obj}").context("serial write failed")?;
        n += 1;
    }
    port.flush()?;
    eprintln!("edgecase-sim: wrote {n} readings");
    if pty {
        // Give the reader time to drain the pty before it closes.
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.output {
        Output::Mqtt {
            url,
            prefix,
            qos,
            fleet,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run_mqtt(url, prefix, *qos, fleet))),
        Output::Serial {
            path,
            pty,
            baud_rate,
            device_id,
            fleet,
        } => run_serial(path.as_deref(), *pty, *baud_rate, device_id.as_deref(), fleet),
        Output::Salesforce(args) => salesforce::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgecase-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet {
            devices: 2,
            sensors: vec!["a".into(), "b".into()],
            rate: 0.0,
            count: 8,
            seed: 7,
        }
    }

    #[test]
    fn same_seed_same_readings() {
        let f = fleet();
        let run = || {
            let mut v = Values { state: f.seed };
            (0..8).map(|n| reading(&f, &mut v, n, None)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn cycles_through_devices_and_sensors() {
        let f = fleet();
        let mut v = Values { state: 1 };
        let names: Vec<(String, String)> = (0..4)
            .map(|n| reading(&f, &mut v, n, None))
            .map(|(d, s, _)| (d, s))
            .collect();
        assert_eq!(
            names,
            [("dev1", "a"), ("dev1", "b"), ("dev2", "a"), ("dev2", "b")].map(|(d, s)| (d.to_string(), s.to_string()))
        );
    }
}
