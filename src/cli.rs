//! The command line: `handover <command>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::app::Proxy;
use crate::auth::TokenSource;
use crate::config::Config;
use crate::mock::{self, ClientSpec, MockConfig, ServiceTimes, Settings};
use crate::upstream::genesys::Genesys;

#[derive(Parser)]
#[command(
    name = "handover",
    version,
    about = "Hides Genesys Cloud token and secret rotation from notification WebSocket clients"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy. SIGHUP reloads the config; SIGTERM or SIGINT drains and stops
    /// (a second one stops at once).
    Serve {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Validate a config and try one token mint.
    Check {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Run the fake Genesys Cloud, the proxy and simulated desktops in one process,
    /// rotating secrets on a schedule; exit 0 only if nothing was lost, duplicated or
    /// disconnected.
    Demo,
    /// Run the fake Genesys Cloud (OAuth + notifications) alone, for tests and trials.
    MockGenesys(MockArgs),
}

#[derive(clap::Args)]
struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// An OAuth client as ID:SECRET (repeatable). Default: demo-client:demo-secret.
    #[arg(long = "client", value_name = "ID:SECRET", value_parser = parse_client)]
    clients: Vec<(String, String)>,
    /// Lifetime of minted tokens.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
    /// Interval of the `WebSocket Heartbeat` frames.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Channels per OAuth client before the oldest is silently evicted.
    #[arg(long, default_value_t = 20)]
    max_channels: usize,
    /// API requests per token per minute (0: unlimited).
    #[arg(long, default_value_t = 300)]
    rate_limit: u32,
    /// Service time of API calls and WebSocket upgrades (±20 % jitter).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Service time of the token endpoint (±20 % jitter).
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    token_latency: Duration,
}

fn parse_client(value: &str) -> Result<(String, String), String> {
    match value.split_once(':') {
        Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
            Ok((id.to_owned(), secret.to_owned()))
        }
        _ => Err("expected ID:SECRET".to_owned()),
    }
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve { config } => serve(&config).await,
            Command::Check { config } => check(&config).await,
            Command::Demo => crate::demo::run().await,
            Command::MockGenesys(args) => run_mock(args).await,
        }
    }
}

async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let proxy = Proxy::start(config).await?;
    println!(
        "listening on {}, admin on {}",
        proxy.client_addr, proxy.admin_addr
    );
    let mut hangups = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            _ = hangups.recv() => match Config::load(path) {
                Ok(config) => proxy.reload(config),
                Err(error) => tracing::error!(%error, "the changed configuration is invalid: keeping the current one"),
            },
        }
    }
    tokio::select! {
        _ = proxy.stop() => Ok(()),
        // An operator who does not want to wait for the drain says so twice.
        _ = shutdown_signal() => {
            tracing::warn!("second stop signal: stopping at once, without draining");
            anyhow::bail!("stopped at once by a second signal")
        }
    }
}

async fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!(
        "{}: valid ({} credential set(s))",
        path.display(),
        config.credentials.len()
    );
    let genesys = Arc::new(Genesys::new(
        &config.genesys.login_url,
        &config.genesys.api_url,
    )?);
    let tokens = TokenSource::new(genesys, Arc::new(ArcSwap::from_pointee(config)));
    let token = tokens.mint().await.context("no token could be minted")?;
    println!(
        "minted a token with credential set {:?}, valid for {}",
        token.credential,
        humantime::format_duration(token.lifetime)
    );
    Ok(())
}

async fn run_mock(args: MockArgs) -> anyhow::Result<()> {
    let mut clients = args.clients;
    if clients.is_empty() {
        clients.push(("demo-client".to_owned(), "demo-secret".to_owned()));
    }
    let config = MockConfig {
        clients: clients
            .into_iter()
            .map(|(id, secret)| ClientSpec::new(id, secret, args.token_ttl))
            .collect(),
        settings: Settings {
            heartbeat: args.heartbeat,
            max_channels_per_client: args.max_channels,
            rate_limit_per_min: args.rate_limit,
            service_times: ServiceTimes {
                token: args.token_latency,
                api: args.latency,
                ws_upgrade: args.latency,
                ..ServiceTimes::REALISTIC
            },
            ..Settings::default()
        },
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(mock::run(listener, config, shutdown.clone()));
    println!("listening on {addr}");
    shutdown_signal().await;
    shutdown.cancel();
    server.await.context("the fake Genesys Cloud failed")?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (Kubernetes starts a graceful stop with SIGTERM).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
