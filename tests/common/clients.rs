//! Real client libraries, as the tests drive them: Python's `websockets` (and Genesys'
//! Python SDK) and Node's `ws`. Each is used from where CI installed it, or installed
//! on first use into `target/`, so a plain `cargo test` needs no other set-up step.

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

const PYTHON_PACKAGES: [&str; 3] = [
    "purecloudplatformclientv2==269.0.0",
    "websockets==17.4",
    "prometheus-client==0.26.0",
];
/// Node's `ws`; playwright-core, which drives Debian's Chromium (it downloads no
/// browser of its own); Genesys' Node SDK.
const NODE_PACKAGES: [&str; 3] = [
    "ws@8.23.1",
    "playwright-core@1.65.1",
    "purecloud-platform-client-v2@262.0.0",
];

/// The Python packages' directory (for `PYTHONPATH`).
pub async fn python_deps(python: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/python");
    let importable = || async {
        Command::new(python)
            .args([
                "-c",
                "import PureCloudPlatformClientV2, websockets, prometheus_client",
            ])
            .env("PYTHONPATH", dir)
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if !importable().await {
        let installed = Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                dir,
            ])
            .args(PYTHON_PACKAGES)
            .status()
            .await
            .expect("pip runs");
        assert!(
            installed.success(),
            "could not install {PYTHON_PACKAGES:?} with pip"
        );
        assert!(
            importable().await,
            "{PYTHON_PACKAGES:?} installed but not importable"
        );
    }
    dir.to_owned()
}

/// The Node packages' `node_modules` (for `NODE_PATH`).
pub async fn node_deps() -> String {
    let prefix = concat!(env!("CARGO_MANIFEST_DIR"), "/target/node");
    let modules = format!("{prefix}/node_modules");
    let installed = |package: &str| {
        let name = package.rsplit_once('@').map_or(package, |(name, _)| name);
        std::path::Path::new(&format!("{modules}/{name}/package.json")).exists()
    };
    if !NODE_PACKAGES.iter().all(|package| installed(package)) {
        let installed = Command::new("npm")
            .args([
                "install",
                "--prefix",
                prefix,
                "--no-audit",
                "--no-fund",
                "--silent",
            ])
            .args(NODE_PACKAGES)
            .status()
            .await
            .expect("npm runs");
        assert!(
            installed.success(),
            "could not install {NODE_PACKAGES:?} with npm"
        );
    }
    modules
}

/// A close-code reporter (`tests/clients/close_client.*`) in `language` ("python" or
/// "node") against `url`; its one-line JSON report.
pub async fn close_client(language: &str, url: &str, mode: &str, arg: Option<&str>) -> Value {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    let mut command = match language {
        "python" => {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let deps = python_deps(&python).await;
            let mut command = Command::new(python);
            command
                .arg(format!("{dir}/close_client.py"))
                .env("PYTHONPATH", deps);
            command
        }
        "node" => {
            let modules = node_deps().await;
            let mut command = Command::new("node");
            command
                .arg(format!("{dir}/close_client.cjs"))
                .env("NODE_PATH", modules);
            command
        }
        other => panic!("no client in {other}"),
    };
    command.arg(url).arg(mode).args(arg).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the client reports in time")
        .expect("the client runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "{language} client printed no report: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Starts a close-code reporter without waiting for it (for closes the test causes).
pub fn spawn_close_client(
    language: &str,
    url: &str,
    mode: &str,
    arg: Option<&str>,
) -> tokio::task::JoinHandle<Value> {
    let (language, url, mode, arg) = (
        language.to_owned(),
        url.to_owned(),
        mode.to_owned(),
        arg.map(str::to_owned),
    );
    tokio::spawn(async move { close_client(&language, &url, &mode, arg.as_deref()).await })
}

/// `text` (an OpenMetrics exposition) parsed by the Prometheus project's own parser,
/// strictly: `{family: {"type", "samples": [[name, labels, value]]}}`.
pub async fn parse_metrics(text: &str) -> Value {
    use tokio::io::AsyncWriteExt;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let deps = python_deps(&python).await;
    let mut child = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/parse_metrics.py"
        ))
        .env("PYTHONPATH", deps)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "the exposition does not parse: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A client script from `tests/clients/` in `language` ("python" or "node"), run
/// with `args`, its JSON lines read one at a time.
pub struct Script {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Script {
    pub async fn start(language: &str, script: &str, args: &[&str]) -> Script {
        use std::process::Stdio;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
        let mut command = match language {
            "python" => {
                let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
                let deps = python_deps(&python).await;
                let mut command = Command::new(python);
                command.env("PYTHONPATH", deps);
                command
            }
            "node" => {
                let mut command = Command::new("node");
                command.env("NODE_PATH", node_deps().await);
                command
            }
            other => panic!("no client in {other}"),
        };
        let mut child = command
            .arg(format!("{dir}/{script}"))
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{language} {script} runs: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        Script {
            child,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        }
    }

    /// The next JSON line it prints, within `within`.
    pub async fn next(&mut self, within: Duration) -> Value {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .expect("the client answers in time")
            .expect("stdout")
            .expect("the client printed a line (see its stderr above)");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
    }

    pub async fn wait(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the client exits")
            .expect("wait")
    }
}
