//! Who wants which topic, and fan-out of upstream frames to them.
//!
//! The router keeps, for every topic, the client sessions subscribed to it, and
//! reports when a topic gains its first subscriber or loses its last (the upstream
//! pool subscribes and unsubscribes upstream on those transitions). An upstream
//! frame is routed by its topic and shared, unchanged, by every subscriber. A
//! combined subscription (`v2.users.1?presence&routingStatus`) receives the events of
//! each topic it names (Genesys sends them under `v2.users.1.presence` and so on), and
//! a session that names one topic twice (plainly and combined) still gets each event
//! once. Events
//! are deduplicated on `(topic, CorrelationId)` (the frame's bytes when it has none)
//! over a window longer than a handover's overlap, so an event that arrives on both
//! the old and the new channel reaches each client once.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::metrics::{Readings, Registry};
use crate::topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub type SessionId = u64;

/// Frames queued per client before it counts as too slow and is disconnected.
pub const CLIENT_QUEUE: usize = 1024;

/// A position in the fleet's event stream (see `fleet::bus::offset`): frames carry the
/// position of the stream entry they came from, so that a session knows how far it
/// was served and its next socket (on any replica) can be replayed the rest.
/// [`NOT_IN_STREAM`] marks a frame no stream holds (without `[cluster]`, every frame).
pub type Offset = u64;
pub const NOT_IN_STREAM: Offset = 0;

/// One frame queued for a client socket, with the stream position it came from.
pub type QueuedFrame = (Offset, Utf8Bytes);

/// Where the frames of one client session go: the socket currently open for it, if
/// any. A new socket replaces the old one; a socket that cannot keep up is cut off
/// (its queue is dropped, which ends its task) rather than buffered without bound.
#[derive(Default)]
pub struct Outbox {
    sender: ArcSwapOption<Socket>,
    generation: AtomicU64,
    /// Since when frames for this session were dropped (no socket open, or the socket
    /// was too slow) that no stream holds: the next socket starts with a gap notice
    /// from then.
    missed_since: Mutex<Option<SystemTime>>,
    /// How far in the stream the session's sockets were served, and by which socket
    /// generation: only the current socket moves it.
    served: Mutex<Served>,
}

#[derive(Default, Clone, Copy)]
struct Served {
    generation: u64,
    offset: Offset,
}

struct Socket {
    generation: u64,
    tx: mpsc::Sender<QueuedFrame>,
}

/// A socket attached to an outbox.
pub struct Attachment {
    pub generation: u64,
    pub frames: mpsc::Receiver<QueuedFrame>,
    /// Since when frames no stream holds were dropped, if any were.
    pub missed_since: Option<SystemTime>,
    /// The stream position up to which earlier sockets were served: what follows it
    /// (up to where this socket's live frames begin) is this socket's to replay.
    pub served: Offset,
}

