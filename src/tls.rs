//! TLS for the proxy's outbound connections: one root store (Mozilla's, from
//! webpki-roots, so a distroless container needs no CA bundle) and one ring provider,
//! with ALPN set per use: h2 for the REST client, http/1.1 for WebSockets (an upstream
//! that picked h2 would break the RFC 6455 handshake).

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

fn base_config() -> ClientConfig {
    let roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// For reqwest (token endpoint and REST API).
pub fn http_client_config() -> ClientConfig {
    let mut config = base_config();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// For upstream WebSockets.
pub fn websocket_client_config() -> Arc<ClientConfig> {
    let mut config = base_config();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}
