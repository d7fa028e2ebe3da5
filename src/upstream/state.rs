//! The pool's decisions, as plain state: which topic is carried by which channel,
//! the channel budget, and the roles of channels through a handover.
//!
//! Nothing here locks, sleeps or talks to anyone. Each transition takes the time it
//! happens at and returns the [`Effect`]s for the caller to carry out (spawn a channel
//! task, wake one, tell clients of a gap, …), so that `Pool` can apply one decision in
//! one critical section and tests can drive any ordering of events directly.
//!
//! The invariants ([`PoolState::check`]), which the property test in this module
//! checks after every step of random sequences of events:
//! - the budget holds: no slot is granted while `max_channels` are held, and a slot is
//!   held until the channel is gone upstream ([`PoolState::gone`]);
//! - a slot stays free for a handover: serving channels (and successors under
//!   construction) never take more than `max_channels - 1` of the budget;
//! - no wanted topic is orphaned: a pending or live topic is placed on a channel that
//!   exists, serves or is being built, and lists it; and a channel lists only topics
//!   placed on it;
//! - no serving channel outlives its last topic by more than the idle timeout (given
//!   [`PoolState::idle_check`] runs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

pub use crate::genesys::Refusal;
use crate::topic;

pub type ChannelKey = u64;
/// Topics placed by one call to [`PoolState::want`] (one subscription change's new
/// topics): when Genesys refuses a change wholesale, a batch is what gets refused.
pub type Batch = u64;

/// How a topic's subscription ended up, for the requests waiting on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    /// Subscribed upstream on a channel whose socket is open.
    Live,
    /// Genesys refused it (the OAuth client may not see it).
    Rejected,
    /// Every channel the budget allows is full.
    NoCapacity,
    /// Genesys refused the change that added it as a whole.
    Refused(Refusal),
    /// Not live before the deadline, or released meanwhile.
    Failed(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TopicState {
    Pending,
    Live,
    Rejected,
    NoCapacity,
    Refused(Refusal),
}

#[derive(Debug)]
struct Placement {
    channel: Option<ChannelKey>,
    state: TopicState,
    batch: Batch,
    weight: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum Role {
    /// Carries its topics and accepts new ones.
    Serving,
    /// Being built to take over from another channel (or from a lost one when `of` is
    /// `None`); accepts new topics.
    Successor { of: Option<ChannelKey> },
    /// Its successor is being built; it keeps streaming meanwhile.
    HandingOver { successor: ChannelKey },
    /// Replaced or idle; streams for the overlap (unless at once), then closes and
    /// retires its token.
    Retiring,
}

impl Role {
    /// Whether the channel carries (or is being built to carry) its own topics.
    fn is_logical(self) -> bool {
        matches!(self, Role::Serving | Role::Successor { .. })
    }
}

/// Why a channel hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoverReason {
    /// Its token or the channel itself is about to expire.
    Expiry,
    /// Genesys announced a maintenance close (`v2.system.socket_closing`).
    Maintenance,
    /// Its credential set is draining.
    Drain,
    /// Its upstream subscriptions could not be brought in line (repeated refusals of a
    /// change that only removes topics): a fresh channel starts from the wanted set.
    Resync,
}

impl HandoverReason {
    pub const ALL: [HandoverReason; 4] =
        [Self::Expiry, Self::Maintenance, Self::Drain, Self::Resync];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expiry => "expiry",
            Self::Maintenance => "maintenance",
            Self::Drain => "drain",
            Self::Resync => "resync",
        }
    }
}

#[derive(Debug)]
struct Entry {
    role: Role,
    credential: Option<Arc<str>>,
    desired: BTreeSet<String>,
    /// Sum of the desired topics' weights (combined topics count their expansion).
    load: usize,
    /// Bumped at every change of `desired`, so the channel task can tell cheaply
    /// whether it must sync.
    generation: u64,
    holds_slot: bool,
    socket_open: bool,
    /// Close without waiting for the overlap (an idle channel; break-before-make).
    retire_at_once: bool,
    /// For a successor replacing a channel that died: since when events may be lost.
    gap_from: Option<SystemTime>,
    /// For a successor: when its handover began, and why.
    handover: Option<(Instant, HandoverReason)>,
    /// For a serving channel with no topic: since when.
    empty_since: Option<Instant>,
}

/// Limits the state decides by; they may change at a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_channels: usize,
    /// Topic weight per channel.
    pub max_topics: usize,
    /// How long a serving channel may carry no topic before it is retired.
    pub idle_timeout: Duration,
}

/// What a transition asks its caller to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Start the task that drives this (new) channel.
    Spawn(ChannelKey),
    /// Wake this channel's task: its topics or its role changed.
    Wake(ChannelKey),
    /// Requests waiting on topics may have an answer.
    TopicsChanged,
    /// A budget slot was given back.
    SlotFreed,
    /// Tell the subscribers of these topics that events since `from` may be lost.
    Gap {
        topics: Vec<String>,
        from: SystemTime,
    },
    /// A planned handover completed: the successor went live and its predecessor
    /// retires.
    HandoverCompleted {
        channel: ChannelKey,
        predecessor: ChannelKey,
        reason: HandoverReason,
        took: Duration,
    },
    /// A channel lost unexpectedly was replaced.
    Rebuilt { channel: ChannelKey, topics: usize },
}

