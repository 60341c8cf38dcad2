//! A scenario file (TOML) describes a whole fleet with its defects and bad input, so a site
//! can be replayed. `examples/sim/site.toml` is one:
//!
//! ```toml
//! seed = 7
//!
//! [[device]]
//! id = "boiler-1"
//! interval = "500ms"
//! [[device.sensor]]
//! name = "temp"
//! unit = "C"
//! pattern = { kind = "sine", mean = 66.0, amplitude = 2.0, period = "45s", noise = 0.3 }
//! [[device.sensor.defect]]
//! kind = "out-of-range"      # spike | stuck | dropout | out-of-range | drift
//! at = "8s"                  # or probability = 0.01 (per reading)
//! for = "30s"
//! value = 88.0
//!
//! [[device]]
//! id = "pump"
//! replicas = 3               # pump-1, pump-2, pump-3
//! ...
//!
//! [[bad_input]]
//! kind = "crc"               # malformed-json | wrong-type | crc | truncated | garbage | duplicate | out-of-order
//! probability = 0.01
//! ```

use crate::inject::BadInputSpec;
use crate::model::{DefectSpec, DeviceSpec, Pattern, SensorSpec};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default, rename = "device")]
    pub devices: Vec<ScenarioDevice>,
    #[serde(default)]
    pub bad_input: Vec<BadInputSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioDevice {
    pub id: String,
    /// This many devices `{id}-1`, `{id}-2`, ... alike (the seed makes their noise differ).
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(with = "humantime_serde", default = "one_second")]
    pub interval: Duration,
    #[serde(rename = "sensor")]
    pub sensors: Vec<SensorSpec>,
    #[serde(default, rename = "defect")]
    pub defects: Vec<DefectSpec>,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        if s.devices.is_empty() {
            return Err("no [[device]]".into());
        }
        for d in &s.devices {
            if d.sensors.is_empty() {
                return Err(format!("device {}: no [[device.sensor]]", d.id));
            }
        }
        Ok(s)
    }

    /// The devices, replicas expanded.
    pub fn device_specs(&self) -> Vec<DeviceSpec> {
        let mut out = Vec::new();
        for d in &self.devices {
            let spec = |id: String| DeviceSpec {
                id,
                interval: d.interval,
                sensors: d.sensors.clone(),
                defects: d.defects.clone(),
            };
            match d.replicas {
                Some(n) => out.extend((1..=n).map(|i| spec(format!("{}-{i}", d.id)))),
                None => out.push(spec(d.id.clone())),
            }
        }
        out
    }
}

/// A fleet from the command line: `devices` devices `dev1..devN` (or the one `device_id`),
/// each with `sensors`, following `pattern` (or a default per sensor name), with `defects`
/// given as (device or None for all, defect).
pub fn cli_fleet(
    devices: u32,
    device_id: Option<&str>,
    sensors: &[String],
    pattern: Option<&str>,
    interval: Duration,
    defects: &[(Option<String>, DefectSpec)],
) -> Result<Vec<DeviceSpec>, String> {
    let ids: Vec<String> = match device_id {
        Some(d) => vec![d.to_string()],
        None => (1..=devices.max(1)).map(|i| format!("dev{i}")).collect(),
    };
    let sensor_specs = sensors
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (p, unit) = default_pattern(name, i);
            let p = match pattern {
                Some(short) => Pattern::parse_short(short, base_of(&p))?,
                None => p,
            };
            Ok(SensorSpec {
                name: name.clone(),
                unit,
                pattern: p,
                defects: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    for (d, _) in defects {
        if let Some(d) = d
            && !ids.contains(d)
        {
            return Err(format!(
                "--defect device={d}: no such device (the fleet is {})",
                ids.join(", ")
            ));
        }
    }
    Ok(ids
        .into_iter()
        .map(|id| DeviceSpec {
            defects: defects
                .iter()
                .filter(|(d, _)| d.as_deref().is_none_or(|d| d == id))
                .map(|(_, x)| x.clone())
                .collect(),
            id,
            interval,
            sensors: sensor_specs.clone(),
        })
        .collect())
}

fn base_of(p: &Pattern) -> f64 {
    match p {
        Pattern::Constant { value, .. } => *value,
        Pattern::Sine { mean, .. } => *mean,
        Pattern::RandomWalk { start, .. } | Pattern::Drift { start, .. } => *start,
        Pattern::Steps { levels, .. } => levels.first().copied().unwrap_or(0.0),
    }
}

/// Plausible values for common sensor names.
fn default_pattern(name: &str, index: usize) -> (Pattern, Option<String>) {
    let sine = |mean: f64, amplitude: f64, noise: f64| Pattern::Sine {
        mean,
        amplitude,
        period: Duration::from_secs(120),
        noise,
    };
    match name {
        n if n.starts_with("temp") => (sine(21.0, 2.0, 0.3), Some("C".into())),
        "humidity" => (sine(45.0, 5.0, 1.0), Some("%".into())),
        "pressure" => (
            Pattern::RandomWalk {
                start: 2.5,
                step: 0.02,
                min: 0.0,
                max: 10.0,
            },
            Some("bar".into()),
        ),
        "level" => (
            Pattern::RandomWalk {
                start: 60.0,
                step: 0.5,
                min: 0.0,
                max: 100.0,
            },
            Some("%".into()),
        ),
        "power" => (
            Pattern::Steps {
                levels: vec![1.2, 3.4, 2.2],
                every: Duration::from_secs(20),
                noise: 0.05,
            },
            Some("kW".into()),
        ),
        _ => (sine(20.0 + 10.0 * index as f64, 5.0, 0.5), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_site_loads() {
        let s = Scenario::parse(include_str!("../../examples/sim/site.toml")).expect("valid");
        let devices = s.device_specs();
        assert!(devices.len() >= 5, "{devices:#?}");
        assert!(!s.bad_input.is_empty());
    }

    #[test]
    fn replicas_expand_and_mistakes_are_named() {
        let s = Scenario::parse(
            r#"
            [[device]]
            id = "pump"
            replicas = 2
            [[device.sensor]]
            name = "pressure"
            pattern = { kind = "constant", value = 2.5 }
            "#,
        )
        .expect("valid");
        let ids: Vec<String> = s.device_specs().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["pump-1", "pump-2"]);
        let e = Scenario::parse("[[device]]\nid = \"x\"\nintervall = \"1s\"\n").unwrap_err();
        assert!(e.contains("intervall"), "{e}");
    }
}
