//! A client's WebSocket: upstream frames from its outbox, the proxy's own
//! heartbeats, `{"message":"ping"}` → pong, and in-band `{"message":"subscribe"}`.
//! The socket is read continuously, so RFC 6455 pings (some libraries send one a
//! second and give up after a second without a pong) are always answered.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::sessions::{Change, ClientChannel, Sessions};
use crate::drain::Drain;
use crate::frame;
use crate::ws::ServerSocket;

/// Most frames written before one flush, so that a burst costs few syscalls.
const BATCH: usize = 64;

pub struct ClientSocket {
    pub channel: Arc<ClientChannel>,
    pub sessions: Arc<Sessions>,
    pub heartbeat: Duration,
    pub shutdown: CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
    pub drain: Arc<Drain>,
}

impl ClientSocket {
    pub async fn serve(
        self,
        mut socket: ServerSocket,
        generation: u64,
        mut outbox: mpsc::Receiver<Utf8Bytes>,
    ) {
        self.channel.socket_opened();
        let mut heartbeats =
            tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
        heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // When the proxy stops, this socket closes at its own turn within the drain.
        let _open = self.drain.open_socket();
        let drain_turn = self.drain.turn();
        tokio::pin!(drain_turn);
        let close = loop {
            tokio::select! {
                queued = outbox.recv() => {
                    let Some(first) = queued else {
                        break if self.channel.outbox.replaced(generation) {
                            Some((CloseCode::Normal, "replaced by a newer connection"))
                        } else {
                            Some((CloseCode::Again, "client too slow: reconnect"))
                        };
                    };
                    if write_batch(&mut socket, first, &mut outbox).await.is_err() {
                        break None;
                    }
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        if frame::is_ping(&text) {
                            if socket.send(Message::text(frame::PONG)).await.is_err() {
                                break None;
                            }
                        } else {
                            self.in_band(&text);
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
                    Some(Ok(_)) => {}
                },
                _ = heartbeats.tick() => {
                    if socket.send(Message::text(frame::HEARTBEAT)).await.is_err() {
                        break None;
                    }
                }
                // 1012 and not 1001: clients treat 1001 as a normal end and stop,
                // 1012 as a failure to reconnect from (README, "Stopping").
                _ = &mut drain_turn => break Some((CloseCode::Restart, "proxy restarting: reconnect")),
                _ = self.shutdown.cancelled() => break Some((CloseCode::Away, "proxy shutting down")),
            }
        };
        if let Some((code, reason)) = close {
            let _ = socket
                .close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }))
                .await;
        }
        self.channel.outbox.detach(generation);
        self.channel.socket_closed();
    }

    /// `{"message":"subscribe","topics":[…],"correlationId":…}`: subscribes the
    /// channel to those topics (in the background, so the socket keeps being read)
    /// and answers on the socket.
    fn in_band(&self, text: &str) {
        #[derive(Deserialize)]
        struct Request<'a> {
            #[serde(borrow)]
            message: Cow<'a, str>,
            topics: Option<Vec<String>>,
            #[serde(rename = "correlationId")]
            correlation_id: Option<Value>,
        }
        let Ok(request) = serde_json::from_str::<Request>(text) else {
            return;
        };
        if request.message != "subscribe" {
            return;
        }
        let correlation_id = request.correlation_id.unwrap_or(Value::Null);
        let channel = self.channel.clone();
        let sessions = self.sessions.clone();
        self.tasks.spawn(async move {
            let answer = match request.topics.filter(|t| !t.is_empty()) {
                None => json!({
                    "correlationId": correlation_id, "result": "400", "status": "error",
                    "message": "Required data missing from subscribe request."
                }),
                Some(topics) => match sessions.change(&channel, Change::Add(topics), false).await {
                    Ok(_) => json!({"correlationId": correlation_id, "result": "200", "status": "subscribed"}),
                    Err(error) => json!({
                        "correlationId": correlation_id, "result": error.status.as_str(), "status": "error",
                        "message": error.message
                    }),
                },
            };
            channel.outbox.send(&Utf8Bytes::from(answer.to_string()));
        });
    }
}

async fn write_batch(
    socket: &mut ServerSocket,
    first: Utf8Bytes,
    outbox: &mut mpsc::Receiver<Utf8Bytes>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    socket.feed(Message::Text(first)).await?;
    for _ in 1..BATCH {
        match outbox.try_recv() {
            Ok(frame) => socket.feed(Message::Text(frame)).await?,
            Err(_) => break,
        }
    }
    socket.flush().await
}
