//! The device side of the binary serial protocol, as `docs/serial-protocol.md` section 7
//! tells firmware to behave: frames are numbered per device, kept until acknowledged,
//! retransmitted byte for byte after a timeout that doubles from 1 s to 8 s, at once on a
//! NACK below 16, dropped on a NACK of 16 or more; at most `window` frames are unanswered.
//! Sequence numbers resume after a restart from a state file, reserved in blocks of 256 as
//! the document suggests.
//!
//! Pure state machine (no I/O, time passed in), so the serial driver, the demo and tests
//! drive it alike.

use edgecase_protocol::{self as protocol, Data, Message, NackReason, Reading};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The document's timeouts.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(1000);
pub const ACK_TIMEOUT_MAX: Duration = Duration::from_millis(8000);
/// Sequence numbers reserved in the state file at a time.
pub const SEQ_BLOCK: u32 = 256;
/// The most frames one device keeps waiting for an ACK; beyond, the oldest is given up.
pub const QUEUE_MAX: usize = 10_000;

#[derive(Debug, Clone)]
struct Pending {
    seq: u32,
    wire: Vec<u8>,
    readings: usize,
    sent_at: Option<Instant>,
    timeout: Duration,
    attempts: u32,
    /// A NACK asked for it again: send without waiting for the timeout.
    now: bool,
    /// Bad-input injection: send the first transmission twice.
    twice: bool,
}

/// What an answer did to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// A frame of this many readings was acknowledged.
    Acked(usize),
    /// A NACK for damage: the unacknowledged frames go again now.
    Retransmit,
    /// A NACK of 16 or more: the frame was given up.
    Dropped,
    /// Not for this device, or for no frame it holds.
    Ignored,
}

/// What happened to one device's frames, for the summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    pub frames: u64,
    pub transmissions: u64,
    pub retransmissions: u64,
    pub acked: u64,
    pub nacks_retransmit: u64,
    pub nacks_dropped: u64,
    pub given_up: u64,
}

/// One simulated device's protocol state.
#[derive(Debug)]
pub struct Firmware {
    pub device_id: String,
    next_seq: u32,
    /// Out-of-order injection: the sequence number the next frame takes, held back.
    backfill: Option<u32>,
    window: usize,
    queue: VecDeque<Pending>,
    pub stats: LinkStats,
    timeout: Duration,
    timeout_max: Duration,
}

impl Firmware {
    pub fn new(device_id: &str, first_seq: u32, window: usize) -> Firmware {
        Firmware {
            device_id: device_id.to_string(),
            next_seq: first_seq,
            backfill: None,
            window: window.clamp(1, 8),
            queue: VecDeque::new(),
            stats: LinkStats::default(),
            timeout: ACK_TIMEOUT,
            timeout_max: ACK_TIMEOUT_MAX,
        }
    }

