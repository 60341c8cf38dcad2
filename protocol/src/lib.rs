//! The Edgecase binary serial protocol: what firmware sends to the gateway agent over a
//! serial line, and what the agent writes back. `docs/serial-protocol.md` specifies it byte
//! by byte; this crate is the reference codec, used by the agent and by `edgecase-sim`.
//!
//! On the wire every message is one frame:
//!
//! ```text
//! COBS( version:u8 ‖ postcard(Message) ‖ CRC-32/ISO-HDLC of the preceding bytes, little-endian ) ‖ 0x00
//! ```
//!
//! Pure: no I/O, no clock, no allocation beyond the frame being built or decoded. Decoding
//! never panics, whatever the bytes (a fuzz target in `fuzz/` and the property tests hold it
//! to that), and every failure carries the NACK reason code the agent answers with.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The protocol version this crate speaks: the first byte of every frame body.
pub const VERSION: u8 = 1;
/// Largest decoded frame: version, message and CRC together.
pub const MAX_FRAME_BYTES: usize = 1024;
/// Largest COBS-encoded frame, delimiter not counted: COBS adds one byte per started 254.
pub const MAX_WIRE_BYTES: usize = MAX_FRAME_BYTES + MAX_FRAME_BYTES.div_ceil(254);
/// Smallest decoded frame: version, kind and CRC.
pub const MIN_FRAME_BYTES: usize = 1 + 1 + CRC_BYTES;
/// The CRC trailer.
pub const CRC_BYTES: usize = 4;
/// Longest device id and sensor name, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest unit, in UTF-8 bytes.
pub const MAX_UNIT_BYTES: usize = 16;
/// Most readings in one data frame.
pub const MAX_READINGS: usize = 32;
/// 9999-12-31T23:59:59.999Z: later timestamps are rejected.
pub const MAX_TIMESTAMP_MS: u64 = 253_402_300_799_999;
/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

/// CRC-32/ISO-HDLC (the CRC of zlib, Ethernet and PNG): polynomial 0x04C11DB7, init
/// 0xFFFFFFFF, input and output reflected, xor-out 0xFFFFFFFF, check value 0xCBF43926.
pub const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// A message, either way. postcard encodes the variant as a varint: 0, 1, 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Device → agent: one or several readings.
    Data(Data),
    /// Agent → device: the frame `seq` of `device_id` is committed (or was already).
    Ack(Ack),
    /// Agent → device: a frame was rejected, and why.
    Nack(Nack),
}

/// Kind 0: readings from one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Data {
    /// The device's id; empty means "the id in the agent's port config".
    pub device_id: String,
    /// Per-device frame sequence number: +1 for each new frame, never for a retransmission.
    pub seq: u32,
    /// Unix milliseconds when the frame was built; 0 when the device has no clock (the
    /// agent then uses its receive time).
    pub timestamp_ms: u64,
    pub readings: Vec<Reading>,
}

/// One measurement inside a data frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub sensor: String,
    pub value: f64,
    pub unit: Option<String>,
    /// How long before the frame's timestamp the value was measured, in milliseconds.
    pub age_ms: u32,
}

/// Kind 1: acknowledgement, written after the commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// As it was in the data frame (possibly empty).
    pub device_id: String,
    pub seq: u32,
}

/// Kind 2: negative acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    /// A [`NackReason`] code.
    pub reason: u8,
    /// The rejected frame's device and sequence number, when the frame was intact enough
    /// to name them (its CRC matched and the first fields decoded).
    pub device_id: Option<String>,
    pub seq: Option<u32>,
}

/// Why a frame was rejected: the NACK reason code. Codes below 16 are transmission damage
/// (the device retransmits); 16 and above mean the frame arrived intact but cannot be
/// accepted (the device must not send it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NackReason {
    /// The CRC does not match the bytes.
    Crc = 1,
    /// Not valid COBS (a code byte points past the end of the frame).
    Cobs = 2,
    /// Fewer than [`MIN_FRAME_BYTES`] bytes after COBS decoding: a truncated frame.
    TooShort = 3,
    /// More than [`MAX_WIRE_BYTES`] bytes before a delimiter, or more than
    /// [`MAX_FRAME_BYTES`] decoded.
    TooLong = 4,
    /// A protocol version this agent does not speak.
    Version = 16,
    /// The CRC matches but the message does not decode (unknown kind, bad varint, invalid
    /// UTF-8, bytes left over).
    Malformed = 17,
    /// The message decodes but breaks a limit (empty sensor, too many readings, a value
    /// that is not finite, ...).
    Invalid = 18,
    /// A device sent an ACK or NACK.
    UnexpectedKind = 19,
}

