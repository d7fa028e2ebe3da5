//! Publishing events: single events and paced streams. Every event carries a
//! sequence number and its send time (`sentAtUs`, microseconds since the Unix epoch)
//! in `eventBody`, so that tests and benches can count losses, duplicates and latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::Fake;
use super::state::correlation_id;

/// One event in Genesys' envelope, serialised once and shared by every socket.
pub fn event_frame(
    topic: &str,
    mut body: Map<String, Value>,
    seq: u64,
    stream: Option<u64>,
) -> Utf8Bytes {
    body.insert("seq".into(), seq.into());
    if let Some(stream) = stream {
        body.insert("stream".into(), stream.into());
    }
    body.insert("sentAtUs".into(), unix_micros().into());
    let frame = json!({
        "topicName": topic,
        "version": "2",
        "eventBody": body,
        "metadata": {"CorrelationId": correlation_id()},
    });
    Utf8Bytes::from(frame.to_string())
}

/// Microseconds since the Unix epoch: comparable across processes on one machine.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// A paced stream: `count` events at `rate` per second, event `i` on
/// `topics[i % topics.len()]` with `seq = i`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRequest {
    pub topics: Vec<String>,
    pub rate: f64,
    pub count: u64,
    #[serde(default)]
    pub body: Map<String, Value>,
}

/// How far a stream has got.
#[derive(Default)]
pub struct StreamProgress {
    pub count: u64,
    sent: AtomicU64,
    delivered: AtomicU64,
    done: AtomicBool,
    pub cancel: CancellationToken,
}

#[derive(Serialize)]
pub struct StreamStatus {
    pub count: u64,
    pub sent: u64,
    /// Sockets the events were queued on, summed over events.
    pub delivered: u64,
    pub done: bool,
}

impl StreamProgress {
    pub fn new(count: u64) -> Self {
        Self {
            count,
            ..Self::default()
        }
    }

    pub fn status(&self) -> StreamStatus {
        StreamStatus {
            count: self.count,
            sent: self.sent.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Acquire),
        }
    }
}

/// Publishes a stream on schedule; events due in the same instant go out together.
pub async fn run_stream(
    fake: Arc<Fake>,
    id: u64,
    request: StreamRequest,
    progress: Arc<StreamProgress>,
) {
    let start = Instant::now();
    let mut seq = 0;
    while seq < request.count {
        let due = start + Duration::from_secs_f64(seq as f64 / request.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = progress.cancel.cancelled() => break,
            _ = fake.shutdown.cancelled() => break,
        }
        let elapsed = start.elapsed().as_secs_f64();
        let target = ((elapsed * request.rate) as u64 + 1).min(request.count);
        let frames: Vec<(&str, Utf8Bytes)> = (seq..target.max(seq + 1))
            .map(|i| {
                let topic = request.topics[(i % request.topics.len() as u64) as usize].as_str();
                (topic, event_frame(topic, request.body.clone(), i, Some(id)))
            })
            .collect();
        let mut delivered = 0;
        {
            let mut state = fake.state();
            for (topic, frame) in &frames {
                delivered += state.publish(topic, frame);
            }
        }
        seq += frames.len() as u64;
        progress.sent.store(seq, Ordering::Relaxed);
        progress
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
    }
    progress.done.store(true, Ordering::Release);
}
