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
use crate::config::{Config, LogFormat};
use crate::genesys::Genesys;
use crate::mock::{self, ClientSpec, MockConfig, ServiceTimes, Settings};

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
        #[arg(long, value_name = "PATH", env = "HANDOVER_CONFIG")]
        config: PathBuf,
        /// Log lines as `text` (human-readable) or `json` (one object per line).
        /// Default: `[log] format`, else text.
        #[arg(long, value_name = "json|text")]
        log_format: Option<LogFormat>,
    },
    /// Validate a config and try one token mint.
    Check {
        #[arg(long, value_name = "PATH", env = "HANDOVER_CONFIG")]
        config: PathBuf,
    },
    /// Exit 0 if the proxy's admin listener answers 200 on /readyz (a container
    /// health check: the image has no shell and no curl).
    Probe {
        /// The config of the proxy to ask: its `[admin] listen`.
        #[arg(long, value_name = "PATH", env = "HANDOVER_CONFIG")]
        config: Option<PathBuf>,
        /// The admin listener's URL (`http://127.0.0.1:9090`) or its readiness URL;
        /// wins over --config.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Run the fake Genesys Cloud, the proxy and simulated desktops in one process,
    /// rotating secrets on a schedule; exit 0 only if nothing was lost, duplicated or
    /// disconnected.
    Demo,
    /// Run the fake Genesys Cloud (OAuth + notifications) alone, for tests and trials.
    MockGenesys(MockArgs),
    /// Run the chaos soak: the fake, the proxy behind a chaos relay, churning and
    /// stalling desktops, and every kind of fault at seeded random times; print the
    /// invariant table; exit 0 only if every invariant held.
    Soak {
        /// How long to run.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of the fault schedule and the desktops' choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
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
    /// Runs the command; logging starts here, once `serve` knows its log format.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve { config, log_format } => serve(&config, log_format).await,
            Command::Check { config } => {
                init_tracing(LogFormat::Text);
                check(&config).await
            }
            Command::Probe { config, url } => probe(config.as_deref(), url.as_deref()).await,
            Command::Demo => {
                init_tracing(LogFormat::Text);
                crate::demo::run().await
            }
            Command::MockGenesys(args) => {
                init_tracing(LogFormat::Text);
                run_mock(args).await
            }
            Command::Soak { duration, seed } => {
                init_tracing(LogFormat::Text);
                soak(duration, seed).await
            }
        }
    }
}

