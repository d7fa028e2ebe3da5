//! The fake's state: OAuth clients, tokens, channels, subscriptions, sockets and
//! statistics. One mutex guards all of it: every operation is short, and a single
//! lock makes the fake's rules (eviction, revocation, the one-socket rule) easy to
//! see and impossible to race.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::errors::Rejection;
use super::settings::{ClientSpec, DeathNotice, Settings};

/// How many frames may wait for one socket before the fake drops events for it
/// (Genesys does not buffer for slow readers either).
pub const SOCKET_QUEUE: usize = 8192;
const REJECTIONS_KEPT: usize = 10_000;

/// What a socket task is told to do.
#[derive(Debug)]
pub enum SocketCommand {
    Frame(Utf8Bytes),
    /// Go silent without closing: no events, heartbeats or pongs from now on (a
    /// half-dead connection, as a broken network path looks).
    Stall,
    Close {
        notice: Option<Utf8Bytes>,
        code: CloseCode,
        reason: &'static str,
    },
}

/// How a secret rotation treats the tokens minted with the old secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationMode {
    /// Old tokens, and their channels, live until they expire.
    KeepTokens,
    /// Old tokens die at once, and so do the channels and sockets they created.
    RevokeTokens,
}

/// A forced fault on the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFault {
    /// 400 `invalid_request` "rate limit exceeded; …".
    Throttle,
    /// The given 5xx status.
    Outage(http::StatusCode),
}

struct OAuthClient {
    secret: String,
    token_ttl: Duration,
    idle_timeout: Option<Duration>,
    tokens_issued: u64,
    channels_created: u64,
    peak_channels: usize,
    /// This client's channels Genesys evicted because one more was created.
    evictions: u64,
}

struct Token {
    client_id: String,
    expires_at: Instant,
    /// The org's idle timeout for this token, and its last API call.
    idle_timeout: Option<Duration>,
    last_active: Instant,
    /// Times of this token's API requests inside the rate window.
    recent_requests: VecDeque<Instant>,
}

impl Token {
    /// When the token dies: at its expiry, or earlier if it idles.
    fn dies_at(&self) -> Instant {
        match self.idle_timeout {
            Some(idle) => self.expires_at.min(later(self.last_active, idle)),
            None => self.expires_at,
        }
    }
}

struct Socket {
    id: u64,
    tx: mpsc::Sender<SocketCommand>,
}

struct Channel {
    client_id: String,
    token: String,
    /// Creation order, to break ties between equally old channels.
    serial: u64,
    expires_at: Instant,
    last_used: Instant,
    /// Topics as the caller named them (combined topics kept whole).
    subscriptions: BTreeSet<String>,
    /// Expanded topic → how many subscriptions name it.
    matched: HashMap<String, u32>,
    socket: Option<Socket>,
    delivered: u64,
    dropped: u64,
}

impl Channel {
    fn close_socket(&mut self, notice: Option<Utf8Bytes>, code: CloseCode, reason: &'static str) {
        if let Some(socket) = self.socket.take() {
            // A full queue means the socket task is stuck; dropping the sender ends it.
            let _ = socket.tx.try_send(SocketCommand::Close {
                notice,
                code,
                reason,
            });
        }
    }
}

/// One topic of a subscription answer.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelTopic {
    pub id: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejection_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_permissions: Vec<&'static str>,
}

impl ChannelTopic {
    fn permitted(id: String) -> Self {
        Self {
            id,
            state: "Permitted",
            rejection_reason: None,
            missing_permissions: Vec::new(),
        }
    }

    fn rejected(id: String) -> Self {
        Self {
            id,
            state: "Rejected",
            rejection_reason: Some("MissingPermissions"),
            missing_permissions: vec!["notifications:topic:view"],
        }
    }
}

/// How a subscription call changes a channel's topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionChange {
    Add,
    Replace,
}

/// One entry of a channel listing.
pub struct ListedChannel {
    /// `None` for a channel of another token of the same OAuth client, whose id is
    /// not shown.
    pub id: Option<String>,
    pub expires: SystemTime,
}

