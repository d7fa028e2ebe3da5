//! The HTTP/1.1 accept loop shared by every listener (the fake Genesys Cloud, and
//! the proxy's client and admin listeners), plus small response helpers.
//!
//! The loop is the edge's first line: a cap on connections open at once (at the cap
//! a connection is answered 503, or closed at once under TLS, before file
//! descriptors run out), back-off on accept errors instead of spinning, and per
//! connection (`conn`): the PROXY protocol v2 header from trusted load balancers,
//! the TLS handshake, hyper's header read timeout, and a keep-alive idle timeout.
//! Each request carries a [`ConnInfo`] in its extensions.
//!
//! Upgraded WebSocket connections leave hyper's hands once the 101 is written, so
//! whoever spawns the socket task must track it itself (see `crate::ws`); the
//! connection's slot under the cap goes with the socket until it closes.

mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls_server::ServerTls;

pub type Request = http::Request<Incoming>;
pub type Response = http::Response<Full<Bytes>>;

/// Largest request body any listener reads. Subscription bodies of 1000 topics of
/// 200 characters are about 220 KiB; anything far beyond that is abuse.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a request body may take to arrive, unless a listener says otherwise.
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// hyper's default header read timeout, for listeners that set none.
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// First and longest wait after a failed `accept`.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this long about accept errors or the connection cap.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What a listener enforces.
#[derive(Clone)]
pub struct Options {
    /// Names the listener in logs.
    pub name: &'static str,
    /// Connections open at once, upgraded sockets included; `None`: no cap.
    pub max_connections: Option<usize>,
    /// A request's headers must complete within this of their first byte; the
    /// first request's (PROXY header and TLS handshake included) within this of the
    /// accept.
    pub header_read_timeout: Duration,
    /// A connection waiting this long for its next request is closed; `None`: it
    /// may wait for ever (the fake Genesys Cloud, whose clients pool connections).
    pub keep_alive_idle: Option<Duration>,
    /// Peers whose connections begin with a PROXY protocol v2 header.
    pub proxy_protocol_from: Vec<IpNet>,
    /// Serve TLS with the current certificate.
    pub tls: Option<Arc<ServerTls>>,
    /// Counted here; registered (or not) by the listener's owner.
    pub metrics: ListenerMetrics,
}

/// What a listener counts (see [`Listeners`]); the default counts into nothing
/// registered.
#[derive(Clone, Default)]
pub struct ListenerMetrics {
    /// Connections open, upgraded sockets included.
    pub open: Gauge,
    /// Connections refused because `max_connections` were open.
    pub refused_at_cap: Counter,
    /// Failed accepts (usually out of file descriptors).
    pub accept_errors: Counter,
}

/// The listeners' metrics, one series per listener (`listener="client"`).
#[derive(Default)]
pub struct Listeners {
    open: Family<ListenerLabels, Gauge>,
    refused_at_cap: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

impl Listeners {
    /// The handles listener `name` counts into.
    pub fn of(&self, name: &'static str) -> ListenerMetrics {
        let labels = ListenerLabels { listener: name };
        ListenerMetrics {
            open: self.open.get_or_create(&labels).clone(),
            refused_at_cap: self.refused_at_cap.get_or_create(&labels).clone(),
            accept_errors: self.accept_errors.get_or_create(&labels).clone(),
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "connections_open",
            "Connections open, by listener, upgraded sockets included.",
            self.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at once because server.max_connections were open, by listener.",
            self.refused_at_cap.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (usually out of file descriptors), by listener; the listener backs off.",
            self.accept_errors.clone(),
        );
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: "http",
            max_connections: None,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            keep_alive_idle: None,
            proxy_protocol_from: Vec::new(),
            tls: None,
            metrics: ListenerMetrics::default(),
        }
    }
}

/// The connection a request came on, in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The TCP peer.
    pub remote: SocketAddr,
    /// The client address a trusted load balancer reported in a PROXY header.
    pub proxied: Option<SocketAddr>,
    pub tls: bool,
}

impl ConnInfo {
    /// The client's address as far as the connection tells: the PROXY header's, or
    /// the TCP peer's.
    pub fn client(&self) -> SocketAddr {
        self.proxied.unwrap_or(self.remote)
    }
}

/// Serves HTTP/1.1 (with upgrades) on `listener` with default [`Options`] until
/// `shutdown` is cancelled, then lets in-flight requests finish and returns once
/// every connection has closed.
pub async fn serve<S, F>(listener: TcpListener, service: S, shutdown: CancellationToken)
where
    S: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    serve_with(listener, Options::default(), service, shutdown).await
}

