//! Wiring: builds the parts from a config, serves the client and admin listeners,
//! mints a first token at start (readiness) and counts others' channels of the OAuth
//! client with it, reloads, and stops: drains the client
//! sockets, then shuts down through one `CancellationToken` and one `TaskTracker`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, CredentialStatus, Operations, Readiness};
use crate::auth::TokenSource;
use crate::auth::{CredentialState, DrainError};
use crate::config::Config;
use crate::downstream::Downstream;
use crate::downstream::available::AvailableTopics;
use crate::downstream::peers::Peers;
use crate::downstream::sessions::Sessions;
use crate::downstream::subscribe::Subscriptions;
use crate::drain::Drain;
use crate::fleet::Fleet;
use crate::genesys::{Genesys, UpstreamError};
use crate::http_server::{self, Request};
use crate::metrics::{self, Readings};
use crate::router::Router;
use crate::tls::Roots;
use crate::tls_server::ServerTls;
use crate::upstream::channel::{self, Parts};
use crate::upstream::foreign;
use crate::upstream::pool::{self, Pool};
use crate::upstream::state::ChannelView;
use crate::upstream::{Delivery, Demand, Leases, Unshared};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Cluster(#[from] crate::fleet::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::tls_server::TlsError),
    #[error(transparent)]
    Roots(#[from] crate::tls::RootsError),
    #[error("{0}")]
    AdminToken(String),
}

/// Connections the admin listener takes at once: probes, scrapes and an operator.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// A running proxy.
pub struct Proxy {
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub pool: Arc<Pool>,
    pub tokens: Arc<TokenSource>,
    pub router: Arc<Router>,
    config: Arc<ArcSwap<Config>>,
    /// Cancelled when the stop begins: `/readyz` answers 503 from then on.
    stopping: CancellationToken,
    /// Cancelled after `drain_delay`: the client listener takes no new connections.
    accepting: CancellationToken,
    drain: Arc<Drain>,
    /// Cancelled once the last client socket is gone (or the grace period is over):
    /// channel tasks close their channels and retire their tokens.
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// The admin listener outlives the rest, so that `/readyz` answers 503 while the
    /// proxy shuts down.
    admin_stop: CancellationToken,
    admin_server: tokio::task::JoinHandle<()>,
    /// The client listener's certificate, when it serves TLS.
    tls: Option<Arc<ServerTls>>,
    /// With `[cluster]`: the drain hands this replica's channels over to others.
    fleet: Option<(Arc<Fleet>, Arc<Sessions>)>,
}

impl Proxy {
    /// Binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let client_listener = bind(config.server.listen).await?;
        let admin_listener = bind(config.admin.listen).await?;
        let client_addr = client_listener
            .local_addr()
            .map_err(|error| StartError::Listen {
                addr: config.server.listen,
                error,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|error| StartError::Listen {
                addr: config.admin.listen,
                error,
            })?;
        let tls = match &config.server.tls {
            Some(files) => Some(ServerTls::load(&files.cert_file, &files.key_file)?),
            None => None,
        };
        if let Some(path) = &config.admin.token_file {
            crate::admin::read_token(path).map_err(StartError::AdminToken)?;
        }
        let roots = Roots::with_ca_file(config.genesys.ca_file.as_deref())?;
        let genesys = Arc::new(Genesys::new(
            &config.genesys.login_url,
            &config.genesys.api_url,
            &roots,
        )?);
        let shutdown = CancellationToken::new();
        let accepting = shutdown.child_token();
        let stopping = CancellationToken::new();
        let drain = Arc::new(Drain::default());
        let tasks = TaskTracker::new();
        let router = Arc::new(Router::new(dedup_window(&config)));
        let client_idle = config.server.client_idle;
        let config = Arc::new(ArcSwap::from_pointee(config));
        let tokens = Arc::new(TokenSource::new(genesys.clone(), config.clone()));
        let fleet = match &config.load().cluster {
            Some(cluster) => Some(Arc::new(Fleet::start(
                cluster,
                config.clone(),
                router.clone(),
                dedup_window(&config.load()),
                &tasks,
                &shutdown,
            )?)),
            None => None,
        };
        let (delivery, leases): (Arc<dyn Delivery>, Arc<dyn Leases>) = match &fleet {
            Some(fleet) => (fleet.bus.clone(), fleet.leases.clone()),
            None => (router.clone(), Arc::new(Unshared)),
        };
        let pool = Pool::new(
            pool::limits(&config.load()),
            delivery.clone(),
            shutdown.clone(),
        );
        // Its first mint, at start, makes the proxy ready; then it counts the OAuth
        // client's channels held by others, before any channel is created.
        tasks.spawn(foreign::watch(
            genesys.clone(),
            tokens.clone(),
            pool.clone(),
            config.clone(),
            shutdown.clone(),
        ));
        // What desktops want goes to the pool, or, in a fleet, to the carriers, which
        // have the pool carry the topics this replica carries for the fleet.
        let upstream: Arc<dyn Demand> = match &fleet {
            Some(fleet) => {
                fleet.carriers.start(pool.clone(), &tasks, &shutdown);
                fleet.carriers.clone()
            }
            None => Arc::new(pool.clone()),
        };
        let parts = Parts::new(
            genesys.clone(),
            tokens.clone(),
            delivery,
            leases,
            config.clone(),
            tasks.clone(),
            shutdown.clone(),
        );
        pool.set_spawner(channel::spawner(parts.clone()));
        let sessions = Arc::new(Sessions::new(router.clone(), upstream, tasks.clone()));
        let peers = Arc::new(Peers::default());
        let subscriptions = Arc::new(Subscriptions {
            sessions: sessions.clone(),
            peers: peers.clone(),
            config: config.clone(),
            tasks: tasks.clone(),
        });
        let listeners = http_server::Listeners::default();
        let (client_options, admin_options) =
            listener_options(&config.load(), tls.clone(), &listeners);
        let tls_for_reload = tls.clone();
        if let Some(tls) = tls {
            tasks.spawn(tls.watch(shutdown.clone()));
        }

        let downstream = Arc::new(Downstream {
            sessions: sessions.clone(),
            config: config.clone(),
            client_addr,
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            drain: drain.clone(),
            peers: peers.clone(),
            subscriptions,
            available: Arc::new(AvailableTopics::new(genesys.clone(), tokens.clone())),
            fleet: fleet.clone(),
        });
        if let Some(fleet) = &fleet {
            let serving = downstream.clone();
            let handler: crate::fleet::calls::Handler =
                Arc::new(move |call| Box::pin(serving.clone().carry_out(call)));
            tasks.spawn(
                fleet
                    .calls
                    .clone()
                    .serve(handler, tasks.clone(), shutdown.clone()),
            );
            tasks.spawn(crate::downstream::keep_listed(
                sessions.clone(),
                fleet.directory.clone(),
                shutdown.clone(),
            ));
        }
        let admin_refusals = metrics::ByReason::default();
        // Every part registers its own metrics.
        let mut registry = metrics::registry();
        {
            let ours = metrics::ours(&mut registry);
            genesys.register_metrics(ours);
            tokens.register_metrics(ours);
            pool.register_metrics(ours);
            parts.register_metrics(ours);
            router.register_metrics(ours);
            sessions.register_metrics(ours);
            peers.register_metrics(ours);
            if let Some(fleet) = &fleet {
                fleet.register_metrics(ours);
            }
            admin_refusals.register(
                ours,
                "admin_requests_refused",
                "Admin requests refused at its gate, by reason.",
                &["unauthorized", "forbidden", "unsupported.media.type"],
            );
            listeners.register_metrics(ours);
            if let Some(tls) = &tls_for_reload {
                tls.register_metrics(ours);
            }
            let counted = tasks.clone();
            Readings::new()
                .gauge(
                    "tasks",
                    "Tasks running: listeners and housekeeping, one per client socket, subscription change and upstream channel.",
                    move || counted.len() as i64,
                )
                .register(ours);
        }
        let admin = Arc::new(Admin {
            metrics: Arc::new(registry),
            readiness: Arc::new(Ready {
                tokens: tokens.clone(),
                stopping: stopping.clone(),
                bus: fleet.as_ref().map(|fleet| fleet.bus.clone()),
            }),
            operations: Arc::new(Ops {
                tokens: tokens.clone(),
                pool: pool.clone(),
                config: config.clone(),
            }),
            token_file: config.load().admin.token_file.clone(),
            refusals: admin_refusals,
        });
        tasks.spawn(http_server::serve_with(
            client_listener,
            client_options,
            move |req: Request| downstream.clone().handle(req),
            accepting.clone(),
        ));
        let admin_stop = CancellationToken::new();
        let admin_server = tokio::spawn(http_server::serve_with(
            admin_listener,
            admin_options,
            move |req: Request| admin.clone().handle_logged(req),
            admin_stop.clone(),
        ));
        let fleet = fleet.map(|fleet| (fleet, sessions.clone()));
        tasks.spawn(close_idle_channels(
            sessions,
            config.clone(),
            client_idle,
            shutdown.clone(),
        ));
        tracing::info!(%client_addr, %admin_addr, "handover listening");
        Ok(Self {
            client_addr,
            admin_addr,
            pool,
            tokens,
            router,
            config,
            stopping,
            accepting,
            drain,
            shutdown,
            tasks,
            admin_stop,
            admin_server,
            tls: tls_for_reload,
            fleet,
        })
    }

    /// Applies a new config: credentials, limits and timings take effect for the next
    /// decision; listeners stay as they are (changing them needs a restart).
    ///
    /// Every key takes effect at the next decision that reads it (README, "Reloading"),
    /// except the few the process binds or builds at start: those are warned about and
    /// returned.
    pub fn reload(&self, config: Config) -> Vec<&'static str> {
        let restart_only = restart_only_changes(&self.config.load(), &config);
        for key in &restart_only {
            tracing::warn!(
                key,
                "changed in the config: it takes effect at the next restart"
            );
        }
        self.pool.reload(pool::limits(&config));
        self.router.set_dedup_window(dedup_window(&config));
        self.config.store(Arc::new(config));
        let tokens = self.tokens.clone();
        self.pool
            .credentials_changed(&|name| tokens.is_draining(name));
        tracing::info!("configuration reloaded");
        restart_only
    }

    /// Reads the TLS certificate and key again now (SIGHUP), rather than at the next
    /// look at the files.
    pub fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.reload() {
            Ok(true) => tracing::info!("TLS certificate reloaded"),
            Ok(false) => tracing::debug!("TLS certificate unchanged"),
            Err(error) => {
                tracing::warn!(%error, "TLS certificate not reloaded: keeping the current one")
            }
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Stops as a load balancer expects (timings from `[server]`): `/readyz` answers
    /// 503 at once; the proxy keeps serving for `drain_delay` while endpoint removal
    /// propagates; then it takes no new connections and closes the client sockets
    /// (1012) one after the other over `drain_spread`; once the last is gone (and,
    /// with `[cluster]`, their desktops' channels are served by other replicas, which
    /// carry their topics), its channel tasks close their upstream channels and
    /// retire their tokens. All of it within `shutdown_grace`. The admin listener
    /// stops last.
    pub async fn stop(self) {
        let started = tokio::time::Instant::now();
        let config = self.config.load_full();
        let server = &config.server;
        self.stopping.cancel();
        if let Some((fleet, _)) = &self.fleet {
            fleet.begin_drain().await;
        }
        tracing::info!(
            drain_delay = %humantime::format_duration(server.drain_delay),
            drain_spread = %humantime::format_duration(server.drain_spread),
            client_sockets = self.drain.open_sockets(),
            "stopping: readiness is 503; client sockets close after the drain delay, over the drain spread"
        );
        let drained = async {
            tokio::time::sleep(server.drain_delay).await;
            self.accepting.cancel();
            let closing = self
                .fleet
                .as_ref()
                .map(|(_, sessions)| sessions.connected_ids());
            self.drain.begin(server.drain_spread);
            self.drain.all_closed().await;
            if let (Some((fleet, _)), Some(closed)) = (&self.fleet, closing) {
                tracing::info!(
                    channels = closed.len(),
                    "every client socket is closed: waiting for other replicas to serve their channels"
                );
                // A second of the grace is left for closing the upstream channels.
                let deadline =
                    started + server.shutdown_grace.saturating_sub(Duration::from_secs(1));
                fleet.hand_over(closed, deadline).await;
            }
            tracing::info!("every client socket is closed: closing the upstream channels");
            self.shutdown.cancel();
            self.tasks.close();
            self.tasks.wait().await;
        };
        if tokio::time::timeout(server.shutdown_grace, drained)
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over: exiting with tasks still running");
        }
        self.shutdown.cancel();
        self.admin_stop.cancel();
        let _ = self.admin_server.await;
    }
}

