//! Where every replica finds a client channel: its id, topics, and when a socket last
//! held it, in one Redis hash per channel that lapses `client_idle` after its last
//! socket (as the channel itself does on the replica that holds it).
//!
//! A desktop moved to another replica (a drain, a crash) reconnects with the channel
//! id it had: that replica takes the channel over from here instead of answering
//! 404, subscribes its topics, and replays its next socket what followed the
//! listing's `position` in the event stream. The listing names its `owner`, the
//! replica that serves it now: a draining replica waits for the channels it closed
//! to have another owner before it lets go of their topics upstream.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::store::{Store, StoreError};
use prometheus_client::metrics::counter::Counter;

use crate::config::Config;
use crate::metrics::Registry;
use crate::router::{NOT_IN_STREAM, Offset};

/// Hash fields.
const TOPICS: &str = "topics";
const SEEN: &str = "seen";
const POSITION: &str = "position";
const CREATED: &str = "created";
const OWNER: &str = "owner";

/// Refreshes the listings (KEYS) this replica owns. ARGV: the replica, when their
/// sockets were last served (ms), the listing's lifetime (ms), then each one's
/// position. Positions are compared as decimal strings: Lua's numbers are doubles.
const SEEN_SCRIPT: &str = r"
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
for i, key in ipairs(KEYS) do
  local listed = redis.call('HMGET', key, 'owner', 'position')
  if listed[1] == ARGV[1] then
    local position = ARGV[3 + i]
    if greater(position, listed[2] or '0') then
      redis.call('HSET', key, 'seen', ARGV[2], 'position', position)
    else
      redis.call('HSET', key, 'seen', ARGV[2])
    end
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return 0
";

/// What the directory holds of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub topics: BTreeSet<String>,
    /// When a socket last held it (a replica refreshes this every second while one
    /// does).
    pub seen: SystemTime,
    /// How far in the event stream its sockets were served (as of `seen`).
    pub position: Offset,
    /// The replica that serves it.
    pub owner: String,
}

pub struct Directory {
    store: Arc<Store>,
    seen: redis::Script,
    claimed: Counter,
    /// `server.client_idle`, read at each write: how long a listing outlives its
    /// last socket.
    config: Arc<ArcSwap<Config>>,
}

impl Directory {
    pub fn new(store: Arc<Store>, config: Arc<ArcSwap<Config>>) -> Arc<Self> {
        Arc::new(Self {
            store,
            seen: redis::Script::new(SEEN_SCRIPT),
            claimed: Counter::default(),
            config,
        })
    }

    fn lifetime(&self) -> Duration {
        // A second more than the replica's own idle close, so that the listing never
        // lapses before the channel does.
        self.config.load().server.client_idle + Duration::from_secs(1)
    }

    /// Lists channel `id` with its `topics` as this replica's (seen now at stream
    /// `position`, if new), or relists it with new ones.
    pub async fn list(
        &self,
        id: &str,
        topics: &BTreeSet<String>,
        position: Offset,
    ) -> Result<(), StoreError> {
        let topics = serde_json::to_string(topics).unwrap_or_else(|_| "[]".into());
        let key = self.store.keys.channel(id);
        let mut pipe = redis::pipe();
        pipe.hset(&key, TOPICS, topics)
            .ignore()
            // A new listing is this replica's; a relisting keeps its owner (the
            // replica with its socket).
            .hset_nx(&key, OWNER, &self.store.replica)
            .ignore()
            // A new listing is seen now; a relisting keeps what its socket said.
            .hset_nx(&key, SEEN, ms(SystemTime::now()))
            .ignore()
            .hset_nx(&key, POSITION, position)
            .ignore()
            .hset_nx(&key, CREATED, ms(SystemTime::now()))
            .ignore()
            .pexpire(&key, self.lifetime().as_millis() as i64)
            .ignore();
        self.store.pipe(&pipe).await
    }

    /// Channels `served` (id, stream position) had every frame reach their socket
    /// until `until`, and up to that position; their listings are kept. Only the
    /// listings this replica still owns are touched, and a position never goes back.
    pub async fn seen(
        &self,
        served: &[(String, Offset)],
        until: SystemTime,
    ) -> Result<(), StoreError> {
        if served.is_empty() {
            return Ok(());
        }
        let mut invocation = self.seen.prepare_invoke();
        for (id, _) in served {
            invocation.key(self.store.keys.channel(id));
        }
        invocation
            .arg(&self.store.replica)
            .arg(ms(until))
            .arg(self.lifetime().as_millis() as u64);
        for (_, position) in served {
            invocation.arg(position);
        }
        self.store.invoke::<()>(&invocation).await
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "cluster_channels_taken_over",
            "Client channels whose socket this replica took over from another replica (a drain, a crash, a balancer's choice).",
            self.claimed.clone(),
        );
    }

    /// Channel `id`, served by another replica until now, is served by this
    /// replica's socket from now on.
    pub async fn claim(&self, id: &str) -> Result<(), StoreError> {
        self.claimed.inc();
        let key = self.store.keys.channel(id);
        let mut pipe = redis::pipe();
        pipe.hset(&key, OWNER, &self.store.replica)
            .ignore()
            .hset(&key, SEEN, ms(SystemTime::now()))
            .ignore()
            .pexpire(&key, self.lifetime().as_millis() as i64)
            .ignore();
        self.store.pipe(&pipe).await
    }

    /// Channel `id` as listed, if it is.
    pub async fn find(&self, id: &str) -> Result<Option<Listing>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.store.keys.channel(id))
            .arg(TOPICS)
            .arg(SEEN)
            .arg(POSITION)
            .arg(OWNER);
        type Fields = (Option<String>, Option<u64>, Option<u64>, Option<String>);
        let (fields,): (Fields,) = self.store.pipe(&pipe).await?;
        let (Some(topics), Some(seen), position, owner) = fields else {
            return Ok(None);
        };
        Ok(Some(Listing {
            topics: serde_json::from_str(&topics).unwrap_or_default(),
            seen: SystemTime::UNIX_EPOCH + Duration::from_millis(seen),
            position: position.unwrap_or(NOT_IN_STREAM),
            owner: owner.unwrap_or_default(),
        }))
    }

    /// Which of channels `ids` are still listed as this replica's.
    pub async fn still_mine(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(self.store.keys.channel(id), OWNER);
        }
        let owners: Vec<Option<String>> = self.store.pipe(&pipe).await?;
        Ok(ids
            .iter()
            .zip(owners)
            .filter(|(_, owner)| owner.as_deref() == Some(self.store.replica.as_str()))
            .map(|(id, _)| id.clone())
            .collect())
    }

    /// Channel `id` is gone for good (a `/stream` socket's channel ends with it).
    pub async fn delist(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.del(self.store.keys.channel(id)).ignore();
        self.store.pipe(&pipe).await
    }
}

fn ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
