//! TLS to desktops (`[server.tls]`): rustls with ring, ALPN `http/1.1` (a WebSocket
//! upgrade is HTTP/1.1), and a certificate that can be rotated without dropping
//! anyone: the certificate and key are read again when their files change (polled,
//! so that Kubernetes' symlink swap of a mounted secret is seen) or on SIGHUP, and
//! each new handshake takes the current pair. Connections already open keep the
//! session they negotiated, so a rotation is as invisible to a connected desktop as
//! a secret rotation is.
//!
//! A pair that does not load (a half-written file, a key that does not match the
//! certificate) is logged and the current pair kept. The key file's bytes are wiped
//! from memory once parsed; the key itself lives on in ring's signing key while it
//! is in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

/// How often the files are checked for a change.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("certificate file {}: no PEM certificate in it ({0})", path.display())]
    NoCertificate { path: PathBuf, reason: String },
    // The parser's message never quotes key material, only what it expected.
    #[error("key file {}: no PEM private key in it ({reason})", path.display())]
    NoKey { path: PathBuf, reason: String },
    #[error("certificate {} and key {} do not form a usable pair: {reason}", cert.display(), key.display())]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The certificate and key, and how to read them again.
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Current>,
    config: Arc<ServerConfig>,
    /// The files' bytes as last loaded, to tell a change from a touch.
    loaded: Mutex<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    /// New pairs taken into use.
    reloads: Counter,
    /// 1 while the files hold a pair that does not load (the current one is kept).
    failing: Gauge,
}

impl ServerTls {
    /// Loads the pair; an error names the file and what is wrong with it.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert_bytes, key_bytes) = read_pair(cert_file, key_file)?;
        let key = certified_key(cert_file, key_file, &cert_bytes, &key_bytes, &provider)?;
        let resolver = Arc::new(Current(ArcSwap::from_pointee(key)));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            resolver,
            config: Arc::new(config),
            loaded: Mutex::new((cert_bytes, key_bytes)),
            reloads: Counter::default(),
            failing: Gauge::default(),
        }))
    }

    /// The server config every handshake uses (its certificate is the current one).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Reads the files again; swaps in the pair if it changed and is usable.
    /// `Ok(true)`: a new pair is in use; `Ok(false)`: the files are unchanged.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let outcome = self.try_reload();
        self.failing.set(i64::from(outcome.is_err()));
        if let Ok(true) = outcome {
            self.reloads.inc();
        }
        outcome
    }

    fn try_reload(&self) -> Result<bool, TlsError> {
        let (cert_bytes, key_bytes) = read_pair(&self.cert_file, &self.key_file)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_bytes && *loaded.1 == *key_bytes {
            return Ok(false);
        }
        let key = certified_key(
            &self.cert_file,
            &self.key_file,
            &cert_bytes,
            &key_bytes,
            &self.provider,
        )?;
        self.resolver.0.store(Arc::new(key));
        *loaded = (cert_bytes, key_bytes);
        Ok(true)
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "tls_certificate_reloads",
            "New certificate and key pairs taken into use on the client listener.",
            self.reloads.clone(),
        );
        registry.register(
            "tls_certificate_reload_failing",
            "1 while the certificate and key files hold a pair that does not load (the current pair is kept).",
            self.failing.clone(),
        );
    }

    /// Polls the files until `shutdown`, reloading when they change. A failure is
    /// logged once until it changes (a rotation may write the two files one after
    /// the other: the first look may see a mismatched pair).
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last_error = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
            match self.reload() {
                Ok(true) => {
                    last_error = None;
                    tracing::info!(cert_file = %self.cert_file.display(), "TLS certificate reloaded");
                }
                Ok(false) => last_error = None,
                Err(error) => {
                    let message = error.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::warn!(%error, "TLS certificate not reloaded: keeping the current one");
                        last_error = Some(message);
                    }
                }
            }
        }
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>), TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            what,
            path: path.to_owned(),
            error,
        })
    };
    let cert = read("certificate", cert_file)?;
    let key = Zeroizing::new(read("key", key_file)?);
    Ok((cert, key))
}

fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    cert_bytes: &[u8],
    key_bytes: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate {
            path: cert_file.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
            reason: "the file holds no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|e| TlsError::NoKey {
        path: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Pair {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        reason: e.to_string(),
    })
}

/// Hands every handshake the current pair.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::CertificateParams, rcgen::KeyPair) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params, rcgen::KeyPair::generate().unwrap())
    }

    fn server(ca: &(rcgen::CertificateParams, rcgen::KeyPair)) -> (String, String) {
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params
            .signed_by(&key, &rcgen::Issuer::from_params(&ca.0, &ca.1))
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn current(tls: &ServerTls) -> Vec<u8> {
        tls.resolver.0.load().cert[0].to_vec()
    }

    #[test]
    fn a_changed_pair_is_taken_and_a_bad_one_is_not() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let authority = ca();
        let (cert, key) = server(&authority);
        std::fs::write(&cert_file, &cert).unwrap();
        std::fs::write(&key_file, &key).unwrap();
        let tls = ServerTls::load(&cert_file, &key_file).unwrap();
        assert_eq!(tls.config().alpn_protocols, [b"http/1.1".to_vec()]);
        let first = current(&tls);
        assert!(!tls.reload().unwrap(), "unchanged files: nothing to do");

        // A rotation that has written the certificate but not yet its key.
        let (next_cert, next_key) = server(&authority);
        std::fs::write(&cert_file, &next_cert).unwrap();
        let error = tls.reload().unwrap_err().to_string();
        assert!(error.contains("do not form a usable pair"), "{error}");
        assert_eq!(current(&tls), first, "the good pair stays in use");
        std::fs::write(&key_file, &next_key).unwrap();
        assert!(tls.reload().unwrap());
        assert_ne!(current(&tls), first);

        std::fs::write(&key_file, "not a key").unwrap();
        let error = tls.reload().unwrap_err().to_string();
        assert!(error.contains("no PEM private key"), "{error}");
        assert!(!error.contains("not a key"), "the key file is never quoted");
        std::fs::remove_file(&cert_file).unwrap();
        assert!(matches!(
            ServerTls::load(&cert_file, &key_file),
            Err(TlsError::Read {
                what: "certificate",
                ..
            })
        ));
    }
}