/// Readiness: ready from the first token minted (and, with `[cluster]`, the first
/// read of the fleet's stream, or Redis failing) until the stop begins.
struct Ready {
    tokens: Arc<TokenSource>,
    stopping: CancellationToken,
    bus: Option<Arc<crate::fleet::bus::Bus>>,
}

impl Readiness for Ready {
    fn ready(&self) -> Result<(), &'static str> {
        if self.stopping.is_cancelled() {
            Err("shutting down")
        } else if !self.tokens.has_minted() {
            Err("no token yet")
        } else if self.bus.as_ref().is_some_and(|bus| !bus.settled()) {
            // A desktop served before the stream is read could not be replayed
            // what it misses when it moves.
            Err("not reading the fleet's stream yet")
        } else {
            Ok(())
        }
    }
}

/// What the admin listener may see and do, over the token source and the pool.
struct Ops {
    tokens: Arc<TokenSource>,
    pool: Arc<Pool>,
    config: Arc<ArcSwap<Config>>,
}

impl Ops {
    fn status(&self, name: &str) -> CredentialStatus {
        CredentialStatus {
            name: name.to_owned(),
            state: self.tokens.state(name).unwrap_or(CredentialState::Active),
            channels: self.pool.open_channels_of(name),
        }
    }
}

impl Operations for Ops {
    fn credentials(&self) -> Vec<CredentialStatus> {
        let config = self.config.load();
        config
            .credentials
            .iter()
            .map(|c| self.status(&c.name))
            .collect()
    }

