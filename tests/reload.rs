//! Reload as documented: a key takes effect at the next decision that reads it, or is
//! warned about as needing a restart. Here `handover.overlap` (how long an old channel
//! lingers, and the dedup window that follows it) and `server.heartbeat` (the next
//! socket's heartbeats) change under a running proxy.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::mock::Settings;
use tokio::time::Instant;

fn config_with(
    w: &World,
    heartbeat: &str,
    overlap: &str,
    listen: &str,
) -> handover::config::Config {
    let extra = format!(
        "[server]\nlisten = \"{listen}\"\nheartbeat = \"{heartbeat}\"\n\
         [handover]\nlead = \"2s\"\noverlap = \"{overlap}\"\n[upstream]\nheartbeat = \"30s\"\n"
    );
    proxy_config(&w.fake.base_url(), &w.secrets, &[A], &extra)
}

/// How long the replaced channel's socket stays open after the next handover.
async fn linger_after_next_handover(w: &World) -> Duration {
    let done = w.proxy.pool.handovers();
    wait_for("a handover", || {
        let pool = w.proxy.pool.clone();
        async move { (pool.handovers() > done).then_some(()) }
    })
    .await;
    let switched = Instant::now();
    wait_for_sockets(&w.fake_api, 1).await;
    switched.elapsed()
}

#[tokio::test]
async fn overlap_and_heartbeat_reload_take_effect_at_the_next_decision() {
    let extra = "[server]\nlisten = \"127.0.0.1:0\"\nheartbeat = \"30s\"\n\
                 [handover]\nlead = \"2s\"\noverlap = \"1500ms\"\n";
    let w = World::start(&[A], Duration::from_secs(6), Settings::default(), extra).await;
    let _desktop = desktop(&w.client, &["v2.reloaded".to_owned()]).await;
    let before = linger_after_next_handover(&w).await;
    assert!(
        before >= Duration::from_millis(1400),
        "lingered {before:?} with 1.5 s"
    );
    let window = w.proxy.router.dedup_window();

    let restart_only = w
        .proxy
        .reload(config_with(&w, "1s", "200ms", "127.0.0.1:0"));
    assert!(restart_only.is_empty(), "{restart_only:?}");
    // The dedup window follows the overlap.
    assert!(w.proxy.router.dedup_window() < window);
    // The next handover's old channel lingers the new overlap.
    let after = linger_after_next_handover(&w).await;
    assert!(
        after < Duration::from_millis(1000),
        "lingered {after:?} with 200 ms"
    );
    // A new socket gets the new heartbeat interval.
    let created = w.client.post("/api/v2/notifications/channels").await;
    let mut socket = connect(created.body["connectUri"].as_str().unwrap()).await;
    let started = Instant::now();
    match next_frame(&mut socket).await {
        Next::Text(frame) => assert_eq!(frame["eventBody"]["message"], "WebSocket Heartbeat"),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn keys_bound_at_start_are_reported_as_needing_a_restart() {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await;
    let restart_only = w.proxy.reload(config_with(&w, "30s", "1s", "127.0.0.1:1"));
    assert_eq!(restart_only, ["server.listen"]);
    // The proxy still serves on its listener.
    assert_eq!(
        w.client.post("/api/v2/notifications/channels").await.status,
        200
    );
}
