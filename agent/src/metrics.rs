//! Every counter and gauge the agent exposes on `/metrics`, in one place.
//!
//! Operators alert on these, so the names are a contract: `edgecase_<subsystem>_<what>`
//! (prometheus-client appends `_total` to counters). Stages hold an `Arc<Metrics>` and
//! update their own fields; nothing here does I/O.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `mqtt` or `serial`.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub source: String,
    /// A short reason class (`invalid_json`, `too_large`, ...), not the full message.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaseLabels {
    pub rule: String,
    /// `raise` or `clear`.
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabels {
    pub port: String,
    /// `acked` (stored, then acknowledged), `duplicate` (a retransmission: acknowledged,
    /// not stored again) or `nacked`.
    pub result: String,
}

/// All metrics. Cloning the `Arc` is how stages share it.
pub struct Metrics {
    pub registry: Registry,
    pub ingest_readings: Family<SourceLabel, Counter>,
    pub ingest_dead_letters: Family<DeadLetterLabels, Counter>,
    pub mqtt_connected: Gauge,
    pub mqtt_reconnects: Counter,
    pub serial_port_open: Family<PortLabel, Gauge>,
    pub serial_reopens: Family<PortLabel, Counter>,
    pub serial_frames: Family<FrameLabels, Counter>,
    pub buffer_pending_readings: Gauge,
    pub buffer_pending_bytes: Gauge,
    pub buffer_dead_letters: Gauge,
    pub buffer_committed: Counter,
    pub buffer_commits: Counter,
    pub buffer_duplicates: Counter,
    pub buffer_dropped: Counter,
    pub buffer_refused: Counter,
    pub buffer_released: Counter,
    /// Seconds each buffer COMMIT took: the durable write (WAL write and fsync). A disk
    /// that slows down shows here first.
    pub buffer_commit_seconds: Histogram,
    pub rules_cases: Family<CaseLabels, Counter>,
    pub publish_confirmed: Counter,
    pub publish_nacked: Counter,
    pub publish_unrouted: Counter,
    pub publish_reconnects: Counter,
    pub publish_in_flight: Gauge,
    pub amqp_connected: Gauge,
    /// Seconds from the reading's commit in the buffer to the broker's confirm.
    pub publish_latency_seconds: Histogram,
    /// Each stage loop's heartbeat, for the watchdog (not exported).
    pub stages: crate::watchdog::Stages,
    /// The Salesforce connector's series (`edgecase_salesforce_*`).
    pub salesforce: crate::connectors::salesforce::metrics::SalesforceMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            ingest_readings: Family::default(),
            ingest_dead_letters: Family::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            serial_port_open: Family::default(),
            serial_reopens: Family::default(),
            serial_frames: Family::default(),
            buffer_pending_readings: Gauge::default(),
            buffer_pending_bytes: Gauge::default(),
            buffer_dead_letters: Gauge::default(),
            buffer_committed: Counter::default(),
            buffer_commits: Counter::default(),
            buffer_duplicates: Counter::default(),
            buffer_dropped: Counter::default(),
            buffer_refused: Counter::default(),
            buffer_released: Counter::default(),
            buffer_commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 14)),
            rules_cases: Family::default(),
            publish_confirmed: Counter::default(),
            publish_nacked: Counter::default(),
            publish_unrouted: Counter::default(),
            publish_reconnects: Counter::default(),
            publish_in_flight: Gauge::default(),
            amqp_connected: Gauge::default(),
            publish_latency_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            stages: Default::default(),
            salesforce: Default::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "edgecase_ingest_readings",
            "Readings accepted into the buffer",
            m.ingest_readings.clone(),
        );
        r.register(
            "edgecase_ingest_dead_letters",
            "Inputs rejected and dead-lettered",
            m.ingest_dead_letters.clone(),
        );
        r.register(
            "edgecase_mqtt_connected",
            "1 while connected to the MQTT broker",
            m.mqtt_connected.clone(),
        );
        r.register(
            "edgecase_mqtt_reconnects",
            "MQTT connection losses",
            m.mqtt_reconnects.clone(),
        );
        r.register(
            "edgecase_serial_port_open",
            "1 while the serial port is open",
            m.serial_port_open.clone(),
        );
        r.register(
            "edgecase_serial_reopens",
            "Serial port losses",
            m.serial_reopens.clone(),
        );
        r.register(
            "edgecase_serial_frames",
            "Binary serial frames answered, by result: acked, duplicate (a retransmission, acknowledged again), nacked",
            m.serial_frames.clone(),
        );
        r.register(
            "edgecase_buffer_pending_readings",
            "Messages waiting for a broker confirm",
            m.buffer_pending_readings.clone(),
        );
        r.register(
            "edgecase_buffer_pending_bytes",
            "Payload bytes waiting for a broker confirm",
            m.buffer_pending_bytes.clone(),
        );
        r.register(
            "edgecase_buffer_dead_letters",
            "Dead letters kept in the buffer",
            m.buffer_dead_letters.clone(),
        );
        r.register(
            "edgecase_buffer_committed",
            "Messages committed to the buffer",
            m.buffer_committed.clone(),
        );
        r.register(
            "edgecase_buffer_commits",
            "Buffer transactions committed",
            m.buffer_commits.clone(),
        );
        r.register(
            "edgecase_buffer_duplicates",
            "Messages already in the buffer (same message_id)",
            m.buffer_duplicates.clone(),
        );
        r.register(
            "edgecase_buffer_dropped",
            "Messages deleted unsent by the drop-oldest overflow policy",
            m.buffer_dropped.clone(),
        );
        r.register(
            "edgecase_buffer_refused",
            "Appends refused because the buffer was full",
            m.buffer_refused.clone(),
        );
        r.register(
            "edgecase_buffer_released",
            "Messages deleted after the broker confirmed them",
            m.buffer_released.clone(),
        );
        r.register(
            "edgecase_buffer_commit_seconds",
            "Time of each buffer commit: the durable write (WAL write and fsync)",
            m.buffer_commit_seconds.clone(),
        );
        r.register(
            "edgecase_rules_cases",
            "Case events stored for publishing, by rule and action",
            m.rules_cases.clone(),
        );
        r.register(
            "edgecase_publish_confirmed",
            "Publishes confirmed by the broker",
            m.publish_confirmed.clone(),
        );
        r.register(
            "edgecase_publish_nacked",
            "Publishes the broker refused (retried)",
            m.publish_nacked.clone(),
        );
        r.register(
            "edgecase_publish_unrouted",
            "Publishes returned unroutable (dead-lettered)",
            m.publish_unrouted.clone(),
        );
        r.register(
            "edgecase_publish_reconnects",
            "AMQP connection losses",
            m.publish_reconnects.clone(),
        );
        r.register(
            "edgecase_publish_in_flight",
            "Publishes awaiting a confirm",
            m.publish_in_flight.clone(),
        );
        r.register(
            "edgecase_amqp_connected",
            "1 while connected to the AMQP broker",
            m.amqp_connected.clone(),
        );
        r.register(
            "edgecase_publish_latency_seconds",
            "Time from buffer commit to broker confirm",
            m.publish_latency_seconds.clone(),
        );
        m.salesforce.register(r);
        Metrics { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    pub fn dead_letter(&self, source: &str, reason: &str) {
        self.ingest_dead_letters
            .get_or_create(&DeadLetterLabels {
                source: source.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn accepted(&self, source: &str, n: u64) {
        self.ingest_readings
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .inc_by(n);
    }

    pub fn case_event(&self, rule: &str, action: crate::rules::CaseAction) {
        let action = match action {
            crate::rules::CaseAction::Raise => "raise",
            crate::rules::CaseAction::Clear => "clear",
        };
        self.rules_cases
            .get_or_create(&CaseLabels {
                rule: rule.to_string(),
                action: action.to_string(),
            })
            .inc();
    }

    pub fn serial_frame(&self, port: &str, result: &str, n: u64) {
        if n > 0 {
            self.serial_frames
                .get_or_create(&FrameLabels {
                    port: port.to_string(),
                    result: result.to_string(),
                })
                .inc_by(n);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_counts_are_exposed_by_rule_and_action() {
        let m = Metrics::new();
        m.case_event("hot", crate::rules::CaseAction::Raise);
        let text = m.encode();
        assert!(
            text.contains(r#"edgecase_rules_cases_total{rule="hot",action="raise"} 1"#),
            "{text}"
        );
    }
}
