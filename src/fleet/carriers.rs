//! Each topic carried upstream by one replica of the fleet at a time.
//!
//! Desktops on several replicas may want one topic; without this, each replica would
//! subscribe it on a channel of its own, and a topic on N replicas would take a place
//! on N channels of the OAuth client's 20. Instead, one replica holds the topic's
//! **carrier lease** (`k:<topic>`, a hash: `by`, `live`, `leaving`, `unsure_since`, `at`)
//! and subscribes it upstream; every replica that wants it is in `w:<topic>` (a set),
//! and all of them deliver it from the fleet's stream ([`super::bus`]), where the
//! carrier appends its events.
//!
//! - **Taking.** A replica whose desktops want a topic takes the lease if it is free,
//!   if its carrier is leaving (a drain), or if its carrier is gone (no beat for
//!   [`super::presence::DEAD_AFTER`]). It subscribes upstream and says `live` once
//!   Genesys confirmed it. A replica that wants a topic someone else carries answers
//!   its desktops as soon as that carrier is live.
//! - **Make before break.** A replica that finds another live carrier while it still
//!   carries the topic itself (two took it while Redis was failing, or it took over)
//!   lets go of its copy only then; the stream writes an event carried twice once.
//! - **Letting go.** A carrier keeps the topic while any live replica wants it. A
//!   draining replica marks its leases `leaving` and carries on until each has a live
//!   new carrier, within its grace.
//! - **Gaps.** A lease taken from a carrier that is gone records since when events
//!   may not have been carried (the old carrier's last beat, or when a drain gave up);
//!   the new carrier, once live, appends a gap notice for that span to the stream, so
//!   that every replica's desktops on the topic hear of it, and a desktop replayed
//!   later does too.
//! - **Redis failing.** Each replica carries every topic its own desktops want, as
//!   without `[cluster]` (at once: a failure wakes the sync); desktops on a topic
//!   another replica carried hear of a gap from when Redis last answered until it is
//!   live here. When Redis answers again, the copies are folded back into one carrier
//!   each, make before break; for [`SETTLING`] after Redis lost its keys nobody is
//!   dropped for lack of a want or a beat, while every replica says them again.
//!
//! Cost: one script per replica every [`TICK`] (and after subscription changes, at
//! most every [`SPACING`]) with a few commands per topic the replica wants or carries.
//!
//! The decisions are plain state ([`Topic::heard`], [`Topic::outcome`]), apart from
//! Redis and the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use redis::Script;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::presence::{DEAD_AFTER, KEPT};
use super::store::Store;
use crate::metrics::{Readings, Registry};
use crate::upstream::pool::Pool;
use crate::upstream::state::{Capacity, TopicOutcome};
use crate::upstream::{Delivery, Demand};

/// How often a replica tells Redis what it wants and carries, and learns who carries
/// the rest.
pub const TICK: Duration = Duration::from_millis(500);
/// How often while draining (the new carriers are waited for).
const DRAINING_TICK: Duration = Duration::from_millis(100);
/// After Redis lost its keys, how long every replica has to say again what it wants
/// and carries (a few syncs) before anyone is dropped for lack of a want or a beat.
const SETTLING: Duration = Duration::from_secs(3);
/// The least time between two syncs (a burst of subscription changes makes one).
const SPACING: Duration = Duration::from_millis(50);

