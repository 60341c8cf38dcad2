//! Serial output: a pseudo-terminal the simulator creates (the agent opens its path) or an
//! existing serial device, in either framing.
//!
//! - `json-lines`: one JSON reading per line, `seq` numbering each device's readings.
//! - `binary`: the firmware protocol. Each device tick becomes one DATA frame with the
//!   readings of all its sensors; each device is a [`Firmware`]: it keeps its frames until
//!   acknowledged, retransmits, and resumes its sequence numbers from `--state`. All the
//!   fleet's devices share the one line, as behind a multiplexer; each acts only on the
//!   answers that name it.

use crate::firmware::{Answered, Firmware, SeqStore};
use crate::inject::{BadInputKind, Injector};
use crate::model::{Fleet, SimReading, Tick};
use crate::report::Report;
use crate::run::{Plan, Schedule};
use crate::{Stop, now_ms};
use edgecase_protocol::{self as protocol, Data, Deframer, Message, RawFrame};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    #[default]
    JsonLines,
    Binary,
}

impl std::str::FromStr for Framing {
    type Err = String;
    fn from_str(s: &str) -> Result<Framing, String> {
        match s {
            "json-lines" => Ok(Framing::JsonLines),
            "binary" => Ok(Framing::Binary),
            other => Err(format!("unknown framing {other:?}: json-lines or binary")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SerialOptions {
    pub framing: Framing,
    /// Frames a device may have unacknowledged (1 to 8).
    pub window: usize,
    pub ack_timeout: Duration,
    pub ack_timeout_max: Duration,
    /// Where sequence numbers survive a restart (binary).
    pub state: Option<PathBuf>,
    /// First sequence number of a device the state file does not know; default random.
    pub seq_start: Option<u32>,
    /// Leave the device id out (the agent's port config supplies it).
    pub omit_device_id: bool,
    /// After the last reading, how long to wait for the outstanding ACKs (binary).
    pub drain: Duration,
}

impl Default for SerialOptions {
    fn default() -> SerialOptions {
        SerialOptions {
            framing: Framing::JsonLines,
            window: 1,
            ack_timeout: crate::firmware::ACK_TIMEOUT,
            ack_timeout_max: crate::firmware::ACK_TIMEOUT_MAX,
            state: None,
            seq_start: None,
            omit_device_id: false,
            drain: Duration::from_secs(30),
        }
    }
}

/// A pseudo-terminal pair: the agent opens `path` (the slave), the simulator writes to and
/// reads from the master. The slave is held open (so the line never hangs up while the
/// agent reopens it) and set to raw mode before anyone uses it, so no byte is translated
/// or echoed.
pub struct Pty {
    master: File,
    _slave: OwnedFd,
    pub path: PathBuf,
}

impl Pty {
    pub fn create() -> io::Result<Pty> {
        use nix::fcntl::OFlag;
        use std::os::unix::fs::OpenOptionsExt;
        // Close-on-exec, so that child processes do not inherit the line.
        let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
        nix::pty::grantpt(&master)?;
        nix::pty::unlockpt(&master)?;
        let path = PathBuf::from(nix::pty::ptsname_r(&master)?);
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY)
            .open(&path)?;
        let mut t = nix::sys::termios::tcgetattr(&slave)?;
        nix::sys::termios::cfmakeraw(&mut t);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t)?;
        Ok(Pty {
            master: File::from(OwnedFd::from(master)),
            _slave: OwnedFd::from(slave),
            path,
        })
    }

    /// Another handle on the master side.
    pub fn master(&self) -> io::Result<File> {
        self.master.try_clone()
    }
}

/// The device's end of the line.
pub struct Link {
    writer: Box<dyn Write + Send>,
    reader: Box<dyn Read + Send>,
    /// For a pty: the descriptor to wait on when a read would block.
    readable: Option<OwnedFd>,
}

impl Link {
    /// The master side of `p`, non-blocking: a line nobody reads (the agent is away) must
    /// not stop the devices' clocks, as a UART would not.
    pub fn pty(p: &Pty) -> io::Result<Link> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let master = p.master()?;
        let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
        fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Link {
            writer: Box::new(master),
            reader: Box::new(p.master()?),
            readable: Some(OwnedFd::from(p.master()?)),
        })
    }

