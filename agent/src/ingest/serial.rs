//! Serial ingest: newline-delimited JSON readings (`framing = "json-lines"`) or the binary
//! firmware protocol (`framing = "binary"`, see [`super::binary`]) from any number of ports.
//!
//! One task per port, so a port that fails never stops the others. A port that disappears
//! (USB unplugged, device reset) is reopened with capped exponential backoff for as long as
//! the agent runs. All complete lines from one read are committed in one append; the next
//! read waits for that commit, so a full buffer stops reading the port (the device's UART
//! and kernel buffers hold the rest). A line that is too long or not a reading is
//! dead-lettered with its raw bytes, and the port keeps reading.

use super::binary::BinaryPort;
use super::{Route, commit, to_entry};
use crate::backoff::Backoff;
use crate::buffer::{Buffer, Entry, NewDeadLetter};
use crate::config::{Config, SerialFraming, SerialPortConfig};
use crate::metrics::{Metrics, PortLabel};
use crate::reading::{Origin, now_ms};
use crate::watchdog::Heartbeat;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A complete line from the port, or the start of one that exceeded the limit.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    TooLong { prefix: Vec<u8>, len: usize },
}

/// Splits a byte stream into lines (`\n`, an optional `\r` before it is dropped) without
/// ever holding more than `max` bytes of one line. Pure: no I/O.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    current: Vec<u8>,
    /// Length of an over-long line being skipped, if any.
    skipping: Option<usize>,
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            max,
            current: Vec::new(),
            skipping: None,
        }
    }

    /// Feeds bytes; returns the lines they completed.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (chunk, rest, ended) = match bytes.iter().position(|b| *b == b'\n') {
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
                let line = std::mem::take(&mut self.current);
                match self.skipping.take() {
                    Some(len) => out.push(Line::TooLong { prefix: line, len }),
                    None => {
                        let mut line = line;
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                        // Blank lines (keep-alives, CRLF pairs) are not readings.
                        if !line.iter().all(u8::is_ascii_whitespace) {
                            out.push(Line::Complete(line));
                        }
                    }
                }
            }
        }
        out
    }
}

/// The task for one port.
pub struct SerialIngest {
    port: SerialPortConfig,
    gateway_id: String,
    max_payload_bytes: usize,
    route: Route,
    buffer: Buffer,
    metrics: Arc<Metrics>,
}

impl SerialIngest {
    pub fn new(config: &Config, port: SerialPortConfig, buffer: Buffer, metrics: Arc<Metrics>) -> SerialIngest {
        SerialIngest {
            max_payload_bytes: port.max_line_bytes,
            port,
            gateway_id: config.gateway.id.clone(),
            route: Route {
                readings_exchange: config.amqp.readings_exchange.clone(),
            },
            buffer,
            metrics,
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::info_span!(
            "serial",
            port = %self.port.path.display(),
            device_id = self.port.device_id.as_deref().unwrap_or("")
        );
        self.read_port(cancel).instrument(span).await
    }

    async fn read_port(self, cancel: CancellationToken) {
        let path = self.port.path.display().to_string();
        let label = PortLabel { port: path.clone() };
        let mut backoff = Backoff::new(self.port.reopen_min, self.port.reopen_max);
        let mut lost_since: Option<std::time::Instant> = None;
        let mut binary = (self.port.framing == SerialFraming::Binary).then(|| {
            BinaryPort::new(
                path.clone(),
                self.port.device_id.clone(),
                self.gateway_id.clone(),
                self.route.clone(),
                self.metrics.clone(),
            )
        });
        // A quiet port and the reopen backoff are idle time; a commit that never ends is not.
        let heartbeat = self.metrics.stages.register(&format!("serial port {path}"));
        while !cancel.is_cancelled() {
            heartbeat.beat();
            let opened = tokio_serial::new(&path, self.port.baud_rate).open_native_async();
            let mut stream = match opened {
                Ok(s) => s,
                Err(e) => {
                    if lost_since.is_none() {
                        lost_since = Some(std::time::Instant::now());
                        tracing::warn!(error = %e, "serial port cannot be opened; retrying with backoff");
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = heartbeat.idle(tokio::time::sleep(delay)) => continue,
                    }
                }
            };
            match lost_since.take() {
                Some(t) => tracing::info!(down_for = ?t.elapsed(), "serial port reopened"),
                None => tracing::info!(baud_rate = self.port.baud_rate, "serial port open"),
            }
            self.metrics.serial_port_open.get_or_create(&label).set(1);
            backoff.reset();
            let reason = match binary.as_mut() {
                Some(b) => b.session(&mut stream, &self.buffer, &cancel, &heartbeat).await,
                None => self.json_lines(&mut stream, &cancel, &path, &heartbeat).await,
            };
            self.metrics.serial_port_open.get_or_create(&label).set(0);
            match reason {
                None => break,
                Some(reason) => {
                    self.metrics.serial_reopens.get_or_create(&label).inc();
                    lost_since = Some(std::time::Instant::now());
                    tracing::warn!(%reason, "serial port lost; reopening with backoff");
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = heartbeat.idle(tokio::time::sleep(delay)) => {}
                    }
                }
            }
        }
        tracing::info!("serial ingest stopped");
    }

