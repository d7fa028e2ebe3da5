//! Micro-benchmarks of the proxy's per-event hot path, each next to a baseline in the
//! same criterion group so the two are reported together and their ratio can be read
//! off (`cargo bench --bench core`; add e.g. `-- route` to run one group).
//!
//! - `frame_head/{classify,serde_value}/{event,heartbeat}`: reading `topicName` and
//!   `metadata.CorrelationId` (and, for `channel.metadata` frames, `eventBody.message`)
//!   from an upstream frame. `classify` is `handover::frame::classify`, which skips
//!   everything else without building a DOM; `serde_value` parses the same text into a
//!   `serde_json::Value` and reads the same fields. Inputs: a 619-byte conversation
//!   event as Genesys sends it (metadata last, after a nested `eventBody`) and the
//!   heartbeat frame. Throughput is in bytes of frame.
//! - `route/{router,mpsc_baseline}/N`: one event fanned out to N sessions.
//!   `router` is `Router::route` with N attached `Outbox`es subscribed to the topic,
//!   so it includes the dedup check, the subscriber lookup and N `Outbox::send`s;
//!   `mpsc_baseline` clones the frame N times into N plain tokio mpsc channels with
//!   `try_send`, which is what a fan-out minimally costs. Throughput is in deliveries
//!   (elements = N per event). Queues are drained every `CLIENT_QUEUE / 2` events,
//!   outside the timed region, so none ever fills (a full queue would detach the
//!   socket); dropping the delivered frames is untimed on both sides.
//! - `dedup/{route_first_sighting,route_duplicate}`: `Router::route` for a topic with
//!   no subscriber, for an event seen for the first time (dedup insert, then the
//!   subscriber lookup finds nobody) and for one seen before (dedup hit, dropped at
//!   once). The router here has no topic at all, so on the first-sighting path the
//!   subscriber lookup returns at once without hashing the topic. Baselines:
//!   `hashset_insert_new` / `hashset_insert_seen`, a plain `HashSet<u64>` insert of an
//!   already hashed key, new or present. The router's extra is hashing
//!   `(topic, CorrelationId)`, its mutex, `Instant::now()` and counters.
//!
//! Every event carries a distinct CorrelationId (the router would drop repeats),
//! taken from a pre-generated pool of `ID_POOL` UUIDs. When a router has seen the
//! whole pool it is replaced by a fresh one with the same subscribers, untimed, so the
//! dedup set holds between 0 and 64 Ki keys (about one 10 s window of an organisation
//! sending ~6,500 events per second; the previous window's set stays empty). The frame is a refcounted `Utf8Bytes` (built
//! from a `String`, like frames read off a socket), so a clone is an atomic increment.
//!
//! Reading the results: within a group, compare the lines with the same parameter;
//! ours/baseline > 1 is what the proxy adds on top of the minimum. `route` per-element
//! throughput shows how the per-subscriber cost amortises the per-event constant.

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use handover::frame::{self, UpstreamFrame};
use handover::router::{CLIENT_QUEUE, Outbox, Router};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The topic of [`EVENT`].
const TOPIC: &str = "v2.users.6f2c5d1e-8a3b-4c7d-9e0f-1a2b3c4d5e6f.conversations.calls";

/// A call-conversation event for one user, shaped like Genesys sends it.
const EVENT: &str = concat!(
    r#"{"topicName":"v2.users.6f2c5d1e-8a3b-4c7d-9e0f-1a2b3c4d5e6f.conversations.calls","#,
    r#""version":"2","eventBody":{"id":"3d9a1c7e-52b4-4f0e-8a61-7c2e9b0d4f13","#,
    r#""participants":[{"id":"a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d","#,
    r#""startTime":"2024-05-14T09:12:03.512Z","#,
    r#""purpose":"customer","state":"connected","direction":"inbound","held":false},"#,
    r#"{"id":"b7e8f9a0-1b2c-4d3e-9f4a-5b6c7d8e9f0a","#,
    r#""userId":"6f2c5d1e-8a3b-4c7d-9e0f-1a2b3c4d5e6f","#,
    r#""queue":{"id":"c0ffee00-1234-4abc-9def-0123456789ab"},"#,
    r#""purpose":"agent","state":"alerting","#,
    r#""direction":"inbound","held":false}]},"#,
    r#""metadata":{"CorrelationId":"5e1f0c2a-9b8d-4e7f-a6c5-3d2e1f0a9b8c"}}"#,
);

