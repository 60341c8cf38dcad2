//! A sensor reading: the one data type every ingest produces and every consumer receives.
//!
//! Parsing is pure (no I/O) so the rules for what a valid reading is can be tested on their
//! own, and so that MQTT, serial and `buffer replay` share exactly one definition. A payload
//! that fails here is not an error of the agent: the caller dead-letters it with the
//! [`RejectReason`] and keeps going.

use serde::{Deserialize, Serialize};
use std::fmt;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Namespace for deterministic message ids (UUID v5), so that the same reading always gets
/// the same `message_id`, whichever path or retry delivered it.
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6564_6765_6361_7365_8000_0000_0000_0001);

/// A validated reading, ready to be buffered and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Stable id: consumers drop duplicates on it.
    pub message_id: String,
    pub device_id: String,
    pub sensor: String,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Measurement time, RFC 3339 UTC with milliseconds (the device's time when it sent one,
    /// otherwise the time the gateway received the reading).
    pub ts: String,
    /// `ts` as Unix milliseconds (not serialized; the rules compute durations with it).
    #[serde(skip)]
    pub ts_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The gateway that ingested it.
    pub gateway_id: String,
    /// Where it came from: `mqtt:<topic>` or `serial:<port>`.
    pub source: String,
}

/// What the transport knows about a payload before it is parsed: the values that fill in
/// fields the payload leaves out.
#[derive(Debug, Clone, Default)]
pub struct Origin<'a> {
    pub device_id: Option<&'a str>,
    pub sensor: Option<&'a str>,
    /// `mqtt:<topic>` or `serial:<port>`.
    pub source: &'a str,
    pub gateway_id: &'a str,
    /// Receive time, used when the payload has no `ts`.
    pub received_ms: i64,
}

/// Why a payload was not accepted. Each is dead-lettered with this text as its reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RejectReason {
    #[error("empty payload")]
    Empty,
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid UTF-8 (invalid byte at offset {0})")]
    NotUtf8(usize),
    #[error("payload is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("field `value` must be a number, got {0}")]
    ValueNotNumber(&'static str),
    #[error("field `value` is missing")]
    ValueMissing,
    #[error("field `value` is not finite ({0})")]
    ValueNotFinite(String),
    #[error("field `{field}` must be {expected}")]
    FieldType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("no `{0}`: the payload has none and the topic or port does not give one")]
    MissingIdentity(&'static str),
    #[error("field `ts` is not RFC 3339 or Unix milliseconds: {0}")]
    BadTimestamp(String),
}

impl Reading {
    /// Parses one payload (a bare JSON number, or an object with `value` and optional
    /// `device_id`, `sensor`, `unit`, `ts`, `seq`), filling gaps from `origin`.
    pub fn parse(payload: &[u8], origin: &Origin<'_>, max_bytes: usize) -> Result<Reading, RejectReason> {
        if payload.len() > max_bytes {
            return Err(RejectReason::TooLarge {
                size: payload.len(),
                limit: max_bytes,
            });
        }
        let text = std::str::from_utf8(payload).map_err(|e| RejectReason::NotUtf8(e.valid_up_to()))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(RejectReason::Empty);
        }
        // NaN and Infinity are not JSON; name them rather than report a parse error at column 1.
        if let Some(word) = ["NaN", "nan", "Infinity", "-Infinity", "inf", "-inf"]
            .iter()
            .find(|w| text == **w)
        {
            return Err(RejectReason::ValueNotFinite((*word).to_string()));
        }
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| RejectReason::InvalidJson(e.to_string()))?;
        match json {
            serde_json::Value::Number(n) => {
                let value = finite(n.as_f64())?;
                build(origin, value, None, None, None, None, None)
            }
            serde_json::Value::Object(map) => {
                let value = match map.get("value") {
                    None | Some(serde_json::Value::Null) => return Err(RejectReason::ValueMissing),
                    Some(serde_json::Value::Number(n)) => finite(n.as_f64())?,
                    Some(serde_json::Value::String(s)) if is_non_finite_word(s) => {
                        return Err(RejectReason::ValueNotFinite(s.clone()));
                    }
                    Some(other) => return Err(RejectReason::ValueNotNumber(json_type(other))),
                };
                let device_id = opt_str(&map, "device_id")?;
                let sensor = opt_str(&map, "sensor")?;
                let unit = opt_str(&map, "unit")?;
                let seq = match map.get("seq") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(v) => Some(v.as_u64().ok_or(RejectReason::FieldType {
                        field: "seq",
                        expected: "a non-negative integer",
                    })?),
                };
                let ts_ms = match map.get("ts") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(v) => Some(parse_ts(v)?),
                };
                build(origin, value, device_id, sensor, unit, ts_ms, seq)
            }
            other => Err(RejectReason::ValueNotNumber(json_type(&other))),
        }
    }

    /// The AMQP routing key on the readings exchange: `reading.{device_id}.{sensor}`.
    /// Dots in names would add routing-key levels, so they become `_`.
    pub fn routing_key(&self) -> String {
        format!(
            "reading.{}.{}",
            routing_word(&self.device_id),
            routing_word(&self.sensor)
        )
    }
}

