//! Helpers shared by the integration tests: a fake Genesys Cloud on loopback, a
//! small REST client for it, WebSocket helpers, and waiting on conditions.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use handover::mock::{ClientSpec, MockConfig, MockGenesys, ServiceTimes, Settings};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const CLIENT: &str = "client-a";
pub const SECRET: &str = "secret-a";

/// How long any condition in these tests may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A fake with one OAuth client (`CLIENT`/`SECRET`, 1 h tokens) and no service
/// times, so that tests of the fake itself run fast.
pub fn fast_config() -> MockConfig {
    MockConfig {
        clients: vec![ClientSpec::new(CLIENT, SECRET, Duration::from_secs(3600))],
        settings: Settings {
            service_times: ServiceTimes::NONE,
            ..Settings::default()
        },
        socket_base: None,
    }
}

pub async fn start(config: MockConfig) -> (MockGenesys, Api) {
    handover::install_crypto_provider();
    let fake = MockGenesys::start(config).await.expect("fake starts");
    let api = Api::new(fake.base_url());
    (fake, api)
}

/// A plain HTTP client for the fake, answering (status, JSON body or Null).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Api {
    pub fn new(base: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("reqwest client");
        Self { base, http }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request reaches the fake");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// `POST {base}{path}` without credentials or body.
    pub async fn post(&self, path: &str) -> Reply {
        self.send(self.http.post(format!("{}{path}", self.base)))
            .await
    }

    /// `GET {base}{path}` without credentials.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn token_request(&self, id: &str, secret: &str, grant: &str) -> Reply {
        self.send(
            self.http
                .post(format!("{}/oauth/token", self.base))
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", grant)]),
        )
        .await
    }

    pub async fn mint(&self, id: &str, secret: &str) -> String {
        let reply = self.token_request(id, secret, "client_credentials").await;
        assert_eq!(reply.status, 200, "mint failed: {}", reply.body);
        reply.body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Reply {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    /// Creates a channel; returns (id, connectUri).
    pub async fn channel(&self, token: &str) -> (String, String) {
        let reply = self
            .call(
                reqwest::Method::POST,
                "/api/v2/notifications/channels",
                token,
                None,
            )
            .await;
        assert_eq!(reply.status, 200, "channel creation failed: {}", reply.body);
        (
            reply.body["id"].as_str().unwrap().to_owned(),
            reply.body["connectUri"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn subscribe(&self, token: &str, channel: &str, topics: &[&str]) -> Reply {
        let body: Vec<Value> = topics.iter().map(|t| json!({ "id": t })).collect();
        self.call(
            reqwest::Method::PUT,
            &format!("/api/v2/notifications/channels/{channel}/subscriptions"),
            token,
            Some(Value::Array(body)),
        )
        .await
    }

    pub async fn control(&self, method: reqwest::Method, path: &str, body: Value) -> Reply {
        self.send(
            self.http
                .request(method, format!("{}/__mock/{path}", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn stats(&self) -> Value {
        self.send(self.http.get(format!("{}/__mock/stats", self.base)))
            .await
            .body
    }

    pub async fn publish(&self, topic: &str) -> Value {
        let reply = self
            .control(reqwest::Method::POST, "publish", json!({ "topic": topic }))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body
    }

    pub async fn patch_settings(&self, patch: Value) {
        let reply = self
            .control(reqwest::Method::PATCH, "settings", patch)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}

/// Waits until the fake counts `sockets` open sockets.
pub async fn wait_for_sockets(api: &Api, sockets: u64) -> Value {
    wait_for("the sockets to register", || {
        let api = api.clone();
        async move {
            let stats = api.stats().await;
            (stats["sockets"] == sockets).then_some(stats)
        }
    })
    .await
}

pub async fn connect(uri: &str) -> Socket {
    let (socket, _) = tokio_tungstenite::connect_async(uri)
        .await
        .expect("websocket connects");
    socket
}

/// What a socket yielded next.
#[derive(Debug)]
pub enum Next {
    Text(Value),
    Closed(Option<u16>),
}

/// The next text frame or the close, whichever comes first, within `DEADLINE`.
pub async fn next_frame(socket: &mut Socket) -> Next {
    let until = Instant::now() + DEADLINE;
    loop {
        let message = tokio::time::timeout_at(until, socket.next())
            .await
            .expect("no frame before the deadline");
        match message {
            Some(Ok(Message::Text(text))) => {
                return Next::Text(serde_json::from_str(&text).expect("frames are JSON"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Next::Closed(frame.map(|f| u16::from(f.code)));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Next::Closed(None),
        }
    }
}

/// The next frame that is not a heartbeat.
pub async fn next_non_heartbeat(socket: &mut Socket) -> Next {
    loop {
        match next_frame(socket).await {
            Next::Text(frame) if frame["eventBody"]["message"] == "WebSocket Heartbeat" => continue,
            other => return other,
        }
    }
}

/// Reads until the socket closes, returning the close code and the frames before it.
pub async fn until_closed(socket: &mut Socket) -> (Option<u16>, Vec<Value>) {
    let mut frames = Vec::new();
    loop {
        match next_frame(socket).await {
            Next::Text(frame) => frames.push(frame),
            Next::Closed(code) => return (code, frames),
        }
    }
}

pub async fn send_text(socket: &mut Socket, text: &str) {
    socket.send(Message::text(text)).await.expect("send");
}

/// Polls `condition` until it yields `Some`, failing the test after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub mod certs;
pub mod clients;
pub mod fleet;
pub mod hostile;
pub mod proxy;
pub mod redis_server;
pub mod serve;

/// The value of metric `name` at the admin listener `admin`, summed over the label
/// sets that carry every one of `labels` (`outcome="failed"`); `None` if it has none.
pub async fn metric(admin: &Api, name: &str, labels: &[&str]) -> Option<f64> {
    let text = admin.get("/metrics").await.body;
    let mut found = None;
    for line in text.as_str()?.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name == name && labels.iter().all(|l| series_labels.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}
