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

/// Where the frames of one client session go: the socket currently open for it, if
/// any. A new socket replaces the old one; a socket that cannot keep up is cut off
/// (its queue is dropped, which ends its task) rather than buffered without bound.
#[derive(Default)]
pub struct Outbox {
    sender: ArcSwapOption<Attached>,
    generation: AtomicU64,
    /// Since when frames for this session were dropped (no socket open, or the socket
    /// was too slow): the next socket starts with a gap notice from then.
    missed_since: Mutex<Option<SystemTime>>,
}

struct Attached {
    generation: u64,
    tx: mpsc::Sender<Utf8Bytes>,
}

impl Outbox {
    /// Attaches a new socket, detaching any previous one. Returns the socket's
    /// generation, its queue, and since when frames were dropped, if any were.
    pub fn attach(&self) -> (u64, mpsc::Receiver<Utf8Bytes>, Option<SystemTime>) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        // Under the same lock as `unwritten_since`: a loss reported while a new
        // socket attaches reaches exactly one of them.
        let mut missed = self.missed_since.lock().unwrap_or_else(|p| p.into_inner());
        self.sender
            .store(Some(Arc::new(Attached { generation, tx })));
        (generation, rx, missed.take())
    }

    /// A socket went away with frames queued for it that it never wrote, perhaps since
    /// `since`: the session's current socket (a newer one) hears of the gap now, or
    /// else its next socket does. `gap` builds the notice.
    pub fn unwritten_since(&self, since: SystemTime, gap: impl FnOnce(SystemTime) -> Utf8Bytes) {
        let mut missed = self.missed_since.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.sender.load();
        let told = current
            .as_ref()
            .is_some_and(|attached| attached.tx.try_send(gap(since)).is_ok());
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

    /// Queues a frame for the socket. A frame that finds no socket open, or one too
    /// slow to take it, is dropped (and the next socket hears of the gap).
    pub fn send(&self, frame: &Utf8Bytes) -> Queued {
        let guard = self.sender.load();
        let Some(attached) = guard.as_ref() else {
            self.missed();
            return Queued::NoSocket;
        };
        let dropped = match attached.tx.try_send(frame.clone()) {
            Ok(()) => return Queued::Yes,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("client socket too slow: disconnecting it");
                self.detach(attached.generation);
                Queued::QueueFull
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::NoSocket,
        };
        self.missed();
        dropped
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

    /// Delivers an upstream event to the topic's subscribers, unless it was delivered
    /// already. Returns the number of sockets it was queued on.
    pub fn route(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes) -> usize {
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
            match route.outbox.send(frame) {
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
        let (_, rx, _) = outbox.attach();
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
        let (_, rx, _) = outbox.attach();
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
        let (first, mut first_rx, _) = outbox.attach();
        let (second, second_rx, _) = outbox.attach();
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
        let (_, mut rx, _) = a.attach();
        router.add(1, &a, &topics(&["x"]));
        let b = Arc::new(Outbox::default());
        let (_, mut rx_b, _) = b.attach();
        router.add(2, &b, &topics(&["y"]));
        let t = SystemTime::UNIX_EPOCH;
        router.notify_gap(&topics(&["x", "z"]), t, t + Duration::from_secs(1));
        let frame: serde_json::Value = serde_json::from_str(&rx.recv().await.unwrap()).unwrap();
        assert_eq!(frame["topicName"], "handover.gap");
        assert_eq!(frame["eventBody"]["topics"], serde_json::json!(["x"]));
        assert_eq!(frame["eventBody"]["from"], "1970-01-01T00:00:00.000Z");
        assert!(rx_b.try_recv().is_err());
    }
}
