//! Bad input on purpose, so each of the agent's defences can be seen working: malformed
//! JSON, wrong types, CRC errors, truncated frames, garbage bytes, duplicate and
//! out-of-order sequence numbers. Each is injected at a given time or with a probability
//! per message (a reading for JSON outputs, a frame for the binary framing).

use crate::model::Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadInputKind {
    /// JSON cut short (JSON outputs); a frame whose body does not decode, with a valid CRC
    /// (binary: NACK 17).
    MalformedJson,
    /// `"value": "hot"` (JSON outputs); a NaN value (binary: NACK 18).
    WrongType,
    /// The frame's CRC damaged on the line; the device retransmits after the NACK (binary).
    Crc,
    /// The frame cut short, as by a reset mid-frame; the device retransmits (binary).
    /// JSON outputs: half a line.
    Truncated,
    /// Random bytes ended by a delimiter (a booting device's noise). JSON: a garbage line.
    Garbage,
    /// The same message sent twice (binary: the frame again, as after a lost ACK).
    Duplicate,
    /// Two messages' sequence numbers swapped.
    OutOfOrder,
}

impl BadInputKind {
    pub const ALL: [BadInputKind; 7] = [
        BadInputKind::MalformedJson,
        BadInputKind::WrongType,
        BadInputKind::Crc,
        BadInputKind::Truncated,
        BadInputKind::Garbage,
        BadInputKind::Duplicate,
        BadInputKind::OutOfOrder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BadInputKind::MalformedJson => "malformed-json",
            BadInputKind::WrongType => "wrong-type",
            BadInputKind::Crc => "crc",
            BadInputKind::Truncated => "truncated",
            BadInputKind::Garbage => "garbage",
            BadInputKind::Duplicate => "duplicate",
            BadInputKind::OutOfOrder => "out-of-order",
        }
    }

    pub fn parse(s: &str) -> Result<BadInputKind, String> {
        BadInputKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            format!(
                "unknown bad input {s:?}: {}",
                BadInputKind::ALL.map(|k| k.name()).join(", ")
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadInputSpec {
    pub kind: BadInputKind,
    /// Chance per message.
    #[serde(default)]
    pub probability: f64,
    /// Or once, at this simulated time.
    #[serde(default, with = "humantime_serde")]
    pub at: Option<Duration>,
    /// Only this device (default: any).
    #[serde(default)]
    pub device: Option<String>,
}

impl BadInputSpec {
    /// Parses `kind=crc,probability=0.01,device=dev1,at=5s`, or just `crc` (probability 0.01).
    pub fn parse(s: &str) -> Result<BadInputSpec, String> {
        let mut spec = BadInputSpec {
            kind: BadInputKind::Garbage,
            probability: 0.0,
            at: None,
            device: None,
        };
        let mut kind = None;
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => kind = Some(BadInputKind::parse(part)?),
                Some(("kind", v)) => kind = Some(BadInputKind::parse(v)?),
                Some(("probability" | "p", v)) => {
                    spec.probability = v.parse().map_err(|_| format!("{part}: not a number"))?
                }
                Some(("at", v)) => spec.at = Some(humantime::parse_duration(v).map_err(|e| format!("{part}: {e}"))?),
                Some(("device", v)) => spec.device = Some(v.to_string()),
                Some((k, _)) => return Err(format!("unknown bad-input key {k:?} (kind, probability, at, device)")),
            }
        }
        spec.kind = kind.ok_or("a bad input needs kind=...")?;
        if spec.at.is_none() && spec.probability <= 0.0 {
            spec.probability = 0.01;
        }
        Ok(spec)
    }
}

/// Decides, message by message, which bad input to inject.
pub struct Injector {
    specs: Vec<(BadInputSpec, bool)>,
    rng: Rng,
}

impl Injector {
    pub fn new(specs: Vec<BadInputSpec>, seed: u64) -> Injector {
        Injector {
            specs: specs.into_iter().map(|s| (s, false)).collect(),
            rng: Rng::derive(seed, 0xBAD, 0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The bad inputs to apply to the next message of `device` at simulated time `t`.
    pub fn decide(&mut self, device: &str, t: Duration) -> Vec<BadInputKind> {
        let mut out = Vec::new();
        for (spec, fired) in &mut self.specs {
            if spec.device.as_deref().is_some_and(|d| d != device) {
                continue;
            }
            let hit = match spec.at {
                Some(at) if spec.probability <= 0.0 => {
                    let hit = !*fired && t >= at;
                    *fired |= hit;
                    hit
                }
                _ => self.rng.chance(spec.probability),
            };
            if hit && !out.contains(&spec.kind) {
                out.push(spec.kind);
            }
        }
        out
    }

    /// Random non-zero bytes, some printable.
    pub fn garbage(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.rng.next_u64() % 255 + 1) as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line_form() {
        let s = BadInputSpec::parse("kind=crc,p=0.5,device=dev2").expect("parses");
        assert_eq!(
            (s.kind, s.probability, s.device.as_deref()),
            (BadInputKind::Crc, 0.5, Some("dev2"))
        );
        assert_eq!(BadInputSpec::parse("garbage").expect("parses").probability, 0.01);
        assert!(BadInputSpec::parse("kind=nonsense").is_err());
    }

    #[test]
    fn at_fires_once_for_the_named_device() {
        let mut i = Injector::new(
            vec![BadInputSpec::parse("kind=duplicate,at=2s,device=a").expect("ok")],
            1,
        );
        assert!(i.decide("a", Duration::from_secs(1)).is_empty());
        assert!(i.decide("b", Duration::from_secs(3)).is_empty());
        assert_eq!(i.decide("a", Duration::from_secs(3)), [BadInputKind::Duplicate]);
        assert!(i.decide("a", Duration::from_secs(4)).is_empty());
    }
}
