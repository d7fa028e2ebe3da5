//! The life of one upstream channel, from slot to retirement:
//!
//! 1. take a budget slot (waiting if a handover holds the spare);
//! 2. mint a token of its own (the channel is pinned to it: every REST call for the
//!    channel uses it), create the channel, open the socket, confirm it with
//!    ping/pong, subscribe the wanted topics;
//! 3. go live: a successor replaces its predecessor, which retires;
//! 4. stream: route events, keep subscriptions in sync (paced under the per-token
//!    rate limit, coalescing every change that arrives meanwhile), keep an idle token
//!    active, watch heartbeats, and hand over before the token or the channel expires,
//!    on a maintenance warning, or when its credential drains;
//! 5. retire: keep streaming for the overlap, close, retire the token (which ends
//!    the channel upstream) and give the slot back.
//!
//! However the task ends, a panic included, the channel's topics move on and its slot
//! is given back once the channel is gone upstream (see `EndGuard`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pool::{Pool, Report, Spawner};
use super::state::{ChannelKey, HandoverReason, Role};
use super::sync::{Plan, Subscriptions, Verdict};
use super::{Delivery, Leases};
use crate::auth::{Token, TokenSource};
use crate::backoff::Backoff;
use crate::bounds;
use crate::config::Config;
use crate::frame::{self, UpstreamFrame};
use crate::genesys::{CreatedChannel, Genesys, UpstreamError, UpstreamSocket};
use crate::metrics::Registry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// How long the first pong may take on a new socket.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscription calls per token: a burst of this many, then `PACE_PER_SEC` a second,
/// which keeps well inside Genesys' 300 requests per minute per token.
const PACE_BURST: f64 = 10.0;
const PACE_PER_SEC: f64 = 4.0;
/// An idle token is touched this long before it would idle at the latest.
const KEEPALIVE_MIN: Duration = Duration::from_secs(1);
/// How soon a failed idle-clock query is tried again.
const KEEPALIVE_RETRY: Duration = Duration::from_secs(10);
/// How often a channel asks again for a fleet lease while the fleet's budget is used
/// up (doubling from the first to the second).
const LEASE_RETRY_MIN: Duration = Duration::from_millis(100);
const LEASE_RETRY_MAX: Duration = Duration::from_secs(2);

/// What every channel task shares.
pub struct Parts {
    pub genesys: Arc<Genesys>,
    pub tokens: Arc<TokenSource>,
    pub delivery: Arc<dyn Delivery>,
    /// The fleet's budget (or nothing to share, one process alone).
    pub leases: Arc<dyn Leases>,
    pub config: Arc<ArcSwap<Config>>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    lead_clamp_warned: AtomicBool,
    /// When each live channel's pinned token expires (for
    /// `handover_token_expires_in_seconds`).
    expiries: Mutex<BTreeMap<ChannelKey, Instant>>,
}

impl Parts {
    pub fn new(
        genesys: Arc<Genesys>,
        tokens: Arc<TokenSource>,
        delivery: Arc<dyn Delivery>,
        leases: Arc<dyn Leases>,
        config: Arc<ArcSwap<Config>>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            genesys,
            tokens,
            delivery,
            leases,
            config,
            tasks,
            shutdown,
            lead_clamp_warned: AtomicBool::new(false),
            expiries: Mutex::default(),
        })
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(TokenExpiries(self.clone())));
    }

    fn expiries(&self) -> std::sync::MutexGuard<'_, BTreeMap<ChannelKey, Instant>> {
        self.expiries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lead actually used for a token of `lifetime`: at most half of it.
    fn lead_for(&self, lifetime: Duration) -> Duration {
        let lead = self.config.load().handover.lead;
        let half = lifetime / 2;
        if lead > half {
            if !self.lead_clamp_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    lead = %humantime::format_duration(lead),
                    token_lifetime = %humantime::format_duration(lifetime),
                    "handover.lead is longer than half the token lifetime: using half of it"
                );
            }
            half
        } else {
            lead
        }
    }
}

