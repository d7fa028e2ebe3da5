//! The pool of upstream channels: one lock around [`PoolState`], and the carrying out
//! of its decisions' effects (spawning channel tasks, waking them, gap notices,
//! waking the requests that wait on topics).
//!
//! Every decision is one transition of the state under one lock, which is what makes
//! the budget impossible to exceed: a channel task may create an upstream channel only
//! after [`Pool::acquire_slot`] granted it a slot, and a slot is given back only once
//! the channel is gone upstream ([`Pool::gone`]). Channel tasks are started by an
//! injected spawner, so the pool knows nothing of how a channel is driven.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Delivery;
use super::state::{
    Assignment, Capacity, ChannelKey, ChannelView, Effect, Effects, ForeignCount, Grant,
    HandoverReason, Limits, PoolState, Refusal, TopicOutcome,
};
use crate::config::{Config, GENESYS_CHANNELS_PER_CLIENT};
use crate::metrics::{Readings, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

/// Starts the task that drives channel `key`.
pub type Spawner = Box<dyn Fn(&Arc<Pool>, ChannelKey) + Send + Sync>;

/// Buckets of `handover_handover_duration_seconds`: a handover takes a few hundred
/// milliseconds (a mint, a channel, a socket, a subscription), more when it waits for
/// the spare slot.
const DURATION_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
];

/// What a channel task tells the pool.
#[derive(Debug)]
pub enum Report<'a> {
    SocketOpened {
        credential: &'a Arc<str>,
    },
    SocketClosed,
    Synced {
        applied: &'a BTreeSet<String>,
        rejected: &'a BTreeSet<String>,
    },
    Refused {
        topics: &'a BTreeSet<String>,
        refusal: Refusal,
    },
    WentLive,
    HandoverDue(HandoverReason),
    Lost {
        since: SystemTime,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// What the pool counts (registered by [`Pool::register_metrics`]).
struct PoolMetrics {
    /// Planned handovers completed, by reason, and how long each took from the start
    /// of the successor's build to the switch.
    handovers: Family<ReasonLabels, Counter>,
    durations: Family<ReasonLabels, Histogram, fn() -> Histogram>,
    /// All of them, whatever the reason (for the demo and tests).
    completed: Counter,
    /// Channels rebuilt after an unplanned loss (clients got a gap notice).
    rebuilds: Counter,
    /// Channels not created (or made to wait) because others' channels of the OAuth
    /// client left no room: creating them would have made Genesys evict one.
    evictions_avoided: Counter,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self {
            handovers: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            completed: Counter::default(),
            rebuilds: Counter::default(),
            evictions_avoided: Counter::default(),
        }
    }
}

struct Shared {
    state: PoolState,
    wakes: HashMap<ChannelKey, Arc<Notify>>,
}

pub struct Pool {
    shared: Mutex<Shared>,
    topics_changed: Notify,
    slot_freed: Notify,
    spawner: OnceLock<Spawner>,
    delivery: Arc<dyn Delivery>,
    shutdown: CancellationToken,
    metrics: PoolMetrics,
    /// Whether holding back for others' channels was logged as a warning since their
    /// count last changed (then it is logged at debug: a login storm would repeat it).
    held_back_warned: AtomicBool,
    /// Test seam: channel tasks told to panic at their next wake-up.
    #[cfg(feature = "test-util")]
    injected_panics: Mutex<std::collections::HashSet<ChannelKey>>,
}

/// The state's limits from a config.
pub fn limits(config: &Config) -> Limits {
    Limits {
        max_channels: config.upstream.max_channels,
        client_channels: GENESYS_CHANNELS_PER_CLIENT,
        max_topics: config.upstream.max_topics_per_channel,
        idle_timeout: config.upstream.idle_channel_timeout,
    }
}

