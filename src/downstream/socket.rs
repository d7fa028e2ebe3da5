//! A client's WebSocket: upstream frames from its outbox, the proxy's own
//! heartbeats, `{"message":"ping"}` → pong, and in-band `{"message":"subscribe"}`.
//!
//! The socket is read continuously, so RFC 6455 pings (some libraries send one a
//! second and give up after a second without a pong) are always answered. In-band
//! subscribes are carried out one at a time, in order, as Genesys does; a client that
//! queues more than [`MAX_QUEUED_SUBSCRIBES`] is not read until one finishes.
//!
//! Closes follow RFC 6455 both ways: a client's Close is answered with a Close before
//! the connection ends, and a close the proxy starts (1000 replaced, 1001 shutting
//! down, 1013 too slow) carries its code and reason and waits briefly for the
//! client's answer, so that client libraries report that code, never 1006.

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::sessions::{Change, ClientChannel};
use super::subscribe::Subscriptions;
use crate::drain::Drain;
use crate::fleet::directory::Directory;
use crate::frame;
use crate::router::{NOT_IN_STREAM, Offset, QueuedFrame, gap_frame};
use crate::ws::ServerSocket;

/// Most frames written before one flush, so that a burst costs few syscalls.
const BATCH: usize = 64;
/// In-band subscribes waiting behind the one in progress before the socket stops
/// being read.
pub const MAX_QUEUED_SUBSCRIBES: usize = 8;
/// How long a close waits for the client's Close (and a slow client's writes).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A write that cannot complete for this long means the client stopped reading (its
/// TCP window is shut): the connection is dropped rather than held forever.
const WRITE_STALL: Duration = Duration::from_secs(10);

pub struct ClientSocket {
    pub channel: Arc<ClientChannel>,
    /// In-band subscribes go through the same policy and limits as REST ones.
    pub subscriptions: Arc<Subscriptions>,
    /// The peer on this socket, charged for its in-band subscribes.
    pub peer: IpAddr,
    pub heartbeat: Duration,
    pub shutdown: CancellationToken,
    pub drain: Arc<Drain>,
    /// With `[cluster]` (and a channel that outlives its socket): the fleet's
    /// directory hears how far the socket served the channel before the desktop is
    /// told to go, so that wherever it reconnects it is replayed from there.
    pub directory: Option<Arc<Directory>>,
}

/// A text frame from a client, as far as the proxy cares.
#[derive(Debug, PartialEq)]
pub enum InBand {
    /// `{"message":"ping"}`: answered with a pong.
    Ping,
    /// `{"message":"subscribe","topics":[…],"correlationId":…}`.
    Subscribe {
        topics: Option<Vec<String>>,
        correlation_id: Value,
    },
    /// Anything else is ignored, as Genesys ignores it.
    Other,
}

/// Reads a client's text frame.
pub fn in_band(text: &str) -> InBand {
    if frame::is_ping(text) {
        return InBand::Ping;
    }
    #[derive(Deserialize)]
    struct Request {
        message: String,
        topics: Option<Value>,
        #[serde(rename = "correlationId")]
        correlation_id: Option<Value>,
    }
    match serde_json::from_str::<Request>(text) {
        Ok(request) if request.message == "subscribe" => InBand::Subscribe {
            // Topics that are not a list of names count as missing (answered 400).
            topics: request
                .topics
                .and_then(|topics| serde_json::from_value(topics).ok()),
            correlation_id: request.correlation_id.unwrap_or(Value::Null),
        },
        _ => InBand::Other,
    }
}

