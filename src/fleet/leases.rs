//! The fleet's channel budget: one lease per upstream channel, in one sorted set that
//! every replica's channel tasks take from atomically.
//!
//! A channel task takes a lease before it mints and creates its channel
//! ([`Leases::take`]), pins it to its token's expiry once minted ([`Leases::pin`]),
//! and gives it back once the channel is gone upstream ([`Leases::give_back`]). Serving
//! channels may take all but one lease, so that the fleet always has a slot for a
//! handover; successors may take the last.
//!
//! Every second each replica asserts the leases it holds again (one script): a Redis
//! that restarted empty gets them back, and a lease under construction stays alive
//! while its replica does. After Redis lost the ledger, no lease is taken for
//! [`LEDGER_GRACE`], so that every replica has asserted its own first.
//!
//! While Redis fails, a replica cannot know what the others hold. It then creates new
//! serving channels only within `cluster.local_share` (counting every lease it holds),
//! and lets one successor at a time hand a channel over (blocking a handover would
//! lose events at the token's expiry). So during an outage the fleet exceeds its budget
//! by at most one channel per replica, and only while a handover overlaps; the README
//! says how to size for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use redis::Script;
use tokio_util::sync::CancellationToken;

use super::store::Store;
use crate::config::Config;
use crate::metrics::{Readings, Registry};
use crate::upstream::Leases;
use crate::upstream::state::ChannelKey;

/// How long a lease taken for a channel under construction lasts without being
/// asserted again (a replica that dies while building frees it after this).
const BUILD_TTL: Duration = Duration::from_secs(120);
/// A pinned lease outlives its token by this much (clocks differ between replicas
/// and Redis; Genesys ends the channel with its token).
const PIN_MARGIN: Duration = Duration::from_secs(60);
/// How often a replica asserts its leases again.
pub const ASSERT_EVERY: Duration = Duration::from_secs(1);
/// After Redis lost the ledger, how long no lease is taken (every replica asserts its
/// own within [`ASSERT_EVERY`]).
pub const LEDGER_GRACE: Duration = Duration::from_millis(2500);

/// Takes one lease if fewer than the limit are held (lapsed ones dropped first, by
/// Redis' clock). KEYS: leases, ledger. ARGV: member, ttl ms, limit, grace ms.
/// Returns {taken 0|1, leases held in the fleet}.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('SET', KEYS[2], now, 'NX') then
  return {0, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {1, held}
end
if now < tonumber(redis.call('GET', KEYS[2])) + tonumber(ARGV[4]) then
  return {0, held}
end
if held < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return {1, held + 1}
end
return {0, held}
";

/// Asserts leases (pairs of member, ttl ms), whatever the limit: their channels exist
/// or are being built. KEYS: leases, ledger. Returns the leases held in the fleet.
const ASSERT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[2], now, 'NX')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[i + 1]), ARGV[i])
end
return redis.call('ZCARD', KEYS[1])
";

/// A lease this replica holds.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// Pinned to a token: lapses then. `None`: under construction (asserted for
    /// [`BUILD_TTL`] at a time).
    until: Option<SystemTime>,
    successor: bool,
    /// Taken while Redis failed, on the local share (asserted once it answers).
    local: bool,
}

impl Held {
    /// How long Redis should keep it from now; `None` once its token has expired.
    fn ttl(&self, now: SystemTime) -> Option<Duration> {
        match self.until {
            None => Some(BUILD_TTL),
            Some(until) => until
                .duration_since(now)
                .ok()
                .filter(|left| !left.is_zero()),
        }
    }
}

/// The leases of one replica.
pub struct FleetLeases {
    store: Arc<Store>,
    /// This process' name in the ledger (random at each start: a restarted replica
    /// does not inherit what its previous life held).
    replica: String,
    /// `upstream.max_channels` (the fleet's budget) and `cluster.local_share`, read at
    /// each decision.
    config: Arc<ArcSwap<Config>>,
    held: Mutex<HashMap<ChannelKey, Held>>,
    /// Leases given back while Redis failed: removed once it answers.
    released: Mutex<Vec<ChannelKey>>,
    /// Redis writes of this replica's leases, one at a time: an assertion must not
    /// put back a lease given back meanwhile.
    writes: tokio::sync::Mutex<()>,
    take_script: Script,
    assert_script: Script,
    /// The fleet's leases as last seen (-1 before the first answer).
    fleet_held: Arc<AtomicI64>,
    refused: Counter,
    taken_locally: Counter,
}