impl Pool {
    pub fn new(
        limits: Limits,
        delivery: Arc<dyn Delivery>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            shared: Mutex::new(Shared {
                state: PoolState::new(limits),
                wakes: HashMap::new(),
            }),
            topics_changed: Notify::new(),
            slot_freed: Notify::new(),
            spawner: OnceLock::new(),
            delivery,
            shutdown,
            metrics: PoolMetrics::default(),
            held_back_warned: AtomicBool::new(false),
            #[cfg(feature = "test-util")]
            injected_panics: Mutex::default(),
        })
    }

    /// Sets how channel tasks are started; once, before the first topic is wanted.
    pub fn set_spawner(&self, spawner: Spawner) {
        if self.spawner.set(spawner).is_err() {
            tracing::error!("the pool's spawner was set twice; keeping the first");
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one transition under the lock, then carries out its effects.
    fn apply(self: &Arc<Self>, transition: impl FnOnce(&mut PoolState) -> Effects) {
        self.apply_with(|state| ((), transition(state)));
    }

    /// [`Pool::apply`] for a transition that also answers something.
    fn apply_with<T>(
        self: &Arc<Self>,
        transition: impl FnOnce(&mut PoolState) -> (T, Effects),
    ) -> T {
        let (answer, effects, wakes) = {
            let mut shared = self.shared();
            let (answer, effects) = transition(&mut shared.state);
            let mut wakes = Vec::new();
            for effect in &effects {
                match effect {
                    Effect::Spawn(key) => {
                        shared.wakes.insert(*key, Arc::new(Notify::new()));
                    }
                    Effect::Wake(key) => wakes.extend(shared.wakes.get(key).cloned()),
                    _ => {}
                }
            }
            (answer, effects, wakes)
        };
        for wake in wakes {
            wake.notify_one();
        }
        for effect in effects {
            self.carry_out(effect);
        }
        answer
    }

    fn carry_out(self: &Arc<Self>, effect: Effect) {
        match effect {
            Effect::Spawn(key) => match self.spawner.get() {
                Some(spawn) => spawn(self, key),
                None => tracing::error!(channel = key, "no spawner set: channel not started"),
            },
            Effect::Wake(_) => {}
            Effect::TopicsChanged => self.topics_changed.notify_waiters(),
            Effect::SlotFreed => self.slot_freed.notify_waiters(),
            Effect::Gap { topics, from } => {
                self.delivery.gap(&topics, from, SystemTime::now());
            }
            Effect::HandoverCompleted {
                channel,
                predecessor,
                reason,
                took,
            } => {
                let labels = ReasonLabels {
                    reason: reason.as_str(),
                };
                self.metrics.handovers.get_or_create(&labels).inc();
                self.metrics
                    .durations
                    .get_or_create(&labels)
                    .observe(took.as_secs_f64());
                self.metrics.completed.inc();
                tracing::info!(
                    channel = format!("ch-{channel}"),
                    predecessor = format!("ch-{predecessor}"),
                    reason = reason.as_str(),
                    duration_ms = took.as_millis() as u64,
                    outcome = "completed",
                    "handover"
                );
            }
            Effect::Rebuilt { channel, topics } => {
                self.metrics.rebuilds.inc();
                tracing::warn!(
                    channel = format!("ch-{channel}"),
                    topics,
                    outcome = "gap",
                    "upstream channel rebuilt after a loss: clients told of the gap"
                );
            }
            Effect::HeldBack { foreign } => self.held_back(foreign),
            Effect::ForeignChanged { from, to, slots } => {
                self.held_back_warned.store(false, Ordering::Relaxed);
                let client_channels = GENESYS_CHANNELS_PER_CLIENT;
                match to {
                    0 => tracing::info!(
                        others = to,
                        before = from,
                        slots,
                        "the OAuth client's channels were counted: none is held by others"
                    ),
                    _ => tracing::warn!(
                        others = to,
                        before = from,
                        client_channels,
                        slots,
                        "channels of the OAuth client held by others (other replicas, scripts, desktops with the secret): \
                         the proxy holds at most what they leave of Genesys' 20, and creates no channel that would evict one"
                    ),
                }
            }
        }
    }

    /// A channel the budget allows was not created, or must wait: others' channels
    /// (`foreign`) leave no room for it.
    fn held_back(&self, foreign: usize) {
        self.metrics.evictions_avoided.inc();
        let capacity = self.capacity();
        if self.held_back_warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                others = foreign,
                slots = capacity.slots,
                "no upstream channel created: it would make Genesys evict another user's"
            );
        } else {
            tracing::warn!(
                others = foreign,
                client_channels = capacity.client_channels,
                slots = capacity.slots,
                "no upstream channel created: it would make Genesys evict another user's \
                 (topics beyond the channels held are refused; a handover waits for a slot)"
            );
        }
    }

    // ---- demand (from client sessions) ----------------------------------------------

    /// Places topics that gained their first subscriber (one batch).
    pub fn want(self: &Arc<Self>, topics: &[String]) {
        let now = Instant::now();
        self.apply(|state| state.want(topics, now));
    }

    /// Forgets topics that lost their last subscriber.
    pub fn release(self: &Arc<Self>, topics: &[String]) {
        let now = Instant::now();
        self.apply(|state| state.release(topics, now));
    }

    /// How each topic's subscription stands now (`None`: not settled yet).
    pub fn outcomes(&self, topics: &[String]) -> Vec<Option<TopicOutcome>> {
        self.shared().state.outcomes(topics)
    }

    /// Resolves at the next change of any topic's outcome.
    pub fn topics_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.topics_changed.notified()
    }

    /// Waits until every topic is live or has failed, at most until `deadline`.
    pub async fn wait(&self, topics: &[String], deadline: Instant) -> Vec<(String, TopicOutcome)> {
        loop {
            let notified = self.topics_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let outcomes = self.shared().state.outcomes(topics);
            let pending = outcomes.iter().any(Option::is_none);
            if !pending || Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return super::state::answers(topics, outcomes);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

    // ---- operations (drain, reload, inspection) ---------------------------------------

    /// Every serving channel pinned to a draining credential hands over.
    pub fn credentials_changed(self: &Arc<Self>, draining: &dyn Fn(&str) -> bool) {
        let now = Instant::now();
        self.apply(|state| state.credentials_draining(draining, now));
    }

    /// New limits from a reloaded config.
    pub fn reload(self: &Arc<Self>, limits: Limits) {
        let now = Instant::now();
        self.apply(|state| state.reload(limits, now));
    }

    pub fn limits(&self) -> Limits {
        self.shared().state.limits()
    }

    /// What the budget allows now, others' channels counted.
    pub fn capacity(&self) -> Capacity {
        self.shared().state.capacity()
    }

    // ---- other users of the OAuth client ---------------------------------------------

    /// A listing of the OAuth client's channels, sent at `sent`, answered `listed`:
    /// what it says of others' channels (see [`PoolState::counted`]), applied in the
    /// same critical section as the reading of the proxy's own, so that none opens or
    /// closes in between.
    /// `same_client` tells the credential sets of the listing's OAuth client.
    pub fn foreign_counted(
        self: &Arc<Self>,
        listed: usize,
        sent: Instant,
        same_client: &dyn Fn(&str) -> bool,
    ) -> ForeignCount {
        let now = Instant::now();
        self.apply_with(|state| state.counted(listed, sent, same_client, now))
    }

    /// The listing failed (see [`PoolState::foreign_uncounted`]).
    pub fn foreign_uncounted(self: &Arc<Self>) {
        let now = Instant::now();
        self.apply(|state| state.foreign_uncounted(now));
    }

    /// Channels with an open socket minted with `credential`.
    pub fn open_channels_of(&self, credential: &str) -> usize {
        self.shared().state.open_channels_of(credential)
    }

    pub fn channels(&self) -> Vec<ChannelView> {
        self.shared().state.channels()
    }

    /// Planned handovers completed so far.
    pub fn handovers(&self) -> u64 {
        self.metrics.completed.get()
    }

    /// Channels rebuilt after an unplanned loss so far.
    pub fn rebuilds(&self) -> u64 {
        self.metrics.rebuilds.get()
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        // Every reason from zero, so that dashboards and alerts see the series.
        for reason in HandoverReason::ALL {
            let labels = ReasonLabels {
                reason: reason.as_str(),
            };
            let _ = self.metrics.handovers.get_or_create(&labels);
            let _ = self.metrics.durations.get_or_create(&labels);
        }
        registry.register(
            "handovers",
            "Planned make-before-break handovers completed, by reason (expiry, maintenance, drain, resync).",
            self.metrics.handovers.clone(),
        );
        registry.register_with_unit(
            "handover_duration",
            "How long a handover took, from the start of its successor's build to the switch.",
            Unit::Seconds,
            self.metrics.durations.clone(),
        );
        registry.register(
            "rebuilds",
            "Upstream channels rebuilt after an unplanned loss (their clients got a gap notice).",
            self.metrics.rebuilds.clone(),
        );
        registry.register(
            "upstream_evictions_avoided",
            "Upstream channels not created, or made to wait, because the OAuth client's channels held by others left no room: creating them would have made Genesys evict one.",
            self.metrics.evictions_avoided.clone(),
        );
        let (channels, sockets, used, free, allowed, foreign) = (
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
        );
        Readings::new()
            .gauge(
                "upstream_channels",
                "Upstream channels, until each is gone upstream.",
                move || channels.channels().len() as i64,
            )
            .gauge("upstream_sockets", "Upstream sockets open.", move || {
                sockets.channels().iter().filter(|c| c.socket_open).count() as i64
            })
            .gauge(
                "budget_slots_used",
                "Budget slots held by upstream channels (a channel holds one until it is gone upstream).",
                move || used.channels().iter().filter(|c| c.holds_slot).count() as i64,
            )
            .gauge(
                "budget_slots_free",
                "Budget slots free: those allowed (budget_slots_allowed) minus those held.",
                move || {
                    let held = free.channels().iter().filter(|c| c.holds_slot).count();
                    free.capacity().slots.saturating_sub(held) as i64
                },
            )
            .gauge(
                "budget_slots_allowed",
                "Budget slots the proxy may hold: upstream.max_channels, or fewer when others' channels leave less of Genesys' 20 per OAuth client.",
                move || allowed.capacity().slots as i64,
            )
            .gauge(
                "upstream_foreign_channels",
                "Channels of the OAuth client held by others (other replicas, scripts, desktops holding the secret), as last counted.",
                move || foreign.capacity().foreign.unwrap_or(0) as i64,
            )
            .register(registry);
    }

    // ---- for channel tasks --------------------------------------------------------------

    /// What channel `key` should do now, and the handle that wakes it when that changes.
    pub fn assignment(&self, key: ChannelKey) -> Option<(Assignment, Arc<Notify>)> {
        let shared = self.shared();
        let assignment = shared.state.assignment(key)?;
        let wake = shared.wakes.get(&key)?.clone();
        Some((assignment, wake))
    }

    /// The generation of channel `key`'s wanted topics (0 once it is gone): cheap to
    /// ask on every wake-up.
    pub fn generation(&self, key: ChannelKey) -> u64 {
        self.shared().state.generation(key)
    }

    /// Waits for a free budget slot and takes it. `false` if the channel is no longer
    /// wanted or the proxy is shutting down.
    pub async fn acquire_slot(&self, key: ChannelKey) -> bool {
        let mut held_back = false;
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let grant = self.shared().state.grant_slot(key);
            match grant {
                Grant::Granted => return true,
                Grant::Gone => return false,
                Grant::Wait => {}
                // Counted once per channel, however long it waits.
                Grant::HeldBack { foreign } if !held_back => {
                    held_back = true;
                    self.held_back(foreign);
                }
                Grant::HeldBack { .. } => {}
            }
            tokio::select! {
                _ = freed => {}
                _ = self.shutdown.cancelled() => return false,
            }
        }
    }

    /// Applies what a channel task reports about channel `key`.
    pub fn report(self: &Arc<Self>, key: ChannelKey, report: Report<'_>) {
        let now = Instant::now();
        match report {
            Report::SocketOpened { credential } => {
                self.shared().state.socket_opened(key, credential, now);
            }
            Report::SocketClosed => self.shared().state.socket_closed(key),
            Report::Synced { applied, rejected } => {
                self.apply(|state| state.synced(key, applied, rejected, now));
            }
            Report::Refused { topics, refusal } => {
                self.apply(|state| state.refused(key, topics, refusal, now));
            }
            Report::WentLive => self.apply(|state| state.went_live(key, now)),
            Report::HandoverDue(reason) => {
                self.apply(|state| state.begin_handover(key, reason, now));
            }
            Report::Lost { since } => self.apply(|state| state.lost(key, now, since)),
        }
    }

    /// When channel `key` should start its planned handover (see
    /// [`PoolState::schedule_handover`]).
    pub fn schedule_handover(
        &self,
        key: ChannelKey,
        window: (Instant, Instant),
        preferred: Instant,
        spacing: std::time::Duration,
    ) -> Instant {
        self.shared()
            .state
            .schedule_handover(key, window, preferred, spacing)
    }

    /// Retires channel `key` if it has carried no topic for the idle timeout; `true` if
    /// it now retires.
    pub fn idle_check(&self, key: ChannelKey) -> bool {
        self.shared().state.idle_check(key, Instant::now())
    }

    /// Channel `key` is gone upstream: its slot is free and it is forgotten.
    pub fn gone(self: &Arc<Self>, key: ChannelKey) {
        self.apply(|state| state.gone(key));
        self.shared().wakes.remove(&key);
    }
}

/// Test seams, compiled only with the `test-util` feature (the crate's own tests
/// enable it); production builds have none of them.
#[cfg(feature = "test-util")]
impl Pool {
    /// Hand over break-before-make, so that tests can prove they see gaps.
    pub fn set_break_before_make(&self, on: bool) {
        self.shared().state.set_break_before_make(on);
    }

    /// Makes channel `key`'s task panic at its next wake-up, as a bug would.
    pub fn inject_panic(&self, key: ChannelKey) {
        self.injected_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key);
        if let Some(wake) = self.shared().wakes.get(&key) {
            wake.notify_one();
        }
    }

    pub(super) fn take_injected_panic(&self, key: ChannelKey) -> bool {
        self.injected_panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
    }
}