const EVENT_CORRELATION_ID: &str = "5e1f0c2a-9b8d-4e7f-a6c5-3d2e1f0a9b8c";

/// Correlation ids per router: see the module doc.
const ID_POOL: usize = 64 * 1024;

/// Events routed between two drains of the client queues.
const DRAIN_EVERY: usize = CLIENT_QUEUE / 2;

/// Long enough that no window turns over during a run: the router is replaced instead.
const DEDUP_WINDOW: Duration = Duration::from_secs(3600);

/// `ID_POOL` distinct UUID-shaped ids (36 bytes, like real CorrelationIds).
fn correlation_ids() -> Vec<String> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let ids: Vec<String> = (0..ID_POOL)
        .map(|_| {
            let (a, b) = (next(), next());
            format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0xfff,
                0x8000 | (b >> 48) & 0x3fff,
                b & 0xffff_ffff_ffff
            )
        })
        .collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ID_POOL,
        "ids are distinct"
    );
    ids
}

/// The DOM baseline: what `classify` reads, read from a `serde_json::Value`.
fn classify_via_value(text: &str) -> usize {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return 0;
    };
    let topic = value.get("topicName").and_then(Value::as_str);
    let read = if topic == Some("channel.metadata") {
        value
            .get("eventBody")
            .and_then(|b| b.get("message"))
            .and_then(Value::as_str)
    } else {
        value
            .get("metadata")
            .and_then(|m| m.get("CorrelationId"))
            .and_then(Value::as_str)
    };
    black_box(topic).map_or(0, str::len) + black_box(read).map_or(0, str::len)
}

fn frame_head(c: &mut Criterion) {
    assert_eq!(
        frame::classify(EVENT),
        UpstreamFrame::Event {
            topic: TOPIC.into(),
            correlation_id: Some(EVENT_CORRELATION_ID.into()),
        }
    );
    assert_eq!(frame::classify(frame::HEARTBEAT), UpstreamFrame::Heartbeat);
    assert_eq!(
        classify_via_value(EVENT),
        TOPIC.len() + EVENT_CORRELATION_ID.len()
    );
    assert_eq!(
        classify_via_value(frame::HEARTBEAT),
        "channel.metadata".len() + "WebSocket Heartbeat".len()
    );

    let mut group = c.benchmark_group("frame_head");
    for (name, text) in [("event", EVENT), ("heartbeat", frame::HEARTBEAT)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new("classify", name), text, |b, text| {
            b.iter(|| frame::classify(black_box(text)))
        });
        group.bench_with_input(BenchmarkId::new("serde_value", name), text, |b, text| {
            b.iter(|| classify_via_value(black_box(text)))
        });
    }
    group.finish();
}

/// A router with `subscribers` attached sessions on [`TOPIC`], and their queues.
struct Fanout {
    topics: Vec<String>,
    frame: Utf8Bytes,
    outboxes: Vec<Arc<Outbox>>,
    queues: Vec<mpsc::Receiver<handover::router::QueuedFrame>>,
    router: Router,
    /// How many ids of the pool `router` has seen.
    seen: usize,
}

