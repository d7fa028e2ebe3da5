//! Running the proxy against the fake, and simulated desktops that record what they
//! receive so that tests can count lost, duplicated and unexpected events.

use std::collections::BTreeSet;

use std::time::Duration;

use handover::app::Proxy;
use handover::config::Config;
use handover::mock::{ClientSpec, MockConfig, MockGenesys, Settings};
use handover::sim::tally;
use serde_json::json;
use tokio::time::Instant;

use super::{Api, DEADLINE};

/// One OAuth client the proxy uses: a credential set with its secret in a file.
pub struct Credential {
    pub name: &'static str,
    pub client_id: &'static str,
}

/// Credential set "a": OAuth client `client-a` (secret `secret-a` at the start).
pub const A: Credential = Credential {
    name: "a",
    client_id: "client-a",
};
/// Credential set "b": OAuth client `client-b` (secret `secret-b` at the start).
pub const B: Credential = Credential {
    name: "b",
    client_id: "client-b",
};

/// A fake with the OAuth clients `client-a` and `client-b` (tokens live `token_ttl`),
/// their secrets in files, and a proxy in front of it minting with `credentials`.
pub struct World {
    pub fake: MockGenesys,
    pub fake_api: Api,
    pub proxy: Proxy,
    pub client: Api,
    pub admin: Api,
    pub secrets: Secrets,
}

impl World {
    pub async fn start(
        credentials: &[Credential],
        token_ttl: Duration,
        settings: Settings,
        extra: &str,
    ) -> World {
        let (fake, fake_api) = super::start(MockConfig {
            clients: vec![
                ClientSpec::new("client-a", "secret-a", token_ttl),
                ClientSpec::new("client-b", "secret-b", token_ttl),
            ],
            settings,
            socket_base: None,
        })
        .await;
        let secrets = Secrets::new();
        secrets.write("a", "secret-a");
        secrets.write("b", "secret-b");
        let config = proxy_config(&fake.base_url(), &secrets, credentials, extra);
        let (proxy, client, admin) = start_proxy(config).await;
        World {
            fake,
            fake_api,
            proxy,
            client,
            admin,
            secrets,
        }
    }
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
    // `extra` may bring its own [server] table (with `listen`), replacing the default.
    let server = if extra.contains("[server]") {
        ""
    } else {
        "[server]\nlisten = \"127.0.0.1:0\"\n"
    };
    // And its own [admin] table.
    let admin = if extra.contains("[admin]") {
        ""
    } else {
        "[admin]\nlisten = \"127.0.0.1:0\"\n"
    };
    let mut toml =
        format!("{server}{admin}[genesys]\nlogin_url = \"{fake_url}\"\napi_url = \"{fake_url}\"\n");
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

pub use handover::sim::Desktop;

/// A simulated desktop on the proxy behind `proxy`.
pub async fn desktop(proxy: &Api, topics: &[String]) -> Desktop {
    Desktop::connect(&proxy.http, &proxy.base, topics)
        .await
        .unwrap_or_else(|e| panic!("desktop: {e}"))
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
        let t = tally(desktops, expected, u64::MAX);
        if t.lost == 0 || Instant::now() >= until {
            return (t.lost, t.duplicated, t.unexpected);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub fn topics(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}.{i}")).collect()
}
