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
//! - other users of the OAuth client are counted against it: no slot is granted before
//!   their channels have been counted once, nor while the channels the proxy holds and
//!   theirs fill the client's 20 ([`PoolState::counted`]);
//!   a channel not yet created that no longer fits is given up, its topics refused;
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

/// The answer for each of `topics` from its `outcomes`: those not settled by the
/// deadline were not live upstream in time.
pub fn answers(
    topics: &[String],
    outcomes: Vec<Option<TopicOutcome>>,
) -> Vec<(String, TopicOutcome)> {
    topics
        .iter()
        .cloned()
        .zip(outcomes)
        .map(|(t, o)| {
            (
                t,
                o.unwrap_or(TopicOutcome::Failed("not live upstream in time")),
            )
        })
        .collect()
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
    /// Since when its socket has been open, without a break (`None` while closed): the
    /// channel surely exists at Genesys from then on until it retires or is lost.
    open_since: Option<Instant>,
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
    /// Channels Genesys keeps per OAuth client (20): the proxy's and everyone else's
    /// together; one more evicts the oldest.
    pub client_channels: usize,
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
    /// A channel the budget alone allows was not created (not yet, or not at all):
    /// the OAuth client's channels held by others (`foreign`) leave no room for it,
    /// and creating it would make Genesys evict one of theirs.
    HeldBack { foreign: usize },
    /// The count of the OAuth client's channels held by others changed (`from` is
    /// `None` at the first count): counts sure of the proxy's own channels, compared
    /// with the last one announced. The proxy may now hold `slots`.
    ForeignChanged {
        from: Option<usize>,
        to: usize,
        slots: usize,
    },
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
    /// Every slot is held (or others' channels are not counted yet): wait for one to
    /// be freed.
    Wait,
    /// The budget has a free slot, but the OAuth client's channels held by others
    /// (`foreign`) leave none: wait, rather than make Genesys evict one of theirs.
    HeldBack {
        foreign: usize,
    },
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

/// What the budget allows now (for clients' errors and the metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Budget slots the proxy may hold now: `max_channels`, or fewer when other users
    /// of the OAuth client hold channels.
    pub slots: usize,
    /// Topic weight per channel.
    pub max_topics: usize,
    /// Channels of the OAuth client held by others, as last counted (`None` before
    /// the first count).
    pub foreign: Option<usize>,
    /// Channels Genesys keeps per OAuth client.
    pub client_channels: usize,
}

