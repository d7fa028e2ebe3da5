//! The soak's desktops. Each behaves as an SDK-based desktop does: it creates a
//! channel, opens its socket, subscribes, pings every second, and when its socket
//! closes it reconnects to the same `connectUri` (or makes a new channel on a 404).
//! A refused subscription is retried. The soak can make one stop reading for a
//! while (a stalled client), and make one leave abruptly, mid-request or not.
//!
//! Every event received is recorded with the time it was sent and received, and
//! every gap notice with its bounds, so that the judge can tell a lost event from
//! one inside an announced gap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the soak asks of a desktop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Normal,
    /// Read nothing until then.
    Stalled {
        until: tokio::time::Instant,
    },
    /// Leave now (close the socket, or drop a request in flight).
    Leave,
}

/// A gap notice as received.
#[derive(Clone, Debug)]
pub struct GapNotice {
    pub from: SystemTime,
    pub to: SystemTime,
    pub topics: Vec<String>,
    pub received: SystemTime,
}

/// One received event.
#[derive(Clone, Copy, Debug)]
pub struct Receipt {
    pub count: u32,
    /// When the fake sent it (`sentAtUs`).
    pub sent: SystemTime,
    pub received: SystemTime,
}

/// Everything one desktop saw.
#[derive(Debug, Default)]
pub struct Log {
    /// Since when its subscription held (its subscribe call answered 200).
    pub subscribed_at: Option<SystemTime>,
    /// When it left (no event is expected after).
    pub left_at: Option<SystemTime>,
    /// (stream, seq) → receipt.
    pub events: HashMap<(u64, u64), Receipt>,
    pub gaps: Vec<GapNotice>,
    /// Its socket closed under it (not by its own leaving): close code, and when.
    pub closes: Vec<(Option<u16>, SystemTime)>,
    /// When it stopped reading on purpose, and for how long.
    pub stalls: Vec<(SystemTime, Duration)>,
    /// Subscription calls refused (and retried).
    pub refusals: u32,
    /// Times it had to make a new channel (its own was unknown).
    pub new_channels: u32,
    /// Frames it could not account for (neither metadata, event nor gap notice).
    pub other: Vec<Value>,
}

