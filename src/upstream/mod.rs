//! The upstream side: the pool's decisions as plain state (`state`), the pool that
//! applies them within the budget (`pool`), a channel's subscription bookkeeping
//! (`sync`), the task that drives one channel through its life, handovers included
//! (`channel`), and the count of the OAuth client's channels held by others
//! (`foreign`). Genesys calls themselves are in `crate::genesys`.

pub mod channel;
pub mod foreign;
pub mod pool;
pub mod state;
pub mod sync;

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use pool::Pool;
use state::{Capacity, ChannelKey, TopicOutcome};

/// What desktops want carried upstream, seen from the client side: topics that gained
/// their first subscriber or lost their last. One process carries them itself (the
/// [`Pool`]); a fleet carries each on one replica (`fleet::carriers`).
pub trait Demand: Send + Sync {
    /// Topics that gained their first subscriber (one batch).
    fn want(&self, topics: &[String]);
    /// Topics that lost their last subscriber.
    fn release(&self, topics: &[String]);
    /// Waits until every topic is live (here or, in a fleet, on the replica that
    /// carries it) or has failed, at most until `deadline`.
    fn wait<'a>(
        &'a self,
        topics: &'a [String],
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<(String, TopicOutcome)>>;
    /// What the budget allows now (for a client's capacity error).
    fn capacity(&self) -> Capacity;
}

impl Demand for Arc<Pool> {
    fn want(&self, topics: &[String]) {
        Pool::want(self, topics);
    }

    fn release(&self, topics: &[String]) {
        Pool::release(self, topics);
    }

    fn wait<'a>(
        &'a self,
        topics: &'a [String],
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<(String, TopicOutcome)>> {
        Box::pin(Pool::wait(self, topics, deadline))
    }

    fn capacity(&self) -> Capacity {
        Pool::capacity(self)
    }
}

/// Where upstream events go: the router, seen from below. The upstream side names
/// no client-side type.
pub trait Delivery: Send + Sync {
    /// An upstream event frame for `topic`, forwarded as the same bytes.
    fn event(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes);
    /// Events on `topics` between `from` and `to` may have been lost.
    fn gap(&self, topics: &[String], from: SystemTime, to: SystemTime);
}

/// Budget slots shared with other replicas. A channel task holds a lease from before
/// it creates its upstream channel until that channel is gone upstream; one process
/// alone shares nothing ([`Unshared`]). The pool's own slots still apply within the
/// process.
pub trait Leases: Send + Sync {
    /// Takes a lease for channel `key`; `successor`s (handovers) may use the slot kept
    /// free for handovers. `false`: none is free now (ask again later).
    fn take(&self, key: ChannelKey, successor: bool) -> BoxFuture<'_, bool>;
    /// The channel is pinned to a token that expires at `until`: its lease lasts that
    /// long at most (a replica that dies leaves its channels until their tokens expire).
    fn pin(&self, key: ChannelKey, until: SystemTime) -> BoxFuture<'_, ()>;
    /// The channel is gone upstream: its lease is free.
    fn give_back(&self, key: ChannelKey) -> BoxFuture<'_, ()>;
}

/// One process alone: no lease to take.
pub struct Unshared;

impl Leases for Unshared {
    fn take(&self, _: ChannelKey, _: bool) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }

    fn pin(&self, _: ChannelKey, _: SystemTime) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    fn give_back(&self, _: ChannelKey) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}