impl NackReason {
    pub const ALL: [NackReason; 8] = [
        NackReason::Crc,
        NackReason::Cobs,
        NackReason::TooShort,
        NackReason::TooLong,
        NackReason::Version,
        NackReason::Malformed,
        NackReason::Invalid,
        NackReason::UnexpectedKind,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<NackReason> {
        NackReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Damage in transit: the device should retransmit its unacknowledged frames.
    pub fn is_transmission_error(self) -> bool {
        self.code() < 16
    }

    /// A short fixed label (metrics, logs).
    pub fn label(self) -> &'static str {
        match self {
            NackReason::Crc => "crc",
            NackReason::Cobs => "cobs",
            NackReason::TooShort => "too_short",
            NackReason::TooLong => "too_long",
            NackReason::Version => "version",
            NackReason::Malformed => "malformed",
            NackReason::Invalid => "invalid",
            NackReason::UnexpectedKind => "unexpected_kind",
        }
    }
}

/// A frame that could not be accepted: the NACK reason, what could be read of its identity,
/// and a sentence for the dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub reason: NackReason,
    pub device_id: Option<String>,
    pub seq: Option<u32>,
    pub detail: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "binary frame rejected ({}): {}", self.reason.label(), self.detail)
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    fn new(reason: NackReason, detail: impl Into<String>) -> DecodeError {
        DecodeError {
            reason,
            device_id: None,
            seq: None,
            detail: detail.into(),
        }
    }

    /// The NACK that answers this frame.
    pub fn nack(&self) -> Message {
        Message::Nack(Nack {
            reason: self.reason.code(),
            device_id: self.device_id.clone(),
            seq: self.seq,
        })
    }
}

/// A message that cannot be encoded within the protocol's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError(pub String);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

/// The frame body: the version byte, then the postcard encoding of the message. No checks.
pub fn body(msg: &Message) -> Vec<u8> {
    let mut out = vec![VERSION];
    // postcard writing into a Vec fails only for types serde cannot express; ours can.
    out.extend(postcard::to_allocvec(msg).unwrap_or_default());
    out
}

/// Wraps any body into a frame as it goes on the wire: CRC appended (little-endian), COBS
/// encoded, delimiter appended. No checks, so tests and the simulator can frame anything.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(body.len() + CRC_BYTES);
    raw.extend_from_slice(body);
    raw.extend_from_slice(&CRC32.checksum(body).to_le_bytes());
    let mut out = cobs::encode_vec(&raw);
    out.push(DELIMITER);
    out
}

/// Encodes a message into its wire bytes, delimiter included, after checking the limits.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    if let Message::Data(d) = msg {
        d.validate().map_err(EncodeError)?;
    }
    let body = body(msg);
    if body.len() + CRC_BYTES > MAX_FRAME_BYTES {
        return Err(EncodeError(format!(
            "frame of {} bytes exceeds the maximum of {MAX_FRAME_BYTES}",
            body.len() + CRC_BYTES
        )));
    }
    Ok(frame(&body))
}

