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

use crate::topic;

pub type ChannelKey = u64;
/// Topics placed by one call to [`PoolState::want`] (one subscription change's new
/// topics): when Genesys refuses a change wholesale, a batch is what gets refused.
pub type Batch = u64;

/// What Genesys answered when it refused a subscription change as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// Genesys' error code (plain `[a-z0-9._-]`, never free text).
    pub code: String,
}

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
        if entry.desired.is_empty() {
            entry.empty_since.get_or_insert(now);
        }
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