/// How the serve loop ended.
enum End {
    /// The client sent a Close (with this code, if any): answer it.
    ClosedByClient(Option<u16>),
    /// The connection is gone (or failed): nothing more can be said.
    Gone,
    /// The proxy closes, with this code and reason.
    Close(CloseCode, &'static str),
}

type Answer = Pin<Box<dyn Future<Output = Utf8Bytes> + Send>>;

impl ClientSocket {
    /// Serves the socket until it ends: first `replay` (what the session missed, from
    /// the fleet's stream), then its live frames.
    pub async fn serve(
        self,
        mut socket: ServerSocket,
        generation: u64,
        mut outbox: mpsc::Receiver<QueuedFrame>,
        replay: Vec<QueuedFrame>,
    ) {
        self.channel.socket_opened();
        let mut unwritten_direct = false;
        let mut write_failed = false;
        for chunk in replay.chunks(BATCH) {
            let mut written = Written::default();
            let mut frames = chunk.iter().cloned();
            if !within_stall(write_frames(&mut socket, &mut frames, &mut written)).await {
                write_failed = true;
                break;
            }
            self.channel.outbox.written(generation, written.offset);
        }
        let mut heartbeats =
            tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut queued: VecDeque<(Option<Vec<String>>, Value)> = VecDeque::new();
        let mut in_progress: Option<Answer> = None;
        // Frames queued after this may not have reached the client if the socket ends
        // before the next successful write.
        let mut written_until = SystemTime::now();
        // When the proxy stops, this socket closes at its own turn within the drain.
        let _open = self.drain.open_socket();
        let drain_turn = self.drain.turn();
        tokio::pin!(drain_turn);
        let end = loop {
            if write_failed {
                break End::Gone;
            }
            if in_progress.is_none()
                && let Some((topics, correlation_id)) = queued.pop_front()
            {
                in_progress = Some(Box::pin(self.subscribe(topics, correlation_id)));
            }
            let reading = queued.len() < MAX_QUEUED_SUBSCRIBES;
            tokio::select! {
                queued_frame = outbox.recv() => {
                    let Some(first) = queued_frame else {
                        break if self.channel.outbox.replaced(generation) {
                            End::Close(CloseCode::Normal, "replaced by a newer connection")
                        } else {
                            End::Close(CloseCode::Again, "client too slow: reconnect")
                        };
                    };
                    let mut written = Written::default();
                    let mut frames = std::iter::once(first)
                        .chain(std::iter::from_fn(|| outbox.try_recv().ok()))
                        .take(BATCH);
                    if !within_stall(write_frames(&mut socket, &mut frames, &mut written)).await {
                        unwritten_direct = written.direct;
                        write_failed = true;
                        break End::Gone;
                    }
                    self.channel.outbox.written(generation, written.offset);
                    if outbox.is_empty() {
                        written_until = SystemTime::now();
                    }
                }
                message = socket.next(), if reading => match message {
                    Some(Ok(Message::Text(text))) => match in_band(&text) {
                        InBand::Ping => {
                            if !within_stall(socket.send(Message::text(frame::PONG))).await {
                                break End::Gone;
                            }
                        }
                        InBand::Subscribe { topics, correlation_id } => {
                            queued.push_back((topics, correlation_id));
                        }
                        InBand::Other => {}
                    },
                    Some(Ok(Message::Close(frame))) => {
                        break End::ClosedByClient(frame.map(|f| u16::from(f.code)));
                    }
                    Some(Err(_)) | None => break End::Gone,
                    Some(Ok(_)) => {}
                },
                answer = async { in_progress.as_mut().expect("guarded").await }, if in_progress.is_some() => {
                    in_progress = None;
                    if !within_stall(socket.send(Message::Text(answer))).await {
                        break End::Gone;
                    }
                }
                _ = heartbeats.tick() => {
                    if !within_stall(socket.send(Message::text(frame::HEARTBEAT))).await {
                        break End::Gone;
                    }
                }
                // 1012 and not 1001: clients treat 1001 as a normal end and stop,
                // 1012 as a failure to reconnect from (README, "Stopping").
                _ = &mut drain_turn => break End::Close(CloseCode::Restart, "proxy restarting: reconnect"),
                _ = self.shutdown.cancelled() => break End::Close(CloseCode::Away, "proxy shutting down"),
            }
        };
        match &end {
            End::ClosedByClient(code) => self.subscriptions.sessions.count_close("client", *code),
            End::Gone => self.subscriptions.sessions.count_close("client", None),
            End::Close(code, _) => self
                .subscriptions
                .sessions
                .count_close("proxy", Some(u16::from(*code))),
        }
        // No frame is queued for it from here on (the session misses what comes
        // before its next socket, and that socket hears of it).
        self.channel.outbox.detach(generation);
        let unwritten = write_failed || !outbox.is_empty();
        // Of the frames it never wrote, those from the fleet's stream are replayed to
        // the next socket; only the others (all of them without `[cluster]`) are a
        // gap to tell of.
        while let Ok((offset, _)) = outbox.try_recv() {
            unwritten_direct |= offset == NOT_IN_STREAM;
        }
        let served_until = if unwritten {
            written_until
        } else {
            SystemTime::now()
        };
        if let Some(directory) = &self.directory {
            let served = [(self.channel.id.clone(), self.channel.outbox.served_to())];
            let _ = directory.seen(&served, served_until).await;
        }
        close(&mut socket, end).await;
        // Frames queued for this socket and never written are lost to it: the
        // session hears of the gap (on its newer socket, or its next one).
        if unwritten_direct {
            let topics = self.channel.topics();
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            self.channel.outbox.unwritten_since(written_until, |since| {
                gap_frame(since, SystemTime::now(), &topics)
            });
        }
        self.channel.socket_closed();
    }

