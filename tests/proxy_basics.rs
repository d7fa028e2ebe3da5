//! The proxy end to end against the fake with realistic service times: channels,
//! subscriptions, fan-out, the frames the proxy writes itself.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::app::Proxy;
use handover::mock::{MockGenesys, Settings};
use reqwest::Method;
use serde_json::json;

async fn setup(extra: &str) -> (MockGenesys, Api, Proxy, Api, Api, Secrets) {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), extra).await;
    (w.fake, w.fake_api, w.proxy, w.client, w.admin, w.secrets)
}

#[tokio::test]
async fn desktops_share_one_upstream_channel_and_get_each_event_once() {
    let (_fake, fake_api, _proxy, client, admin, _secrets) = setup("").await;
    let a = desktop(&client, &topics("v2.users", 2)).await;
    let b = desktop(&client, &topics("v2.users", 3)).await;

    let stream = start_stream(&fake_api, &topics("v2.users", 4), 200.0, 40).await;
    stream_done(&fake_api, stream, tokio::time::Instant::now() + DEADLINE).await;
    let all = topics("v2.users", 4);
    let desktops = [a, b];
    let (lost, duplicated, unexpected) = settle(&desktops, &|d| d.expected(stream, &all, 40)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));

    let stats = fake_api.stats().await;
    assert_eq!(
        stats["clients"]["client-a"]["channels_created"], 1,
        "one upstream channel for both"
    );
    assert_eq!(
        stats["subscriptions"], 3,
        "the union of the desktops' topics"
    );
    let ready = admin.get("/readyz").await;
    assert_eq!(ready.status, 200);
    let metrics = admin.get("/metrics").await.body;
    let metrics = metrics.as_str().expect("Prometheus text");
    for line in [
        "handover_client_sockets 2",
        "handover_topics 3",
        "handover_upstream_channels 1",
        // One at start (readiness, retired at once), one for the channel.
        "handover_token_mints_total{credential=\"a\",outcome=\"minted\"} 2",
        "handover_events_deduplicated_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn the_proxy_answers_pings_and_never_forwards_system_frames() {
    let (_fake, fake_api, _proxy, client, _admin, _secrets) =
        setup("[upstream]\nmax_channels = 2\n").await;
    let created = client
        .send(
            client
                .http
                .post(format!("{}/api/v2/notifications/channels", client.base))
                .body("null"),
        )
        .await;
    let uri = created.body["connectUri"].as_str().unwrap().to_owned();
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert!(created.body["expires"].as_str().unwrap().ends_with('Z'));
    let mut socket = connect(&uri).await;
    send_text(&mut socket, r#"{"message":"ping"}"#).await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(
            frame,
            json!({"topicName": "channel.metadata", "eventBody": {"message": "pong"}})
        ),
        other => panic!("expected a pong, got {other:?}"),
    }
    // In-band subscribe, as a third-party library does it.
    send_text(
        &mut socket,
        r#"{"message":"subscribe","topics":["v2.a"],"correlationId":"c-1"}"#,
    )
    .await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(
            frame,
            json!({"correlationId": "c-1", "result": "200", "status": "subscribed"})
        ),
        other => panic!("expected the subscribe answer, got {other:?}"),
    }
    let listed = client
        .call(
            Method::GET,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            None,
        )
        .await;
    assert_eq!(
        listed.body["entities"],
        json!([{"id": "v2.a", "state": "Permitted"}])
    );

    // A maintenance close upstream is a handover: the client sees no system frame.
    let warned = fake_api
        .control(Method::POST, "socket-closing", json!({"close_after": "2s"}))
        .await;
    assert_eq!(warned.body["channels"].as_array().unwrap().len(), 1);
    fake_api.publish("v2.a").await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(
            frame["topicName"], "v2.a",
            "system frames are not forwarded"
        ),
        other => panic!("expected the event, got {other:?}"),
    }
}

#[tokio::test]
async fn readiness_answers_503_while_the_proxy_shuts_down() {
    let World {
        fake: _fake,
        fake_api,
        proxy,
        client,
        admin,
        secrets: _secrets,
    } = World::start(
        &[A],
        Duration::from_secs(3600),
        Settings::default(),
        "[server]\nlisten = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\ndrain_spread = \"0s\"\n",
    )
    .await;
    let desktop = desktop(&client, &["v2.bye".to_owned()]).await;
    assert_eq!(admin.get("/readyz").await.status, 200);
    // Make retiring the upstream token slow, so that shutdown takes a while.
    fake_api
        .patch_settings(json!({"service_times": {"token": "0s", "api": "1s", "ws_upgrade": "0s", "jitter": 0.0}}))
        .await;
    let stopping = tokio::spawn(proxy.stop());
    wait_for("readyz to answer 503", || {
        let admin = admin.clone();
        async move { (admin.get("/readyz").await.status == 503).then_some(()) }
    })
    .await;
    wait_for("the client socket to close", || {
        let closed = desktop.disconnected();
        async move { closed.then_some(()) }
    })
    .await;
    assert_eq!(
        desktop.log.lock().unwrap().closed,
        Some(Some(1012)),
        "service restart: reconnect"
    );
    stopping.await.unwrap();
    let after = admin
        .http
        .get(format!("{}/readyz", admin.base))
        .send()
        .await;
    assert!(after.is_err(), "the admin listener stops last");
}