impl Outbox {
    /// Attaches a new socket, detaching any previous one.
    pub fn attach(&self) -> Attachment {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let (tx, frames) = mpsc::channel(CLIENT_QUEUE);
        // Under the same lock as `unwritten_since`: a loss reported while a new
        // socket attaches reaches exactly one of them.
        let mut missed = self.missed_since.lock().unwrap_or_else(|p| p.into_inner());
        let served = {
            let mut served = self.served();
            served.generation = generation;
            served.offset
        };
        self.sender.store(Some(Arc::new(Socket { generation, tx })));
        Attachment {
            generation,
            frames,
            missed_since: missed.take(),
            served,
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The socket of `generation` wrote the stream's frames up to `offset`.
    pub fn written(&self, generation: u64, offset: Offset) {
        let mut served = self.served();
        if served.generation == generation && offset > served.offset {
            served.offset = offset;
        }
    }

    /// How far in the stream this session was served.
    pub fn served_to(&self) -> Offset {
        self.served().offset
    }

    /// The session starts (or resumes, taken over from another replica) at stream
    /// position `offset`: its next socket is replayed what follows.
    pub fn serve_from(&self, offset: Offset) {
        let mut served = self.served();
        served.offset = served.offset.max(offset);
    }

    /// A socket went away with frames queued for it that it never wrote, perhaps since
    /// `since`: the session's current socket (a newer one) hears of the gap now, or
    /// else its next socket does. `gap` builds the notice.
    pub fn unwritten_since(&self, since: SystemTime, gap: impl FnOnce(SystemTime) -> Utf8Bytes) {
        let mut missed = self.missed_since.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.sender.load();
        let told = current
            .as_ref()
            .is_some_and(|socket| socket.tx.try_send((NOT_IN_STREAM, gap(since))).is_ok());
        if !told {
            *missed = Some(missed.map_or(since, |m| m.min(since)));
        }
    }

    /// Frames for this session may have been missed since `since` (elsewhere): its
    /// next socket hears of the gap.
    pub fn missed_from(&self, since: SystemTime) {
        let mut missed = self.missed_since.lock().unwrap_or_else(|p| p.into_inner());
        *missed = Some(missed.map_or(since, |m| m.min(since)));
    }

    fn missed(&self) {
        self.missed_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(SystemTime::now);
    }

    /// Detaches the socket of `generation`, if it is still the current one.
    pub fn detach(&self, generation: u64) {
        let current = self.sender.load();
        if current.as_ref().is_some_and(|a| a.generation == generation) {
            self.sender.compare_and_swap(&*current, None);
        }
    }

    /// Whether a socket of `generation` was replaced by a newer one.
    pub fn replaced(&self, generation: u64) -> bool {
        self.generation.load(Ordering::Acquire) != generation
    }

    pub fn is_attached(&self) -> bool {
        self.sender.load().is_some()
    }

    /// Queues a frame no stream holds for the socket.
    pub fn send(&self, frame: &Utf8Bytes) -> Queued {
        self.send_at(NOT_IN_STREAM, frame)
    }

    /// Queues a frame (from stream position `offset`) for the socket. A frame that
    /// finds no socket open, or one too slow to take it, is dropped: the next socket
    /// is replayed it from the stream, or hears of the gap if no stream holds it.
    pub fn send_at(&self, offset: Offset, frame: &Utf8Bytes) -> Queued {
        let guard = self.sender.load();
        let Some(socket) = guard.as_ref() else {
            self.lost(offset);
            return Queued::NoSocket;
        };
        let dropped = match socket.tx.try_send((offset, frame.clone())) {
            Ok(()) => return Queued::Yes,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("client socket too slow: disconnecting it");
                self.detach(socket.generation);
                Queued::QueueFull
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::NoSocket,
        };
        self.lost(offset);
        dropped
    }

    fn lost(&self, offset: Offset) {
        // A session with no position in the stream cannot be replayed either.
        if offset == NOT_IN_STREAM || self.served_to() == NOT_IN_STREAM {
            self.missed();
        }
    }
}

/// Whether a frame was queued for a client's socket, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    Yes,
    NoSocket,
    /// The socket was too slow: it is cut off.
    QueueFull,
}

/// A session that receives the events of one event topic; `names` counts how many
/// of its subscriptions name that topic.
struct Route {
    session: SessionId,
    outbox: Arc<Outbox>,
    names: u32,
}

/// What the router counts (registered by [`Router::register_metrics`]).
pub struct RouterMetrics {
    /// Upstream event frames routed, second copies included.
    pub events_received: Counter,
    /// Second copies of an event (an overlap, or two channels) dropped.
    pub events_deduplicated: Counter,
    /// Frames queued to client sockets.
    pub events_delivered: Counter,
    /// Frames dropped for a client with no socket open, or too slow to take them, by
    /// reason; the two counters below are handles into it, so that the hot path needs
    /// no label lookup.
    drops: Family<DropLabels, Counter>,
    pub dropped_no_socket: Counter,
    pub dropped_queue_full: Counter,
    /// Gap notices sent to client sessions.
    pub gap_notices: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        let drops = Family::<DropLabels, Counter>::default();
        let dropped_no_socket = drops.get_or_create_owned(&DropLabels {
            reason: "no_socket",
        });
        let dropped_queue_full = drops.get_or_create_owned(&DropLabels {
            reason: "queue_full",
        });
        Self {
            events_received: Counter::default(),
            events_deduplicated: Counter::default(),
            events_delivered: Counter::default(),
            drops,
            dropped_no_socket,
            dropped_queue_full,
            gap_notices: Counter::default(),
        }
    }
}

