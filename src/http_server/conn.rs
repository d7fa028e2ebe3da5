//! One accepted connection: the PROXY protocol v2 header (only from trusted load
//! balancers), the TLS handshake, then HTTP/1.1 through hyper, with two deadlines
//! told apart: a request's headers must complete within the header read timeout of
//! their first byte (of the accept, for the first request), and a connection may
//! wait for its next request for the keep-alive idle timeout. hyper's own header
//! timer (it applies only with a timer on the connection builder) counts idle time
//! too, so it is the backstop of both. The connection's slot under the cap lives
//! in its I/O object, so it is held as long as the socket is open, after an
//! upgrade too.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::{ConnInfo, Options, Request, Response};
use crate::front::peer;

/// Longest PROXY v2 header read (addresses and TLVs); real ones are under 256 bytes.
const MAX_PROXY_HEADER: usize = 2048;

/// Answers a connection over the cap: a 503 if it can be written at once (plain
/// HTTP), then closes. Under TLS a 503 would cost a handshake: the connection is
/// closed at once.
pub(super) fn refuse_at_cap(stream: TcpStream, tls: bool) {
    if !tls {
        let body = r#"{"message":"The proxy is at its connection limit: retry shortly","code":"service.unavailable","status":503}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             retry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // Never waits: a socket that cannot take it now gets only the close.
        let _ = stream.try_write(answer.as_bytes());
    }
}

/// Serves one connection until it closes, is idle too long, or `shutdown`.
pub(super) async fn serve<S, F>(
    stream: TcpStream,
    remote: SocketAddr,
    held: Held,
    options: Arc<Options>,
    service: S,
    shutdown: CancellationToken,
) where
    S: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    // The first request's headers are due `header_read_timeout` after the accept,
    // PROXY header and TLS handshake included.
    let activity = Arc::new(Activity::new(Instant::now()));
    let setup = async {
        let mut stream = stream;
        let proxied = if peer::is_trusted(remote.ip(), &options.proxy_protocol_from) {
            read_proxy_header(&mut stream).await?
        } else {
            None
        };
        let io = match &options.tls {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                let tls = acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                Either::Right(tls)
            }
            None => Either::Left(stream),
        };
        Ok::<_, String>((io, proxied))
    };
    // A peer that trickles its PROXY header or its TLS handshake is cut like one that
    // trickles its request headers.
    let (io, proxied) = match tokio::time::timeout(options.header_read_timeout, setup).await {
        Ok(Ok(ready)) => ready,
        Ok(Err(why)) => {
            tracing::debug!(listener = options.name, %remote, why, "connection refused");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = options.name, %remote, "connection set-up timed out");
            return;
        }
    };
    let info = ConnInfo {
        remote,
        proxied,
        tls: options.tls.is_some(),
    };
    let io = Tracked {
        io,
        activity: activity.clone(),
        _held: held,
    };
    let svc = {
        let activity = activity.clone();
        service_fn(move |mut req: Request| {
            req.extensions_mut().insert(info);
            let busy = Busy::start(activity.clone());
            let response = service(req);
            async move {
                let response = response.await;
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        })
    };
    // hyper's own header timer runs from the moment it waits for a request, idle
    // time included, so it is set to cover both: a backstop behind `watch`, which
    // tells idle time from header time.
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(
        options
            .keep_alive_idle
            .map(|idle| options.header_read_timeout + idle),
    );
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        expired = watch(&activity, options.header_read_timeout, options.keep_alive_idle) => {
            match expired {
                // A request whose headers are late is cut where it stands.
                Expired::Headers => {
                    tracing::debug!(listener = options.name, %remote, "request headers too slow: connection closed");
                }
                Expired::Idle => {
                    conn.as_mut().graceful_shutdown();
                    // Closes at once when idle; a request that just began gets its
                    // answer, but a peer that does not read it is not waited for long.
                    let _ = tokio::time::timeout(options.header_read_timeout, conn).await;
                }
            }
        }
    }
}

