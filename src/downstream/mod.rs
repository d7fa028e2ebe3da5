//! The client-facing listener: Genesys' notification REST surface and the client
//! WebSockets (`/channels/{id}`, `/stream?topics=…`). Clients send no credentials;
//! whatever `Authorization` or `purecloud-sdk` headers they send are ignored and
//! never forwarded.
//!
//! Every request passes the front door first (`gate`: `Host`, `Origin`, CORS, the
//! peer), every subscription change the topic policy and the peer's limits
//! (`subscribe`, `peers`), and every request leaves one line in the access log
//! (target [`ACCESS`]); every change of subscriptions one in the audit log
//! (target [`AUDIT`]).

pub mod available;
pub mod error;
pub mod gate;
pub mod peers;
pub mod sessions;
pub mod socket;
pub mod subscribe;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::drain::Drain;
use crate::front::route;
use crate::http_server::{self, Request, Response, json, query_param};
use crate::router::gap_frame;
use crate::ws;
use available::AvailableTopics;
use error::ClientError;
use gate::Admission;

use crate::fleet::Fleet;
use crate::fleet::directory::Directory;
use crate::router::{Offset, QueuedFrame};

/// How often the directory hears which channels have a socket.
const LISTING_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);
use peers::{Peers, SocketSlot};
use sessions::{Change, ClientChannel, Sessions};
use socket::ClientSocket;
use subscribe::Subscriptions;

/// The `tracing` target of the access log: one line per request or upgrade (peer,
/// method, route with ids redacted, status, duration).
pub const ACCESS: &str = "handover::access";
/// The `tracing` target of the audit log: one line per subscription change (peer,
/// client channel, topics added and removed): who read what.
pub const AUDIT: &str = "handover::audit";

pub struct Downstream {
    pub sessions: Arc<Sessions>,
    /// Read at each decision: `server.public_url` for a new channel's `connectUri`,
    /// `server.heartbeat` for a new socket, the front door, the topic policy and the
    /// limits.
    pub config: Arc<ArcSwap<Config>>,
    /// The client listener's bound address: the default `public_url` names it (with
    /// port 0 only the bound address is reachable).
    pub client_addr: SocketAddr,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    pub drain: Arc<Drain>,
    pub peers: Arc<Peers>,
    pub subscriptions: Arc<Subscriptions>,
    pub available: Arc<AvailableTopics>,
    /// With `[cluster]`: the fleet's client channels and event stream, so that a
    /// desktop moved from another replica keeps its channel and misses nothing.
    pub fleet: Option<Arc<Fleet>>,
}

impl Downstream {
    pub async fn handle(self: Arc<Self>, req: Request) -> Response {
        let config = self.config.load_full();
        let peer = gate::peer(&req, &config.server.trusted_proxies);
        let route = route::client_route(req.uri().path());
        let mut line = AccessLine {
            started: Instant::now(),
            peer,
            method: req.method().clone(),
            route,
            status: None,
        };
        let response = match gate::admit(&req, &config.server, peer, route, self.peers.refusals()) {
            Admission::Refused(response) | Admission::Preflight(response) => response,
            Admission::Admitted(origin) => {
                let mut response = match self.route(req, peer, &config).await {
                    Ok(response) => response,
                    Err(error) => error.into_response(),
                };
                gate::decorate(&mut response, origin.as_ref());
                response
            }
        };
        line.status = Some(response.status().as_u16());
        response
    }