pub type Effects = Vec<Effect>;

/// What a channel task is asked to do, as the pool sees it now.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub role: Role,
    /// `Some(at_once)` once it should stop.
    pub retire: Option<bool>,
    pub generation: u64,
    /// The topics it should carry: `None` for those already delivered (live here or on
    /// its predecessor), or the batch that added them.
    pub topics: BTreeMap<String, Option<Batch>>,
}

/// Whether a channel may take a budget slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    Granted,
    /// Every slot is held: wait for one to be freed.
    Wait,
    /// The channel is no longer wanted.
    Gone,
}

/// A snapshot of one channel, for the admin listener and tests.
#[derive(Clone, Debug, Serialize)]
pub struct ChannelView {
    pub key: ChannelKey,
    #[serde(flatten)]
    pub role: Role,
    pub credential: Option<String>,
    pub topics: usize,
    pub socket_open: bool,
    pub holds_slot: bool,
}

#[derive(Debug)]
pub struct PoolState {
    limits: Limits,
    next_key: ChannelKey,
    next_batch: Batch,
    topics: HashMap<String, Placement>,
    channels: BTreeMap<ChannelKey, Entry>,
    /// When each serving channel will start its planned handover: kept apart, so that
    /// two rarely need the spare slot at once.
    due: BTreeMap<ChannelKey, Instant>,
    /// Test switch: hand over break-before-make, so tests can prove they see gaps.
    break_before_make: bool,
}

