//! The life of one upstream channel, from slot to retirement:
//!
//! 1. take a budget slot (waiting if a handover holds the spare);
//! 2. mint a token of its own (the channel is pinned to it: every REST call for the
//!    channel uses it), create the channel, open the socket, confirm it with
//!    ping/pong, subscribe the desired topics;
//! 3. go live: a successor replaces its predecessor, which retires;
//! 4. stream: route events, keep subscriptions in sync (paced under the per-token
//!    rate limit, coalescing every change that arrives meanwhile), watch heartbeats,
//!    and hand over before the token or the channel expires, on a maintenance
//!    warning, or when its credential drains;
//! 5. retire: keep streaming for the overlap, close, retire the token (which ends
//!    the channel upstream) and give the slot back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::genesys::{CreatedChannel, UpstreamError, UpstreamSocket};
use super::pool::{ChannelKey, Pool, Role};
use crate::auth::{Backoff, Token};
use crate::frame::{self, UpstreamFrame};

/// How long the first pong may take on a new socket.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscription calls per token: a burst of this many, then `PACE_PER_SEC` a second,
/// which keeps well inside Genesys' 300 requests per minute per token.
const PACE_BURST: f64 = 10.0;
const PACE_PER_SEC: f64 = 4.0;

pub(super) async fn drive(pool: Arc<Pool>, key: ChannelKey) {
    if !pool.acquire_slot(key).await {
        pool.remove(key);
        return;
    }
    let Some(mut live) = establish(&pool, key).await else {
        pool.free_slot(key);
        pool.remove(key);
        return;
    };
    pool.went_live(key);
    let ending = live.stream(&pool, key).await;
    live.finish(&pool, key, ending).await;
}

/// A channel with its socket open.
struct Live {
    token: Token,
    channel: CreatedChannel,
    socket: UpstreamSocket,
    applied: BTreeSet<String>,
    /// The generation of the pool's desired topics that `applied` matches.
    applied_generation: u64,
    last_frame: Instant,
    pace: Pace,
}

enum Ending {
    /// Replaced by a successor.
    Retired {
        at_once: bool,
    },
    /// The socket died; `gone` if Genesys said the channel is dead.
    Lost {
        gone: bool,
    },
    Shutdown,
}

async fn establish(pool: &Arc<Pool>, key: ChannelKey) -> Option<Live> {
    let mut backoff = Backoff::new();
    loop {
        pool.role(key)?;
        let token = pool.tokens.mint_until_success(&pool.shutdown).await?;
        let error = match open(pool, key, &token).await {
            Ok((channel, socket)) => {
                let mut live = Live {
                    token,
                    channel,
                    socket,
                    applied: BTreeSet::new(),
                    applied_generation: 0,
                    last_frame: Instant::now(),
                    pace: Pace::new(),
                };
                pool.socket_state(key, &live.token.credential, true);
                match live.sync(pool, key).await {
                    Ok(()) => return Some(live),
                    Err(error) => {
                        pool.socket_state(key, &live.token.credential, false);
                        let _ = live.socket.close(None).await;
                        retire_token(pool, &live.token).await;
                        error
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, credential = %token.credential, "could not open an upstream channel");
                retire_token(pool, &token).await;
                error
            }
        };
        let wait = error
            .retry_after()
            .unwrap_or_default()
            .max(backoff.next_wait());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = pool.shutdown.cancelled() => return None,
        }
    }
}

/// Creates the channel with `token` and opens and confirms its socket.
async fn open(
    pool: &Pool,
    key: ChannelKey,
    token: &Token,
) -> Result<(CreatedChannel, UpstreamSocket), UpstreamError> {
    let channel = pool.genesys.create_channel(&token.value).await?;
    let mut socket = pool.genesys.connect(&channel.connect_uri).await?;
    confirm(&mut socket).await?;
    tracing::info!(channel = key, credential = %token.credential, "upstream channel open");
    Ok((channel, socket))
}

