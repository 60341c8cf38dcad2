//! Broker-side connectors: they consume what the agents publish and write it elsewhere.

pub mod pushtopic;
pub mod salesforce;
