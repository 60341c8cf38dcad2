//! The simulated fleet: devices with sensors whose values follow patterns, and defects
//! injected on purpose. Pure and deterministic: the same [`FleetSpec`] and seed give the
//! same readings, whatever the output or the pace.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// splitmix64: small, fast, and good enough for sensor noise; deterministic per seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator for one part of the fleet, independent of the others.
    pub fn derive(seed: u64, a: u64, b: u64) -> Rng {
        let mut r = Rng(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [-0.5, 0.5) times `scale`.
    pub fn noise(&mut self, scale: f64) -> f64 {
        (self.unit() - 0.5) * scale
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// How a sensor's value moves over (simulated) time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Pattern {
    /// `value` plus uniform noise of width `noise`.
    Constant {
        value: f64,
        #[serde(default)]
        noise: f64,
    },
    /// `mean + amplitude * sin(2π t / period)`, plus noise.
    Sine {
        mean: f64,
        amplitude: f64,
        #[serde(with = "humantime_serde", default = "default_period")]
        period: Duration,
        #[serde(default)]
        noise: f64,
    },
    /// Starts at `start`, moves by up to ±`step` each reading, kept within [min, max].
    RandomWalk {
        start: f64,
        step: f64,
        #[serde(default = "neg_inf")]
        min: f64,
        #[serde(default = "pos_inf")]
        max: f64,
    },
    /// Holds each of `levels` for `every`, then the next, cycling.
    Steps {
        levels: Vec<f64>,
        #[serde(with = "humantime_serde")]
        every: Duration,
        #[serde(default)]
        noise: f64,
    },
    /// `start + per_hour * hours`, plus noise: a slow, steady change.
    Drift {
        start: f64,
        per_hour: f64,
        #[serde(default)]
        noise: f64,
    },
}

fn default_period() -> Duration {
    Duration::from_secs(60)
}
fn neg_inf() -> f64 {
    f64::NEG_INFINITY
}
fn pos_inf() -> f64 {
    f64::INFINITY
}

impl Pattern {
    /// Parses the command line's short form: `sine`, `constant:21.5`, `random-walk:20`,
    /// `steps:1,5,3`, `drift:20:3` (start and per hour), `sine:65:3` (mean and amplitude).
    pub fn parse_short(s: &str, base: f64) -> Result<Pattern, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or_default();
        let nums: Vec<f64> = parts
            .map(|p| {
                p.parse::<f64>()
                    .map_err(|_| format!("pattern {s:?}: {p:?} is not a number"))
            })
            .collect::<Result<_, _>>()
            .or_else(|e| if kind == "steps" { Ok(Vec::new()) } else { Err(e) })?;
        let n = |i: usize, d: f64| nums.get(i).copied().unwrap_or(d);
        Ok(match kind {
            "constant" => Pattern::Constant {
                value: n(0, base),
                noise: n(1, 0.2),
            },
            "sine" => Pattern::Sine {
                mean: n(0, base),
                amplitude: n(1, 5.0),
                period: Duration::from_secs_f64(n(2, 60.0)),
                noise: n(3, 0.5),
            },
            "random-walk" => Pattern::RandomWalk {
                start: n(0, base),
                step: n(1, 0.5),
                min: f64::NEG_INFINITY,
                max: f64::INFINITY,
            },
            "steps" => {
                let levels = s
                    .strip_prefix("steps:")
                    .map(|l| l.split(',').filter_map(|x| x.parse().ok()).collect::<Vec<f64>>())
                    .filter(|l| !l.is_empty())
                    .unwrap_or_else(|| vec![base, base + 10.0]);
                Pattern::Steps {
                    levels,
                    every: Duration::from_secs(10),
                    noise: 0.0,
                }
            }
            "drift" => Pattern::Drift {
                start: n(0, base),
                per_hour: n(1, 10.0),
                noise: n(2, 0.1),
            },
            other => {
                return Err(format!(
                    "unknown pattern {other:?}: constant, sine, random-walk, steps or drift"
                ));
            }
        })
    }
}

/// A misbehaviour injected on purpose, so each defect rule of the agent can be triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefectKind {
    /// One reading far off (`magnitude` added): trips a `rate` rule.
    Spike,
    /// The value freezes at what it was when the defect began: trips a `stuck` rule.
    Stuck,
    /// The sensor (or, on a device, the whole device) sends nothing: trips a `silent` rule.
    Dropout,
    /// The value is replaced by `value`: trips `above`, `below` or `outside` rules.
    OutOfRange,
    /// The value runs away by `per_second`, growing while the defect lasts: trips an
    /// `above` rule (or `below`, with a negative rate).
    Drift,
}