#[derive(Default)]
struct Subscriptions {
    /// Subscribed name (as the client wrote it) → its sessions.
    names: HashMap<String, HashSet<SessionId>>,
    /// Event topic (as Genesys sends it) → who receives it.
    routes: HashMap<String, Vec<Route>>,
}

pub struct Router {
    subscriptions: RwLock<Subscriptions>,
    dedup: Mutex<Dedup>,
    pub metrics: RouterMetrics,
}

impl Router {
    /// `dedup_window` must exceed a handover's overlap plus the delivery skew between
    /// two channels.
    pub fn new(dedup_window: Duration) -> Self {
        Self {
            subscriptions: RwLock::default(),
            dedup: Mutex::new(Dedup::new(dedup_window)),
            metrics: RouterMetrics::default(),
        }
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        let metrics = &self.metrics;
        registry.register(
            "events_received",
            "Upstream event frames routed, second copies (overlaps) included.",
            metrics.events_received.clone(),
        );
        registry.register(
            "events_deduplicated",
            "Second copies of an event (a handover's overlap) dropped.",
            metrics.events_deduplicated.clone(),
        );
        registry.register(
            "events_delivered",
            "Event frames queued to client sockets.",
            metrics.events_delivered.clone(),
        );
        registry.register(
            "client_queue_drops",
            "Frames dropped for a client session: no socket open, or a full queue (the socket is then cut off).",
            metrics.drops.clone(),
        );
        registry.register(
            "gap_notices",
            "Gap notices sent to client sessions.",
            metrics.gap_notices.clone(),
        );
        let router = self.clone();
        Readings::new()
            .gauge(
                "topics",
                "Topics with at least one subscriber.",
                move || router.topic_count() as i64,
            )
            .register(registry);
    }

    /// Subscribes a session to topics; returns the topics that had no subscriber before.
    pub fn add(&self, session: SessionId, outbox: &Arc<Outbox>, topics: &[String]) -> Vec<String> {
        let mut subs = self
            .subscriptions
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut first = Vec::new();
        for topic in topics {
            let sessions = subs.names.entry(topic.clone()).or_default();
            if !sessions.insert(session) {
                continue;
            }
            if sessions.len() == 1 {
                first.push(topic.clone());
            }
            for event_topic in topic::expansion(topic) {
                let routes = subs.routes.entry(event_topic).or_default();
                match routes.iter_mut().find(|r| r.session == session) {
                    Some(route) => route.names += 1,
                    None => routes.push(Route {
                        session,
                        outbox: outbox.clone(),
                        names: 1,
                    }),
                }
            }
        }
        first
    }

    /// Unsubscribes a session from topics; returns the topics left with no subscriber.
    pub fn remove(&self, session: SessionId, topics: &[String]) -> Vec<String> {
        let mut subs = self
            .subscriptions
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut last = Vec::new();
        for topic in topics {
            let Some(sessions) = subs.names.get_mut(topic) else {
                continue;
            };
            if !sessions.remove(&session) {
                continue;
            }
            if sessions.is_empty() {
                subs.names.remove(topic);
                last.push(topic.clone());
            }
            for event_topic in topic::expansion(topic) {
                let Some(routes) = subs.routes.get_mut(&event_topic) else {
                    continue;
                };
                if let Some(at) = routes.iter().position(|r| r.session == session) {
                    routes[at].names -= 1;
                    if routes[at].names == 0 {
                        routes.swap_remove(at);
                    }
                }
                if routes.is_empty() {
                    subs.routes.remove(&event_topic);
                }
            }
        }
        last
    }

