//! The Genesys Cloud calls the proxy makes: the client-credentials grant, channel
//! creation, the OAuth client's channel count, subscriptions, token retirement, and
//! the notification WebSocket.
//!
//! Errors never carry secrets: no token, client secret, channel id or connectUri
//! appears in them (reqwest errors are stripped of their URL; Genesys error bodies
//! are reduced to their `code`, since their messages can name the channel).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::bounds;
use crate::metrics::Registry;
use crate::secret::Secret;
use crate::tls::Roots;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// What Genesys answered when it refused a request as a whole (any 4xx but 401, 404
/// and 429): its status and code, which a client may be shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// Genesys' error code (plain `[a-z0-9._-]`, never free text).
    pub code: String,
}

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
    #[error("not found (404)")]
    NotFound,
    /// Any other 4xx (400, 403, 409, …): Genesys refused the request as a whole.
    #[error("request refused ({status} {code})")]
    Refused { status: u16, code: String },
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

    /// For a request Genesys refused as a whole: its status and code.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Refused { status, code } => Some(Refusal {
                status: *status,
                code: code.clone(),
            }),
            _ => None,
        }
    }
}

impl SocketOrigin {
    fn of(api_url: &str) -> Result<Self, UpstreamError> {
        let invalid = || UpstreamError::Protocol("the API URL is not an http(s) URL".into());
        let url = url::Url::parse(api_url).map_err(|_| invalid())?;
        let scheme = match url.scheme() {
            "https" => "wss",
            "http" => "ws",
            _ => return Err(invalid()),
        };
        let api_host = url.host_str().ok_or_else(invalid)?.to_owned();
        let streaming_host = api_host
            .strip_prefix("api.")
            .map(|domain| format!("streaming.{domain}"));
        Ok(Self {
            scheme,
            api_port: url.port(),
            api_host,
            streaming_host,
        })
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
    /// `handover_upstream_requests_total{route, status}`: every answer Genesys gave
    /// (or `error` when none came), so that 429s and 5xx show.
    requests: Family<RequestLabels, Counter>,
    login_url: String,
    api_url: String,
    /// Where a `connectUri` may point: see [`Genesys::check_connect_uri`].
    sockets: SocketOrigin,
    ws_tls: Arc<rustls::ClientConfig>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: String,
}

/// The scheme, hosts and port a `connectUri` from this API may use. Genesys answers
/// `wss://streaming.<region>/channels/<id>` for `https://api.<region>`; a gateway or a
/// fake serves both on the API's own address. Anything else is refused: a socket URL
/// is a place the proxy connects to on the word of an HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SocketOrigin {
    scheme: &'static str,
    api_host: String,
    api_port: Option<u16>,
    streaming_host: Option<String>,
}

