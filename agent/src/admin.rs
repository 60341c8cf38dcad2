//! The admin port: `/metrics` (Prometheus text, from the prometheus-client registry) and
//! `/healthz` (JSON status). Bound to loopback by default; it exposes counts, not data.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: the admin address cannot be bound (in use, or not a local address).
    #[error("admin.listen {addr}: cannot listen: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Binds now (so a taken port fails at start) and returns the server future.
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(std::net::SocketAddr, impl Future<Output = ()> + Send + use<>), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(metrics);
    let server = async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "admin server stopped");
        }
    };
    Ok((local, server))
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn health_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let body = serde_json::json!({
        "status": "ok",
        "mqtt_connected": m.mqtt_connected.get() == 1,
        "amqp_connected": m.amqp_connected.get() == 1,
        "pending": m.buffer_pending_readings.get(),
        "dead_letters": m.buffer_dead_letters.get(),
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
