//! TLS termination for `serve`: HTTPS and WSS on the same port as plain HTTP would be, with
//! rustls (ring provider) through tokio-rustls, from a PEM certificate chain and private key.
//!
//! The certificate and key are re-read on SIGHUP (or [`super::Server::tls_reloader`]): new
//! handshakes use the new pair, connections already open keep the session they negotiated, so a
//! renewal drops no socket. A reload that fails (missing file, key not matching the
//! certificate…) is logged and the previous pair stays in service. Only HTTP/1.1 is offered
//! (ALPN `http/1.1`), which WebSocket upgrades need.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

/// Where the certificate chain and key are (PEM files).
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS files cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("TLS certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file is missing, unreadable or holds no private key.
    #[error("TLS key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the pair (the key does not match the certificate, unsupported key type…).
    #[error("TLS certificate and key cannot be used together: {0}")]
    Config(String),
}

/// The acceptor in service, swapped whole on reload.
#[derive(Clone)]
pub struct TlsReloader {
    config: TlsConfig,
    current: Arc<RwLock<TlsAcceptor>>,
}

impl std::fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsReloader")
            .field("config", &self.config)
            .finish()
    }
}

impl TlsReloader {
    /// Loads the pair once; an error here stops the server from starting.
    pub fn new(config: TlsConfig) -> Result<Self, TlsError> {
        let acceptor = load(&config)?;
        Ok(TlsReloader {
            config,
            current: Arc::new(RwLock::new(acceptor)),
        })
    }

    /// Re-reads the files; on success new handshakes use them, on failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = load(&self.config)?;
        match self.current.write() {
            Ok(mut current) => *current = acceptor,
            Err(poisoned) => *poisoned.into_inner() = acceptor,
        }
        Ok(())
    }

    /// The acceptor for the next handshake.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

fn load(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certificates(&config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| TlsError::Key {
        path: config.key.clone(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(certs)
}