/// A desktop run by the soak.
pub struct Desktop {
    pub topics: Vec<String>,
    pub log: Arc<Mutex<Log>>,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Desktop {
    /// Starts a desktop on the proxy at `base` (`http://host:port`).
    pub fn start(http: reqwest::Client, base: String, topics: Vec<String>) -> Desktop {
        let log = Arc::new(Mutex::new(Log::default()));
        let (mode, watching) = watch::channel(Mode::Normal);
        let task = tokio::spawn(live(http, base, topics.clone(), log.clone(), watching));
        Desktop {
            topics,
            log,
            mode,
            task,
        }
    }

    pub fn stall(&self, for_: Duration) {
        self.log().stalls.push((SystemTime::now(), for_));
        let _ = self.mode.send(Mode::Stalled {
            until: tokio::time::Instant::now() + for_,
        });
    }

    /// Leaves at once, whatever it is doing; waits until it has.
    pub async fn leave(self) -> Arc<Mutex<Log>> {
        let _ = self.mode.send(Mode::Leave);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.left_at.get_or_insert_with(SystemTime::now);
        drop(log);
        self.log
    }

    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The desktop's life. Returns when it leaves.
async fn live(
    http: reqwest::Client,
    base: String,
    topics: Vec<String>,
    log: Arc<Mutex<Log>>,
    mut mode: watch::Receiver<Mode>,
) {
    let leaving = |mode: &watch::Receiver<Mode>| *mode.borrow() == Mode::Leave;
    'channel: loop {
        // A channel and its socket.
        let Some((id, uri)) = until_left(&mut mode, create(&http, &base)).await else {
            return;
        };
        let Some(mut socket) = until_left(&mut mode, connect(&uri)).await.flatten() else {
            if leaving(&mode) {
                return;
            }
            continue;
        };
        // Subscribe (retrying refusals) while reading the socket.
        let body: Vec<Value> = topics.iter().map(|t| json!({ "id": t })).collect();
        loop {
            let put = http
                .put(format!(
                    "{base}/api/v2/notifications/channels/{id}/subscriptions"
                ))
                .json(&body)
                .send();
            let answered = tokio::select! {
                answered = put => answered,
                _ = mode.wait_for(|m| *m == Mode::Leave) => return,
            };
            match answered {
                Ok(reply) if reply.status().is_success() => {
                    lock(&log).subscribed_at.get_or_insert_with(SystemTime::now);
                    break;
                }
                Ok(reply) if reply.status() == reqwest::StatusCode::NOT_FOUND => {
                    lock(&log).new_channels += 1;
                    continue 'channel;
                }
                _ => {
                    lock(&log).refusals += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        // Read, reconnecting to the same channel whenever the socket closes.
        loop {
            let closed = read(&mut socket, &log, &mut mode).await;
            match closed {
                None => {
                    let _ = socket.close(None).await;
                    return;
                }
                Some(code) => lock(&log).closes.push((code, SystemTime::now())),
            }
            loop {
                match until_left(&mut mode, reconnect(&uri)).await {
                    None => return,
                    Some(Reconnect::Open(reopened)) => {
                        socket = *reopened;
                        break;
                    }
                    Some(Reconnect::Gone) => {
                        lock(&log).new_channels += 1;
                        continue 'channel;
                    }
                    Some(Reconnect::Failed) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` unless the desktop is told to leave first (then `None`: a request
/// abandoned mid-way).
async fn until_left<T>(
    mode: &mut watch::Receiver<Mode>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        _ = mode.wait_for(|m| *m == Mode::Leave) => None,
    }
}

async fn create(http: &reqwest::Client, base: &str) -> (String, String) {
    loop {
        let created = http
            .post(format!("{base}/api/v2/notifications/channels"))
            .header("Content-Type", "application/json")
            .body("null")
            .send()
            .await;
        if let Ok(reply) = created
            && let Ok(value) = reply.json::<Value>().await
            && let (Some(id), Some(uri)) = (value["id"].as_str(), value["connectUri"].as_str())
        {
            return (id.to_owned(), uri.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn connect(uri: &str) -> Option<Socket> {
    tokio_tungstenite::connect_async(uri)
        .await
        .ok()
        .map(|(socket, _)| socket)
}

enum Reconnect {
    Open(Box<Socket>),
    /// The channel is unknown (404): make a new one.
    Gone,
    Failed,
}

async fn reconnect(uri: &str) -> Reconnect {
    match tokio_tungstenite::connect_async(uri).await {
        Ok((socket, _)) => Reconnect::Open(Box::new(socket)),
        Err(tokio_tungstenite::tungstenite::Error::Http(response))
            if response.status() == http::StatusCode::NOT_FOUND =>
        {
            Reconnect::Gone
        }
        Err(_) => Reconnect::Failed,
    }
}

/// Reads until the socket closes (`Some(code)`) or the desktop leaves (`None`).
async fn read(
    socket: &mut Socket,
    log: &Mutex<Log>,
    mode: &mut watch::Receiver<Mode>,
) -> Option<Option<u16>> {
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Leave => return None,
            // Read nothing meanwhile: the proxy must buffer, or cut us off and tell
            // us of the gap when we are back.
            Mode::Stalled { until } if tokio::time::Instant::now() < until => {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = mode.changed() => {}
                }
                continue;
            }
            Mode::Stalled { .. } | Mode::Normal => {}
        }
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => record(&text, log),
                Some(Ok(Message::Close(frame))) => return Some(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Some(None),
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return Some(None);
                }
            }
            _ = mode.changed() => {}
        }
    }
}

fn record(text: &str, log: &Mutex<Log>) {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let now = SystemTime::now();
    let mut log = lock(log);
    match frame["topicName"].as_str() {
        Some("channel.metadata") => {}
        Some("handover.gap") => {
            let body = &frame["eventBody"];
            let time = |key: &str| {
                body[key]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
            };
            if let (Some(from), Some(to)) = (time("from"), time("to")) {
                let topics = body["topics"]
                    .as_array()
                    .map(|t| {
                        t.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                log.gaps.push(GapNotice {
                    from,
                    to,
                    topics,
                    received: now,
                });
            } else {
                log.other.push(frame);
            }
        }
        Some(_) if frame["eventBody"]["seq"].is_u64() => {
            let body = &frame["eventBody"];
            let key = (
                body["stream"].as_u64().unwrap_or(0),
                body["seq"].as_u64().unwrap_or(0),
            );
            let sent = SystemTime::UNIX_EPOCH
                + Duration::from_micros(body["sentAtUs"].as_u64().unwrap_or(0));
            log.events
                .entry(key)
                .and_modify(|r| r.count += 1)
                .or_insert(Receipt {
                    count: 1,
                    sent,
                    received: now,
                });
        }
        _ => log.other.push(frame),
    }
}