    async fn route(
        &self,
        mut req: Request,
        peer: IpAddr,
        config: &Config,
    ) -> Result<Response, ClientError> {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match segments.as_slice() {
            ["api", "v2", "notifications", "channels"] => match method {
                Method::POST => self.create_channel(peer, config).await,
                // Genesys lists the caller's own channels; an anonymous caller has none.
                Method::GET => Ok(json(StatusCode::OK, &json!({ "entities": [] }))),
                _ => Err(method_not_allowed(&method)),
            },
            ["api", "v2", "notifications", "availabletopics"] if method == Method::GET => {
                let answer = self
                    .available
                    .answer(req.uri().query(), &config.topics)
                    .await?;
                Ok(json(StatusCode::OK, &answer))
            }
            ["api", "v2", "notifications", "channels", id] => match method {
                Method::HEAD => {
                    let status = if self.exists(id).await {
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
            ] => self.subscriptions(req, peer, config, id).await,
            ["channels", id] if method == Method::GET => {
                let channel = self.channel(id, peer, config).await?;
                self.own(&channel, peer).await;
                let slot = self.peers.open_socket(peer, &config.limits)?;
                self.open_socket(&mut req, channel, peer, slot, config, false)
            }
            ["stream"] if method == Method::GET => self.stream(req, peer, config).await,
            _ => Err(ClientError::not_found(format!("No resource at {path}"))),
        }
    }

    /// Client channel `id`: this replica's, or (with `[cluster]`) one the fleet's
    /// directory lists, taken over for `peer`: its topics subscribed here, and its
    /// next socket replayed what followed its position in the event stream.
    async fn channel(
        &self,
        id: &str,
        peer: IpAddr,
        config: &Config,
    ) -> Result<Arc<ClientChannel>, ClientError> {
        if let Some(channel) = self.sessions.get(id) {
            return Ok(channel);
        }
        let not_found = || ClientError::not_found(format!("Channel {id} not found"));
        let fleet = self.fleet.as_ref().ok_or_else(not_found)?;
        let listing = match fleet.directory.find(id).await {
            Ok(Some(listing)) => listing,
            Ok(None) => return Err(not_found()),
            Err(_) => {
                return Err(ClientError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service.unavailable",
                    "This channel is not on this proxy, and the fleet's directory cannot be reached: retry shortly",
                ));
            }
        };
        let Some(channel) = self.peers.take_over_channel(
            id,
            peer,
            &self.sessions,
            &config.limits,
            config.server.client_idle,
        )?
        else {
            // Another request took it over meanwhile.
            return self.sessions.get(id).ok_or_else(not_found);
        };
        if listing.position == crate::router::NOT_IN_STREAM {
            // Served nothing from the stream (a replica that could not reach Redis
            // listed it): nothing to replay from, only a gap to tell of.
            channel.outbox.missed_from(listing.seen);
        } else {
            channel.outbox.serve_from(listing.position);
        }
        // A request abandoned mid-subscribe leaves no half-taken channel behind.
        let mut unfinished = CloseOnDrop {
            sessions: self.sessions.clone(),
            tasks: self.tasks.clone(),
            id: Some(channel.id.clone()),
        };
        if !listing.topics.is_empty() {
            let topics = listing.topics.iter().cloned().collect();
            self.subscriptions
                .change(peer, &channel, Change::Replace(topics), true)
                .await?;
        }
        unfinished.id = None;
        tracing::info!(
            target: AUDIT,
            %peer,
            session = channel.session,
            topics = channel.topics().len(),
            "client channel taken over from another replica"
        );
        Ok(channel)
    }

    /// Whether channel `id` is this replica's or listed in the fleet's directory; a
    /// check takes nothing over (`HEAD` has no side effect).
    async fn exists(&self, id: &str) -> bool {
        if self.sessions.get(id).is_some() {
            return true;
        }
        match &self.fleet {
            Some(fleet) => matches!(fleet.directory.find(id).await, Ok(Some(_))),
            None => false,
        }
    }

    /// Lists `channel` (its topics now) in the fleet's directory, if there is one. A
    /// Redis that fails only costs a desktop moved elsewhere its channel.
    async fn list(&self, channel: &ClientChannel) {
        if let Some(fleet) = &self.fleet
            && let Err(error) = fleet
                .directory
                .list(&channel.id, &channel.topics(), channel.outbox.served_to())
                .await
        {
            tracing::debug!(%error, "client channel not listed in the fleet's directory");
        }
    }

    /// A new channel is served from the fleet's stream as it stands: what its topics
    /// get before its first socket opens is replayed to that socket.
    fn start_in_stream(&self, channel: &ClientChannel) {
        if let Some(fleet) = &self.fleet {
            channel.outbox.serve_from(fleet.bus.cursor());
        }
    }

    /// The base of every `connectUri` (`ws://host:port` or `wss://`, no trailing
    /// slash). The default names the listen address; with port 0 only the bound
    /// address is reachable.
    fn public_url(&self) -> String {
        let server = &self.config.load().server;
        let scheme = if server.tls.is_some() { "wss" } else { "ws" };
        if server.public_url == format!("{scheme}://{}", server.listen) {
            format!("{scheme}://{}", self.client_addr)
        } else {
            server.public_url.clone()
        }
    }

    /// `POST /api/v2/notifications/channels` (any body, including the SDK's `null`).
    async fn create_channel(&self, peer: IpAddr, config: &Config) -> Result<Response, ClientError> {
        let channel = self.peers.create_channel(
            peer,
            &self.sessions,
            &config.limits,
            config.server.client_idle,
        )?;
        self.start_in_stream(&channel);
        self.list(&channel).await;
        Ok(json(
            StatusCode::OK,
            &json!({
                "id": channel.id,
                "connectUri": format!("{}/channels/{}", self.public_url(), channel.id),
                "expires": humantime::format_rfc3339_millis(channel.expires).to_string(),
            }),
        ))
    }

    /// A subscription call's change (`None` for a `GET`), and its `ignoreErrors`.
    async fn read_change(
        req: Request,
        config: &Config,
    ) -> Result<(Option<Change>, bool), ClientError> {
        let method = req.method().clone();
        let ignore_errors =
            query_param(req.uri(), "ignoreErrors").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let change = match method {
            Method::GET => None,
            Method::DELETE => Some(Change::RemoveAll),
            Method::POST | Method::PUT => {
                let body =
                    http_server::read_body_within(req.into_body(), config.server.body_read_timeout)
                        .await
                        .map_err(|e| ClientError::new(e.status(), "bad.request", e.to_string()))?;
                let topics = parse_topics(&body)?;
                Some(if method == Method::POST {
                    Change::Add(topics)
                } else {
                    Change::Replace(topics)
                })
            }
            _ => return Err(method_not_allowed(&method)),
        };
        Ok((change, ignore_errors))
    }

    /// Carries out a subscription call on `channel` (this replica's), and relists it.
    async fn change_subscriptions(
        &self,
        peer: IpAddr,
        channel: &Arc<ClientChannel>,
        change: Option<Change>,
        ignore_errors: bool,
    ) -> Result<Vec<sessions::TopicAnswer>, ClientError> {
        let entities = match change {
            Some(change) => {
                self.subscriptions
                    .change(peer, channel, change, ignore_errors)
                    .await?
            }
            None => sessions::permitted(channel),
        };
        self.list(channel).await;
        Ok(entities)
    }

    /// A subscription call on channel `id`: carried out by the replica whose socket
    /// serves the channel (its subscriptions live there), or here.
    async fn subscriptions(
        &self,
        req: Request,
        peer: IpAddr,
        config: &Config,
        id: &str,
    ) -> Result<Response, ClientError> {
        if let Some(owner) = self.served_elsewhere(id).await {
            let (change, ignore_errors) = Self::read_change(req, config).await?;
            let entities = self
                .forward(&owner, id, peer, change, ignore_errors)
                .await?;
            return Ok(json(StatusCode::OK, &json!({ "entities": entities })));
        }
        let channel = self.channel(id, peer, config).await?;
        self.own(&channel, peer).await;
        let (change, ignore_errors) = Self::read_change(req, config).await?;
        let entities = self
            .change_subscriptions(peer, &channel, change, ignore_errors)
            .await?;
        Ok(json(StatusCode::OK, &json!({ "entities": entities })))
    }

    /// The live replica that serves channel `id`, if it is another one.
    async fn served_elsewhere(&self, id: &str) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        let listing = fleet.directory.find(id).await.ok()??;
        let elsewhere = !listing.owner.is_empty() && listing.owner != fleet.store.replica;
        (elsewhere && fleet.presence.is_alive(&listing.owner).await).then_some(listing.owner)
    }

