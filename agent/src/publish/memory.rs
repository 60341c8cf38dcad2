//! An in-process stand-in for RabbitMQ, for `edgecase demo`: rows leave the buffer into a
//! bounded channel instead of a broker. The contract is the AMQP publisher's: a row is
//! released only after it was handed over (the channel accepted it), in buffer order, and
//! a full channel holds the rows in the buffer (back-pressure).

use crate::buffer::Buffer;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A message as a consumer of the broker would have received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    pub device_id: String,
    pub payload: Vec<u8>,
}

pub struct MemoryPublisher {
    buffer: Buffer,
    deliveries: mpsc::Sender<Delivery>,
    metrics: Arc<Metrics>,
}

impl MemoryPublisher {
    pub fn new(buffer: Buffer, deliveries: mpsc::Sender<Delivery>, metrics: Arc<Metrics>) -> MemoryPublisher {
        MemoryPublisher {
            buffer,
            deliveries,
            metrics,
        }
    }

    pub async fn run(self, cancel: CancellationToken) {
        self.metrics.amqp_connected.set(1);
        let mut cursor = 0;
        self.deliver(&mut cursor, &cancel).await;
        // Ingest has stopped before the output is cancelled: hand over what is left, so the
        // demo ends with an empty buffer (bounded, in case the consumer is gone).
        let never = CancellationToken::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.drain(&mut cursor, &never)).await;
        self.metrics.amqp_connected.set(0);
    }

    async fn drain(&self, cursor: &mut i64, cancel: &CancellationToken) {
        while self.buffer.pending() > 0 && !self.deliveries.is_closed() {
            if !self.deliver_once(cursor, cancel).await {
                break;
            }
        }
    }

    async fn deliver(&self, cursor: &mut i64, cancel: &CancellationToken) {
        while !cancel.is_cancelled() {
            if !self.deliver_once(cursor, cancel).await {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = self.buffer.wait_for_data() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }

    /// Hands over the next rows; false if there were none.
    async fn deliver_once(&self, cursor: &mut i64, cancel: &CancellationToken) -> bool {
        let rows = match self.buffer.load_after(*cursor, 512).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "in-process publisher cannot read the buffer; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return false;
            }
        };
        if rows.is_empty() {
            return false;
        }
        let mut handed_over = Vec::with_capacity(rows.len());
        for row in rows {
            let delivery = Delivery {
                exchange: row.exchange,
                routing_key: row.routing_key,
                message_id: row.message_id,
                device_id: row.device_id,
                payload: row.payload,
            };
            let sent = tokio::select! {
                _ = cancel.cancelled() => false,
                r = self.deliveries.send(delivery) => r.is_ok(),
            };
            if !sent {
                break;
            }
            *cursor = row.id;
            handed_over.push(row.id);
            self.metrics.publish_confirmed.inc();
        }
        if let Err(e) = self.buffer.release(handed_over).await {
            tracing::warn!(error = %e, "in-process publisher cannot release rows; they are delivered again");
            *cursor = 0;
        }
        true
    }
}
