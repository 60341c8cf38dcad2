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

/// Commits `entries` one at a time, in order; `None` if cancelled before all were committed.
async fn commit_each(
    buffer: &Buffer,
    entries: Vec<Entry>,
    cancel: &CancellationToken,
    what: &str,
    heartbeat: &Heartbeat,
) -> Option<buffer::AppendReport> {
    let mut total = buffer::AppendReport::default();
    for entry in entries {
        // Boxed: commit can come back here (for a batch; this passes single entries).
        let r = Box::pin(commit(buffer, vec![entry], cancel, what, heartbeat)).await?;
        total.inserted += r.inserted;
        total.duplicates += r.duplicates;
        total.dead_letters += r.dead_letters;
    }
    Some(total)
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
        if matches!(err, buffer::Error::Full { .. }) && entries.len() > 1 {
            // An append is admitted whole or not at all. A batch bigger than the room left
            // goes in one entry at a time, in order, so the buffer fills up to its cap and
            // only the rest waits (a batch bigger than the cap would never fit whole).
            return commit_each(buffer, entries, cancel, what, heartbeat).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::tests::record;
    use crate::config::{BufferConfig, OverflowPolicy};
    use std::sync::Arc;

    async fn pending_ids(buffer: &Buffer) -> Vec<(i64, String)> {
        let rows = buffer.load_after(0, 100).await.expect("load");
        rows.into_iter().map(|r| (r.id, r.message_id)).collect()
    }

    /// A batch of five into a buffer with room for three (refuse policy): the first three go
    /// in, the last two wait, and go in, in order, once the publisher released rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_bigger_than_the_room_left_fills_the_buffer_and_the_rest_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = BufferConfig {
            max_readings: 3,
            overflow: OverflowPolicy::Refuse,
            ..BufferConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let (buffer, _writer) = Buffer::open(dir.path(), &cfg, metrics.clone()).expect("open");
        let heartbeat = metrics.stages.register("test ingest");
        let task = {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                let cancel = CancellationToken::new();
                commit(&buffer, (0..5).map(record).collect(), &cancel, "test", &heartbeat).await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while buffer.pending() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "the buffer never filled up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = pending_ids(&buffer).await;
        let names: Vec<&str> = first.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(names, ["m0", "m1", "m2"]);
        assert!(
            !task.is_finished(),
            "the batch was reported committed while two entries had no room"
        );

        buffer
            .release(first.iter().map(|(id, _)| *id).collect())
            .await
            .expect("release");
        let report = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the rest of the batch went in after the release")
            .expect("task")
            .expect("committed, not cancelled");
        assert_eq!(report.inserted, 5);
        let rest = pending_ids(&buffer).await;
        let names: Vec<&str> = rest.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(names, ["m3", "m4"]);
    }
}