    fn drain(&self, name: &str) -> Result<CredentialStatus, DrainError> {
        self.tokens.drain(name)?;
        let tokens = &self.tokens;
        self.pool
            .credentials_changed(&|name| tokens.is_draining(name));
        Ok(self.status(name))
    }

    fn undrain(&self, name: &str) -> Result<CredentialStatus, DrainError> {
        self.tokens.undrain(name)?;
        Ok(self.status(name))
    }

    fn channels(&self) -> Vec<ChannelView> {
        self.pool.channels()
    }
}

/// What the client and admin listeners enforce (`[server]`): the connection cap
/// (kept below the open-file limit), timeouts, PROXY headers from trusted proxies,
/// TLS. The admin listener takes the same timeouts, a small cap, and no PROXY
/// header or TLS (it is not for the outside).
fn listener_options(
    config: &Config,
    tls: Option<Arc<ServerTls>>,
    listeners: &http_server::Listeners,
) -> (http_server::Options, http_server::Options) {
    let server = &config.server;
    let client = http_server::Options {
        name: "client",
        max_connections: Some(crate::process::connection_cap(server.max_connections)),
        header_read_timeout: server.header_read_timeout,
        keep_alive_idle: Some(server.keep_alive_idle),
        proxy_protocol_from: if server.proxy_protocol {
            server.trusted_proxies.clone()
        } else {
            Vec::new()
        },
        tls,
        metrics: listeners.of("client"),
    };
    let admin = http_server::Options {
        name: "admin",
        max_connections: Some(ADMIN_MAX_CONNECTIONS),
        header_read_timeout: server.header_read_timeout,
        keep_alive_idle: Some(server.keep_alive_idle),
        proxy_protocol_from: Vec::new(),
        tls: None,
        metrics: listeners.of("admin"),
    };
    (client, admin)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| StartError::Listen { addr, error })
}