/// `handover_token_expires_in_seconds{channel}`: how long each live channel's pinned
/// token has left. A channel hands over `lead` before; one near zero has no successor.
struct TokenExpiries(Arc<Parts>);

impl std::fmt::Debug for TokenExpiries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenExpiries")
    }
}

impl Collector for TokenExpiries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let left: Vec<(ChannelKey, f64)> = self
            .0
            .expiries()
            .iter()
            .map(|(key, at)| (*key, at.saturating_duration_since(now).as_secs_f64()))
            .collect();
        let mut family = encoder.encode_descriptor(
            "token_expires_in",
            "How long each live channel's pinned token has left; the channel hands over well before it runs out.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (key, seconds) in left {
            let labels = [("channel", format!("ch-{key}"))];
            ConstGauge::new(seconds).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The pool's spawner: every channel runs as a tracked task driven by `Task::drive`.
pub fn spawner(parts: Arc<Parts>) -> Spawner {
    Box::new(move |pool, key| {
        let task = Task {
            pool: pool.clone(),
            parts: parts.clone(),
            key,
        };
        parts.tasks.spawn(task.drive());
    })
}

/// One channel task.
struct Task {
    pool: Arc<Pool>,
    parts: Arc<Parts>,
    key: ChannelKey,
}

/// Makes a channel task that panics end like one whose socket was lost: its topics go
/// to a new channel (clients hear of the gap), its token is retired (which ends the
/// channel upstream), and only then is its budget slot given back.
///
/// A tracked task's future is dropped unfinished only when the runtime itself goes
/// away, and then there is nothing left to recover; a panic is the abnormal end that
/// matters, so only a drop while panicking does anything.
struct EndGuard {
    pool: Arc<Pool>,
    parts: Arc<Parts>,
    key: ChannelKey,
    /// The token the channel holds, if any: it must be retired.
    token: Option<Token>,
    armed: bool,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !self.armed || !std::thread::panicking() {
            return;
        }
        tracing::error!(
            channel = format!("ch-{}", self.key),
            "upstream channel task panicked: its topics move to a new channel"
        );
        let key = self.key;
        self.parts.expiries().remove(&key);
        self.pool.report(key, Report::SocketClosed);
        self.pool.report(
            key,
            Report::Lost {
                since: SystemTime::now(),
            },
        );
        let (pool, parts, token) = (self.pool.clone(), self.parts.clone(), self.token.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.parts.tasks.track_future(async move {
                if let Some(token) = token {
                    retire_token(&parts, &token).await;
                }
                parts.leases.give_back(key).await;
                pool.gone(key);
            }));
        }
    }
}

impl Task {
    async fn drive(self) {
        let mut guard = EndGuard {
            pool: self.pool.clone(),
            parts: self.parts.clone(),
            key: self.key,
            token: None,
            armed: true,
        };
        if self.pool.acquire_slot(self.key).await
            && self.lease().await
            && let Some(mut live) = self.establish(&mut guard).await
        {
            self.pool.report(self.key, Report::WentLive);
            if self.parts.tokens.is_draining(&live.token.credential) {
                self.pool
                    .report(self.key, Report::HandoverDue(HandoverReason::Drain));
            }
            let ending = live.stream(&self).await;
            live.finish(&self, ending).await;
        }
        guard.armed = false;
        self.parts.leases.give_back(self.key).await;
        self.pool.gone(self.key);
    }

    /// Takes the fleet's lease for this channel, waiting while the fleet's budget is
    /// used up. `false` if the channel is no longer wanted or the proxy shuts down.
    async fn lease(&self) -> bool {
        let mut wait = LEASE_RETRY_MIN;
        loop {
            let Some((assignment, wake)) = self.pool.assignment(self.key) else {
                return false;
            };
            if assignment.retire.is_some() {
                return false;
            }
            let successor = matches!(assignment.role, Role::Successor { .. });
            if self.parts.leases.take(self.key, successor).await {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {}
                _ = self.parts.shutdown.cancelled() => return false,
            }
            wait = (wait * 2).min(LEASE_RETRY_MAX);
        }
    }