fn build(
    origin: &Origin<'_>,
    value: f64,
    device_id: Option<&str>,
    sensor: Option<&str>,
    unit: Option<&str>,
    ts_ms: Option<i64>,
    seq: Option<u64>,
) -> Result<Reading, RejectReason> {
    let device_id = non_empty(device_id.or(origin.device_id)).ok_or(RejectReason::MissingIdentity("device_id"))?;
    let sensor = non_empty(sensor.or(origin.sensor)).ok_or(RejectReason::MissingIdentity("sensor"))?;
    let device_ts = ts_ms.is_some();
    let ts_ms = ts_ms.unwrap_or(origin.received_ms);
    let message_id = message_id(
        device_id,
        sensor,
        seq,
        device_ts.then_some(ts_ms),
        value,
        origin.received_ms,
    );
    Ok(Reading {
        message_id,
        device_id: device_id.to_string(),
        sensor: sensor.to_string(),
        value,
        unit: unit.map(str::to_string),
        ts: format_ms(ts_ms),
        ts_ms,
        seq,
        gateway_id: origin.gateway_id.to_string(),
        source: origin.source.to_string(),
    })
}

/// The id identifies the *measurement*, not the delivery: a device sequence number or a
/// device timestamp makes a redelivered reading (MQTT resend after a crash, a replayed dead
/// letter) map to the same id. Without either, the receive time is all there is.
fn message_id(
    device: &str,
    sensor: &str,
    seq: Option<u64>,
    device_ts: Option<i64>,
    value: f64,
    received_ms: i64,
) -> String {
    let key = match (seq, device_ts) {
        (Some(seq), _) => format!("{device}\0{sensor}\0seq\0{seq}"),
        (None, Some(ts)) => format!("{device}\0{sensor}\0ts\0{ts}\0{}", value.to_bits()),
        (None, None) => format!("{device}\0{sensor}\0rx\0{received_ms}\0{}", value.to_bits()),
    };
    uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, key.as_bytes()).to_string()
}

/// The id of the `index`-th reading of binary frame `seq` from `device`: the frame is
/// identified by (device, seq), so a retransmitted frame yields the same ids.
pub fn frame_message_id(device: &str, sensor: &str, seq: u32, index: usize) -> String {
    let key = format!("{device}\0{sensor}\0frame\0{seq}\0{index}");
    uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, key.as_bytes()).to_string()
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.trim().is_empty())
}

fn finite(v: Option<f64>) -> Result<f64, RejectReason> {
    match v {
        Some(v) if v.is_finite() => Ok(v),
        Some(v) => Err(RejectReason::ValueNotFinite(v.to_string())),
        None => Err(RejectReason::ValueNotNumber("an unrepresentable number")),
    }
}

fn is_non_finite_word(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "nan" | "inf" | "-inf" | "infinity" | "-infinity" | "+infinity"
    )
}

/// What a JSON value is, for error messages: "a string", "an array", "null", ...
pub fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn opt_str<'m>(
    map: &'m serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<Option<&'m str>, RejectReason> {
    match map.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(RejectReason::FieldType {
            field,
            expected: "a string",
        }),
    }
}

fn parse_ts(v: &serde_json::Value) -> Result<i64, RejectReason> {
    match v {
        serde_json::Value::Number(n) => n
            .as_i64()
            .filter(|ms| (0..=253_402_300_799_999).contains(ms))
            .ok_or_else(|| RejectReason::BadTimestamp(n.to_string())),
        serde_json::Value::String(s) => OffsetDateTime::parse(s, &Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|e| RejectReason::BadTimestamp(format!("{s:?}: {e}"))),
        other => Err(RejectReason::BadTimestamp(json_type(other).to_string())),
    }
}

