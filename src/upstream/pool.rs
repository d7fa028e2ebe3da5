//! The pool of upstream channels: which topic is carried by which channel, the
//! channel budget, and the bookkeeping of handovers.
//!
//! Every channel is an [`Entry`] driven by its own task (`channel.rs`). The pool only
//! decides; the tasks talk to Genesys. All decisions happen under one mutex, which is
//! what makes the budget impossible to exceed: a channel task may create an upstream
//! channel only after `acquire_slot` granted it a slot, and a slot is given back only
//! once the channel is gone upstream (its token retired, revoked or expired).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenSource;
use crate::config::Config;
use crate::router::Router;
use crate::upstream::genesys::Genesys;

pub type ChannelKey = u64;

/// How a topic's subscription ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    /// Subscribed upstream on a channel whose socket is open.
    Live,
    /// Genesys refused it (the OAuth client may not see it).
    Rejected,
    /// Every channel the budget allows is full.
    NoCapacity,
    /// Not live before the deadline, or released meanwhile.
    Failed(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopicState {
    Pending,
    Live,
    Rejected,
    NoCapacity,
}

struct Placement {
    channel: Option<ChannelKey>,
    state: TopicState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Carries its topics and accepts new ones.
    Serving,
    /// Being built to take over from another channel; accepts new topics.
    Successor { of: Option<ChannelKey> },
    /// Its successor is being built; it keeps streaming meanwhile.
    HandingOver { successor: ChannelKey },
    /// Replaced; streams for the overlap, then closes and retires its token.
    Retiring,
}

struct Entry {
    role: Role,
    credential: Option<Arc<str>>,
    desired: BTreeSet<String>,
    /// Bumped at every change of `desired`, so the channel task can tell cheaply
    /// whether it must sync.
    generation: u64,
    holds_slot: bool,
    socket_open: bool,
    /// A handover was asked for (drain, maintenance warning).
    handover_requested: bool,
    /// Close now, without waiting for the overlap (the broken-handover test switch).
    retire_at_once: bool,
    /// For a successor replacing a channel that died: since when events may be lost.
    gap_from: Option<SystemTime>,
    /// For a successor: when its handover began.
    handover_began: Option<Instant>,
    wake: Arc<Notify>,
}

pub struct Pool {
    state: Mutex<PoolState>,
    topics_changed: Notify,
    slot_freed: Notify,
    pub(super) genesys: Arc<Genesys>,
    pub(super) tokens: Arc<TokenSource>,
    pub(super) router: Arc<Router>,
    pub(crate) config: Arc<ArcSwap<Config>>,
    pub(super) tasks: TaskTracker,
    pub(super) shutdown: CancellationToken,
    /// Test-only: hand over break-before-make, so that tests can prove they see gaps.
    pub break_before_make: AtomicBool,
    /// How long a serving channel may carry no topic before it is retired (a minute;
    /// tests shorten it). Keeping it that long keeps it warm for the next subscriber.
    pub idle_channel_timeout: Mutex<Duration>,
    pub(super) lead_clamp_warned: AtomicBool,
    /// Planned handovers completed (a successor went live and its predecessor retired).
    pub handovers: AtomicU64,
    /// The most recent completed handovers, for the admin listener and the benches.
    recent_handovers: Mutex<VecDeque<HandoverRecord>>,
    /// Channels rebuilt after an unplanned loss.
    pub rebuilds: AtomicU64,
}

#[derive(Default)]
struct PoolState {
    next_key: ChannelKey,
    topics: HashMap<String, Placement>,
    channels: BTreeMap<ChannelKey, Entry>,
}

impl PoolState {
    fn slots_used(&self) -> usize {
        self.channels.values().filter(|e| e.holds_slot).count()
    }

    /// Logical channels: a channel being handed over and its successor count once.
    fn logical_channels(&self) -> usize {
        self.channels
            .values()
            .filter(|e| matches!(e.role, Role::Serving | Role::Successor { .. }))
            .count()
    }

    fn new_entry(&mut self, role: Role, desired: BTreeSet<String>) -> ChannelKey {
        self.next_key += 1;
        self.channels.insert(
            self.next_key,
            Entry {
                role,
                credential: None,
                desired,
                generation: 1,
                holds_slot: false,
                socket_open: false,
                handover_requested: false,
                retire_at_once: false,
                gap_from: None,
                handover_began: None,
                wake: Arc::new(Notify::new()),
            },
        );
        self.next_key
    }
}

/// How long a serving channel with no topic is kept before it is retired.
const IDLE_CHANNEL_TIMEOUT: Duration = Duration::from_secs(60);

/// How many completed handovers `recent_handovers` remembers.
const RECENT_HANDOVERS: usize = 1000;

/// One completed handover: when it completed, and how long it took from the start of
/// the successor's build to the switch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HandoverRecord {
    pub completed_at_ms: u64,
    pub duration_ms: f64,
}