    /// Mints, creates and opens the channel, and subscribes the topics already
    /// delivered; retries (with back-off) until it succeeds, the channel is no longer
    /// wanted, or the proxy shuts down.
    async fn establish(&self, guard: &mut EndGuard) -> Option<Live> {
        let parts = &self.parts;
        let mut backoff = Backoff::new();
        loop {
            let (assignment, _) = self.pool.assignment(self.key)?;
            if assignment.retire.is_some() {
                return None;
            }
            let token = parts.tokens.mint_until_success(&parts.shutdown).await?;
            guard.token = Some(token.clone());
            let expires =
                SystemTime::now() + token.expires_at.saturating_duration_since(Instant::now());
            parts.leases.pin(self.key, expires).await;
            let failure = match self.open(&token).await {
                Ok((channel, socket)) => {
                    let mut live = Live::new(token.clone(), channel, socket);
                    self.pool.report(
                        self.key,
                        Report::SocketOpened {
                            credential: &token.credential,
                        },
                    );
                    match live.subscribe_delivered(self).await {
                        Ok(()) => return Some(live),
                        Err(error) => {
                            self.pool.report(self.key, Report::SocketClosed);
                            let _ = live.socket.close(None).await;
                            error
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, credential = %token.credential, "could not open an upstream channel");
                    Some(error)
                }
            };
            // The channel, if it was created, ends with its token.
            retire_token(parts, &token).await;
            guard.token = None;
            // No failure: the channel is no longer wanted, or the proxy shuts down.
            failure.as_ref()?;
            let wait = failure
                .as_ref()
                .and_then(UpstreamError::retry_after)
                .unwrap_or_default()
                .max(backoff.next_wait());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = parts.shutdown.cancelled() => return None,
            }
        }
    }

    /// Creates the channel with `token` and opens and confirms its socket.
    async fn open(&self, token: &Token) -> Result<(CreatedChannel, UpstreamSocket), UpstreamError> {
        let genesys = &self.parts.genesys;
        let channel = genesys.create_channel(&token.value).await?;
        let mut socket = genesys.connect(&channel.connect_uri).await?;
        confirm(&mut socket).await?;
        tracing::info!(channel = format!("ch-{}", self.key), credential = %token.credential, "upstream channel open");
        Ok((channel, socket))
    }
}

