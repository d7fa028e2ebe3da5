//! A broken or hostile upstream cannot crash or wedge the proxy: absurd token
//! lifetimes, an absurd `Retry-After`, a 256 MiB answer, a redirect, and a
//! `connectUri` that points somewhere else. Each is tried on `handover check` (which
//! used to exit 101 on some of them) and on a running proxy.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::hostile::{Hostile, Twist};
use common::proxy::*;
use common::*;
use handover::mock::Settings;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::time::Instant;

/// A fake (client-a) with a hostile front; a secrets dir with a's secret.
async fn setup() -> (handover::mock::MockGenesys, Api, Hostile, Secrets) {
    let (fake, fake_api) = start(handover::mock::MockConfig {
        clients: vec![handover::mock::ClientSpec::new(
            "client-a",
            "secret-a",
            Duration::from_secs(3600),
        )],
        settings: Settings::default(),
        socket_base: None,
    })
    .await;
    let hostile = Hostile::start(fake.base_url()).await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    (fake, fake_api, hostile, secrets)
}

/// `handover check` with the token endpoint at `login`; (exit code, stdout+stderr).
async fn check(login: &str, api: &str, secrets: &Secrets) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handover.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[genesys]\nlogin_url = \"{login}\"\napi_url = \"{api}\"\n\
             [[credentials]]\nname = \"a\"\nclient_id = \"client-a\"\nclient_secret_file = \"{}\"\n",
            secrets.path("a").display()
        ),
    )
    .unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(env!("CARGO_BIN_EXE_handover"))
            .args(["check", "--config"])
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("check finishes")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// A proxy minting through `login` and calling the API at `api`.
async fn proxy(login: &str, api: &str, secrets: &Secrets) -> (handover::app::Proxy, Api, Api) {
    let mut config = proxy_config(api, secrets, &[A], "");
    config.genesys.login_url = login.to_owned();
    start_proxy(config).await
}

/// A listener that only counts who connects to it.
async fn trap() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(stream);
        }
    });
    (addr.to_string(), hits)
}

async fn status(api: &Api, path: &str) -> u16 {
    api.get(path).await.status
}

#[tokio::test]
async fn absurd_token_lifetimes_neither_crash_nor_wedge_the_proxy() {
    let (fake, _fake_api, hostile, secrets) = setup().await;
    // 2^64 - 1 seconds: clamped to Genesys' 48 h, and the proxy works.
    hostile.twist(Some(Twist::ExpiresIn(json!(u64::MAX))));
    let (code, text) = check(&hostile.url(), &fake.base_url(), &secrets).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("valid for 2days"), "{text}");
    let (_proxy, client, _admin) = proxy(&hostile.url(), &fake.base_url(), &secrets).await;
    let forever = desktop(&client, &["v2.forever".to_owned()]).await;
    assert!(!forever.disconnected());

    // 0 and negative: not a usable token. `check` says so and exits 1 (not 101); a
    // running proxy stays up, unready, and recovers when the answers come right.
    for expires_in in [json!(0), json!(-1), json!("soon"), json!(1e300)] {
        hostile.twist(Some(Twist::ExpiresIn(expires_in.clone())));
        let (code, text) = check(&hostile.url(), &fake.base_url(), &secrets).await;
        if expires_in == json!(1e300) {
            assert_eq!(code, Some(0), "{expires_in}: {text}");
        } else {
            assert_eq!(code, Some(1), "{expires_in}: {text}");
            assert!(text.contains("token answer"), "{text}");
        }
    }
    hostile.twist(Some(Twist::ExpiresIn(json!(0))));
    let (_proxy, client, admin) = proxy(&hostile.url(), &fake.base_url(), &secrets).await;
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { desktop(&client, &["v2.later".to_owned()]).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status(&admin, "/healthz").await, 200);
    assert_eq!(status(&admin, "/readyz").await, 503, "no usable token yet");
    hostile.twist(None);
    let later = tokio::time::timeout(Duration::from_secs(30), subscribing)
        .await
        .expect("subscribed once tokens are sane")
        .unwrap();
    assert!(!later.disconnected());
    assert_eq!(status(&admin, "/readyz").await, 200);
}

#[tokio::test]
async fn an_absurd_retry_after_is_clamped_not_slept() {
    let (fake, _fake_api, hostile, secrets) = setup().await;
    hostile.twist(Some(Twist::Throttled(u64::MAX.to_string())));
    let (code, text) = check(&hostile.url(), &fake.base_url(), &secrets).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("throttled"), "{text}");
    // A running proxy backs off (at most 5 minutes, not 584 billion years) and keeps
    // answering: no panic from deadline arithmetic.
    let (_proxy, client, admin) = proxy(&hostile.url(), &fake.base_url(), &secrets).await;
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let pending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call(
                    reqwest::Method::PUT,
                    &format!("/api/v2/notifications/channels/{id}/subscriptions"),
                    "",
                    Some(json!([{"id": "v2.throttled"}])),
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&admin, "/healthz").await, 200);
    assert_eq!(status(&admin, "/readyz").await, 503);
    assert_eq!(
        client.post("/api/v2/notifications/channels").await.status,
        200
    );
    assert!(!pending.is_finished(), "still waiting, not crashed");
    pending.abort();
}

