//! The admin listener (never on the client port): health, readiness, metrics, and
//! the credential drain that makes hard rotation possible.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{Method, StatusCode};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::{CredentialState, DrainError, TokenSource};
use crate::downstream::sessions::Sessions;
use crate::http_server::{self, Request, Response, json};
use crate::router::Router;
use crate::upstream::pool::Pool;

pub struct Admin {
    pub tokens: Arc<TokenSource>,
    pub pool: Arc<Pool>,
    pub router: Arc<Router>,
    pub sessions: Arc<Sessions>,
    pub config: Arc<arc_swap::ArcSwap<crate::config::Config>>,
    /// Cancelled when the stop begins (before the drain): `/readyz` answers 503.
    pub shutdown: CancellationToken,
    /// The proxy's tasks, counted for `/metrics` (a leak shows as growth).
    pub tasks: tokio_util::task::TaskTracker,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n".into()),
            (&Method::GET, ["readyz"]) => {
                if self.shutdown.is_cancelled() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into())
                } else if self.tokens.has_minted() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no token yet\n".into())
                }
            }
            (&Method::GET, ["metrics"]) => self.metrics(),
            (&Method::GET, ["admin", "credentials"]) => {
                let config = self.config.load();
                let list: Vec<_> = config
                    .credentials
                    .iter()
                    .map(|c| self.credential(&c.name))
                    .collect();
                json(StatusCode::OK, &list)
            }
            (&Method::GET, ["admin", "channels"]) => json(StatusCode::OK, &self.pool.channels()),
            (&Method::GET, ["admin", "handovers"]) => json(
                StatusCode::OK,
                &json!({
                    "completed": self.pool.handovers.load(Ordering::Relaxed),
                    "rebuilds": self.pool.rebuilds.load(Ordering::Relaxed),
                    "recent": self.pool.recent_handovers(),
                }),
            ),
            (&Method::POST, ["admin", "credentials", name, "drain"]) => {
                match self.tokens.drain(name) {
                    Ok(()) => {
                        let tokens = &self.tokens;
                        self.pool
                            .credentials_changed(&|name| tokens.is_draining(name));
                        json(StatusCode::ACCEPTED, &self.credential(name))
                    }
                    Err(error) => drain_error(error),
                }
            }
            (&Method::POST, ["admin", "credentials", name, "undrain"]) => {
                match self.tokens.undrain(name) {
                    Ok(()) => json(StatusCode::OK, &self.credential(name)),
                    Err(error) => drain_error(error),
                }
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &json!({"message": format!("No resource at {path}"), "code": "not.found", "status": 404}),
            ),
        }
    }

    fn credential(&self, name: &str) -> serde_json::Value {
        let state = self.tokens.state(name).unwrap_or(CredentialState::Active);
        json!({"name": name, "state": state, "channels": self.pool.open_channels_of(name)})
    }

    fn metrics(&self) -> Response {
        const GAUGE: &str = "gauge";
        const COUNTER: &str = "counter";
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let (routed, mints) = (&self.router.counters, &self.tokens.counters);
        let channels = self.pool.channels();
        let count = |pred: fn(&crate::upstream::state::ChannelView) -> bool| {
            channels.iter().filter(|c| pred(c)).count() as u64
        };
        let metrics: [(&str, &str, &str, u64); 15] = [
            (
                "handover_tasks",
                GAUGE,
                "Tasks running: listeners and housekeeping, one per client socket, subscription change and upstream channel.",
                self.tasks.len() as u64,
            ),
            (
                "handover_client_channels",
                GAUGE,
                "Client channels open.",
                self.sessions.count() as u64,
            ),
            (
                "handover_client_sockets",
                GAUGE,
                "Client WebSockets open.",
                self.sessions.connected() as u64,
            ),
            (
                "handover_topics",
                GAUGE,
                "Topics with at least one subscriber.",
                self.router.topic_count() as u64,
            ),
            (
                "handover_upstream_channels",
                GAUGE,
                "Upstream channels holding a budget slot.",
                count(|c| c.holds_slot),
            ),
            (
                "handover_upstream_sockets",
                GAUGE,
                "Upstream sockets open.",
                count(|c| c.socket_open),
            ),
            (
                "handover_token_mints_total",
                COUNTER,
                "Tokens minted.",
                load(&mints.minted),
            ),
            (
                "handover_token_mints_rejected_total",
                COUNTER,
                "Mints refused with invalid_client (a rotated or wrong secret).",
                load(&mints.rejected),
            ),
            (
                "handover_token_mints_failed_total",
                COUNTER,
                "Mints that failed otherwise (throttled, 5xx, unreachable).",
                load(&mints.failed),
            ),
            (
                "handover_handovers_total",
                COUNTER,
                "Planned make-before-break handovers completed.",
                load(&self.pool.handovers),
            ),
            (
                "handover_rebuilds_total",
                COUNTER,
                "Upstream channels rebuilt after an unplanned loss (clients got a gap notice).",
                load(&self.pool.rebuilds),
            ),
            (
                "handover_events_routed_total",
                COUNTER,
                "Upstream events routed (after deduplication).",
                load(&routed.events_routed),
            ),
            (
                "handover_deliveries_total",
                COUNTER,
                "Event frames queued to client sockets.",
                load(&routed.deliveries),
            ),
            (
                "handover_duplicates_suppressed_total",
                COUNTER,
                "Events dropped because another channel delivered them already.",
                load(&routed.duplicates_suppressed),
            ),
            (
                "handover_undeliverable_total",
                COUNTER,
                "Deliveries to subscribers with no open socket or a full queue.",
                load(&routed.undeliverable),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in metrics {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        http_server::with_body(StatusCode::OK, out.into(), "text/plain; version=0.0.4")
    }
}

fn text(status: StatusCode, body: String) -> Response {
    http_server::with_body(status, body.into(), "text/plain")
}

fn drain_error(error: DrainError) -> Response {
    let status = match error {
        DrainError::Unknown(_) => StatusCode::NOT_FOUND,
        DrainError::LastUsable(_) => StatusCode::CONFLICT,
    };
    json(
        status,
        &json!({"message": error.to_string(), "code": if status == StatusCode::CONFLICT { "conflict" } else { "not.found" }, "status": status.as_u16()}),
    )
}
