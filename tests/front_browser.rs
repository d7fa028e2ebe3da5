//! A real browser: Debian's Chromium, headless, driven by playwright-core, loads a
//! page from one origin that uses the proxy on another (another port of 127.0.0.1:
//! another origin). From a listed origin the page creates a channel (a CORS simple
//! request), subscribes (a preflighted PUT), opens the socket and receives every
//! event; from an origin that is not listed its requests fail, and so does the
//! WebSocket that CORS would not have stopped. `.ci/run` installs `chromium`.

mod common;

use std::time::Duration;

use common::clients::Script;
use common::proxy::*;
use common::*;
use handover::mock::{ServiceTimes, Settings};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PAGE: &str = include_str!("clients/browser_page.html");

/// Serves the test page on a port of its own: an origin.
async fn page_server(shutdown: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(handover::http_server::serve(
        listener,
        |_req| async {
            handover::http_server::with_body(
                http::StatusCode::OK,
                bytes::Bytes::from_static(PAGE.as_bytes()),
                "text/html; charset=utf-8",
            )
        },
        shutdown,
    ));
    origin
}

#[tokio::test]
async fn a_page_from_a_listed_origin_streams_and_one_from_another_is_refused() {
    let shutdown = CancellationToken::new();
    let (listed, foreign) = (
        page_server(shutdown.clone()).await,
        page_server(shutdown.clone()).await,
    );
    let w = World::start(
        &[A],
        Duration::from_secs(3600),
        Settings {
            service_times: ServiceTimes::NONE,
            ..Settings::default()
        },
        &format!("[server]\nlisten = \"127.0.0.1:0\"\nallowed_origins = [\"{listed}\"]\n"),
    )
    .await;
    let proxy = &w.client.base;
    let events = 50u64;
    let topic = "v2.users.42.presence";
    let page =
        |origin: &str, topic: &str| format!("{origin}/?proxy={proxy}&topic={topic}&count={events}");
    let mut browser = Script::start(
        "node",
        "browser.cjs",
        &[
            &page(&listed, topic),
            &page(&foreign, "v2.users.666.presence"),
        ],
    )
    .await;

    let (mut streaming, mut refused) = (Value::Null, Value::Null);
    let until = Instant::now() + Duration::from_secs(60);
    let mut stream = None;
    while streaming["done"] != true || refused["done"] != true {
        assert!(
            Instant::now() < until,
            "the pages did not finish: {streaming} {refused}"
        );
        let report = browser.next(Duration::from_secs(60)).await;
        assert!(
            report.get("error").is_none(),
            "the browser failed: {report}"
        );
        match report["page"].as_u64() {
            Some(0) => streaming = report,
            Some(1) => refused = report,
            _ => panic!("unexpected report {report}"),
        }
        if streaming["ready"] == true && stream.is_none() {
            stream = Some(start_stream(&w.fake_api, &[topic.to_owned()], 50.0, events).await);
        }
    }

    // The listed origin: subscribed, and every event in order.
    assert_eq!(
        streaming["entities"],
        json!([{"id": topic, "state": "Permitted"}]),
        "{streaming}"
    );
    let seqs: Vec<u64> = serde_json::from_value(streaming["seqs"].clone()).unwrap();
    assert_eq!(seqs, (0..events).collect::<Vec<_>>(), "{streaming}");
    assert!(streaming.get("closed").is_none(), "{streaming}");
    let stream = stream.expect("the listed page got ready");
    stream_done(&w.fake_api, stream, Instant::now() + DEADLINE).await;

    // The other origin: its fetch failed, and its WebSocket never opened.
    assert!(
        refused["fetchError"]
            .as_str()
            .is_some_and(|e| e.contains("Failed to fetch")),
        "{refused}"
    );
    assert_eq!(refused["socketOpened"], Value::Null, "{refused}");
    assert_eq!(refused["socketClosed"], 1006, "{refused}");
    assert_eq!(
        w.proxy.router.topic_count(),
        1,
        "only the listed page's topic was subscribed"
    );
    assert!(browser.wait().await.success());
    shutdown.cancel();
}
