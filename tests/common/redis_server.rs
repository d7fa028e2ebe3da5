//! A real `redis-server` (Debian's; `.ci/run` installs it), started by the test in a
//! temp dir on a unix socket, without persistence, and killed when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::wait_for;

pub struct RedisServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Arguments besides the unix socket (TLS).
    extra: Vec<String>,
    /// With TLS: `rediss://localhost:<port>`.
    tls_url: Option<String>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = RedisServer {
            child: None,
            dir,
            extra: Vec::new(),
            tls_url: None,
        };
        server.restart().await;
        server
    }

    /// A server that also listens with TLS on a free port, its certificate signed by
    /// `ca` (clients are not asked for one).
    pub async fn start_tls(ca: &super::certs::Ca) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = super::certs::install(dir.path(), &ca.server());
        let ca_file = ca.write(dir.path(), "ca.pem");
        // Redis takes no port 0 for TLS: take a free one and hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let extra = vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert.display().to_string(),
            "--tls-key-file".into(),
            key.display().to_string(),
            "--tls-ca-cert-file".into(),
            ca_file.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        let mut server = RedisServer {
            child: None,
            dir,
            extra,
            tls_url: Some(format!("rediss://localhost:{port}")),
        };
        server.restart().await;
        server
    }

    /// `rediss://localhost:<port>` of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        self.tls_url.clone().expect("a TLS server")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `redis+unix:///…/redis.sock`, for `[cluster] redis_url`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Kills the server (as a crash would: it keeps nothing).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Starts it (again, empty), and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop().await;
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(self.socket())
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server runs (Debian's redis-server package; .ci/run installs it)");
        self.child = Some(child);
        let url = self.url();
        wait_for("redis-server to answer", || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut connection = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .ok()
            }
        })
        .await;
    }

    /// A connection for the test's own looks.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("redis url");
        tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .expect("redis answers in time")
        .expect("redis connection")
    }
}
