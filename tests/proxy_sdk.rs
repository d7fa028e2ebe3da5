//! A real client: Genesys' own Python SDK (`purecloudplatformclientv2`) pointed at the
//! proxy with no login, then the connectUri it returns. A maintenance close upstream
//! during the stream must be invisible to it. `.ci/run` installs the SDK.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::mock::Settings;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn genesys_python_sdk_subscribes_and_streams_through_a_maintenance_close() {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await;
    let (fake_api, client) = (&w.fake_api, &w.client);

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/genesys_sdk_client.py"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let deps = clients::python_deps(&python).await;
    let mut child = Command::new(&python)
        .args([script, &client.base, "v2.users.42.presence", "400"])
        .env("PYTHONPATH", &deps)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the SDK client answers in time")
            .unwrap()
            .expect("the SDK client printed a line (is purecloudplatformclientv2 installed?)");
        serde_json::from_str(&line).unwrap()
    };
    let ready = next_line().await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["subscribed"], json!(["v2.users.42.presence"]));
    assert_eq!(ready["listed"], json!(["v2.users.42.presence"]));

    let stream = start_stream(fake_api, &["v2.users.42.presence".to_owned()], 100.0, 400).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warned = fake_api
        .control(Method::POST, "socket-closing", json!({"close_after": "1s"}))
        .await;
    assert_eq!(warned.body["channels"].as_array().unwrap().len(), 1);

    let summary = next_line().await;
    assert_eq!(
        summary["closed"],
        Value::Null,
        "the SDK client's socket stayed open"
    );
    assert_eq!(
        summary["other"],
        json!([]),
        "no system frame reached the client"
    );
    let seqs: Vec<u64> = serde_json::from_value(summary["seqs"].clone()).unwrap();
    assert_eq!(
        seqs,
        (0..400).collect::<Vec<u64>>(),
        "every event once, in order"
    );
    stream_done(fake_api, stream, tokio::time::Instant::now() + DEADLINE).await;
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test]
async fn genesys_node_sdk_through_set_gateway_lists_topics_subscribes_and_streams() {
    let w = World::start(
        &[A],
        Duration::from_secs(3600),
        Settings::default(),
        "[topics]\nallow = [\"v2.users.*.presence\", \"v2.users.*.routingStatus\"]\n",
    )
    .await;
    let topic = "v2.users.42.presence";
    let mut sdk = clients::Script::start(
        "node",
        "genesys_node_sdk_client.cjs",
        &[&w.client.base, topic, "100"],
    )
    .await;
    let ready = sdk.next(Duration::from_secs(60)).await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(
        ready["available"],
        json!(["v2.users.{id}.presence", "v2.users.{id}.routingStatus"]),
        "availabletopics, filtered by the policy"
    );
    assert_eq!(ready["listed"], json!([topic]));
    let stream = start_stream(&w.fake_api, &[topic.to_owned()], 100.0, 100).await;
    let summary = sdk.next(Duration::from_secs(60)).await;
    assert_eq!(summary["closed"], Value::Null, "{summary}");
    let seqs: Vec<u64> = serde_json::from_value(summary["seqs"].clone()).unwrap();
    assert_eq!(seqs, (0..100).collect::<Vec<u64>>());
    stream_done(&w.fake_api, stream, tokio::time::Instant::now() + DEADLINE).await;
    assert!(sdk.wait().await.success());
}