    /// Delivers an upstream event no stream holds to the topic's subscribers, unless it
    /// was delivered already. Returns the number of sockets it was queued on.
    pub fn route(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes) -> usize {
        self.route_at(NOT_IN_STREAM, topic, correlation_id, frame)
    }

    /// As [`Router::route`], for the event at stream position `offset`.
    pub fn route_at(
        &self,
        offset: Offset,
        topic: &str,
        correlation_id: Option<&str>,
        frame: &Utf8Bytes,
    ) -> usize {
        let key = dedup_key(topic, correlation_id, frame);
        let first_time = self
            .dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_sighting(key, Instant::now());
        self.metrics.events_received.inc();
        if !first_time {
            self.metrics.events_deduplicated.inc();
            return 0;
        }
        let subs = self.subscriptions.read().unwrap_or_else(|p| p.into_inner());
        let Some(routes) = subs.routes.get(topic) else {
            return 0;
        };
        let mut delivered = 0;
        for route in routes {
            match route.outbox.send_at(offset, frame) {
                Queued::Yes => delivered += 1,
                Queued::NoSocket => {
                    self.metrics.dropped_no_socket.inc();
                }
                Queued::QueueFull => {
                    self.metrics.dropped_queue_full.inc();
                }
            }
        }
        self.metrics.events_delivered.inc_by(delivered as u64);
        delivered
    }

    /// Tells every session subscribed to any of `topics` that events on them may have
    /// been lost between `from` and `to`, naming only that session's topics.
    pub fn notify_gap(&self, topics: &[String], from: SystemTime, to: SystemTime) {
        let subs = self.subscriptions.read().unwrap_or_else(|p| p.into_inner());
        let mut per_session: BTreeMap<SessionId, (Arc<Outbox>, Vec<&str>)> = BTreeMap::new();
        for topic in topics {
            let Some(sessions) = subs.names.get(topic) else {
                continue;
            };
            for event_topic in topic::expansion(topic) {
                for route in subs.routes.get(&event_topic).into_iter().flatten() {
                    if sessions.contains(&route.session) {
                        let entry = per_session
                            .entry(route.session)
                            .or_insert_with(|| (route.outbox.clone(), Vec::new()));
                        if !entry.1.contains(&topic.as_str()) {
                            entry.1.push(topic);
                        }
                    }
                }
            }
        }
        for (outbox, topics) in per_session.into_values() {
            outbox.send(&gap_frame(from, to, &topics));
            self.metrics.gap_notices.inc();
        }
    }

    /// How long an event is remembered at least, to drop its second copy.
    pub fn dedup_window(&self) -> Duration {
        self.dedup.lock().unwrap_or_else(|p| p.into_inner()).window
    }

    /// A new window, from a reloaded `overlap` or upstream heartbeat; it applies from
    /// the next rotation of the remembered keys.
    pub fn set_dedup_window(&self, window: Duration) {
        self.dedup.lock().unwrap_or_else(|p| p.into_inner()).window = window;
    }

    /// How many topics have at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.subscriptions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .len()
    }
}

impl crate::upstream::Delivery for Router {
    fn event(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes) {
        self.route(topic, correlation_id, frame);
    }

    fn gap(&self, topics: &[String], from: SystemTime, to: SystemTime) {
        self.notify_gap(topics, from, to);
    }
}

/// `{"topicName":"handover.gap","eventBody":{"from","to","topics"}}`.
pub fn gap_frame(from: SystemTime, to: SystemTime, topics: &[&str]) -> Utf8Bytes {
    let frame = serde_json::json!({
        "topicName": "handover.gap",
        "eventBody": {
            "from": humantime::format_rfc3339_millis(from).to_string(),
            "to": humantime::format_rfc3339_millis(to).to_string(),
            "topics": topics,
        },
    });
    Utf8Bytes::from(frame.to_string())
}

fn dedup_key(topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes) -> u64 {
    let mut hasher = DefaultHasher::new();
    match correlation_id {
        Some(id) => (topic, id).hash(&mut hasher),
        None => frame.as_str().hash(&mut hasher),
    }
    hasher.finish()
}

