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
//! - **Replay.** Each frame carries its entry's position ([`offset`]), each session
//!   how far it was served; a socket that attaches (on any replica) under the
//!   reader's routing lock learns where its live frames begin, and is first replayed
//!   the entries in between that name its topics ([`Bus::history`]), in order, once.
//!   Only what the stream no longer holds (trimmed by its length bound) is a gap.
//! - **Gaps.** A gap notice (a channel lost, a topic's carrier gone) is an entry too
//!   (`g`: its span and topics): the topic's carrier is one replica, and every
//!   replica's desktops on it, and any replayed later, must hear of it.
//! - **Redis failing.** While Redis fails, or the reader is not reading, events go
//!   straight to this replica's own desktops too (as without `[cluster]`), and are
//!   still appended as soon as Redis takes them, for other replicas' desktops (marked
//!   `d` with this replica, whose reader skips them). The reader resumes from the
//!   last entry it routed, so it catches up on what the others published meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use redis::Script;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::store::{Store, StoreError};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::Registry;
use crate::router::{Attachment, NOT_IN_STREAM, Offset, Outbox, QueuedFrame, Router};
use crate::upstream::Delivery;

/// Events per publish call at most.
pub const BATCH: usize = 256;
/// Events waiting for Redis at most (while it fails); the oldest beyond are dropped
/// from the queue, delivered to this replica's desktops only.
const MAX_PENDING: usize = 16 * BATCH;
/// Stream entries per read at most.
pub const READ_COUNT: usize = 512;
/// How long one read waits for new entries.
const READ_BLOCK: Duration = Duration::from_millis(500);

/// Appends events that are new, then drops those older than the age bound. KEYS:
/// stream. ARGV: dedup window ms, stream length bound, seen-key prefix, the oldest id
/// to keep, then (topic, correlation id or "", frame, the replica that delivered it
/// to its own desktops already or "") quadruples. Returns how many were appended.
const PUBLISH: &str = r"
local appended = 0
for i = 5, #ARGV, 4 do
  local topic, correlation, frame, delivered = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local new = true
  if correlation ~= '' then
    new = redis.call('SET', ARGV[3] .. topic .. '|' .. correlation, 1, 'NX', 'PX', ARGV[1])
  end
  if new then
    if delivered ~= '' then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 't', topic, 'c', correlation, 'f', frame, 'd', delivered)
    else
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 't', topic, 'c', correlation, 'f', frame)
    end
    appended = appended + 1
  end
end
if appended > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[4])
end
return appended
";

/// How much longer than `server.client_idle` (the longest a desktop can be away and
/// keep its channel) the stream keeps an event.
const RETENTION_MARGIN: Duration = Duration::from_secs(60);

/// One event on its way to the stream.
struct Pending {
    topic: String,
    correlation: Option<String>,
    frame: Utf8Bytes,
    /// Delivered to this replica's desktops already (Redis failed, or the reader was
    /// not reading): its entry says so, and this replica's reader skips it.
    delivered: bool,
}

/// A gap notice on its way to the stream.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct GapEntry {
    topics: Vec<String>,
    /// Milliseconds since the epoch.
    from: u64,
    to: u64,
}

impl GapEntry {
    fn span(&self) -> (SystemTime, SystemTime) {
        let at = |ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        (at(self.from), at(self.to))
    }
}

pub struct Bus {
    store: Arc<Store>,
    router: Arc<Router>,
    /// The stream's length bound (`cluster.history_max_len`).
    max_len: usize,
    /// `server.client_idle`, read at each publish: the stream's age bound.
    config: Arc<ArcSwap<Config>>,
    pending: Mutex<Vec<Pending>>,
    gaps: Mutex<Vec<GapEntry>>,
    wake: Notify,
    publish: Script,
    /// The reader is connected and reading (events routed from the stream flow).
    reading: AtomicBool,
    /// The position of the last entry routed from the stream; held while a batch of
    /// entries is routed, so that a socket attaches either before or after each.
    routing: Mutex<Offset>,
    published: Counter,
    delivered_directly: Counter,
    replayed: Counter,
}

