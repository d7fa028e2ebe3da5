//! Server-side WebSocket upgrades over hyper 1, and the socket settings every
//! WebSocket in the crate uses.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::http_server::{Request, Response, empty, with_body};

/// A server-side WebSocket on an upgraded hyper connection.
pub type ServerSocket = WebSocketStream<TokioIo<Upgraded>>;

/// Largest message accepted from a peer. Genesys frames are small JSON documents;
/// the cap keeps one misbehaving peer from making us buffer megabytes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// tungstenite defaults to 128 KiB read and write buffers per socket; with one socket
/// per desktop that dominates idle memory, so buffers start small and grow on demand.
/// The write buffer is capped so a peer that stops reading surfaces as an error
/// instead of unbounded growth.
pub fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
}

/// Whether the request asks for a WebSocket upgrade.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .map(|v| {
                    v.split(',')
                        .any(|part| part.trim().eq_ignore_ascii_case(token))
                })
                .unwrap_or(false)
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// The far side of a validated upgrade: once the 101 is sent, `open` yields the socket.
pub struct PendingSocket {
    on_upgrade: OnUpgrade,
}

impl PendingSocket {
    /// Completes the upgrade once hyper has written the 101.
    pub async fn open(self) -> Result<ServerSocket, hyper::Error> {
        let upgraded = self.on_upgrade.await?;
        Ok(WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(socket_config()),
        )
        .await)
    }
}

/// Why a request could not be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("this endpoint only speaks WebSocket")]
    NotAnUpgrade,
    #[error("the WebSocket handshake has no Sec-WebSocket-Key")]
    MissingKey,
    #[error("only WebSocket version 13 is supported")]
    UnsupportedVersion,
}

impl UpgradeError {
    /// 426 with `Sec-WebSocket-Version: 13` for a plain GET or a wrong version, 400
    /// for a malformed handshake.
    pub fn into_response(self) -> Response {
        let status = match self {
            Self::NotAnUpgrade | Self::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Self::MissingKey => StatusCode::BAD_REQUEST,
        };
        let mut response = with_body(status, Bytes::from(format!("{self}\n")), "text/plain");
        if status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// Validates an RFC 6455 upgrade request and returns the 101 to send.
pub fn accept(req: &mut Request) -> Result<(Response, PendingSocket), UpgradeError> {
    if !is_upgrade_request(req.headers()) {
        return Err(UpgradeError::NotAnUpgrade);
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return Err(UpgradeError::MissingKey);
    };
    let version = req.headers().get(header::SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|v| v != "13") {
        return Err(UpgradeError::UnsupportedVersion);
    }
    let on_upgrade = hyper::upgrade::on(req);
    let mut response = empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept_key = derive_accept_key(key.as_bytes());
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept_key).expect("base64 is a valid header value"),
    );
    Ok((response, PendingSocket { on_upgrade }))
}