    pub fn device(path: &Path, baud_rate: u32) -> io::Result<Link> {
        let port = serialport::new(path.to_string_lossy(), baud_rate)
            .timeout(Duration::from_millis(200))
            .open()
            .map_err(|e| io::Error::other(format!("cannot open serial port {}: {e}", path.display())))?;
        let reader = port.try_clone().map_err(io::Error::other)?;
        Ok(Link {
            writer: Box::new(port),
            reader: Box::new(reader),
            readable: None,
        })
    }

    /// Reads answers on a thread: decoded messages arrive on the channel. Bytes that do not
    /// decode are skipped, as firmware would.
    fn answers(reader: Box<dyn Read + Send>, readable: Option<OwnedFd>) -> mpsc::Receiver<Option<Message>> {
        let (tx, rx) = mpsc::channel();
        let mut reader = reader;
        std::thread::spawn(move || {
            let mut deframer = Deframer::default();
            let mut buf = [0u8; 2048];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => std::thread::sleep(Duration::from_millis(50)),
                    Ok(n) => {
                        for f in deframer.push(&buf[..n]) {
                            if let RawFrame::Frame(f) = f
                                && let Ok(m) = protocol::decode(&f)
                                && tx.send(Some(m)).is_err()
                            {
                                return;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => match &readable {
                        Some(fd) => {
                            use std::os::fd::AsFd;
                            let mut fds = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
                            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
                        }
                        None => std::thread::sleep(Duration::from_millis(5)),
                    },
                    Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // A pty whose other side is not open reads EIO: wait and retry, and
                        // stop once the simulator is done with the channel.
                        std::thread::sleep(Duration::from_millis(50));
                        if tx.send(None).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        rx
    }
}

/// Sends the fleet's readings until the plan is done or `stop` is set; with the binary
/// framing, then waits (up to `drain`) for the outstanding acknowledgements.
pub fn run(
    link: Link,
    mut fleet: Fleet,
    plan: &Plan,
    mut injector: Injector,
    opts: &SerialOptions,
    report: &Report,
    stop: &Stop,
) -> io::Result<()> {
    let paced = plan.apply(&mut fleet);
    let Link {
        writer,
        reader,
        readable,
    } = link;
    let mut outbox = Outbox {
        w: writer,
        pending: Vec::new(),
    };
    let mut out = Output {
        writer: &mut outbox,
        report,
        opts,
        json_seq: HashMap::new(),
        held: None,
    };
    let start = Instant::now();
    let mut schedule = Schedule::new(&fleet, paced, start);
    if opts.framing == Framing::JsonLines {
        while !stop.load(Ordering::Relaxed) && !plan.done(report.readings_sent(), start.elapsed()) {
            // The line is full (nobody reads it): wait, as a UART's sender would.
            if out.writer.backlog() > BACKLOG_MAX {
                out.writer.flush()?;
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match schedule.pop_due(Instant::now()) {
                Some(i) => {
                    let tick = fleet.tick(i);
                    out.json_tick(tick, plan, &mut injector)?;
                }
                None => {
                    if let Some(due) = schedule.next_due() {
                        std::thread::sleep(
                            due.saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(100)),
                        );
                    }
                }
            }
        }
        out.flush_held()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.writer.backlog() > 0 && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            out.writer.flush()?;
            std::thread::sleep(Duration::from_millis(2));
        }
        return Ok(());
    }

    // Binary: the devices are firmware.
    let mut store = match &opts.state {
        Some(p) => Some(SeqStore::open(p)?),
        None => None,
    };
    let default_start = opts
        .seq_start
        .unwrap_or_else(|| crate::model::Rng::new(now_ms() ^ u64::from(std::process::id())).next_u64() as u32);
    let mut devices = Vec::with_capacity(fleet.len());
    let mut by_id = HashMap::new();
    for i in 0..fleet.len() {
        let id = fleet.device_id(i).to_string();
        let first = match store.as_mut() {
            Some(s) => s.resume(&id, default_start)?,
            None => default_start,
        };
        let wire_id = if opts.omit_device_id { String::new() } else { id.clone() };
        by_id.insert(wire_id.clone(), i);
        devices.push(Firmware::new(&wire_id, first, opts.window).with_timeouts(opts.ack_timeout, opts.ack_timeout_max));
    }
    let answers = Link::answers(reader, readable);
    // A lone delimiter first, as after a reset (section 7.4).
    out.writer.write_all(&[0])?;
    let mut drain_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let producing = !stop.load(Ordering::Relaxed) && !plan.done(report.readings_sent(), start.elapsed());
        if producing {
            let mut made = 0;
            while made < devices.len().max(1) {
                let Some(i) = (if paced || devices.iter().any(Firmware::has_room) {
                    schedule.pop_due(now)
                } else {
                    None
                }) else {
                    break;
                };
                if !paced && !devices[i].has_room() {
                    continue;
                }
                let tick = fleet.tick(i);
                out.binary_tick(tick, &mut devices[i], plan, &mut injector)?;
                made += 1;
                if plan.done(report.readings_sent(), start.elapsed()) {
                    break;
                }
            }
        } else {
            let outstanding: usize = devices.iter().map(Firmware::unacked).sum();
            if outstanding == 0 || stop.load(Ordering::Relaxed) && drain_until.is_none() && opts.drain.is_zero() {
                break;
            }
            let until = *drain_until.get_or_insert_with(|| {
                if stop.load(Ordering::Relaxed) {
                    eprintln!(
                        "edgecase-sim: stopping; waiting up to {:?} for {outstanding} unacknowledged frame(s) (Ctrl-C again to quit)",
                        opts.drain
                    );
                }
                now + opts.drain
            });
            if now >= until {
                eprintln!(
                    "edgecase-sim: {outstanding} frame(s) still unacknowledged after waiting {:?}",
                    opts.drain
                );
                break;
            }
        }
        // While the line is full, the devices hold their frames (their timers run on).
        let line_free = out.writer.backlog() <= BACKLOG_MAX;
        for d in devices.iter_mut().filter(|_| line_free) {
            let before = d.stats.retransmissions;
            let due = d.due(now);
            let retrans = d.stats.retransmissions - before;
            if !due.is_empty() {
                report.transmitted(due.len() as u64, retrans);
                for w in due {
                    out.writer.write_all(&w)?;
                }
            }
        }
        out.writer.flush()?;
        if let Some(store) = store.as_mut() {
            for d in &devices {
                store.advance(&d.device_id_or(&fleet, &by_id), d.next_seq())?;
            }
        }
        // Wait for an answer, the next tick or the next retransmission.
        let mut wake = now + Duration::from_millis(if out.writer.backlog() > 0 { 2 } else { 50 });
        if producing && let Some(due) = schedule.next_due() {
            wake = wake.min(due);
        }
        for d in &devices {
            if let Some(t) = d.next_deadline() {
                wake = wake.min(t);
            }
        }
        let first = answers.recv_timeout(wake.saturating_duration_since(Instant::now()));
        let mut handle = |m: Option<Message>| match &m {
            None => {}
            Some(m @ Message::Ack(a)) => {
                if let Some(&i) = by_id.get(&a.device_id)
                    && let Answered::Acked(n) = devices[i].on_answer(m)
                {
                    report.acked(1, n as u64);
                }
            }
            Some(m @ Message::Nack(n)) => {
                let targets: Vec<usize> = match n.device_id.as_deref().and_then(|d| by_id.get(d)) {
                    Some(&i) => vec![i],
                    None => (0..devices.len()).collect(),
                };
                let mut dropped = false;
                for i in targets {
                    dropped |= devices[i].on_answer(m) == Answered::Dropped;
                }
                report.nacked(dropped);
            }
            Some(Message::Data(_)) => {}
        };
        match first {
            Ok(m) => {
                handle(m);
                while let Ok(m) = answers.try_recv() {
                    handle(m);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(io::Error::other("the serial line closed")),
        }
    }
    if let Some(store) = store.as_mut() {
        for d in &devices {
            store.advance(&d.device_id_or(&fleet, &by_id), d.next_seq())?;
        }
    }
    Ok(())
}

impl Firmware {
    /// The fleet's id of this device (its wire id may be empty).
    fn device_id_or(&self, fleet: &Fleet, by_id: &HashMap<String, usize>) -> String {
        match by_id.get(&self.device_id) {
            Some(&i) if self.device_id.is_empty() => fleet.device_id(i).to_string(),
            _ => self.device_id.clone(),
        }
    }
}

/// Bytes waiting for room on the line: writes never block the devices.
struct Outbox {
    w: Box<dyn Write + Send>,
    pending: Vec<u8>,
}

/// Above this, the devices stop adding to the line until it drains.
const BACKLOG_MAX: usize = 64 * 1024;

impl Outbox {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(bytes);
        self.flush()
    }

    /// Writes what the line takes now.
    fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            match self.w.write(&self.pending) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        match self.w.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::TimedOut => Err(e),
            _ => Ok(()),
        }
    }

    fn backlog(&self) -> usize {
        self.pending.len()
    }
}

struct Output<'a> {
    writer: &'a mut Outbox,
    report: &'a Report,
    opts: &'a SerialOptions,
    /// JSON lines: each device's next reading number.
    json_seq: HashMap<String, u64>,
    /// JSON lines: a line held back to go after the next one (out-of-order injection).
    held: Option<Vec<u8>>,
}

impl Output<'_> {
    fn json_line(&self, r: &SimReading, seq: u64, ts_ms: u64, value: serde_json::Value) -> Vec<u8> {
        let mut obj = serde_json::json!({ "sensor": r.sensor, "value": value, "seq": seq, "ts": ts_ms });
        if let Some(map) = obj.as_object_mut() {
            if !self.opts.omit_device_id {
                map.insert("device_id".into(), r.device.clone().into());
            }
            if let Some(u) = &r.unit {
                map.insert("unit".into(), u.clone().into());
            }
        }
        let mut line = obj.to_string().into_bytes();
        line.push(b'\n');
        line
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        if let Some(h) = self.held.take() {
            self.writer.write_all(&h)?;
        }
        Ok(())
    }