/// Sends `{"message":"ping"}` and waits for the pong: the socket is really live.
async fn confirm(socket: &mut UpstreamSocket) -> Result<(), UpstreamError> {
    socket
        .send(Message::text(frame::PING))
        .await
        .map_err(|_| UpstreamError::Unavailable("socket closed before the first ping".into()))?;
    let until = Instant::now() + CONFIRM_TIMEOUT;
    loop {
        match tokio::time::timeout_at(until, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if frame::classify(&text) == UpstreamFrame::Pong => {
                return Ok(());
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {
                return Err(UpstreamError::Unavailable(
                    "socket closed before the first pong".into(),
                ));
            }
            Ok(Some(Ok(_))) => continue,
            Err(_) => {
                return Err(UpstreamError::Unavailable(
                    "no pong on the new socket".into(),
                ));
            }
        }
    }
}

impl Live {
    /// Makes the upstream subscriptions match the pool's desired topics.
    async fn sync(&mut self, pool: &Pool, key: ChannelKey) -> Result<(), UpstreamError> {
        let (desired, generation) = pool.desired(key);
        if desired == self.applied {
            self.applied_generation = generation;
            pool.synced(key, &self.applied, &BTreeSet::new());
            return Ok(());
        }
        match pool
            .genesys
            .replace_subscriptions(&self.token.value, &self.channel.id, &desired)
            .await
        {
            Ok(rejected) => {
                self.applied = desired.difference(&rejected).cloned().collect();
                self.applied_generation = generation;
                pool.synced(key, &self.applied, &rejected);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, channel = key, "subscription update failed");
                self.pace
                    .defer(error.retry_after().unwrap_or(Duration::from_secs(1)));
                Err(error)
            }
        }
    }

    /// Whether the pool wants other topics than those subscribed (a successor that
    /// is still being built does not sync; it subscribes when it opens).
    fn needs_sync(&self, pool: &Pool, key: ChannelKey) -> bool {
        matches!(pool.role(key), Some(Role::Serving | Role::Successor { .. }))
            && pool.desired_generation(key) != self.applied_generation
    }

    /// When this channel should hand over: before its token or the channel expires,
    /// jittered so that channels do not move in lockstep.
    fn handover_at(&self, pool: &Pool) -> Instant {
        let lead = pool.lead_for(self.token.lifetime);
        let jitter = lead.mul_f64(rand::random_range(0.0..=0.25));
        let channel_expiry = self
            .channel
            .expires
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .map(|left| Instant::now() + left)
            .unwrap_or(self.token.expires_at);
        let expiry = self.token.expires_at.min(channel_expiry);
        expiry
            .checked_sub(lead + jitter)
            .unwrap_or_else(Instant::now)
    }

    async fn stream(&mut self, pool: &Arc<Pool>, key: ChannelKey) -> Ending {
        let Some(wake) = pool.wake_of(key) else {
            return Ending::Shutdown;
        };
        let heartbeat = pool.config.load().upstream.heartbeat;
        // Per frame, only `last_frame` is updated: the silence watch looks at it a few
        // times per heartbeat interval, and the pool is consulted only when it wakes us.
        let mut silence_watch = tokio::time::interval(heartbeat / 4);
        silence_watch.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let handover = tokio::time::sleep_until(self.handover_at(pool));
        tokio::pin!(handover);
        let mut handover_armed = true;
        let mut pinged = false;
        let mut idle_since = None;
        let mut dirty = self.needs_sync(pool, key);
        loop {
            let sync_at = dirty.then(|| self.pace.next_at());
            tokio::select! {
                message = self.socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        self.last_frame = Instant::now();
                        pinged = false;
                        match frame::classify(&text) {
                            UpstreamFrame::Event { topic, correlation_id } => {
                                pool.router.route(&topic, correlation_id.as_deref(), &text);
                            }
                            UpstreamFrame::SocketClosing => {
                                tracing::info!(channel = key, "maintenance warning: handing over");
                                pool.request_handover(key);
                            }
                            UpstreamFrame::ChannelLost => return Ending::Lost { gone: true },
                            UpstreamFrame::Heartbeat | UpstreamFrame::Pong | UpstreamFrame::Internal => {}
                            UpstreamFrame::Unreadable => {
                                tracing::debug!(channel = key, "unreadable upstream frame ignored");
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ending::Lost { gone: false },
                    Some(Ok(_)) => self.last_frame = Instant::now(),
                },
                _ = wake.notified() => {
                    if let Some(at_once) = pool.retiring(key) {
                        return Ending::Retired { at_once };
                    }
                    if pool.handover_due(key) {
                        pool.begin_handover(key);
                    }
                    dirty = self.needs_sync(pool, key);
                }
                _ = &mut handover, if handover_armed => {
                    handover_armed = false;
                    pool.request_handover(key);
                }
                _ = sleep_until_some(sync_at) => {
                    if self.pace.take() && matches!(self.sync(pool, key).await, Err(UpstreamError::Unauthorized)) {
                        return Ending::Lost { gone: true };
                    }
                    dirty = self.needs_sync(pool, key);
                }
                _ = silence_watch.tick() => {
                    match (pool.is_idle(key), idle_since) {
                        (false, _) => idle_since = None,
                        (true, None) => idle_since = Some(Instant::now()),
                        (true, Some(since)) => {
                            if since.elapsed() >= pool.idle_channel_timeout() && pool.retire_idle(key) {
                                tracing::info!(channel = key, "upstream channel idle: retiring it");
                                return Ending::Retired { at_once: true };
                            }
                        }
                    }
                    let silent = self.last_frame.elapsed();
                    if pinged && silent >= heartbeat * 2 {
                        tracing::warn!(channel = key, "upstream socket silent after a ping: rebuilding");
                        return Ending::Lost { gone: false };
                    }
                    if !pinged && silent >= heartbeat {
                        pinged = true;
                        if self.socket.send(Message::text(frame::PING)).await.is_err() {
                            return Ending::Lost { gone: false };
                        }
                    }
                }
                _ = pool.shutdown.cancelled() => return Ending::Shutdown,
            }
        }
    }

    async fn finish(mut self, pool: &Arc<Pool>, key: ChannelKey, ending: Ending) {
        let credential = self.token.credential.clone();
        match ending {
            Ending::Retired { at_once } => {
                if !at_once {
                    self.overlap(pool).await;
                }
                let _ = self.socket.close(None).await;
                // Retire first, report closed after: once an operator sees a drained
                // credential at 0 channels, none of its tokens is in use any more.
                retire_token(pool, &self.token).await;
                pool.socket_state(key, &credential, false);
            }
            Ending::Lost { gone } => {
                let since = SystemTime::now() - self.last_frame.elapsed();
                pool.lost(key, since);
                pool.socket_state(key, &credential, false);
                if !gone {
                    retire_token(pool, &self.token).await;
                }
            }
            Ending::Shutdown => {
                let _ = self.socket.close(None).await;
                retire_token(pool, &self.token).await;
                pool.socket_state(key, &credential, false);
            }
        }
        pool.free_slot(key);
        pool.remove(key);
    }

    /// Keeps routing events for the overlap after the switch, so that nothing in
    /// flight on the old socket is lost.
    async fn overlap(&mut self, pool: &Pool) {
        let until = Instant::now() + pool.config.load().handover.overlap;
        loop {
            let message = tokio::select! {
                message = self.socket.next() => message,
                _ = tokio::time::sleep_until(until) => return,
                _ = pool.shutdown.cancelled() => return,
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    if let UpstreamFrame::Event {
                        topic,
                        correlation_id,
                    } = frame::classify(&text)
                    {
                        pool.router.route(&topic, correlation_id.as_deref(), &text);
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    }
}

/// Retires a token with `DELETE /api/v2/tokens/me`, which ends its channel upstream.
/// A 401 means it was dead already. While Genesys cannot be reached, it tries again
/// with back-off — the channel still counts against the budget meanwhile — until it
/// succeeds or the token expires on its own.
async fn retire_token(pool: &Pool, token: &Token) {
    let mut backoff = Backoff::new();
    loop {
        match pool.genesys.retire_token(&token.value).await {
            Ok(()) | Err(UpstreamError::Unauthorized) => return,
            Err(error) => {
                tracing::warn!(%error, "could not retire a token: its channel keeps its budget slot meanwhile");
                let retry_at = Instant::now()
                    + error
                        .retry_after()
                        .unwrap_or_default()
                        .max(backoff.next_wait());
                tokio::select! {
                    _ = tokio::time::sleep_until(retry_at.min(token.expires_at)) => {}
                    _ = pool.shutdown.cancelled() => return,
                }
                if Instant::now() >= token.expires_at {
                    return;
                }
            }
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A token bucket for REST calls on one channel's token.
struct Pace {
    tokens: f64,
    updated: Instant,
    not_before: Instant,
}

impl Pace {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            tokens: PACE_BURST,
            updated: now,
            not_before: now,
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.updated).as_secs_f64() * PACE_PER_SEC;
        self.tokens = (self.tokens + earned).min(PACE_BURST);
        self.updated = now;
    }

    /// When the next call may go out.
    fn next_at(&mut self) -> Instant {
        self.refill();
        let for_token = if self.tokens >= 1.0 {
            Instant::now()
        } else {
            Instant::now() + Duration::from_secs_f64((1.0 - self.tokens) / PACE_PER_SEC)
        };
        for_token.max(self.not_before)
    }

    /// Takes one call's worth; `false` if it is too early.
    fn take(&mut self) -> bool {
        self.refill();
        if self.tokens < 1.0 || Instant::now() < self.not_before {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// No call before `wait` has passed (a 429's `Retry-After`).
    fn defer(&mut self, wait: Duration) {
        self.not_before = self.not_before.max(Instant::now() + wait);
    }
}
