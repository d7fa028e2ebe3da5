//! The fleet's event bus: every upstream event a replica receives enters one Redis
//! stream once, and every replica delivers to its own desktops from that stream.
//!
//! - **Once.** An event's `(topic, CorrelationId)` is claimed with `SET NX` (expiring
//!   after the dedup window) in the same script that appends it, so a handover's
//!   overlap, or two replicas carrying one topic, write it once.
//! - **Not one command per delivery.** Events wait in a queue while a publish is in
//!   flight and go out together (up to [`BATCH`] per script call); each replica reads
//!   the stream with one blocking `XREAD` of up to [`READ_COUNT`] entries at a time,
//!   and fans out to its desktops in memory. Redis work grows with events (one stream
//!   entry and one dedup key each) and replicas (one reader each), not with desktops.
//! - **Redis failing.** While Redis fails, events go straight to this replica's own
//!   desktops (as without `[cluster]`; the router's own dedup window catches an event
//!   that was published after all), and nothing is kept. The reader resumes from the
//!   last entry it routed, so it catches up on what the others published meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use redis::Script;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::store::Store;
use crate::backoff::Backoff;
use crate::metrics::Registry;
use crate::router::Router;
use crate::upstream::Delivery;

/// Events per publish call at most.
pub const BATCH: usize = 256;
/// Stream entries per read at most.
pub const READ_COUNT: usize = 512;
/// How long one read waits for new entries.
const READ_BLOCK: Duration = Duration::from_millis(500);

/// Appends events that are new. KEYS: stream. ARGV: dedup window ms, stream length
/// bound, seen-key prefix, then (topic, correlation id or "", frame) triples.
/// Returns how many were appended.
const PUBLISH: &str = r"
local appended = 0
for i = 4, #ARGV, 3 do
  local topic, correlation, frame = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local new = true
  if correlation ~= '' then
    new = redis.call('SET', ARGV[3] .. topic .. '|' .. correlation, 1, 'NX', 'PX', ARGV[1])
  end
  if new then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 't', topic, 'c', correlation, 'f', frame)
    appended = appended + 1
  end
end
return appended
";

/// One event on its way to the stream.
struct Pending {
    topic: String,
    correlation: Option<String>,
    frame: Utf8Bytes,
}

pub struct Bus {
    store: Arc<Store>,
    router: Arc<Router>,
    /// The stream's length bound (`cluster.history_max_len`).
    max_len: usize,
    pending: Mutex<Vec<Pending>>,
    wake: Notify,
    publish: Script,
    /// The reader is connected and reading (events routed from the stream flow).
    reading: AtomicBool,
    published: Counter,
    delivered_directly: Counter,
}

