//! Binary serial framing: the firmware protocol of `docs/serial-protocol.md`.
//!
//! The port's byte stream is split at 0x00 delimiters and each frame decoded by
//! `edgecase-protocol`. Everything one read brought is decoded, committed in one append
//! (readings, and dead letters for the frames that failed), and only then answered: an ACK
//! for each data frame, a NACK with the reason code for each rejected one, in the order the
//! frames came. A retransmitted frame, recognised by (device, seq) among the last
//! [`DEDUP_WINDOW`] sequence numbers of its device, is acknowledged again but not stored
//! again; its readings' message ids are derived from (device, seq) too, so the buffer also
//! recognises a retransmission that crosses a restart of the agent.

use super::{Route, commit, record};
use crate::buffer::{Buffer, Entry, NewDeadLetter};
use crate::metrics::Metrics;
use crate::reading::{Reading, format_ms, frame_message_id, now_ms};
use crate::watchdog::Heartbeat;
use edgecase_protocol::{self as protocol, Ack, Data, DecodeError, Deframer, Message, NackReason, RawFrame};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Sequence numbers remembered per device to recognise retransmissions.
pub const DEDUP_WINDOW: usize = 1024;
/// Longest wait for the answers to be written to the port.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The last sequence numbers committed for one device.
#[derive(Debug, Default)]
struct RecentSeqs {
    set: HashSet<u32>,
    order: VecDeque<u32>,
}

impl RecentSeqs {
    fn contains(&self, seq: u32) -> bool {
        self.set.contains(&seq)
    }

