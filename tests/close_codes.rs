//! RFC 6455 closes as real client libraries see them: Python's `websockets` and
//! Node's `ws` report 1006 when a Close goes unanswered, and the common
//! `on('close', code => code !== 1000 && reconnect())` then reconnects after every
//! deliberate logout. A desktop's Close must be answered with a Close, and a close
//! the proxy starts (1000 replaced, 1012 restarting, 1013 too slow) must reach the
//! client with its code and reason. The fake's socket is held to the same rule.

mod common;

use std::time::Duration;

use common::clients::{close_client, spawn_close_client};
use common::proxy::*;
use common::*;
use handover::mock::Settings;
use serde_json::json;

const CLIENTS: [&str; 2] = ["python", "node"];

async fn world() -> World {
    World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await
}

/// A client channel on the proxy: (id, connectUri).
async fn proxy_channel(client: &Api, topics: &[&str]) -> (String, String) {
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let uri = created.body["connectUri"].as_str().unwrap().to_owned();
    if !topics.is_empty() {
        let body: Vec<_> = topics.iter().map(|t| json!({"id": t})).collect();
        let reply = client
            .call(
                reqwest::Method::PUT,
                &format!("/api/v2/notifications/channels/{id}/subscriptions"),
                "",
                Some(json!(body)),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    (id, uri)
}

/// Waits until the proxy counts `n` client sockets.
async fn client_sockets(admin: &Api, n: usize) {
    let line = format!("handover_client_sockets {n}");
    wait_for(&line.clone(), || {
        let (admin, line) = (admin.clone(), line.clone());
        async move {
            let metrics = admin.get("/metrics").await.body;
            metrics.as_str()?.lines().any(|l| l == line).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_desktops_close_is_answered_by_the_proxy_and_by_the_fake() {
    let w = world().await;
    let (_, proxy_uri) = proxy_channel(&w.client, &[]).await;
    let token = w.fake_api.mint("client-a", "secret-a").await;
    let (_, fake_uri) = w.fake_api.channel(&token).await;
    for language in CLIENTS {
        for (what, uri) in [("proxy", &proxy_uri), ("fake", &fake_uri)] {
            let report = close_client(language, uri, "client-close", None).await;
            assert_eq!(
                report["code"], 1000,
                "{language} closing on the {what} saw {report}"
            );
        }
    }
}

#[tokio::test]
async fn closes_the_proxy_starts_reach_the_client_with_code_and_reason() {
    let w = world().await;
    for language in CLIENTS {
        // 1000: a second socket on the same channel replaces the first.
        let (_, uri) = proxy_channel(&w.client, &[]).await;
        let reader = spawn_close_client(language, &uri, "server-close", None);
        client_sockets(&w.admin, 1).await;
        let _newer = connect(&uri).await;
        let report = reader.await.unwrap();
        assert_eq!(report["code"], 1000, "{language}: {report}");
        assert_eq!(report["reason"], "replaced by a newer connection");
        drop(_newer);
        client_sockets(&w.admin, 0).await;
    }
    // The fake, likewise.
    let token = w.fake_api.mint("client-a", "secret-a").await;
    let (_, fake_uri) = w.fake_api.channel(&token).await;
    for language in CLIENTS {
        let reader = spawn_close_client(language, &fake_uri, "server-close", None);
        // The proxy holds no upstream socket here (no topic): this one is the client's.
        wait_for_sockets(&w.fake_api, 1).await;
        let _newer = connect(&fake_uri).await;
        let report = reader.await.unwrap();
        assert_eq!(report["code"], 1000, "{language} on the fake: {report}");
        drop(_newer);
        wait_for_sockets(&w.fake_api, 0).await;
    }
}

#[tokio::test]
async fn a_client_too_slow_to_read_is_closed_with_1013() {
    let w = world().await;
    for (n, language) in CLIENTS.into_iter().enumerate() {
        let topic = format!("v2.slow.{n}");
        let (_, uri) = proxy_channel(&w.client, &[&topic]).await;
        let reader = spawn_close_client(language, &uri, "slow", Some("3"));
        client_sockets(&w.admin, 1).await;
        // 2 KiB events, far more than socket buffers and the proxy's queue of 1024
        // frames hold, while the client reads nothing.
        let stream = w
            .fake_api
            .control(
                reqwest::Method::POST,
                "streams",
                json!({"topics": [topic], "rate": 4000.0, "count": 6000, "body": {"pad": "x".repeat(2048)}}),
            )
            .await;
        assert_eq!(stream.status, 202, "{}", stream.body);
        let report = reader.await.unwrap();
        assert_eq!(report["code"], 1013, "{language}: {report}");
        assert_eq!(report["reason"], "client too slow: reconnect");
        client_sockets(&w.admin, 0).await;
    }
}

#[tokio::test]
async fn a_stopping_proxy_closes_with_1012_so_that_clients_reconnect() {
    let extra =
        "[server]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\ndrain_spread = \"500ms\"\n";
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), extra).await;
    let mut readers = Vec::new();
    for language in CLIENTS {
        let (_, uri) = proxy_channel(&w.client, &[]).await;
        readers.push((
            language,
            spawn_close_client(language, &uri, "server-close", None),
        ));
    }
    client_sockets(&w.admin, 2).await;
    w.proxy.stop().await;
    for (language, reader) in readers {
        let report = reader.await.unwrap();
        assert_eq!(report["code"], 1012, "{language}: {report}");
        assert_eq!(report["reason"], "proxy restarting: reconnect");
    }
}