    fn flush_held(&mut self) -> io::Result<()> {
        if let Some(h) = self.held.take() {
            self.writer.write_all(&h)?;
        }
        Ok(())
    }

    fn json_tick(&mut self, tick: Tick, plan: &Plan, injector: &mut Injector) -> io::Result<()> {
        self.report.silent(tick.dropped.len() as u64);
        let room = plan.room(self.report.readings_sent());
        let ts_ms = now_ms();
        for r in tick.readings.into_iter().take(room) {
            let seq = {
                let s = self
                    .json_seq
                    .entry(r.device.clone())
                    .or_insert(self.opts.seq_start.unwrap_or(0).into());
                *s += 1;
                *s - 1
            };
            let line = self.json_line(&r, seq, ts_ms, r.value.into());
            let mut hold = false;
            for kind in injector.decide(&r.device, tick.t) {
                let bad = match kind {
                    BadInputKind::MalformedJson => Some(line[..line.len() / 2].iter().chain(b"\n").copied().collect()),
                    BadInputKind::Truncated => Some(line[..line.len() / 3].iter().chain(b"\n").copied().collect()),
                    BadInputKind::WrongType => Some(self.json_line(&r, seq, ts_ms, "hot".into())),
                    BadInputKind::Garbage => {
                        let mut g: Vec<u8> = injector.garbage(24).into_iter().filter(|b| *b != b'\n').collect();
                        g.push(b'\n');
                        Some(g)
                    }
                    BadInputKind::Duplicate => Some(line.clone()),
                    BadInputKind::OutOfOrder => {
                        hold = true;
                        None
                    }
                    // No CRC on a JSON line.
                    BadInputKind::Crc => continue,
                };
                self.report.injected(kind, &r.device, Some(seq));
                if let Some(bad) = bad {
                    if kind == BadInputKind::Duplicate {
                        // After the real line, as a resend would be.
                        self.held = Some(bad);
                    } else {
                        self.writer.write_all(&bad)?;
                    }
                }
            }
            self.report.reading(&r, seq, ts_ms);
            self.report.message();
            if hold && self.held.is_none() {
                self.held = Some(line);
            } else {
                self.write(&line)?;
            }
        }
        Ok(())
    }

