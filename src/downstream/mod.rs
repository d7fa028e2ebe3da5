//! The client-facing listener: Genesys' notification REST surface and the client
//! WebSockets (`/channels/{id}`, `/stream?topics=…`). Clients send no credentials;
//! whatever `Authorization` or `purecloud-sdk` headers they send are ignored and
//! never forwarded.

pub mod error;
pub mod sessions;
pub mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::drain::Drain;
use crate::http_server::{self, Request, Response, json, query_param};
use crate::router::gap_frame;
use crate::ws;
use error::ClientError;
use sessions::{Change, ClientChannel, Sessions};
use socket::ClientSocket;

pub struct Downstream {
    pub sessions: Arc<Sessions>,
    /// Read at each decision: `server.public_url` for a new channel's `connectUri`,
    /// `server.heartbeat` for a new socket.
    pub config: Arc<ArcSwap<Config>>,
    /// The client listener's bound address: the default `public_url` names it (with
    /// port 0 only the bound address is reachable).
    pub client_addr: SocketAddr,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub drain: Arc<Drain>,
}

impl Downstream {
    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        match self.route(req).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }

    async fn route(&self, mut req: Request) -> Result<Response, ClientError> {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match segments.as_slice() {
            ["api", "v2", "notifications", "channels"] => match method {
                Method::POST => Ok(self.create_channel()),
                // Genesys lists the caller's own channels; an anonymous caller has none.
                Method::GET => Ok(json(StatusCode::OK, &json!({ "entities": [] }))),
                _ => Err(method_not_allowed(&method)),
            },
            ["api", "v2", "notifications", "channels", id] => match method {
                Method::HEAD => {
                    let status = if self.sessions.get(id).is_some() {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    };
                    let mut response = http_server::empty(status);
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok(response)
                }
                _ => Err(method_not_allowed(&method)),
            },
            [
                "api",
                "v2",
                "notifications",
                "channels",
                id,
                "subscriptions",
            ] => {
                let channel = self.channel(id)?;
                self.subscriptions(req, &channel).await
            }
            ["channels", id] if method == Method::GET => {
                let channel = self.channel(id)?;
                self.open_socket(&mut req, channel, false)
            }
            ["stream"] if method == Method::GET => self.stream(req).await,
            _ => Err(ClientError::not_found(format!("No resource at {path}"))),
        }
    }

    fn channel(&self, id: &str) -> Result<Arc<ClientChannel>, ClientError> {
        self.sessions
            .get(id)
            .ok_or_else(|| ClientError::not_found(format!("Channel {id} not found")))
    }

    /// The base of every `connectUri` (`ws://host:port`, no trailing slash).
    fn public_url(&self) -> String {
        let server = &self.config.load().server;
        if server.public_url == format!("ws://{}", server.listen) {
            format!("ws://{}", self.client_addr)
        } else {
            server.public_url.clone()
        }
    }

    /// `POST /api/v2/notifications/channels` (any body, including the SDK's `null`).
    fn create_channel(&self) -> Response {
        let channel = self.sessions.create();
        json(
            StatusCode::OK,
            &json!({
                "id": channel.id,
                "connectUri": format!("{}/channels/{}", self.public_url(), channel.id),
                "expires": humantime::format_rfc3339_millis(channel.expires).to_string(),
            }),
        )
    }

    async fn subscriptions(
        &self,
        req: Request,
        channel: &Arc<ClientChannel>,
    ) -> Result<Response, ClientError> {
        let method = req.method().clone();
        let ignore_errors =
            query_param(req.uri(), "ignoreErrors").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let change = match method {
            Method::GET => None,
            Method::DELETE => Some(Change::RemoveAll),
            Method::POST | Method::PUT => {
                let body = http_server::read_body(req.into_body())
                    .await
                    .map_err(|e| ClientError::bad_request(e.to_string()))?;
                let topics = parse_topics(&body)?;
                Some(if method == Method::POST {
                    Change::Add(topics)
                } else {
                    Change::Replace(topics)
                })
            }
            _ => return Err(method_not_allowed(&method)),
        };
        let entities = match change {
            Some(change) => self.sessions.change(channel, change, ignore_errors).await?,
            None => sessions::permitted(channel),
        };
        Ok(json(StatusCode::OK, &json!({ "entities": entities })))
    }

    /// `GET /stream?topics=a,b`: one URL, no REST dance. The topics are live upstream
    /// before the 101 is sent; the channel ends with the socket.
    async fn stream(&self, mut req: Request) -> Result<Response, ClientError> {
        let topics: Vec<String> = query_param(req.uri(), "topics")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if topics.is_empty() {
            return Err(ClientError::bad_request(
                "name the topics: /stream?topics=a,b",
            ));
        }
        if !ws::is_upgrade_request(req.headers()) {
            return Err(ClientError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade.required",
                "/stream only speaks WebSocket",
            ));
        }
        let channel = self.sessions.create();
        // Whatever happens to this request from here on (an error, or the desktop
        // going away mid-subscribe), the channel closes with it unless its socket
        // takes it over.
        let mut owner = CloseOnDrop {
            sessions: self.sessions.clone(),
            tasks: self.tasks.clone(),
            id: Some(channel.id.clone()),
        };
        self.sessions
            .change(&channel, Change::Add(topics), false)
            .await?;
        let response = self.open_socket(&mut req, channel, true)?;
        owner.id = None;
        Ok(response)
    }

    /// Upgrades to the client socket of `channel` (replacing any socket it has); an
    /// `ephemeral` channel (`/stream`) ends with its socket.
    fn open_socket(
        &self,
        req: &mut Request,
        channel: Arc<ClientChannel>,
        ephemeral: bool,
    ) -> Result<Response, ClientError> {
        let (response, pending) = ws::accept(req).map_err(|refused| {
            ClientError::new(StatusCode::BAD_REQUEST, "bad.request", refused.to_string())
        })?;
        let (generation, outbox, missed_since) = channel.outbox.attach();
        if let Some(from) = missed_since {
            // Events for this channel were dropped while it had no socket (or a too
            // slow one): say so first, so that the client can backfill over REST.
            let topics = channel.topics();
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            channel
                .outbox
                .send(&gap_frame(from, SystemTime::now(), &topics));
        }
        let client = ClientSocket {
            channel: channel.clone(),
            sessions: self.sessions.clone(),
            heartbeat: self.config.load().server.heartbeat,
            shutdown: self.shutdown.clone(),
            drain: self.drain.clone(),
        };
        let sessions = self.sessions.clone();
        self.tasks.spawn(async move {
            match pending.open().await {
                Ok(socket) => client.serve(socket, generation, outbox).await,
                Err(_) => channel.outbox.detach(generation),
            }
            if ephemeral {
                sessions.close(&channel.id).await;
            }
        });
        Ok(response)
    }
}

/// Closes an ephemeral client channel when dropped, unless `id` was taken: a
/// `/stream` upgrade abandoned at any point leaves nothing behind.
struct CloseOnDrop {
    sessions: Arc<Sessions>,
    tasks: TaskTracker,
    id: Option<String>,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        let sessions = self.sessions.clone();
        // Closing waits for the channel's change in flight; it must outlive us. Without
        // a runtime (it is being torn down) there is nothing left to give back.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(
                self.tasks
                    .track_future(async move { sessions.close(&id).await }),
            );
        }
    }
}

fn method_not_allowed(method: &Method) -> ClientError {
    ClientError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method.not.allowed",
        format!("Method {method} is not allowed here"),
    )
}

/// `[{"id":"topic"}, …]`.
pub fn parse_topics(body: &Bytes) -> Result<Vec<String>, ClientError> {
    #[derive(Deserialize)]
    struct TopicRef {
        id: String,
    }
    let topics: Vec<TopicRef> = serde_json::from_slice(body).map_err(|e| {
        ClientError::bad_request(format!(
            "The request body must be a JSON array of {{\"id\": topic}}: {e}"
        ))
    })?;
    Ok(topics.into_iter().map(|t| t.id).collect())
}