/// A freshly created channel, as the REST answer needs it.
pub struct NewChannel {
    pub id: String,
    pub expires: SystemTime,
}

pub struct State {
    pub settings: Settings,
    clients: HashMap<String, OAuthClient>,
    tokens: HashMap<String, Token>,
    channels: HashMap<String, Channel>,
    /// Expanded topic → ids of the channels subscribed to it.
    topic_index: HashMap<String, HashSet<String>>,
    token_fault: Option<(TokenFault, Option<u32>)>,
    /// Subscription changes still to refuse wholesale with 400.
    refuse_subscriptions: u32,
    next_serial: u64,
    next_event_seq: u64,
    counters: Counters,
    rejected: VecDeque<RejectedCall>,
}

#[derive(Clone, Copy, Default, Serialize)]
struct Counters {
    evictions: u64,
    /// Most channels alive at once, over all OAuth clients.
    peak_live_channels: usize,
    socket_connects: u64,
    events_published: u64,
    events_delivered: u64,
    /// Events a subscribed channel missed because no socket was open (no buffering)
    /// or its socket's queue was full.
    events_dropped: u64,
    rejected_total: u64,
    /// Tokens that died of the idle timeout (before their expiry).
    tokens_idled: u64,
}

#[derive(Clone, Serialize)]
struct RejectedCall {
    method: String,
    path: String,
    #[serde(flatten)]
    rejection: Rejection,
}

impl State {
    pub fn new(clients: Vec<ClientSpec>, settings: Settings) -> Self {
        let mut state = Self {
            settings,
            clients: HashMap::new(),
            tokens: HashMap::new(),
            channels: HashMap::new(),
            topic_index: HashMap::new(),
            token_fault: None,
            refuse_subscriptions: 0,
            next_serial: 0,
            next_event_seq: 0,
            counters: Counters::default(),
            rejected: VecDeque::new(),
        };
        for client in clients {
            state.add_client(client);
        }
        state
    }

    /// Registers (or replaces) an OAuth client.
    pub fn add_client(&mut self, spec: ClientSpec) {
        self.clients.insert(
            spec.id,
            OAuthClient {
                secret: spec.secret,
                token_ttl: spec.token_ttl,
                idle_timeout: spec.idle_timeout,
                tokens_issued: 0,
                channels_created: 0,
                peak_channels: 0,
                evictions: 0,
            },
        );
    }

    // ---- OAuth -------------------------------------------------------------------

    pub fn set_token_fault(&mut self, fault: Option<(TokenFault, Option<u32>)>) {
        self.token_fault = fault;
    }

    /// The client-credentials grant. Returns the token and its lifetime.
    pub fn mint(
        &mut self,
        client_id: &str,
        secret: &str,
        now: Instant,
    ) -> Result<(String, Duration), Rejection> {
        if let Some(fault) = self.take_token_fault() {
            return Err(match fault {
                TokenFault::Throttle => {
                    Rejection::oauth("invalid_request", "rate limit exceeded; try again later")
                }
                TokenFault::Outage(status) => {
                    Rejection::api(status, "service.unavailable", "The service is unavailable.")
                }
            });
        }
        let Some(client) = self.clients.get_mut(client_id) else {
            return Err(Rejection::oauth("invalid_client", "client not found"));
        };
        if client.secret != secret {
            return Err(Rejection::oauth("invalid_client", "authentication failed"));
        }
        client.tokens_issued += 1;
        let ttl = client.token_ttl;
        let idle_timeout = client.idle_timeout;
        let token = random_token();
        self.tokens.insert(
            token.clone(),
            Token {
                client_id: client_id.to_owned(),
                expires_at: later(now, ttl),
                idle_timeout,
                last_active: now,
                recent_requests: VecDeque::new(),
            },
        );
        Ok((token, ttl))
    }

