//! Inputs: MQTT and serial ports. Both follow one rule: an input is acknowledged (MQTT
//! PUBACK) or the next one read (serial) only after it is committed in the buffer, as a
//! reading or as a dead letter. This module holds what they share: turning a payload into
//! a buffer entry, and holding input while the buffer is full.

pub mod binary;
pub mod mqtt;
pub mod serial;

use crate::buffer::{self, Buffer, Entry, NewDeadLetter, NewRecord};
use crate::metrics::Metrics;
use crate::reading::{Origin, Reading, RejectReason};
use crate::watchdog::Heartbeat;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where readings go: the exchange name, shared by every input.
#[derive(Debug, Clone)]
pub struct Route {
    pub readings_exchange: String,
}

/// The buffer entry for one payload: a record, or a dead letter saying why not.
pub fn to_entry(
    payload: &[u8],
    origin: &Origin<'_>,
    max_bytes: usize,
    route: &Route,
    source: &str,
    metrics: &Metrics,
) -> Entry {
    match Reading::parse(payload, origin, max_bytes) {
        Ok(reading) => Entry::Reading(record(&reading, route), Box::new(reading)),
        Err(reason) => {
            metrics.dead_letter(source, reason_class(&reason));
            tracing::warn!(source, origin = origin.source, %reason, bytes = payload.len(), "input dead-lettered");
            Entry::DeadLetter(NewDeadLetter {
                source: source.to_string(),
                origin: origin.source.to_string(),
                device_id: origin.device_id.map(str::to_string),
                sensor: origin.sensor.map(str::to_string),
                reason: reason.to_string(),
                raw: payload.to_vec(),
            })
        }
    }
}

/// The buffered form of a reading: its JSON, routed on the readings exchange.
pub fn record(reading: &Reading, route: &Route) -> NewRecord {
    NewRecord {
        message_id: reading.message_id.clone(),
        exchange: route.readings_exchange.clone(),
        routing_key: reading.routing_key(),
        device_id: reading.device_id.clone(),
        // Serializing a struct of strings and numbers cannot fail.
        payload: serde_json::to_vec(reading).unwrap_or_default(),
    }
}

/// A short, fixed label for metrics.
pub fn reason_class(r: &RejectReason) -> &'static str {
    match r {
        RejectReason::Empty => "empty",
        RejectReason::TooLarge { .. } => "too_large",
        RejectReason::NotUtf8(_) => "not_utf8",
        RejectReason::InvalidJson(_) => "invalid_json",
        RejectReason::ValueNotNumber(_) | RejectReason::ValueMissing | RejectReason::FieldType { .. } => "bad_field",
        RejectReason::ValueNotFinite(_) => "not_finite",
        RejectReason::MissingIdentity(_) => "no_identity",
        RejectReason::BadTimestamp(_) => "bad_timestamp",
    }
}

/// Appends `entries`, waiting while the buffer is full (back-pressure) and retrying storage
/// errors, until committed or cancelled. Returns `None` only when cancelled: the input was
/// not committed and must not be acknowledged.
///
/// For the watchdog, waiting for room (the broker has to take messages first) and the pause
/// between retries are idle time and beat `heartbeat`; a commit that never answers is not.
pub async fn commit(
    buffer: &Buffer,
    entries: Vec<Entry>,
    cancel: &CancellationToken,
    what: &str,
    heartbeat: &Heartbeat,
) -> Option<buffer::AppendReport> {
    let queued = buffer.queue(entries.clone()).await;
    finish_commit(buffer, queued, entries, cancel, what, heartbeat).await
}

/// Waits for an append already queued (in arrival order) and, if it was refused or
/// failed, retries it as [`commit`] does.
pub async fn finish_commit(
    buffer: &Buffer,
    queued: Result<buffer::Queued, buffer::Error>,
    entries: Vec<Entry>,
    cancel: &CancellationToken,
    what: &str,
    heartbeat: &Heartbeat,
) -> Option<buffer::AppendReport> {
    let mut logged = false;
    let mut attempt = match queued {
        Ok(q) => q.committed().await,
        Err(e) => Err(e),
    };
    loop {
        let err = match attempt {
            Ok(report) => {
                if logged {
                    tracing::info!(input = what, "buffer accepts input again");
                }
                return Some(report);
            }
            Err(buffer::Error::Closed) => return None,
            Err(e) => e,
        };
        if !logged {
            tracing::warn!(input = what, error = %err, "holding input");
            logged = true;
        }
        let wait = async {
            match err {
                buffer::Error::Full { .. } => {
                    // Released rows wake us; the timeout covers space freed by others.
                    let _ = tokio::time::timeout(Duration::from_millis(500), buffer.wait_for_space()).await;
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = heartbeat.idle(wait) => {}
        }
        attempt = buffer.append(entries.clone()).await;
    }
}