impl PoolState {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            next_key: 0,
            next_batch: 0,
            topics: HashMap::new(),
            channels: BTreeMap::new(),
            due: BTreeMap::new(),
            break_before_make: false,
        }
    }

    pub fn set_break_before_make(&mut self, on: bool) {
        self.break_before_make = on;
    }

    fn slots_used(&self) -> usize {
        self.channels.values().filter(|e| e.holds_slot).count()
    }

    /// Logical channels: a channel being handed over and its successor count once.
    fn logical_channels(&self) -> usize {
        self.channels
            .values()
            .filter(|e| e.role.is_logical())
            .count()
    }

    fn new_entry(&mut self, role: Role, desired: BTreeSet<String>, now: Instant) -> ChannelKey {
        self.next_key += 1;
        let load = desired.iter().map(|t| self.weight_of(t)).sum();
        let empty_since = desired.is_empty().then_some(now);
        self.channels.insert(
            self.next_key,
            Entry {
                role,
                credential: None,
                desired,
                load,
                generation: 1,
                holds_slot: false,
                socket_open: false,
                retire_at_once: false,
                gap_from: None,
                handover: None,
                empty_since,
            },
        );
        self.next_key
    }

    fn weight_of(&self, topic: &str) -> usize {
        self.topics
            .get(topic)
            .map_or_else(|| topic::weight(topic), |p| p.weight)
    }

    /// Takes `topic` off channel `key`'s wanted set.
    fn unlist(&mut self, key: ChannelKey, topic: &str, now: Instant) -> bool {
        let weight = self.weight_of(topic);
        let Some(entry) = self.channels.get_mut(&key) else {
            return false;
        };
        if !entry.desired.remove(topic) {
            return false;
        }
        entry.load = entry.load.saturating_sub(weight);
        entry.generation += 1;
        if entry.desired.is_empty() && entry.role == Role::Serving {
            entry.empty_since.get_or_insert(now);
        }
        true
    }

    /// Moves every topic placed on `from` to `to` (which lists them already).
    fn move_placements(&mut self, topics: &BTreeSet<String>, to: ChannelKey) {
        for topic in topics {
            if let Some(p) = self.topics.get_mut(topic) {
                p.channel = Some(to);
            }
        }
    }

    // ---- demand (from client sessions) ----------------------------------------------

    /// Places topics that gained their first subscriber on channels, opening a new
    /// channel when the open ones are full and the budget allows it. One call is one
    /// batch.
    pub fn want(&mut self, topics: &[String], now: Instant) -> Effects {
        let Limits {
            max_channels,
            max_topics,
            ..
        } = self.limits;
        self.next_batch += 1;
        let batch = self.next_batch;
        let mut effects = Vec::new();
        for topic in topics {
            if self.topics.contains_key(topic) {
                continue;
            }
            let weight = topic::weight(topic);
            let accepting = self
                .channels
                .iter()
                .find(|(_, e)| e.role.is_logical() && e.load + weight <= max_topics)
                .map(|(&key, _)| key);
            let key = match accepting {
                Some(key) => Some(key),
                // One slot always stays free for handovers.
                None if weight <= max_topics
                    && self.logical_channels() < max_channels.saturating_sub(1) =>
                {
                    let key = self.new_entry(Role::Serving, BTreeSet::new(), now);
                    effects.push(Effect::Spawn(key));
                    Some(key)
                }
                None => None,
            };
            let state = match key {
                Some(key) => {
                    let entry = self.channels.get_mut(&key).expect("just chosen");
                    entry.desired.insert(topic.clone());
                    entry.load += weight;
                    entry.generation += 1;
                    entry.empty_since = None;
                    effects.push(Effect::Wake(key));
                    TopicState::Pending
                }
                None => TopicState::NoCapacity,
            };
            self.topics.insert(
                topic.clone(),
                Placement {
                    channel: key,
                    state,
                    batch,
                    weight,
                },
            );
        }
        effects.push(Effect::TopicsChanged);
        effects
    }

    /// Forgets topics that lost their last subscriber; their channel unsubscribes them.
    pub fn release(&mut self, topics: &[String], now: Instant) -> Effects {
        let mut effects = Vec::new();
        for topic in topics {
            let Some(placement) = self.topics.get(topic) else {
                continue;
            };
            if let Some(key) = placement.channel
                && self.unlist(key, topic, now)
            {
                effects.push(Effect::Wake(key));
            }
            self.topics.remove(topic);
        }
        effects.push(Effect::TopicsChanged);
        effects
    }

    /// The outcome of each topic, `None` while it is pending.
    pub fn outcomes(&self, topics: &[String]) -> Vec<Option<TopicOutcome>> {
        topics
            .iter()
            .map(|t| match self.topics.get(t).map(|p| &p.state) {
                None => Some(TopicOutcome::Failed("released while subscribing")),
                Some(TopicState::Pending) => None,
                Some(TopicState::Live) => Some(TopicOutcome::Live),
                Some(TopicState::Rejected) => Some(TopicOutcome::Rejected),
                Some(TopicState::NoCapacity) => Some(TopicOutcome::NoCapacity),
                Some(TopicState::Refused(r)) => Some(TopicOutcome::Refused(r.clone())),
            })
            .collect()
    }

    // ---- the budget ------------------------------------------------------------------

    /// Grants channel `key` a budget slot if one is free.
    pub fn grant_slot(&mut self, key: ChannelKey) -> Grant {
        let used = self.slots_used();
        let Some(entry) = self.channels.get_mut(&key) else {
            return Grant::Gone;
        };
        if entry.holds_slot {
            return Grant::Granted;
        }
        // Retired before it ever held a slot (idle, or replaced): it has nothing to do.
        if entry.role == Role::Retiring {
            return Grant::Gone;
        }
        if used < self.limits.max_channels {
            entry.holds_slot = true;
            Grant::Granted
        } else {
            Grant::Wait
        }
    }

    /// The channel is gone upstream (its token retired, revoked or expired), or never
    /// got that far: its slot is free and it is forgotten. Its topics must have moved
    /// on ([`PoolState::lost`]) unless the proxy is shutting down.
    pub fn gone(&mut self, key: ChannelKey) -> Effects {
        self.due.remove(&key);
        match self.channels.remove(&key) {
            Some(_) => vec![Effect::SlotFreed],
            None => Vec::new(),
        }
    }

    // ---- what channel tasks report ---------------------------------------------------

    /// What channel `key` should do now.
    pub fn assignment(&self, key: ChannelKey) -> Option<Assignment> {
        let entry = self.channels.get(&key)?;
        let topics = entry
            .desired
            .iter()
            .map(|t| {
                let placement = self.topics.get(t);
                let pending_batch = placement
                    .filter(|p| p.state == TopicState::Pending)
                    .map(|p| p.batch);
                (t.clone(), pending_batch)
            })
            .collect();
        Some(Assignment {
            role: entry.role,
            retire: (entry.role == Role::Retiring).then_some(entry.retire_at_once),
            generation: entry.generation,
            topics,
        })
    }

    /// The generation of the channel's wanted topics (0 once it is gone).
    pub fn generation(&self, key: ChannelKey) -> u64 {
        self.channels.get(&key).map_or(0, |e| e.generation)
    }

    /// The socket of `key` opened with a token of `credential`.
    pub fn socket_opened(&mut self, key: ChannelKey, credential: &Arc<str>) {
        if let Some(entry) = self.channels.get_mut(&key) {
            entry.socket_open = true;
            entry.credential = Some(credential.clone());
        }
    }

    pub fn socket_closed(&mut self, key: ChannelKey) {
        if let Some(entry) = self.channels.get_mut(&key) {
            entry.socket_open = false;
        }
    }

    /// A subscription sync went through: `applied` are subscribed upstream (and the
    /// socket is open), `rejected` were refused one by one (no permission).
    pub fn synced(
        &mut self,
        key: ChannelKey,
        applied: &BTreeSet<String>,
        rejected: &BTreeSet<String>,
        now: Instant,
    ) -> Effects {
        for topic in applied {
            if let Some(p) = self.topics.get_mut(topic)
                && p.channel == Some(key)
                && p.state == TopicState::Pending
            {
                p.state = TopicState::Live;
            }
        }
        self.fail_topics(key, rejected, TopicState::Rejected, now);
        vec![Effect::TopicsChanged]
    }

    /// Genesys refused a change wholesale, and `topics` (pending topics of the batch
    /// that caused it) are refused with it; the channel keeps the rest.
    pub fn refused(
        &mut self,
        key: ChannelKey,
        topics: &BTreeSet<String>,
        refusal: Refusal,
        now: Instant,
    ) -> Effects {
        let pending: BTreeSet<String> = topics
            .iter()
            .filter(|t| {
                self.topics
                    .get(*t)
                    .is_some_and(|p| p.channel == Some(key) && p.state == TopicState::Pending)
            })
            .cloned()
            .collect();
        self.fail_topics(key, &pending, TopicState::Refused(refusal), now);
        vec![Effect::TopicsChanged]
    }

    /// Marks topics placed on `key` as failed and takes them off it (they stay known
    /// until their subscribers release them).
    fn fail_topics(
        &mut self,
        key: ChannelKey,
        topics: &BTreeSet<String>,
        state: TopicState,
        now: Instant,
    ) {
        for topic in topics {
            let Some(p) = self.topics.get_mut(topic) else {
                continue;
            };
            if p.channel != Some(key) {
                continue;
            }
            p.state = state.clone();
            p.channel = None;
            self.unlist(key, topic, now);
        }
    }

    /// Starts building a successor for a serving channel; its topics move to the
    /// successor (they stay live: the old channel keeps streaming meanwhile).
    pub fn begin_handover(
        &mut self,
        key: ChannelKey,
        reason: HandoverReason,
        now: Instant,
    ) -> Effects {
        let Some(entry) = self.channels.get(&key) else {
            return Vec::new();
        };
        if entry.role != Role::Serving {
            return Vec::new();
        }
        self.due.remove(&key);
        let desired = entry.desired.clone();
        let break_before_make = self.break_before_make;
        let successor = self.new_entry(
            Role::Successor {
                of: (!break_before_make).then_some(key),
            },
            desired.clone(),
            now,
        );
        self.channels.get_mut(&successor).expect("new").handover = Some((now, reason));
        self.move_placements(&desired, successor);
        let entry = self.channels.get_mut(&key).expect("checked above");
        if break_before_make {
            entry.role = Role::Retiring;
            entry.retire_at_once = true;
        } else {
            entry.role = Role::HandingOver { successor };
        }
        vec![Effect::Spawn(successor), Effect::Wake(key)]
    }

    /// When channel `key` should start its planned handover: the time nearest to
    /// `preferred`, within `[earliest, latest]`, that is `spacing` apart from every
    /// other channel's (a handover holds the spare slot from its successor's build
    /// until its predecessor is gone upstream); `preferred` if there is none.
    pub fn schedule_handover(
        &mut self,
        key: ChannelKey,
        window: (Instant, Instant),
        preferred: Instant,
        spacing: Duration,
    ) -> Instant {
        let (earliest, latest) = window;
        self.due.remove(&key);
        let others: Vec<Instant> = self.due.values().copied().collect();
        let apart = |a: Instant, b: Instant| if a > b { a - b } else { b - a };
        let free = |at: Instant| others.iter().all(|other| apart(at, *other) >= spacing);
        let candidates = std::iter::once(preferred).chain(others.iter().flat_map(|other| {
            [other.checked_sub(spacing), other.checked_add(spacing)]
                .into_iter()
                .flatten()
        }));
        let chosen = candidates
            .filter(|at| *at >= earliest && *at <= latest && free(*at))
            .min_by_key(|at| apart(*at, preferred))
            .unwrap_or(preferred);
        self.due.insert(key, chosen);
        chosen
    }

    /// Credential sets that drain: every serving channel pinned to one hands over.
    pub fn credentials_draining(
        &mut self,
        draining: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> Effects {
        let due: Vec<ChannelKey> = self
            .channels
            .iter()
            .filter(|(_, e)| {
                e.role == Role::Serving && e.credential.as_deref().is_some_and(draining)
            })
            .map(|(&k, _)| k)
            .collect();
        due.into_iter()
            .flat_map(|key| self.begin_handover(key, HandoverReason::Drain, now))
            .collect()
    }

    /// Channel `key` died unexpectedly at `since` (its socket, or its task). Its topics
    /// go to a successor (a new one, or the one being built), which tells the affected
    /// clients about the gap once it is live.
    pub fn lost(&mut self, key: ChannelKey, now: Instant, since: SystemTime) -> Effects {
        self.due.remove(&key);
        let Some(entry) = self.channels.get_mut(&key) else {
            return Vec::new();
        };
        entry.socket_open = false;
        match entry.role {
            Role::Serving => {
                let desired = std::mem::take(&mut entry.desired);
                entry.load = 0;
                entry.role = Role::Retiring;
                entry.retire_at_once = true;
                let successor = self.new_entry(Role::Successor { of: None }, desired.clone(), now);
                self.channels.get_mut(&successor).expect("new").gap_from = Some(since);
                self.move_placements(&desired, successor);
                vec![Effect::Spawn(successor)]
            }
            Role::HandingOver { successor } => {
                entry.role = Role::Retiring;
                entry.retire_at_once = true;
                if let Some(s) = self.channels.get_mut(&successor) {
                    s.gap_from = Some(s.gap_from.map_or(since, |g| g.min(since)));
                    s.role = Role::Successor { of: None };
                }
                Vec::new()
            }
            Role::Successor { of } => {
                // A successor that died before going live: build another in its place.
                let desired = std::mem::take(&mut entry.desired);
                let (gap_from, handover) = (entry.gap_from.take(), entry.handover.take());
                entry.load = 0;
                entry.role = Role::Retiring;
                entry.retire_at_once = true;
                let replacement = self.new_entry(Role::Successor { of }, desired.clone(), now);
                let fresh = self.channels.get_mut(&replacement).expect("new");
                fresh.gap_from = gap_from;
                fresh.handover = handover;
                self.move_placements(&desired, replacement);
                if let Some(p) = of.and_then(|p| self.channels.get_mut(&p)) {
                    p.role = Role::HandingOver {
                        successor: replacement,
                    };
                }
                vec![Effect::Spawn(replacement)]
            }
            Role::Retiring => Vec::new(),
        }
    }

    /// A successor (or a first channel) is live: it becomes the serving channel, its
    /// predecessor starts retiring, and clients hear of any gap.
    pub fn went_live(&mut self, key: ChannelKey, now: Instant) -> Effects {
        let Some(entry) = self.channels.get_mut(&key) else {
            return Vec::new();
        };
        let predecessor = match entry.role {
            Role::Successor { of } => of,
            Role::Serving => None,
            // Lost or retired while it was being built: nothing to switch.
            Role::HandingOver { .. } | Role::Retiring => return Vec::new(),
        };
        entry.role = Role::Serving;
        // Its idle clock starts when it starts serving.
        entry.empty_since = entry.desired.is_empty().then_some(now);
        let mut effects = Vec::new();
        if let Some(from) = entry.gap_from.take() {
            let topics: Vec<String> = entry.desired.iter().cloned().collect();
            effects.push(Effect::Rebuilt {
                channel: key,
                topics: topics.len(),
            });
            effects.push(Effect::Gap { topics, from });
        }
        let handover = entry.handover.take();
        if let Some(p) = predecessor
            && let Some(pred) = self.channels.get_mut(&p)
        {
            pred.role = Role::Retiring;
            effects.push(Effect::Wake(p));
            if let Some((began, reason)) = handover {
                effects.push(Effect::HandoverCompleted {
                    channel: key,
                    predecessor: p,
                    reason,
                    took: now.saturating_duration_since(began),
                });
            }
        }
        effects
    }

    /// Retires channel `key` if it has served no topic for the idle timeout. Returns
    /// whether it now retires (at once: without topics there is nothing to overlap).
    pub fn idle_check(&mut self, key: ChannelKey, now: Instant) -> bool {
        let timeout = self.limits.idle_timeout;
        let Some(entry) = self.channels.get_mut(&key) else {
            return false;
        };
        let idle = entry.role == Role::Serving
            && entry.desired.is_empty()
            && entry
                .empty_since
                .is_some_and(|since| now.saturating_duration_since(since) >= timeout);
        if idle {
            entry.role = Role::Retiring;
            entry.retire_at_once = true;
            self.due.remove(&key);
        }
        idle
    }

    /// New limits from a reload. Channels over a lowered budget are not cut: no new one
    /// is created until use falls below it.
    pub fn reload(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    // ---- inspection -------------------------------------------------------------------

    /// Channels with an open socket minted with `credential`.
    pub fn open_channels_of(&self, credential: &str) -> usize {
        self.channels
            .values()
            .filter(|e| e.socket_open && e.credential.as_deref() == Some(credential))
            .count()
    }

    pub fn channels(&self) -> Vec<ChannelView> {
        self.channels
            .iter()
            .map(|(&key, e)| ChannelView {
                key,
                role: e.role,
                credential: e.credential.as_deref().map(str::to_owned),
                topics: e.desired.len(),
                socket_open: e.socket_open,
                holds_slot: e.holds_slot,
            })
            .collect()
    }

    /// Checks every invariant (see the module documentation); the error names the first
    /// one broken.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        let Limits {
            max_channels,
            max_topics,
            idle_timeout,
        } = self.limits;
        if self.slots_used() > max_channels {
            return Err(format!(
                "{} slots held, budget {max_channels}",
                self.slots_used()
            ));
        }
        if self.logical_channels() > max_channels.saturating_sub(1) {
            return Err(format!(
                "{} logical channels leave no slot for a handover (budget {max_channels})",
                self.logical_channels()
            ));
        }
        for (topic, p) in &self.topics {
            let wanted = matches!(p.state, TopicState::Pending | TopicState::Live);
            match (wanted, p.channel) {
                (true, None) => return Err(format!("{topic} is wanted but placed nowhere")),
                (true, Some(key)) => {
                    let Some(entry) = self.channels.get(&key) else {
                        return Err(format!("{topic} is placed on missing channel {key}"));
                    };
                    if !entry.role.is_logical() || !entry.desired.contains(topic) {
                        return Err(format!(
                            "{topic} is placed on channel {key} ({:?}) which does not carry it",
                            entry.role
                        ));
                    }
                }
                (false, Some(key)) => {
                    return Err(format!("failed topic {topic} still placed on {key}"));
                }
                (false, None) => {}
            }
        }
        for (key, entry) in &self.channels {
            let load: usize = entry.desired.iter().map(|t| self.weight_of(t)).sum();
            if load != entry.load {
                return Err(format!("channel {key} load {} != {load}", entry.load));
            }
            if entry.role.is_logical() && entry.load > max_topics {
                return Err(format!("channel {key} carries {load} > {max_topics}"));
            }
            for topic in &entry.desired {
                let placed = self.topics.get(topic).and_then(|p| p.channel);
                if entry.role.is_logical() && placed != Some(*key) {
                    return Err(format!("channel {key} lists {topic} placed on {placed:?}"));
                }
            }
            if entry.role == Role::Serving && entry.desired.is_empty() {
                match entry.empty_since {
                    None => {
                        return Err(format!(
                            "serving channel {key} has no topic and no idle clock"
                        ));
                    }
                    Some(since) if now.saturating_duration_since(since) > idle_timeout => {
                        return Err(format!("serving channel {key} outlived its last topic"));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn limits(max_channels: usize, max_topics: usize) -> Limits {
        Limits {
            max_channels,
            max_topics,
            idle_timeout: MINUTE,
        }
    }

    fn names(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn spawned(effects: &Effects) -> Vec<ChannelKey> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Spawn(key) => Some(*key),
                _ => None,
            })
            .collect()
    }

    /// Takes channel `key` through slot, socket, sync and going live.
    fn bring_up(state: &mut PoolState, key: ChannelKey, now: Instant) -> Effects {
        assert_eq!(state.grant_slot(key), Grant::Granted);
        state.socket_opened(key, &Arc::from("a"));
        let topics: BTreeSet<String> = state.assignment(key).unwrap().topics.into_keys().collect();
        state.synced(key, &topics, &BTreeSet::new(), now);
        state.went_live(key, now)
    }

    #[tokio::test(start_paused = true)]
    async fn topics_fill_channels_by_weight_and_keep_a_slot_for_handovers() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(3, 4));
        let effects = state.want(&names(&["v2.a", "v2.b", "v2.c?x&y"]), now);
        assert_eq!(spawned(&effects), [1], "1 + 1 + 2 fit one channel of 4");
        let effects = state.want(&names(&["v2.d"]), now);
        assert_eq!(spawned(&effects), [2], "the first is full");
        let effects = state.want(&names(&["v2.e?1&2&3", "v2.f?1&2"]), now);
        assert!(
            spawned(&effects).is_empty(),
            "a third serving channel would take the spare"
        );
        assert_eq!(
            state.outcomes(&names(&["v2.e?1&2&3", "v2.f?1&2"])),
            [None, Some(TopicOutcome::NoCapacity)],
            "e fills the second channel; f fits nowhere"
        );
        state.check(now).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_moves_topics_to_a_successor_that_replaces_its_predecessor() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(2, 10));
        state.want(&names(&["v2.a"]), now);
        bring_up(&mut state, 1, now);
        assert_eq!(
            state.outcomes(&names(&["v2.a"])),
            [Some(TopicOutcome::Live)]
        );
        let effects = state.begin_handover(1, HandoverReason::Expiry, now);
        assert_eq!(spawned(&effects), [2]);
        assert_eq!(
            state.assignment(1).unwrap().role,
            Role::HandingOver { successor: 2 }
        );
        assert_eq!(
            state.assignment(2).unwrap().topics,
            BTreeMap::from([("v2.a".to_string(), None)]),
            "already delivered: never refused"
        );
        let later = now + Duration::from_millis(300);
        let effects = bring_up(&mut state, 2, later);
        assert!(effects.contains(&Effect::HandoverCompleted {
            channel: 2,
            predecessor: 1,
            reason: HandoverReason::Expiry,
            took: Duration::from_millis(300),
        }));
        assert_eq!(
            state.assignment(1).unwrap().retire,
            Some(false),
            "retires after the overlap"
        );
        assert_eq!(state.grant_slot(3), Grant::Gone);
        assert_eq!(state.gone(1), [Effect::SlotFreed]);
        state.check(later).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn handovers_are_spaced_so_that_they_rarely_share_the_spare_slot() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let mut state = PoolState::new(limits(4, 10));
        let spacing = s(2);
        let window = (now + s(50), now + s(64));
        assert_eq!(
            state.schedule_handover(1, window, now + s(60), spacing),
            now + s(60)
        );
        // Due at the same time: moved just far enough (earlier or later, the nearer).
        assert_eq!(
            state.schedule_handover(2, window, now + s(60), spacing),
            now + s(58)
        );
        assert_eq!(
            state.schedule_handover(3, window, now + s(61), spacing),
            now + s(62)
        );
        // No room in its window: it keeps its preferred time.
        let narrow = (now + s(59), now + s(61));
        assert_eq!(
            state.schedule_handover(4, narrow, now + s(59), spacing),
            now + s(59)
        );
        // Far from the others: as preferred.
        assert_eq!(
            state.schedule_handover(5, (now, now + s(30)), now + s(20), spacing),
            now + s(20)
        );
        // A channel that hands over (or is gone) frees its time.
        state.gone(1);
        state.gone(4);
        assert_eq!(
            state.schedule_handover(6, window, now + s(60), spacing),
            now + s(60)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_channel_is_rebuilt_and_its_clients_told_of_the_gap() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(2, 10));
        state.want(&names(&["v2.a"]), now);
        bring_up(&mut state, 1, now);
        let since = SystemTime::UNIX_EPOCH;
        let effects = state.lost(1, now, since);
        assert_eq!(spawned(&effects), [2]);
        state.gone(1);
        let effects = bring_up(&mut state, 2, now);
        assert!(effects.contains(&Effect::Gap {
            topics: names(&["v2.a"]),
            from: since
        }));
        state.check(now).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_batch_fails_its_topics_only() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(2, 10));
        state.want(&names(&["v2.old"]), now);
        bring_up(&mut state, 1, now);
        state.want(&names(&["v2.new"]), now);
        let refusal = Refusal {
            status: 400,
            code: "bad.request".into(),
        };
        state.refused(
            1,
            &BTreeSet::from(["v2.new".to_string(), "v2.old".to_string()]),
            refusal.clone(),
            now,
        );
        assert_eq!(
            state.outcomes(&names(&["v2.old", "v2.new"])),
            [
                Some(TopicOutcome::Live),
                Some(TopicOutcome::Refused(refusal))
            ],
            "a live topic is never refused"
        );
        state.check(now).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_serving_channel_retires_after_the_timeout() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(2, 10));
        state.want(&names(&["v2.a"]), now);
        bring_up(&mut state, 1, now);
        state.release(&names(&["v2.a"]), now);
        assert!(!state.idle_check(1, now + MINUTE / 2));
        assert!(state.idle_check(1, now + MINUTE));
        assert_eq!(state.assignment(1).unwrap().retire, Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lowered_budget_grants_nothing_until_use_falls_below_it() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(3, 1));
        state.want(&names(&["v2.a", "v2.b"]), now);
        bring_up(&mut state, 1, now);
        bring_up(&mut state, 2, now);
        state.reload(limits(2, 1));
        state.begin_handover(1, HandoverReason::Expiry, now);
        assert_eq!(state.grant_slot(3), Grant::Wait);
        let replacement = spawned(&state.lost(2, now, SystemTime::UNIX_EPOCH));
        state.gone(2);
        assert_eq!(state.grant_slot(3), Grant::Granted, "1 of 2 held");
        assert_eq!(state.grant_slot(replacement[0]), Grant::Wait, "2 of 2 held");
    }

    mod properties {
        use std::collections::BTreeMap as Map;

        use proptest::prelude::*;

        use super::*;

        /// Where a simulated channel task is in its life.
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Phase {
            Waiting,
            Slotted,
            Open,
            Live,
        }

        #[derive(Debug, Clone)]
        enum Step {
            Want(Vec<u8>),
            Release(Vec<u8>),
            /// Moves the picked channel task one step on.
            Advance(u8),
            Lose(u8),
            Refuse(u8),
            Handover(u8),
            Drain,
            Tick(u16),
            Raise(u8),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                3 => prop::collection::vec(0u8..24, 1..4).prop_map(Step::Want),
                2 => prop::collection::vec(0u8..24, 1..4).prop_map(Step::Release),
                8 => any::<u8>().prop_map(Step::Advance),
                1 => any::<u8>().prop_map(Step::Lose),
                1 => any::<u8>().prop_map(Step::Refuse),
                1 => any::<u8>().prop_map(Step::Handover),
                1 => Just(Step::Drain),
                2 => (0u16..40_000).prop_map(Step::Tick),
                1 => (0u8..3).prop_map(Step::Raise),
            ]
        }

        /// Topic `n`: every fourth is combined and weighs 2.
        fn topic(n: u8) -> String {
            if n.is_multiple_of(4) {
                format!("v2.t{n}?a&b")
            } else {
                format!("v2.t{n}")
            }
        }

        struct Sim {
            state: PoolState,
            tasks: Map<ChannelKey, Phase>,
            now: Instant,
        }

        impl Sim {
            fn absorb(&mut self, effects: Effects) {
                for key in spawned(&effects) {
                    self.tasks.insert(key, Phase::Waiting);
                }
            }

            fn pick(&self, n: u8) -> Option<ChannelKey> {
                let keys: Vec<_> = self.tasks.keys().copied().collect();
                (!keys.is_empty()).then(|| keys[n as usize % keys.len()])
            }

            /// One step of channel task `key`, as `channel.rs` would take it.
            fn advance(&mut self, key: ChannelKey) {
                let now = self.now;
                let Some(assignment) = self.state.assignment(key) else {
                    self.tasks.remove(&key);
                    return;
                };
                let phase = self.tasks[&key];
                if assignment.retire.is_some() && phase != Phase::Waiting {
                    let effects = self.state.gone(key);
                    self.absorb(effects);
                    self.tasks.remove(&key);
                    return;
                }
                match phase {
                    Phase::Waiting => match self.state.grant_slot(key) {
                        Grant::Granted => {
                            self.tasks.insert(key, Phase::Slotted);
                        }
                        Grant::Gone => {
                            let effects = self.state.gone(key);
                            self.absorb(effects);
                            self.tasks.remove(&key);
                        }
                        Grant::Wait => {}
                    },
                    Phase::Slotted => {
                        self.state.socket_opened(
                            key,
                            &Arc::from(if key.is_multiple_of(2) { "a" } else { "b" }),
                        );
                        self.tasks.insert(key, Phase::Open);
                    }
                    Phase::Open | Phase::Live => {
                        let topics = assignment.topics.into_keys().collect();
                        let effects = self.state.synced(key, &topics, &BTreeSet::new(), now);
                        self.absorb(effects);
                        if phase == Phase::Open {
                            let effects = self.state.went_live(key, now);
                            self.absorb(effects);
                            self.tasks.insert(key, Phase::Live);
                        }
                    }
                }
            }

            fn apply(&mut self, step: &Step) {
                let now = self.now;
                match step {
                    Step::Want(ns) => {
                        let topics: Vec<String> = ns.iter().map(|n| topic(*n)).collect();
                        let effects = self.state.want(&topics, now);
                        self.absorb(effects);
                    }
                    Step::Release(ns) => {
                        let topics: Vec<String> = ns.iter().map(|n| topic(*n)).collect();
                        let effects = self.state.release(&topics, now);
                        self.absorb(effects);
                    }
                    Step::Advance(n) => {
                        if let Some(key) = self.pick(*n) {
                            self.advance(key);
                        }
                    }
                    Step::Lose(n) => {
                        if let Some(key) = self.pick(*n)
                            && self.tasks[&key] != Phase::Waiting
                        {
                            let effects = self.state.lost(key, now, SystemTime::UNIX_EPOCH);
                            self.absorb(effects);
                        }
                    }
                    Step::Refuse(n) => {
                        if let Some(key) = self.pick(*n)
                            && let Some(assignment) = self.state.assignment(key)
                        {
                            let batch: BTreeSet<String> = assignment
                                .topics
                                .into_iter()
                                .filter(|(_, b)| b.is_some())
                                .map(|(t, _)| t)
                                .collect();
                            let refusal = Refusal {
                                status: 400,
                                code: "bad.request".into(),
                            };
                            let effects = self.state.refused(key, &batch, refusal, now);
                            self.absorb(effects);
                        }
                    }
                    Step::Handover(n) => {
                        if let Some(key) = self.pick(*n)
                            && self.tasks[&key] == Phase::Live
                        {
                            let effects =
                                self.state.begin_handover(key, HandoverReason::Expiry, now);
                            self.absorb(effects);
                        }
                    }
                    Step::Drain => {
                        let effects = self.state.credentials_draining(&|c| c == "a", now);
                        self.absorb(effects);
                    }
                    Step::Tick(ms) => {
                        self.now += Duration::from_millis(u64::from(*ms));
                        // Every live channel task looks at its idle clock a few times
                        // per heartbeat; here, at every tick.
                        let keys: Vec<_> = self.tasks.keys().copied().collect();
                        for key in keys {
                            self.state.idle_check(key, self.now);
                        }
                    }
                    Step::Raise(by) => {
                        let limits = self.state.limits();
                        self.state.reload(Limits {
                            max_channels: limits.max_channels + usize::from(*by),
                            ..limits
                        });
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Random interleavings of demand, channel progress, losses, refusals,
            /// handovers, drains, time and reloads keep every invariant after every
            /// step, and once the faults stop, every wanted topic is settled.
            #[test]
            fn every_invariant_holds_after_every_step(
                max_channels in 2usize..5,
                max_topics in 2usize..6,
                steps in prop::collection::vec(step(), 1..120),
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
                runtime.block_on(async {
                    let mut sim = Sim { state: PoolState::new(limits(max_channels, max_topics)), tasks: Map::new(), now: Instant::now() };
                    for (i, step) in steps.iter().enumerate() {
                        sim.apply(step);
                        if let Err(broken) = sim.state.check(sim.now) {
                            panic!("after step {i} ({step:?}): {broken}\n{:#?}", sim.state);
                        }
                    }
                    // No more faults: channel tasks run until nothing changes.
                    for _ in 0..200 {
                        let keys: Vec<_> = sim.tasks.keys().copied().collect();
                        for key in keys {
                            sim.advance(key);
                        }
                        sim.state.check(sim.now).unwrap();
                    }
                    let wanted: Vec<String> = sim.state.topics.keys().cloned().collect();
                    let pending: Vec<&String> = wanted.iter().zip(sim.state.outcomes(&wanted)).filter(|(_, o)| o.is_none()).map(|(t, _)| t).collect();
                    assert!(pending.is_empty(), "still pending: {pending:?}\n{:#?}", sim.state);
                });
            }
        }
    }
}