    fn take_token_fault(&mut self) -> Option<TokenFault> {
        let (fault, remaining) = self.token_fault.as_mut()?;
        let fault = *fault;
        if let Some(remaining) = remaining {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.token_fault = None;
            }
        }
        Some(fault)
    }

    /// Refuses the next `count` subscription changes (POST/PUT) as a whole with 400,
    /// as Genesys does for a change it will not take.
    pub fn refuse_subscriptions(&mut self, count: u32) {
        self.refuse_subscriptions = count;
    }

    /// `GET /api/v2/tokens/me`: the token's OAuth client, and when it idles if the
    /// idle timeout applies to it.
    pub fn token_info(&self, bearer: &str, now: Instant) -> Option<(String, Option<SystemTime>)> {
        let token = self.tokens.get(bearer)?;
        let idles = token
            .idle_timeout
            .map(|idle| wall_clock(later(token.last_active, idle), now));
        Some((token.client_id.clone(), idles))
    }

    /// Checks a bearer token and charges one request to its rate limit; the call
    /// counts as activity for the idle timeout unless `preserve_idle`.
    pub fn authorize(
        &mut self,
        bearer: Option<&str>,
        preserve_idle: bool,
        now: Instant,
    ) -> Result<(), Rejection> {
        let Some(bearer) = bearer.filter(|b| !b.is_empty()) else {
            return Err(Rejection::unauthenticated(
                "authentication.required",
                "No authentication bearer token specified in authorization header.",
            ));
        };
        let limit = self.settings.rate_limit_per_min as usize;
        let window = self.settings.rate_window;
        let Some(token) = self.tokens.get_mut(bearer).filter(|t| t.dies_at() > now) else {
            return Err(Rejection::unauthenticated(
                "bad.credentials",
                "Invalid login credentials.",
            ));
        };
        if !preserve_idle {
            token.last_active = now;
        }
        if limit == 0 {
            return Ok(());
        }
        while token
            .recent_requests
            .front()
            .is_some_and(|&t| t + window <= now)
        {
            token.recent_requests.pop_front();
        }
        if token.recent_requests.len() >= limit {
            let oldest = token.recent_requests[0];
            let wait = (oldest + window).saturating_duration_since(now);
            return Err(Rejection::rate_limited(
                wait.as_secs_f64().ceil().max(1.0) as u64
            ));
        }
        token.recent_requests.push_back(now);
        Ok(())
    }

    /// Sets a client's secret; in `RevokeTokens` mode its tokens die with their channels.
    pub fn rotate_secret(
        &mut self,
        client_id: &str,
        secret: String,
        mode: RotationMode,
    ) -> Result<usize, Rejection> {
        let client = self
            .clients
            .get_mut(client_id)
            .ok_or_else(|| Rejection::not_found(format!("no OAuth client {client_id}")))?;
        client.secret = secret;
        Ok(match mode {
            RotationMode::KeepTokens => 0,
            RotationMode::RevokeTokens => self.revoke_where(|t| t.client_id == client_id),
        })
    }

    /// Revokes one token: its channels' sockets get `v2.system.token_revoked.<id>`,
    /// then close.
    pub fn revoke_token(&mut self, token: &str) -> usize {
        usize::from(self.revoke_one(token))
    }

    /// Revokes every token of a client.
    pub fn revoke_client_tokens(&mut self, client_id: &str) -> usize {
        self.revoke_where(|t| t.client_id == client_id)
    }

    /// Revokes the token that created a channel.
    pub fn revoke_channel_token(&mut self, channel_id: &str) -> usize {
        match self.channels.get(channel_id).map(|c| c.token.clone()) {
            Some(token) => usize::from(self.revoke_one(&token)),
            None => 0,
        }
    }

    fn revoke_where(&mut self, pred: impl Fn(&Token) -> bool) -> usize {
        let doomed: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| pred(t))
            .map(|(k, _)| k.clone())
            .collect();
        doomed.iter().filter(|t| self.revoke_one(t)).count()
    }

    fn revoke_one(&mut self, token: &str) -> bool {
        if self.tokens.remove(token).is_none() {
            return false;
        }
        for id in self.channel_ids_where(|c| c.token == token) {
            let notice = Some(system_frame(
                &format!("v2.system.token_revoked.{id}"),
                &id,
                "token_revoked",
                "user_tokens_revoked",
            ));
            self.remove_channel(&id, notice, CloseCode::Policy, "token revoked");
        }
        true
    }

    // ---- channels ----------------------------------------------------------------

    fn token(&self, bearer: &str) -> Result<&Token, Rejection> {
        self.tokens.get(bearer).ok_or_else(|| {
            Rejection::unauthenticated("bad.credentials", "Invalid login credentials.")
        })
    }

    /// `POST /api/v2/notifications/channels`: the token must be authorised already.
    pub fn create_channel(&mut self, bearer: &str, now: Instant) -> Result<NewChannel, Rejection> {
        let client_id = self.token(bearer)?.client_id.clone();
        let max = self.settings.max_channels_per_client.max(1);
        loop {
            let owned = self.channel_ids_where(|c| c.client_id == client_id);
            if owned.len() < max {
                break;
            }
            // Genesys: "Creating a 21st channel will remove the channel with oldest
            // last used date. Channels without an active connection will be removed
            // first." The creator is not told.
            let victim = owned
                .into_iter()
                .min_by_key(|id| {
                    let c = &self.channels[id];
                    (c.socket.is_some(), c.last_used, c.serial)
                })
                .expect("owned is not empty");
            let notice = self.death_notice();
            self.remove_channel(&victim, notice, CloseCode::Normal, "channel evicted");
            self.counters.evictions += 1;
            if let Some(client) = self.clients.get_mut(&client_id) {
                client.evictions += 1;
            }
        }
        let id = random_channel_id();
        self.next_serial += 1;
        let ttl = self.settings.channel_ttl;
        self.channels.insert(
            id.clone(),
            Channel {
                client_id: client_id.clone(),
                token: bearer.to_owned(),
                serial: self.next_serial,
                expires_at: later(now, ttl),
                last_used: now,
                subscriptions: BTreeSet::new(),
                matched: HashMap::new(),
                socket: None,
                delivered: 0,
                dropped: 0,
            },
        );
        let live = self.channel_ids_where(|c| c.client_id == client_id).len();
        self.counters.peak_live_channels =
            self.counters.peak_live_channels.max(self.channels.len());
        let client = self
            .clients
            .get_mut(&client_id)
            .expect("a token's client exists");
        client.channels_created += 1;
        client.peak_channels = client.peak_channels.max(live);
        Ok(NewChannel {
            id,
            expires: wall_clock(later(now, ttl), now),
        })
    }

    /// `GET /api/v2/notifications/channels`: the channels the token created, or with
    /// `across_client` (`includechannels=oauthclient`) every live channel of its OAuth
    /// client, in creation order; the id only of the token's own ones. `None` for an
    /// unknown token.
    pub fn list_channels(
        &self,
        bearer: &str,
        across_client: bool,
        now: Instant,
    ) -> Option<Vec<ListedChannel>> {
        let client_id = &self.tokens.get(bearer)?.client_id;
        let mut list: Vec<(&String, &Channel)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.token == bearer || (across_client && &c.client_id == client_id))
            .collect();
        list.sort_by_key(|(_, c)| c.serial);
        Some(
            list.into_iter()
                .map(|(id, c)| ListedChannel {
                    id: (c.token == bearer).then(|| id.clone()),
                    expires: wall_clock(c.expires_at, now),
                })
                .collect(),
        )
    }

    /// The channel, if `bearer` may manage it: 404 if it does not exist, 403 if it
    /// belongs to another token (strict) or another OAuth client.
    fn managed_channel(
        &mut self,
        bearer: &str,
        channel_id: &str,
        now: Instant,
    ) -> Result<&mut Channel, Rejection> {
        let caller_client = self.token(bearer)?.client_id.clone();
        let strict = self.settings.strict_channel_owner;
        let channel = self
            .channels
            .get_mut(channel_id)
            .ok_or_else(|| Rejection::not_found(format!("Channel {channel_id} not found")))?;
        let allowed = if strict {
            channel.token == bearer
        } else {
            channel.client_id == caller_client
        };
        if !allowed {
            return Err(Rejection::forbidden(
                "not.authorized",
                "This channel was created with a different access token.",
            ));
        }
        channel.last_used = now;
        Ok(channel)
    }

    /// `HEAD /api/v2/notifications/channels/{id}`.
    pub fn channel_exists(
        &mut self,
        bearer: &str,
        channel_id: &str,
        now: Instant,
    ) -> Result<(), Rejection> {
        self.managed_channel(bearer, channel_id, now).map(|_| ())
    }

    /// `GET …/subscriptions`.
    pub fn subscriptions(
        &mut self,
        bearer: &str,
        channel_id: &str,
        now: Instant,
    ) -> Result<Vec<ChannelTopic>, Rejection> {
        let channel = self.managed_channel(bearer, channel_id, now)?;
        Ok(channel
            .subscriptions
            .iter()
            .cloned()
            .map(ChannelTopic::permitted)
            .collect())
    }

    /// `POST` (add) or `PUT` (replace) `…/subscriptions`. Without `ignore_errors`, one
    /// topic the client may not see fails the whole request with 403; with it, such
    /// topics come back `Rejected`. More than the topic limit fails with 400.
    pub fn subscribe(
        &mut self,
        bearer: &str,
        channel_id: &str,
        topics: Vec<String>,
        change: SubscriptionChange,
        ignore_errors: bool,
        now: Instant,
    ) -> Result<Vec<ChannelTopic>, Rejection> {
        let max_len = self.settings.max_topic_len;
        if let Some(bad) = topics
            .iter()
            .find(|t| t.is_empty() || t.chars().count() >= max_len)
        {
            return Err(Rejection::bad_request(format!(
                "Topic name must be between 1 and {} characters: {bad:.40}",
                max_len - 1
            )));
        }
        let (permitted, rejected): (Vec<String>, Vec<String>) = topics
            .into_iter()
            .partition(|t| !self.settings.is_denied(t));
        if !rejected.is_empty() && !ignore_errors {
            return Err(Rejection::forbidden(
                "missing.permissions",
                format!("Missing permission to subscribe to topic {}", rejected[0]),
            ));
        }
        let max_topics = self.settings.max_topics_per_channel;
        let ttl = self.settings.channel_ttl;
        // The channel must exist and be the caller's before anything else is judged.
        self.managed_channel(bearer, channel_id, now)?;
        if self.refuse_subscriptions > 0 {
            self.refuse_subscriptions -= 1;
            return Err(Rejection::bad_request(
                "The subscription request could not be processed.",
            ));
        }
        let channel = self.managed_channel(bearer, channel_id, now)?;
        let mut next: BTreeSet<String> = match change {
            SubscriptionChange::Add => channel.subscriptions.clone(),
            SubscriptionChange::Replace => BTreeSet::new(),
        };
        next.extend(permitted);
        let expanded: usize = next.iter().map(|t| expand_topic(t).len()).sum();
        if expanded > max_topics {
            return Err(Rejection::bad_request(format!(
                "Channel topic limit of {max_topics} exceeded ({expanded} topics requested)"
            )));
        }
        // "To maintain a channel for longer than 24 hours, resubscribe to topics."
        channel.expires_at = later(now, ttl);
        let previous = std::mem::replace(&mut channel.subscriptions, next.clone());
        for topic in previous.difference(&next).cloned().collect::<Vec<_>>() {
            self.unindex(channel_id, &topic);
        }
        for topic in next.difference(&previous).cloned().collect::<Vec<_>>() {
            self.index(channel_id, &topic);
        }
        let mut answer: Vec<ChannelTopic> = next.into_iter().map(ChannelTopic::permitted).collect();
        answer.extend(rejected.into_iter().map(ChannelTopic::rejected));
        Ok(answer)
    }

    /// `DELETE …/subscriptions`.
    pub fn unsubscribe_all(
        &mut self,
        bearer: &str,
        channel_id: &str,
        now: Instant,
    ) -> Result<(), Rejection> {
        let channel = self.managed_channel(bearer, channel_id, now)?;
        for topic in std::mem::take(&mut channel.subscriptions) {
            self.unindex(channel_id, &topic);
        }
        Ok(())
    }

    fn index(&mut self, channel_id: &str, topic: &str) {
        let channel = self
            .channels
            .get_mut(channel_id)
            .expect("indexed channel exists");
        for expanded in expand_topic(topic) {
            let count = channel.matched.entry(expanded.clone()).or_default();
            *count += 1;
            if *count == 1 {
                self.topic_index
                    .entry(expanded)
                    .or_default()
                    .insert(channel_id.to_owned());
            }
        }
    }

    fn unindex(&mut self, channel_id: &str, topic: &str) {
        let channel = self
            .channels
            .get_mut(channel_id)
            .expect("indexed channel exists");
        for expanded in expand_topic(topic) {
            let Some(count) = channel.matched.get_mut(&expanded) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                channel.matched.remove(&expanded);
                if let Some(set) = self.topic_index.get_mut(&expanded) {
                    set.remove(channel_id);
                    if set.is_empty() {
                        self.topic_index.remove(&expanded);
                    }
                }
            }
        }
    }

    fn remove_channel(
        &mut self,
        id: &str,
        notice: Option<Utf8Bytes>,
        code: CloseCode,
        reason: &'static str,
    ) {
        let Some(mut channel) = self.channels.remove(id) else {
            return;
        };
        for expanded in channel.matched.keys() {
            if let Some(set) = self.topic_index.get_mut(expanded) {
                set.remove(id);
                if set.is_empty() {
                    self.topic_index.remove(expanded);
                }
            }
        }
        channel.close_socket(notice, code, reason);
    }

    fn channel_ids_where(&self, pred: impl Fn(&Channel) -> bool) -> Vec<String> {
        self.channels
            .iter()
            .filter(|(_, c)| pred(c))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn death_notice(&self) -> Option<Utf8Bytes> {
        match self.settings.death_notice {
            DeathNotice::None => None,
            DeathNotice::Result404 => Some(Utf8Bytes::from_static(r#"{"result":"404"}"#)),
        }
    }

    // ---- sockets -----------------------------------------------------------------

    /// Opens a socket on a channel; a socket already open on it is closed ("If you
    /// connect a second WebSocket with the same channel ID, the first WebSocket
    /// disconnects"). `None` if the channel does not exist.
    pub fn attach_socket(
        &mut self,
        channel_id: &str,
        socket_id: u64,
        now: Instant,
    ) -> Option<mpsc::Receiver<SocketCommand>> {
        let channel = self.channels.get_mut(channel_id)?;
        channel.close_socket(
            None,
            CloseCode::Normal,
            "another socket connected to this channel",
        );
        let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
        channel.socket = Some(Socket { id: socket_id, tx });
        channel.last_used = now;
        self.counters.socket_connects += 1;
        Some(rx)
    }

    /// Forgets a socket that ended, unless another one replaced it already.
    pub fn detach_socket(&mut self, channel_id: &str, socket_id: u64, now: Instant) {
        if let Some(channel) = self.channels.get_mut(channel_id)
            && channel.socket.as_ref().is_some_and(|s| s.id == socket_id)
        {
            channel.socket = None;
            channel.last_used = now;
        }
    }

    /// Sends `v2.system.socket_closing` to the sockets of the given channels (all
    /// when `None`); returns the channel ids that had a socket.
    pub fn warn_socket_closing(&mut self, only: Option<&[String]>) -> Vec<String> {
        let mut warned = Vec::new();
        for (id, channel) in self.channels.iter() {
            if only.is_some_and(|ids| !ids.contains(id)) {
                continue;
            }
            if let Some(socket) = &channel.socket {
                let frame = system_frame(
                    "v2.system.socket_closing",
                    id,
                    "socket_closing",
                    "maintenance",
                );
                if socket.tx.try_send(SocketCommand::Frame(frame)).is_ok() {
                    warned.push(id.clone());
                }
            }
        }
        warned
    }

    /// Stalls the sockets of the given channels (all when `None`); returns the ids.
    pub fn stall_sockets(&mut self, only: Option<&[String]>) -> Vec<String> {
        let mut stalled = Vec::new();
        for (id, channel) in self.channels.iter() {
            if only.is_some_and(|ids| !ids.contains(id)) {
                continue;
            }
            if let Some(socket) = &channel.socket
                && socket.tx.try_send(SocketCommand::Stall).is_ok()
            {
                stalled.push(id.clone());
            }
        }
        stalled
    }

    /// Closes the current socket of a channel (a maintenance close); the channel lives.
    pub fn close_socket(&mut self, channel_id: &str) {
        if let Some(channel) = self.channels.get_mut(channel_id) {
            channel.close_socket(None, CloseCode::Away, "server maintenance");
        }
    }

    // ---- events ------------------------------------------------------------------

    /// The next event sequence number for single publishes.
    pub fn next_seq(&mut self) -> u64 {
        self.next_event_seq += 1;
        self.next_event_seq
    }

    /// Delivers one event frame to every channel subscribed to `topic` that has a
    /// socket. Returns how many sockets it was queued on.
    pub fn publish(&mut self, topic: &str, frame: &Utf8Bytes) -> usize {
        self.counters.events_published += 1;
        let Some(subscribers) = self.topic_index.get(topic) else {
            return 0;
        };
        let mut delivered = 0;
        for id in subscribers {
            let channel = self
                .channels
                .get_mut(id)
                .expect("index points at live channels");
            let queued = channel
                .socket
                .as_ref()
                .is_some_and(|s| s.tx.try_send(SocketCommand::Frame(frame.clone())).is_ok());
            if queued {
                channel.delivered += 1;
                delivered += 1;
            } else {
                channel.dropped += 1;
                self.counters.events_dropped += 1;
            }
        }
        self.counters.events_delivered += delivered as u64;
        delivered
    }

    // ---- expiry ------------------------------------------------------------------

    /// Removes expired tokens (with their channels) and expired channels; returns
    /// when the next one expires.
    pub fn purge(&mut self, now: Instant) -> Option<Instant> {
        let expired_tokens: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.dies_at() <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for token in expired_tokens {
            if self.tokens.get(&token).is_some_and(|t| t.expires_at > now) {
                self.counters.tokens_idled += 1;
            }
            self.tokens.remove(&token);
            for id in self.channel_ids_where(|c| c.token == token) {
                let notice = self.death_notice();
                self.remove_channel(&id, notice, CloseCode::Normal, "token expired");
            }
        }
        for id in self.channel_ids_where(|c| c.expires_at <= now) {
            let notice = self.death_notice();
            self.remove_channel(&id, notice, CloseCode::Normal, "channel expired");
        }
        let tokens = self.tokens.values().map(Token::dies_at);
        let channels = self.channels.values().map(|c| c.expires_at);
        tokens.chain(channels).min()
    }

    // ---- statistics --------------------------------------------------------------

    pub fn record_rejection(&mut self, method: &str, path: &str, rejection: &Rejection) {
        self.counters.rejected_total += 1;
        if self.rejected.len() == REJECTIONS_KEPT {
            self.rejected.pop_front();
        }
        self.rejected.push_back(RejectedCall {
            method: method.to_owned(),
            path: path.to_owned(),
            rejection: rejection.clone(),
        });
    }

    pub fn stats(&self, now: Instant) -> serde_json::Value {
        let clients: BTreeMap<&String, serde_json::Value> = self
            .clients
            .iter()
            .map(|(id, c)| {
                let live = self
                    .channels
                    .values()
                    .filter(|ch| &ch.client_id == id)
                    .count();
                let live_tokens = self.tokens.values().filter(|t| &t.client_id == id).count();
                (
                    id,
                    serde_json::json!({
                        "tokens_issued": c.tokens_issued,
                        "live_tokens": live_tokens,
                        "channels_created": c.channels_created,
                        "live_channels": live,
                        "peak_channels": c.peak_channels,
                        "evictions": c.evictions,
                    }),
                )
            })
            .collect();
        let mut channels: Vec<(&String, &Channel)> = self.channels.iter().collect();
        channels.sort_by_key(|(_, c)| c.serial);
        let channels: Vec<serde_json::Value> = channels
            .into_iter()
            .map(|(id, c)| {
                serde_json::json!({
                    "id": id,
                    "client_id": c.client_id,
                    "topics": c.subscriptions.len(),
                    "socket": c.socket.is_some(),
                    "delivered": c.delivered,
                    "dropped": c.dropped,
                    "expires": humantime::format_rfc3339_millis(wall_clock(c.expires_at, now)).to_string(),
                })
            })
            .collect();
        serde_json::json!({
            "clients": clients,
            "sockets": self.channels.values().filter(|c| c.socket.is_some()).count(),
            "subscriptions": self.channels.values().map(|c| c.subscriptions.len()).sum::<usize>(),
            "counters": self.counters,
            "channels": channels,
            "rejected": self.rejected,
        })
    }
}

/// `prefix?a&b` (Genesys' combined topic) names `prefix.a` and `prefix.b`.
pub fn expand_topic(topic: &str) -> Vec<String> {
    match topic.split_once('?') {
        Some((prefix, suffixes)) => suffixes
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|s| format!("{prefix}.{s}"))
            .collect(),
        None => vec![topic.to_owned()],
    }
}

/// A `v2.system.*` frame in Genesys' envelope. It names the channel id, as the real
/// ones do, which is why the proxy must never forward such frames.
fn system_frame(topic: &str, channel_id: &str, kind: &str, reason: &str) -> Utf8Bytes {
    let frame = serde_json::json!({
        "topicName": topic,
        "version": "2",
        "eventBody": {
            "channelId": channel_id,
            "systemTopicType": kind,
            "reason": reason,
            "message": kind,
        },
        "metadata": {"CorrelationId": correlation_id()},
    });
    Utf8Bytes::from(frame.to_string())
}

/// A random id in the shape of Genesys' correlation ids (a UUID).
pub fn correlation_id() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff | 0x4000,
        u16::from_be_bytes([b[8], b[9]]) & 0x3fff | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}