    /// Carries out one in-band subscribe and builds its answer. The change itself
    /// completes even if the socket goes away meanwhile (see `Subscriptions::change`).
    fn subscribe(&self, topics: Option<Vec<String>>, correlation_id: Value) -> Answer {
        let (subscriptions, channel, peer) =
            (self.subscriptions.clone(), self.channel.clone(), self.peer);
        let directory = self.directory.clone();
        Box::pin(async move {
            let answer = match topics.filter(|t| !t.is_empty()) {
                None => json!({
                    "correlationId": correlation_id, "result": "400", "status": "error",
                    "message": "Required data missing from subscribe request."
                }),
                Some(topics) => match subscriptions
                    .change(peer, &channel, Change::Add(topics), false)
                    .await
                {
                    Ok(_) => {
                        // Wherever the desktop moves, its channel keeps these topics.
                        if let Some(directory) = directory {
                            let _ = directory
                                .list(&channel.id, &channel.topics(), channel.outbox.served_to())
                                .await;
                        }
                        json!({"correlationId": correlation_id, "result": "200", "status": "subscribed"})
                    }
                    Err(error) => json!({
                        "correlationId": correlation_id, "result": error.status.as_str(), "status": "error",
                        "message": error.message
                    }),
                },
            };
            Utf8Bytes::from(answer.to_string())
        })
    }
}

/// Ends the connection the RFC 6455 way: answers a client's Close, or sends the
/// proxy's own and waits (briefly) for the client's answer before the TCP close.
async fn close(socket: &mut ServerSocket, end: End) {
    let handshake = async {
        match end {
            // tungstenite queued the answering Close on reading the client's; a flush
            // sends it (a send would be refused: the socket is closing).
            End::ClosedByClient(_) => {
                let _ = socket.flush().await;
            }
            End::Gone => {}
            End::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                if socket.close(Some(frame)).await.is_ok() {
                    while let Some(Ok(_)) = socket.next().await {}
                }
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

/// Whether a write completed, in time.
async fn within_stall<E>(write: impl Future<Output = Result<(), E>>) -> bool {
    let mut write = std::pin::pin!(write);
    // Nearly every write completes at once (the socket's buffer has room): only one
    // that has to wait gets a timer.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(result) => result.is_ok(),
        std::task::Poll::Pending => {
            matches!(tokio::time::timeout(WRITE_STALL, write).await, Ok(Ok(())))
        }
    }
}

/// What a batch of writes got through.
#[derive(Default)]
struct Written {
    /// The stream position of the last frame from the stream fed.
    offset: Offset,
    /// Whether a frame no stream holds was among those fed.
    direct: bool,
}

/// Feeds `frames` and flushes them; `written` says what was fed (all of it reached
/// the client if this succeeds).
async fn write_frames(
    socket: &mut ServerSocket,
    frames: &mut impl Iterator<Item = QueuedFrame>,
    written: &mut Written,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for (offset, frame) in frames {
        if offset == NOT_IN_STREAM {
            written.direct = true;
        } else {
            written.offset = offset;
        }
        socket.feed(Message::Text(frame)).await?;
    }
    socket.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_are_classified() {
        assert_eq!(in_band(r#"{"message":"ping"}"#), InBand::Ping);
        assert_eq!(
            in_band(r#"{"message":"subscribe","topics":["v2.a"],"correlationId":"c"}"#),
            InBand::Subscribe {
                topics: Some(vec!["v2.a".into()]),
                correlation_id: json!("c")
            }
        );
        assert_eq!(
            in_band(r#"{"message":"subscribe"}"#),
            InBand::Subscribe {
                topics: None,
                correlation_id: Value::Null
            }
        );
        assert_eq!(
            in_band(r#"{"message":"subscribe","topics":"x","correlationId":7}"#),
            InBand::Subscribe {
                topics: None,
                correlation_id: json!(7)
            }
        );
        assert_eq!(in_band("not json"), InBand::Other);
    }
}
