//! Unplanned loss and bad input: a silent upstream socket is rebuilt and clients are
//! told of the gap; a client that reconnects keeps its subscriptions; bad requests
//! get Genesys-shaped errors and affect nobody else.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::app::Proxy;
use handover::mock::{MockGenesys, Settings};
use reqwest::Method;
use serde_json::json;
use tokio::time::Instant;

async fn setup(extra: &str) -> (MockGenesys, Api, Proxy, Api, Secrets) {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), extra).await;
    (w.fake, w.fake_api, w.proxy, w.client, w.secrets)
}

async fn first_event(desktop: &Desktop, fake_api: &Api, topic: &str) -> Instant {
    wait_for("an event", || {
        let log = desktop.log.clone();
        let fake_api = fake_api.clone();
        let topic = topic.to_owned();
        async move {
            if !log.lock().unwrap().events.is_empty() {
                return Some(Instant::now());
            }
            fake_api.publish(&topic).await;
            None
        }
    })
    .await
}

#[tokio::test]
async fn a_silent_upstream_socket_is_rebuilt_and_clients_hear_of_the_gap() {
    let (_fake, fake_api, proxy, client, _secrets) =
        setup("[upstream]\nheartbeat = \"500ms\"\n").await;
    let desktop = desktop(&client, &["v2.silent".to_owned()]).await;
    let stalled = fake_api.control(Method::POST, "stall", json!({})).await;
    assert_eq!(stalled.body["channels"].as_array().unwrap().len(), 1);
    let gap = wait_for("a gap notice", || {
        let log = desktop.log.clone();
        async move { log.lock().unwrap().gaps.first().cloned() }
    })
    .await;
    assert_eq!(gap["eventBody"]["topics"], json!(["v2.silent"]));
    first_event(&desktop, &fake_api, "v2.silent").await;
    assert_eq!(proxy.pool.rebuilds(), 1);
    assert!(!desktop.disconnected());
}

#[tokio::test]
async fn a_client_that_reconnects_keeps_its_subscriptions() {
    let (_fake, fake_api, _proxy, client, _secrets) =
        setup("[server]\nlisten = \"127.0.0.1:0\"\nclient_idle = \"30s\"\n").await;
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let uri = created.body["connectUri"].as_str().unwrap().to_owned();
    client
        .call(
            Method::PUT,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            Some(json!([{"id": "v2.back"}])),
        )
        .await;
    let first = connect(&uri).await;
    drop(first);
    let mut second = connect(&uri).await;
    wait_for("an event on the reconnected socket", || {
        let fake_api = fake_api.clone();
        async move { (fake_api.publish("v2.back").await["delivered"] == 1).then_some(()) }
    })
    .await;
    match next_non_heartbeat(&mut second).await {
        Next::Text(frame) => assert_eq!(frame["topicName"], "v2.back"),
        other => panic!("expected the event, got {other:?}"),
    }
    // A second socket on the same channel replaces the first.
    let mut third = connect(&uri).await;
    let (code, _) = until_closed(&mut second).await;
    assert_eq!(code, Some(1000));
    send_text(&mut third, r#"{"message":"ping"}"#).await;
    assert!(
        matches!(next_non_heartbeat(&mut third).await, Next::Text(f) if f["eventBody"]["message"] == "pong")
    );
}

#[tokio::test]
async fn bad_input_gets_genesys_shaped_errors_and_affects_no_one_else() {
    let (_fake, fake_api, _proxy, client, _secrets) = setup("").await;
    let bystander = desktop(&client, &["v2.ok".to_owned()]).await;
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let subs = format!("/api/v2/notifications/channels/{id}/subscriptions");

    let malformed = client
        .send(
            client
                .http
                .put(format!("{}{subs}", client.base))
                .body("[{\"id\":"),
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.body["code"], "bad.request");
    assert_eq!(malformed.body["status"], 400);
    assert_eq!(malformed.headers["content-type"], "application/json");

    let too_many: Vec<_> = (0..1001)
        .map(|i| json!({"id": format!("v2.t{i}")}))
        .collect();
    assert_eq!(
        client
            .call(Method::PUT, &subs, "", Some(json!(too_many)))
            .await
            .status,
        400
    );
    let long = "x".repeat(200);
    assert_eq!(
        client
            .call(Method::PUT, &subs, "", Some(json!([{"id": long}])))
            .await
            .status,
        400
    );
    assert_eq!(
        client.call(Method::PATCH, &subs, "", None).await.status,
        405
    );

    let unknown = client
        .call(
            Method::GET,
            "/api/v2/notifications/channels/handover-nothere/subscriptions",
            "",
            None,
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["code"], "not.found");
    let head = client
        .send(client.http.head(format!(
            "{}/api/v2/notifications/channels/handover-nothere",
            client.base
        )))
        .await;
    assert_eq!(head.status, 404);
    match tokio_tungstenite::connect_async(format!(
        "ws://{}/channels/handover-nothere",
        client.base.trim_start_matches("http://")
    ))
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected a 404, got {other:?}"),
    }
    assert_eq!(
        client.call(Method::GET, "/nowhere", "", None).await.status,
        404
    );
    let no_topics = client.get("/stream").await;
    assert_eq!(no_topics.status, 400);

    // Garbage on a client socket: ignored, the socket and everyone else carry on.
    let (uri, mut socket) = {
        let uri = created.body["connectUri"].as_str().unwrap().to_owned();
        let socket = connect(&uri).await;
        (uri, socket)
    };
    send_text(&mut socket, "not json at all").await;
    send_text(&mut socket, r#"{"message":"subscribe"}"#).await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(frame["result"], "400"),
        other => panic!("expected an error answer, got {other:?}"),
    }
    drop(uri);
    first_event(&bystander, &fake_api, "v2.ok").await;
    assert!(!bystander.disconnected());
}

