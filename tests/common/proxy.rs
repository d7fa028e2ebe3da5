//! Running the proxy against the fake, and simulated desktops that record what they
//! receive so that tests can count lost, duplicated and unexpected events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use handover::app::Proxy;
use handover::config::Config;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Api, DEADLINE, Socket};

/// One OAuth client the proxy uses: a credential set with its secret in a file.
pub struct Credential {
    pub name: &'static str,
    pub client_id: &'static str,
}

/// Secret files live here for the test's duration.
pub struct Secrets {
    pub dir: tempfile::TempDir,
}

impl Secrets {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a secret the way a mounted Kubernetes secret changes: a new file
    /// renamed over the old one.
    pub fn write(&self, name: &str, secret: &str) {
        let staging = self.dir.path().join(format!(".{name}.new"));
        std::fs::write(&staging, format!("{secret}\n")).expect("write secret");
        std::fs::rename(&staging, self.path(name)).expect("rename secret");
    }
}

/// A proxy config (parsed from TOML, as a user's would be) pointing at the fake.
pub fn proxy_config(
    fake_url: &str,
    secrets: &Secrets,
    credentials: &[Credential],
    extra: &str,
) -> Config {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [genesys]\nlogin_url = \"{fake_url}\"\napi_url = \"{fake_url}\"\n"
    );
    for c in credentials {
        toml.push_str(&format!(
            "[[credentials]]\nname = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n",
            c.name,
            c.client_id,
            secrets.path(c.name).display()
        ));
    }
    toml.push_str(extra);
    Config::from_toml(&toml, "test.toml").unwrap_or_else(|e| panic!("test config: {e}\n{toml}"))
}

pub async fn start_proxy(config: Config) -> (Proxy, Api, Api) {
    let proxy = Proxy::start(config).await.expect("proxy starts");
    let client_api = Api::new(format!("http://{}", proxy.client_addr));
    let admin_api = Api::new(format!("http://{}", proxy.admin_addr));
    (proxy, client_api, admin_api)
}

/// What one desktop has seen.
#[derive(Default, Debug)]
pub struct Log {
    /// (stream, seq) → times received.
    pub events: BTreeMap<(u64, u64), u32>,
    pub gaps: Vec<Value>,
    pub closed: Option<Option<u16>>,
    pub other: Vec<Value>,
}

/// A simulated agent desktop: a client channel on the proxy and its socket.
pub struct Desktop {
    pub channel: String,
    pub topics: BTreeSet<String>,
    pub log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Desktop {
    /// Creates a channel, subscribes over REST, then connects (the SDK's order).
    pub async fn connect(proxy: &Api, topics: &[String]) -> Desktop {
        let created = proxy
            .send(
                proxy
                    .http
                    .post(format!("{}/api/v2/notifications/channels", proxy.base))
                    .body("null"),
            )
            .await;
        assert_eq!(created.status, 200, "{}", created.body);
        let channel = created.body["id"].as_str().unwrap().to_owned();
        let uri = created.body["connectUri"].as_str().unwrap().to_owned();
        let socket = super::connect(&uri).await;
        let body: Vec<Value> = topics.iter().map(|t| json!({ "id": t })).collect();
        let reply = proxy
            .send(
                proxy
                    .http
                    .put(format!(
                        "{}/api/v2/notifications/channels/{channel}/subscriptions",
                        proxy.base
                    ))
                    .json(&body),
            )
            .await;
        assert_eq!(reply.status, 200, "subscribe: {}", reply.body);
        let log = Arc::new(Mutex::new(Log::default()));
        let task = tokio::spawn(record(socket, log.clone()));
        Desktop {
            channel,
            topics: topics.iter().cloned().collect(),
            log,
            task,
        }
    }

    /// Events of `stream` this desktop should get: seq i goes to `topics[i % n]`.
    pub fn expected(
        &self,
        stream: u64,
        stream_topics: &[String],
        count: u64,
    ) -> BTreeSet<(u64, u64)> {
        (0..count)
            .filter(|i| {
                self.topics
                    .contains(&stream_topics[(*i % stream_topics.len() as u64) as usize])
            })
            .map(|i| (stream, i))
            .collect()
    }

    pub fn received(&self) -> BTreeMap<(u64, u64), u32> {
        self.log.lock().unwrap().events.clone()
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(mut socket: Socket, log: Arc<Mutex<Log>>) {
    // Answer the proxy's heartbeats' purpose the way clients do: ping now and then.
    let mut ping = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).expect("frames are JSON");
                    let mut log = log.lock().unwrap();
                    match frame["topicName"].as_str() {
                        Some("channel.metadata") => {}
                        Some("handover.gap") => log.gaps.push(frame),
                        Some(_) if frame["eventBody"]["seq"].is_u64() => {
                            let key = (
                                frame["eventBody"]["stream"].as_u64().unwrap_or(0),
                                frame["eventBody"]["seq"].as_u64().unwrap(),
                            );
                            *log.events.entry(key).or_default() += 1;
                        }
                        _ => log.other.push(frame),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    log.lock().unwrap().closed = Some(frame.map(|f| u16::from(f.code)));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    log.lock().unwrap().closed = Some(None);
                    return;
                }
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    log.lock().unwrap().closed = Some(None);
                    return;
                }
            }
        }
    }
}

/// Starts a paced stream at the fake; returns its id.
pub async fn start_stream(fake: &Api, topics: &[String], rate: f64, count: u64) -> u64 {
    let reply = fake
        .control(
            reqwest::Method::POST,
            "streams",
            json!({"topics": topics, "rate": rate, "count": count}),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.body["stream"].as_u64().unwrap()
}

pub async fn stream_done(fake: &Api, stream: u64, until: Instant) {
    loop {
        let reply = fake
            .send(
                fake.http
                    .get(format!("{}/__mock/streams/{stream}", fake.base)),
            )
            .await;
        if reply.body["done"] == true {
            return;
        }
        assert!(Instant::now() < until, "the stream did not finish in time");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits until every desktop has every expected event (or the deadline passes), then
/// returns (lost, duplicated, unexpected) summed over desktops.
pub async fn settle(
    desktops: &[Desktop],
    expected: &dyn Fn(&Desktop) -> BTreeSet<(u64, u64)>,
) -> (usize, usize, usize) {
    let until = Instant::now() + DEADLINE;
    loop {
        let mut lost = 0;
        let mut duplicated = 0;
        let mut unexpected = 0;
        for desktop in desktops {
            let want = expected(desktop);
            let got = desktop.received();
            lost += want.iter().filter(|k| !got.contains_key(k)).count();
            duplicated += got
                .values()
                .filter(|&&n| n > 1)
                .map(|&n| (n - 1) as usize)
                .sum::<usize>();
            unexpected += got.keys().filter(|k| !want.contains(k)).count();
        }
        if lost == 0 || Instant::now() >= until {
            return (lost, duplicated, unexpected);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub fn topics(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}.{i}")).collect()
}
