//! A local Salesforce org for tests and demos, faithful to the wire facts in the project's
//! `salesforce-api.md`: the OAuth 2.0 token endpoint (username-password and JWT bearer
//! grants, with real checks of credentials, signature, issuer, audience and expiry), the
//! REST API for Cases (create, read, update, delete, upsert on an external id, sObject
//! Collections), a documented SOQL subset with paging, Salesforce's error bodies and status
//! codes, and the `Sforce-Limit-Info` header. Tests steer it: latency, session lifetime,
//! daily API allowance, required fields, validation rules and injected failures (rate
//! limit, 503, 500, row locks, expired sessions, stalls). Its state can be inspected.
//!
//! - [`org`]: the state and the rules of the org (pure, no I/O).
//! - [`http`]: Salesforce's URLs and bodies on top of it (axum).
//! - [`soql`]: the query subset.
//! - [`ids`]: 15/18-character record ids.
//! - [`streaming`]: the Streaming API (PushTopics over Bayeux/CometD, with replay).
//!
//! Start it in-process with [`Emulator::start`], or as `edgecase-sim salesforce`.
//! [`org::Org::subscribe_changes`] delivers every record change, for a Streaming API.

pub mod http;
pub mod ids;
pub mod org;
pub mod soql;
pub mod streaming;

use org::{Org, OrgSetup, Settings};
use std::net::SocketAddr;
use std::sync::Arc;

/// What the emulated org knows at start.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Connected apps: consumer key, consumer secret, and the PEM public key of the
    /// certificate used for the JWT bearer grant (if any).
    pub apps: Vec<(String, String, Option<String>)>,
    /// Users: username, password, security token.
    pub users: Vec<(String, String, String)>,
    /// Accepted JWT audiences besides the emulator's own URL.
    pub audiences: Vec<String>,
    /// Unique external id text fields on Case.
    pub external_id_fields: Vec<String>,
    /// Other custom text fields on Case.
    pub custom_fields: Vec<String>,
    pub settings: Settings,
    /// Serve https with this certificate instead of plain http.
    pub tls: Option<TlsIdentity>,
}

/// A server certificate chain and its private key, PEM.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

impl TlsIdentity {
    /// The test certificate for `127.0.0.1` and `localhost`, issued by [`TEST_TLS_CA`].
    pub fn test() -> TlsIdentity {
        TlsIdentity {
            cert_chain_pem: include_str!("../testdata/tls-test-server.pem").into(),
            key_pem: include_str!("../testdata/tls-test-server.key").into(),
        }
    }
}

/// The CA that issued [`TlsIdentity::test`]: give it to a client as its trusted root.
pub const TEST_TLS_CA: &str = include_str!("../testdata/tls-test-ca.pem");

impl Default for EmulatorConfig {
    /// One app (`edgecase-client-id` / `edgecase-client-secret`, JWT with the test key of
    /// `testdata/`), one user (`integration@edgecase.example` / `password` + token
    /// `TOKEN`), external id `Edge_Event_Id__c`, custom fields `Device__c`, `Sensor__c`,
    /// `Reading__c`, `Rule__c`, `Gateway__c`.
    fn default() -> Self {
        EmulatorConfig {
            apps: vec![(
                "edgecase-client-id".into(),
                "edgecase-client-secret".into(),
                Some(TEST_JWT_PUBLIC_KEY.into()),
            )],
            users: vec![("integration@edgecase.example".into(), "password".into(), "TOKEN".into())],
            audiences: vec![
                "https://login.salesforce.com".into(),
                "https://test.salesforce.com".into(),
            ],
            external_id_fields: vec!["Edge_Event_Id__c".into()],
            custom_fields: ["Device__c", "Sensor__c", "Reading__c", "Rule__c", "Gateway__c"]
                .map(String::from)
                .to_vec(),
            settings: Settings::default(),
            tls: None,
        }
    }
}

/// The public key the default connected app trusts for JWT bearer assertions.
pub const TEST_JWT_PUBLIC_KEY: &str = include_str!("../testdata/jwt-test-key.pub.pem");
/// Its private key: for tests and the demo only.
pub const TEST_JWT_PRIVATE_KEY: &str = include_str!("../testdata/jwt-test-key.pem");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: the port cannot be bound.
    #[error("Salesforce emulator: cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// Stop: the TLS certificate or key cannot be used.
    #[error("Salesforce emulator: TLS identity: {0}")]
    Tls(String),
}

/// A running emulator; dropping it stops the server.
pub struct Emulator {
    pub org: Arc<Org>,
    pub streaming: Arc<streaming::Streaming>,
    pub addr: SocketAddr,
    base_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Emulator {
    /// Binds `addr` (port 0 picks a free one) and serves on the current tokio runtime.
    pub async fn start(config: EmulatorConfig, addr: SocketAddr) -> Result<Emulator, Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        let acceptor = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{addr}");
        let mut audiences = config.audiences;
        audiences.push(base_url.clone());
        let org = Arc::new(Org::new(OrgSetup {
            apps: config.apps,
            users: config.users,
            audiences,
            external_id_fields: config.external_id_fields,
            custom_fields: config.custom_fields,
            settings: config.settings,
        }));
        org.add_object(streaming::push_topic_schema());
        let streaming = streaming::Streaming::start(org.clone());
        let app = http::router(Arc::new(http::AppState {
            org: org.clone(),
            base_url: base_url.clone(),
        }))
        .merge(streaming::router(streaming.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        match acceptor {
            None => {
                tokio::spawn(async move {
                    let shutdown = async move {
                        let _ = stopped.await;
                    };
                    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                        tracing::warn!(error = %e, "Salesforce emulator stopped");
                    }
                });
            }
            Some(acceptor) => {
                tokio::spawn(serve_tls(listener, acceptor, app, stopped));
            }
        }
        Ok(Emulator {
            org,
            streaming,
            addr,
            base_url,
            stop: Some(stop),
        })
    }

    /// `http://127.0.0.1:PORT`: the login URL and the instance URL.
    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// How many Cases the org holds.
    pub fn case_count(&self) -> usize {
        self.org.count("Case")
    }

    /// Every Case, in creation order.
    pub fn cases(&self) -> Vec<serde_json::Map<String, serde_json::Value>> {
        self.org.records("Case")
    }
}

fn tls_acceptor(id: &TlsIdentity) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let certs = rustls_pemfile::certs(&mut id.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("certificate: {e}")))?;
    let key = rustls_pemfile::private_key(&mut id.key_pem.as_bytes())
        .map_err(|e| Error::Tls(format!("key: {e}")))?
        .ok_or_else(|| Error::Tls("no private key in the PEM".into()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// https: each connection is a TLS handshake, then HTTP/1.1 served by the same router.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Salesforce emulator: accept failed");
                    continue;
                }
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A client that refuses our certificate ends its own handshake; nothing to do.
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