/// The keys whose change needs a restart: the listeners (with their TLS, caps,
/// timeouts and PROXY protocol), the admin token's file, the Genesys client and the
/// log format are set up once, at start. Origins, hosts, trusted proxies for
/// `X-Forwarded-For`, the topic policy and the per-peer limits are read at every
/// request, and follow a reload.
fn restart_only_changes(current: &Config, next: &Config) -> Vec<&'static str> {
    let (now, then) = (&current.server, &next.server);
    [
        ("server.tls", now.tls != then.tls),
        (
            "server.max_connections",
            now.max_connections != then.max_connections,
        ),
        (
            "server.header_read_timeout",
            now.header_read_timeout != then.header_read_timeout,
        ),
        (
            "server.keep_alive_idle",
            now.keep_alive_idle != then.keep_alive_idle,
        ),
        (
            "server.proxy_protocol",
            now.proxy_protocol != then.proxy_protocol
                || (now.proxy_protocol && now.trusted_proxies != then.trusted_proxies),
        ),
        (
            "admin.token_file",
            current.admin.token_file != next.admin.token_file,
        ),
        (
            "genesys.ca_file",
            current.genesys.ca_file != next.genesys.ca_file,
        ),
        ("server.listen", current.server.listen != next.server.listen),
        ("admin.listen", current.admin.listen != next.admin.listen),
        (
            "genesys.login_url",
            current.genesys.login_url != next.genesys.login_url,
        ),
        (
            "genesys.api_url",
            current.genesys.api_url != next.genesys.api_url,
        ),
        ("log.format", current.log != next.log),
        (
            "cluster (all but local_share)",
            current
                .cluster
                .as_ref()
                .map(|c| (&c.redis_url, &c.password_file, &c.ca_file, &c.key_prefix))
                != next
                    .cluster
                    .as_ref()
                    .map(|c| (&c.redis_url, &c.password_file, &c.ca_file, &c.key_prefix)),
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key)
    .collect()
}

/// Twice the longest an old channel keeps delivering after a switch
/// (`channel::longest_drain`), which bounds the skew between an event's two copies.
fn dedup_window(config: &Config) -> Duration {
    channel::longest_drain(config.handover.overlap, config.upstream.heartbeat) * 2
}

async fn close_idle_channels(
    sessions: Arc<Sessions>,
    config: Arc<ArcSwap<Config>>,
    initial_idle: Duration,
    shutdown: CancellationToken,
) {
    let mut idle = initial_idle;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(idle / 4) => {}
            _ = shutdown.cancelled() => return,
        }
        idle = config.load().server.client_idle;
        sessions.close_idle(idle).await;
    }
}
