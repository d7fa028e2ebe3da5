//! Several replicas as one proxy, on Redis (`[cluster]`): one channel budget for the
//! fleet ([`leases`]), one stream of events that every replica delivers from
//! ([`bus`]), and client channels any replica can take over ([`directory`]).
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
//! | `events` | stream | every upstream event once: `t` topic, `c` CorrelationId, `f` the frame; about `history_max_len` kept, none older than `client_idle` + 1 min |
//! | `seen:<topic>\|<CorrelationId>` | string | an event's claim, expiring after the dedup window |
//! | `c:<channel id>` | hash | a client channel's `topics` (JSON), when it was listed (`created`, ms), when a socket last held it (`seen`, ms), how far in `events` it was served (`position`) and the replica that serves it (`owner`); lapses `client_idle` after `seen` |
//! | `replicas` | sorted set | the replicas that take desktops (ready, not draining) → their last beat (ms) |
//! | `r:<replica>` | string | a replica's heartbeat: its clock (ms) at its last beat, every 250 ms, lapsing after 3 s |
//! | `calls:<replica>` | list | subscription calls forwarded to the replica that serves the channel's socket (JSON, with a reply key) |
//! | `reply:<id>` | list | the answer to one forwarded call |
//! | `ledger` | string | when this Redis started keeping the leases (ms); its absence means Redis lost them |
//!
//! Leases lapse by themselves: a replica that dies leaves its channels alive at
//! Genesys until their tokens expire, and its leases until the same moment.

pub mod bus;
pub mod calls;
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
        Ok(Self {
            calls: calls::Calls::new(store.clone()),
            store,
            leases,
            bus,
            directory,
            presence,
        })
    }

    /// Waits until none of channels `ids` (those a drain closed) is listed as this
    /// replica's any more: their desktops reconnected elsewhere and that replica
    /// carries their topics. Then stops beating: the caller lets go of the topics.
    /// The caller bounds the wait (a desktop may never come back); it ends early
    /// when no other replica takes desktops.
    pub async fn hand_over(&self, mut ids: Vec<String>) {
        while !ids.is_empty() && self.presence.others_accepting().await {
            if let Ok(left) = self.directory.still_mine(&ids).await {
                ids = left;
                if ids.is_empty() {
                    break;
                }
            }
            tokio::time::sleep(HAND_OVER_POLL).await;
        }
        self.presence.retire().await;
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        self.store.register_metrics(registry);
        self.leases.register_metrics(registry);
        self.bus.register_metrics(registry);
        self.directory.register_metrics(registry);
        self.calls.register_metrics(registry);
    }
}
