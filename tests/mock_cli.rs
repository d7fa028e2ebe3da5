//! `handover mock-genesys` as a user runs it: it prints `listening on ADDR` when
//! ready, and the clients given on the command line can mint tokens.

mod common;

use std::process::Stdio;

use common::Api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn mock_genesys_command_listens_and_serves_its_clients() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_handover"))
        .args([
            "mock-genesys",
            "--listen",
            "127.0.0.1:0",
            "--client",
            "cli-id:cli-secret",
        ])
        .args([
            "--token-ttl",
            "30s",
            "--heartbeat",
            "30s",
            "--max-channels",
            "20",
        ])
        .args([
            "--rate-limit",
            "300",
            "--latency",
            "1ms",
            "--token-latency",
            "1ms",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(common::DEADLINE, lines.next_line())
        .await
        .expect("a line before the deadline")
        .unwrap()
        .expect("one line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("`listening on ADDR`");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    handover::install_crypto_provider();
    let api = Api::new(format!("http://{addr}"));
    let reply = api
        .token_request("cli-id", "cli-secret", "client_credentials")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["expires_in"], 30);
    assert_eq!(
        api.token_request("demo-client", "demo-secret", "client_credentials")
            .await
            .status,
        400,
        "the default client exists only when none is given"
    );
    child.kill().await.unwrap();
}