impl Bus {
    pub fn new(store: Arc<Store>, router: Arc<Router>, max_len: usize) -> Arc<Self> {
        Arc::new(Self {
            store,
            router,
            max_len,
            pending: Mutex::default(),
            wake: Notify::new(),
            publish: Script::new(PUBLISH),
            reading: AtomicBool::new(false),
            published: Counter::default(),
            delivered_directly: Counter::default(),
        })
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "cluster_events_published",
            "Upstream events this replica appended to the fleet's stream (second copies, by an overlap or another replica, are not).",
            self.published.clone(),
        );
        registry.register(
            "cluster_events_delivered_directly",
            "Upstream events delivered straight to this replica's desktops because Redis failed.",
            self.delivered_directly.clone(),
        );
    }

    fn pending(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver_directly(&self, batch: &[Pending]) {
        for event in batch {
            self.router
                .route(&event.topic, event.correlation.as_deref(), &event.frame);
        }
        self.delivered_directly.inc_by(batch.len() as u64);
    }

    /// Publishes queued events until `shutdown`: whatever queued while one call was in
    /// flight goes in the next.
    pub async fn write(self: Arc<Self>, dedup_window: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                let batch: Vec<Pending> = {
                    let mut pending = self.pending();
                    let take = pending.len().min(BATCH);
                    pending.drain(..take).collect()
                };
                if batch.is_empty() {
                    break;
                }
                let mut invocation = self.publish.key(self.store.keys.events());
                invocation
                    .arg(dedup_window.as_millis() as u64)
                    .arg(self.max_len)
                    .arg(self.store.keys.seen_prefix());
                for event in &batch {
                    invocation
                        .arg(&event.topic)
                        .arg(event.correlation.as_deref().unwrap_or(""))
                        .arg(event.frame.as_str());
                }
                match self.store.invoke::<u64>(&invocation).await {
                    Ok(appended) => {
                        self.published.inc_by(appended);
                    }
                    Err(_) => self.deliver_directly(&batch),
                }
            }
        }
    }

    /// Reads the stream from its end at start, routing every entry to this replica's
    /// desktops, until `shutdown`; reconnects (and resumes after the last entry
    /// routed) when Redis fails.
    pub async fn read(self: Arc<Self>, shutdown: CancellationToken) {
        let mut last: Option<String> = None;
        let mut backoff = Backoff::new();
        loop {
            let connected = tokio::select! {
                connected = self.store.reader(READ_BLOCK) => connected,
                _ = shutdown.cancelled() => return,
            };
            let mut connection = match connected {
                Ok(connection) => connection,
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            if last.is_none() {
                match self.stream_end(&mut connection).await {
                    Ok(end) => last = Some(end),
                    Err(_) => {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_wait()) => continue,
                            _ = shutdown.cancelled() => return,
                        }
                    }
                }
            }
            self.reading.store(true, Ordering::Release);
            let options = StreamReadOptions::default()
                .count(READ_COUNT)
                .block(READ_BLOCK.as_millis() as usize);
            loop {
                let keys = [self.store.keys.events()];
                let from = [last.clone().unwrap_or_else(|| "0-0".into())];
                let read = tokio::select! {
                    read = redis::AsyncCommands::xread_options::<_, _, StreamReadReply>(
                        &mut connection,
                        &keys,
                        &from,
                        &options,
                    ) => read,
                    _ = shutdown.cancelled() => return,
                };
                let Ok(reply) = self.store.observed(read.map_err(Into::into)) else {
                    break;
                };
                backoff = Backoff::new();
                for stream in reply.keys {
                    for entry in stream.ids {
                        self.route_entry(&entry);
                        last = Some(entry.id);
                    }
                }
            }
            self.reading.store(false, Ordering::Release);
            // A read failed: reconnect after a pause that grows while it keeps failing.
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_wait()) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// The id of the stream's last entry ("0-0" for none): reading starts after it.
    async fn stream_end(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
    ) -> Result<String, super::store::StoreError> {
        let newest: Result<redis::streams::StreamRangeReply, redis::RedisError> =
            redis::AsyncCommands::xrevrange_count(
                connection,
                self.store.keys.events(),
                "+",
                "-",
                1,
            )
            .await;
        let newest = self.store.observed(newest.map_err(Into::into))?;
        Ok(newest
            .ids
            .first()
            .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone()))
    }

    fn route_entry(&self, entry: &redis::streams::StreamId) {
        let field = |name: &str| entry.get::<String>(name);
        let (Some(topic), Some(frame)) = (field("t"), field("f")) else {
            return;
        };
        let correlation = field("c").filter(|c| !c.is_empty());
        self.router
            .route(&topic, correlation.as_deref(), &Utf8Bytes::from(frame));
    }
}

impl Delivery for Bus {
    fn event(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes) {
        // Nothing reaches this replica's desktops from the stream while Redis fails
        // or the reader is not reading: deliver directly rather than not at all.
        if !self.store.is_up() || !self.reading.load(Ordering::Acquire) {
            self.router.route(topic, correlation_id, frame);
            self.delivered_directly.inc();
            return;
        }
        self.pending().push(Pending {
            topic: topic.to_owned(),
            correlation: correlation_id.map(str::to_owned),
            frame: frame.clone(),
        });
        self.wake.notify_one();
    }

    fn gap(&self, topics: &[String], from: SystemTime, to: SystemTime) {
        // Each replica carries its own desktops' topics: the gap is this replica's.
        self.router.notify_gap(topics, from, to);
    }
}