/// [`serve`] with the given [`Options`].
pub async fn serve_with<S, F>(
    listener: TcpListener,
    options: Options,
    service: S,
    shutdown: CancellationToken,
) where
    S: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let connections = TaskTracker::new();
    let slots = options
        .max_connections
        .map(|cap| Arc::new(Semaphore::new(cap.min(Semaphore::MAX_PERMITS))));
    let options = Arc::new(options);
    let mut failures = AcceptFailures::default();
    let mut cap_warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => {
                failures.reset();
                accepted
            }
            Err(error) => {
                // Usually EMFILE or ENFILE: spinning on it would burn a core and flood
                // the log while nothing can be accepted anyway.
                options.metrics.accept_errors.inc();
                let wait = failures.next(&error, options.name);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let slot = match &slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    options.metrics.refused_at_cap.inc();
                    if cap_warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        tracing::warn!(
                            listener = options.name,
                            max_connections = options.max_connections,
                            "connection cap reached: new connections are refused until one closes"
                        );
                        cap_warned = Some(Instant::now());
                    }
                    conn::refuse_at_cap(stream, options.tls.is_some());
                    continue;
                }
            },
        };
        connections.spawn(conn::serve(
            stream,
            remote,
            conn::Held::new(slot, options.metrics.open.clone()),
            options.clone(),
            service.clone(),
            shutdown.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
}

/// Back-off between failed accepts, with a warning at most every [`WARN_EVERY`].
#[derive(Default)]
struct AcceptFailures {
    wait: Option<Duration>,
    since_warning: u64,
    warned: Option<Instant>,
}

impl AcceptFailures {
    fn reset(&mut self) {
        self.wait = None;
    }

    fn next(&mut self, error: &std::io::Error, listener: &'static str) -> Duration {
        let wait = self
            .wait
            .map_or(ACCEPT_BACKOFF_FIRST, |w| (w * 2).min(ACCEPT_BACKOFF_MAX));
        self.wait = Some(wait);
        self.since_warning += 1;
        if self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                listener,
                %error,
                failures = self.since_warning,
                retry_in = ?wait,
                "accept failed: backing off"
            );
            self.since_warning = 0;
            self.warned = Some(Instant::now());
        }
        wait
    }
}

/// A JSON response with the given status.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("serialising plain data cannot fail");
    with_body(status, Bytes::from(body), "application/json")
}

/// A response with a body and a content type.
pub fn with_body(status: StatusCode, body: Bytes, content_type: &'static str) -> Response {
    let mut response = http::Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An empty response with the given status.
pub fn empty(status: StatusCode) -> Response {
    let mut response = http::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Reads a whole request body within [`BODY_DEADLINE`], refusing bodies over
/// [`MAX_BODY_BYTES`].
pub async fn read_body(body: Incoming) -> Result<Bytes, BodyError> {
    read_body_within(body, BODY_DEADLINE).await
}

/// Reads a whole request body within `deadline` (a body that trickles in is cut
/// off), refusing bodies over [`MAX_BODY_BYTES`].
pub async fn read_body_within(body: Incoming, deadline: Duration) -> Result<Bytes, BodyError> {
    let collecting = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(deadline, collecting).await {
        Err(_) => Err(BodyError::TooSlow(deadline)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            Err(BodyError::TooLarge)
        }
        Ok(Err(_)) => Err(BodyError::Unreadable),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("request body could not be read")]
    Unreadable,
    #[error("request body did not arrive within {0:?}")]
    TooSlow(Duration),
}

impl BodyError {
    /// 413, 408 or 400.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unreadable => StatusCode::BAD_REQUEST,
        }
    }
}

/// The value of a query parameter, if present (first occurrence).
pub fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_doubling_to_a_second() {
        let mut failures = AcceptFailures::default();
        let error = std::io::Error::from_raw_os_error(24); // EMFILE
        let waits: Vec<Duration> = (0..9).map(|_| failures.next(&error, "test")).collect();
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[6], Duration::from_millis(640));
        assert_eq!(waits[7], ACCEPT_BACKOFF_MAX);
        assert_eq!(waits[8], ACCEPT_BACKOFF_MAX);
        failures.reset();
        assert_eq!(failures.next(&error, "test"), ACCEPT_BACKOFF_FIRST);
    }
}