impl Genesys {
    /// A client for the given base URLs, trusting `roots`.
    pub fn new(login_url: &str, api_url: &str, roots: &Roots) -> Result<Self, UpstreamError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::tls::http_client_config(roots))
            // A redirect from Genesys would be a misconfiguration or an attack: the
            // bearer token must go nowhere else.
            .redirect(reqwest::redirect::Policy::none())
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
        let api_url = api_url.trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            requests: Family::default(),
            login_url: login_url.trim_end_matches('/').to_owned(),
            sockets: SocketOrigin::of(&api_url)?,
            api_url,
            ws_tls: crate::tls::websocket_client_config(roots),
        })
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "upstream_requests",
            "Genesys Cloud calls by route and answer status (error: no answer).",
            self.requests.clone(),
        );
    }

    fn count(&self, route: &'static str, status: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                status: status.to_owned(),
            })
            .inc();
    }

    /// Sends a request for `route`, counting its answer.
    async fn send(
        &self,
        route: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        match request.send().await {
            Ok(response) => {
                self.count(route, response.status().as_str());
                Ok(response)
            }
            Err(error) => {
                self.count(route, "error");
                Err(transport(error))
            }
        }
    }

    /// Refuses a `connectUri` that is not `wss://` (or `ws://` for an `http://` API)
    /// on the API's host and port or on its `streaming.` sibling.
    fn check_connect_uri(&self, uri: &str) -> Result<(), UpstreamError> {
        let refused = || {
            UpstreamError::Protocol(
                "the channel's connectUri is not a Genesys Cloud socket address".into(),
            )
        };
        let url = url::Url::parse(uri).map_err(|_| refused())?;
        let origin = &self.sockets;
        if url.scheme() != origin.scheme || !url.username().is_empty() || url.password().is_some() {
            return Err(refused());
        }
        let host = url.host_str().ok_or_else(refused)?;
        let port = url.port();
        let on_api = host.eq_ignore_ascii_case(&origin.api_host) && port == origin.api_port;
        let on_streaming = origin
            .streaming_host
            .as_deref()
            .is_some_and(|streaming| host.eq_ignore_ascii_case(streaming) && port.is_none());
        if on_api || on_streaming {
            Ok(())
        } else {
            Err(refused())
        }
    }

    /// `POST {login}/oauth/token`, client-credentials grant with HTTP Basic auth.
    pub async fn mint(&self, client_id: &str, secret: &Secret) -> Result<Minted, UpstreamError> {
        let request = self
            .http
            .post(format!("{}/oauth/token", self.login_url))
            .basic_auth(client_id, Some(secret.expose()))
            .header(http::header::ACCEPT, "application/json")
            .form(&[("grant_type", "client_credentials")]);
        let response = self.send("token", request).await?;
        let status = response.status();
        let retry_after = retry_after(&response);
        let body = read_capped(response).await?;
        token_answer(status, retry_after, &body)
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
        let request = self
            .http
            .post(format!("{}/api/v2/notifications/channels", self.api_url))
            .bearer_auth(token.expose());
        let response = self.send("create_channel", request).await?;
        let body = expect_success(response).await?;
        let channel: Channel = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::Protocol("the channel answer is not the expected JSON".into())
        })?;
        // The id goes into REST paths: `../tokens/me` must not become one.
        let url_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if channel.id.is_empty()
            || channel.id.len() > 200
            || channel.id.starts_with('.')
            || !channel.id.chars().all(url_safe)
        {
            return Err(UpstreamError::Protocol(
                "the channel id is not URL-safe".into(),
            ));
        }
        self.check_connect_uri(&channel.connect_uri)?;
        // An expiry already past (or unreadable) is ignored: the token's expiry still
        // bounds the channel, and a past value would start a hand-over loop.
        let expires = channel
            .expires
            .and_then(|e| humantime::parse_rfc3339_weak(&e).ok())
            .filter(|&at| at > SystemTime::now());
        Ok(CreatedChannel {
            id: Secret::from(channel.id),
            connect_uri: Secret::from(channel.connect_uri),
            expires,
        })
    }

    /// `GET /api/v2/notifications/channels?includechannels=oauthclient`: how many live
    /// channels the token's OAuth client holds, whoever created them. Genesys shows the
    /// channels of the client's other tokens "to show their existence", without their
    /// ids (§3.2 of the protocol notes), so entries are counted, never told apart: an
    /// id may be missing, `null` or the same placeholder on each. Nothing of an entry
    /// is kept.
    pub async fn count_client_channels(&self, token: &Secret) -> Result<usize, UpstreamError> {
        let request = self
            .http
            .get(format!(
                "{}/api/v2/notifications/channels?includechannels=oauthclient",
                self.api_url
            ))
            .bearer_auth(token.expose());
        let response = self.send("list_channels", request).await?;
        let body = expect_success(response).await?;
        channel_count(&body)
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
        let request = self
            .http
            .put(format!(
                "{}/api/v2/notifications/channels/{}/subscriptions?ignoreErrors=true",
                self.api_url,
                channel_id.expose()
            ))
            .bearer_auth(token.expose())
            .json(&body);
        let response = self.send("subscriptions", request).await?;
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
        let request = self
            .http
            .delete(format!("{}/api/v2/tokens/me", self.api_url))
            .bearer_auth(token.expose());
        let response = self.send("retire_token", request).await?;
        expect_success(response).await.map(|_| ())
    }

    /// `GET /api/v2/tokens/me`: when the token idles (`dateTokenIdles`), if the org
    /// ends idle tokens. With `preserve_idle` the call itself does not count as
    /// activity (`preserveIdleTTL=true`); without it, it resets the idle clock.
    pub async fn token_idles_at(
        &self,
        token: &Secret,
        preserve_idle: bool,
    ) -> Result<Option<SystemTime>, UpstreamError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct TokenInfo {
            date_token_idles: Option<String>,
        }
        let request = self
            .http
            .get(format!(
                "{}/api/v2/tokens/me?preserveIdleTTL={preserve_idle}",
                self.api_url
            ))
            .bearer_auth(token.expose());
        let response = self.send("token_info", request).await?;
        let body = expect_success(response).await?;
        let info: TokenInfo = serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::Protocol("the token information is not the expected JSON".into())
        })?;
        Ok(info
            .date_token_idles
            .and_then(|at| humantime::parse_rfc3339_weak(&at).ok()))
    }

    /// `GET /api/v2/notifications/availabletopics?{query}`: the topics this token may
    /// see, as Genesys answers (its JSON as it came). `query` holds only parameters
    /// the caller has checked (`expand`, `includePreview`).
    pub async fn available_topics(
        &self,
        token: &Secret,
        query: &str,
    ) -> Result<Bytes, UpstreamError> {
        let mut url = format!("{}/api/v2/notifications/availabletopics", self.api_url);
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let response = self
            .http
            .get(url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(transport)?;
        expect_success_within(response, bounds::MAX_TOPIC_LIST_BODY).await
    }

    /// Opens the notification socket (no auth: the channel id is the capability).
    pub async fn connect(&self, connect_uri: &Secret) -> Result<UpstreamSocket, UpstreamError> {
        self.check_connect_uri(connect_uri.expose())?;
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            connect_uri.expose(),
            Some(crate::ws::socket_config()),
            true,
            Some(Connector::Rustls(self.ws_tls.clone())),
        );
        let outcome = tokio::time::timeout(CALL_TIMEOUT, connecting).await;
        match &outcome {
            Ok(Ok(_)) => self.count("socket", "101"),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                self.count("socket", response.status().as_str());
            }
            _ => self.count("socket", "error"),
        }
        match outcome {
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

/// `Retry-After` in seconds, clamped to [`bounds::MAX_RETRY_AFTER`] (the HTTP-date
/// form is not used by Genesys and is ignored).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(bounds::retry_after)
}