/// Tells Redis what this replica wants and carries, takes what it should carry, and
/// answers who carries the rest. ARGV: key prefix, this replica, now (ms), draining
/// ('1'), how long without a beat makes a replica gone (ms), how long beats, leases
/// and wants are kept (ms), how long after Redis lost its keys nobody is dropped (ms,
/// by Redis' clock, from the `ledger` key the leases keep), then (topic, flags) pairs; flags: 1 wanted here, 2 carried here, 4 live here,
/// 8 failed here. Answers per topic: `{'mine', unsure_since or ''}` (`unsure_since`
/// only when live here: a gap to announce), `{'took', ''}` (from a carrier that left
/// or is gone), `{'other', live}` or `{'free', ''}`.
const SYNC: &str = r"
local prefix, me, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local draining, dead_after, kept = ARGV[4] == '1', tonumber(ARGV[5]), ARGV[6]
-- Redis lost its keys lately (it restarted empty): until every replica has said
-- again what it wants and carries, nobody is dropped for lack of a want or a beat.
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', prefix .. 'ledger', clock, 'NX')
local settling = clock - tonumber(redis.call('GET', prefix .. 'ledger')) < tonumber(ARGV[7])
local beats = {}
-- When `replica` beat last (ms, -1 if no beat is kept), and whether it is alive.
local function beat(replica)
  if beats[replica] == nil then
    beats[replica] = tonumber(redis.call('GET', prefix .. 'r:' .. replica) or '') or -1
  end
  local at = beats[replica]
  return at, at >= 0 and now - at <= dead_after