    fn binary_tick(&mut self, tick: Tick, fw: &mut Firmware, plan: &Plan, injector: &mut Injector) -> io::Result<()> {
        self.report.silent(tick.dropped.len() as u64);
        let room = plan.room(self.report.readings_sent());
        let readings: Vec<SimReading> = tick.readings.into_iter().take(room).collect();
        if readings.is_empty() {
            return Ok(());
        }
        let ts_ms = now_ms();
        let wire_readings = |rs: &[SimReading]| -> Vec<protocol::Reading> {
            rs.iter()
                .map(|r| protocol::Reading {
                    sensor: r.sensor.clone(),
                    value: r.value,
                    unit: r.unit.clone(),
                    age_ms: 0,
                })
                .collect()
        };
        let kinds = injector.decide(&tick.device, tick.t);
        // Frames the agent will reject as intact but unacceptable: sent besides the real one,
        // each with a sequence number of its own.
        for kind in &kinds {
            let body = match kind {
                BadInputKind::MalformedJson => {
                    let seq = fw.reserve_seq();
                    let mut b = protocol::body(&Message::Data(Data {
                        device_id: fw.device_id.clone(),
                        seq,
                        timestamp_ms: ts_ms,
                        readings: wire_readings(&readings),
                    }));
                    // A reading count the frame does not hold: the body does not decode.
                    b.truncate(b.len() - 3);
                    Some((seq, b))
                }
                BadInputKind::WrongType => {
                    let seq = fw.reserve_seq();
                    let mut rs = wire_readings(&readings);
                    rs[0].value = f64::NAN;
                    Some((
                        seq,
                        protocol::body(&Message::Data(Data {
                            device_id: fw.device_id.clone(),
                            seq,
                            timestamp_ms: ts_ms,
                            readings: rs,
                        })),
                    ))
                }
                _ => None,
            };
            if let Some((seq, body)) = body {
                self.report.injected(*kind, &tick.device, Some(u64::from(seq)));
                self.writer.write_all(&protocol::frame(&body))?;
            }
        }
        let out_of_order = kinds.contains(&BadInputKind::OutOfOrder);
        let (seq, wire) = fw.enqueue(wire_readings(&readings), ts_ms, out_of_order);
        for r in &readings {
            self.report.reading(r, u64::from(seq), ts_ms);
        }
        self.report.message();
        for kind in kinds {
            let damaged = match kind {
                BadInputKind::Crc => Some(damage_crc(&wire)),
                BadInputKind::Truncated => {
                    let mut t = wire[..wire.len() / 2].to_vec();
                    t.push(0);
                    Some(t)
                }
                BadInputKind::Garbage => {
                    let mut g = injector.garbage(5 + (seq as usize % 36));
                    g.push(0);
                    Some(g)
                }
                // Sent again after its first transmission, as after a lost ACK.
                BadInputKind::Duplicate => {
                    self.report.injected(kind, &tick.device, Some(u64::from(seq)));
                    fw.resend_first_time(seq);
                    None
                }
                BadInputKind::OutOfOrder => {
                    self.report.injected(kind, &tick.device, Some(u64::from(seq)));
                    None
                }
                BadInputKind::MalformedJson | BadInputKind::WrongType => None,
            };
            if let Some(d) = damaged {
                self.report.injected(kind, &tick.device, Some(u64::from(seq)));
                self.writer.write_all(&d)?;
            }
        }
        Ok(())
    }
}

/// The frame with its CRC damaged, as line noise would: it still decodes as COBS, and the
/// agent answers NACK 1.
pub fn damage_crc(wire: &[u8]) -> Vec<u8> {
    let Ok(mut raw) = cobs::decode_vec(&wire[..wire.len().saturating_sub(1)]) else {
        return wire.to_vec();
    };
    if let Some(last) = raw.last_mut() {
        *last ^= 0x5A;
    }
    let mut out = cobs::encode_vec(&raw);
    out.push(0);
    out
}