/// Formats Unix milliseconds as RFC 3339 UTC (`2026-11-25T17:41:57.123Z`).
pub fn format_ms(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&f).unwrap_or_else(|_| ms.to_string())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn routing_word(s: &str) -> String {
    s.chars()
        .map(|c| if c == '.' || c == '*' || c == '#' { '_' } else { c })
        .collect()
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}={}", self.device_id, self.sensor, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin<'static> {
        Origin {
            device_id: Some("dev1"),
            sensor: Some("temp"),
            source: "mqtt:sensors/dev1/temp",
            gateway_id: "gw",
            received_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn bare_number_takes_identity_from_the_topic() {
        let r = Reading::parse(b"21.5", &origin(), 1024).expect("valid");
        assert_eq!(
            (r.device_id.as_str(), r.sensor.as_str(), r.value),
            ("dev1", "temp", 21.5)
        );
        assert_eq!(r.ts, "2023-11-14T22:13:20.000Z");
        assert_eq!(r.routing_key(), "reading.dev1.temp");
    }

    #[test]
    fn object_fields_override_the_topic() {
        let p = br#"{"value": 3, "device_id": "d.2", "sensor": "hum", "unit": "%", "ts": "2026-01-01T00:00:00+01:00", "seq": 7}"#;
        let r = Reading::parse(p, &origin(), 1024).expect("valid");
        assert_eq!(r.device_id, "d.2");
        assert_eq!(r.unit.as_deref(), Some("%"));
        assert_eq!(r.ts, "2025-12-31T23:00:00.000Z");
        assert_eq!(r.seq, Some(7));
        assert_eq!(r.routing_key(), "reading.d_2.hum");
    }

    #[test]
    fn unix_millisecond_timestamps_are_accepted() {
        let r = Reading::parse(br#"{"value": 1, "ts": 1700000000123}"#, &origin(), 1024).expect("valid");
        assert_eq!(r.ts, "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn same_measurement_same_message_id() {
        let a = Reading::parse(br#"{"value": 1, "seq": 9}"#, &origin(), 1024).expect("valid");
        let mut later = origin();
        later.received_ms += 5000;
        let b = Reading::parse(br#"{"value": 1, "seq": 9}"#, &later, 1024).expect("valid");
        assert_eq!(a.message_id, b.message_id);
        let c = Reading::parse(br#"{"value": 1, "seq": 10}"#, &origin(), 1024).expect("valid");
        assert_ne!(a.message_id, c.message_id);
    }

    #[test]
    fn bad_payloads_say_why() {
        let o = origin();
        let cases: &[(&[u8], RejectReason)] = &[
            (b"", RejectReason::Empty),
            (b"  ", RejectReason::Empty),
            (b"NaN", RejectReason::ValueNotFinite("NaN".into())),
            (
                br#"{"value": "Infinity"}"#,
                RejectReason::ValueNotFinite("Infinity".into()),
            ),
            (br#"{"value": "hot"}"#, RejectReason::ValueNotNumber("a string")),
            (br#""21""#, RejectReason::ValueNotNumber("a string")),
            (br#"{"v": 1}"#, RejectReason::ValueMissing),
            (
                br#"{"value": 1, "seq": -1}"#,
                RejectReason::FieldType {
                    field: "seq",
                    expected: "a non-negative integer",
                },
            ),
            (&[0x7b, 0xff, 0xfe], RejectReason::NotUtf8(1)),
        ];
        for (payload, want) in cases {
            assert_eq!(&Reading::parse(payload, &o, 1024).unwrap_err(), want, "{payload:?}");
        }
        assert!(matches!(
            Reading::parse(b"{nope", &o, 1024),
            Err(RejectReason::InvalidJson(_))
        ));
        assert!(matches!(
            Reading::parse(b"1e999", &o, 1024),
            Err(RejectReason::InvalidJson(_) | RejectReason::ValueNotFinite(_))
        ));
        assert_eq!(
            Reading::parse(&[b'1'; 2000], &o, 1024).unwrap_err(),
            RejectReason::TooLarge {
                size: 2000,
                limit: 1024
            }
        );
    }

    #[test]
    fn identity_must_come_from_somewhere() {
        let o = Origin {
            device_id: None,
            sensor: None,
            ..origin()
        };
        assert_eq!(
            Reading::parse(b"1", &o, 64).unwrap_err(),
            RejectReason::MissingIdentity("device_id")
        );
        let r = Reading::parse(br#"{"value":1,"device_id":"a","sensor":"b"}"#, &o, 64).expect("valid");
        assert_eq!(r.device_id, "a");
    }
}