/// What one listing of the OAuth client's channels says about others' channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignCount {
    /// Listed, less the proxy's channels that surely existed throughout the listing:
    /// never fewer than the channels others held when Genesys answered.
    pub foreign: usize,
    /// The proxy's channels that may have existed during the listing without surely
    /// existing throughout it (being created, retiring, lost): `foreign` may count them
    /// too, so another listing soon would be closer.
    pub unsure: usize,
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
    /// Channels of the OAuth client the proxy did not create, as last counted; `None`
    /// until the first count, before which no slot is granted.
    foreign: Option<usize>,
    /// The count last announced ([`Effect::ForeignChanged`]).
    announced: Option<usize>,
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
            foreign: None,
            announced: None,
        }
    }

    pub fn set_break_before_make(&mut self, on: bool) {
        self.break_before_make = on;
    }

    fn slots_used(&self) -> usize {
        self.channels.values().filter(|e| e.holds_slot).count()
    }

    /// The slots the proxy may hold: `max_channels`, and no more than the OAuth client's
    /// channels that others leave (as last counted; none before the first count, for
    /// placement, while no slot is granted).
    fn slots_allowed(&self) -> usize {
        let Limits {
            max_channels,
            client_channels,
            ..
        } = self.limits;
        max_channels.min(client_channels.saturating_sub(self.foreign.unwrap_or(0)))
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
                open_since: None,
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
        // One slot always stays free for handovers.
        let serving_allowed = self.slots_allowed().saturating_sub(1);
        self.next_batch += 1;
        let batch = self.next_batch;
        let mut effects = Vec::new();
        let mut held_back = false;
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
            let fits_budget =
                weight <= max_topics && self.logical_channels() < max_channels.saturating_sub(1);
            let key = match accepting {
                Some(key) => Some(key),
                None if fits_budget && self.logical_channels() < serving_allowed => {
                    let key = self.new_entry(Role::Serving, BTreeSet::new(), now);
                    effects.push(Effect::Spawn(key));
                    Some(key)
                }
                None => {
                    held_back |= fits_budget;
                    None
                }
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
        if held_back && let Some(foreign) = self.foreign {
            effects.push(Effect::HeldBack { foreign });
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
        // Until others' channels are counted, and while they and ours fill the budget
        // or the OAuth client's 20, nothing is created.
        let refusal = match self.foreign {
            None => Some(Grant::Wait),
            Some(_) if used < self.slots_allowed() => None,
            Some(foreign) if used < self.limits.max_channels => Some(Grant::HeldBack { foreign }),
            Some(_) => Some(Grant::Wait),
        };
        let Some(entry) = self.channels.get_mut(&key) else {
            return Grant::Gone;
        };
        if entry.holds_slot {
            return Grant::Granted;
        }
        // Retired before it ever held a slot (idle, replaced, or given up): it has
        // nothing to do.
        if entry.role == Role::Retiring {
            return Grant::Gone;
        }
        match refusal {
            Some(wait) => wait,
            None => {
                entry.holds_slot = true;
                Grant::Granted
            }
        }
    }

    // ---- other users of the OAuth client -------------------------------------------

    /// What a listing of the OAuth client's channels (`listed` of them) means, for a
    /// listing sent at `sent` and answered now. Genesys counted at some moment in
    /// between, which the proxy cannot know; so only its channels that surely existed
    /// throughout are taken off: socket open since before `sent` and still open, not
    /// retiring, minted by a credential of the listing's OAuth client (`same_client`).
    /// A channel of the proxy being created or retired meanwhile may be counted as
    /// foreign (an over-count, which the next listing corrects), never the other way.
    pub fn foreign_in(
        &self,
        listed: usize,
        sent: Instant,
        same_client: &dyn Fn(&str) -> bool,
    ) -> ForeignCount {
        let ours = |e: &&Entry| e.credential.as_deref().is_none_or(same_client);
        let sure = |e: &&Entry| {
            e.role != Role::Retiring
                && e.open_since.is_some_and(|since| since < sent)
                && e.credential.as_deref().is_some_and(same_client)
        };
        let sure_count = self.channels.values().filter(sure).count();
        let unsure = self
            .channels
            .values()
            .filter(|e| e.holds_slot && !sure(e) && ours(e))
            .count();
        ForeignCount {
            foreign: listed.saturating_sub(sure_count),
            unsure,
        }
    }

    /// A listing of the OAuth client's channels, sent at `sent`, answered `listed`:
    /// what it says ([`PoolState::foreign_in`]), applied at once.
    pub fn counted(
        &mut self,
        listed: usize,
        sent: Instant,
        same_client: &dyn Fn(&str) -> bool,
        now: Instant,
    ) -> (ForeignCount, Effects) {
        let count = self.foreign_in(listed, sent, same_client);
        (count, self.apply_count(count, now))
    }

    /// Others hold `foreign` channels of the OAuth client (a count sure of the proxy's
    /// own channels).
    pub fn set_foreign(&mut self, foreign: usize, now: Instant) -> Effects {
        self.apply_count(ForeignCount { foreign, unsure: 0 }, now)
    }

    /// Channels the proxy holds are never cut; a channel not yet created that no
    /// longer fits is given up (its topics refused), and a successor waits for a slot
    /// rather than exceed. A change is announced only from a count sure of the
    /// proxy's own channels, against the last one announced: an unsure count may be
    /// one or two too high, and the next sure one corrects it.
    fn apply_count(&mut self, count: ForeignCount, now: Instant) -> Effects {
        let from = self.foreign.replace(count.foreign);
        let mut effects = Vec::new();
        if count.unsure == 0 && self.announced != Some(count.foreign) {
            effects.push(Effect::ForeignChanged {
                from: self.announced.replace(count.foreign),
                to: count.foreign,
                slots: self.slots_allowed(),
            });
        }
        effects.extend(self.shed_unbuilt(now));
        // Fewer (or counted for the first time): a waiting channel may take a slot.
        if from.is_none_or(|from| count.foreign < from) {
            effects.push(Effect::SlotFreed);
        }
        effects
    }

    /// Channels the OAuth client's listing could not count: counted as none if they
    /// never were (as before this count existed), the last count kept otherwise.
    /// Nothing was counted, so nothing is announced.
    pub fn foreign_uncounted(&mut self, now: Instant) -> Effects {
        if self.foreign.is_some() {
            return Vec::new();
        }
        self.foreign = Some(0);
        let mut effects = self.shed_unbuilt(now);
        effects.push(Effect::SlotFreed);
        effects
    }

    /// Gives up serving channels never granted a slot (newest first) while there are
    /// more channels than the budget now allows serving: their topics are refused
    /// rather than kept waiting for a slot that may not come.
    fn shed_unbuilt(&mut self, now: Instant) -> Effects {
        let logical = self.logical_channels();
        let excess = logical.saturating_sub(self.slots_allowed().saturating_sub(1));
        // Those the budget alone would keep are given up for others' channels.
        let over_budget = logical.saturating_sub(self.limits.max_channels.saturating_sub(1));
        let mut for_others = excess.saturating_sub(over_budget);
        let doomed: Vec<ChannelKey> = self
            .channels
            .iter()
            .rev()
            .filter(|(_, e)| e.role == Role::Serving && !e.holds_slot)
            .map(|(&key, _)| key)
            .take(excess)
            .collect();
        if doomed.is_empty() {
            return Vec::new();
        }
        let mut effects = Vec::new();
        for key in doomed {
            let topics = self.channels[&key].desired.clone();
            self.fail_topics(key, &topics, TopicState::NoCapacity, now);
            if let Some(entry) = self.channels.get_mut(&key) {
                entry.role = Role::Retiring;
                entry.retire_at_once = true;
            }
            self.due.remove(&key);
            effects.push(Effect::Wake(key));
            if let Some(foreign) = self.foreign
                && for_others > 0
            {
                for_others -= 1;
                effects.push(Effect::HeldBack { foreign });
            }
        }
        // Its task waits for a slot: wake it, so that it finds itself retired.
        effects.extend([Effect::SlotFreed, Effect::TopicsChanged]);
        effects
    }

    /// What the budget allows now.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            slots: self.slots_allowed(),
            max_topics: self.limits.max_topics,
            foreign: self.foreign,
            client_channels: self.limits.client_channels,
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

    /// The socket of `key` opened at `now` with a token of `credential`.
    pub fn socket_opened(&mut self, key: ChannelKey, credential: &Arc<str>, now: Instant) {
        if let Some(entry) = self.channels.get_mut(&key) {
            entry.open_since = Some(now);
            entry.credential = Some(credential.clone());
        }
    }

    pub fn socket_closed(&mut self, key: ChannelKey) {
        if let Some(entry) = self.channels.get_mut(&key) {
            entry.open_since = None;
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
        entry.open_since = None;
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
    /// is created until use falls below it, and one not yet created that no longer
    /// fits is given up.
    pub fn reload(&mut self, limits: Limits, now: Instant) -> Effects {
        self.limits = limits;
        let mut effects = self.shed_unbuilt(now);
        // A raised budget may let a waiting successor go on.
        effects.push(Effect::SlotFreed);
        effects
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    // ---- inspection -------------------------------------------------------------------

    /// Channels with an open socket minted with `credential`.
    pub fn open_channels_of(&self, credential: &str) -> usize {
        self.channels
            .values()
            .filter(|e| e.open_since.is_some() && e.credential.as_deref() == Some(credential))
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
                socket_open: e.open_since.is_some(),
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
            ..
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
        if self.foreign.is_none() && self.slots_used() > 0 {
            return Err("a slot was granted before others' channels were counted".into());
        }
        let serving_allowed = self.slots_allowed().saturating_sub(1);
        if self.logical_channels() > serving_allowed
            && let Some((key, _)) = self
                .channels
                .iter()
                .find(|(_, e)| e.role == Role::Serving && !e.holds_slot)
        {
            return Err(format!(
                "channel {key} waits for a slot the budget no longer allows ({} logical, {serving_allowed} may serve)",
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
            client_channels: 20,
            max_topics,
            idle_timeout: MINUTE,
        }
    }

    /// A state whose first count found no channel of others.
    fn counted(limits: Limits) -> PoolState {
        let mut state = PoolState::new(limits);
        state.set_foreign(0, Instant::now());
        state
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
        state.socket_opened(key, &Arc::from("a"), now);
        let topics: BTreeSet<String> = state.assignment(key).unwrap().topics.into_keys().collect();
        state.synced(key, &topics, &BTreeSet::new(), now);
        state.went_live(key, now)
    }

    #[tokio::test(start_paused = true)]
    async fn topics_fill_channels_by_weight_and_keep_a_slot_for_handovers() {
        let now = Instant::now();
        let mut state = counted(limits(3, 4));
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
        let mut state = counted(limits(2, 10));
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
        let mut state = counted(limits(4, 10));
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
        let mut state = counted(limits(2, 10));
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
        let mut state = counted(limits(2, 10));
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
        let mut state = counted(limits(2, 10));
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
        let mut state = counted(limits(3, 1));
        state.want(&names(&["v2.a", "v2.b"]), now);
        bring_up(&mut state, 1, now);
        bring_up(&mut state, 2, now);
        state.reload(limits(2, 1), now);
        state.begin_handover(1, HandoverReason::Expiry, now);
        assert_eq!(state.grant_slot(3), Grant::Wait);
        let replacement = spawned(&state.lost(2, now, SystemTime::UNIX_EPOCH));
        state.gone(2);
        assert_eq!(state.grant_slot(3), Grant::Granted, "1 of 2 held");
        assert_eq!(state.grant_slot(replacement[0]), Grant::Wait, "2 of 2 held");
    }

    fn held_back(effects: &Effects) -> Vec<usize> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::HeldBack { foreign } => Some(*foreign),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_created_before_others_channels_are_counted() {
        let now = Instant::now();
        let mut state = PoolState::new(limits(4, 10));
        let effects = state.want(&names(&["v2.a"]), now);
        assert_eq!(spawned(&effects), [1], "placed at once");
        assert_eq!(
            state.grant_slot(1),
            Grant::Wait,
            "not created before the count"
        );
        assert_eq!(state.capacity().foreign, None);
        state.check(now).unwrap();
        let effects = state.set_foreign(0, now);
        assert!(effects.contains(&Effect::ForeignChanged {
            from: None,
            to: 0,
            slots: 4
        }));
        assert!(
            effects.contains(&Effect::SlotFreed),
            "the waiting task retries"
        );
        assert_eq!(state.grant_slot(1), Grant::Granted);
        // A listing that failed before any count: counted as none, as before counts.
        let mut uncounted = PoolState::new(limits(4, 10));
        let effects = uncounted.foreign_uncounted(now);
        assert_eq!(effects, [Effect::SlotFreed], "no count to announce");
        assert_eq!(uncounted.capacity().foreign, Some(0));
        assert_eq!(uncounted.capacity().slots, 4);
        // Once counted, a failed listing keeps the count.
        uncounted.set_foreign(18, now);
        assert!(uncounted.foreign_uncounted(now).is_empty());
        assert_eq!(uncounted.capacity().foreign, Some(18));
        assert_eq!(uncounted.capacity().slots, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn others_channels_leave_the_proxy_what_remains_of_the_clients_twenty() {
        let now = Instant::now();
        // Room to spare: others' channels do not shrink the proxy's own budget.
        let mut state = counted(limits(4, 1));
        state.set_foreign(10, now);
        assert_eq!(state.capacity().slots, 4);
        // 17 held by others: 3 remain, one of them kept free for handovers.
        let effects = state.set_foreign(17, now);
        assert!(effects.contains(&Effect::ForeignChanged {
            from: Some(10),
            to: 17,
            slots: 3
        }));
        let effects = state.want(&names(&["v2.a", "v2.b", "v2.c", "v2.d"]), now);
        assert_eq!(spawned(&effects), [1, 2]);
        assert_eq!(
            held_back(&effects),
            [17],
            "the budget of 4 had room for a third"
        );
        assert_eq!(
            state.outcomes(&names(&["v2.c", "v2.d"])),
            [
                Some(TopicOutcome::NoCapacity),
                Some(TopicOutcome::NoCapacity)
            ]
        );
        bring_up(&mut state, 1, now);
        bring_up(&mut state, 2, now);
        // A handover takes the third slot: 17 + 3 = 20.
        let first = spawned(&state.begin_handover(1, HandoverReason::Expiry, now));
        assert_eq!(state.grant_slot(first[0]), Grant::Granted);
        // Another at the same time waits rather than make Genesys evict someone.
        let second = spawned(&state.begin_handover(2, HandoverReason::Expiry, now));
        assert_eq!(state.grant_slot(second[0]), Grant::HeldBack { foreign: 17 });
        bring_up_granted(&mut state, first[0], now);
        state.gone(1);
        assert_eq!(state.grant_slot(second[0]), Grant::Granted);
        state.check(now).unwrap();
        // The same 17 with a budget of 20: the same 3 slots.
        let mut wide = counted(limits(20, 1));
        wide.set_foreign(17, now);
        assert_eq!(wide.capacity().slots, 3);
        wide.set_foreign(25, now);
        assert_eq!(
            wide.capacity().slots,
            0,
            "more than 20 listed: nothing left"
        );
        // Held by the budget itself, not by others: a plain wait.
        let mut full = counted(limits(2, 1));
        full.want(&names(&["v2.a"]), now);
        bring_up(&mut full, 1, now);
        let effects = full.want(&names(&["v2.b"]), now);
        assert!(held_back(&effects).is_empty());
        let successor = spawned(&full.begin_handover(1, HandoverReason::Expiry, now));
        full.set_foreign(2, now);
        assert_eq!(full.grant_slot(successor[0]), Grant::Granted);
        let lost = spawned(&full.lost(successor[0], now, SystemTime::UNIX_EPOCH));
        assert_eq!(full.grant_slot(lost[0]), Grant::Wait, "2 of 2 held");
    }

    #[tokio::test(start_paused = true)]
    async fn channels_appearing_elsewhere_cut_nothing_but_what_was_not_created_yet() {
        let now = Instant::now();
        let mut state = counted(limits(4, 1));
        state.want(&names(&["v2.a", "v2.b", "v2.c"]), now);
        bring_up(&mut state, 1, now);
        bring_up(&mut state, 2, now);
        // Channel 3 waits for its slot when 17 channels appear elsewhere.
        let effects = state.set_foreign(17, now);
        assert_eq!(held_back(&effects), [17]);
        assert!(effects.contains(&Effect::SlotFreed), "its task wakes");
        assert_eq!(
            state.grant_slot(3),
            Grant::Gone,
            "given up before it was created"
        );
        assert_eq!(
            state.outcomes(&names(&["v2.a", "v2.b", "v2.c"])),
            [
                Some(TopicOutcome::Live),
                Some(TopicOutcome::Live),
                Some(TopicOutcome::NoCapacity)
            ],
            "the channels already serving are kept"
        );
        state.gone(3);
        state.check(now).unwrap();
        // 19 elsewhere: ours are still not cut, and nothing new fits.
        state.set_foreign(19, now);
        assert!(state.assignment(1).unwrap().retire.is_none());
        assert!(state.assignment(2).unwrap().retire.is_none());
        let effects = state.want(&names(&["v2.d"]), now);
        assert!(spawned(&effects).is_empty());
        state.check(now).unwrap();
        // A lowered budget sheds what was not created, and blames nobody else.
        let mut state = counted(limits(4, 1));
        state.want(&names(&["v2.a", "v2.b"]), now);
        bring_up(&mut state, 1, now);
        let effects = state.reload(limits(2, 1), now);
        assert!(effects.contains(&Effect::Wake(2)));
        assert!(held_back(&effects).is_empty());
        assert_eq!(
            state.outcomes(&names(&["v2.b"])),
            [Some(TopicOutcome::NoCapacity)]
        );
        state.check(now).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_takes_off_only_channels_that_surely_existed_throughout() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let mut state = counted(limits(8, 1));
        state.want(&names(&["v2.a", "v2.b", "v2.c", "v2.d", "v2.e"]), start);
        // 1: open well before the listing; 2: open at the very moment it was sent;
        // 3: replaced, so retiring; 4: another OAuth client's; 5: slot, no socket yet.
        for key in 1..=4 {
            bring_up(&mut state, key, start);
        }
        state.socket_closed(4);
        state.socket_opened(4, &Arc::from("b"), start);
        let successor = spawned(&state.begin_handover(3, HandoverReason::Expiry, start));
        bring_up_granted(&mut state, successor[0], start + second);
        assert_eq!(state.grant_slot(5), Grant::Granted);
        state.socket_closed(2);
        let sent = start + second * 2;
        state.socket_opened(2, &Arc::from("a"), sent);
        let count = state.foreign_in(10, sent, &|credential| credential == "a");
        // Surely there throughout: 1 and the successor (open before `sent`).
        assert_eq!(
            count,
            ForeignCount {
                foreign: 8,
                unsure: 3
            },
            "2, 3 and 5 may or may not have been listed; 4 is not the listing's"
        );
        assert_eq!(state.foreign_in(1, sent, &|c| c == "a").foreign, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn only_counts_sure_of_the_proxys_own_channels_announce_a_change() {
        let now = Instant::now();
        let mut state = counted(limits(4, 1));
        let changed = |effects: &Effects| {
            effects.iter().find_map(|e| match e {
                Effect::ForeignChanged { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
        };
        state.want(&names(&["v2.a"]), now);
        // A listing while channel 1 holds its slot but has no socket yet: it may be
        // the one channel listed.
        assert_eq!(state.grant_slot(1), Grant::Granted);
        let (count, effects) = state.counted(1, now, &|c| c == "a", now);
        assert_eq!(
            count,
            ForeignCount {
                foreign: 1,
                unsure: 1
            }
        );
        assert_eq!(changed(&effects), None, "not announced");
        assert_eq!(state.capacity().foreign, Some(1), "but counted");
        assert_eq!(state.capacity().slots, 4);
        // Once it is surely open, the same listing counts none: nothing changed.
        bring_up_granted(&mut state, 1, now);
        let later = now + Duration::from_secs(1);
        let (count, effects) = state.counted(1, later, &|c| c == "a", later);
        assert_eq!(
            count,
            ForeignCount {
                foreign: 0,
                unsure: 0
            }
        );
        assert_eq!(changed(&effects), None);
        assert!(
            effects.contains(&Effect::SlotFreed),
            "one fewer: a slot may be free"
        );
        // Others open 3: announced from the last announced count.
        let (_, effects) = state.counted(4, later, &|c| c == "a", later);
        assert_eq!(changed(&effects), Some((Some(0), 3)));
    }

    /// Takes channel `key`, already granted its slot, through socket, sync and going live.
    fn bring_up_granted(state: &mut PoolState, key: ChannelKey, now: Instant) -> Effects {
        state.socket_opened(key, &Arc::from("a"), now);
        let topics: BTreeSet<String> = state.assignment(key).unwrap().topics.into_keys().collect();
        state.synced(key, &topics, &BTreeSet::new(), now);
        state.went_live(key, now)
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
            /// Others hold this many of the OAuth client's channels (more than 20
            /// included).
            Foreign(u8),
            /// A listing of the OAuth client's channels answered: the proxy's own
            /// slot holders on credential "a", some of them perhaps missed or counted
            /// twice, plus `others`, sent `ago` milliseconds before now.
            Listing {
                others: u8,
                ago: u16,
            },
            /// A listing failed.
            Uncounted,
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
                1 => (0u8..23).prop_map(Step::Foreign),
                1 => (0u8..21, 0u16..2000).prop_map(|(others, ago)| Step::Listing { others, ago }),
                1 => Just(Step::Uncounted),
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
                            // A new slot never makes the proxy's and others' channels
                            // more than the OAuth client's 20.
                            let (used, foreign) = (self.state.slots_used(), self.state.foreign);
                            assert!(
                                foreign
                                    .is_some_and(|f| used + f <= self.state.limits.client_channels),
                                "slot {used} granted beside {foreign:?} others' channels"
                            );
                            self.tasks.insert(key, Phase::Slotted);
                        }
                        Grant::Gone => {
                            let effects = self.state.gone(key);
                            self.absorb(effects);
                            self.tasks.remove(&key);
                        }
                        Grant::Wait | Grant::HeldBack { .. } => {}
                    },
                    Phase::Slotted => {
                        self.state.socket_opened(
                            key,
                            &Arc::from(if key.is_multiple_of(2) { "a" } else { "b" }),
                            now,
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
                        let effects = self.state.reload(
                            Limits {
                                max_channels: limits.max_channels + usize::from(*by),
                                ..limits
                            },
                            now,
                        );
                        self.absorb(effects);
                    }
                    Step::Foreign(n) => {
                        let effects = self.state.set_foreign(usize::from(*n), now);
                        self.absorb(effects);
                    }
                    Step::Listing { others, ago } => {
                        let sent = now
                            .checked_sub(Duration::from_millis(u64::from(*ago)))
                            .unwrap_or(now);
                        let ours = self
                            .state
                            .channels
                            .values()
                            .filter(|e| e.holds_slot && e.credential.as_deref() != Some("b"))
                            .count();
                        let listed = ours + usize::from(*others);
                        let (count, effects) = self.state.counted(listed, sent, &|c| c == "a", now);
                        assert!(
                            count.foreign >= usize::from(*others),
                            "{count:?}: fewer than the {others} others' channels listed"
                        );
                        self.absorb(effects);
                    }
                    Step::Uncounted => {
                        let effects = self.state.foreign_uncounted(now);
                        self.absorb(effects);
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            /// Random interleavings of demand, channel progress, losses, refusals,
            /// handovers, drains, time, reloads and counts of others' channels (before
            /// the first count or not, listings that fail) keep every invariant after
            /// every step, no slot is granted that would make the OAuth client's
            /// channels more than 20, and once the faults stop and others' channels
            /// are gone, every wanted topic is settled.
            #[test]
            fn every_invariant_holds_after_every_step(
                max_channels in 2usize..5,
                max_topics in 2usize..6,
                counted_at_start in any::<bool>(),
                steps in prop::collection::vec(step(), 1..120),
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
                runtime.block_on(async {
                    let mut sim = Sim { state: PoolState::new(limits(max_channels, max_topics)), tasks: Map::new(), now: Instant::now() };
                    if counted_at_start {
                        let effects = sim.state.set_foreign(0, sim.now);
                        sim.absorb(effects);
                    }
                    for (i, step) in steps.iter().enumerate() {
                        sim.apply(step);
                        if let Err(broken) = sim.state.check(sim.now) {
                            panic!("after step {i} ({step:?}): {broken}\n{:#?}", sim.state);
                        }
                    }
                    // No more faults, and others' channels gone: channel tasks run until
                    // nothing changes.
                    let effects = sim.state.set_foreign(0, sim.now);
                    sim.absorb(effects);
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