impl DefectKind {
    pub fn name(self) -> &'static str {
        match self {
            DefectKind::Spike => "spike",
            DefectKind::Stuck => "stuck",
            DefectKind::Dropout => "dropout",
            DefectKind::OutOfRange => "out-of-range",
            DefectKind::Drift => "drift",
        }
    }
}

/// When and how a defect happens: at a time for a duration, or at random with a
/// probability per reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefectSpec {
    pub kind: DefectKind,
    /// Simulated time from the start at which it begins.
    #[serde(default, with = "humantime_serde")]
    pub at: Option<Duration>,
    /// Instead of `at`: the chance per reading that it begins.
    #[serde(default)]
    pub probability: f64,
    /// How long it lasts (default: one reading for a spike, for ever for the others).
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Out-of-range: the value sent. Spike: the offset (default 50). Drift: change per
    /// second (default 1).
    #[serde(default)]
    pub value: Option<f64>,
    /// Only this sensor of the device (default: every sensor). Ignored on sensor defects.
    #[serde(default)]
    pub sensor: Option<String>,
}

impl DefectSpec {
    /// Parses `kind=stuck,at=20s,for=30s,value=95,probability=0.01,sensor=temp` (the
    /// command line's form; `device=` is taken off by the caller).
    pub fn parse_kv(pairs: &[(String, String)]) -> Result<DefectSpec, String> {
        let mut d = DefectSpec {
            kind: DefectKind::Spike,
            at: None,
            probability: 0.0,
            duration: None,
            value: None,
            sensor: None,
        };
        let mut kind = None;
        for (k, v) in pairs {
            let dur = || humantime::parse_duration(v).map_err(|e| format!("{k}={v}: {e}"));
            let num = || v.parse::<f64>().map_err(|_| format!("{k}={v}: not a number"));
            match k.as_str() {
                "kind" => {
                    kind = Some(
                        serde_json::from_value::<DefectKind>(serde_json::Value::String(v.clone()))
                            .map_err(|_| format!("kind={v}: one of spike, stuck, dropout, out-of-range, drift"))?,
                    )
                }
                "at" => d.at = Some(dur()?),
                "for" => d.duration = Some(dur()?),
                "probability" | "p" => d.probability = num()?,
                "value" => d.value = Some(num()?),
                "sensor" => d.sensor = Some(v.clone()),
                other => return Err(format!("unknown defect key {other:?}")),
            }
        }
        d.kind = kind.ok_or("a defect needs kind=...")?;
        if d.at.is_none() && d.probability <= 0.0 {
            d.at = Some(Duration::ZERO);
        }
        Ok(d)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSpec {
    pub name: String,
    #[serde(default)]
    pub unit: Option<String>,
    pub pattern: Pattern,
    #[serde(default, rename = "defect")]
    pub defects: Vec<DefectSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub id: String,
    /// Time between two readings of each sensor.
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    #[serde(rename = "sensor")]
    pub sensors: Vec<SensorSpec>,
    /// Defects of the whole device (a dropout silences it), or of one sensor (`sensor`).
    #[serde(default, rename = "defect")]
    pub defects: Vec<DefectSpec>,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}

/// A reading the fleet produced, before any output encodes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReading {
    pub device: String,
    pub sensor: String,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Defects that shaped this value (empty for a clean reading).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub defects: Vec<&'static str>,
}

/// One tick of one device: the readings of its sensors at simulated time `t`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    pub device_index: usize,
    pub device: String,
    /// The device's tick number (0, 1, ...).
    pub n: u64,
    /// Simulated time since the start.
    pub t: Duration,
    pub readings: Vec<SimReading>,
    /// Sensors silenced by a dropout at this tick.
    pub dropped: Vec<String>,
}