/// Sends `{"message":"ping"}` and waits for the pong: the socket is really live.
async fn confirm(socket: &mut UpstreamSocket) -> Result<(), UpstreamError> {
    socket
        .send(Message::text(frame::PING))
        .await
        .map_err(|_| UpstreamError::Unavailable("socket closed before the first ping".into()))?;
    let until = bounds::after(CONFIRM_TIMEOUT);
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

/// A channel with its socket open.
struct Live {
    token: Token,
    channel: CreatedChannel,
    socket: UpstreamSocket,
    subscriptions: Subscriptions,
    /// The generation of the pool's wanted topics last planned for.
    planned_generation: u64,
    last_frame: Instant,
    pace: Pace,
    /// Back-off for retried refusals and failed calls.
    backoff: Backoff,
    /// When to touch the token so that an org's idle-token timeout never ends it.
    keepalive_at: Option<Instant>,
    /// Whether it went live (a channel still being built never asks to hand over).
    live: bool,
}

enum Ending {
    /// Replaced by a successor, or idle.
    Retired {
        at_once: bool,
    },
    /// The socket died; `gone` if Genesys said the channel is dead.
    Lost {
        gone: bool,
    },
    Shutdown,
}

/// What one subscription sync came to.
enum Synced {
    /// Genesys holds what the pool wants (or nothing needed sending).
    Done,
    /// Try again: at once (isolating batches) or after the pace's deferral.
    Again,
    /// The channel is gone upstream (401, 404).
    Dead(UpstreamError),
}

impl Live {
    fn new(token: Token, channel: CreatedChannel, socket: UpstreamSocket) -> Self {
        Self {
            token,
            channel,
            socket,
            subscriptions: Subscriptions::default(),
            planned_generation: 0,
            last_frame: Instant::now(),
            pace: Pace::new(),
            backoff: Backoff::new(),
            // Learn at once whether the org ends idle tokens.
            keepalive_at: Some(Instant::now()),
            live: false,
        }
    }

    /// Syncs until every topic already delivered to clients is subscribed here (so a
    /// successor may take over), and at least once. `Err(None)` if the channel is no
    /// longer wanted or the proxy shuts down.
    async fn subscribe_delivered(&mut self, task: &Task) -> Result<(), Option<UpstreamError>> {
        loop {
            let Some((assignment, _)) = task.pool.assignment(task.key) else {
                return Err(None);
            };
            if assignment.retire.is_some() {
                return Err(None);
            }
            let carried = self.subscriptions.carries(&assignment.topics);
            match self.sync(task).await {
                Synced::Done => return Ok(()),
                Synced::Dead(error) => return Err(Some(error)),
                Synced::Again if carried => return Ok(()),
                Synced::Again => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(self.pace.next_at()) => {}
                        _ = task.parts.shutdown.cancelled() => return Err(None),
                    }
                }
            }
        }
    }

    /// Sends the next subscription list the pool's wanted topics call for, if the pace
    /// allows, and reports the result.
    async fn sync(&mut self, task: &Task) -> Synced {
        let Some((assignment, _)) = task.pool.assignment(task.key) else {
            return Synced::Done;
        };
        self.planned_generation = assignment.generation;
        // A channel handing over or retiring keeps what it has until it closes.
        if !matches!(assignment.role, Role::Serving | Role::Successor { .. }) {
            return Synced::Done;
        }
        let Some(plan) = self.subscriptions.plan(&assignment.topics) else {
            let none = Default::default();
            task.pool.report(
                task.key,
                Report::Synced {
                    applied: self.subscriptions.applied(),
                    rejected: &none,
                },
            );
            return Synced::Done;
        };
        if !self.pace.take() {
            return Synced::Again;
        }
        let result = task
            .parts
            .genesys
            .replace_subscriptions(&self.token.value, &self.channel.id, &plan.target)
            .await;
        self.judge(task, plan, result)
    }

    fn judge(
        &mut self,
        task: &Task,
        plan: Plan,
        result: Result<std::collections::BTreeSet<String>, UpstreamError>,
    ) -> Synced {
        let channel = format!("ch-{}", task.key);
        match result {
            Ok(rejected) => {
                self.subscriptions.accepted(plan, &rejected);
                self.backoff = Backoff::new();
                task.pool.report(
                    task.key,
                    Report::Synced {
                        applied: self.subscriptions.applied(),
                        rejected: &rejected,
                    },
                );
                // More may be wanted than was sent (isolated batches, later changes).
                Synced::Again
            }
            Err(error @ (UpstreamError::Unauthorized | UpstreamError::NotFound)) => {
                Synced::Dead(error)
            }
            Err(error) => {
                if let Some(refusal) = error.refusal() {
                    match self.subscriptions.refused(&plan) {
                        Verdict::Refuse(topics) => {
                            tracing::warn!(%error, channel, topics = topics.len(), "Genesys refused a subscription change: refusing its new topics");
                            task.pool.report(
                                task.key,
                                Report::Refused {
                                    topics: &topics,
                                    refusal,
                                },
                            );
                            return Synced::Again;
                        }
                        Verdict::Isolate => {
                            tracing::warn!(%error, channel, "Genesys refused a subscription change: sending its batches one at a time");
                            return Synced::Again;
                        }
                        Verdict::Resync if self.live => {
                            tracing::warn!(%error, channel, "Genesys keeps refusing this channel's subscriptions: handing over to a fresh channel");
                            task.pool
                                .report(task.key, Report::HandoverDue(HandoverReason::Resync));
                        }
                        Verdict::Resync | Verdict::Retry => {
                            tracing::warn!(%error, channel, "Genesys refused a subscription change that adds nothing: retrying");
                        }
                    }
                } else {
                    tracing::warn!(%error, channel, "subscription update failed");
                }
                let wait = error
                    .retry_after()
                    .unwrap_or_default()
                    .max(self.backoff.next_wait());
                self.pace.defer(wait);
                Synced::Again
            }
        }
    }

    /// Whether the pool wants other topics than those planned for (a channel being
    /// handed over, or retiring, no longer syncs).
    fn needs_sync(&self, task: &Task) -> bool {
        task.pool.generation(task.key) != self.planned_generation
    }

    /// When this channel should hand over: `lead` before its token or the channel
    /// expires, jittered so that channels do not move in lockstep, and moved by the
    /// pool (as early as twice the lead, as late as three quarters of it) so that it
    /// does not share the spare slot with another channel's handover, which holds it
    /// about an overlap and half a second. Channels created together (at start) thus
    /// spread out at their first handover and stay apart.
    fn handover_at(&self, task: &Task) -> Instant {
        let parts = &task.parts;
        let lead = parts.lead_for(self.token.lifetime);
        let jitter = lead.mul_f64(rand::random_range(0.0..=0.25));
        let channel_expiry = self
            .channel
            .expires
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .map(bounds::after)
            .unwrap_or(self.token.expires_at);
        let expiry = self.token.expires_at.min(channel_expiry);
        let at = |before: Duration| expiry.checked_sub(before).unwrap_or_else(Instant::now);
        let preferred = at(lead.saturating_add(jitter));
        let window = (
            at(lead.saturating_mul(2)).max(Instant::now()),
            at(lead.mul_f64(0.75)),
        );
        let spacing = parts
            .config
            .load()
            .handover
            .overlap
            .saturating_add(Duration::from_millis(500));
        task.pool
            .schedule_handover(task.key, window, preferred, spacing)
    }

    /// Touches the token (`GET /api/v2/tokens/me`) and schedules the next touch at half
    /// the time it has left before it idles, if the org ends idle tokens at all. One
    /// call per half idle period costs less of the 300 requests a minute than a
    /// handover (about four calls), so the channel keeps its token rather than hand
    /// over before it idles.
    async fn keep_token_active(&mut self, parts: &Parts) -> Result<(), UpstreamError> {
        match parts.genesys.token_idles_at(&self.token.value, false).await {
            Ok(Some(idles_at)) => {
                let left = idles_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                self.keepalive_at = Some(bounds::after((left / 2).max(KEEPALIVE_MIN)));
                Ok(())
            }
            Ok(None) => {
                self.keepalive_at = None;
                Ok(())
            }
            Err(UpstreamError::Unauthorized) => Err(UpstreamError::Unauthorized),
            Err(error @ (UpstreamError::Refused { .. } | UpstreamError::NotFound)) => {
                tracing::info!(%error, "the token's idle clock cannot be read: not keeping it active");
                self.keepalive_at = None;
                Ok(())
            }
            Err(error) => {
                tracing::debug!(%error, "could not read the token's idle clock: trying again");
                self.keepalive_at = Some(bounds::after(KEEPALIVE_RETRY));
                Ok(())
            }
        }
    }

    async fn stream(&mut self, task: &Task) -> Ending {
        let (pool, parts, key) = (&task.pool, &task.parts, task.key);
        let Some((_, wake)) = pool.assignment(key) else {
            return Ending::Shutdown;
        };
        self.live = true;
        parts.expiries().insert(key, self.token.expires_at);
        let heartbeat = parts.config.load().upstream.heartbeat;
        // Per frame, only `last_frame` is updated: the silence watch looks at it a few
        // times per heartbeat interval, and the pool is consulted only when it wakes us.
        let mut silence_watch = tokio::time::interval(heartbeat / 4);
        silence_watch.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let handover = tokio::time::sleep_until(self.handover_at(task));
        tokio::pin!(handover);
        let mut handover_armed = true;
        let mut pinged = false;
        let mut dirty = self.needs_sync(task);
        loop {
            let sync_at = dirty.then(|| self.pace.next_at());
            tokio::select! {
                message = self.socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        self.last_frame = Instant::now();
                        pinged = false;
                        match frame::classify(&text) {
                            UpstreamFrame::Event { topic, correlation_id } => {
                                parts.delivery.event(&topic, correlation_id.as_deref(), &text);
                            }
                            UpstreamFrame::SocketClosing => {
                                tracing::info!(channel = format!("ch-{key}"), "maintenance warning: handing over");
                                pool.report(key, Report::HandoverDue(HandoverReason::Maintenance));
                            }
                            UpstreamFrame::ChannelLost => return Ending::Lost { gone: true },
                            UpstreamFrame::Heartbeat | UpstreamFrame::Pong | UpstreamFrame::Internal => {}
                            UpstreamFrame::Unreadable => {
                                tracing::debug!(channel = format!("ch-{key}"), "unreadable upstream frame ignored");
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ending::Lost { gone: false },
                    Some(Ok(_)) => self.last_frame = Instant::now(),
                },
                _ = wake.notified() => {
                    #[cfg(feature = "test-util")]
                    if pool.take_injected_panic(key) {
                        panic!("test-util: injected panic in channel task ch-{key}");
                    }
                    if let Some((assignment, _)) = pool.assignment(key)
                        && let Some(at_once) = assignment.retire
                    {
                        return Ending::Retired { at_once };
                    }
                    dirty = self.needs_sync(task);
                }
                _ = &mut handover, if handover_armed => {
                    handover_armed = false;
                    pool.report(key, Report::HandoverDue(HandoverReason::Expiry));
                }
                _ = sleep_until_some(sync_at) => {
                    dirty = match self.sync(task).await {
                        Synced::Done => false,
                        Synced::Again => true,
                        Synced::Dead(_) => return Ending::Lost { gone: true },
                    };
                }
                _ = sleep_until_some(self.keepalive_at) => {
                    if self.keep_token_active(parts).await.is_err() {
                        return Ending::Lost { gone: true };
                    }
                }
                _ = silence_watch.tick() => {
                    if pool.idle_check(key) {
                        tracing::info!(channel = format!("ch-{key}"), "upstream channel idle: retiring it");
                        return Ending::Retired { at_once: true };
                    }
                    let silent = self.last_frame.elapsed();
                    if pinged && silent >= heartbeat * 2 {
                        tracing::warn!(channel = format!("ch-{key}"), "upstream socket silent after a ping: rebuilding");
                        return Ending::Lost { gone: false };
                    }
                    if !pinged && silent >= heartbeat {
                        pinged = true;
                        if self.socket.send(Message::text(frame::PING)).await.is_err() {
                            return Ending::Lost { gone: false };
                        }
                    }
                }
                _ = parts.shutdown.cancelled() => return Ending::Shutdown,
            }
        }
    }

    async fn finish(mut self, task: &Task, ending: Ending) {
        let (pool, parts, key) = (&task.pool, &task.parts, task.key);
        parts.expiries().remove(&key);
        match ending {
            Ending::Retired { at_once } => {
                if !at_once && !self.overlap(task).await {
                    // The old socket fell silent or too far behind to catch up: events
                    // Genesys sent it before the successor was subscribed are lost.
                    let since = SystemTime::now()
                        .checked_sub(self.last_frame.elapsed())
                        .unwrap_or_else(SystemTime::now);
                    let topics: Vec<String> =
                        self.subscriptions.applied().iter().cloned().collect();
                    tracing::warn!(
                        channel = format!("ch-{key}"),
                        topics = topics.len(),
                        outcome = "gap",
                        "the replaced channel did not catch up after the switch: clients told of the gap"
                    );
                    parts.delivery.gap(&topics, since, SystemTime::now());
                }
                let _ = self.socket.close(None).await;
                // Retire first, report closed after: once an operator sees a drained
                // credential at 0 channels, none of its tokens is in use any more.
                retire_token(parts, &self.token).await;
                pool.report(key, Report::SocketClosed);
            }
            Ending::Lost { gone } => {
                let since = SystemTime::now()
                    .checked_sub(self.last_frame.elapsed())
                    .unwrap_or_else(SystemTime::now);
                pool.report(key, Report::SocketClosed);
                pool.report(key, Report::Lost { since });
                if !gone {
                    retire_token(parts, &self.token).await;
                }
            }
            Ending::Shutdown => {
                let _ = self.socket.close(None).await;
                retire_token(parts, &self.token).await;
                pool.report(key, Report::SocketClosed);
            }
        }
    }

    /// Keeps routing events after the switch until the old socket has delivered what
    /// Genesys queued on it before its successor was subscribed: a ping sent at the
    /// switch is answered after those frames (a lagging socket, say under network
    /// congestion, may hold seconds of them). At least `overlap`; at most
    /// [`longest_drain`]. Returns whether the old socket caught up: if it did not, what
    /// it still held is lost (and must be announced).
    async fn overlap(&mut self, task: &Task) -> bool {
        let parts = &task.parts;
        let (overlap, heartbeat) = {
            let config = parts.config.load();
            (config.handover.overlap, config.upstream.heartbeat)
        };
        let at_least = bounds::after(overlap);
        let at_most = bounds::after(longest_drain(overlap, heartbeat));
        if self.socket.send(Message::text(frame::PING)).await.is_err() {
            return false;
        }
        let mut caught_up = false;
        loop {
            let until = if caught_up { at_least } else { at_most };
            let message = tokio::select! {
                message = self.socket.next() => message,
                _ = tokio::time::sleep_until(until) => return caught_up,
                // Shutting down: the clients go too, nothing to announce.
                _ = parts.shutdown.cancelled() => return true,
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    self.last_frame = Instant::now();
                    match frame::classify(&text) {
                        UpstreamFrame::Event {
                            topic,
                            correlation_id,
                        } => parts
                            .delivery
                            .event(&topic, correlation_id.as_deref(), &text),
                        UpstreamFrame::Pong => caught_up = true,
                        _ => {}
                    }
                }
                Some(Ok(_)) => self.last_frame = Instant::now(),
                _ => return caught_up,
            }
            if caught_up && Instant::now() >= at_least {
                return true;
            }
        }
    }
}

