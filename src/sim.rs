//! Simulated agent desktops, for the demo, the tests and the benches: each creates a
//! channel on the proxy as Genesys' SDKs do (`POST …/channels` with a `null` body,
//! `PUT …/subscriptions`), opens the returned connectUri, pings every second, and
//! records every event it receives by `(stream, seq)`, so that losses, duplicates and
//! disconnects can be counted exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{what}: {detail}")]
    Call { what: &'static str, detail: String },
}

fn call_error(what: &'static str, detail: impl ToString) -> SimError {
    SimError::Call {
        what,
        detail: detail.to_string(),
    }
}

/// What one desktop has seen.
#[derive(Default, Debug)]
pub struct Log {
    /// (stream, seq) → times received.
    pub events: BTreeMap<(u64, u64), u32>,
    /// `handover.gap` notices.
    pub gaps: Vec<Value>,
    /// Set when the socket closed: the close code, if there was one.
    pub closed: Option<Option<u16>>,
    /// Frames that are neither metadata, events nor gap notices.
    pub other: Vec<Value>,
}

/// A desktop connected through the proxy.
pub struct Desktop {
    pub channel: String,
    pub topics: BTreeSet<String>,
    pub log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Desktop {
    /// Creates a channel on the proxy at `base` (`http://host:port`), opens its
    /// socket, subscribes, and starts recording.
    pub async fn connect(
        http: &reqwest::Client,
        base: &str,
        topics: &[String],
    ) -> Result<Desktop, SimError> {
        let created: Value = http
            .post(format!("{base}/api/v2/notifications/channels"))
            .header("Content-Type", "application/json")
            .body("null")
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| call_error("create channel", e))?
            .json()
            .await
            .map_err(|e| call_error("create channel", e))?;
        let (Some(channel), Some(uri)) = (created["id"].as_str(), created["connectUri"].as_str())
        else {
            return Err(call_error("create channel", created));
        };
        let (socket, _) = tokio_tungstenite::connect_async(uri)
            .await
            .map_err(|e| call_error("connect", e))?;
        let body: Vec<Value> = topics.iter().map(|t| json!({ "id": t })).collect();
        let reply = http
            .put(format!(
                "{base}/api/v2/notifications/channels/{channel}/subscriptions"
            ))
            .json(&body)
            .send()
            .await
            .map_err(|e| call_error("subscribe", e))?;
        if !reply.status().is_success() {
            let status = reply.status();
            let body = reply.text().await.unwrap_or_default();
            return Err(call_error("subscribe", format!("{status}: {body}")));
        }
        let log = Arc::new(Mutex::new(Log::default()));
        let task = tokio::spawn(record(socket, log.clone()));
        Ok(Desktop {
            channel: channel.to_owned(),
            topics: topics.iter().cloned().collect(),
            log,
            task,
        })
    }

    /// Events of a stream this desktop should get: seq i goes to `topics[i % n]`.
    pub fn expected(
        &self,
        stream: u64,
        stream_topics: &[String],
        count: u64,
    ) -> BTreeSet<(u64, u64)> {
        (0..count)
            .filter(|i| {
                self.topics
                    .contains(&stream_topics[(*i % stream_topics.len() as u64) as usize])
            })
            .map(|i| (stream, i))
            .collect()
    }

    pub fn received(&self) -> BTreeMap<(u64, u64), u32> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .clone()
    }

    pub fn disconnected(&self) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed
            .is_some()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Losses, duplicates and unexpected events over a set of desktops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub delivered: usize,
}

/// Counts against `expected`; only sequence numbers below `settled_below` count as lost
/// (later ones may still be on their way).
pub fn tally(
    desktops: &[Desktop],
    expected: &dyn Fn(&Desktop) -> BTreeSet<(u64, u64)>,
    settled_below: u64,
) -> Tally {
    let mut tally = Tally::default();
    for desktop in desktops {
        let want = expected(desktop);
        let got = desktop.received();
        tally.lost += want
            .iter()
            .filter(|k| k.1 < settled_below && !got.contains_key(k))
            .count();
        tally.duplicated += got
            .values()
            .filter(|&&n| n > 1)
            .map(|&n| (n - 1) as usize)
            .sum::<usize>();
        tally.unexpected += got.keys().filter(|k| !want.contains(k)).count();
        tally.delivered += got.values().map(|&n| n as usize).sum::<usize>();
    }
    tally
}

async fn record(mut socket: Socket, log: Arc<Mutex<Log>>) {
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let closed = loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    match frame["topicName"].as_str() {
                        Some("channel.metadata") => {}
                        Some("handover.gap") => log.gaps.push(frame),
                        Some(_) if frame["eventBody"]["seq"].is_u64() => {
                            let key = (
                                frame["eventBody"]["stream"].as_u64().unwrap_or(0),
                                frame["eventBody"]["seq"].as_u64().unwrap_or(0),
                            );
                            *log.events.entry(key).or_default() += 1;
                        }
                        _ => log.other.push(frame),
                    }
                }
                Some(Ok(Message::Close(frame))) => break Some(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break Some(None),
            },
            // As third-party Genesys libraries do: an RFC 6455 ping every second.
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break Some(None);
                }
            }
        }
    };
    log.lock().unwrap_or_else(|p| p.into_inner()).closed = closed;
}
