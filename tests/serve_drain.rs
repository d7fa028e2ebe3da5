//! The drain desktops ride through: `handover serve` with 200 desktops gets SIGTERM.
//! Readiness turns 503 first; the desktops keep their events for `drain_delay`; then
//! their sockets close with 1012 one after the other over `drain_spread`, each after
//! whole frames only; the upstream channel serves until the last desktop is gone; the
//! tokens are retired and the process exits 0 within `shutdown_grace`.

mod common;

use std::time::Duration;

use common::proxy::{Secrets, start_stream};
use common::serve::{config_text, serve};
use common::*;
use futures_util::StreamExt;
use futures_util::future::join_all;
use handover::mock::{ClientSpec, MockConfig, Settings};
use reqwest::Method;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const DESKTOPS: usize = 200;
const DRAIN_DELAY: Duration = Duration::from_secs(1);
const DRAIN_SPREAD: Duration = Duration::from_secs(3);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);
const TOPIC: &str = "v2.users.drain.presence";

/// What one desktop saw, up to the end of its socket.
#[derive(Debug)]
struct Seen {
    /// Sequence numbers of the events received, in order.
    seqs: Vec<u64>,
    /// (when, code, reason) of the Close; None if the socket ended without one.
    close: Option<(Instant, u16, String)>,
    /// Anything that was not a whole JSON frame or a clean close.
    faults: Vec<String>,
}

