//! Several replicas as one proxy, on Redis (`[cluster]`): one channel budget for the
//! fleet ([`leases`]), each topic carried upstream by one replica ([`carriers`]), one
//! stream of events that every replica delivers from ([`bus`]), and client channels
//! any replica can take over ([`directory`]).
//!
//! The OAuth client's channels are counted at Genesys across every token and every
//! process, and the 21st evicts the oldest. Each replica's pool keeps its own budget;
//! with `[cluster]`, a channel task also takes a fleet lease ([`leases::FleetLeases`])
//! before it mints and creates its channel, and gives it back only once the channel is
//! gone upstream.
//!
//! Keys, all under `<key_prefix>:` (see [`store::Keys`]):
//!
//! | key | type | what |
//! |---|---|---|
//! | `leases` | sorted set | `<replica>/<channel>` → when the lease lapses (ms, Redis' clock): the build's deadline, then the channel's token expiry |
//! | `events` | stream | every upstream event once: `t` topic, `c` CorrelationId, `f` the frame, `d` the replica that delivered it to its own desktops already (Redis was failing); or a gap notice, `g` (its topics and span, JSON); about `history_max_len` kept, none older than `client_idle` + 1 min |
//! | `seen:<topic>\|<CorrelationId>` | string | an event's claim, expiring after the dedup window |
//! | `c:<channel id>` | hash | a client channel's `topics` (JSON), when it was listed (`created`, ms), when a socket last held it (`seen`, ms), how far in `events` it was served (`position`) and the replica that serves it (`owner`); lapses `client_idle` after `seen` |
//! | `replicas` | sorted set | the replicas that take desktops (ready, not draining) → their last beat (ms) |
//! | `k:<topic>` | hash | a topic's carrier lease: the replica that carries it upstream (`by`), whether Genesys confirmed it (`live`), whether that replica drains (`leaving`), since when the topic may not have been carried (`unsure_since`, ms, until the next carrier is live); kept a minute after its last refresh |
//! | `w:<topic>` | set | the replicas whose desktops want a topic; kept a minute after its last refresh |
//! | `r:<replica>` | string | a replica's heartbeat: its clock (ms) at its last beat, every 250 ms (gone after 1.5 s without one), kept a minute |
//! | `calls:<replica>` | list | subscription calls forwarded to the replica that serves the channel's socket (JSON, with a reply key) |
//! | `reply:<id>` | list | the answer to one forwarded call |
//! | `ledger` | string | when this Redis started keeping the leases (ms); its absence means Redis lost them |
//!
//! Leases lapse by themselves: a replica that dies leaves its channels alive at
//! Genesys until their tokens expire, and its leases until the same moment.

pub mod bus;
pub mod calls;
pub mod carriers;
pub mod directory;
pub mod leases;
pub mod presence;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClusterConfig, Config};
use crate::metrics::Registry;
use crate::router::Router;

/// How often a draining replica looks whether its channels have other owners.
const HAND_OVER_POLL: Duration = Duration::from_millis(100);

/// The fleet's parts in one replica, running.
pub struct Fleet {
    pub store: Arc<store::Store>,
    pub leases: Arc<leases::FleetLeases>,
    pub bus: Arc<bus::Bus>,
    /// Steers the pool once it exists ([`carriers::Carriers::start`]).
    pub carriers: Arc<carriers::Carriers>,
    pub directory: Arc<directory::Directory>,
    pub presence: Arc<presence::Presence>,
    pub calls: Arc<calls::Calls>,
}

impl Fleet {
    /// Connects (lazily) and starts the leases' upkeep and the bus' writer and reader,
    /// until `shutdown`. `dedup_window`: how long an event's second copy may trail it.
    pub fn start(
        cluster: &ClusterConfig,
        config: Arc<ArcSwap<Config>>,
        router: Arc<Router>,
        dedup_window: Duration,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Self, store::StoreError> {
        tracing::info!(
            redis = cluster.endpoint,
            "several replicas as one: the channel budget and the events go through Redis"
        );
        let store = store::Store::connect(cluster)?;
        let leases = leases::FleetLeases::new(store.clone(), config.clone());
        let directory = directory::Directory::new(store.clone(), config.clone());
        let presence = presence::Presence::new(store.clone());
        tasks.spawn(presence.clone().beat(shutdown.clone()));
        tasks.spawn(leases.clone().maintain(shutdown.clone()));
        let bus = bus::Bus::new(store.clone(), router, cluster.history_max_len, config);
        tasks.spawn(bus.clone().write(dedup_window, shutdown.clone()));
        tasks.spawn(bus.clone().read(shutdown.clone()));
        let carriers = carriers::Carriers::new(store.clone(), bus.clone());
        Ok(Self {
            carriers,
            calls: calls::Calls::new(store.clone()),
            store,
            leases,
            bus,
            directory,
            presence,
        })
    }

    /// A drain begins: this replica takes no more desktops, and hands the topics it
    /// carries to replicas that want them (carrying each on until its new carrier is
    /// live).
    pub async fn begin_drain(&self) {
        self.presence.stop_accepting().await;
        self.carriers.begin_drain();
    }

    /// Waits until none of channels `ids` (those a drain closed) is listed as this
    /// replica's any more (their desktops reconnected elsewhere), then until the
    /// topics this replica carries have other live carriers, all until `deadline` at
    /// most; the first wait ends early when no other replica takes desktops. If
    /// both ended in time, this replica says it retired: nobody depends on it any
    /// more. If not, it leaves its last beat: whoever takes a channel or a topic over
    /// from it announces the span since then. The caller then lets go of the topics.
    pub async fn hand_over(&self, ids: Vec<String>, deadline: tokio::time::Instant) {
        let moved = tokio::time::timeout_at(deadline, self.desktops_moved(ids))
            .await
            .unwrap_or(false);
        let handed_off = self.carriers.hand_off(deadline).await;
        if moved && handed_off {
            self.presence.retire().await;
        } else {
            tracing::warn!(
                "the drain ends before every desktop and topic is served elsewhere: whoever takes them over announces a gap"
            );
        }
    }

    /// Whether every channel of `ids` came to be served elsewhere.
    async fn desktops_moved(&self, mut ids: Vec<String>) -> bool {
        while !ids.is_empty() && self.presence.others_accepting().await {
            if let Ok(left) = self.directory.still_mine(&ids).await {
                ids = left;
                if ids.is_empty() {
                    break;
                }
            }
            tokio::time::sleep(HAND_OVER_POLL).await;
        }
        ids.is_empty()
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        self.store.register_metrics(registry);
        self.leases.register_metrics(registry);
        self.bus.register_metrics(registry);
        self.carriers.register_metrics(registry);
        self.directory.register_metrics(registry);
        self.calls.register_metrics(registry);
    }
}
