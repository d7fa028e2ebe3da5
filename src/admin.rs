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
    /// `[admin] token_file`: read at every request (rotating it is writing it).
    pub token_file: Option<std::path::PathBuf>,
}

impl Admin {
    /// [`Admin::handle`], with its line in the access log (target `handover::access`).
    pub async fn handle_logged(self: Arc<Self>, req: Request) -> Response {
        let started = tokio::time::Instant::now();
        let peer = req
            .extensions()
            .get::<http_server::ConnInfo>()
            .map(|conn| conn.client().ip());
        let method = req.method().clone();
        let route = crate::front::route::admin_route(req.uri().path());
        let response = self.handle(req).await;
        tracing::info!(
            target: crate::downstream::ACCESS,
            peer = ?peer,
            %method,
            route,
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            "admin request"
        );
        response
    }

    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        if let Some(refused) = self.gate(&req) {
            return refused;
        }
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

    /// The admin listener's door (`front::admin`): no browsers, JSON or no body on
    /// state-changing calls, the bearer token when one is configured, and without
    /// one only IP-address or `localhost` Hosts. `Some` is the refusal.
    fn gate(&self, req: &Request) -> Option<Response> {
        use crate::front::admin::{AdminRefusal, is_open_route, judge};
        let (method, path) = (req.method(), req.uri().path());
        let token = match &self.token_file {
            None => None,
            Some(file) => match read_token(file) {
                Ok(token) => Some(token),
                // Fail closed: without the token nobody gets past it.
                Err(error) if !is_open_route(method, path) => {
                    tracing::error!(%error, "cannot read the admin token: guarded admin routes answer 401");
                    return Some(refused(AdminRefusal::Unauthorized));
                }
                Err(_) => None,
            },
        };
        let refusal = judge(method, path, req.headers(), token.as_ref()).err()?;
        // metrics: admin requests refused, by reason.
        tracing::warn!(
            route = crate::front::route::admin_route(path),
            reason = refusal.message(),
            "admin request refused"
        );
        Some(refused(refusal))
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

/// An admin refusal in Genesys' error shape (401 with `WWW-Authenticate: Bearer`).
fn refused(refusal: crate::front::admin::AdminRefusal) -> Response {
    let status = refusal.status();
    let code = match refusal {
        crate::front::admin::AdminRefusal::Unauthorized => "unauthorized",
        crate::front::admin::AdminRefusal::Forbidden(_) => "forbidden",
        crate::front::admin::AdminRefusal::UnsupportedMediaType => "unsupported.media.type",
    };
    let mut response = json(
        status,
        &json!({"message": refusal.message(), "code": code, "status": status.as_u16()}),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    response
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

/// The admin token in `path`, trimmed; an empty file is an error (it would let
/// anyone in who sends an empty token).
pub fn read_token(path: &std::path::Path) -> Result<crate::secret::Secret, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("admin.token_file {}: {e}", path.display()))?,
    );
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("admin.token_file {} is empty", path.display()));
    }
    Ok(crate::secret::Secret::from(token))
}