/// Reads a PROXY protocol v2 header; the client address it reports, or `None` for
/// the balancer's own connections (`LOCAL`, health checks) and non-IP families.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, String> {
    use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
    let mut fixed = [0u8; 16];
    stream
        .read_exact(&mut fixed)
        .await
        .map_err(|e| format!("no PROXY header: {e}"))?;
    if fixed[..PROTOCOL_PREFIX.len()] != *PROTOCOL_PREFIX {
        return Err(
            "a trusted proxy's connection must start with a PROXY protocol v2 header".into(),
        );
    }
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if length > MAX_PROXY_HEADER {
        return Err("PROXY header too long".into());
    }
    let mut header = Vec::with_capacity(fixed.len() + length);
    header.extend_from_slice(&fixed);
    header.resize(fixed.len() + length, 0);
    stream
        .read_exact(&mut header[fixed.len()..])
        .await
        .map_err(|e| format!("PROXY header cut short: {e}"))?;
    let parsed =
        Header::try_from(header.as_slice()).map_err(|e| format!("bad PROXY header: {e}"))?;
    Ok(match (parsed.command, parsed.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    })
}

/// Where a connection is between requests: reading a request's headers (since
/// when), handling requests, or idle (since its last answer). What `watch` judges.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` at which the headers being read began; `NONE`
    /// while idle or handling.
    head_started: AtomicU64,
    last_answer: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether the last answer has begun to be written: bytes before that are the
    /// rest of the request's body (which a handler may leave unread), not the
    /// next request's headers.
    answer_written: AtomicBool,
    /// Wakes `watch` when a request begins, so that its header deadline counts.
    changed: Notify,
}

const NONE: u64 = u64::MAX;

impl Activity {
    /// A connection accepted at `start`: its first request's headers are being read.
    fn new(start: Instant) -> Self {
        Self {
            start,
            head_started: AtomicU64::new(0),
            last_answer: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            answer_written: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes were written: once no request is in flight, that is an answer.
    fn wrote(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.answer_written.store(true, Ordering::Release);
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Bytes arrived: if the connection was idle after an answer, a request's
    /// headers begin.
    fn received(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.answer_written.load(Ordering::Acquire)
            && self
                .head_started
                .compare_exchange(NONE, self.now_ms(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.changed.notify_one();
        }
    }
}

/// Why `watch` gave up on a connection.
enum Expired {
    /// A request's headers did not complete within the header read timeout.
    Headers,
    /// No request for the keep-alive idle timeout.
    Idle,
}

/// Resolves when the connection has overrun a deadline: a request's headers
/// `header_timeout` after they began (or after the accept, for the first), or
/// `idle_limit` (if any) without a request.
async fn watch(
    activity: &Activity,
    header_timeout: Duration,
    idle_limit: Option<Duration>,
) -> Expired {
    loop {
        let changed = activity.changed.notified();
        let deadline = if activity.in_flight.load(Ordering::Acquire) > 0 {
            // Handling a request: the handler bounds itself (body deadline, waits).
            None
        } else {
            match activity.head_started.load(Ordering::Acquire) {
                NONE => idle_limit.map(|limit| {
                    (
                        activity.at(activity.last_answer.load(Ordering::Acquire)) + limit,
                        Expired::Idle,
                    )
                }),
                began => Some((activity.at(began) + header_timeout, Expired::Headers)),
            }
        };
        match deadline {
            Some((at, expired)) if at <= Instant::now() => return expired,
            Some((at, _)) => tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = changed => {}
            },
            None => tokio::select! {
                _ = tokio::time::sleep(header_timeout) => {}
                _ = changed => {}
            },
        }
    }
}

/// A request being handled, from its headers to its answer (or its drop).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.head_started.store(NONE, Ordering::Release);
        activity.answer_written.store(false, Ordering::Release);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_answer.store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

/// The connection's I/O: notes when bytes arrive, and holds the connection's slot
/// under the cap until the socket is dropped (after an upgrade, by its socket task).
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    _held: Held,
}

/// An accepted connection's place: its slot under the cap, and its count in the
/// listener's open connections, both given back when it is dropped.
pub(super) struct Held {
    _slot: Option<OwnedSemaphorePermit>,
    open: Gauge,
}

impl Held {
    pub(super) fn new(slot: Option<OwnedSemaphorePermit>, open: Gauge) -> Self {
        open.inc();
        Self { _slot: slot, open }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.received();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