/// A snapshot of one channel, for the admin listener and tests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChannelView {
    pub key: ChannelKey,
    pub role: String,
    pub credential: Option<String>,
    pub topics: usize,
    pub socket_open: bool,
    pub holds_slot: bool,
}

impl Pool {
    pub fn new(
        genesys: Arc<Genesys>,
        tokens: Arc<TokenSource>,
        router: Arc<Router>,
        config: Arc<ArcSwap<Config>>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            topics_changed: Notify::new(),
            slot_freed: Notify::new(),
            genesys,
            tokens,
            router,
            config,
            tasks,
            shutdown,
            break_before_make: AtomicBool::new(false),
            idle_channel_timeout: Mutex::new(IDLE_CHANNEL_TIMEOUT),
            lead_clamp_warned: AtomicBool::new(false),
            handovers: AtomicU64::new(0),
            recent_handovers: Mutex::default(),
            rebuilds: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> (usize, usize) {
        let config = self.config.load();
        (
            config.upstream.max_channels,
            config.upstream.max_topics_per_channel,
        )
    }

    // ---- demand (from client sessions) ----------------------------------------------

    /// Places topics that gained their first subscriber on channels, opening a new
    /// channel when the open ones are full and the budget allows it.
    pub fn want(self: &Arc<Self>, topics: &[String]) {
        let (max_channels, max_topics) = self.limits();
        let mut to_wake = Vec::new();
        let mut to_spawn = Vec::new();
        {
            let mut state = self.state();
            for topic in topics {
                if state.topics.contains_key(topic) {
                    continue;
                }
                let accepting = state.channels.iter().find(|(_, e)| {
                    matches!(e.role, Role::Serving | Role::Successor { .. })
                        && e.desired.len() < max_topics
                });
                let key = match accepting {
                    Some((&key, _)) => Some(key),
                    // One slot always stays free for handovers.
                    None if state.logical_channels() < max_channels.saturating_sub(1) => {
                        let key = state.new_entry(Role::Serving, BTreeSet::new());
                        to_spawn.push(key);
                        Some(key)
                    }
                    None => None,
                };
                let placement = match key {
                    Some(key) => {
                        let entry = state.channels.get_mut(&key).expect("just chosen");
                        entry.desired.insert(topic.clone());
                        entry.generation += 1;
                        to_wake.push(entry.wake.clone());
                        Placement {
                            channel: Some(key),
                            state: TopicState::Pending,
                        }
                    }
                    None => Placement {
                        channel: None,
                        state: TopicState::NoCapacity,
                    },
                };
                state.topics.insert(topic.clone(), placement);
            }
        }
        for key in to_spawn {
            self.spawn_channel(key);
        }
        for wake in to_wake {
            wake.notify_one();
        }
        self.topics_changed.notify_waiters();
    }

    /// Forgets topics that lost their last subscriber; their channel unsubscribes them.
    pub fn release(&self, topics: &[String]) {
        let mut to_wake = Vec::new();
        {
            let mut state = self.state();
            for topic in topics {
                let Some(placement) = state.topics.remove(topic) else {
                    continue;
                };
                if let Some(entry) = placement.channel.and_then(|k| state.channels.get_mut(&k)) {
                    entry.desired.remove(topic);
                    entry.generation += 1;
                    to_wake.push(entry.wake.clone());
                }
            }
        }
        for wake in to_wake {
            wake.notify_one();
        }
        self.topics_changed.notify_waiters();
    }

    /// Waits until every topic is live or has failed, at most until `deadline`.
    pub async fn wait(&self, topics: &[String], deadline: Instant) -> Vec<(String, TopicOutcome)> {
        loop {
            let notified = self.topics_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcomes: Vec<(String, Option<TopicOutcome>)> = {
                let state = self.state();
                topics
                    .iter()
                    .map(|t| {
                        let outcome = match state.topics.get(t).map(|p| p.state) {
                            None => Some(TopicOutcome::Failed("released while subscribing")),
                            Some(TopicState::Pending) => None,
                            Some(TopicState::Live) => Some(TopicOutcome::Live),
                            Some(TopicState::Rejected) => Some(TopicOutcome::Rejected),
                            Some(TopicState::NoCapacity) => Some(TopicOutcome::NoCapacity),
                        };
                        (t.clone(), outcome)
                    })
                    .collect()
            };
            let pending = outcomes.iter().any(|(_, o)| o.is_none());
            if !pending || Instant::now() >= deadline {
                return outcomes
                    .into_iter()
                    .map(|(t, o)| {
                        (
                            t,
                            o.unwrap_or(TopicOutcome::Failed("not live upstream in time")),
                        )
                    })
                    .collect();
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

    // ---- operations (drain, inspection) ----------------------------------------------

    /// Wakes every channel so that those pinned to a draining credential hand over.
    pub fn credentials_changed(&self) {
        for entry in self.state().channels.values() {
            entry.wake.notify_one();
        }
    }

    /// Channels with an open socket minted with `credential`.
    pub fn open_channels_of(&self, credential: &str) -> usize {
        self.state()
            .channels
            .values()
            .filter(|e| e.socket_open && e.credential.as_deref() == Some(credential))
            .count()
    }

    /// Whether at least one channel has an open socket.
    pub fn any_socket_open(&self) -> bool {
        self.state().channels.values().any(|e| e.socket_open)
    }

    pub fn channels(&self) -> Vec<ChannelView> {
        self.state()
            .channels
            .iter()
            .map(|(&key, e)| ChannelView {
                key,
                role: format!("{:?}", e.role),
                credential: e.credential.as_deref().map(str::to_owned),
                topics: e.desired.len(),
                socket_open: e.socket_open,
                holds_slot: e.holds_slot,
            })
            .collect()
    }

    // ---- called by channel tasks -----------------------------------------------------

    fn spawn_channel(self: &Arc<Self>, key: ChannelKey) {
        let pool = self.clone();
        self.tasks.spawn(super::channel::drive(pool, key));
    }

    pub(super) fn wake_of(&self, key: ChannelKey) -> Option<Arc<Notify>> {
        self.state().channels.get(&key).map(|e| e.wake.clone())
    }

    /// Waits for a free slot and takes it. `false` if the channel is no longer needed
    /// or the proxy is shutting down.
    pub(super) async fn acquire_slot(&self, key: ChannelKey) -> bool {
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let (max_channels, _) = self.limits();
                let mut state = self.state();
                let used = state.slots_used();
                let Some(entry) = state.channels.get_mut(&key) else {
                    return false;
                };
                if used < max_channels {
                    entry.holds_slot = true;
                    return true;
                }
            }
            tokio::select! {
                _ = freed => {}
                _ = self.shutdown.cancelled() => return false,
            }
        }
    }

    /// Gives the slot back: the channel is gone upstream.
    pub(super) fn free_slot(&self, key: ChannelKey) {
        if let Some(entry) = self.state().channels.get_mut(&key) {
            entry.holds_slot = false;
        }
        self.slot_freed.notify_waiters();
    }

    /// Forgets a channel whose task ends.
    pub(super) fn remove(&self, key: ChannelKey) {
        self.state().channels.remove(&key);
        self.slot_freed.notify_waiters();
    }

    pub(super) fn role(&self, key: ChannelKey) -> Option<Role> {
        self.state().channels.get(&key).map(|e| e.role)
    }

    /// The topics the channel should carry, and their generation.
    pub(super) fn desired(&self, key: ChannelKey) -> (BTreeSet<String>, u64) {
        self.state()
            .channels
            .get(&key)
            .map(|e| (e.desired.clone(), e.generation))
            .unwrap_or_default()
    }

    /// The generation of the channel's desired topics (0 once it is gone).
    pub(super) fn desired_generation(&self, key: ChannelKey) -> u64 {
        self.state().channels.get(&key).map_or(0, |e| e.generation)
    }

    /// Whether the channel should hand over now (asked for, or its credential drains).
    pub(super) fn handover_due(&self, key: ChannelKey) -> bool {
        let state = self.state();
        let Some(entry) = state.channels.get(&key) else {
            return false;
        };
        entry.role == Role::Serving
            && (entry.handover_requested
                || entry
                    .credential
                    .as_deref()
                    .is_some_and(|c| self.tokens.is_draining(c)))
    }

    pub(super) fn request_handover(&self, key: ChannelKey) {
        if let Some(entry) = self.state().channels.get_mut(&key) {
            entry.handover_requested = true;
            entry.wake.notify_one();
        }
    }

    /// Whether a serving channel carries no topic at all.
    pub(super) fn is_idle(&self, key: ChannelKey) -> bool {
        let state = self.state();
        state
            .channels
            .get(&key)
            .is_some_and(|e| e.role == Role::Serving && e.desired.is_empty())
    }

    /// Retires a serving channel that still carries no topic; `false` if it got one
    /// meanwhile. Without topics there is nothing to overlap.
    pub(super) fn retire_idle(&self, key: ChannelKey) -> bool {
        let mut state = self.state();
        let Some(entry) = state.channels.get_mut(&key) else {
            return false;
        };
        if entry.role != Role::Serving || !entry.desired.is_empty() {
            return false;
        }
        entry.role = Role::Retiring;
        entry.retire_at_once = true;
        true
    }

    pub(super) fn idle_channel_timeout(&self) -> Duration {
        *self
            .idle_channel_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the channel should stop: `Some(at_once)` once it is retiring.
    pub(super) fn retiring(&self, key: ChannelKey) -> Option<bool> {
        let state = self.state();
        let entry = state.channels.get(&key)?;
        (entry.role == Role::Retiring).then_some(entry.retire_at_once)
    }

    pub(super) fn socket_state(&self, key: ChannelKey, credential: &Arc<str>, open: bool) {
        if let Some(entry) = self.state().channels.get_mut(&key) {
            entry.socket_open = open;
            entry.credential = Some(credential.clone());
        }
    }

    /// The result of a subscription sync: `applied` are subscribed upstream (and the
    /// socket is open), `rejected` were refused by Genesys.
    pub(super) fn synced(
        &self,
        key: ChannelKey,
        applied: &BTreeSet<String>,
        rejected: &BTreeSet<String>,
    ) {
        {
            let mut state = self.state();
            for topic in applied {
                if let Some(p) = state.topics.get_mut(topic)
                    && p.channel == Some(key)
                {
                    p.state = TopicState::Live;
                }
            }
            for topic in rejected {
                if let Some(p) = state.topics.get_mut(topic)
                    && p.channel == Some(key)
                {
                    p.state = TopicState::Rejected;
                }
                if let Some(entry) = state.channels.get_mut(&key)
                    && entry.desired.remove(topic)
                {
                    entry.generation += 1;
                }
            }
        }
        self.topics_changed.notify_waiters();
    }

    /// Starts building a successor for a serving channel; its topics move to the
    /// successor (they stay live: the old channel keeps streaming meanwhile).
    pub(super) fn begin_handover(self: &Arc<Self>, key: ChannelKey) {
        let successor = {
            let mut state = self.state();
            let Some(entry) = state.channels.get(&key) else {
                return;
            };
            if entry.role != Role::Serving {
                return;
            }
            let desired = entry.desired.clone();
            let successor = state.new_entry(Role::Successor { of: Some(key) }, desired.clone());
            state
                .channels
                .get_mut(&successor)
                .expect("new")
                .handover_began = Some(Instant::now());
            let entry = state.channels.get_mut(&key).expect("checked above");
            entry.role = Role::HandingOver { successor };
            entry.handover_requested = false;
            if self.break_before_make.load(Ordering::Relaxed) {
                entry.role = Role::Retiring;
                entry.retire_at_once = true;
                entry.wake.notify_one();
                if let Some(s) = state.channels.get_mut(&successor) {
                    s.role = Role::Successor { of: None };
                }
            }
            for topic in &desired {
                if let Some(p) = state.topics.get_mut(topic) {
                    p.channel = Some(successor);
                }
            }
            successor
        };
        self.spawn_channel(successor);
    }

    /// A serving or handing-over channel died unexpectedly at `since`. Its topics go
    /// to a successor (a new one, or the one being built), which tells the affected
    /// clients about the gap once it is live.
    pub(super) fn lost(self: &Arc<Self>, key: ChannelKey, since: SystemTime) {
        let spawn = {
            let mut state = self.state();
            let Some(entry) = state.channels.get_mut(&key) else {
                return;
            };
            let role = entry.role;
            entry.socket_open = false;
            match role {
                Role::Serving => {
                    let desired = std::mem::take(&mut entry.desired);
                    entry.role = Role::Retiring;
                    let successor = state.new_entry(Role::Successor { of: None }, desired.clone());
                    state.channels.get_mut(&successor).expect("new").gap_from = Some(since);
                    for topic in &desired {
                        if let Some(p) = state.topics.get_mut(topic) {
                            p.channel = Some(successor);
                        }
                    }
                    Some(successor)
                }
                Role::HandingOver { successor } => {
                    entry.role = Role::Retiring;
                    if let Some(s) = state.channels.get_mut(&successor) {
                        s.gap_from = Some(since);
                        s.role = Role::Successor { of: None };
                    }
                    None
                }
                Role::Successor { .. } | Role::Retiring => None,
            }
        };
        if let Some(successor) = spawn {
            self.spawn_channel(successor);
        }
    }

    /// A successor (or a first channel) is live: it becomes the serving channel, its
    /// predecessor starts retiring, and clients hear of any gap.
    pub(super) fn went_live(&self, key: ChannelKey) {
        let (gap, predecessor_wake, began) = {
            let mut state = self.state();
            let Some(entry) = state.channels.get_mut(&key) else {
                return;
            };
            let predecessor = match entry.role {
                Role::Successor { of } => of,
                _ => None,
            };
            entry.role = Role::Serving;
            let gap = entry
                .gap_from
                .take()
                .map(|from| (from, entry.desired.iter().cloned().collect::<Vec<_>>()));
            let began = entry.handover_began.take();
            let wake = predecessor.and_then(|p| {
                let pred = state.channels.get_mut(&p)?;
                pred.role = Role::Retiring;
                Some(pred.wake.clone())
            });
            (gap, wake, began)
        };
        if let Some(wake) = predecessor_wake {
            self.handovers.fetch_add(1, Ordering::Relaxed);
            if let Some(began) = began {
                self.record_handover(began.elapsed());
            }
            wake.notify_one();
        }
        if let Some((from, topics)) = gap {
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                topics = topics.len(),
                "upstream channel rebuilt after a loss: clients told of the gap"
            );
            self.router.notify_gap(&topics, from, SystemTime::now());
        }
    }

    fn record_handover(&self, took: Duration) {
        let mut recent = self
            .recent_handovers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_HANDOVERS {
            recent.pop_front();
        }
        recent.push_back(HandoverRecord {
            completed_at_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            duration_ms: took.as_secs_f64() * 1000.0,
        });
    }

    /// The most recent completed handovers, oldest first.
    pub fn recent_handovers(&self) -> Vec<HandoverRecord> {
        self.recent_handovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The lead actually used for a token of `lifetime`: at most half of it.
    pub(super) fn lead_for(&self, lifetime: Duration) -> Duration {
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