struct ActiveDefect {
    kind: DefectKind,
    since: Duration,
    until: Option<Duration>,
    /// Stuck: the frozen value.
    frozen: Option<f64>,
    value: Option<f64>,
}

struct DefectState {
    spec: DefectSpec,
    /// `at` defects fire once.
    fired: bool,
    active: Option<ActiveDefect>,
}

struct SensorState {
    spec: SensorSpec,
    rng: Rng,
    walk: Option<f64>,
    last: Option<f64>,
    defects: Vec<DefectState>,
}

struct DeviceState {
    spec: DeviceSpec,
    sensors: Vec<SensorState>,
    n: u64,
    rng: Rng,
}

/// The running fleet: call [`Fleet::tick`] for a device whenever its next reading is due.
pub struct Fleet {
    devices: Vec<DeviceState>,
}

impl Fleet {
    pub fn new(devices: &[DeviceSpec], seed: u64) -> Fleet {
        let devices = devices
            .iter()
            .enumerate()
            .map(|(di, d)| {
                let sensors = d
                    .sensors
                    .iter()
                    .enumerate()
                    .map(|(si, s)| {
                        let mut defects: Vec<DefectState> = s.defects.iter().cloned().map(DefectState::new).collect();
                        // Device defects that concern this sensor.
                        defects.extend(
                            d.defects
                                .iter()
                                .filter(|x| x.sensor.as_deref().is_none_or(|n| n == s.name))
                                .cloned()
                                .map(DefectState::new),
                        );
                        SensorState {
                            spec: s.clone(),
                            rng: Rng::derive(seed, di as u64 + 1, si as u64 + 1),
                            walk: None,
                            last: None,
                            defects,
                        }
                    })
                    .collect();
                DeviceState {
                    spec: d.clone(),
                    sensors,
                    n: 0,
                    rng: Rng::derive(seed, di as u64 + 1, 0),
                }
            })
            .collect();
        Fleet { devices }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn interval(&self, device: usize) -> Duration {
        self.devices[device].spec.interval
    }

    pub fn device_id(&self, device: usize) -> &str {
        &self.devices[device].spec.id
    }

    /// Readings per second of the whole fleet, at the configured intervals.
    pub fn nominal_rate(&self) -> f64 {
        self.devices
            .iter()
            .map(|d| d.sensors.len() as f64 / d.spec.interval.as_secs_f64().max(1e-6))
            .sum()
    }

    /// Changes every device's interval so that the fleet sends `rate` readings per second.
    pub fn set_rate(&mut self, rate: f64) {
        let sensors: usize = self.devices.iter().map(|d| d.sensors.len()).sum();
        if rate > 0.0 && sensors > 0 {
            let interval = Duration::from_secs_f64(sensors as f64 / rate);
            for d in &mut self.devices {
                d.spec.interval = interval;
            }
        }
    }

    /// The next tick of device `i`.
    pub fn tick(&mut self, i: usize) -> Tick {
        let d = &mut self.devices[i];
        let n = d.n;
        d.n += 1;
        let t = d.spec.interval.mul_f64(n as f64);
        let mut readings = Vec::new();
        let mut dropped = Vec::new();
        for s in &mut d.sensors {
            let clean = s.value(t);
            let mut value = clean;
            let mut marks = Vec::new();
            let mut silent = false;
            for x in &mut s.defects {
                x.update(t, &mut d.rng, s.last.unwrap_or(clean));
                let Some(a) = &x.active else { continue };
                marks.push(a.kind.name());
                match a.kind {
                    DefectKind::Spike => value += a.value.unwrap_or(50.0),
                    DefectKind::Stuck => value = a.frozen.unwrap_or(value),
                    DefectKind::Dropout => silent = true,
                    DefectKind::OutOfRange => value = a.value.unwrap_or(1.0e6),
                    DefectKind::Drift => value += a.value.unwrap_or(1.0) * (t.saturating_sub(a.since)).as_secs_f64(),
                }
                // A spike without a duration is one reading.
                if a.kind == DefectKind::Spike && x.spec.duration.is_none() {
                    x.active = None;
                }
            }
            let value = (value * 1000.0).round() / 1000.0;
            s.last = Some(value);
            if silent {
                dropped.push(s.spec.name.clone());
                continue;
            }
            readings.push(SimReading {
                device: d.spec.id.clone(),
                sensor: s.spec.name.clone(),
                value,
                unit: s.spec.unit.clone(),
                defects: marks,
            });
        }
        Tick {
            device_index: i,
            device: d.spec.id.clone(),
            n,
            t,
            readings,
            dropped,
        }
    }
}

impl DefectState {
    fn new(spec: DefectSpec) -> DefectState {
        DefectState {
            spec,
            fired: false,
            active: None,
        }
    }