    /// Newline-delimited JSON until the port fails (`Some(reason)`) or the agent stops.
    async fn json_lines(
        &self,
        stream: &mut tokio_serial::SerialStream,
        cancel: &CancellationToken,
        path: &str,
        heartbeat: &Heartbeat,
    ) -> Option<String> {
        let mut splitter = LineSplitter::new(self.port.max_line_bytes);
        let mut buf = vec![0u8; 4096];
        loop {
            heartbeat.beat();
            let n = match read_chunk(stream, &mut buf, cancel, heartbeat).await {
                Ok(n) => n,
                Err(why) => return why,
            };
            let entries: Vec<Entry> = splitter
                .push(&buf[..n])
                .into_iter()
                .map(|l| self.entry_for(l, path))
                .collect();
            if entries.is_empty() {
                continue;
            }
            let readings = entries.iter().filter(|e| e.is_record()).count() as u64;
            commit(&self.buffer, entries, cancel, "serial", heartbeat).await?;
            self.metrics.accepted("serial", readings);
        }
    }

    fn entry_for(&self, line: Line, path: &str) -> Entry {
        let source = format!("serial:{path}");
        match line {
            Line::Complete(bytes) => {
                let origin = Origin {
                    device_id: self.port.device_id.as_deref(),
                    sensor: None,
                    source: &source,
                    gateway_id: &self.gateway_id,
                    received_ms: now_ms(),
                };
                let mut entry = to_entry(
                    &bytes,
                    &origin,
                    self.max_payload_bytes,
                    &self.route,
                    "serial",
                    &self.metrics,
                );
                if let Entry::DeadLetter(d) = &mut entry {
                    d.origin = path.to_string();
                }
                entry
            }
            Line::TooLong { prefix, len } => {
                self.metrics.dead_letter("serial", "too_large");
                tracing::warn!(
                    bytes = len,
                    limit = self.port.max_line_bytes,
                    "serial line too long; dead-lettered"
                );
                Entry::DeadLetter(NewDeadLetter {
                    source: "serial".into(),
                    origin: path.to_string(),
                    device_id: self.port.device_id.clone(),
                    sensor: None,
                    reason: format!(
                        "line of {len} bytes exceeds serial max_line_bytes {} (first {} bytes kept)",
                        self.port.max_line_bytes,
                        prefix.len()
                    ),
                    raw: prefix,
                })
            }
        }
    }
}

/// Reads the next chunk of a port into `buf`: `Ok(n)`, or `Err(None)` when cancelled and
/// `Err(Some(why))` when the stream ended or failed (the port is then reopened). A quiet
/// port is idle time for the watchdog.
pub(crate) async fn read_chunk<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    cancel: &CancellationToken,
    heartbeat: &Heartbeat,
) -> Result<usize, Option<String>> {
    let n = tokio::select! {
        _ = cancel.cancelled() => return Err(None),
        r = heartbeat.idle(stream.read(buf)) => r,
    };
    match n {
        Ok(0) => Err(Some("end of stream".to_string())),
        Ok(n) => Ok(n),
        Err(e) => Err(Some(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_reads() {
        let mut s = LineSplitter::new(100);
        assert_eq!(
            s.push(b"{\"value\":1}\r\n{\"val"),
            vec![Line::Complete(b"{\"value\":1}".to_vec())]
        );
        assert_eq!(s.push(b"ue\":2}\n\n"), vec![Line::Complete(b"{\"value\":2}".to_vec())]);
    }

    #[test]
    fn overlong_lines_are_cut_and_the_stream_resyncs() {
        let mut s = LineSplitter::new(4);
        assert_eq!(s.push(b"abcdefgh"), vec![]);
        assert_eq!(
            s.push(b"ij\n12\n"),
            vec![
                Line::TooLong {
                    prefix: b"abcd".to_vec(),
                    len: 10
                },
                Line::Complete(b"12".to_vec())
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn never_holds_more_than_max_and_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..32)) {
            let mut s = LineSplitter::new(16);
            for c in &chunks {
                for line in s.push(c) {
                    match line {
                        Line::Complete(l) => proptest::prop_assert!(l.len() <= 16 && !l.contains(&b'\n')),
                        Line::TooLong { prefix, len } => proptest::prop_assert!(prefix.len() == 16 && len > 16),
                    }
                }
                proptest::prop_assert!(s.current.len() <= 16);
            }
        }
    }
}
