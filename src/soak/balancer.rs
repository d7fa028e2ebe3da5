//! A TCP balancer in front of several replicas, as a Kubernetes Service is: a new
//! connection goes to the next replica whose `/readyz` said 200 at the last poll
//! (every [`POLL`]), and to the one after if that one refuses it; a connection stays
//! on its replica until either side closes it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often each replica's readiness is asked.
pub const POLL: Duration = Duration::from_millis(100);

struct Backend {
    client: SocketAddr,
    readyz: String,
    ready: bool,
}

pub struct Balancer {
    pub addr: SocketAddr,
    backends: Mutex<Vec<Backend>>,
    next: AtomicUsize,
}

impl Balancer {
    /// Listens on a loopback port until `shutdown`.
    pub async fn start(
        http: reqwest::Client,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let balancer = Arc::new(Self {
            addr: listener.local_addr()?,
            backends: Mutex::default(),
            next: AtomicUsize::new(0),
        });
        tasks.spawn(balancer.clone().poll(http, shutdown.clone()));
        tasks.spawn(balancer.clone().accept(listener, tasks.clone(), shutdown));
        Ok(balancer)
    }

    fn backends(&self) -> std::sync::MutexGuard<'_, Vec<Backend>> {
        self.backends.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a replica (its client listener, and its admin base URL); it gets
    /// connections once its readiness says so.
    pub fn add(&self, client: SocketAddr, admin: &str) {
        self.backends().push(Backend {
            client,
            readyz: format!("{admin}/readyz"),
            ready: false,
        });
    }

    /// Forgets a replica (it is gone).
    pub fn remove(&self, client: SocketAddr) {
        self.backends().retain(|b| b.client != client);
    }

    /// Whether the replica at `client` is ready, as of the last poll.
    pub fn is_ready(&self, client: SocketAddr) -> bool {
        self.backends()
            .iter()
            .any(|b| b.client == client && b.ready)
    }

    async fn poll(self: Arc<Self>, http: reqwest::Client, shutdown: CancellationToken) {
        loop {
            let targets: Vec<(SocketAddr, String)> = self
                .backends()
                .iter()
                .map(|b| (b.client, b.readyz.clone()))
                .collect();
            for (client, readyz) in targets {
                let ready = http
                    .get(&readyz)
                    .timeout(POLL * 5)
                    .send()
                    .await
                    .is_ok_and(|reply| reply.status().is_success());
                if let Some(backend) = self.backends().iter_mut().find(|b| b.client == client) {
                    backend.ready = ready;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The ready replicas, starting with the next in turn.
    fn candidates(&self) -> Vec<SocketAddr> {
        let ready: Vec<SocketAddr> = self
            .backends()
            .iter()
            .filter(|b| b.ready)
            .map(|b| b.client)
            .collect();
        if ready.is_empty() {
            return ready;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
        ready[start..]
            .iter()
            .chain(&ready[..start])
            .copied()
            .collect()
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let Ok((mut inbound, _)) = accepted else {
                continue;
            };
            let balancer = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let mut outbound = None;
                for backend in balancer.candidates() {
                    if let Ok(stream) = TcpStream::connect(backend).await {
                        outbound = Some(stream);
                        break;
                    }
                }
                // No replica ready: the connection is refused, as by a Service
                // without endpoints.
                let Some(mut outbound) = outbound else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }
}