    /// Shorter timeouts (tests, load runs against a local agent).
    pub fn with_timeouts(mut self, first: Duration, max: Duration) -> Firmware {
        self.timeout = first;
        self.timeout_max = max.max(first);
        self
    }

    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Frames sent or waiting, not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.queue.len()
    }

    fn take_seq(&mut self, out_of_order: bool) -> u32 {
        if let Some(s) = self.backfill.take() {
            return s;
        }
        let s = self.next_seq;
        if out_of_order {
            // This frame takes s + 1, the next one s: they arrive out of order.
            self.backfill = Some(s);
            self.next_seq = s.wrapping_add(2);
            return s.wrapping_add(1);
        }
        self.next_seq = s.wrapping_add(1);
        s
    }

    /// Builds the next frame from `readings` and queues it; returns its sequence number
    /// and wire bytes. `out_of_order` numbers this frame after the next one.
    pub fn enqueue(&mut self, readings: Vec<Reading>, timestamp_ms: u64, out_of_order: bool) -> (u32, Vec<u8>) {
        let seq = self.take_seq(out_of_order);
        let n = readings.len();
        let data = Data {
            device_id: self.device_id.clone(),
            seq,
            timestamp_ms,
            readings,
        };
        let wire = protocol::encode(&Message::Data(data.clone())).unwrap_or_else(|_| {
            // Above the limits: the simulator's own mistake; send it anyway, the agent
            // will NACK it (INVALID or TOO_LONG) and keep it as a dead letter.
            protocol::frame(&protocol::body(&Message::Data(data)))
        });
        if self.queue.len() >= QUEUE_MAX {
            self.queue.pop_front();
            self.stats.given_up += 1;
        }
        self.queue.push_back(Pending {
            seq,
            wire: wire.clone(),
            readings: n,
            sent_at: None,
            timeout: self.timeout,
            attempts: 0,
            now: false,
            twice: false,
        });
        self.stats.frames += 1;
        (seq, wire)
    }

    /// Frames to write now: new ones within the window, and those whose timeout ran out.
    pub fn due(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (i, p) in self.queue.iter_mut().enumerate() {
            if i >= self.window {
                break;
            }
            let send = match p.sent_at {
                None => true,
                Some(at) => p.now || now.saturating_duration_since(at) >= p.timeout,
            };
            p.now = false;
            if send {
                if p.sent_at.is_some() {
                    self.stats.retransmissions += 1;
                    p.timeout = (p.timeout * 2).min(self.timeout_max);
                }
                p.sent_at = Some(now);
                p.attempts += 1;
                self.stats.transmissions += 1;
                out.push(p.wire.clone());
                if std::mem::take(&mut p.twice) {
                    out.push(p.wire.clone());
                }
            }
        }
        out
    }

    /// When [`Firmware::due`] next has something to send, if anything is outstanding.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue
            .iter()
            .take(self.window)
            .filter_map(|p| p.sent_at.map(|at| if p.now { at } else { at + p.timeout }))
            .min()
    }

    /// Whether a new frame would be sent at once (room in the window).
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.window
    }

    /// Sends frame `seq` twice when it first goes out (a duplicate on the line, as when the
    /// device missed the ACK of the first copy).
    pub fn resend_first_time(&mut self, seq: u32) {
        if let Some(p) = self.queue.iter_mut().find(|p| p.seq == seq && p.sent_at.is_none()) {
            p.twice = true;
        }
    }

    /// Takes a sequence number for a frame built outside the queue (bad-input injection:
    /// a frame the agent will reject).
    pub fn reserve_seq(&mut self) -> u32 {
        self.take_seq(false)
    }

    /// Handles an answer from the agent.
    pub fn on_answer(&mut self, msg: &Message) -> Answered {
        match msg {
            Message::Ack(a) if a.device_id == self.device_id || a.device_id.is_empty() => {
                match self.queue.iter().position(|p| p.seq == a.seq) {
                    Some(i) => {
                        let p = self.queue.remove(i);
                        self.stats.acked += 1;
                        Answered::Acked(p.map_or(0, |p| p.readings))
                    }
                    None => Answered::Ignored,
                }
            }
            Message::Nack(n) => {
                let names_other = n
                    .device_id
                    .as_deref()
                    .is_some_and(|d| d != self.device_id && !d.is_empty());
                if names_other {
                    return Answered::Ignored;
                }
                let transmission = NackReason::from_code(n.reason).is_none_or(|r| r.is_transmission_error());
                if transmission {
                    // Retransmit the unacknowledged frames now: make them due.
                    self.stats.nacks_retransmit += 1;
                    for p in self.queue.iter_mut().take(self.window) {
                        p.now = p.sent_at.is_some();
                    }
                    Answered::Retransmit
                } else {
                    let i = match n.seq {
                        Some(seq) => self.queue.iter().position(|p| p.seq == seq),
                        None if self.queue.front().is_some_and(|p| p.sent_at.is_some()) => Some(0),
                        None => None,
                    };
                    match i {
                        Some(i) => {
                            self.queue.remove(i);
                            self.stats.nacks_dropped += 1;
                            Answered::Dropped
                        }
                        None => Answered::Ignored,
                    }
                }
            }
            _ => Answered::Ignored,
        }
    }
}

/// Where the devices' next sequence numbers survive a restart: a small JSON file
/// `{"device": next_seq, ...}` holding, for each device, the end of its reserved block.
#[derive(Debug)]
pub struct SeqStore {
    path: PathBuf,
    reserved: BTreeMap<String, u32>,
}

impl SeqStore {
    pub fn open(path: &Path) -> std::io::Result<SeqStore> {
        let reserved = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(SeqStore {
            path: path.to_path_buf(),
            reserved,
        })
    }