impl Fanout {
    fn new(subscribers: usize) -> Self {
        let mut outboxes = Vec::with_capacity(subscribers);
        let mut queues = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            let outbox = Arc::new(Outbox::default());
            queues.push(outbox.attach().frames);
            outboxes.push(outbox);
        }
        let mut fanout = Self {
            topics: vec![TOPIC.to_string()],
            frame: Utf8Bytes::from(EVENT.to_string()),
            outboxes,
            queues,
            router: Router::new(DEDUP_WINDOW),
            seen: 0,
        };
        fanout.fresh_router();
        fanout
    }

    /// Replaces the router (and so its dedup memory), keeping the subscribers.
    fn fresh_router(&mut self) {
        self.router = Router::new(DEDUP_WINDOW);
        for (session, outbox) in self.outboxes.iter().enumerate() {
            self.router.add(session as u64, outbox, &self.topics);
        }
        self.seen = 0;
    }

    /// Routes `iters` first sightings; returns the time spent in `route` alone.
    fn route_new(&mut self, ids: &[String], iters: u64) -> Duration {
        let mut left = iters as usize;
        let mut elapsed = Duration::ZERO;
        while left > 0 {
            if self.seen == ids.len() {
                self.fresh_router();
            }
            let chunk = &ids[self.seen..(self.seen + left.min(DRAIN_EVERY)).min(ids.len())];
            let mut delivered = 0;
            let start = Instant::now();
            for id in chunk {
                delivered += self
                    .router
                    .route(black_box(TOPIC), Some(black_box(id)), &self.frame);
            }
            elapsed += start.elapsed();
            assert_eq!(delivered, chunk.len() * self.outboxes.len(), "nothing lost");
            self.seen += chunk.len();
            left -= chunk.len();
            self.drain();
        }
        elapsed
    }

    /// Routes `iters` events the router has seen already (all of `ids`, routed once
    /// beforehand); returns the time spent in `route` alone.
    fn route_seen(&mut self, ids: &[String], iters: u64) -> Duration {
        let mut left = iters as usize;
        let mut elapsed = Duration::ZERO;
        let mut at = 0;
        while left > 0 {
            let chunk = &ids[at..(at + left.min(DRAIN_EVERY)).min(ids.len())];
            let mut delivered = 0;
            let start = Instant::now();
            for id in chunk {
                delivered += self
                    .router
                    .route(black_box(TOPIC), Some(black_box(id)), &self.frame);
            }
            elapsed += start.elapsed();
            assert_eq!(delivered, 0, "duplicates are dropped");
            at = (at + chunk.len()) % ids.len();
            left -= chunk.len();
        }
        elapsed
    }

    fn drain(&mut self) {
        for queue in &mut self.queues {
            while queue.try_recv().is_ok() {}
        }
    }
}

/// The fan-out baseline: `subscribers` plain tokio mpsc channels.
struct PlainFanout {
    frame: Utf8Bytes,
    senders: Vec<mpsc::Sender<handover::router::QueuedFrame>>,
    queues: Vec<mpsc::Receiver<handover::router::QueuedFrame>>,
}

impl PlainFanout {
    fn new(subscribers: usize) -> Self {
        let (senders, queues) = (0..subscribers)
            .map(|_| mpsc::channel(CLIENT_QUEUE))
            .unzip();
        Self {
            frame: Utf8Bytes::from(EVENT.to_string()),
            senders,
            queues,
        }
    }

    fn send(&mut self, iters: u64) -> Duration {
        let mut left = iters as usize;
        let mut elapsed = Duration::ZERO;
        while left > 0 {
            let chunk = left.min(DRAIN_EVERY);
            let mut delivered = 0;
            let start = Instant::now();
            for _ in 0..chunk {
                let frame = black_box(&self.frame);
                for sender in &self.senders {
                    if sender.try_send((1, frame.clone())).is_ok() {
                        delivered += 1;
                    }
                }
            }
            elapsed += start.elapsed();
            assert_eq!(delivered, chunk * self.senders.len(), "nothing lost");
            left -= chunk;
            for queue in &mut self.queues {
                while queue.try_recv().is_ok() {}
            }
        }
        elapsed
    }
}

