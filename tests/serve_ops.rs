//! `handover serve` as a deployment sees it: ready on its own, before any desktop
//! exists; a Genesys outage afterwards shows in the metrics, not in readiness;
//! `handover probe` as the container's health check; JSON logs for a log pipeline,
//! with no secret in them; a second stop signal ends the process at once.

mod common;

use std::time::Duration;

use common::proxy::{A, Secrets, desktop, proxy_config, start_proxy};
use common::serve::{Served, config_text, handover, serve};
use common::*;
use handover::mock::{ClientSpec, MockConfig, Settings};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

/// A fake with `client-a` and the Genesys-like service times (a mint takes ~150 ms).
async fn realistic_fake(secret: &str, token_ttl: Duration) -> (handover::mock::MockGenesys, Api) {
    start(MockConfig {
        clients: vec![ClientSpec::new("client-a", secret, token_ttl)],
        settings: Settings::default(),
        socket_base: None,
    })
    .await
}

async fn wait_ready(served: &Served) -> Instant {
    wait_for("readiness", || async move {
        (served.readiness().await == Some(200)).then(Instant::now)
    })
    .await
}

#[tokio::test]
async fn serve_turns_ready_without_any_desktop_and_an_outage_later_does_not_unready_it() {
    let (fake, fake_api) = realistic_fake("secret-a", Duration::from_secs(3600)).await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "drain_delay = \"0s\"\ndrain_spread = \"0s\"",
        "",
    );
    let mut served = serve(&config, &[], "info").await;
    // As a Kubernetes readiness probe does: poll, with no desktop anywhere.
    let ready_at = wait_ready(&served).await;
    let took = ready_at - served.spawned;
    println!("ready {took:?} after the process was spawned, with no desktop");
    assert!(took < Duration::from_secs(2), "ready after {took:?}");
    assert_eq!(
        metric(&served.admin, "handover_client_sockets", &[]).await,
        Some(0.0)
    );
    let fake = &fake_api;
    wait_for("the first token, which proved the credential, to be retired", || async move {
        (fake.stats().await["clients"]["client-a"]["live_tokens"] == 0).then_some(())
    })
    .await;

    // Genesys' token endpoint goes down; a desktop needs a channel.
    fake_api
        .control(Method::POST, "faults/token", json!({"mode": "outage"}))
        .await;
    let client = served.client.base.replace("http://", "ws://");
    let waiting = tokio::spawn(async move {
        let _ = tokio_tungstenite::connect_async(format!("{client}/stream?topics=v2.t")).await;
    });
    let admin = &served.admin;
    wait_for("failed mints in the metrics", || async move {
        (metric(admin, "handover_token_mints_total", &["outcome=\"failed\""]).await? > 0.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        served.readiness().await,
        Some(200),
        "an outage shows in the metrics, not in readiness"
    );
    waiting.abort();
    served.signal("TERM").await;
    assert!(served.exit(DEADLINE).await.success());
}

#[tokio::test]
async fn a_secret_refused_at_start_is_retried_until_its_file_is_fixed() {
    let (fake, fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", "not-the-secret");
    let (_proxy, _client, admin) =
        start_proxy(proxy_config(&fake.base_url(), &secrets, &[A], "")).await;
    let fake_api = &fake_api;
    wait_for("a refused mint", || async move {
        let refused = fake_api.stats().await["counters"]["rejected_total"].as_u64()?;
        (refused > 0).then_some(())
    })
    .await;
    let not_ready = admin.get("/readyz").await;
    assert_eq!(
        (not_ready.status, not_ready.body),
        (503, Value::String("no token yet\n".into()))
    );
    secrets.write("a", SECRET);
    let admin = &admin;
    wait_for("readiness once the file is fixed", || async move {
        (admin.get("/readyz").await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn probe_exits_0_only_while_the_proxy_is_ready() {
    let (fake, _fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", "not-the-secret");
    let (proxy, _client, admin) =
        start_proxy(proxy_config(&fake.base_url(), &secrets, &[A], "")).await;
    let url = format!("http://{}", proxy.admin_addr);
    let probe = |args: Vec<String>, config_env: Option<std::path::PathBuf>| {
        let mut command = handover();
        command.arg("probe").args(args);
        if let Some(path) = config_env {
            command.env("HANDOVER_CONFIG", path);
        }
        async move {
            let output = command.output().await.expect("probe runs");
            let text = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            (output.status.success(), text)
        }
    };

    let (ok, text) = probe(vec!["--url".into(), url.clone()], None).await;
    assert!(
        !ok && text.contains("503") && text.contains("no token yet"),
        "{text}"
    );

    secrets.write("a", SECRET);
    let admin = &admin;
    wait_for("readiness", || async move {
        (admin.get("/readyz").await.status == 200).then_some(())
    })
    .await;
    let (ok, text) = probe(vec!["--url".into(), url.clone()], None).await;
    assert!(ok && text.contains("/readyz: ready"), "{text}");

    // --config (or HANDOVER_CONFIG, as the image sets it): the proxy's admin.listen.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"{}\"\n[genesys]\nregion = \"mypurecloud.com\"\n\
             [[credentials]]\nname = \"a\"\nclient_id = \"x\"\nclient_secret_env = \"UNUSED\"\n",
            proxy.admin_addr
        ),
    )
    .unwrap();
    let (ok, text) = probe(vec!["--config".into(), path.display().to_string()], None).await;
    assert!(ok, "{text}");
    let (ok, text) = probe(Vec::new(), Some(path)).await;
    assert!(ok, "{text}");

    let (ok, text) = probe(Vec::new(), None).await;
    assert!(!ok && text.contains("--url"), "{text}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (ok, text) = probe(vec!["--url".into(), closed_url], None).await;
    assert!(!ok && text.contains("no answer"), "{text}");
}

/// Runs of 60 or more base64url characters: the shape of a token (64).
fn token_shaped(text: &str) -> Option<&str> {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.split(|c: char| !is_token_char(c))
        .find(|run| run.len() >= 60)
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_never_carry_a_secret() {
    let (fake, fake_api) = realistic_fake("secret-json-alpha-1", Duration::from_secs(4)).await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-json-alpha-1");
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "drain_delay = \"0s\"\ndrain_spread = \"0s\"",
        "[handover]\nlead = \"2s\"\noverlap = \"500ms\"\n[upstream]\nmax_channels = 3\n",
    );
    let mut served = serve(&config, &["--log-format", "json"], "debug").await;
    let desktop = desktop(&served.client, &["v2.users.1.presence".to_owned()]).await;

    // Handovers, and a soft rotation the way it happens: Genesys first, the file after.
    let rotated = fake_api
        .control(
            Method::POST,
            "clients/client-a/rotate",
            json!({"mode": "keep_tokens", "secret": "secret-json-bravo-2"}),
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let mut channel_ids = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(6);
    let mut rewritten = false;
    while Instant::now() < until {
        for c in fake_api.stats().await["channels"].as_array().unwrap() {
            channel_ids.insert(c["id"].as_str().unwrap().to_owned());
        }
        fake_api.publish("v2.users.1.presence").await;
        if !rewritten && Instant::now() + Duration::from_secs(4) > until {
            secrets.write("a", "secret-json-bravo-2");
            rewritten = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(channel_ids.len() >= 2, "handovers happened");
    assert!(!desktop.received().is_empty() && !desktop.disconnected());
    drop(desktop);
    served.signal("TERM").await;
    assert!(served.exit(DEADLINE).await.success());

    let logs = (&mut served.logs).await.unwrap();
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| panic!("not one JSON object: {line}"))
        })
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "debug lines are there"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "a token was minted: ready"
                && l["credential"] == "a"
                && l["level"] == "INFO"),
        "fields at the top level:\n{logs}"
    );
    assert!(
        logs.contains("rejected this client secret"),
        "the refused secret was logged (not its value)"
    );
    // A handover is one line: the channel's internal name, why, how long, how it ended.
    let handover = lines
        .iter()
        .find(|l| l["message"] == "handover")
        .unwrap_or_else(|| panic!("no handover line:\n{logs}"));
    assert!(
        handover["channel"].as_str().unwrap().starts_with("ch-"),
        "{handover}"
    );
    assert_eq!(handover["reason"], "expiry");
    assert!(handover["duration_ms"].is_u64(), "{handover}");
    assert_eq!(handover["outcome"], "completed");
    for secret in ["secret-json-alpha-1", "secret-json-bravo-2"] {
        assert!(!logs.contains(secret), "a client secret leaked");
    }
    for id in &channel_ids {
        let bare = id.trim_start_matches("streaming-0-");
        assert!(!logs.contains(bare), "upstream channel id {id} in the logs");
    }
    assert_eq!(
        token_shaped(&logs),
        None,
        "something token-shaped in the logs"
    );
}

#[tokio::test]
async fn the_command_line_log_format_wins_over_the_config() {
    let (fake, _fake_api) = realistic_fake("secret-a", Duration::from_secs(3600)).await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "drain_delay = \"0s\"\ndrain_spread = \"0s\"",
        "[log]\nformat = \"json\"\n",
    );
    for (args, json) in [(&[][..], true), (&["--log-format", "text"][..], false)] {
        let mut served = serve(&config, args, "info").await;
        wait_ready(&served).await;
        served.signal("TERM").await;
        assert!(served.exit(DEADLINE).await.success());
        let logs = (&mut served.logs).await.unwrap();
        let first = logs.lines().next().expect("a log line");
        assert_eq!(
            serde_json::from_str::<Value>(first).is_ok(),
            json,
            "{args:?}: {first}"
        );
    }
}

#[tokio::test]
async fn a_second_stop_signal_ends_the_process_at_once() {
    let (fake, _fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", SECRET);
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "drain_delay = \"20s\"\nshutdown_grace = \"60s\"",
        "",
    );
    let mut served = serve(&config, &[], "info").await;
    wait_ready(&served).await;
    served.signal("TERM").await;
    let running = &served;
    wait_for("the drain to begin", || async move {
        (running.readiness().await == Some(503)).then_some(())
    })
    .await;
    let second = Instant::now();
    served.signal("INT").await;
    let status = served.exit(DEADLINE).await;
    assert!(!status.success(), "a forced stop is not a clean one");
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
    let logs = (&mut served.logs).await.unwrap();
    assert!(logs.contains("second stop signal"), "{logs}");
}