#[tokio::test]
async fn a_256_mib_answer_is_cut_short() {
    let (fake, _fake_api, hostile, secrets) = setup().await;
    for content_length in [false, true] {
        hostile.sent.store(0, Ordering::Relaxed);
        hostile.twist(Some(Twist::HugeToken {
            bytes: 256 << 20,
            content_length,
        }));
        let started = Instant::now();
        let (code, text) = check(&hostile.url(), &fake.base_url(), &secrets).await;
        assert_eq!(code, Some(1), "{text}");
        assert!(text.contains("larger than any Genesys answer"), "{text}");
        let sent = hostile.sent.load(Ordering::Relaxed);
        assert!(
            sent < 32 << 20,
            "the proxy took {} MiB of a 256 MiB answer (content-length: {content_length})",
            sent >> 20
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (fake, _fake_api, hostile, secrets) = setup().await;
    let (elsewhere, hits) = trap().await;
    hostile.twist(Some(Twist::Redirect(format!(
        "http://{elsewhere}/oauth/token"
    ))));
    let (code, text) = check(&hostile.url(), &fake.base_url(), &secrets).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("307"), "{text}");
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "the credentials went nowhere else"
    );
}

#[tokio::test]
async fn a_foreign_connect_uri_is_never_connected_to() {
    let (fake, fake_api, hostile, secrets) = setup().await;
    let (elsewhere, hits) = trap().await;
    hostile.twist(Some(Twist::ConnectUri(format!(
        "ws://{elsewhere}/channels/streaming-0-x"
    ))));
    let (_proxy, client, admin) = proxy(&fake.base_url(), &hostile.url(), &secrets).await;
    // A desktop asks for a topic (the answer waits while the channel cannot open;
    // the desktop may give up meanwhile, the change goes on).
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let asking = tokio::spawn({
        let client = client.clone();
        async move {
            let body = json!([{"id": "v2.foreign"}]);
            let path = format!("/api/v2/notifications/channels/{id}/subscriptions");
            let _ = client
                .http
                .put(format!("{}{path}", client.base))
                .json(&body)
                .send()
                .await;
        }
    });
    // The proxy created channels (and retired their tokens) but never connected.
    wait_for("a channel attempt", || {
        let fake_api = fake_api.clone();
        async move {
            let stats = fake_api.stats().await;
            (stats["clients"]["client-a"]["channels_created"].as_u64()? >= 2).then_some(())
        }
    })
    .await;
    assert_eq!(hits.load(Ordering::Relaxed), 0);
    wait_for("the attempts' tokens retired", || {
        let fake_api = fake_api.clone();
        async move {
            let stats = fake_api.stats().await;
            (stats["clients"]["client-a"]["live_channels"].as_u64()? <= 1).then_some(())
        }
    })
    .await;
    // Only the API's own socket address is ever connected to; the proxy stays up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hits.load(Ordering::Relaxed), 0);
    assert_eq!(status(&admin, "/healthz").await, 200);
    asking.abort();
}

#[tokio::test]
async fn a_refused_channel_listing_counts_none_and_the_proxy_turns_ready_and_counts_later() {
    let (fake, fake_api, hostile, secrets) = setup().await;
    // The channel listing is refused (an older Genesys, a missing permission).
    hostile.twist(Some(Twist::Listing(404)));
    let (proxy, _client, admin) = proxy(&fake.base_url(), &hostile.url(), &secrets).await;
    let admin = &admin;
    wait_for("readiness and a failed listing", || async move {
        let refused = metric(
            admin,
            "handover_upstream_requests_total",
            &["route=\"list_channels\"", "status=\"404\""],
        )
        .await;
        (admin.get("/readyz").await.status == 200 && refused.is_some()).then_some(())
    })
    .await;
    // As before the proxy counted: none, and the whole budget.
    assert_eq!(proxy.pool.capacity().foreign, Some(0));
    assert_eq!(proxy.pool.capacity().slots, 4);

    // Someone else holds channels of the OAuth client; once the listing works again
    // (after a back-off, not a minute), they are counted.
    let other = fake_api.mint("client-a", "secret-a").await;
    for _ in 0..5 {
        fake_api.channel(&other).await;
    }
    hostile.twist(None);
    let pool = &proxy.pool;
    wait_for("the 5 counted", || async move {
        (pool.capacity().foreign == Some(5)).then_some(())
    })
    .await;
}