/// Keys seen in the current and the previous window: a key is remembered for at
/// least one window and at most two, in bounded memory.
struct Dedup {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    since: Instant,
    window: Duration,
}

impl Dedup {
    fn new(window: Duration) -> Self {
        Self {
            current: HashSet::new(),
            previous: HashSet::new(),
            since: Instant::now(),
            window,
        }
    }

    fn first_sighting(&mut self, key: u64, now: Instant) -> bool {
        if now.duration_since(self.since) >= self.window {
            self.previous = std::mem::take(&mut self.current);
            self.since = now;
        }
        !self.previous.contains(&key) && self.current.insert(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn first_and_last_subscribers_are_reported() {
        let router = Router::new(Duration::from_secs(10));
        let a = Arc::new(Outbox::default());
        let b = Arc::new(Outbox::default());
        assert_eq!(router.add(1, &a, &topics(&["x", "y"])), topics(&["x", "y"]));
        assert_eq!(router.add(2, &b, &topics(&["y", "z"])), topics(&["z"]));
        assert_eq!(
            router.add(2, &b, &topics(&["y"])),
            Vec::<String>::new(),
            "idempotent"
        );
        assert_eq!(router.remove(1, &topics(&["x", "y"])), topics(&["x"]));
        assert_eq!(
            router.remove(2, &topics(&["y", "z", "never"])),
            topics(&["y", "z"])
        );
        assert_eq!(router.topic_count(), 0);
    }

    #[tokio::test]
    async fn combined_subscriptions_receive_each_named_topic_once() {
        let router = Router::new(Duration::from_secs(10));
        let outbox = Arc::new(Outbox::default());
        let rx = outbox.attach().frames;
        assert_eq!(
            router.add(
                1,
                &outbox,
                &topics(&["v2.u.1?presence&routing", "v2.u.1.presence"])
            ),
            topics(&["v2.u.1?presence&routing", "v2.u.1.presence"])
        );
        let presence = Utf8Bytes::from_static(r#"{"topicName":"v2.u.1.presence"}"#);
        let routing = Utf8Bytes::from_static(r#"{"topicName":"v2.u.1.routing"}"#);
        assert_eq!(
            router.route("v2.u.1.presence", Some("a"), &presence),
            1,
            "once, though named twice"
        );
        assert_eq!(router.route("v2.u.1.routing", Some("b"), &routing), 1);
        assert_eq!(
            router.route("v2.u.1?presence&routing", Some("c"), &routing),
            0
        );
        assert_eq!(rx.len(), 2);
        assert_eq!(
            router.remove(1, &topics(&["v2.u.1.presence"])),
            topics(&["v2.u.1.presence"])
        );
        assert_eq!(
            router.route("v2.u.1.presence", Some("d"), &presence),
            1,
            "still named by the combined one"
        );
        assert_eq!(
            router
                .remove(1, &topics(&["v2.u.1?presence&routing"]))
                .len(),
            1
        );
        assert_eq!(router.route("v2.u.1.presence", Some("e"), &presence), 0);
        assert_eq!(router.topic_count(), 0);
    }

    #[tokio::test]
    async fn an_event_seen_on_two_channels_is_delivered_once() {
        let router = Router::new(Duration::from_secs(10));
        let outbox = Arc::new(Outbox::default());
        let rx = outbox.attach().frames;
        router.add(1, &outbox, &topics(&["t"]));
        let frame =
            Utf8Bytes::from_static(r#"{"topicName":"t","metadata":{"CorrelationId":"c1"}}"#);
        assert_eq!(router.route("t", Some("c1"), &frame), 1);
        assert_eq!(
            router.route("t", Some("c1"), &frame),
            0,
            "same event from the other channel"
        );
        assert_eq!(router.route("t", Some("c2"), &frame), 1);
        let bare = Utf8Bytes::from_static(r#"{"topicName":"t"}"#);
        assert_eq!(router.route("t", None, &bare), 1);
        assert_eq!(
            router.route("t", None, &bare),
            0,
            "no correlation id: the bytes decide"
        );
        assert_eq!(rx.len(), 3);
        assert_eq!(router.metrics.events_deduplicated.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn dedup_forgets_after_two_windows() {
        let mut dedup = Dedup::new(Duration::from_secs(5));
        let start = Instant::now();
        assert!(dedup.first_sighting(7, start));
        assert!(!dedup.first_sighting(7, start + Duration::from_secs(6)));
        assert!(!dedup.first_sighting(7, start + Duration::from_secs(9)));
        assert!(dedup.first_sighting(7, start + Duration::from_secs(17)));
    }

    #[tokio::test]
    async fn a_new_socket_replaces_the_old_and_a_slow_one_is_cut_off() {
        let outbox = Outbox::default();
        let first = outbox.attach();
        let (first, mut first_rx) = (first.generation, first.frames);
        let second = outbox.attach();
        let (second, second_rx) = (second.generation, second.frames);
        assert!(outbox.replaced(first));
        assert!(
            first_rx.recv().await.is_none(),
            "the old socket's queue ends"
        );
        let frame = Utf8Bytes::from_static("{}");
        for _ in 0..CLIENT_QUEUE {
            assert_eq!(outbox.send(&frame), Queued::Yes);
        }
        assert_eq!(outbox.send(&frame), Queued::QueueFull, "the queue is full");
        assert!(!outbox.is_attached());
        assert!(!outbox.replaced(second));
        assert_eq!(second_rx.len(), CLIENT_QUEUE);
    }

    #[tokio::test]
    async fn a_gap_notice_names_only_the_sessions_own_topics() {
        let router = Router::new(Duration::from_secs(10));
        let a = Arc::new(Outbox::default());
        let mut rx = a.attach().frames;
        router.add(1, &a, &topics(&["x"]));
        let b = Arc::new(Outbox::default());
        let mut rx_b = b.attach().frames;
        router.add(2, &b, &topics(&["y"]));
        let t = SystemTime::UNIX_EPOCH;
        router.notify_gap(&topics(&["x", "z"]), t, t + Duration::from_secs(1));
        let frame: serde_json::Value = serde_json::from_str(&rx.recv().await.unwrap().1).unwrap();
        assert_eq!(frame["topicName"], "handover.gap");
        assert_eq!(frame["eventBody"]["topics"], serde_json::json!(["x"]));
        assert_eq!(frame["eventBody"]["from"], "1970-01-01T00:00:00.000Z");
        assert!(rx_b.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_session_is_served_up_to_what_its_current_socket_wrote() {
        let outbox = Outbox::default();
        outbox.serve_from(10);
        let old = outbox.attach();
        assert_eq!(old.served, 10);
        outbox.written(old.generation, 12);
        let new = outbox.attach();
        assert_eq!(new.served, 12, "replayed from what the old socket wrote");
        outbox.written(old.generation, 20);
        assert_eq!(outbox.served_to(), 12, "a replaced socket moves nothing");
        outbox.written(new.generation, 15);
        outbox.serve_from(13);
        assert_eq!(outbox.served_to(), 15, "never backwards");
    }

    #[tokio::test]
    async fn a_dropped_frame_is_a_gap_only_if_no_stream_can_replay_it() {
        let outbox = Outbox::default();
        let frame = Utf8Bytes::from_static("{}");
        assert_eq!(outbox.send_at(5, &frame), Queued::NoSocket);
        assert!(
            outbox.attach().missed_since.is_some(),
            "no position in the stream: nothing to replay from"
        );
        let outbox = Outbox::default();
        outbox.serve_from(4);
        assert_eq!(outbox.send_at(5, &frame), Queued::NoSocket);
        let attached = outbox.attach();
        assert!(attached.missed_since.is_none(), "replayed instead");
        assert_eq!(attached.served, 4);
        outbox.detach(attached.generation);
        assert_eq!(outbox.send(&frame), Queued::NoSocket);
        assert!(outbox.attach().missed_since.is_some(), "no stream holds it");
    }
}