fn random_token() -> String {
    let bytes: [u8; 48] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random_channel_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..26)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("streaming-0-{suffix}")
}

/// `at + delay`, saturating: durations come from a control API and may be absurd.
fn later(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(at)
}

/// The wall-clock time of a monotonic deadline.
fn wall_clock(deadline: Instant, now: Instant) -> SystemTime {
    SystemTime::now() + deadline.saturating_duration_since(now)
}

/// Formats a wall-clock time the way Genesys does (`2026-11-29T13:25:26.000Z`).
pub fn iso8601(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_topics_expand_to_each_suffix() {
        assert_eq!(
            expand_topic("v2.users.42?presence&routingStatus"),
            vec!["v2.users.42.presence", "v2.users.42.routingStatus"]
        );
        assert_eq!(
            expand_topic("v2.users.42.presence"),
            vec!["v2.users.42.presence"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_is_a_sliding_minute_per_token() {
        let settings = Settings {
            rate_limit_per_min: 3,
            ..Settings::default()
        };
        let mut state = State::new(
            vec![ClientSpec::new("c", "s", Duration::from_secs(3600))],
            settings,
        );
        let start = Instant::now();
        let (token, _) = state.mint("c", "s", start).unwrap();
        for _ in 0..3 {
            state.authorize(Some(&token), false, start).unwrap();
        }
        let refused = state
            .authorize(Some(&token), false, start + Duration::from_secs(20))
            .unwrap_err();
        assert_eq!(refused.status, http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.retry_after_secs, Some(40));
        state
            .authorize(Some(&token), false, start + Duration::from_secs(60))
            .unwrap();
    }
}
