//! A faithful fake of Genesys Cloud's OAuth and notification services, for the
//! tests, the demo and the benches. It reproduces the unpleasant parts on purpose:
//! silent eviction of the 21st channel, one socket per channel, no buffering for a
//! closed socket, channels bound to the token that made them, 400 for bad secrets,
//! per-token rate limits, and realistic service times.
//!
//! Plain `http://` and `ws://`, meant for loopback. `/__mock/…` is its control API
//! (see `control.rs`).

mod api;
mod control;
mod errors;
mod events;
mod settings;
mod socket;
mod state;
mod topics;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use errors::Rejection;
pub use events::unix_micros;
pub use settings::{ClientSpec, DeathNotice, MockConfig, OtherChannels, ServiceTimes, Settings};
pub use state::RotationMode;

use crate::http_server::{self, Request, Response};
use events::StreamProgress;
use state::State;

/// A running fake, started on an ephemeral loopback port.
pub struct MockGenesys {
    addr: SocketAddr,
    shutdown: CancellationToken,
    finished: tokio::task::JoinHandle<()>,
}

impl MockGenesys {
    /// Starts the fake on `127.0.0.1:0`.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let finished = tokio::spawn(run(listener, config, shutdown.clone()));
        Ok(Self {
            addr,
            shutdown,
            finished,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`: both the login and the API base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every socket and waits until the fake has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.finished.await;
    }
}

/// Serves the fake on `listener` until `shutdown` is cancelled.
pub async fn run(listener: TcpListener, config: MockConfig, shutdown: CancellationToken) {
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            tracing::error!(%error, "fake Genesys Cloud: listener has no address");
            return;
        }
    };
    let fake = Arc::new(Fake {
        state: Mutex::new(State::new(config.clients, config.settings)),
        expiry_changed: Notify::new(),
        ws_base: config
            .socket_base
            .clone()
            .unwrap_or_else(|| format!("ws://{addr}")),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
        next_id: AtomicU64::new(1),
        streams: DashMap::new(),
    });
    fake.tasks.spawn(reap_expired(fake.clone()));
    let service = {
        let fake = fake.clone();
        move |req: Request| route(fake.clone(), req)
    };
    http_server::serve(listener, service, shutdown).await;
    fake.tasks.close();
    fake.tasks.wait().await;
}

/// What every handler shares.
struct Fake {
    state: Mutex<State>,
    /// Woken when a token or channel that may expire sooner than all others appears.
    expiry_changed: Notify,
    /// `ws://<addr>`, the base of every `connectUri`.
    ws_base: String,
    /// Socket tasks, paced streams and delayed closes.
    tasks: TaskTracker,
    shutdown: CancellationToken,
    next_id: AtomicU64,
    streams: DashMap<u64, Arc<StreamProgress>>,
}

impl Fake {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in the fake; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits the service time of one kind of call.
    async fn service_time(&self, pick: impl FnOnce(&ServiceTimes) -> Duration) {
        let delay = {
            let times = self.state().settings.service_times;
            times.draw(pick(&times))
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

async fn route(fake: Arc<Fake>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match segments.as_slice() {
        ["__mock", rest @ ..] => control::handle(&fake, req, rest).await,
        ["channels", channel_id] => socket::upgrade(&fake, req, channel_id).await,
        _ => api::handle(&fake, req, &segments).await,
    };
    match result {
        Ok(response) => response,
        Err(rejection) => {
            if segments.first() != Some(&"__mock") {
                fake.state()
                    .record_rejection(method.as_str(), &path, &rejection);
            }
            rejection.into_response()
        }
    }
}

/// Expires tokens and channels on time, so that sockets close when their token or
/// channel dies even if nobody calls the API.
async fn reap_expired(fake: Arc<Fake>) {
    loop {
        let next = fake.state().purge(Instant::now());
        let wake_at = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = fake.expiry_changed.notified() => {}
            _ = fake.shutdown.cancelled() => return,
        }
    }
}