async fn desktop(base: String) -> Seen {
    let url = format!("{}/stream?topics={TOPIC}", base.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("desktop connects");
    let mut seen = Seen {
        seqs: Vec::new(),
        close: None,
        faults: Vec::new(),
    };
    while let Some(message) = socket.next().await {
        match message {
            Ok(Message::Text(text)) => match serde_json::from_str::<Value>(&text) {
                Ok(frame) if frame["topicName"] == TOPIC => {
                    seen.seqs
                        .push(frame["eventBody"]["seq"].as_u64().unwrap_or(u64::MAX));
                }
                Ok(_) => {}
                Err(error) => seen
                    .faults
                    .push(format!("a frame that is not JSON: {error}")),
            },
            Ok(Message::Close(frame)) => {
                let (code, reason) = frame.map_or((0, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                seen.close = Some((Instant::now(), code, reason));
            }
            Ok(_) => {}
            Err(error) => seen.faults.push(format!("socket error: {error}")),
        }
    }
    seen
}

#[tokio::test]
async fn two_hundred_desktops_are_closed_with_1012_spread_over_the_window_after_readiness_flips() {
    let (fake, fake_api) = start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "secret-a",
            Duration::from_secs(3600),
        )],
        settings: Settings::default(),
        socket_base: None,
    })
    .await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        &format!(
            "drain_delay = \"{}\"\ndrain_spread = \"{}\"\nshutdown_grace = \"{}\"",
            humantime::format_duration(DRAIN_DELAY),
            humantime::format_duration(DRAIN_SPREAD),
            humantime::format_duration(SHUTDOWN_GRACE)
        ),
        "",
    );
    let mut served = serve(&config, &[], "info").await;

    // 200 desktops on one topic, and events on it all along (20/s).
    let desktops: Vec<_> = (0..DESKTOPS)
        .map(|_| tokio::spawn(desktop(served.client.base.clone())))
        .collect();
    let admin = &served.admin;
    wait_for("200 client sockets", || async move {
        let metrics = admin.get("/metrics").await.body;
        metrics
            .as_str()?
            .contains(&format!("handover_client_sockets {DESKTOPS}\n"))
            .then_some(())
    })
    .await;
    let stream = start_stream(&fake_api, &[TOPIC.to_owned()], 20.0, 400).await;
    let fake = &fake_api;
    wait_for("events flowing", || async move {
        let stats = fake.stats().await;
        let delivered: u64 = stats["channels"]
            .as_array()?
            .iter()
            .filter_map(|c| c["delivered"].as_u64())
            .sum();
        (delivered >= 5).then_some(())
    })
    .await;

    // Readiness, as a load balancer polls it, from just before the signal.
    let readiness = {
        let admin = served.admin.clone();
        tokio::spawn(async move {
            loop {
                let status = admin
                    .http
                    .get(format!("{}/readyz", admin.base))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                if status.ok() == Some(503) {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let term = Instant::now();
    served.signal("TERM").await;
    let status = served.exit(SHUTDOWN_GRACE).await;
    let stopped = term.elapsed();
    assert!(status.success(), "{status:?}");
    let not_ready = readiness.await.unwrap();
    let seen: Vec<Seen> = join_all(desktops)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let _ = fake_api
        .control(Method::DELETE, &format!("streams/{stream}"), Value::Null)
        .await;

    for (i, desktop) in seen.iter().enumerate() {
        assert_eq!(desktop.faults, Vec::<String>::new(), "desktop {i}");
        let (_, code, reason) = desktop.close.as_ref().expect("a close frame");
        assert_eq!(
            (*code, reason.as_str()),
            (1012, "proxy restarting: reconnect")
        );
        // Every event up to its close, in order: none lost, none cut in half.
        let first = desktop.seqs.first().copied().unwrap_or(0);
        let expected: Vec<u64> = (first..first + desktop.seqs.len() as u64).collect();
        assert_eq!(desktop.seqs, expected, "desktop {i}'s events");
    }
    let mut closes: Vec<(Instant, u64)> = seen
        .iter()
        .map(|d| {
            (
                d.close.as_ref().unwrap().0,
                d.seqs.last().copied().unwrap_or(0),
            )
        })
        .collect();
    closes.sort();
    let (first_close, first_last_seq) = closes[0];
    let (last_close, last_last_seq) = closes[DESKTOPS - 1];
    let spread = last_close - first_close;
    println!(
        "SIGTERM → readiness 503 after {:?}; first close after {:?}; closes spread over {:?} \
         (window {DRAIN_SPREAD:?}); exit 0 after {stopped:?}",
        not_ready - term,
        first_close - term,
        spread
    );
    assert!(not_ready < first_close, "readiness flips first");
    assert!(
        first_close - term >= DRAIN_DELAY,
        "served through the delay"
    );
    assert!(
        spread >= DRAIN_SPREAD.mul_f64(0.8) && spread <= DRAIN_SPREAD + Duration::from_secs(1),
        "closes spread over {spread:?}"
    );
    // Evenly: each third of the window holds a fair share of the closes.
    let mut thirds = [0usize; 3];
    for (at, _) in &closes {
        let third =
            ((*at - first_close).as_secs_f64() / (DRAIN_SPREAD.as_secs_f64() / 3.0)) as usize;
        thirds[third.min(2)] += 1;
    }
    println!("closes per third of the window: {thirds:?}");
    assert!(
        thirds.iter().all(|&n| n >= DESKTOPS * 15 / 100),
        "{thirds:?}"
    );
    assert!(
        last_last_seq > first_last_seq,
        "the last desktop still got events after the first had gone (upstream kept)"
    );
    let stats = fake_api.stats().await;
    assert_eq!(
        stats["clients"]["client-a"]["live_tokens"], 0,
        "tokens retired"
    );
    assert_eq!(stats["sockets"], 0, "upstream sockets closed");
    let logs = served.logs.await.unwrap();
    assert!(logs.contains("every client socket is closed"), "{logs}");
}

/// The same drain with no desktop at all ends as soon as the delay is over.
#[tokio::test]
async fn a_drain_without_desktops_stops_after_the_delay() {
    let (fake, _fake_api) = start(fast_config()).await;
    let secrets = Secrets::new();
    secrets.write("a", SECRET);
    let config = config_text(
        &fake.base_url(),
        &secrets.path("a"),
        "drain_delay = \"500ms\"\ndrain_spread = \"20s\"\nshutdown_grace = \"30s\"",
        "",
    );
    let mut served = serve(&config, &[], "info").await;
    let term = Instant::now();
    served.signal("TERM").await;
    assert!(served.exit(DEADLINE).await.success());
    let took = term.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}