impl Bus {
    pub fn new(
        store: Arc<Store>,
        router: Arc<Router>,
        max_len: usize,
        config: Arc<ArcSwap<Config>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            router,
            max_len,
            config,
            pending: Mutex::default(),
            gaps: Mutex::default(),
            wake: Notify::new(),
            publish: Script::new(PUBLISH),
            reading: AtomicBool::new(false),
            routing: Mutex::new(NOT_IN_STREAM),
            published: Counter::default(),
            delivered_directly: Counter::default(),
            replayed: Counter::default(),
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
        registry.register(
            "cluster_events_replayed",
            "Events read back from the fleet's stream for a socket that missed them (a desktop that reconnected, here or from another replica).",
            self.replayed.clone(),
        );
    }

    fn pending(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver_directly(&self, batch: &[Pending]) {
        let undelivered = batch.iter().filter(|event| !event.delivered);
        let mut routed = 0;
        for event in undelivered {
            self.router
                .route(&event.topic, event.correlation.as_deref(), &event.frame);
            routed += 1;
        }
        self.delivered_directly.inc_by(routed);
    }

    /// Publishes queued events until `shutdown`: whatever queued while one call was in
    /// flight goes in the next.
    pub async fn write(self: Arc<Self>, dedup_window: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            let gaps = std::mem::take(&mut *self.gaps.lock().unwrap_or_else(|p| p.into_inner()));
            for gap in gaps {
                self.append_gap(&gap).await;
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
                let retention = self.config.load().server.client_idle + RETENTION_MARGIN;
                let oldest = SystemTime::now()
                    .checked_sub(retention)
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                invocation
                    .arg(dedup_window.as_millis() as u64)
                    .arg(self.max_len)
                    .arg(self.store.keys.seen_prefix())
                    .arg(format!("{oldest}-0"));
                for event in &batch {
                    invocation
                        .arg(&event.topic)
                        .arg(event.correlation.as_deref().unwrap_or(""))
                        .arg(event.frame.as_str())
                        .arg(if event.delivered {
                            self.store.replica.as_str()
                        } else {
                            ""
                        });
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

    /// Appends a gap notice (or, if Redis fails, tells this replica's desktops).
    async fn append_gap(&self, gap: &GapEntry) {
        let mut append = redis::cmd("XADD");
        append
            .arg(self.store.keys.events())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.max_len)
            .arg("*")
            .arg("g")
            .arg(serde_json::to_string(gap).unwrap_or_default());
        if self.store.command::<String>(&append).await.is_err() {
            let (from, to) = gap.span();
            self.router.notify_gap(&gap.topics, from, to);
        }
    }

    /// Reads the stream from its end at start, routing every entry to this replica's
    /// desktops, until `shutdown`; reconnects (and resumes after the last entry
    /// routed) when Redis fails.
    pub async fn read(self: Arc<Self>, shutdown: CancellationToken) {
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
            if self.cursor() == NOT_IN_STREAM {
                match self.stream_end(&mut connection).await {
                    Ok(end) => *self.routing() = end,
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
                let from = [stream_id(self.cursor())];
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
                let mut cursor = self.routing();
                for entry in reply.keys.iter().flat_map(|stream| &stream.ids) {
                    if let Some(at) = offset(&entry.id) {
                        self.route_entry(at, entry);
                        *cursor = at;
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

    fn routing(&self) -> MutexGuard<'_, Offset> {
        self.routing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The position of the last entry routed to this replica's desktops
    /// ([`NOT_IN_STREAM`] before the reader's first read).
    pub fn cursor(&self) -> Offset {
        *self.routing()
    }

    /// Whether the reader found its place in the stream, or Redis fails (the replica
    /// then serves without the stream, and says so).
    pub fn settled(&self) -> bool {
        self.cursor() != NOT_IN_STREAM || !self.store.is_up()
    }

    /// Attaches a socket to `outbox` between two batches of routed entries: its live
    /// frames are the entries after the position returned.
    pub fn attach(&self, outbox: &Outbox) -> (Attachment, Offset) {
        let cursor = self.routing();
        (outbox.attach(), *cursor)
    }

    /// The entries after `after` up to `to` whose topic is one of `topics`, in order,
    /// and what the stream no longer holds of that range.
    pub async fn history(
        &self,
        after: Offset,
        to: Offset,
        topics: &HashSet<String>,
    ) -> Result<History, StoreError> {
        let mut history = History::default();
        if after == NOT_IN_STREAM || after >= to {
            return Ok(history);
        }
        let key = self.store.keys.events();
        let exists: bool = self.store.command(redis::cmd("EXISTS").arg(&key)).await?;
        let trimmed = if exists {
            let mut info = redis::cmd("XINFO");
            info.arg("STREAM").arg(&key);
            let info: HashMap<String, redis::Value> = self.store.command(&info).await?;
            info.get("max-deleted-entry-id")
                .and_then(|id| redis::from_redis_value_ref::<String>(id).ok())
                .and_then(|id| offset(&id))
                .unwrap_or(NOT_IN_STREAM)
        } else {
            // No stream at all (Redis lost it): whatever it held is gone.
            to
        };
        if trimmed > after {
            history.lost = Some((time_of(after), time_of(trimmed.min(to))));
        }
        let mut from = after;
        loop {
            let mut range = redis::cmd("XRANGE");
            range
                .arg(&key)
                .arg(format!("({}", stream_id(from)))
                .arg(stream_id(to))
                .arg("COUNT")
                .arg(READ_COUNT);
            let page: redis::streams::StreamRangeReply = self.store.command(&range).await?;
            let Some(last) = page.ids.last().and_then(|entry| offset(&entry.id)) else {
                break;
            };
            for entry in &page.ids {
                if let (Some(at), Some(gap)) = (offset(&entry.id), gap_of(entry)) {
                    let named: Vec<&str> = gap
                        .topics
                        .iter()
                        .filter(|t| {
                            crate::topic::expansion(t)
                                .iter()
                                .any(|e| topics.contains(e.as_str()))
                        })
                        .map(String::as_str)
                        .collect();
                    if !named.is_empty() {
                        let (from, to) = gap.span();
                        history
                            .frames
                            .push((at, crate::router::gap_frame(from, to, &named)));
                    }
                    continue;
                }
                let (Some(at), Some(topic), Some(frame)) = (
                    offset(&entry.id),
                    entry.get::<String>("t"),
                    entry.get::<String>("f"),
                ) else {
                    continue;
                };
                if topics.contains(&topic) {
                    history.frames.push((at, Utf8Bytes::from(frame)));
                }
            }
            if page.ids.len() < READ_COUNT || last >= to {
                break;
            }
            from = last;
        }
        self.replayed.inc_by(history.frames.len() as u64);
        Ok(history)
    }

    /// The position of the stream's last entry: reading starts after it.
    async fn stream_end(
        &self,
        connection: &mut redis::aio::MultiplexedConnection,
    ) -> Result<Offset, super::store::StoreError> {
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
        // An empty stream: from its very start.
        Ok(newest
            .ids
            .first()
            .and_then(|entry| offset(&entry.id))
            .unwrap_or(FIRST))
    }

    fn route_entry(&self, at: Offset, entry: &redis::streams::StreamId) {
        if let Some(gap) = gap_of(entry) {
            let (from, to) = gap.span();
            self.router.notify_gap(&gap.topics, from, to);
            return;
        }
        let field = |name: &str| entry.get::<String>(name);
        let (Some(topic), Some(frame)) = (field("t"), field("f")) else {
            return;
        };
        if field("d").as_deref() == Some(self.store.replica.as_str()) {
            return;
        }
        let correlation = field("c").filter(|c| !c.is_empty());
        self.router
            .route_at(at, &topic, correlation.as_deref(), &Utf8Bytes::from(frame));
    }
}

/// The gap notice stream entry `entry` holds, if it is one.
fn gap_of(entry: &redis::streams::StreamId) -> Option<GapEntry> {
    serde_json::from_str(&entry.get::<String>("g")?).ok()
}

/// What a socket missed, from the stream.
#[derive(Default)]
pub struct History {
    pub frames: Vec<QueuedFrame>,
    /// The stream no longer holds its entries in this span (its length bound trimmed
    /// them): they are a gap.
    pub lost: Option<(SystemTime, SystemTime)>,
}

/// Bits of an [`Offset`] for the sequence number within a millisecond.
const SEQUENCE_BITS: u32 = 20;
/// The position before any entry (stream id `0-1` is the first Redis can give).
const FIRST: Offset = 1;

/// The position of stream entry `id` (`<ms>-<seq>`): ordered as the ids are, never
/// [`NOT_IN_STREAM`]. `None` for an id this scheme cannot hold.
pub fn offset(id: &str) -> Option<Offset> {
    let (ms, sequence) = id.split_once('-')?;
    let (ms, sequence): (u64, u64) = (ms.parse().ok()?, sequence.parse().ok()?);
    if ms >= 1 << (64 - SEQUENCE_BITS) || sequence >= 1 << SEQUENCE_BITS {
        return None;
    }
    Some((ms << SEQUENCE_BITS | sequence).max(FIRST))
}

/// The stream id at position `offset`.
pub fn stream_id(offset: Offset) -> String {
    format!(
        "{}-{}",
        offset >> SEQUENCE_BITS,
        offset & ((1 << SEQUENCE_BITS) - 1)
    )
}

/// When the entry at `offset` was appended (by Redis' clock).
pub fn time_of(offset: Offset) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(offset >> SEQUENCE_BITS)
}

impl Delivery for Bus {
    fn event(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes) {
        // Nothing reaches this replica's desktops from the stream while Redis fails
        // or the reader is not reading: deliver directly rather than not at all.
        let delivered = !self.store.is_up() || !self.reading.load(Ordering::Acquire);
        if delivered {
            self.router.route(topic, correlation_id, frame);
            self.delivered_directly.inc();
        }
        // Other replicas' desktops on the topic get it only from the stream: it is
        // appended as soon as Redis answers (the reader, when it reads it, finds it
        // delivered already: the router drops the second copy).
        let overflow: Vec<Pending> = {
            let mut pending = self.pending();
            pending.push(Pending {
                topic: topic.to_owned(),
                correlation: correlation_id.map(str::to_owned),
                frame: frame.clone(),
                delivered,
            });
            let over = pending.len().saturating_sub(MAX_PENDING);
            pending.drain(..over).collect()
        };
        // Redis has not taken events for a while: the oldest go to this replica's
        // own desktops at least (other replicas will have taken their topics over).
        if !overflow.is_empty() {
            self.deliver_directly(&overflow);
        }
        self.wake.notify_one();
    }

    fn gap(&self, topics: &[String], from: SystemTime, to: SystemTime) {
        // A topic is carried by one replica for the whole fleet: every replica's
        // desktops on it missed the span.
        if !self.store.is_up() || !self.reading.load(Ordering::Acquire) {
            self.router.notify_gap(topics, from, to);
            return;
        }
        let ms = |at: SystemTime| {
            at.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        self.gaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(GapEntry {
                topics: topics.to_vec(),
                from: ms(from),
                to: ms(to),
            });
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn offsets_order_as_stream_ids_do(
            a in (1u64..1 << 43, 0u64..1 << 20),
            b in (1u64..1 << 43, 0u64..1 << 20),
        ) {
            let (id_a, id_b) = (format!("{}-{}", a.0, a.1), format!("{}-{}", b.0, b.1));
            let (at_a, at_b) = (offset(&id_a).unwrap(), offset(&id_b).unwrap());
            prop_assert_eq!(at_a.cmp(&at_b), a.cmp(&b));
            prop_assert_ne!(at_a, NOT_IN_STREAM);
            prop_assert_eq!(stream_id(at_a), id_a);
        }
    }

    #[test]
    fn ids_outside_the_scheme_have_no_offset() {
        assert_eq!(offset("nonsense"), None);
        assert_eq!(offset("1-"), None);
        assert_eq!(offset(&format!("1-{}", 1u64 << 20)), None);
        assert_eq!(offset("1700000000000-3"), Some(1_700_000_000_000 << 20 | 3));
        assert_eq!(
            time_of(offset("1700000000000-3").unwrap()),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
        );
    }
}