async fn serve(path: &Path, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_tracing(log_format.unwrap_or(config.log.format));
    crate::process::harden();
    warn_about(&config);
    let proxy = Proxy::start(config).await?;
    println!(
        "listening on {}, admin on {}",
        proxy.client_addr, proxy.admin_addr
    );
    let mut hangups = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            _ = hangups.recv() => {
                proxy.reload_tls();
                match Config::load(path) {
                    Ok(config) => {
                        warn_about(&config);
                        proxy.reload(config);
                    }
                    Err(error) => tracing::error!(%error, "the changed configuration is invalid: keeping the current one"),
                }
            }
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

/// Logs what an operator must hear about the config (`config::warnings`), loudly.
fn warn_about(config: &Config) {
    for warning in crate::config::warnings(config) {
        tracing::warn!("{warning}");
    }
}

/// How long `probe` waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

async fn probe(config: Option<&Path>, url: Option<&str>) -> anyhow::Result<()> {
    let url = match (url, config) {
        (Some(url), _) => readiness_url(url)?,
        (None, Some(path)) => admin_readiness_url(Config::load(path)?.admin.listen)?,
        (None, None) => anyhow::bail!("pass --config PATH or --url URL (or set HANDOVER_CONFIG)"),
    };
    // Our own TLS settings, as every client here: reqwest's default reads the system's
    // CA store, and the image has none.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::tls::http_client_config(&crate::tls::Roots::webpki()))
        .timeout(PROBE_TIMEOUT)
        .no_proxy()
        .build()?;
    let response = http
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("{url}: no answer"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(
        status == reqwest::StatusCode::OK,
        "{url}: {status} {}",
        body.trim()
    );
    println!("{url}: {}", body.trim());
    Ok(())
}

/// `--url`: the admin listener's base URL means its `/readyz`.
fn readiness_url(given: &str) -> anyhow::Result<url::Url> {
    let mut url = url::Url::parse(given).with_context(|| format!("--url {given:?}"))?;
    anyhow::ensure!(
        url.scheme() == "http",
        "--url {given:?}: the admin listener speaks http://"
    );
    if url.path() == "/" {
        url.set_path("/readyz");
    }
    Ok(url)
}

/// The admin listener's `/readyz` on the local host, from its `listen` address.
fn admin_readiness_url(listen: SocketAddr) -> anyhow::Result<url::Url> {
    anyhow::ensure!(
        listen.port() != 0,
        "admin.listen {listen} has port 0 (chosen at start): pass --url"
    );
    // A listener on every interface is reached on loopback.
    let ip = match listen.ip() {
        ip if !ip.is_unspecified() => ip,
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    let addr = SocketAddr::new(ip, listen.port());
    Ok(url::Url::parse(&format!("http://{addr}/readyz"))?)
}

async fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The files the config names load as `serve` would load them.
    if let Some(tls) = &config.server.tls {
        crate::tls_server::ServerTls::load(&tls.cert_file, &tls.key_file)?;
    }
    if let Some(token) = &config.admin.token_file {
        crate::admin::read_token(token).map_err(anyhow::Error::msg)?;
    }
    let roots = crate::tls::Roots::with_ca_file(config.genesys.ca_file.as_deref())?;
    println!(
        "{}: valid ({} credential set(s))",
        path.display(),
        config.credentials.len()
    );
    for warning in crate::config::warnings(&config) {
        eprintln!("WARNING: {warning}");
    }
    let genesys = Arc::new(Genesys::new(
        &config.genesys.login_url,
        &config.genesys.api_url,
        &roots,
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

async fn soak(duration: Duration, seed: u64) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find the handover binary")?;
    let config = crate::soak::SoakConfig {
        progress: true,
        ..crate::soak::SoakConfig::new(binary, duration, seed)
    };
    println!(
        "soak: {} with seed {seed}, {} desktops on {} topics, {} events/s",
        humantime::format_duration(duration),
        config.desktops,
        config.topics,
        config.rate
    );
    let report = crate::soak::run(config).await?;
    print!("{}", report.table());
    anyhow::ensure!(report.passed(), "an invariant was violated");
    println!("every invariant held");
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
        socket_base: None,
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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): human-readable lines, or
/// one JSON object per line with the event's fields at the top level.
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_urls() {
        let url = |given: &str| readiness_url(given).map(|u| u.to_string());
        assert_eq!(
            url("http://127.0.0.1:9090").unwrap(),
            "http://127.0.0.1:9090/readyz"
        );
        assert_eq!(
            url("http://10.0.0.1:9/readyz").unwrap(),
            "http://10.0.0.1:9/readyz"
        );
        assert!(url("https://127.0.0.1:9090").is_err());
        assert!(url("127.0.0.1:9090").is_err());
        let admin =
            |listen: &str| admin_readiness_url(listen.parse().unwrap()).map(|u| u.to_string());
        assert_eq!(
            admin("0.0.0.0:9090").unwrap(),
            "http://127.0.0.1:9090/readyz"
        );
        assert_eq!(admin("[::]:9090").unwrap(), "http://[::1]:9090/readyz");
        assert_eq!(
            admin("10.1.2.3:9090").unwrap(),
            "http://10.1.2.3:9090/readyz"
        );
        let message = admin("127.0.0.1:0").unwrap_err().to_string();
        assert!(message.contains("--url"), "{message}");
    }
}