#[tokio::test]
async fn stream_urls_subscribe_without_the_rest_dance() {
    let (_fake, fake_api, _proxy, client, _secrets) = setup("").await;
    let url = format!(
        "ws://{}/stream?topics=v2.a,v2.b",
        client.base.trim_start_matches("http://")
    );
    let mut socket = connect(&url).await;
    assert_eq!(
        fake_api.publish("v2.b").await["delivered"],
        1,
        "live before the 101"
    );
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(frame["topicName"], "v2.b"),
        other => panic!("expected the event, got {other:?}"),
    }
    drop(socket);
    wait_for("the stream's topics to be released upstream", || {
        let fake_api = fake_api.clone();
        async move { (fake_api.stats().await["subscriptions"] == 0).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_refused_change_leaves_the_channels_topics_as_they_were() {
    let settings = Settings {
        deny_topics: vec!["v2.secret.*".into()],
        ..Settings::default()
    };
    let w = World::start(&[A], Duration::from_secs(3600), settings, "").await;
    let desktop = desktop(&w.client, &["v2.keep".to_owned()]).await;
    let subs = format!(
        "/api/v2/notifications/channels/{}/subscriptions",
        desktop.channel
    );

    let refused = w
        .client
        .call(Method::PUT, &subs, "", Some(json!([{"id": "v2.secret.x"}])))
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.body["code"], "missing.permissions");
    let listed = w.client.call(Method::GET, &subs, "", None).await;
    assert_eq!(
        listed.body["entities"],
        json!([{"id": "v2.keep", "state": "Permitted"}])
    );
    first_event(&desktop, &w.fake_api, "v2.keep").await;

    // With ignoreErrors the permitted part goes through and the rest comes back Rejected.
    let lenient = w
        .client
        .call(
            Method::POST,
            &format!("{subs}?ignoreErrors=true"),
            "",
            Some(json!([{"id": "v2.secret.y"}, {"id": "v2.more"}])),
        )
        .await;
    assert_eq!(lenient.status, 200, "{}", lenient.body);
    let entities = lenient.body["entities"].as_array().unwrap();
    assert!(entities.contains(&json!({"id": "v2.more", "state": "Permitted"})));
    assert!(entities.contains(
        &json!({"id": "v2.secret.y", "state": "Rejected", "rejectionReason": "MissingPermissions"})
    ));
    assert_eq!(
        w.fake_api.stats().await["subscriptions"],
        2,
        "only the permitted topics upstream"
    );
}

#[tokio::test]
async fn a_client_that_was_away_hears_of_the_events_it_missed() {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await;
    let created = w.client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let uri = created.body["connectUri"].as_str().unwrap().to_owned();
    let first = connect(&uri).await;
    w.client
        .call(
            Method::PUT,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            Some(json!([{"id": "v2.away"}])),
        )
        .await;
    drop(first);
    wait_for("the proxy to see the socket go", || {
        let admin = w.admin.clone();
        async move {
            let metrics = admin.get("/metrics").await.body;
            metrics
                .as_str()?
                .lines()
                .any(|l| l == "handover_client_sockets 0")
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        w.fake_api.publish("v2.away").await["delivered"],
        1,
        "upstream still delivers"
    );
    // The proxy has routed it to nobody before the desktop comes back.
    wait_for("the event to find no socket", || {
        let admin = w.admin.clone();
        async move {
            let metrics = admin.get("/metrics").await.body;
            metrics
                .as_str()?
                .lines()
                .any(|l| l == "handover_client_queue_drops_total{reason=\"no_socket\"} 1")
                .then_some(())
        }
    })
    .await;

    let mut back = connect(&uri).await;
    match next_non_heartbeat(&mut back).await {
        Next::Text(frame) => {
            assert_eq!(frame["topicName"], "handover.gap");
            assert_eq!(frame["eventBody"]["topics"], json!(["v2.away"]));
        }
        other => panic!("expected a gap notice, got {other:?}"),
    }
    // The next socket starts clean.
    drop(back);
    let mut again = connect(&uri).await;
    send_text(&mut again, r#"{"message":"ping"}"#).await;
    assert!(
        matches!(next_non_heartbeat(&mut again).await, Next::Text(f) if f["eventBody"]["message"] == "pong")
    );
}
