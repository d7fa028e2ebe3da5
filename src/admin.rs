//! The admin listener (never on the client port): health, readiness, metrics, and
//! the credential drain that makes hard rotation possible.
//!
//! It knows no part of the proxy. It gets the metrics registry (each part registered
//! its own), a readiness check, and the operations an operator may ask for; every
//! answer is built from serde types.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the process serves (liveness) |
//! | `GET /readyz` | 200 `ready` from the first token minted until the stop begins; 503 with the reason otherwise |
//! | `GET /metrics` | the metrics, OpenMetrics text |
//! | `GET /admin/credentials` | `[{"name","state","channels"}]` |
//! | `POST /admin/credentials/{name}/drain` | 202 and the credential: its channels move to another, make-before-break; 404 unknown, 409 the last usable one |
//! | `POST /admin/credentials/{name}/undrain` | 200 and the credential |
//! | `GET /admin/channels` | the upstream channels: key, role, credential, topics, socket, slot |

use std::sync::Arc;

use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::auth::{CredentialState, DrainError};
use crate::http_server::{self, Request, Response, json};
use crate::metrics::{self, Registry};
use crate::upstream::state::ChannelView;

/// Whether the proxy should get traffic: `Err` says why not.
pub trait Readiness: Send + Sync {
    fn ready(&self) -> Result<(), &'static str>;
}

/// What an operator may see and do through the admin listener.
pub trait Operations: Send + Sync {
    fn credentials(&self) -> Vec<CredentialStatus>;
    /// Drains a credential set: its channels move to another, make-before-break.
    fn drain(&self, name: &str) -> Result<CredentialStatus, DrainError>;
    fn undrain(&self, name: &str) -> Result<CredentialStatus, DrainError>;
    fn channels(&self) -> Vec<ChannelView>;
}

/// A credential set as `GET /admin/credentials` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct CredentialStatus {
    pub name: String,
    pub state: CredentialState,
    /// Upstream channels with an open socket minted with it.
    pub channels: usize,
}

/// Genesys' error shape, for the admin listener's own errors.
#[derive(Serialize)]
struct AdminError {
    message: String,
    code: &'static str,
    status: u16,
}

pub struct Admin {
    pub metrics: Arc<Registry>,
    pub readiness: Arc<dyn Readiness>,
    pub operations: Arc<dyn Operations>,
    /// `[admin] token_file`: read at every request (rotating it is writing it).
    pub token_file: Option<std::path::PathBuf>,
    /// Requests refused at the gate, by reason (`unauthorized`, `forbidden`,
    /// `unsupported.media.type`).
    pub refusals: metrics::ByReason,
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
            (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
            (&Method::GET, ["readyz"]) => match self.readiness.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
            },
            (&Method::GET, ["metrics"]) => http_server::with_body(
                StatusCode::OK,
                metrics::encode(&self.metrics).into(),
                metrics::CONTENT_TYPE,
            ),
            (&Method::GET, ["admin", "credentials"]) => {
                json(StatusCode::OK, &self.operations.credentials())
            }
            (&Method::GET, ["admin", "channels"]) => {
                json(StatusCode::OK, &self.operations.channels())
            }
            (&Method::POST, ["admin", "credentials", name, "drain"]) => {
                match self.operations.drain(name) {
                    Ok(status) => json(StatusCode::ACCEPTED, &status),
                    Err(error) => drain_error(error),
                }
            }
            (&Method::POST, ["admin", "credentials", name, "undrain"]) => {
                match self.operations.undrain(name) {
                    Ok(status) => json(StatusCode::OK, &status),
                    Err(error) => drain_error(error),
                }
            }
            _ => json(
                StatusCode::NOT_FOUND,
                &AdminError {
                    message: format!("No resource at {path}"),
                    code: "not.found",
                    status: 404,
                },
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
        self.refusals.count(refusal.code());
        tracing::warn!(
            route = crate::front::route::admin_route(path),
            reason = refusal.message(),
            "admin request refused"
        );
        Some(refused(refusal))
    }
}

/// An admin refusal in Genesys' error shape (401 with `WWW-Authenticate: Bearer`).
fn refused(refusal: crate::front::admin::AdminRefusal) -> Response {
    let status = refusal.status();
    let code = refusal.code();
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

fn text(status: StatusCode, body: &str) -> Response {
    http_server::with_body(status, body.to_owned().into(), "text/plain")
}

fn drain_error(error: DrainError) -> Response {
    let (status, code) = match error {
        DrainError::Unknown(_) => (StatusCode::NOT_FOUND, "not.found"),
        DrainError::LastUsable(_) => (StatusCode::CONFLICT, "conflict"),
    };
    json(
        status,
        &json!(AdminError {
            message: error.to_string(),
            code,
            status: status.as_u16(),
        }),
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