/// Decodes the bytes between two delimiters (the delimiters not included).
pub fn decode(wire: &[u8]) -> Result<Message, DecodeError> {
    if wire.len() > MAX_WIRE_BYTES {
        return Err(DecodeError::new(
            NackReason::TooLong,
            format!(
                "{} bytes before the delimiter, the maximum is {MAX_WIRE_BYTES}",
                wire.len()
            ),
        ));
    }
    let raw = cobs_decode(wire)?;
    if raw.len() < MIN_FRAME_BYTES {
        return Err(DecodeError::new(
            NackReason::TooShort,
            format!(
                "{} bytes after COBS decoding, the minimum is {MIN_FRAME_BYTES}",
                raw.len()
            ),
        ));
    }
    if raw.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::new(
            NackReason::TooLong,
            format!(
                "{} bytes after COBS decoding, the maximum is {MAX_FRAME_BYTES}",
                raw.len()
            ),
        ));
    }
    let (body, trailer) = raw.split_at(raw.len() - CRC_BYTES);
    let sent = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = CRC32.checksum(body);
    if sent != computed {
        return Err(DecodeError::new(
            NackReason::Crc,
            format!("CRC is 0x{sent:08X}, the bytes give 0x{computed:08X}"),
        ));
    }
    let (device_id, seq) = identify(body);
    let with_identity = |mut e: DecodeError| {
        e.device_id = device_id.clone();
        e.seq = seq;
        e
    };
    if body[0] != VERSION {
        return Err(with_identity(DecodeError::new(
            NackReason::Version,
            format!("protocol version {}, this agent speaks {VERSION}", body[0]),
        )));
    }
    let (msg, rest) = postcard::take_from_bytes::<Message>(&body[1..])
        .map_err(|e| with_identity(DecodeError::new(NackReason::Malformed, format!("postcard: {e}"))))?;
    if !rest.is_empty() {
        return Err(with_identity(DecodeError::new(
            NackReason::Malformed,
            format!("{} bytes left over after the message", rest.len()),
        )));
    }
    if let Message::Data(d) = &msg {
        d.validate()
            .map_err(|e| with_identity(DecodeError::new(NackReason::Invalid, e)))?;
    }
    Ok(msg)
}

/// As [`decode`], for the agent's side: only data frames are accepted.
pub fn decode_data(wire: &[u8]) -> Result<Data, DecodeError> {
    match decode(wire)? {
        Message::Data(d) => Ok(d),
        Message::Ack(a) => Err(DecodeError {
            reason: NackReason::UnexpectedKind,
            device_id: Some(a.device_id),
            seq: Some(a.seq),
            detail: "an ACK frame was sent to the agent; devices send data frames".into(),
        }),
        Message::Nack(_) => Err(DecodeError::new(
            NackReason::UnexpectedKind,
            "a NACK frame was sent to the agent; devices send data frames",
        )),
    }
}

fn cobs_decode(wire: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if wire.contains(&DELIMITER) {
        return Err(DecodeError::new(NackReason::Cobs, "a 0x00 byte inside the frame"));
    }
    cobs::decode_vec(wire).map_err(|_| {
        DecodeError::new(
            NackReason::Cobs,
            "not valid COBS: a code byte points past the end of the frame (truncated?)",
        )
    })
}

/// The device id and sequence number of a data frame whose first fields decode: fixed in
/// every protocol version, so a rejected frame can still be named in its NACK.
fn identify(body: &[u8]) -> (Option<String>, Option<u32>) {
    match body.get(1..).map(postcard::take_from_bytes::<(u32, String, u32)>) {
        Some(Ok(((0, device_id, seq), _))) => (Some(device_id), Some(seq)),
        _ => (None, None),
    }
}

impl Data {
    /// The protocol's limits on a data frame's content.
    pub fn validate(&self) -> Result<(), String> {
        if self.device_id.len() > MAX_NAME_BYTES {
            return Err(format!(
                "device_id of {} bytes, the maximum is {MAX_NAME_BYTES}",
                self.device_id.len()
            ));
        }
        if self.readings.is_empty() || self.readings.len() > MAX_READINGS {
            return Err(format!(
                "{} readings, a frame holds 1 to {MAX_READINGS}",
                self.readings.len()
            ));
        }
        if self.timestamp_ms > MAX_TIMESTAMP_MS {
            return Err(format!("timestamp_ms {} is after 9999-12-31", self.timestamp_ms));
        }
        for (i, r) in self.readings.iter().enumerate() {
            if r.sensor.is_empty() || r.sensor.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "reading {i}: sensor name of {} bytes, it must have 1 to {MAX_NAME_BYTES}",
                    r.sensor.len()
                ));
            }
            if let Some(u) = &r.unit
                && u.len() > MAX_UNIT_BYTES
            {
                return Err(format!(
                    "reading {i}: unit of {} bytes, the maximum is {MAX_UNIT_BYTES}",
                    u.len()
                ));
            }
            if !r.value.is_finite() {
                return Err(format!("reading {i}: value {} is not finite", r.value));
            }
            if self.timestamp_ms != 0 && u64::from(r.age_ms) > self.timestamp_ms {
                return Err(format!(
                    "reading {i}: age_ms {} is more than timestamp_ms {}",
                    r.age_ms, self.timestamp_ms
                ));
            }
        }
        Ok(())
    }

    /// When reading `r` was measured, in Unix milliseconds: the frame's timestamp (or the
    /// receive time, for a device without a clock) less the reading's age.
    pub fn measured_at_ms(&self, r: &Reading, received_ms: i64) -> i64 {
        let base = if self.timestamp_ms == 0 {
            received_ms
        } else {
            self.timestamp_ms as i64
        };
        base.saturating_sub(i64::from(r.age_ms))
    }
}