    /// Has replica `owner` carry out a subscription call on channel `id`.
    async fn forward(
        &self,
        owner: &str,
        id: &str,
        peer: IpAddr,
        change: Option<Change>,
        ignore_errors: bool,
    ) -> Result<Value, ClientError> {
        let fleet = self
            .fleet
            .as_ref()
            .ok_or_else(|| ClientError::not_found(""))?;
        let call = json!({
            "channel": id, "peer": peer, "change": change, "ignoreErrors": ignore_errors,
        });
        let unavailable = || {
            ClientError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service.unavailable",
                "The proxy replica serving this channel did not answer: retry shortly",
            )
        };
        let answer = fleet.calls.forward(owner, call).await.map_err(|error| {
            tracing::warn!(%error, "a subscription call for a channel served by another replica failed");
            unavailable()
        })?;
        if let Some(entities) = answer.get("entities") {
            return Ok(entities.clone());
        }
        let error = &answer["error"];
        let status = error["status"]
            .as_u64()
            .and_then(|s| StatusCode::from_u16(s as u16).ok())
            .ok_or_else(unavailable)?;
        let mut refused = ClientError::new(
            status,
            error["code"].as_str().unwrap_or("error").to_owned(),
            error["message"].as_str().unwrap_or_default(),
        );
        refused.retry_after = error["retryAfterMs"]
            .as_u64()
            .map(std::time::Duration::from_millis);
        Err(refused)
    }

    /// Carries out a subscription call another replica forwarded (see
    /// [`Downstream::forward`]); the answer, or the error, as JSON.
    pub async fn carry_out(self: Arc<Self>, call: Value) -> Value {
        if let Some(id) = call["release"].as_str() {
            self.release(id).await;
            return Value::Null;
        }
        let outcome: Result<Vec<sessions::TopicAnswer>, ClientError> = async {
            let malformed = || ClientError::bad_request("malformed call between replicas");
            let id = call["channel"].as_str().ok_or_else(malformed)?;
            let peer: IpAddr =
                serde_json::from_value(call["peer"].clone()).map_err(|_| malformed())?;
            let change: Option<Change> =
                serde_json::from_value(call["change"].clone()).map_err(|_| malformed())?;
            let ignore_errors = call["ignoreErrors"].as_bool().unwrap_or(false);
            // The socket moved on meanwhile: the caller retries and finds where.
            let channel = self.sessions.get(id).ok_or_else(|| {
                ClientError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service.unavailable",
                    "This channel is moving between proxy replicas: retry shortly",
                )
            })?;
            self.change_subscriptions(peer, &channel, change, ignore_errors)
                .await
        }
        .await;
        match outcome {
            Ok(entities) => json!({ "entities": entities }),
            Err(error) => json!({ "error": {
                "status": error.status.as_u16(),
                "code": error.code,
                "message": error.message,
                "retryAfterMs": error.retry_after.map(|d| d.as_millis() as u64),
            }}),
        }
    }

    /// Another replica's socket serves channel `id` now: the copy here, if it has no
    /// socket, goes (its topics need not be carried here any more).
    async fn release(&self, id: &str) {
        let Some(channel) = self.sessions.get(id) else {
            return;
        };
        if channel.outbox.is_attached() {
            return;
        }
        self.sessions.close(id).await;
        tracing::info!(
            target: AUDIT,
            session = channel.session,
            "client channel released: another replica serves its socket"
        );
    }

    /// With `[cluster]`: channel `channel`, here, is served by this replica from now
    /// on. If the directory says another replica served it last (its socket moved
    /// here), this session takes the position and topics the directory has (a copy
    /// left here earlier is stale), and, if that replica is gone, its desktop hears of
    /// the span its topics may have had no carrier.
    async fn own(&self, channel: &Arc<ClientChannel>, peer: IpAddr) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let Ok(Some(listing)) = fleet.directory.find(&channel.id).await else {
            return;
        };
        if listing.owner == fleet.store.replica {
            return;
        }
        channel.outbox.serve_from(listing.position);
        if listing.topics != channel.topics() {
            let topics = listing.topics.iter().cloned().collect();
            if let Err(error) = self
                .subscriptions
                .change(peer, channel, Change::Replace(topics), true)
                .await
            {
                tracing::warn!(%error, "a moved channel's topics could not all be subscribed here");
            }
        }
        let _ = fleet.directory.claim(&channel.id).await;
        if !listing.owner.is_empty() {
            // The replica that served it lets go of its copy.
            let _ = fleet
                .calls
                .notify(&listing.owner, json!({ "release": channel.id }))
                .await;
        }
        if !listing.owner.is_empty() && !listing.topics.is_empty() {
            let live_since = SystemTime::now();
            self.tasks.spawn(tell_if_orphaned(
                fleet.clone(),
                channel.clone(),
                listing,
                live_since,
            ));
        }
    }

    /// `GET /stream?topics=a,b`: one URL, no REST dance. The topics are live upstream
    /// before the 101 is sent; the channel ends with the socket.
    async fn stream(
        &self,
        mut req: Request,
        peer: IpAddr,
        config: &Config,
    ) -> Result<Response, ClientError> {
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
        let slot = self.peers.open_socket(peer, &config.limits)?;
        let channel = self.peers.create_channel(
            peer,
            &self.sessions,
            &config.limits,
            config.server.client_idle,
        )?;
        self.start_in_stream(&channel);
        // Whatever happens to this request from here on (an error, or the desktop
        // going away mid-subscribe), the channel closes with it unless its socket
        // takes it over.
        let mut owner = CloseOnDrop {
            sessions: self.sessions.clone(),
            tasks: self.tasks.clone(),
            id: Some(channel.id.clone()),
        };
        self.subscriptions
            .change(peer, &channel, Change::Add(topics), false)
            .await?;
        let response = self.open_socket(&mut req, channel, peer, slot, config, true)?;
        owner.id = None;
        Ok(response)
    }

    /// Upgrades to the client socket of `channel` (replacing any socket it has); an
    /// `ephemeral` channel (`/stream`) ends with its socket. The socket holds `slot`,
    /// one of the peer's sockets, while it is open.
    fn open_socket(
        &self,
        req: &mut Request,
        channel: Arc<ClientChannel>,
        peer: IpAddr,
        slot: SocketSlot,
        config: &Config,
        ephemeral: bool,
    ) -> Result<Response, ClientError> {
        let (response, pending) = ws::accept(req).map_err(|refused| {
            ClientError::new(StatusCode::BAD_REQUEST, "bad.request", refused.to_string())
        })?;
        // With the fleet, the socket attaches between two batches of the stream's
        // entries: what came before `live_from` since the session's position is
        // replayed to it first.
        let (attachment, live_from) = match &self.fleet {
            Some(fleet) => {
                let (attachment, live_from) = fleet.bus.attach(&channel.outbox);
                (attachment, Some((fleet.clone(), live_from)))
            }
            None => (channel.outbox.attach(), None),
        };
        if let Some(from) = attachment.missed_since {
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
            subscriptions: self.subscriptions.clone(),
            peer,
            heartbeat: self.config.load().server.heartbeat,
            shutdown: self.shutdown.clone(),
            drain: self.drain.clone(),
            directory: self
                .fleet
                .as_ref()
                .filter(|_| !ephemeral)
                .map(|fleet| fleet.directory.clone()),
        };
        let sessions = self.sessions.clone();
        let (generation, frames, served) =
            (attachment.generation, attachment.frames, attachment.served);
        // The 101 must be written within the header read timeout too: a peer that
        // does not read it does not hold a socket slot.
        let handshake = config.server.header_read_timeout;
        self.tasks.spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(handshake, pending.open()).await {
                Ok(Ok(socket)) => {
                    let replay = match &live_from {
                        Some((fleet, to)) => replay(fleet, &channel, served, *to).await,
                        None => Vec::new(),
                    };
                    client.serve(socket, generation, frames, replay).await;
                }
                _ => channel.outbox.detach(generation),
            }
            if ephemeral {
                sessions.close(&channel.id).await;
            }
        });
        Ok(response)
    }
}

