//! TLS for the proxy's outbound connections: one root store (Mozilla's, from
//! webpki-roots, so a distroless container needs no CA bundle, plus `[genesys]
//! ca_file` for a TLS-inspecting corporate proxy) and one ring provider, with ALPN
//! set per use: h2 for the REST client, http/1.1 for WebSockets (an upstream that
//! picked h2 would break the RFC 6455 handshake).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// The roots outbound TLS trusts.
#[derive(Clone, Debug)]
pub struct Roots(Arc<RootCertStore>);

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("genesys.ca_file {}: cannot read it: {error}", path.display())]
    Read {
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("genesys.ca_file {}: no usable CA certificate in it{}", path.display(), reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Unusable {
        path: PathBuf,
        reason: Option<String>,
    },
}

impl Roots {
    /// Mozilla's roots only.
    pub fn webpki() -> Self {
        Self(Arc::new(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }))
    }

    /// Mozilla's roots and, if given, every certificate in the PEM file `ca_file`
    /// (all of them must be usable CA certificates).
    pub fn with_ca_file(ca_file: Option<&Path>) -> Result<Self, RootsError> {
        let Some(path) = ca_file else {
            return Ok(Self::webpki());
        };
        let certificates = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| RootsError::Read {
                path: path.to_owned(),
                error,
            })?;
        let mut store = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let (added, ignored) = store.add_parsable_certificates(certificates);
        if added == 0 || ignored > 0 {
            return Err(RootsError::Unusable {
                path: path.to_owned(),
                reason: (ignored > 0)
                    .then(|| format!("{ignored} certificate(s) could not be parsed")),
            });
        }
        Ok(Self(Arc::new(store)))
    }

    fn config(&self) -> ClientConfig {
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.0.clone())
            .with_no_client_auth()
    }
}

/// For reqwest (token endpoint and REST API).
pub fn http_client_config(roots: &Roots) -> ClientConfig {
    let mut config = roots.config();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// For upstream WebSockets.
pub fn websocket_client_config(roots: &Roots) -> Arc<ClientConfig> {
    let mut config = roots.config();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_adds_its_roots_or_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = dir.path().join("corporate-ca.pem");
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let builtin = Roots::webpki().0.len();
        let roots = Roots::with_ca_file(Some(&ca)).unwrap();
        assert_eq!(roots.0.len(), builtin + 1);
        assert_eq!(Roots::with_ca_file(None).unwrap().0.len(), builtin);

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let error = Roots::with_ca_file(Some(&empty)).unwrap_err().to_string();
        assert!(
            error.contains("empty.pem") && error.contains("no usable CA certificate"),
            "{error}"
        );
        let missing = dir.path().join("missing.pem");
        let error = Roots::with_ca_file(Some(&missing)).unwrap_err().to_string();
        assert!(
            error.starts_with("genesys.ca_file") && error.contains("missing.pem"),
            "{error}"
        );
    }
}
