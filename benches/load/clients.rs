//! Load clients: many notification sockets, each subscribed to one topic, recording
//! for every event its latency (receive time minus the `sentAtUs` the fake stamped)
//! and its sequence number, so that losses and duplicates are counted exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How a client reaches its channel.
#[derive(Clone)]
pub struct Route {
    /// Where channels are created: the fake (with a token) or the proxy (without).
    pub api: String,
    pub token: Option<String>,
    /// Where sockets go instead of the connectUri's host (nginx in front of the fake).
    pub socket_host: Option<String>,
}

impl Route {
    pub fn proxy(api: &str) -> Route {
        Route {
            api: api.to_owned(),
            token: None,
            socket_host: None,
        }
    }
}

/// What clients record: every delivery, or just a count (fan-out, where parsing
/// would make the clients the bottleneck).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    Full,
    CountOnly,
}

/// Everything one client saw.
#[derive(Default)]
pub struct Seen {
    /// (milliseconds since the run's start, latency in µs) per delivery.
    pub samples: Vec<(u32, u32)>,
    /// Times each sequence number of the stream arrived.
    pub seq_counts: Vec<u8>,
    pub disconnected: bool,
    /// Text frames received, and when the first and last arrived (µs since the epoch).
    pub frames: u64,
    pub first_us: u64,
    pub last_us: u64,
}

pub struct ClientSet {
    tasks: Vec<(usize, JoinHandle<Seen>)>,
    stop: CancellationToken,
    pub frames: Arc<FrameClock>,
    pub connect_seconds: f64,
}

/// Frames received so far by all clients, for progress (updated in batches, so
/// that a thousand clients do not contend on one counter).
#[derive(Default)]
pub struct FrameClock {
    count: AtomicU64,
}

impl FrameClock {
    pub fn frames(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Frames per second over a finished set, between the first and the last frame any
/// client received.
pub fn frame_rate(seen: &[(usize, Seen)]) -> f64 {
    let frames: u64 = seen.iter().map(|(_, s)| s.frames).sum();
    let first = seen
        .iter()
        .filter(|(_, s)| s.frames > 0)
        .map(|(_, s)| s.first_us)
        .min()
        .unwrap_or(0);
    let last = seen.iter().map(|(_, s)| s.last_us).max().unwrap_or(0);
    frames as f64 / (last.saturating_sub(first).max(1) as f64 / 1e6)
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "eventBody")]
    event_body: Option<Body>,
}

#[derive(Deserialize)]
struct Body {
    seq: Option<u64>,
    #[serde(rename = "sentAtUs")]
    sent_at_us: Option<u64>,
}

/// Which clients to open and what they record.
pub struct Plan<'a> {
    pub clients: usize,
    /// Client `i` subscribes to `topics[i % topics.len()]`.
    pub topics: &'a [String],
    /// Sizes the sequence-number table.
    pub stream_len: u64,
    /// The origin of the samples' timestamps.
    pub start: Instant,
    pub recording: Recording,
}

impl ClientSet {
    /// Opens the plan's clients, spread over `routes` so that each topic's clients
    /// are on every route (several replicas of one fleet each carry every topic).
    pub async fn open(
        http: &reqwest::Client,
        routes: &[Route],
        plan: Plan<'_>,
        progress: &dyn Fn(usize),
    ) -> anyhow::Result<ClientSet> {
        let Plan {
            clients: count,
            topics,
            stream_len,
            start,
            recording,
        } = plan;
        let stop = CancellationToken::new();
        let frames = Arc::new(FrameClock::default());
        let gate = Arc::new(Semaphore::new(64));
        let began = Instant::now();
        let mut opening = Vec::new();
        for i in 0..count {
            let topic = topics[i % topics.len()].clone();
            let route = routes[(i / topics.len()) % routes.len()].clone();
            let (http, gate) = (http.clone(), gate.clone());
            opening.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                connect(&http, &route, &topic).await
            }));
        }
        let mut tasks = Vec::new();
        for (i, join) in opening.into_iter().enumerate() {
            let socket = join.await??;
            let (stop, frames) = (stop.clone(), frames.clone());
            tasks.push((
                i,
                tokio::spawn(record(socket, stream_len, start, recording, stop, frames)),
            ));
            if i % 100 == 99 {
                progress(i + 1);
            }
        }
        Ok(ClientSet {
            tasks,
            stop,
            frames,
            connect_seconds: began.elapsed().as_secs_f64(),
        })
    }

    /// Stops the clients and collects what they saw, with each client's index.
    pub async fn finish(self) -> Vec<(usize, Seen)> {
        self.stop.cancel();
        let mut seen = Vec::new();
        for (i, task) in self.tasks {
            seen.push((i, task.await.unwrap_or_default()));
        }
        seen
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(http: &reqwest::Client, route: &Route, topic: &str) -> anyhow::Result<Socket> {
    let api = &route.api;
    let authorised = |request: reqwest::RequestBuilder| match &route.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let created: Value = authorised(http.post(format!("{api}/api/v2/notifications/channels")))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"].as_str().unwrap_or_default();
    let subscribed = authorised(http.put(format!(
        "{api}/api/v2/notifications/channels/{id}/subscriptions"
    )))
    .json(&json!([{ "id": topic }]))
    .send()
    .await?;
    let status = subscribed.status();
    anyhow::ensure!(
        status.is_success(),
        "subscribing: {status} {}",
        subscribed.text().await.unwrap_or_default()
    );
    let uri = match &route.socket_host {
        Some(host) => format!("ws://{host}/channels/{id}"),
        None => created["connectUri"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    };
    let config = handover::ws::socket_config();
    let (socket, _) = tokio_tungstenite::connect_async_with_config(uri, Some(config), true).await?;
    Ok(socket)
}

async fn record(
    mut socket: Socket,
    stream_len: u64,
    start: Instant,
    recording: Recording,
    stop: CancellationToken,
    frames: Arc<FrameClock>,
) -> Seen {
    let mut seen = Seen {
        seq_counts: if recording == Recording::Full {
            vec![0; stream_len as usize]
        } else {
            Vec::new()
        },
        ..Seen::default()
    };
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            _ = stop.cancelled() => break,
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                let now = handover::mock::unix_micros();
                if seen.frames == 0 {
                    seen.first_us = now;
                }
                seen.last_us = now;
                seen.frames += 1;
                if seen.frames.is_multiple_of(PROGRESS_BATCH) {
                    frames.count.fetch_add(PROGRESS_BATCH, Ordering::Relaxed);
                }
                if recording == Recording::CountOnly {
                    continue;
                }
                let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                    continue;
                };
                let Some(Body {
                    seq: Some(seq),
                    sent_at_us: Some(sent),
                }) = frame.event_body
                else {
                    continue;
                };
                let at_ms = start.elapsed().as_millis() as u32;
                seen.samples.push((at_ms, now.saturating_sub(sent) as u32));
                if let Some(count) = seen.seq_counts.get_mut(seq as usize) {
                    *count = count.saturating_add(1);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                seen.disconnected = true;
                break;
            }
        }
    }
    frames
        .count
        .fetch_add(seen.frames % PROGRESS_BATCH, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_millis(200), socket.close(None)).await;
    seen
}

const PROGRESS_BATCH: u64 = 64;