/// Keeps the directory's listings of this replica's channels with a socket fresh
/// (every second) until `shutdown`: a listing lapses `client_idle` after its last
/// socket, as the channel does.
pub async fn keep_listed(
    sessions: Arc<Sessions>,
    directory: Arc<Directory>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LISTING_REFRESH) => {}
            _ = shutdown.cancelled() => return,
        }
        // A frame routed just before this may still be on its way to the socket:
        // the listing says a refresh earlier, so that a gap told from it is wide
        // enough (a socket's end says exactly).
        let served_until = std::time::SystemTime::now() - LISTING_REFRESH;
        let _ = directory
            .seen(&sessions.connected_positions(), served_until)
            .await;
    }
}

/// What channel `channel` missed from the fleet's stream after `after` up to `to`
/// (where its socket's live frames begin): the entries on its topics, after a gap
/// notice for whatever the stream no longer holds.
async fn replay(
    fleet: &Fleet,
    channel: &ClientChannel,
    after: Offset,
    to: Offset,
) -> Vec<QueuedFrame> {
    let topics = channel.topics();
    let event_topics = topics
        .iter()
        .flat_map(|t| crate::topic::expansion(t))
        .collect();
    let named: Vec<&str> = topics.iter().map(String::as_str).collect();
    match fleet.bus.history(after, to, &event_topics).await {
        Ok(history) => {
            let mut frames = Vec::with_capacity(history.frames.len() + 1);
            if let Some((from, to)) = history.lost {
                frames.push((crate::router::NOT_IN_STREAM, gap_frame(from, to, &named)));
            }
            frames.extend(history.frames);
            frames
        }
        // Redis cannot be asked: what followed the position is a gap.
        Err(error) => {
            tracing::warn!(%error, "the fleet's stream cannot be read: a reconnected desktop hears of a gap instead of a replay");
            vec![(
                crate::router::NOT_IN_STREAM,
                gap_frame(crate::fleet::bus::time_of(after), SystemTime::now(), &named),
            )]
        }
    }
}

