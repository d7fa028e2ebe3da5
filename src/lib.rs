//! `handover`: a WebSocket reverse proxy for the Genesys Cloud notification service
//! that hides OAuth token and client-secret rotation from the desktops behind it.
//!
//! This crate is the library behind the `handover` binary. See `ARCHITECTURE.md` for
//! the bird's-eye view and the code map.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod bounds;
pub mod cli;
pub mod config;
pub mod demo;
pub mod downstream;
pub mod drain;
pub mod fleet;
pub mod frame;
pub mod front;
pub mod genesys;
pub mod http_server;
pub mod metrics;
pub mod mock;
pub mod process;
pub mod router;
pub mod secret;
pub mod sim;
pub mod soak;
pub mod tls;
pub mod tls_server;
pub mod topic;
pub mod upstream;
pub mod ws;

/// Installs ring as the process-wide rustls provider. reqwest and tokio-tungstenite
/// both take the process default, and building a TLS config with no provider
/// installed panics, so every entry point (main, tests, benches) calls this first.
pub fn install_crypto_provider() {
    // An error means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