fn route(c: &mut Criterion) {
    let ids = correlation_ids();
    let mut group = c.benchmark_group("route");
    for subscribers in [1, 100, 1000] {
        group.throughput(Throughput::Elements(subscribers as u64));
        let mut ours = Fanout::new(subscribers);
        group.bench_function(BenchmarkId::new("router", subscribers), |b| {
            b.iter_custom(|iters| ours.route_new(&ids, iters))
        });
        let metrics = &ours.router.metrics;
        assert_eq!(
            metrics.dropped_no_socket.get() + metrics.dropped_queue_full.get(),
            0
        );
        assert_eq!(metrics.events_deduplicated.get(), 0);
        assert!(ours.outboxes.iter().all(|o| o.is_attached()));
        drop(ours);

        let mut baseline = PlainFanout::new(subscribers);
        group.bench_function(BenchmarkId::new("mpsc_baseline", subscribers), |b| {
            b.iter_custom(|iters| baseline.send(iters))
        });
    }
    group.finish();
}

fn dedup(c: &mut Criterion) {
    let ids = correlation_ids();
    let mut group = c.benchmark_group("dedup");
    group.throughput(Throughput::Elements(1));

    let mut first = Fanout::new(0);
    group.bench_function("route_first_sighting", |b| {
        b.iter_custom(|iters| first.route_new(&ids, iters))
    });
    drop(first);

    let mut seen = Fanout::new(0);
    for id in &ids {
        seen.router.route(TOPIC, Some(id), &seen.frame);
    }
    assert_eq!(seen.router.metrics.events_deduplicated.get(), 0);
    group.bench_function("route_duplicate", |b| {
        b.iter_custom(|iters| seen.route_seen(&ids, iters))
    });
    let routed = &seen.router.metrics;
    assert_eq!(
        routed.events_received.get() - routed.events_deduplicated.get(),
        ID_POOL as u64,
        "every timed call took the duplicate path"
    );
    drop(seen);

    // The router's key: (topic, CorrelationId) through `DefaultHasher`, computed
    // beforehand; the set hashes it again with its `RandomState`, as the router's does.
    let keys: Vec<u64> = ids
        .iter()
        .map(|id| {
            let mut hasher = DefaultHasher::new();
            (TOPIC, id.as_str()).hash(&mut hasher);
            hasher.finish()
        })
        .collect();

    let mut set = HashSet::new();
    let mut next = 0;
    group.bench_function("hashset_insert_new", |b| {
        b.iter_custom(|iters| {
            let mut left = iters as usize;
            let mut elapsed = Duration::ZERO;
            while left > 0 {
                if next == keys.len() {
                    set = HashSet::new();
                    next = 0;
                }
                let chunk = &keys[next..(next + left).min(keys.len())];
                let start = Instant::now();
                for &key in chunk {
                    black_box(set.insert(black_box(key)));
                }
                elapsed += start.elapsed();
                next += chunk.len();
                left -= chunk.len();
            }
            elapsed
        })
    });

    let full: HashSet<u64> = keys.iter().copied().collect();
    let mut set = full.clone();
    let mut at = 0;
    group.bench_function("hashset_insert_seen", |b| {
        b.iter_custom(|iters| {
            let mut left = iters as usize;
            let mut elapsed = Duration::ZERO;
            while left > 0 {
                let chunk = &keys[at..(at + left).min(keys.len())];
                let start = Instant::now();
                for &key in chunk {
                    black_box(set.insert(black_box(key)));
                }
                elapsed += start.elapsed();
                at = (at + chunk.len()) % keys.len();
                left -= chunk.len();
            }
            elapsed
        })
    });
    assert_eq!(set, full);
    group.finish();
}

criterion_group!(benches, frame_head, route, dedup);
criterion_main!(benches);