/// A channel taken over from `listing.owner`, its topics live here since
/// `live_since`: if that replica did not outlive this moment (it crashed, or let go
/// of its topics), what the topics got between its last beat and then may never have
/// reached the stream, and the desktop hears of that span.
async fn tell_if_orphaned(
    fleet: Arc<Fleet>,
    channel: Arc<ClientChannel>,
    listing: crate::fleet::directory::Listing,
    live_since: SystemTime,
) {
    if listing.owner.is_empty() {
        return;
    }
    let Err(last_beat) = fleet.presence.outlived(&listing.owner).await else {
        return;
    };
    // From the earlier of its last beat and its last word on this channel: an event
    // it took in just before it died may not have been appended yet.
    let since = last_beat.map_or(listing.seen, |beat| beat.min(listing.seen));
    let topics = channel.topics();
    let named: Vec<&str> = topics.iter().map(String::as_str).collect();
    tracing::info!(
        target: AUDIT,
        session = channel.session,
        "client channel taken over from a replica that is gone: its desktop hears of a gap"
    );
    channel
        .outbox
        .unwritten_since(since, |since| gap_frame(since, live_since, &named));
}

/// A request's line in the access log, written when the request ends: with its
/// status, or 499 (nginx's "client closed request") if the client went away first.
struct AccessLine {
    started: Instant,
    peer: IpAddr,
    method: Method,
    route: &'static str,
    status: Option<u16>,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        tracing::info!(
            target: ACCESS,
            peer = %self.peer,
            method = %self.method,
            route = self.route,
            status = self.status.unwrap_or(499),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "client request"
        );
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
