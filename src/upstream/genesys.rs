//! The Genesys Cloud calls the proxy makes: the client-credentials grant, channel
//! creation, subscriptions, token retirement, and the notification WebSocket.
//!
//! Errors never carry secrets: no token, client secret, channel id or connectUri
//! appears in them (reqwest errors are stripped of their URL; Genesys error bodies
//! are reduced to their `code`, since their messages can name the channel).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::Secret;

/// An upstream notification socket.
pub type UpstreamSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single upstream call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// 400 `invalid_client` / `unauthorized_client`: this secret (or client) is refused.
    #[error("credentials rejected by the token endpoint ({0})")]
    CredentialsRejected(String),
    /// 429, or the token endpoint's 400 `invalid_request` "rate limit exceeded".
    #[error("throttled by Genesys Cloud")]
    Throttled { retry_after: Option<Duration> },
    /// 401: the token is expired or revoked.
    #[error("the token is no longer valid (401)")]
    Unauthorized,
    #[error("forbidden (403 {0})")]
    Forbidden(String),
    #[error("not found (404)")]
    NotFound,
    #[error("request refused (400 {0})")]
    BadRequest(String),
    /// 5xx, timeouts, connection failures: worth retrying.
    #[error("Genesys Cloud unavailable: {0}")]
    Unavailable(String),
    #[error("unexpected answer from Genesys Cloud: {0}")]
    Protocol(String),
}

impl UpstreamError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// A token as minted.
pub struct Minted {
    pub token: Secret,
    pub lifetime: Duration,
}

/// A channel as created.
pub struct CreatedChannel {
    /// The upstream channel id: a bearer capability, never shown to anyone.
    pub id: Secret,
    pub connect_uri: Secret,
    pub expires: Option<SystemTime>,
}

pub struct Genesys {
    http: reqwest::Client,
    login_url: String,
    api_url: String,
    ws_tls: Arc<rustls::ClientConfig>,
}