/// The longest a replaced channel keeps delivering after the switch: its overlap, plus
/// at most a heartbeat interval (5 s at most) to catch up. A socket that lags more is
/// announced as a gap rather than waited for, so that the router's dedup window (which
/// must outlast it) stays small.
pub fn longest_drain(overlap: Duration, heartbeat: Duration) -> Duration {
    const CATCH_UP: Duration = Duration::from_secs(5);
    overlap.saturating_add(heartbeat.min(CATCH_UP))
}

/// Retires a token with `DELETE /api/v2/tokens/me`, which ends its channel upstream.
/// A 401 means it was dead already. While Genesys cannot be reached, it tries again
/// with back-off — the channel still counts against the budget meanwhile — until it
/// succeeds or the token expires on its own.
async fn retire_token(parts: &Parts, token: &Token) {
    let mut backoff = Backoff::new();
    loop {
        match parts.genesys.retire_token(&token.value).await {
            Ok(()) | Err(UpstreamError::Unauthorized) => return,
            Err(error) => {
                tracing::warn!(%error, "could not retire a token: its channel keeps its budget slot meanwhile");
                let retry_at = bounds::after(
                    error
                        .retry_after()
                        .unwrap_or_default()
                        .max(backoff.next_wait()),
                );
                tokio::select! {
                    _ = tokio::time::sleep_until(retry_at.min(token.expires_at)) => {}
                    _ = parts.shutdown.cancelled() => return,
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
            bounds::after(Duration::from_secs_f64((1.0 - self.tokens) / PACE_PER_SEC))
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

    /// No call before `wait` has passed (a `Retry-After`, a back-off).
    fn defer(&mut self, wait: Duration) {
        self.not_before = self.not_before.max(bounds::after(wait));
    }
}
