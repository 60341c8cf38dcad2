//! TLS client settings shared by mqtts (rumqttc) and https: rustls with the `ring`
//! provider (no C toolchain needed for ARM builds) and certificates always verified.

use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stop: the CA file named in the config cannot be used.
    #[error("CA file {path}: {message}")]
    CaFile { path: String, message: String },
    /// Stop: the system has no usable root certificates and no CA file was given.
    #[error("no trusted root certificates found on this system; set a ca_file")]
    NoRoots,
}

/// Installs `ring` as the process-wide rustls provider (lapin and rumqttc both use rustls).
pub fn install_crypto_provider() {
    // Err only means another part of the process installed one first; either is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client config trusting `ca_file` if given, else the system's root certificates.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |message: String| Error::CaFile {
                path: path.display().to_string(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| ca_err(format!("not PEM: {e}")))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(ca_err("contains no certificate".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // Skip the odd malformed system certificate rather than refuse to start.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::NoRoots);
            }
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