/// A piece of the byte stream between delimiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawFrame {
    /// The bytes of one frame, delimiters not included (never empty).
    Frame(Vec<u8>),
    /// More than the maximum before a delimiter: the first bytes and the full length. The
    /// rest was skipped up to the next delimiter.
    TooLong { prefix: Vec<u8>, len: usize },
}

/// Splits a byte stream at 0x00 delimiters without ever holding more than `max` bytes.
/// Empty frames (two delimiters in a row) are skipped: a device may send a lone 0x00 to
/// end whatever garbage came before it.
#[derive(Debug)]
pub struct Deframer {
    max: usize,
    current: Vec<u8>,
    skipping: Option<usize>,
}

impl Default for Deframer {
    fn default() -> Deframer {
        Deframer::new(MAX_WIRE_BYTES)
    }
}

impl Deframer {
    pub fn new(max: usize) -> Deframer {
        Deframer {
            max,
            current: Vec::new(),
            skipping: None,
        }
    }

    /// Bytes held for a frame not yet ended.
    pub fn held(&self) -> usize {
        self.current.len()
    }

    /// Feeds bytes; returns the frames they completed.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<RawFrame> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (chunk, rest, ended) = match bytes.iter().position(|b| *b == DELIMITER) {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            match self.skipping.as_mut() {
                Some(len) => *len += chunk.len(),
                None if self.current.len() + chunk.len() > self.max => {
                    let room = self.max - self.current.len();
                    self.current.extend_from_slice(&chunk[..room]);
                    self.skipping = Some(self.max + chunk.len() - room);
                }
                None => self.current.extend_from_slice(chunk),
            }
            if ended {
                let frame = std::mem::take(&mut self.current);
                match self.skipping.take() {
                    Some(len) => out.push(RawFrame::TooLong { prefix: frame, len }),
                    None if frame.is_empty() => {}
                    None => out.push(RawFrame::Frame(frame)),
                }
            }
        }
        out
    }
}

/// Formats bytes as spaced lowercase hex (`01 00 08`), as the protocol document does.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Parses spaced or unspaced hex.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// The fuzz target's body, here so that the property tests run it too (on stable, without
/// libFuzzer): `fuzz/fuzz_targets/decode.rs` calls it with arbitrary bytes.
pub mod fuzz {
    use super::*;

    /// Feeds `data` to the deframer and the decoders. Panics only if the codec is wrong:
    /// an accepted message must re-encode to a frame that decodes to the same message.
    pub fn check(data: &[u8]) {
        let _ = decode(data);
        let mut deframer = Deframer::default();
        // Two pieces, as a serial port might deliver them.
        let (a, b) = data.split_at(data.len() / 2);
        let mut frames = deframer.push(a);
        frames.extend(deframer.push(b));
        for f in frames {
            let RawFrame::Frame(f) = f else { continue };
            let Ok(msg) = decode(&f) else {
                let _ = decode_data(&f);
                continue;
            };
            let wire = frame(&body(&msg));
            // NaN never passes validation, so equality is meaningful.
            assert_eq!(
                decode(&wire[..wire.len() - 1]).as_ref(),
                Ok(&msg),
                "re-encoded frame differs"
            );
        }
    }
}

#[cfg(test)]
mod tests;
