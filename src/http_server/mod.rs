//! The HTTP/1.1 accept loop shared by every listener (the fake Genesys Cloud, and
//! later the proxy's client and admin listeners), plus small response helpers.
//!
//! Upgraded WebSocket connections leave hyper's hands once the 101 is written, so
//! whoever spawns the socket task must track it itself (see `crate::ws`).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub type Request = http::Request<Incoming>;
pub type Response = http::Response<Full<Bytes>>;

/// Largest request body any listener reads. Subscription bodies of 1000 topics of
/// 200 characters are about 220 KiB; anything far beyond that is abuse.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Serves HTTP/1.1 (with upgrades) on `listener` until `shutdown` is cancelled, then
/// lets in-flight requests finish and returns once every connection has closed.
pub async fn serve<S, F>(listener: TcpListener, service: S, shutdown: CancellationToken)
where
    S: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Usually EMFILE: back off briefly instead of spinning on the error.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let svc = service_fn(move |req| {
                let response = service(req);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
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

/// Reads a whole request body, refusing bodies over [`MAX_BODY_BYTES`].
pub async fn read_body(body: Incoming) -> Result<Bytes, BodyError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Unreadable),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("request body could not be read")]
    Unreadable,
}

/// The value of a query parameter, if present (first occurrence).
pub fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}