    fn update(&mut self, t: Duration, rng: &mut Rng, current: f64) {
        if let Some(a) = &self.active
            && a.until.is_some_and(|u| t >= u)
        {
            self.active = None;
        }
        if self.active.is_some() {
            return;
        }
        let start = match self.spec.at {
            Some(at) if self.spec.probability <= 0.0 => !self.fired && t >= at,
            _ => rng.chance(self.spec.probability),
        };
        if start {
            self.fired = true;
            self.active = Some(ActiveDefect {
                kind: self.spec.kind,
                since: t,
                until: self.spec.duration.map(|d| t + d),
                frozen: Some(current),
                value: self.spec.value,
            });
        }
    }
}

impl SensorState {
    fn value(&mut self, t: Duration) -> f64 {
        let secs = t.as_secs_f64();
        match &self.spec.pattern {
            Pattern::Constant { value, noise } => value + self.rng.noise(*noise),
            Pattern::Sine {
                mean,
                amplitude,
                period,
                noise,
            } => {
                let p = period.as_secs_f64().max(1e-3);
                mean + amplitude * (std::f64::consts::TAU * secs / p).sin() + self.rng.noise(*noise)
            }
            Pattern::RandomWalk { start, step, min, max } => {
                let next = match self.walk {
                    None => *start,
                    Some(v) => (v + self.rng.noise(2.0 * step)).clamp(*min, *max),
                };
                self.walk = Some(next);
                next
            }
            Pattern::Steps { levels, every, noise } => {
                let i = (secs / every.as_secs_f64().max(1e-3)) as usize;
                levels.get(i % levels.len().max(1)).copied().unwrap_or(0.0) + self.rng.noise(*noise)
            }
            Pattern::Drift { start, per_hour, noise } => start + per_hour * secs / 3600.0 + self.rng.noise(*noise),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(defects: Vec<DefectSpec>) -> DeviceSpec {
        DeviceSpec {
            id: "d1".into(),
            interval: Duration::from_secs(1),
            sensors: vec![
                SensorSpec {
                    name: "temp".into(),
                    unit: Some("C".into()),
                    pattern: Pattern::Sine {
                        mean: 20.0,
                        amplitude: 2.0,
                        period: Duration::from_secs(60),
                        noise: 0.5,
                    },
                    defects: vec![],
                },
                SensorSpec {
                    name: "level".into(),
                    unit: None,
                    pattern: Pattern::RandomWalk {
                        start: 50.0,
                        step: 1.0,
                        min: 0.0,
                        max: 100.0,
                    },
                    defects: vec![],
                },
            ],
            defects,
        }
    }

    fn defect(kind: DefectKind, at: u64, dur: Option<u64>, value: Option<f64>) -> DefectSpec {
        DefectSpec {
            kind,
            at: Some(Duration::from_secs(at)),
            probability: 0.0,
            duration: dur.map(Duration::from_secs),
            value,
            sensor: Some("temp".into()),
        }
    }

    fn temps(f: &mut Fleet, n: usize) -> Vec<Option<f64>> {
        (0..n)
            .map(|_| f.tick(0).readings.iter().find(|r| r.sensor == "temp").map(|r| r.value))
            .collect()
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let run = |seed| {
            let mut f = Fleet::new(&[device(vec![])], seed);
            (0..20).map(|_| f.tick(0)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn each_pattern_moves_as_described() {
        let at = |p: Pattern, secs: u64| {
            let mut s = device(vec![]);
            s.sensors[0].pattern = p;
            let mut f = Fleet::new(&[s], 1);
            (0..=secs)
                .map(|_| f.tick(0).readings[0].value)
                .last()
                .unwrap_or_default()
        };
        let c = at(Pattern::Constant { value: 5.0, noise: 0.0 }, 3);
        assert_eq!(c, 5.0);
        let s = at(
            Pattern::Sine {
                mean: 0.0,
                amplitude: 10.0,
                period: Duration::from_secs(4),
                noise: 0.0,
            },
            1,
        );
        assert_eq!(s, 10.0);
        let st = at(
            Pattern::Steps {
                levels: vec![1.0, 2.0, 3.0],
                every: Duration::from_secs(2),
                noise: 0.0,
            },
            5,
        );
        assert_eq!(st, 3.0);
        let d = at(
            Pattern::Drift {
                start: 10.0,
                per_hour: 3600.0,
                noise: 0.0,
            },
            30,
        );
        assert_eq!(d, 40.0);
    }

    #[test]
    fn defects_begin_and_end_on_time() {
        let mut f = Fleet::new(&[device(vec![defect(DefectKind::Stuck, 3, Some(4), None)])], 1);
        let t = temps(&mut f, 10);
        assert!(t[3..7].iter().all(|v| *v == t[2]), "frozen at the last value: {t:?}");
        assert_ne!(t[7], t[2]);

        let mut f = Fleet::new(&[device(vec![defect(DefectKind::Spike, 2, None, Some(100.0))])], 1);
        let t = temps(&mut f, 5);
        assert!(
            t[2].unwrap_or_default() > 100.0 && t[3].unwrap_or_default() < 30.0,
            "{t:?}"
        );

        let mut f = Fleet::new(&[device(vec![defect(DefectKind::Dropout, 1, Some(2), None)])], 1);
        let t = temps(&mut f, 4);
        assert_eq!((t[1], t[2]), (None, None));
        assert!(t[3].is_some());

        let mut f = Fleet::new(&[device(vec![defect(DefectKind::OutOfRange, 0, None, Some(-40.0))])], 1);
        assert_eq!(temps(&mut f, 2), [Some(-40.0), Some(-40.0)]);

        let mut f = Fleet::new(&[device(vec![defect(DefectKind::Drift, 0, None, Some(10.0))])], 1);
        let t = temps(&mut f, 10);
        assert!(t[9].unwrap_or_default() > 100.0, "{t:?}");
    }

    #[test]
    fn a_device_dropout_silences_every_sensor() {
        let mut d = defect(DefectKind::Dropout, 1, None, None);
        d.sensor = None;
        let mut f = Fleet::new(&[device(vec![d])], 1);
        assert_eq!(f.tick(0).readings.len(), 2);
        let t = f.tick(0);
        assert!(t.readings.is_empty());
        assert_eq!(t.dropped, ["temp", "level"]);
    }

    #[test]
    fn probability_defects_are_seeded() {
        let mut d = defect(DefectKind::Spike, 0, None, None);
        d.at = None;
        d.probability = 0.1;
        let run = || {
            let mut f = Fleet::new(&[device(vec![d.clone()])], 3);
            (0..200).map(|_| f.tick(0).readings[0].defects.len()).sum::<usize>()
        };
        let spikes = run();
        assert_eq!(spikes, run());
        assert!((5..50).contains(&spikes), "about 20 of 200: {spikes}");
    }

    #[test]
    fn short_patterns_parse() {
        assert_eq!(
            Pattern::parse_short("constant:21.5:0", 0.0),
            Ok(Pattern::Constant {
                value: 21.5,
                noise: 0.0
            })
        );
        assert!(
            matches!(Pattern::parse_short("steps:1,2", 0.0), Ok(Pattern::Steps { levels, .. }) if levels == [1.0, 2.0])
        );
        assert!(Pattern::parse_short("square", 0.0).is_err());
    }
}