impl Genesys {
    pub fn new(login_url: &str, api_url: &str) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::http_client_config())
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("handover/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                UpstreamError::Protocol(format!(
                    "cannot build the HTTP client: {}",
                    e.without_url()
                ))
            })?;
        Ok(Self {
            http,
            login_url: login_url.trim_end_matches('/').to_owned(),
            api_url: api_url.trim_end_matches('/').to_owned(),
            ws_tls: crate::tls::websocket_client_config(),
        })
    }

    /// `POST {login}/oauth/token`, client-credentials grant with HTTP Basic auth.
    pub async fn mint(&self, client_id: &str, secret: &Secret) -> Result<Minted, UpstreamError> {
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            expires_in: u64,
        }
        #[derive(Deserialize, Default)]
        struct Refused {
            #[serde(default)]
            error: String,
            #[serde(default)]
            description: String,
            #[serde(default)]
            error_description: String,
        }
        let response = self
            .http
            .post(format!("{}/oauth/token", self.login_url))
            .basic_auth(client_id, Some(secret.expose()))
            .header(http::header::ACCEPT, "application/json")
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(&response);
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            let granted: Granted = serde_json::from_slice(&body).map_err(|_| {
                UpstreamError::Protocol("the token answer is not the expected JSON".into())
            })?;
            return Ok(Minted {
                token: Secret::from(granted.access_token),
                lifetime: Duration::from_secs(granted.expires_in),
            });
        }
        let refused: Refused = serde_json::from_slice(&body).unwrap_or_default();
        let description = if refused.description.is_empty() {
            refused.error_description
        } else {
            refused.description
        };
        Err(match (status, refused.error.as_str()) {
            (StatusCode::TOO_MANY_REQUESTS, _) => UpstreamError::Throttled { retry_after },
            (StatusCode::BAD_REQUEST, "invalid_request")
                if description.starts_with("rate limit exceeded") =>
            {
                UpstreamError::Throttled { retry_after }
            }
            (
                StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED,
                "invalid_client" | "unauthorized_client",
            ) => UpstreamError::CredentialsRejected(format!("{}: {description}", refused.error)),
            (s, _) if s.is_server_error() => {
                UpstreamError::Unavailable(format!("token endpoint answered {s}"))
            }
            (s, error) => UpstreamError::Protocol(format!("token endpoint answered {s} {error}")),
        })
    }

    /// `POST /api/v2/notifications/channels` with the token the channel is pinned to.
    pub async fn create_channel(&self, token: &Secret) -> Result<CreatedChannel, UpstreamError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Channel {
            id: String,
            connect_uri: String,
            expires: Option<String>,
        }
        let response = self
            .http
            .post(format!("{}/api/v2/notifications/channels", self.api_url))
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(transport)?;
        let body = expect_success(response).await?;
        let channel: Channel = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::Protocol("the channel answer is not the expected JSON".into())
        })?;
        Ok(CreatedChannel {
            id: Secret::from(channel.id),
            connect_uri: Secret::from(channel.connect_uri),
            expires: channel
                .expires
                .and_then(|e| humantime::parse_rfc3339_weak(&e).ok()),
        })
    }

    /// `PUT …/subscriptions?ignoreErrors=true`: makes `topics` the channel's whole
    /// subscription list. Returns the topics Genesys rejected (no permission).
    pub async fn replace_subscriptions(
        &self,
        token: &Secret,
        channel_id: &Secret,
        topics: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, UpstreamError> {
        #[derive(Deserialize)]
        struct Listing {
            #[serde(default)]
            entities: Vec<Entity>,
        }
        #[derive(Deserialize)]
        struct Entity {
            id: String,
            state: Option<String>,
        }
        let body: Vec<_> = topics.iter().map(|t| json!({ "id": t })).collect();
        let response = self
            .http
            .put(format!(
                "{}/api/v2/notifications/channels/{}/subscriptions?ignoreErrors=true",
                self.api_url,
                channel_id.expose()
            ))
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        let body = expect_success(response).await?;
        let listing: Listing = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::Protocol("the subscription answer is not the expected JSON".into())
        })?;
        Ok(listing
            .entities
            .into_iter()
            .filter(|e| e.state.as_deref() == Some("Rejected"))
            .map(|e| e.id)
            .collect())
    }

    /// `DELETE /api/v2/tokens/me`: retires a token, and with it the channel it
    /// created, so that the channel stops counting against the 20 per OAuth client.
    pub async fn retire_token(&self, token: &Secret) -> Result<(), UpstreamError> {
        let response = self
            .http
            .delete(format!("{}/api/v2/tokens/me", self.api_url))
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(transport)?;
        expect_success(response).await.map(|_| ())
    }

    /// Opens the notification socket (no auth: the channel id is the capability).
    pub async fn connect(&self, connect_uri: &Secret) -> Result<UpstreamSocket, UpstreamError> {
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            connect_uri.expose(),
            Some(crate::ws::socket_config()),
            true,
            Some(Connector::Rustls(self.ws_tls.clone())),
        );
        match tokio::time::timeout(CALL_TIMEOUT, connecting).await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                match response.status() {
                    StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
                    StatusCode::UNAUTHORIZED => Err(UpstreamError::Unauthorized),
                    status => Err(UpstreamError::Unavailable(format!(
                        "socket upgrade answered {status}"
                    ))),
                }
            }
            // tungstenite's errors can quote the URL: keep only their kind.
            Ok(Err(error)) => Err(UpstreamError::Unavailable(format!(
                "socket connect failed ({})",
                tungstenite_error_kind(&error)
            ))),
            Err(_) => Err(UpstreamError::Unavailable(
                "socket connect timed out".into(),
            )),
        }
    }
}

fn tungstenite_error_kind(error: &tokio_tungstenite::tungstenite::Error) -> &'static str {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Io(_) => "I/O error",
        Error::Tls(_) => "TLS error",
        Error::Url(_) => "bad URL",
        Error::Protocol(_) => "protocol error",
        Error::ConnectionClosed | Error::AlreadyClosed => "connection closed",
        _ => "other error",
    }
}

fn transport(error: reqwest::Error) -> UpstreamError {
    UpstreamError::Unavailable(error.without_url().to_string())
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The body of a 2xx answer, or the error its status means.
async fn expect_success(response: reqwest::Response) -> Result<bytes::Bytes, UpstreamError> {
    #[derive(Deserialize, Default)]
    struct ApiError {
        #[serde(default)]
        code: String,
    }
    let status = response.status();
    let retry_after = retry_after(&response);
    let body = response.bytes().await.map_err(transport)?;
    if status.is_success() {
        return Ok(body);
    }
    let code = serde_json::from_slice::<ApiError>(&body)
        .unwrap_or_default()
        .code;
    Err(match status {
        StatusCode::UNAUTHORIZED => UpstreamError::Unauthorized,
        StatusCode::FORBIDDEN => UpstreamError::Forbidden(code),
        StatusCode::NOT_FOUND => UpstreamError::NotFound,
        StatusCode::TOO_MANY_REQUESTS => UpstreamError::Throttled { retry_after },
        StatusCode::BAD_REQUEST => UpstreamError::BadRequest(code),
        s if s.is_server_error() => UpstreamError::Unavailable(format!("API answered {s}")),
        s => UpstreamError::Protocol(format!("API answered {s} {code}")),
    })
}
