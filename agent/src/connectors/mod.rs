//! Broker-side connectors, beside the agent in the same binary (`edgecase connector ...`)
//! and as library calls: they consume what the agents publish and write it elsewhere (a
//! Salesforce org, an SQL database), read a database and publish, or stream Salesforce
//! record changes (PushTopic events) onto the broker.

pub mod db;
pub mod pushtopic;
pub mod salesforce;

use serde::{Deserialize, Serialize};

/// The `[connector]` section of the main config: one table per connector.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorConfig {
    /// The SQL database connector (`[connector.db]`); see `docs/db-connector.md`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db: Option<db::DbConnectorConfig>,
}

impl ConnectorConfig {
    /// No connector configured (`edgecase check` then prints no `[connector]`).
    pub fn is_empty(&self) -> bool {
        self.db.is_none()
    }
}
