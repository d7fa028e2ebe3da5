//! The front door as an operator meets it, on the binary: `check` says loudly what
//! is open, and `serve` under a low open-file limit raises its soft limit, disables
//! core dumps, and answers a crowd that would exhaust its file descriptors with
//! 503 at the connection cap — never failing `accept` with EMFILE — while a desktop
//! keeps every event.

mod common;

use std::time::Duration;

use common::proxy::{Secrets, start_stream, stream_done};
use common::serve::{config_text, handover, serve_with};
use common::*;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::time::Instant;

#[tokio::test]
async fn check_warns_about_an_open_door_and_a_readable_secret() {
    let (fake, _api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", SECRET);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(secrets.path("a"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.toml");
    let text = config_text(&fake.base_url(), &secrets.path("a"), "", "")
        .replacen("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:8080\"", 1)
        .replacen("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:9090\"", 1);
    std::fs::write(&path, text).unwrap();
    let output = handover()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for expected in [
        "WARNING: server.listen 0.0.0.0:8080 is reachable beyond this host and [topics] has no allow list",
        "WARNING: admin.listen 0.0.0.0:9090 is reachable beyond this host and [admin] token_file is not set",
        "without TLS",
        "client secret file",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

/// An idle connection's fate: whether it was answered 503, and when it closed.
async fn idle(addr: std::net::SocketAddr) -> Option<bool> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("an idle connection was never closed")
        .ok()?;
    Some(answer.starts_with(b"HTTP/1.1 503"))
}

#[tokio::test]
async fn a_crowd_that_would_exhaust_file_descriptors_meets_the_cap() {
    let (fake, fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", SECRET);
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "header_read_timeout = \"2s\"\n",
        "",
    )
    .replace("client-a", CLIENT);
    // A soft limit of 128 (hard 320): raised to 320 at start, which leaves room for
    // 64 connections beside the 256 descriptors kept for everything else.
    let mut limited = Command::new("prlimit");
    limited
        .args(["--nofile=128:320", "--", env!("CARGO_BIN_EXE_handover")])
        .kill_on_drop(true)
        .env_remove("HANDOVER_CONFIG");
    let mut served = serve_with(limited, &config, &[], "info").await;
    let addr: std::net::SocketAddr = served.client.base["http://".len()..].parse().unwrap();

    let topic = "v2.users.42.presence";
    let mut desktop = connect(&format!("ws://{addr}/stream?topics={topic}")).await;
    let events = 100u64;
    let stream = start_stream(&fake_api, &[topic.to_owned()], 50.0, events).await;
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < events as usize {
            match next_non_heartbeat(&mut desktop).await {
                Next::Text(frame) => seqs.push(frame["eventBody"]["seq"].as_u64().unwrap()),
                Next::Closed(code) => panic!("the desktop was disconnected ({code:?})"),
            }
        }
        seqs
    });

    // 300 idle connections, nearly the whole hard limit.
    let crowd: Vec<_> = (0..300).map(|_| tokio::spawn(idle(addr))).collect();
    let mut answered_503 = 0;
    for connection in crowd {
        answered_503 += usize::from(connection.await.unwrap() == Some(true));
    }
    assert!(
        answered_503 >= 300 - 64,
        "only {answered_503} got a 503 at the cap"
    );

    let seqs = tokio::time::timeout(DEADLINE, reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seqs,
        (0..events).collect::<Vec<_>>(),
        "every event, once, in order"
    );
    // The crowd is gone: a new desktop gets in.
    assert_eq!(
        served
            .client
            .post("/api/v2/notifications/channels")
            .await
            .status,
        200
    );
    stream_done(&fake_api, stream, Instant::now() + DEADLINE).await;

    served.signal("TERM").await;
    assert!(served.exit(Duration::from_secs(30)).await.success());
    let logs = served.logs.await.unwrap();
    assert!(
        logs.contains("soft 128 → 320, hard 320"),
        "the file limits are logged:\n{logs}"
    );
    assert!(logs.contains("core dumps disabled"), "{logs}");
    assert!(logs.contains("connection cap reached"), "{logs}");
    assert!(
        !logs.contains("accept failed"),
        "accept never failed:\n{logs}"
    );
}

#[tokio::test]
async fn the_access_and_audit_logs_say_who_read_what_and_never_a_channel_id() {
    let (fake, _fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", SECRET);
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "trusted_proxies = [\"127.0.0.1\"]\n",
        "",
    )
    .replace("client-a", CLIENT);
    let mut served = serve_with(handover(), &config, &["--log-format", "json"], "info").await;
    let client = &served.client;
    let created = client
        .send(
            client
                .http
                .post(format!("{}/api/v2/notifications/channels", client.base))
                .header("x-forwarded-for", "198.51.100.7"),
        )
        .await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let subscribed = client
        .send(
            client
                .http
                .put(format!(
                    "{}/api/v2/notifications/channels/{id}/subscriptions",
                    client.base
                ))
                .header("x-forwarded-for", "198.51.100.7")
                .json(&serde_json::json!([{"id": "v2.users.42.presence"}])),
        )
        .await;
    assert_eq!(subscribed.status, 200, "{}", subscribed.body);
    served.signal("TERM").await;
    assert!(served.exit(Duration::from_secs(30)).await.success());
    let logs = served.logs.await.unwrap();
    assert!(
        !logs.contains(&id),
        "a client channel id reached the log:\n{logs}"
    );
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let access = lines
        .iter()
        .find(|l| {
            l["target"] == "handover::access"
                && l["route"] == "/api/v2/notifications/channels/{id}/subscriptions"
        })
        .unwrap_or_else(|| panic!("no access line for the subscription:\n{logs}"));
    assert_eq!(access["peer"], "198.51.100.7");
    assert_eq!(access["method"], "PUT");
    assert_eq!(access["status"], 200);
    assert!(access["duration_ms"].is_u64());
    let audit = lines
        .iter()
        .find(|l| l["target"] == "handover::audit")
        .unwrap_or_else(|| panic!("no audit line:\n{logs}"));
    assert_eq!(audit["peer"], "198.51.100.7");
    assert_eq!(audit["added"], "[\"v2.users.42.presence\"]");
    assert!(audit["session"].is_u64());
}
