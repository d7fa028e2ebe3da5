//! `handover serve` as its own process, as an operator runs it: a config file, the
//! addresses it prints, its logs, signals and exit status.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Api, DEADLINE};

pub fn handover() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_handover"));
    command.kill_on_drop(true).env_remove("HANDOVER_CONFIG");
    command
}

/// A `[server]`/`[admin]`/`[genesys]`/`[[credentials]]` config for the fake at
/// `fake_url`, with credential set "a" (`client-a`, its secret in `secret_file`), then
/// `extra` (which may add keys to `[server]` with `server_extra`).
pub fn config_text(
    fake_url: &str,
    secret_file: &std::path::Path,
    server_extra: &str,
    extra: &str,
) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [genesys]\nlogin_url = \"{fake_url}\"\napi_url = \"{fake_url}\"\n\
         [[credentials]]\nname = \"a\"\nclient_id = \"client-a\"\nclient_secret_file = \"{}\"\n{extra}",
        secret_file.display()
    )
}

/// A running `handover serve`.
pub struct Served {
    pub child: Child,
    pub pid: u32,
    /// When the process was spawned.
    pub spawned: Instant,
    pub client: Api,
    pub admin: Api,
    /// Everything it writes to stderr, once it has exited.
    pub logs: JoinHandle<String>,
    _dir: tempfile::TempDir,
}

/// Writes `config` to a file and runs `handover serve --config FILE ARGS…` with
/// `RUST_LOG=log_level`; returns once it printed the addresses it listens on.
pub async fn serve(config: &str, args: &[&str], log_level: &str) -> Served {
    serve_with(handover(), config, args, log_level).await
}

/// [`serve`] through `command`, which runs the binary (`prlimit … -- handover`).
pub async fn serve_with(
    mut command: Command,
    config: &str,
    args: &[&str],
    log_level: &str,
) -> Served {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("handover.toml");
    std::fs::write(&path, config).expect("write config");
    let spawned = Instant::now();
    let mut child = command
        .args(["serve", "--config"])
        .arg(&path)
        .args(args)
        .env("RUST_LOG", log_level)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("handover starts");
    let pid = child.id().expect("pid");
    let mut stderr = child.stderr.take().expect("stderr");
    let logs = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(DEADLINE, stdout.next_line())
        .await
        .expect("it prints its addresses in time")
        .expect("stdout")
        .expect("a first line");
    let rest = line.strip_prefix("listening on ").expect("listening line");
    let (client_addr, admin_addr) = rest.split_once(", admin on ").expect("two addresses");
    Served {
        pid,
        spawned,
        client: Api::new(format!("http://{client_addr}")),
        admin: Api::new(format!("http://{admin_addr}")),
        child,
        logs,
        _dir: dir,
    }
}

impl Served {
    /// Sends a signal (`TERM`, `INT`, `HUP`) to the process.
    pub async fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "kill -{name} failed");
    }

    /// The exit status, failing the test if it takes longer than `within`.
    pub async fn exit(&mut self, within: Duration) -> ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running after {within:?}"))
            .expect("wait")
    }

    /// The readiness status code, or None while the admin listener does not answer.
    pub async fn readiness(&self) -> Option<u16> {
        let response = self
            .admin
            .http
            .get(format!("{}/readyz", self.admin.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }
}