end
local answers = {}
for i = 8, #ARGV, 2 do
  local topic, flags = ARGV[i], tonumber(ARGV[i + 1])
  local wanted = flags % 2 == 1 and not draining
  local carried = math.floor(flags / 2) % 2 == 1
  local live = math.floor(flags / 4) % 2 == 1
  local failed = math.floor(flags / 8) % 2 == 1
  local lease, wants = prefix .. 'k:' .. topic, prefix .. 'w:' .. topic
  if wanted then
    redis.call('SADD', wants, me)
    redis.call('PEXPIRE', wants, kept)
  else
    redis.call('SREM', wants, me)
  end
  local by = redis.call('HGET', lease, 'by')
  if not by and carried and settling and not failed then
    -- Redis lost the lease of a topic this replica carries: it still does.
    redis.call('HSET', lease, 'by', me, 'live', '0', 'leaving', '0', 'at', now)
    by = me
  end
  if by == me then
    local needed = wanted or settling
    if not needed then
      for _, other in ipairs(redis.call('SMEMBERS', wants)) do
        local _, alive = beat(other)
        if alive then needed = true else redis.call('SREM', wants, other) end
      end
    end
    if failed or not needed then
      redis.call('DEL', lease)
      answers[#answers + 1] = {'free', ''}
    else
      local unsure = ''
      if live then
        unsure = redis.call('HGET', lease, 'unsure_since') or ''
        redis.call('HDEL', lease, 'unsure_since')
      end
      redis.call('HSET', lease, 'live', live and '1' or '0', 'leaving', draining and '1' or '0')
      redis.call('PEXPIRE', lease, kept)
      answers[#answers + 1] = {'mine', unsure}
    end
  else
    local last, alive, leaving, taken = -1, false, false, -1
    if by then
      last, alive = beat(by)
      taken = tonumber(redis.call('HGET', lease, 'at') or '') or -1
      -- No beat kept yet (Redis lost it, or the carrier just took the lease):
      -- gone only once it had time to beat.
      if last < 0 and (settling or now - taken <= dead_after) then alive = true end
      leaving = redis.call('HGET', lease, 'leaving') == '1'
    end
    if by and alive and not leaving then
      answers[#answers + 1] = {'other', redis.call('HGET', lease, 'live') or '0'}
    elseif wanted and not failed then
      -- Free, or its carrier leaves (and carries on until this replica is live), or
      -- is gone: what it got since its last beat may never have reached the stream.
      local unsure = ''
      if by then unsure = redis.call('HGET', lease, 'unsure_since') or '' end
      if by and not alive and unsure == '' then
        -- From its last beat, or when it took the lease if it never beat since.
        local since = math.max(last, taken)
        unsure = tostring(since >= 0 and since or now - tonumber(kept))
      end
      redis.call('DEL', lease)
      redis.call('HSET', lease, 'by', me, 'live', '0', 'leaving', '0', 'at', now)
      if unsure ~= '' then redis.call('HSET', lease, 'unsure_since', unsure) end
      redis.call('PEXPIRE', lease, kept)
      answers[#answers + 1] = {by and 'took' or 'mine', ''}
    else
      answers[#answers + 1] = {'free', ''}
    end
  end
end
return answers
";

/// A drain that ends before its topics have new live carriers: their events may not
/// be carried from now until someone takes them (who then announces the span).
/// ARGV: key prefix, this replica, now (ms), then topics.
const GIVE_UP: &str = r"
for i = 4, #ARGV do
  local lease = ARGV[1] .. 'k:' .. ARGV[i]
  local held = redis.call('HMGET', lease, 'by', 'live', 'unsure_since')
  if held[1] and (held[1] == ARGV[2] or held[2] ~= '1') and not held[3] then
    redis.call('HSET', lease, 'unsure_since', ARGV[3])
  end
end
return 0
";

/// Who carries a topic, as last heard from Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Carrier {
    #[default]
    Unknown,
    /// This replica holds the lease.
    Here,
    /// Another replica does; `live`: Genesys confirmed its subscription.
    Elsewhere { live: bool },
}

/// What Redis said of a topic in one sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Word {
    /// This replica carries it; `unsure_since`: events since then may not have been
    /// carried (said once this replica is live, to be announced).
    Mine {
        unsure_since: Option<SystemTime>,
    },
    Other {
        live: bool,
    },
    /// Nobody carries it for this replica (it does not want it, or failed it, or
    /// drains).
    Free,
}

/// What the pool is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Carry,
    Release,
}

/// One topic as this replica sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topic {
    /// This replica's desktops want it.
    pub wanted: bool,
    /// This replica's pool has it.
    pub carrying: bool,
    pub carrier: Carrier,
    /// Taken up here while Redis fails from a carrier elsewhere: its events stopped
    /// reaching this replica at the latest then; a gap to announce once live here.
    pub unsure_since: Option<SystemTime>,
}

impl Topic {
    /// Applies what Redis said; the pool's step, if any. `draining`: this replica
    /// takes no lease, but carries what its own desktops still want and nobody
    /// carries (they may subscribe until their socket is closed).
    pub fn heard(&mut self, word: Word, draining: bool) -> Option<Step> {
        match word {
            Word::Mine { .. } => {
                self.carrier = Carrier::Here;
                (!self.carrying).then(|| {
                    self.carrying = true;
                    Step::Carry
                })
            }
            Word::Other { live } => {
                self.carrier = Carrier::Elsewhere { live };
                // Break only after make: the other carrier is live.
                (self.carrying && live).then(|| {
                    self.carrying = false;
                    Step::Release
                })
            }
            Word::Free => {
                self.carrier = Carrier::Unknown;
                // A topic that failed here stays in the pool until its desktops let go
                // (they read the failure from it).
                if self.carrying && !self.wanted {
                    self.carrying = false;
                    Some(Step::Release)
                } else if draining && self.wanted && !self.carrying {
                    self.carrying = true;
                    Some(Step::Carry)
                } else {
                    None
                }
            }
        }
    }

    /// Redis fails: this replica carries what its desktops want, as one process would.
    /// `last_heard`: when Redis last answered (events carried elsewhere reached this
    /// replica until then at most).
    pub fn alone(&mut self, last_heard: SystemTime) -> Option<Step> {
        let followed = matches!(self.carrier, Carrier::Elsewhere { .. });
        self.carrier = Carrier::Unknown;
        match (self.wanted, self.carrying) {
            (true, false) => {
                self.carrying = true;
                if followed {
                    self.unsure_since = Some(last_heard);
                }
                Some(Step::Carry)
            }
            (false, true) => {
                self.carrying = false;
                Some(Step::Release)
            }
            _ => None,
        }
    }

    /// The answer for the desktops waiting on it, from the pool's (`None`: not yet).
    pub fn outcome(&self, pool: Option<TopicOutcome>) -> Option<TopicOutcome> {
        if self.carrying {
            pool
        } else if self.carrier == (Carrier::Elsewhere { live: true }) {
            Some(TopicOutcome::Live)
        } else {
            None
        }
    }

    /// What Redis is told of it, from the pool's outcome.
    pub fn flags(&self, pool: Option<&TopicOutcome>) -> u8 {
        let mut flags = 0;
        if self.wanted {
            flags |= 1;
        }
        if self.carrying {
            flags |= 2;
            match pool {
                Some(TopicOutcome::Live) => flags |= 4,
                Some(_) => flags |= 8,
                None => {}
            }
        }
        flags
    }

    /// Neither wanted nor carried here: nothing left to say of it.
    pub fn forgotten(&self) -> bool {
        !self.wanted && !self.carrying
    }

    /// The gap to announce now that the pool says `pool`, if any (once): when its
    /// events flow to this replica again, live here or from a live carrier through
    /// the stream. Forgotten if its desktops let go of it.
    pub fn gap_due(&mut self, pool: Option<&TopicOutcome>) -> Option<SystemTime> {
        let flowing = if self.carrying {
            pool == Some(&TopicOutcome::Live)
        } else {
            self.carrier == (Carrier::Elsewhere { live: true })
        };
        if flowing {
            return self.unsure_since.take();
        }
        if !self.wanted {
            self.unsure_since = None;
        }
        None
    }
}

pub struct Carriers {
    store: Arc<Store>,
    /// Set once by [`Carriers::start`]: the pool delivers to the bus, which the fleet
    /// builds first, and the carriers steer the pool.
    pool: OnceLock<Arc<Pool>>,
    /// Where gap notices go (the bus: to every replica).
    delivery: Arc<dyn Delivery>,
    topics: Mutex<HashMap<String, Topic>>,
    /// Wakes the sync (a subscription change).
    kick: Notify,
    /// After each sync.
    synced: Notify,
    draining: AtomicBool,
    /// When a sync last had Redis' answer.
    last_heard: Mutex<SystemTime>,
    sync: Script,
    give_up: Script,
    taken_over: Counter,
}

impl Carriers {
    pub fn new(store: Arc<Store>, delivery: Arc<dyn Delivery>) -> Arc<Self> {
        Arc::new(Self {
            store,
            pool: OnceLock::new(),
            delivery,
            topics: Mutex::default(),
            kick: Notify::new(),
            synced: Notify::new(),
            draining: AtomicBool::new(false),
            last_heard: Mutex::new(SystemTime::now()),
            sync: Script::new(SYNC),
            give_up: Script::new(GIVE_UP),
            taken_over: Counter::default(),
        })
    }

    /// Steers `pool` from now on, syncing with Redis until `shutdown`.
    pub fn start(
        self: &Arc<Self>,
        pool: Arc<Pool>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        if self.pool.set(pool).is_err() {
            tracing::error!("the carriers were started twice; keeping the first pool");
            return;
        }
        tasks.spawn(self.clone().run(shutdown.clone()));
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "cluster_topics_taken_over",
            "Topics this replica began to carry upstream from a carrier that was gone (a gap notice followed once it was live) or left.",
            self.taken_over.clone(),
        );
        let carriers = self.clone();
        Readings::new()
            .gauge(
                "cluster_topics_carried",
                "Topics this replica carries upstream (for its own desktops and other replicas').",
                move || {
                    carriers
                        .topics()
                        .values()
                        .filter(|t| t.carrier == Carrier::Here)
                        .count() as i64
                },
            )
            .register(registry);
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.get()
    }

    fn step(&self, pool: &Arc<Pool>, topic: &str, step: Option<Step>) {
        let topics = [topic.to_owned()];
        match step {
            Some(Step::Carry) => pool.want(&topics),
            Some(Step::Release) => pool.release(&topics),
            None => {}
        }
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(pool) = self.pool().cloned() else {
            return;
        };
        loop {
            let tick = if self.draining.load(Ordering::Acquire) {
                DRAINING_TICK
            } else {
                TICK
            };
            tokio::select! {
                _ = self.kick.notified() => {}
                _ = pool.topics_changed() => {}
                // Redis ceasing to answer is acted on at once: desktops on topics
                // carried elsewhere get nothing until this replica carries them.
                _ = self.store.health_changed() => {}
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.cancelled() => return,
            }
            self.sync_once(&pool).await;
            self.synced.notify_waiters();
            tokio::select! {
                _ = tokio::time::sleep(SPACING) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One exchange with Redis, and what follows from it.
    async fn sync_once(&self, pool: &Arc<Pool>) {
        let asked_at = SystemTime::now();
        let sent: Vec<(String, u8)> = {
            let topics = self.topics();
            let names: Vec<String> = topics.keys().cloned().collect();
            let outcomes = pool.outcomes(&names);
            names
                .into_iter()
                .zip(outcomes)
                .map(|(name, outcome)| {
                    let flags = topics[&name].flags(outcome.as_ref());
                    (name, flags)
                })
                .collect()
        };
        if sent.is_empty() {
            return;
        }
        let draining = self.draining.load(Ordering::Acquire);
        let mut invocation = self.sync.prepare_invoke();
        invocation
            .arg(self.store.keys.prefix())
            .arg(&self.store.replica)
            .arg(ms(SystemTime::now()))
            .arg(if draining { "1" } else { "0" })
            .arg(DEAD_AFTER.as_millis() as u64)
            .arg(KEPT.as_millis() as u64)
            .arg(SETTLING.as_millis() as u64);
        for (topic, flags) in &sent {
            invocation.arg(topic).arg(*flags);
        }
        let answers = self
            .store
            .invoke::<Vec<(String, String)>>(&invocation)
            .await;
        let mut gaps = Vec::new();
        // Forgotten only once Redis heard this replica does not want them (else a
        // carrier would go on carrying them for it).
        let mut told_unwanted = std::collections::HashSet::new();
        {
            let mut topics = self.topics();
            match answers {
                Ok(answers) if answers.len() == sent.len() => {
                    *self.last_heard.lock().unwrap_or_else(|p| p.into_inner()) = asked_at;
                    told_unwanted.extend(
                        sent.iter()
                            .filter(|(_, flags)| flags & 1 == 0)
                            .map(|(name, _)| name.as_str()),
                    );
                    for ((name, _), (word, detail)) in sent.iter().zip(answers) {
                        let Some(topic) = topics.get_mut(name) else {
                            continue;
                        };
                        let word = match word.as_str() {
                            "mine" => Word::Mine {
                                unsure_since: detail.parse().ok().map(from_ms),
                            },
                            "took" => {
                                self.taken_over.inc();
                                Word::Mine { unsure_since: None }
                            }
                            "other" => Word::Other {
                                live: detail == "1",
                            },
                            _ => Word::Free,
                        };
                        if let Word::Mine {
                            unsure_since: Some(since),
                        } = word
                        {
                            gaps.push((name.clone(), since));
                        }
                        let step = topic.heard(word, draining);
                        self.step(pool, name, step);
                    }
                }
                // Redis fails (or answered nonsense): carry what this replica's own
                // desktops want.
                _ => {
                    let last_heard = *self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
                    for (name, topic) in topics.iter_mut() {
                        let step = topic.alone(last_heard);
                        self.step(pool, name, step);
                    }
                }
            }
            let names: Vec<String> = topics.keys().cloned().collect();
            for (name, outcome) in names.iter().zip(pool.outcomes(&names)) {
                if let Some(topic) = topics.get_mut(name)
                    && let Some(since) = topic.gap_due(outcome.as_ref())
                {
                    gaps.push((name.clone(), since));
                }
            }
            topics.retain(|name, topic| {
                !(topic.forgotten() && told_unwanted.contains(name.as_str()))
            });
        }
        let now = SystemTime::now();
        for (topic, since) in gaps {
            tracing::warn!(
                topic,
                since = %humantime::format_rfc3339_millis(since),
                "topic taken over from a carrier that is gone or out of reach: its desktops hear of the span in which it may not have reached them"
            );
            self.delivery.gap(&[topic], since, now);
        }
    }

    /// A drain begins: this replica wants nothing more for the fleet, and marks the
    /// topics it carries as leaving; it carries each on until another replica carries
    /// it live (or, if no other wants it, as long as its own desktops do).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.kick.notify_one();
    }

    /// The end of a drain: waits until no topic this replica carries for others is
    /// left, or `deadline`. Then whatever is still not handed over is marked as given
    /// up (whoever takes it announces the span). Whether all was handed off.
    pub async fn hand_off(&self, deadline: Instant) -> bool {
        self.begin_drain();
        loop {
            let synced = self.synced.notified();
            tokio::pin!(synced);
            synced.as_mut().enable();
            self.kick.notify_one();
            let carried: Vec<String> = self
                .topics()
                .iter()
                .filter(|(_, t)| t.carrier == Carrier::Here)
                .map(|(name, _)| name.clone())
                .collect();
            if carried.is_empty() {
                return true;
            }
            if Instant::now() >= deadline || !self.store.is_up() {
                tracing::warn!(
                    topics = carried.len(),
                    "the drain ends before other replicas carry every topic this one carried"
                );
                let mut invocation = self.give_up.prepare_invoke();
                invocation
                    .arg(self.store.keys.prefix())
                    .arg(&self.store.replica)
                    .arg(ms(SystemTime::now()));
                for topic in &carried {
                    invocation.arg(topic);
                }
                let _ = self.store.invoke::<()>(&invocation).await;
                return false;
            }
            tokio::select! {
                _ = synced => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}

impl Demand for Carriers {
    fn want(&self, topics: &[String]) {
        {
            let mut known = self.topics();
            for topic in topics {
                known.entry(topic.clone()).or_default().wanted = true;
            }
        }
        self.kick.notify_one();
    }

    fn release(&self, topics: &[String]) {
        {
            let mut known = self.topics();
            for topic in topics {
                if let Some(known) = known.get_mut(topic) {
                    known.wanted = false;
                }
            }
        }
        self.kick.notify_one();
    }

    fn wait<'a>(
        &'a self,
        topics: &'a [String],
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<(String, TopicOutcome)>> {
        Box::pin(async move {
            let Some(pool) = self.pool() else {
                return crate::upstream::state::answers(topics, vec![None; topics.len()]);
            };
            loop {
                let (synced, changed) = (self.synced.notified(), pool.topics_changed());
                tokio::pin!(synced, changed);
                synced.as_mut().enable();
                changed.as_mut().enable();
                let outcomes: Vec<Option<TopicOutcome>> = {
                    let known = self.topics();
                    topics
                        .iter()
                        .zip(pool.outcomes(topics))
                        .map(|(name, pool)| match known.get(name) {
                            Some(topic) => topic.outcome(pool),
                            None => Some(TopicOutcome::Failed("released while subscribing")),
                        })
                        .collect()
                };
                if !outcomes.iter().any(Option::is_none) || Instant::now() >= deadline {
                    return crate::upstream::state::answers(topics, outcomes);
                }
                tokio::select! {
                    _ = synced => {}
                    _ = changed => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
        })
    }

    fn capacity(&self) -> Capacity {
        match self.pool() {
            Some(pool) => pool.capacity(),
            None => Capacity {
                slots: 0,
                max_topics: 0,
                foreign: None,
                client_channels: crate::config::GENESYS_CHANNELS_PER_CLIENT,
            },
        }
    }
}

fn ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Event {
        Want(bool),
        Heard(Word, bool),
        Alone,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            any::<bool>().prop_map(Event::Want),
            any::<bool>().prop_map(|d| Event::Heard(Word::Mine { unsure_since: None }, d)),
            (any::<bool>(), any::<bool>())
                .prop_map(|(live, d)| Event::Heard(Word::Other { live }, d)),
            any::<bool>().prop_map(|d| Event::Heard(Word::Free, d)),
            Just(Event::Alone),
        ]
    }

    proptest! {
        /// The pool has a topic exactly while the state says it carries it; a copy a
        /// replica's desktops want is let go only once another carrier is live; and a
        /// topic is answered live only if it is carried here or live elsewhere.
        #[test]
        fn the_pool_follows_the_state_and_never_breaks_before_make(
            events in proptest::collection::vec(event(), 1..40),
        ) {
            let mut topic = Topic::default();
            let mut in_pool = false;
            for event in events {
                let step = match event {
                    Event::Want(wanted) => {
                        topic.wanted = wanted;
                        None
                    }
                    Event::Heard(word, draining) => topic.heard(word, draining),
                    Event::Alone => topic.alone(SystemTime::UNIX_EPOCH),
                };
                match step {
                    Some(Step::Carry) => {
                        prop_assert!(!in_pool, "carried twice");
                        in_pool = true;
                    }
                    Some(Step::Release) => {
                        prop_assert!(in_pool, "released what it did not carry");
                        prop_assert!(
                            !topic.wanted || topic.carrier == (Carrier::Elsewhere { live: true }),
                            "a wanted topic let go before another carrier was live"
                        );
                        in_pool = false;
                    }
                    None => {}
                }
                prop_assert_eq!(in_pool, topic.carrying);
                if topic.outcome(None) == Some(TopicOutcome::Live) {
                    prop_assert!(!topic.carrying);
                    prop_assert_eq!(topic.carrier, Carrier::Elsewhere { live: true });
                }
            }
        }
    }

    fn wanted() -> Topic {
        Topic {
            wanted: true,
            ..Topic::default()
        }
    }

    #[test]
    fn a_wanted_topic_is_carried_here_only_when_this_replica_holds_its_lease() {
        let mut topic = wanted();
        assert_eq!(
            topic.outcome(None),
            None,
            "not settled before Redis answered"
        );
        assert_eq!(topic.heard(Word::Other { live: false }, false), None);
        assert_eq!(topic.outcome(None), None, "its carrier is not live yet");
        assert_eq!(topic.heard(Word::Other { live: true }, false), None);
        assert_eq!(topic.outcome(None), Some(TopicOutcome::Live));
        assert!(!topic.carrying);
        // Its carrier left or is gone: this replica took the lease.
        assert_eq!(
            topic.heard(Word::Mine { unsure_since: None }, false),
            Some(Step::Carry)
        );
        assert_eq!(topic.outcome(None), None, "the pool's answer now");
        assert_eq!(
            topic.outcome(Some(TopicOutcome::Rejected)),
            Some(TopicOutcome::Rejected)
        );
        assert_eq!(topic.heard(Word::Mine { unsure_since: None }, false), None);
    }

    #[test]
    fn a_copy_is_let_go_only_once_another_carrier_is_live() {
        let mut topic = wanted();
        assert_eq!(
            topic.alone(SystemTime::UNIX_EPOCH),
            Some(Step::Carry),
            "Redis failed"
        );
        assert_eq!(topic.heard(Word::Other { live: false }, false), None);
        assert!(topic.carrying, "make before break");
        assert_eq!(
            topic.outcome(Some(TopicOutcome::Live)),
            Some(TopicOutcome::Live)
        );
        assert_eq!(
            topic.heard(Word::Other { live: true }, false),
            Some(Step::Release)
        );
        assert!(!topic.carrying);
        assert_eq!(topic.outcome(None), Some(TopicOutcome::Live));
    }

    #[test]
    fn a_topic_nobody_wants_is_released_and_forgotten() {
        let mut topic = wanted();
        topic.heard(Word::Mine { unsure_since: None }, false);
        topic.wanted = false;
        assert_eq!(topic.heard(Word::Free, false), Some(Step::Release));
        assert!(topic.forgotten());
        // One that failed here stays in the pool while its desktops still want it.
        let mut failed = wanted();
        failed.heard(Word::Mine { unsure_since: None }, false);
        assert_eq!(failed.flags(Some(&TopicOutcome::NoCapacity)), 1 | 2 | 8);
        assert_eq!(failed.heard(Word::Free, false), None);
        assert!(failed.carrying);
        assert_eq!(
            failed.outcome(Some(TopicOutcome::NoCapacity)),
            Some(TopicOutcome::NoCapacity)
        );
    }

    #[test]
    fn a_draining_replica_carries_without_a_lease_what_its_desktops_want_and_nobody_carries() {
        let mut topic = wanted();
        assert_eq!(topic.heard(Word::Free, true), Some(Step::Carry));
        assert_eq!(
            topic.carrier,
            Carrier::Unknown,
            "no lease: others may take it"
        );
        assert_eq!(topic.heard(Word::Free, true), None);
        assert_eq!(
            topic.heard(Word::Other { live: true }, true),
            Some(Step::Release)
        );
    }

    #[test]
    fn flags_say_what_the_script_reads() {
        let mut topic = wanted();
        assert_eq!(topic.flags(None), 1);
        topic.heard(Word::Mine { unsure_since: None }, false);
        assert_eq!(topic.flags(None), 1 | 2);
        assert_eq!(topic.flags(Some(&TopicOutcome::Live)), 1 | 2 | 4);
        topic.wanted = false;
        assert_eq!(topic.flags(Some(&TopicOutcome::Live)), 2 | 4);
        topic.carrying = false;
        assert_eq!(topic.flags(Some(&TopicOutcome::Live)), 0);
    }

    #[test]
    fn redis_failing_means_carrying_exactly_what_is_wanted_here() {
        let mut carried_for_others = Topic {
            carrying: true,
            carrier: Carrier::Here,
            ..Topic::default()
        };
        assert_eq!(
            carried_for_others.alone(SystemTime::UNIX_EPOCH),
            Some(Step::Release)
        );
        let mut followed = Topic {
            wanted: true,
            carrier: Carrier::Elsewhere { live: true },
            ..Topic::default()
        };
        let last_heard = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        assert_eq!(followed.alone(last_heard), Some(Step::Carry));
        assert_eq!(followed.carrier, Carrier::Unknown);
        // Its events stopped reaching this replica when Redis last answered: its
        // desktops hear of that once the topic is live here, once.
        assert_eq!(followed.gap_due(None), None);
        assert_eq!(
            followed.gap_due(Some(&TopicOutcome::Live)),
            Some(last_heard)
        );
        assert_eq!(followed.gap_due(Some(&TopicOutcome::Live)), None);
        // If Redis answers first, and another carrier is live, the events flow from
        // it again: the gap is told then.
        let mut waiting = wanted();
        waiting.heard(Word::Other { live: true }, false);
        waiting.alone(last_heard);
        assert_eq!(waiting.gap_due(Some(&TopicOutcome::NoCapacity)), None);
        assert_eq!(
            waiting.heard(Word::Other { live: true }, false),
            Some(Step::Release)
        );
        assert_eq!(waiting.gap_due(None), Some(last_heard));
        // One this replica carried itself lost nothing.
        let mut carried = wanted();
        carried.heard(Word::Mine { unsure_since: None }, false);
        assert_eq!(carried.alone(last_heard), None);
        assert_eq!(carried.gap_due(Some(&TopicOutcome::Live)), None);
    }
}
