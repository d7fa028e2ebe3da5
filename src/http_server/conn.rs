//! One accepted connection: the PROXY protocol v2 header (only from trusted load
//! balancers), the TLS handshake, then HTTP/1.1 through hyper with a header read
//! timeout (hyper applies it only with a timer on the connection builder) and a
//! keep-alive idle timeout. The connection's slot under the cap lives in its I/O
//! object, so it is held as long as the socket is open, after an upgrade too.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
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
    slot: Option<OwnedSemaphorePermit>,
    options: Arc<Options>,
    service: S,
    shutdown: CancellationToken,
) where
    S: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let _ = stream.set_nodelay(true);
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
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        io,
        activity: activity.clone(),
        _slot: slot,
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
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
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
        _ = idle(&activity, options.keep_alive_idle) => {
            conn.as_mut().graceful_shutdown();
            // Closes at once when idle; a request that just began gets its answer,
            // but a peer that does not read it is not waited for long.
            let _ = tokio::time::timeout(options.header_read_timeout, conn).await;
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

/// When a connection last received bytes or answered, and whether a request is in
/// flight: what the keep-alive idle timeout judges.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_read: AtomicU64,
    last_answer: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_read: AtomicU64::new(0),
            last_answer: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Since when nothing happened, or `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self
            .last_read
            .load(Ordering::Relaxed)
            .max(self.last_answer.load(Ordering::Relaxed));
        Some(self.start + Duration::from_millis(last))
    }
}

/// Resolves once the connection has been idle for `limit` (never without one).
async fn idle(activity: &Activity, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        match activity.idle_since() {
            Some(since) if since + limit <= Instant::now() => return,
            Some(since) => tokio::time::sleep_until(since + limit).await,
            None => tokio::time::sleep(limit).await,
        }
    }
}

/// A request in flight, from the call to its answer (or its drop).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_answer.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's I/O: notes when bytes arrive, and holds the connection's slot
/// under the cap until the socket is dropped (after an upgrade, by its socket task).
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    _slot: Option<OwnedSemaphorePermit>,
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
            let now = self.activity.now_ms();
            self.activity.last_read.store(now, Ordering::Relaxed);
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
        Pin::new(&mut self.io).poll_write(cx, buf)
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
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