    /// The sequence number a device resumes from (the end of its last reserved block), or
    /// `default` for a device never seen; reserves the next block.
    pub fn resume(&mut self, device: &str, default: u32) -> std::io::Result<u32> {
        let start = self.reserved.get(device).copied().unwrap_or(default);
        self.reserved.insert(device.to_string(), start.wrapping_add(SEQ_BLOCK));
        self.save()?;
        Ok(start)
    }

    /// Call with each device's next sequence number after sending; reserves a new block
    /// when it reaches the end of the reserved one.
    pub fn advance(&mut self, device: &str, next_seq: u32) -> std::io::Result<()> {
        let end = self.reserved.get(device).copied().unwrap_or(0);
        // Distance left in the block, modulo 2^32.
        if end.wrapping_sub(next_seq) == 0 || end.wrapping_sub(next_seq) > SEQ_BLOCK {
            self.reserved
                .insert(device.to_string(), next_seq.wrapping_add(SEQ_BLOCK));
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.reserved).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgecase_protocol::{Ack, Nack};

    fn r(v: f64) -> Vec<Reading> {
        vec![Reading {
            sensor: "temp".into(),
            value: v,
            unit: None,
            age_ms: 0,
        }]
    }

    fn ack(seq: u32) -> Message {
        Message::Ack(Ack {
            device_id: "d1".into(),
            seq,
        })
    }

    #[test]
    fn waits_for_the_ack_and_retransmits_with_backoff() {
        let t0 = Instant::now();
        let mut f = Firmware::new("d1", 10, 1);
        let (s1, w1) = f.enqueue(r(1.0), 0, false);
        f.enqueue(r(2.0), 0, false);
        assert_eq!(s1, 10);
        assert_eq!(f.due(t0), vec![w1.clone()], "window 1: only the first");
        assert!(f.due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(f.due(t0 + Duration::from_millis(1000)), vec![w1.clone()], "same bytes");
        assert!(f.due(t0 + Duration::from_millis(2999)).is_empty(), "then 2 s");
        assert_eq!(f.due(t0 + Duration::from_millis(3000)).len(), 1);
        assert_eq!(f.next_deadline(), Some(t0 + Duration::from_millis(7000)));
        assert_eq!(f.on_answer(&ack(10)), Answered::Acked(1));
        let next = f.due(t0 + Duration::from_millis(3001));
        assert_eq!(next.len(), 1);
        assert_eq!(f.on_answer(&ack(11)), Answered::Acked(1));
        assert_eq!(f.unacked(), 0);
        assert_eq!(f.stats.retransmissions, 2);
    }

    #[test]
    fn nacks_retransmit_or_drop() {
        let t0 = Instant::now();
        let mut f = Firmware::new("d1", 0, 1);
        let (_, w) = f.enqueue(r(1.0), 0, false);
        f.due(t0);
        f.on_answer(&Message::Nack(Nack {
            reason: 1,
            device_id: None,
            seq: None,
        }));
        assert_eq!(f.due(Instant::now()), vec![w], "at once after NACK 1");
        f.on_answer(&Message::Nack(Nack {
            reason: 18,
            device_id: Some("d1".into()),
            seq: Some(0),
        }));
        assert_eq!(f.unacked(), 0, "dropped after NACK 18");
        assert_eq!((f.stats.nacks_retransmit, f.stats.nacks_dropped), (1, 1));
    }

    #[test]
    fn out_of_order_swaps_two_sequence_numbers() {
        let mut f = Firmware::new("d1", 5, 8);
        let seqs: Vec<u32> = [false, true, false, false]
            .iter()
            .map(|o| f.enqueue(r(0.0), 0, *o).0)
            .collect();
        assert_eq!(seqs, [5, 7, 6, 8]);
    }

    #[test]
    fn sequence_numbers_resume_from_the_state_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seq.json");
        let mut s = SeqStore::open(&path).expect("open");
        assert_eq!(s.resume("d1", 100).expect("resume"), 100);
        for next in 101..=400 {
            s.advance("d1", next).expect("advance");
        }
        // A restart (or a crash) after seq 399: resumes at or after 400, never before.
        let mut s = SeqStore::open(&path).expect("reopen");
        let resumed = s.resume("d1", 0).expect("resume");
        assert!((400..=400 + SEQ_BLOCK).contains(&resumed), "{resumed}");
    }
}