    fn insert(&mut self, seq: u32) {
        if self.set.insert(seq) {
            self.order.push_back(seq);
            if self.order.len() > DEDUP_WINDOW
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

/// What one batch of frames turned into: entries to commit, and the answers to write after.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub answers: Vec<Message>,
    /// (device, seq) of the data frames stored by this batch.
    committed: Vec<(String, u32)>,
    pub readings: u64,
    pub acked: u64,
    pub duplicates: u64,
    pub nacked: u64,
}

/// The binary protocol's state for one port; it outlives reopening the port, so a device
/// that retransmits across a reconnect is still recognised.
pub struct BinaryPort {
    path: String,
    /// For data frames with an empty device id.
    device_id: Option<String>,
    gateway_id: String,
    route: Route,
    metrics: Arc<Metrics>,
    recent: HashMap<String, RecentSeqs>,
}

impl BinaryPort {
    pub fn new(
        path: String,
        device_id: Option<String>,
        gateway_id: String,
        route: Route,
        metrics: Arc<Metrics>,
    ) -> BinaryPort {
        BinaryPort {
            path,
            device_id,
            gateway_id,
            route,
            metrics,
            recent: HashMap::new(),
        }
    }

    /// Reads, commits and answers frames until the port fails (`Some(reason)`) or the agent
    /// stops (`None`).
    pub async fn session<S>(
        &mut self,
        stream: &mut S,
        buffer: &Buffer,
        cancel: &CancellationToken,
        heartbeat: &Heartbeat,
    ) -> Option<String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut deframer = Deframer::default();
        let mut buf = vec![0u8; 4096];
        loop {
            heartbeat.beat();
            // A quiet port is idle time; a commit that never ends is not.
            let n = match super::serial::read_chunk(stream, &mut buf, cancel, heartbeat).await {
                Ok(n) => n,
                Err(why) => return why,
            };
            let frames = deframer.push(&buf[..n]);
            if frames.is_empty() {
                continue;
            }
            let batch = self.decode(frames, now_ms());
            if !batch.entries.is_empty() {
                commit(buffer, batch.entries.clone(), cancel, "serial", heartbeat).await?;
            }
            self.committed(&batch);
            let mut out = Vec::new();
            for answer in &batch.answers {
                // Answers are small and within the limits by construction.
                out.extend(protocol::encode(answer).unwrap_or_default());
            }
            // A device that stops reading must not stall the port for ever: a UART drains at
            // its baud rate, so a write that takes this long means the line is gone.
            let write = async {
                stream.write_all(&out).await?;
                stream.flush().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Some(format!("writing acknowledgements: {e}")),
                Err(_) => return Some(format!("writing acknowledgements took more than {WRITE_TIMEOUT:?}")),
            }
        }
    }

    /// Decodes a batch of frames: no I/O, so it is tested on its own.
    pub fn decode(&self, frames: Vec<RawFrame>, received_ms: i64) -> Batch {
        let mut batch = Batch::default();
        let mut in_batch: HashSet<(String, u32)> = HashSet::new();
        for frame in frames {
            let (raw, result) = match frame {
                RawFrame::Frame(raw) => {
                    let r = protocol::decode_data(&raw);
                    (raw, r)
                }
                RawFrame::TooLong { prefix, len } => {
                    let e = DecodeError {
                        reason: NackReason::TooLong,
                        device_id: None,
                        seq: None,
                        detail: format!(
                            "{len} bytes without a delimiter, the maximum is {} (first {} bytes kept)",
                            protocol::MAX_WIRE_BYTES,
                            prefix.len()
                        ),
                    };
                    (prefix, Err(e))
                }
            };
            let data = result.and_then(|d| self.identify(d));
            match data {
                Err(e) => self.reject(&mut batch, e, raw),
                Ok((device, data)) => {
                    let key = (device, data.seq);
                    let ack = Message::Ack(Ack {
                        device_id: data.device_id.clone(),
                        seq: data.seq,
                    });
                    let seen = self.recent.get(&key.0).is_some_and(|r| r.contains(key.1));
                    if seen || in_batch.contains(&key) {
                        batch.duplicates += 1;
                        tracing::debug!(device_id = %key.0, seq = key.1, "retransmitted frame; acknowledged again");
                    } else {
                        for (i, r) in data.readings.iter().enumerate() {
                            let reading = self.reading(&key.0, &data, i, r, received_ms);
                            batch
                                .entries
                                .push(Entry::Reading(record(&reading, &self.route), Box::new(reading)));
                            batch.readings += 1;
                        }
                        batch.acked += 1;
                        in_batch.insert(key.clone());
                        batch.committed.push(key);
                    }
                    batch.answers.push(ack);
                }
            }
        }
        batch
    }

    /// The device a data frame is from: its own id, else the port's.
    fn identify(&self, data: Data) -> Result<(String, Data), DecodeError> {
        if !data.device_id.is_empty() {
            return Ok((data.device_id.clone(), data));
        }
        match &self.device_id {
            Some(d) => Ok((d.clone(), data)),
            None => Err(DecodeError {
                reason: NackReason::Invalid,
                device_id: Some(String::new()),
                seq: Some(data.seq),
                detail: "the frame's device_id is empty and the port config has no device_id".into(),
            }),
        }
    }

    fn reject(&self, batch: &mut Batch, e: DecodeError, raw: Vec<u8>) {
        self.metrics
            .dead_letter("serial", &format!("frame_{}", e.reason.label()));
        tracing::warn!(reason = %e, bytes = raw.len(), "binary frame dead-lettered and NACKed");
        batch.answers.push(e.nack());
        batch.nacked += 1;
        batch.entries.push(Entry::DeadLetter(NewDeadLetter {
            source: "serial".into(),
            origin: self.path.clone(),
            device_id: e
                .device_id
                .clone()
                .filter(|d| !d.is_empty())
                .or_else(|| self.device_id.clone()),
            sensor: None,
            reason: e.to_string(),
            raw,
        }));
    }

    fn reading(&self, device: &str, data: &Data, index: usize, r: &protocol::Reading, received_ms: i64) -> Reading {
        let ts_ms = data.measured_at_ms(r, received_ms);
        Reading {
            message_id: frame_message_id(device, &r.sensor, data.seq, index),
            device_id: device.to_string(),
            sensor: r.sensor.clone(),
            value: r.value,
            unit: r.unit.clone(),
            ts: format_ms(ts_ms),
            ts_ms,
            seq: Some(u64::from(data.seq)),
            gateway_id: self.gateway_id.clone(),
            source: format!("serial:{}", self.path),
        }
    }

    /// After the commit: remember what was stored, count.
    fn committed(&mut self, batch: &Batch) {
        for (device, seq) in &batch.committed {
            self.recent.entry(device.clone()).or_default().insert(*seq);
        }
        self.metrics.accepted("serial", batch.readings);
        self.metrics.serial_frame(&self.path, "acked", batch.acked);
        self.metrics.serial_frame(&self.path, "duplicate", batch.duplicates);
        self.metrics.serial_frame(&self.path, "nacked", batch.nacked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Reading as Wire;

    fn port() -> BinaryPort {
        BinaryPort::new(
            "/dev/ttyX".into(),
            Some("tank-5".into()),
            "gw".into(),
            Route {
                readings_exchange: "edgecase.readings".into(),
            },
            Arc::new(Metrics::new()),
        )
    }

    fn data(device: &str, seq: u32) -> Vec<u8> {
        let wire = protocol::encode(&Message::Data(Data {
            device_id: device.into(),
            seq,
            timestamp_ms: 0,
            readings: vec![
                Wire {
                    sensor: "level".into(),
                    value: 1.5,
                    unit: Some("%".into()),
                    age_ms: 1000,
                },
                Wire {
                    sensor: "level".into(),
                    value: 2.5,
                    unit: None,
                    age_ms: 0,
                },
            ],
        }))
        .expect("encodes");
        wire[..wire.len() - 1].to_vec()
    }

    #[test]
    fn frames_become_readings_acks_nacks_and_dead_letters() {
        let mut p = port();
        let mut damaged = data("pump-1", 9);
        damaged[3] ^= 1;
        let frames = vec![
            RawFrame::Frame(data("pump-1", 8)),
            RawFrame::Frame(data("", 8)),
            RawFrame::Frame(damaged.clone()),
            RawFrame::Frame(data("pump-1", 8)),
        ];
        let b = p.decode(frames, 10_000);
        assert_eq!((b.readings, b.acked, b.duplicates, b.nacked), (4, 2, 1, 1));
        let Entry::Reading(_, r) = &b.entries[0] else {
            panic!("reading")
        };
        assert_eq!((r.device_id.as_str(), r.seq, r.ts_ms), ("pump-1", Some(8), 9_000));
        let Entry::Reading(_, r) = &b.entries[2] else {
            panic!("reading")
        };
        assert_eq!(r.device_id, "tank-5", "empty device id: the port's");
        let Entry::DeadLetter(d) = &b.entries[4] else {
            panic!("dead letter")
        };
        assert_eq!(d.raw, damaged);
        assert!(d.reason.contains("(crc)"), "{}", d.reason);
        assert_eq!(
            b.answers,
            vec![
                Message::Ack(Ack {
                    device_id: "pump-1".into(),
                    seq: 8
                }),
                Message::Ack(Ack {
                    device_id: "".into(),
                    seq: 8
                }),
                Message::Nack(protocol::Nack {
                    reason: 1,
                    device_id: None,
                    seq: None
                }),
                Message::Ack(Ack {
                    device_id: "pump-1".into(),
                    seq: 8
                }),
            ]
        );
        // Same frame ids for the same frame: the buffer recognises it even after a restart.
        let again = port().decode(vec![RawFrame::Frame(data("pump-1", 8))], 99);
        let (Entry::Reading(first, _), Entry::Reading(retransmitted, _)) = (&b.entries[0], &again.entries[0]) else {
            panic!("readings")
        };
        assert_eq!(first.message_id, retransmitted.message_id);
        p.committed(&b);
        let later = p.decode(
            vec![RawFrame::Frame(data("pump-1", 8)), RawFrame::Frame(data("pump-1", 7))],
            0,
        );
        assert_eq!((later.duplicates, later.acked), (1, 1), "7 is out of order but new");
    }

    #[test]
    fn the_window_forgets_old_sequence_numbers() {
        let mut r = RecentSeqs::default();
        for s in 0..(DEDUP_WINDOW as u32 + 10) {
            r.insert(s);
        }
        assert!(!r.contains(5));
        assert!(r.contains(DEDUP_WINDOW as u32 + 9));
        assert_eq!(r.set.len(), DEDUP_WINDOW);
    }

    #[test]
    fn no_device_id_anywhere_is_invalid() {
        let mut p = port();
        p.device_id = None;
        let b = p.decode(vec![RawFrame::Frame(data("", 1))], 0);
        assert_eq!(b.nacked, 1);
        assert_eq!(
            b.answers,
            vec![Message::Nack(protocol::Nack {
                reason: 18,
                device_id: Some(String::new()),
                seq: Some(1)
            })]
        );
    }
}
