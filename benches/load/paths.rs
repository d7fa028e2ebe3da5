//! The things under test: the fake Genesys Cloud (in-process, or external with
//! `--genesys`), the proxy as its own process (so its CPU and memory can be read), and
//! Debian's nginx as a plain WebSocket proxy in front of the fake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use handover::mock::{ClientSpec, MockConfig, MockGenesys, ServiceTimes, Settings};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const CLIENT_ID: &str = "bench-client";
pub const SECRET: &str = "bench-secret";
/// The direct and nginx paths' own OAuth client: their clients make a channel each,
/// which must not count against the proxies' client (they would be others' channels
/// to it, leaving it no room).
const DIRECT_CLIENT_ID: &str = "bench-direct-client";

/// A fake Genesys Cloud: ours in-process, or one at a URL.
pub struct Fake {
    pub url: String,
    _running: Option<MockGenesys>,
}

impl Fake {
    pub async fn start(
        external: Option<&str>,
        token_ttl: Duration,
        service_times: ServiceTimes,
    ) -> anyhow::Result<Fake> {
        if let Some(url) = external {
            return Ok(Fake {
                url: url.trim_end_matches('/').to_owned(),
                _running: None,
            });
        }
        let fake = MockGenesys::start(MockConfig {
            clients: vec![
                ClientSpec::new(CLIENT_ID, SECRET, token_ttl),
                ClientSpec::new(DIRECT_CLIENT_ID, SECRET, token_ttl),
            ],
            settings: Settings {
                // Direct clients need a channel each; limits are not what is measured.
                max_channels_per_client: 1_000_000,
                rate_limit_per_min: 0,
                service_times,
                ..Settings::default()
            },
            socket_base: None,
        })
        .await?;
        Ok(Fake {
            url: fake.base_url(),
            _running: Some(fake),
        })
    }

    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    /// A token for clients that go to the fake directly (their own OAuth client with
    /// the in-process fake).
    pub async fn token(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        let client = if self._running.is_some() {
            DIRECT_CLIENT_ID
        } else {
            CLIENT_ID
        };
        let reply: serde_json::Value = http
            .post(format!("{}/oauth/token", self.url))
            .basic_auth(client, Some(SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(reply["access_token"]
            .as_str()
            .context("no access_token")?
            .to_owned())
    }
}

/// A process under test.
pub struct Process {
    /// Held so that dropping the process kills it (`kill_on_drop`).
    child: Child,
    pub pid: u32,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Stops it with SIGTERM and waits (up to 30 s) until it exits: a proxy killed
    /// outright would leave its channels at the fake until their tokens expire, and
    /// the next proxy on that fake would count them as someone else's.
    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// The proxy, started from the release binary with a config pointing at the fake.
pub struct ProxyProcess {
    pub process: Process,
    pub client_url: String,
    /// Handovers as the proxy logged them (its JSON log, one line each): when each
    /// completed (Unix ms) and how long it took (ms).
    pub handovers: Arc<Mutex<Vec<(u64, f64)>>>,
}

impl ProxyProcess {
    pub async fn spawn(fake: &Fake, extra_toml: &str) -> anyhow::Result<ProxyProcess> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("handover.toml");
        std::fs::write(
            &config,
            format!(
                // Above the default cap of 10,000 connections: the idle-memory phase
                // holds 10,000 sockets besides its REST connections.
                "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 15000\ndrain_delay = \"0s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [genesys]\nlogin_url = \"{url}\"\napi_url = \"{url}\"\n\
                 [[credentials]]\nname = \"bench\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{SECRET}\"\n{extra_toml}",
                url = fake.url
            ),
        )?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_handover"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "warn,handover::upstream::pool=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the handover binary")?;
        let handovers = Arc::new(Mutex::new(Vec::new()));
        let mut log = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        let recorded = handovers.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = log.next_line().await {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if entry["message"] != "handover" {
                    continue;
                }
                let at = entry["timestamp"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                let took = entry["duration_ms"].as_f64().unwrap_or(0.0);
                recorded.lock().unwrap().push((at, took));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the proxy did not start")??
            .context("the proxy exited")?;
        let rest = line
            .strip_prefix("listening on ")
            .context("unexpected first line")?;
        let (client, _admin) = rest
            .split_once(", admin on ")
            .context("unexpected first line")?;
        let pid = child.id().context("no pid")?;
        Ok(ProxyProcess {
            client_url: format!("http://{client}"),
            handovers,
            process: Process {
                child,
                pid,
                _dir: dir,
            },
        })
    }
}

/// Debian's `redis-server` on a unix socket in a temp dir, without persistence, for
/// the cluster path.
pub struct Redis {
    pub process: Process,
    pub url: String,
}

impl Redis {
    /// `None` when `redis-server` is not installed.
    pub async fn spawn() -> anyhow::Result<Option<Redis>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("redis.sock");
        let child = match Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let pid = child.id().context("no pid")?;
        let redis = Redis {
            url: format!("redis+unix://{}", socket.display()),
            process: Process {
                child,
                pid,
                _dir: dir,
            },
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while redis.commands_processed().await.is_err() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(redis))
    }

    /// `total_commands_processed` from `INFO stats`.
    pub async fn commands_processed(&self) -> anyhow::Result<u64> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut connection)
            .await?;
        info.lines()
            .find_map(|line| line.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .context("no total_commands_processed in INFO")
    }
}

/// nginx as a plain WebSocket reverse proxy in front of the fake.
pub struct Nginx {
    pub process: Process,
    pub addr: SocketAddr,
    pub version: String,
}

impl Drop for Nginx {
    /// A SIGKILL to the master (`kill_on_drop`) would leave its workers running: ask
    /// it to stop them and itself, and make sure none is left.
    fn drop(&mut self) {
        let pids = super::system::with_children(self.process.pid);
        let signal = |sig: &str, pid: u32| {
            let _ = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status();
        };
        signal("-TERM", self.process.pid);
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|&p| super::system::running(p)) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &pid in pids.iter().filter(|&&p| super::system::running(p)) {
            signal("-KILL", pid);
        }
    }
}

impl Nginx {
    /// `Ok(None)` when nginx is not installed.
    pub async fn spawn(fake_addr: &str) -> anyhow::Result<Option<Nginx>> {
        let Some(binary) = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        else {
            return Ok(None);
        };
        let version = Command::new(&binary).arg("-v").output().await?;
        let version = String::from_utf8_lossy(&version.stderr).trim().to_owned();
        let dir = tempfile::tempdir()?;
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        let prefix = dir.path().display().to_string();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                r#"daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 32768; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream fake {{ server {fake_addr}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_buffering off;
        }}
    }}
}}
"#
            ),
        )?;
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nginx")?;
        let pid = child.id().context("no pid")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if tokio::time::Instant::now() > until {
                bail!("nginx did not start listening on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Some(Nginx {
            process: Process {
                child,
                pid,
                _dir: dir,
            },
            addr,
            version,
        }))
    }
}
