//! TLS to desktops with a certificate made at test time (rcgen), real TLS clients
//! (Python's `websockets` with an SSL context, Node's `ws` with a CA), and a
//! certificate rotation mid-stream: the files are replaced by a pair from another
//! CA while both desktops stream; new handshakes get the new certificate, and the
//! desktops already connected keep every event.

mod common;

use std::time::Duration;

use common::certs::{Ca, handshake_trusting, install};
use common::clients::Script;
use common::proxy::*;
use common::*;
use handover::mock::{ServiceTimes, Settings};
use serde_json::Value;
use tokio::time::Instant;

#[tokio::test]
async fn desktops_keep_streaming_through_a_certificate_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("handover test CA 1"), Ca::new("handover test CA 2"));
    let (cert, key) = install(dir.path(), &old_ca.server());
    let old_ca_file = old_ca.write(dir.path(), "ca1.pem");
    let w = World::start(
        &[A],
        Duration::from_secs(3600),
        Settings {
            service_times: ServiceTimes::NONE,
            ..Settings::default()
        },
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .await;
    let addr = w.proxy.client_addr;

    // REST over TLS, and a connectUri that says wss://.
    let https = reqwest::Client::builder()
        .tls_backend_preconfigured((*common::certs::client_trusting(&old_ca)).clone())
        .build()
        .unwrap();
    let created: Value = https
        .post(format!(
            "https://localhost:{}/api/v2/notifications/channels",
            addr.port()
        ))
        .send()
        .await
        .expect("HTTPS reaches the proxy")
        .json()
        .await
        .unwrap();
    let connect_uri = created["connectUri"].as_str().unwrap();
    assert!(
        connect_uri.starts_with(&format!("wss://127.0.0.1:{}/channels/", addr.port())),
        "{connect_uri}"
    );

    let topic = "v2.users.42.presence";
    let events = 300u64;
    let url = format!("wss://localhost:{}/stream?topics={topic}", addr.port());
    let ca = old_ca_file.to_str().unwrap();
    let count = events.to_string();
    let mut python = Script::start("python", "tls_stream_client.py", &[&url, ca, &count]).await;
    let mut node = Script::start("node", "tls_stream_client.cjs", &[&url, ca, &count]).await;
    let (ready_py, ready_node) = (
        python.next(DEADLINE * 3).await,
        node.next(DEADLINE * 3).await,
    );
    assert_eq!(ready_py["ready"], true, "{ready_py}");
    assert_eq!(ready_node["ready"], true, "{ready_node}");
    assert_eq!(ready_py["cert_sha256"], ready_node["cert_sha256"]);
    wait_for("both desktops' sockets", || async {
        (w.proxy.router.topic_count() == 1).then_some(())
    })
    .await;

    // 300 events over 3 s; the certificate changes in the middle.
    let stream = start_stream(&w.fake_api, &[topic.to_owned()], 100.0, events).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    install(dir.path(), &new_ca.server());
    wait_for("new handshakes to get the new certificate", || async {
        handshake_trusting(addr, &new_ca).await.then_some(())
    })
    .await;
    assert!(
        !handshake_trusting(addr, &old_ca).await,
        "the old certificate is no longer served"
    );

    for (name, client) in [("python", &mut python), ("node", &mut node)] {
        let summary = client.next(DEADLINE * 2).await;
        assert_eq!(summary["closed"], Value::Null, "{name}: {summary}");
        let seqs: Vec<u64> = serde_json::from_value(summary["seqs"].clone()).unwrap();
        assert_eq!(
            seqs,
            (0..events).collect::<Vec<_>>(),
            "{name}: every event, once"
        );
    }
    stream_done(&w.fake_api, stream, Instant::now() + DEADLINE).await;
    assert!(python.wait().await.success());
    assert!(node.wait().await.success());
}
