//! The Salesforce PushTopic source: events of a PushTopic (Streaming API, CometD with
//! replay) become AMQP messages, in order, at least once, resumable after a restart.
//! The seed is Confluent's Salesforce PushTopic source connector, rebuilt on AMQP.
//!
//! ```text
//! Salesforce /cometd ──long poll──> bayeux::Client ──events──> AMQP exchange (confirms)
//!                                         ^                          │
//!                   subscribe from ───────┘      offset.json <── replay id after confirm
//! ```
//!
//! - [`config`]: the seed's flat dotted properties, validated, each error naming its key.
//! - [`bayeux`]: the CometD client and the policy for Salesforce's streaming errors.
//! - [`source`]: login, PushTopic find-or-create, the connect loop, publishing, storing.
//! - [`offsets`]: the stored replay id and the offset requests (PATCH/DELETE, status).
//! - [`api`]: the offsets API on the admin port.
//! - [`format`]: JSON, JSON with an embedded schema, and (feature `avro`) Avro containers.
//! - [`keystore`]: the PKCS#12 keystore of the JWT bearer grant.
//!
//! OAuth (password and JWT bearer grants, session renewal) is the Case connector's
//! [`crate::connectors::salesforce::client::Account`].

pub mod api;
#[cfg(feature = "avro")]
pub mod avro;
pub mod bayeux;
pub mod config;
pub mod format;
pub mod keystore;
pub mod offsets;
pub mod source;

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Opens the data directory: the state the source and its admin API share.
pub fn open(config: config::PushTopicConfig) -> Result<Arc<source::Shared>, offsets::StoreError> {
    open_to(config, source::Destination::Amqp)
}

/// [`open`], with the events going to `destination`.
pub fn open_to(
    config: config::PushTopicConfig,
    destination: source::Destination,
) -> Result<Arc<source::Shared>, offsets::StoreError> {
    let store = offsets::Store::open(&config.data_dir)?;
    let requests = offsets::Requests::open(&config.data_dir)?;
    Ok(Arc::new(source::Shared {
        config,
        destination,
        store,
        requests,
        stats: source::Stats::default(),
    }))
}

/// Runs the source (and its admin API when `admin.listen` is set) until `cancel`.
pub async fn serve(shared: Arc<source::Shared>, cancel: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(addr) = shared.config.admin_listen.clone() {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("admin.listen {addr}: cannot listen"))?;
        let bound = listener.local_addr()?;
        let app = api::router(shared.clone());
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        tracing::info!(admin = %bound, "offsets API on http://{bound}/connectors/{}/offsets", shared.config.name);
    }
    source::run(shared, cancel).await?;
    Ok(())
}

/// [`open`] then [`serve`].
pub async fn run(config: config::PushTopicConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    serve(open(config)?, cancel).await
}
