//! A hostile Genesys in front of the fake: it forwards every REST call to the fake
//! and twists chosen answers the way a broken or malicious upstream might (absurd
//! lifetimes, `Retry-After`s and bodies, redirects, a `connectUri` pointing
//! elsewhere, a channel listing refused). Sockets are not forwarded: point `api_url` at it only for a twist of
//! the API itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the hostile front twists answers.
#[derive(Clone, Debug)]
pub enum Twist {
    /// Token answers carry this `expires_in` (any JSON).
    ExpiresIn(serde_json::Value),
    /// Token requests get 429 with this `Retry-After`.
    Throttled(String),
    /// Token answers are this many bytes of JSON-looking junk, with or without a
    /// `Content-Length`.
    HugeToken { bytes: u64, content_length: bool },
    /// Token requests are redirected (307) here.
    Redirect(String),
    /// Channel answers name this `connectUri`.
    ConnectUri(String),
    /// Channel listings (`GET …/channels`) are refused with this status, as a
    /// Genesys without the call, or an OAuth client without the permission, would.
    Listing(u16),
}

pub struct Hostile {
    pub addr: SocketAddr,
    twist: Arc<Mutex<Option<Twist>>>,
    /// Body bytes the front handed to the transport (a client that gives up early
    /// makes the front stop early).
    pub sent: Arc<AtomicU64>,
}

impl Hostile {
    /// Starts a front forwarding to the fake at `fake` (`http://…`).
    pub async fn start(fake: String) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let twist: Arc<Mutex<Option<Twist>>> = Arc::default();
        let sent = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let (twist_, sent_) = (twist.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (twist, sent, http, fake) =
                    (twist_.clone(), sent_.clone(), http.clone(), fake.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (twist, sent, http, fake) =
                            (twist.clone(), sent.clone(), http.clone(), fake.clone());
                        async move { Ok::<_, Infallible>(answer(req, twist, sent, http, fake).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Hostile { addr, twist, sent }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn twist(&self, twist: Option<Twist>) {
        *self.twist.lock().unwrap() = twist;
    }
}

type Answer = http::Response<BoxBody<Bytes, Infallible>>;

fn full(status: u16, body: impl Into<Bytes>) -> Answer {
    let mut response = http::Response::new(
        http_body_util::Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

async fn answer(
    req: http::Request<Incoming>,
    twist: Arc<Mutex<Option<Twist>>>,
    sent: Arc<AtomicU64>,
    http: reqwest::Client,
    fake: String,
) -> Answer {
    let twist = twist.lock().unwrap().clone();
    let is_token = req.uri().path() == "/oauth/token";
    if let Some(Twist::Listing(status)) = &twist
        && req.method() == http::Method::GET
        && req.uri().path() == "/api/v2/notifications/channels"
    {
        let body = serde_json::json!({"message": "refused", "code": "refused", "status": status});
        return full(*status, body.to_string());
    }
    match (&twist, is_token) {
        (Some(Twist::Throttled(retry_after)), true) => {
            let mut response = full(
                429,
                r#"{"message":"slow down","code":"too.many.requests","status":429}"#,
            );
            response
                .headers_mut()
                .insert("retry-after", retry_after.parse().unwrap());
            return response;
        }
        (
            Some(Twist::HugeToken {
                bytes,
                content_length,
            }),
            true,
        ) => {
            let mut response = http::Response::new(
                Junk {
                    left: *bytes,
                    sent,
                    sized: *content_length,
                }
                .boxed(),
            );
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            return response;
        }
        (Some(Twist::Redirect(to)), true) => {
            let mut response = full(307, "");
            response
                .headers_mut()
                .insert("location", to.parse().unwrap());
            return response;
        }
        _ => {}
    }
    // Forward to the fake.
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let url = format!(
        "{fake}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut forwarded = http.request(parts.method.clone(), url).body(body);
    for name in ["authorization", "content-type", "accept"] {
        if let Some(value) = parts.headers.get(name) {
            forwarded = forwarded.header(name, value.clone());
        }
    }
    let Ok(reply) = forwarded.send().await else {
        return full(502, "");
    };
    let status = reply.status().as_u16();
    let retry_after = reply.headers().get("retry-after").cloned();
    let mut body = reply.bytes().await.unwrap_or_default();
    if let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&body) {
        match &twist {
            Some(Twist::ExpiresIn(value)) if is_token && json.get("expires_in").is_some() => {
                json["expires_in"] = value.clone();
            }
            Some(Twist::ConnectUri(uri)) if json.get("connectUri").is_some() => {
                json["connectUri"] = serde_json::json!(uri);
            }
            _ => {}
        }
        body = Bytes::from(json.to_string());
    }
    let mut response = full(status, body);
    if let Some(retry_after) = retry_after {
        response.headers_mut().insert("retry-after", retry_after);
    }
    response
}

/// A body of `left` bytes, produced as it is read, counting what it handed out.
struct Junk {
    left: u64,
    sent: Arc<AtomicU64>,
    sized: bool,
}

impl Body for Junk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        const CHUNK: u64 = 64 * 1024;
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK);
        self.left -= n;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; n as usize])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.sized {
            hyper::body::SizeHint::with_exact(self.left)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}