impl FleetLeases {
    pub fn new(store: Arc<Store>, config: Arc<ArcSwap<Config>>) -> Arc<Self> {
        let replica = store.replica.clone();
        tracing::info!(
            replica,
            "this replica takes its channels' leases from the fleet's budget in Redis"
        );
        Arc::new(Self {
            store,
            replica,
            config,
            held: Mutex::default(),
            released: Mutex::default(),
            writes: tokio::sync::Mutex::new(()),
            take_script: Script::new(TAKE),
            assert_script: Script::new(ASSERT),
            fleet_held: Arc::new(AtomicI64::new(-1)),
            refused: Counter::default(),
            taken_locally: Counter::default(),
        })
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "cluster_lease_refusals",
            "Fleet leases refused because the fleet's budget was used up (the channel waits).",
            self.refused.clone(),
        );
        registry.register(
            "cluster_leases_taken_locally",
            "Leases taken on cluster.local_share while Redis failed.",
            self.taken_locally.clone(),
        );
        let (mine, fleet) = (self.clone(), self.fleet_held.clone());
        Readings::new()
            .gauge(
                "cluster_leases_held",
                "Channel leases this replica holds.",
                move || mine.held().len() as i64,
            )
            .gauge(
                "cluster_fleet_leases",
                "Channel leases the whole fleet holds, as last seen in Redis (-1: not yet).",
                move || fleet.load(Ordering::Relaxed),
            )
            .register(registry);
    }

    fn held(&self) -> MutexGuard<'_, HashMap<ChannelKey, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn released(&self) -> MutexGuard<'_, Vec<ChannelKey>> {
        self.released.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn member(&self, key: ChannelKey) -> String {
        format!("{}/{key}", self.replica)
    }

    /// Asserts this replica's leases every [`ASSERT_EVERY`] until `shutdown`, and
    /// removes those given back while Redis failed.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ASSERT_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            self.assert_held().await;
        }
    }

    async fn assert_held(&self) {
        let _writing = self.writes.lock().await;
        let released = std::mem::take(&mut *self.released());
        if !released.is_empty() {
            let mut pipe = redis::pipe();
            for key in &released {
                pipe.zrem(self.store.keys.leases(), self.member(*key))
                    .ignore();
            }
            if self.store.pipe::<()>(&pipe).await.is_err() {
                self.released().extend(released);
                return;
            }
        }
        let now = SystemTime::now();
        let leases: Vec<(ChannelKey, Duration)> = self
            .held()
            .iter()
            .filter_map(|(&key, held)| Some((key, held.ttl(now)?)))
            .collect();
        let mut invocation = self.assert_script.key(self.store.keys.leases());
        invocation.key(self.store.keys.ledger());
        for (key, ttl) in &leases {
            invocation
                .arg(self.member(*key))
                .arg(ttl.as_millis() as u64);
        }
        if let Ok(fleet) = self.store.invoke::<i64>(&invocation).await {
            self.fleet_held.store(fleet, Ordering::Relaxed);
            for held in self.held().values_mut() {
                held.local = false;
            }
        }
    }

    /// While Redis fails: serving channels within `local_share` less the slot for a
    /// handover, counting every lease held; one successor at a time.
    fn take_locally(&self, key: ChannelKey, successor: bool) -> bool {
        let local_share = self
            .config
            .load()
            .cluster
            .as_ref()
            .map_or(crate::config::DEFAULT_LOCAL_SHARE, |c| c.local_share);
        let mut held = self.held();
        let allowed = if successor {
            !held.values().any(|h| h.local && h.successor)
        } else {
            held.len() < local_share.saturating_sub(1)
        };
        if allowed {
            held.insert(
                key,
                Held {
                    until: None,
                    successor,
                    local: true,
                },
            );
            self.taken_locally.inc();
        }
        allowed
    }

    async fn take_lease(&self, key: ChannelKey, successor: bool) -> bool {
        if self.held().contains_key(&key) {
            return true;
        }
        let max_channels = self.config.load().upstream.max_channels;
        let limit = if successor {
            max_channels
        } else {
            max_channels.saturating_sub(1)
        };
        let _writing = self.writes.lock().await;
        let mut invocation = self.take_script.key(self.store.keys.leases());
        invocation
            .key(self.store.keys.ledger())
            .arg(self.member(key))
            .arg(BUILD_TTL.as_millis() as u64)
            .arg(limit)
            .arg(LEDGER_GRACE.as_millis() as u64);
        match self.store.invoke::<(i64, i64)>(&invocation).await {
            Ok((taken, fleet)) => {
                self.fleet_held.store(fleet, Ordering::Relaxed);
                if taken == 1 {
                    self.held().insert(
                        key,
                        Held {
                            until: None,
                            successor,
                            local: false,
                        },
                    );
                    true
                } else {
                    self.refused.inc();
                    false
                }
            }
            Err(_) => self.take_locally(key, successor),
        }
    }

    async fn pin_lease(&self, key: ChannelKey, until: SystemTime) {
        let until = until + PIN_MARGIN;
        {
            let mut held = self.held();
            let Some(lease) = held.get_mut(&key) else {
                return;
            };
            lease.until = Some(until);
        }
        let ttl = until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let _writing = self.writes.lock().await;
        let mut invocation = self.assert_script.key(self.store.keys.leases());
        invocation
            .key(self.store.keys.ledger())
            .arg(self.member(key))
            .arg(ttl.as_millis() as u64);
        // On failure the next assertion pins it.
        if let Ok(fleet) = self.store.invoke::<i64>(&invocation).await {
            self.fleet_held.store(fleet, Ordering::Relaxed);
        }
    }

    async fn give_back_lease(&self, key: ChannelKey) {
        let _writing = self.writes.lock().await;
        if self.held().remove(&key).is_none() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.zrem(self.store.keys.leases(), self.member(key))
            .ignore();
        if self.store.pipe::<()>(&pipe).await.is_err() {
            self.released().push(key);
        }
    }
}

impl Leases for FleetLeases {
    fn take(&self, key: ChannelKey, successor: bool) -> BoxFuture<'_, bool> {
        Box::pin(self.take_lease(key, successor))
    }

    fn pin(&self, key: ChannelKey, until: SystemTime) -> BoxFuture<'_, ()> {
        Box::pin(self.pin_lease(key, until))
    }

    fn give_back(&self, key: ChannelKey) -> BoxFuture<'_, ()> {
        Box::pin(self.give_back_lease(key))
    }
}
