//! `GET /channels/{id}`: the notification WebSocket. One socket per channel,
//! heartbeats, `{"message":"ping"}` → pong, and whatever the state sends it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::Fake;
use super::errors::Rejection;
use super::state::SocketCommand;
use crate::http_server::{Request, Response};
use crate::ws::{self, ServerSocket};

/// Most frames written before one flush, so that a burst costs few syscalls.
const BATCH: usize = 64;
/// How long a close waits for the peer's Close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

// Genesys' own frames, written out here rather than shared with the proxy, so that
// the fake judges the proxy independently: a wrong constant in the proxy fails here.
const HEARTBEAT: &str =
    r#"{"topicName":"channel.metadata","eventBody":{"message":"WebSocket Heartbeat"}}"#;
const PONG: &str = r#"{"topicName":"channel.metadata","eventBody":{"message":"pong"}}"#;

/// `{"message":"ping"}`, Genesys' health check, whatever the spacing or extra fields.
fn is_health_check(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|v| v.get("message").and_then(|m| m.as_str()) == Some("ping"))
}

pub(super) async fn upgrade(
    fake: &Arc<Fake>,
    mut req: Request,
    channel_id: &str,
) -> Result<Response, Rejection> {
    let (response, pending) = match ws::accept(&mut req) {
        Ok(accepted) => accepted,
        Err(refused) => return Ok(refused.into_response()),
    };
    fake.service_time(|t| t.ws_upgrade).await;
    let socket_id = fake.next_id();
    let (commands, heartbeat) = {
        let mut state = fake.state();
        let commands = state
            .attach_socket(channel_id, socket_id, Instant::now())
            .ok_or_else(|| Rejection::not_found(format!("Channel {channel_id} not found")))?;
        (commands, state.settings.heartbeat)
    };
    let task_fake = fake.clone();
    let channel_id = channel_id.to_owned();
    fake.tasks.spawn(async move {
        if let Ok(socket) = pending.open().await {
            serve_socket(socket, commands, heartbeat, &task_fake.shutdown).await;
        }
        task_fake
            .state()
            .detach_socket(&channel_id, socket_id, Instant::now());
    });
    Ok(response)
}

async fn serve_socket(
    mut socket: ServerSocket,
    mut commands: mpsc::Receiver<SocketCommand>,
    heartbeat: Duration,
    shutdown: &CancellationToken,
) {
    let mut heartbeats = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stalled = false;
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else {
                    // The state dropped this socket without a word (its queue was full).
                    close(&mut socket, None, CloseCode::Error, "socket too slow").await;
                    return;
                };
                if stalled {
                    // A stalled socket still obeys close orders (the channel died).
                    if let SocketCommand::Close { .. } = command {
                        return;
                    }
                    continue;
                }
                match write_batch(&mut socket, command, &mut commands).await {
                    BatchEnd::Written => {}
                    BatchEnd::Stall => stalled = true,
                    BatchEnd::Close((notice, code, reason)) => {
                        close(&mut socket, notice, code, reason).await;
                        return;
                    }
                }
                if socket.flush().await.is_err() {
                    return;
                }
            }
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if !stalled && is_health_check(&text) && socket.send(Message::text(PONG)).await.is_err() {
                        return;
                    }
                }
                // RFC 6455 pings are answered by tungstenite itself; a Close is
                // answered with a Close (tungstenite queued it; a flush sends it).
                Some(Ok(Message::Close(_))) => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.flush()).await;
                    return;
                }
                Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = heartbeats.tick() => {
                if !stalled && socket.send(Message::text(HEARTBEAT)).await.is_err() {
                    return;
                }
            }
            _ = shutdown.cancelled() => {
                close(&mut socket, None, CloseCode::Away, "server shutting down").await;
                return;
            }
        }
    }
}

type CloseOrder = (Option<Utf8Bytes>, CloseCode, &'static str);

/// How a batch of commands ended.
enum BatchEnd {
    Written,
    Stall,
    Close(CloseOrder),
}

/// Writes `first` and whatever else is already queued, without flushing, up to a
/// stall or close order (or a failed write).
async fn write_batch(
    socket: &mut ServerSocket,
    first: SocketCommand,
    commands: &mut mpsc::Receiver<SocketCommand>,
) -> BatchEnd {
    let mut next = Some(first);
    let mut written = 0;
    while let Some(command) = next.take() {
        match command {
            SocketCommand::Frame(text) => {
                if socket.feed(Message::Text(text)).await.is_err() {
                    return BatchEnd::Close((None, CloseCode::Error, "write failed"));
                }
            }
            SocketCommand::Stall => return BatchEnd::Stall,
            SocketCommand::Close {
                notice,
                code,
                reason,
            } => return BatchEnd::Close((notice, code, reason)),
        }
        written += 1;
        if written < BATCH {
            next = commands.try_recv().ok();
        }
    }
    BatchEnd::Written
}

async fn close(
    socket: &mut ServerSocket,
    notice: Option<Utf8Bytes>,
    code: CloseCode,
    reason: &'static str,
) {
    if let Some(notice) = notice {
        let _ = socket.feed(Message::Text(notice)).await;
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    // Wait for the peer's Close before the TCP close, as RFC 6455 asks.
    let handshake = async {
        if socket.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}
