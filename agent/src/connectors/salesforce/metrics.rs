//! The Salesforce connector's series on `/metrics`, labelled by division. Registered in the
//! process's one registry ([`crate::metrics::Metrics`]), so `edgecase run` with agent and
//! connector serves them all on one port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DivisionLabel {
    pub division: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub division: String,
    /// An error code (`REQUIRED_FIELD_MISSING`, `HTTP_503`, `timeout`), not a message.
    pub reason: String,
}

type Latency = Family<DivisionLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

#[derive(Debug)]
pub struct SalesforceMetrics {
    /// Cases Salesforce created (upsert answered 201 / created:true).
    pub created: Family<DivisionLabel, Counter>,
    /// Upserts that found the Case already there (a redelivery or a follow-up).
    pub updated: Family<DivisionLabel, Counter>,
    pub dead_lettered: Family<ReasonLabels, Counter>,
    pub retries: Family<ReasonLabels, Counter>,
    pub session_renewals: Family<DivisionLabel, Counter>,
    pub requests: Family<DivisionLabel, Counter>,
    pub in_flight: Family<DivisionLabel, Gauge>,
    pub api_usage: Family<DivisionLabel, Gauge>,
    pub api_limit: Family<DivisionLabel, Gauge>,
    pub amqp_connected: Family<DivisionLabel, Gauge>,
    /// Seconds per Salesforce request (each attempt).
    pub request_latency: Latency,
}

impl Default for SalesforceMetrics {
    fn default() -> Self {
        SalesforceMetrics {
            created: Family::default(),
            updated: Family::default(),
            dead_lettered: Family::default(),
            retries: Family::default(),
            session_renewals: Family::default(),
            requests: Family::default(),
            in_flight: Family::default(),
            api_usage: Family::default(),
            api_limit: Family::default(),
            amqp_connected: Family::default(),
            request_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        }
    }
}

impl SalesforceMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edgecase_salesforce_cases_created",
            "Cases created in Salesforce",
            self.created.clone(),
        );
        r.register(
            "edgecase_salesforce_cases_updated",
            "Upserts that updated an existing Case (redeliveries, follow-ups)",
            self.updated.clone(),
        );
        r.register(
            "edgecase_salesforce_dead_lettered",
            "Messages sent to the division's dead-letter queue, by error code",
            self.dead_lettered.clone(),
        );
        r.register(
            "edgecase_salesforce_retries",
            "Salesforce requests retried, by reason",
            self.retries.clone(),
        );
        r.register(
            "edgecase_salesforce_session_renewals",
            "New logins after 401 INVALID_SESSION_ID",
            self.session_renewals.clone(),
        );
        r.register(
            "edgecase_salesforce_requests",
            "REST requests sent",
            self.requests.clone(),
        );
        r.register(
            "edgecase_salesforce_in_flight",
            "Messages being written to Salesforce",
            self.in_flight.clone(),
        );
        r.register(
            "edgecase_salesforce_api_usage",
            "API calls used in the org's rolling day (Sforce-Limit-Info)",
            self.api_usage.clone(),
        );
        r.register(
            "edgecase_salesforce_api_limit",
            "The org's daily API allowance (Sforce-Limit-Info)",
            self.api_limit.clone(),
        );
        r.register(
            "edgecase_salesforce_amqp_connected",
            "1 while the division consumes from RabbitMQ",
            self.amqp_connected.clone(),
        );
        r.register(
            "edgecase_salesforce_request_latency_seconds",
            "Salesforce request latency",
            self.request_latency.clone(),
        );
    }

    pub fn division(d: &str) -> DivisionLabel {
        DivisionLabel {
            division: d.to_string(),
        }
    }

    pub fn reason(d: &str, reason: &str) -> ReasonLabels {
        ReasonLabels {
            division: d.to_string(),
            reason: reason.to_string(),
        }
    }
}
