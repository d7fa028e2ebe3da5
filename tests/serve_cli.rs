//! `handover serve` and `handover check` as an operator runs them: config errors
//! stop it before it listens, SIGHUP reloads credentials without dropping clients,
//! and no secret, token or upstream channel id ever shows in its logs or answers.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::mock::{ClientSpec, MockConfig, Settings};
use reqwest::Method;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

fn handover() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_handover"));
    command.kill_on_drop(true);
    command
}

fn config_text(fake: &str, secrets: &Secrets, with_b: bool) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"1s\"\ndrain_spread = \"1s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[genesys]\nlogin_url = \"{fake}\"\napi_url = \"{fake}\"\n\
         [[credentials]]\nname = \"a\"\nclient_id = \"client-a\"\nclient_secret_file = \"{}\"\n",
        secrets.path("a").display()
    );
    if with_b {
        text.push_str(&format!(
            "[[credentials]]\nname = \"b\"\nclient_id = \"client-b\"\nclient_secret_file = \"{}\"\n",
            secrets.path("b").display()
        ));
    }
    text.push_str("[handover]\nlead = \"2s\"\noverlap = \"500ms\"\n[upstream]\nmax_channels = 3\n");
    text
}

#[tokio::test]
async fn a_config_error_names_the_file_and_key_and_stops_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[genesys]\nregion = \"mypurecloud.com\"\n\
         [[credentials]]\nname = \"a\"\nclient_id = \"x\"\nclient_secret = \"s\"\n[upstream]\nmax_chanels = 3\n",
    )
    .unwrap();
    let output = handover()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("upstream.max_chanels"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"));
}

#[tokio::test]
async fn check_validates_and_mints_once() {
    let (fake, _fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", SECRET);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.toml");
    std::fs::write(
        &path,
        config_text(&fake.base_url(), &secrets, false).replace("client-a", CLIENT),
    )
    .unwrap();
    let ok = handover()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).contains("minted a token with credential set \"a\"")
    );

    secrets.write("a", "wrong");
    let refused = handover()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("invalid_client"), "{stderr}");
    assert!(
        !stderr.contains("wrong"),
        "the secret is never printed: {stderr}"
    );
}

#[tokio::test]
async fn sighup_reloads_credentials_without_dropping_clients_and_nothing_secret_leaks() {
    let (fake, fake_api) = start(MockConfig {
        clients: vec![
            ClientSpec::new("client-a", "secret-alpha-123", Duration::from_secs(5)),
            ClientSpec::new("client-b", "secret-bravo-456", Duration::from_secs(5)),
        ],
        settings: Settings::default(),
        socket_base: None,
    })
    .await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-alpha-123");
    secrets.write("b", "secret-bravo-456");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.toml");
    std::fs::write(&path, config_text(&fake.base_url(), &secrets, false)).unwrap();

    let mut child = handover()
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, stdout.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let rest = line.strip_prefix("listening on ").expect("listening line");
    let (client_addr, admin_addr) = rest.split_once(", admin on ").unwrap();
    let client = Api::new(format!("http://{client_addr}"));
    let admin = Api::new(format!("http://{admin_addr}"));
    let mut stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });

    let desktop = desktop(&client, &["v2.users.1.presence".to_owned()]).await;
    // Collect every upstream channel id the fake hands out while handovers happen.
    let mut channel_ids = std::collections::BTreeSet::new();
    let mut frames_seen = Vec::new();
    std::fs::write(&path, config_text(&fake.base_url(), &secrets, true)).unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    wait_for("credential b after SIGHUP", || {
        let admin = admin.clone();
        async move {
            let list = admin.get("/admin/credentials").await;
            (list.body.as_array()?.len() == 2).then_some(())
        }
    })
    .await;
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        let stats = fake_api.stats().await;
        for c in stats["channels"].as_array().unwrap() {
            channel_ids.insert(c["id"].as_str().unwrap().to_owned());
        }
        fake_api.publish("v2.users.1.presence").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(channel_ids.len() >= 2, "handovers happened");
    assert!(!desktop.disconnected(), "the reload dropped no client");
    assert!(!desktop.received().is_empty());
    frames_seen.extend(desktop.log.lock().unwrap().other.iter().cloned());
    assert_eq!(frames_seen, Vec::<Value>::new());

    let mut answers = String::new();
    for path in [
        "/metrics",
        "/admin/credentials",
        "/admin/channels",
        "/readyz",
    ] {
        answers.push_str(
            &admin
                .send(admin.http.get(format!("{}{path}", admin.base)))
                .await
                .body
                .to_string(),
        );
    }
    let list = client
        .call(Method::GET, "/api/v2/notifications/channels", "", None)
        .await;
    answers.push_str(&list.body.to_string());

    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    assert!(
        tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
    let logs = logs.await.unwrap();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    for secret in ["secret-alpha-123", "secret-bravo-456"] {
        assert!(
            !logs.contains(secret) && !answers.contains(secret),
            "a client secret leaked"
        );
    }
    for id in &channel_ids {
        let bare = id.trim_start_matches("streaming-0-");
        assert!(!logs.contains(bare), "upstream channel id {id} in the logs");
        assert!(
            !answers.contains(bare),
            "upstream channel id {id} in an answer"
        );
    }
}