/// Reads an answer's body, refusing one over [`bounds::MAX_UPSTREAM_BODY`] without
/// buffering it.
async fn read_capped(response: reqwest::Response) -> Result<Bytes, UpstreamError> {
    read_capped_to(response, bounds::MAX_UPSTREAM_BODY).await
}

/// Reads an answer's body, refusing one over `cap` bytes without buffering it.
async fn read_capped_to(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Bytes, UpstreamError> {
    let too_large =
        || UpstreamError::Protocol("the answer is larger than any Genesys answer".into());
    if response
        .content_length()
        .is_some_and(|length| length > cap as u64)
    {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads a token endpoint answer: a token and its (clamped) lifetime, or the error
/// its status and body mean.
pub fn token_answer(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Minted, UpstreamError> {
    #[derive(Deserialize)]
    struct Granted {
        access_token: String,
        expires_in: f64,
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
    if status.is_success() {
        let granted: Granted = serde_json::from_slice(body).map_err(|_| {
            UpstreamError::Protocol("the token answer is not the expected JSON".into())
        })?;
        if granted.access_token.is_empty() {
            return Err(UpstreamError::Protocol(
                "the token answer has an empty token".into(),
            ));
        }
        let lifetime = bounds::token_lifetime(granted.expires_in).ok_or_else(|| {
            UpstreamError::Protocol("the token answer's expires_in is not a usable lifetime".into())
        })?;
        return Ok(Minted {
            token: Secret::from(granted.access_token),
            lifetime,
        });
    }
    let refused: Refused = serde_json::from_slice(body).unwrap_or_default();
    let description = if refused.description.is_empty() {
        refused.error_description
    } else {
        refused.description
    };
    let error = known_oauth_error(&refused.error);
    Err(match (status, error) {
        (StatusCode::TOO_MANY_REQUESTS, _) => UpstreamError::Throttled { retry_after },
        (StatusCode::BAD_REQUEST, "invalid_request")
            if description.starts_with("rate limit exceeded") =>
        {
            UpstreamError::Throttled { retry_after }
        }
        (
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED,
            "invalid_client" | "unauthorized_client",
        ) => UpstreamError::CredentialsRejected(format!(
            "{error}: {}",
            known_oauth_description(&description)
        )),
        (s, _) if s.is_server_error() => {
            UpstreamError::Unavailable(format!("token endpoint answered {s}"))
        }
        (s, error) => UpstreamError::Protocol(format!("token endpoint answered {s} {error}")),
    })
}

/// Reads a channel listing (`ChannelEntityListing`): how many entries it has.
pub fn channel_count(body: &[u8]) -> Result<usize, UpstreamError> {
    #[derive(Deserialize)]
    struct Listing {
        /// Absent or `null` when there is none (every field of the model is optional).
        #[serde(default)]
        entities: Option<Vec<serde::de::IgnoredAny>>,
    }
    let listing: Listing = serde_json::from_slice(body).map_err(|_| {
        UpstreamError::Protocol("the channel listing is not the expected JSON".into())
    })?;
    Ok(listing.entities.map_or(0, |entities| entities.len()))
}

/// An OAuth `error` code as RFC 6749 names them; anything else is not repeated.
fn known_oauth_error(error: &str) -> &'static str {
    [
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    ]
    .into_iter()
    .find(|known| *known == error)
    .unwrap_or("other")
}

/// The descriptions Genesys is known to give for a refused client; any other text is
/// withheld from logs, since an endpoint may echo what it was sent.
fn known_oauth_description(description: &str) -> &'static str {
    [
        "authentication failed",
        "client not found",
        "client is not authorized to use the client_credential grant type",
    ]
    .into_iter()
    .find(|known| *known == description)
    .unwrap_or("description withheld")
}

/// The body of a 2xx answer, or the error its status means.
async fn expect_success(response: reqwest::Response) -> Result<bytes::Bytes, UpstreamError> {
    expect_success_within(response, bounds::MAX_UPSTREAM_BODY).await
}

/// [`expect_success`] for an answer of up to `cap` bytes.
async fn expect_success_within(
    response: reqwest::Response,
    cap: usize,
) -> Result<bytes::Bytes, UpstreamError> {
    #[derive(Deserialize, Default)]
    struct ApiError {
        #[serde(default)]
        code: String,
    }
    let status = response.status();
    let retry_after = retry_after(&response);
    let body = read_capped_to(response, cap).await?;
    if status.is_success() {
        return Ok(body);
    }
    // The code may reach a client (a refused subscription): only a plain
    // Genesys-style code passes, never free text.
    let code = serde_json::from_slice::<ApiError>(&body)
        .unwrap_or_default()
        .code;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let code = if !code.is_empty() && code.len() <= 64 && code.chars().all(plain) {
        code
    } else {
        "unknown".to_owned()
    };
    Err(match status {
        StatusCode::UNAUTHORIZED => UpstreamError::Unauthorized,
        StatusCode::NOT_FOUND => UpstreamError::NotFound,
        StatusCode::TOO_MANY_REQUESTS => UpstreamError::Throttled { retry_after },
        s if s.is_client_error() => UpstreamError::Refused {
            status: s.as_u16(),
            code,
        },
        s if s.is_redirection() => {
            UpstreamError::Protocol(format!("API answered {s} (redirects are not followed)"))
        }
        s if s.is_server_error() => UpstreamError::Unavailable(format!("API answered {s}")),
        s => UpstreamError::Protocol(format!("API answered {s} {code}")),
    })
}
