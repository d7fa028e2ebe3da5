//! Rotation made invisible: soft rotation (in both orders), hard rotation with two
//! OAuth clients and a drain, and surprise revocation. Desktops count every event;
//! the fake runs with realistic service times, so a handover that breaks before it
//! makes loses events here as it would in production (the broken-handover test
//! proves it).

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::mock::Settings;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Tokens live 6 s and `lead` is 2 s, so every channel hands over about every 4 s.
const TOKEN_TTL: Duration = Duration::from_secs(6);
const EXTRA: &str =
    "[handover]\nlead = \"2s\"\noverlap = \"500ms\"\n[upstream]\nmax_channels = 3\n";

async fn world(credentials: &[Credential]) -> World {
    World::start(credentials, TOKEN_TTL, Settings::default(), EXTRA).await
}

/// 20 desktops over 10 shared topics, three topics each.
async fn desktops(client: &Api) -> (Vec<Desktop>, Vec<String>) {
    let all = topics("v2.users.presence", 10);
    let mut desktops = Vec::new();
    for i in 0..20 {
        let mine = [
            all[i % 10].clone(),
            all[(i + 1) % 10].clone(),
            all[(i + 3) % 10].clone(),
        ];
        desktops.push(desktop(client, &mine).await);
    }
    (desktops, all)
}

/// What the fake saw that a correct proxy never causes.
fn auth_failures(stats: &Value) -> Vec<Value> {
    stats["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 401 || r["status"] == 403)
        .cloned()
        .collect()
}

fn peak_channels(stats: &Value) -> u64 {
    stats["counters"]["peak_live_channels"].as_u64().unwrap()
}

struct Outcome {
    lost: usize,
    duplicated: usize,
    unexpected: usize,
    disconnected: usize,
    handovers: u64,
    stats: Value,
}

/// Streams `count` events at 200/s while `during` runs, then counts.
async fn run_stream<F: std::future::Future<Output = ()>>(
    w: &World,
    count: u64,
    during: impl FnOnce() -> F,
) -> Outcome {
    let (desktops, all) = desktops(&w.client).await;
    let stream = start_stream(&w.fake_api, &all, 200.0, count).await;
    during().await;
    stream_done(
        &w.fake_api,
        stream,
        Instant::now() + Duration::from_secs(60),
    )
    .await;
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &all, count)).await;
    let disconnected = desktops.iter().filter(|d| d.disconnected()).count();
    Outcome {
        lost,
        duplicated,
        unexpected,
        disconnected,
        handovers: w.proxy.pool.handovers(),
        stats: w.fake_api.stats().await,
    }
}

fn assert_invisible(outcome: &Outcome, min_handovers: u64) {
    assert_eq!(outcome.lost, 0, "events lost");
    assert_eq!(outcome.duplicated, 0, "events duplicated");
    assert_eq!(outcome.unexpected, 0, "events for topics not subscribed");
    assert_eq!(outcome.disconnected, 0, "client sockets closed");
    assert!(
        outcome.handovers >= min_handovers,
        "only {} handovers",
        outcome.handovers
    );
    assert!(
        peak_channels(&outcome.stats) <= 3,
        "budget exceeded: {}",
        outcome.stats["clients"]
    );
    assert_eq!(
        auth_failures(&outcome.stats),
        Vec::<Value>::new(),
        "the proxy used a wrong token"
    );
}

async fn rotate(w: &World, client: &str, mode: &str, secret: &str) {
    let reply = w
        .fake_api
        .control(
            Method::POST,
            &format!("clients/{client}/rotate"),
            json!({"mode": mode, "secret": secret}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

async fn soft_rotation(broken: bool) -> Outcome {
    let w = world(&[A]).await;
    w.proxy.pool.set_break_before_make(broken);
    // 16 s of events: the single upstream channel hands over at least three times,
    // and the secret is rotated (new secret in Genesys and in the file) on the way.
    run_stream(&w, 3200, || async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        rotate(&w, "client-a", "keep_tokens", "secret-a2").await;
        w.secrets.write("a", "secret-a2");
    })
    .await
}

#[tokio::test]
async fn soft_rotation_is_invisible() {
    let outcome = soft_rotation(false).await;
    assert_invisible(&outcome, 3);
}

#[tokio::test]
async fn a_break_before_make_handover_is_caught_losing_events() {
    let outcome = soft_rotation(true).await;
    assert!(outcome.lost > 0, "the test must be able to see a gap");
}

#[tokio::test]
async fn soft_rotation_in_the_real_order_is_invisible() {
    let w = world(&[A]).await;
    // Genesys first, the secret file a few seconds later: mints fail meanwhile,
    // live channels keep streaming, the next mint uses the new file.
    let outcome = run_stream(&w, 3200, || async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        rotate(&w, "client-a", "keep_tokens", "secret-a2").await;
        // A maintenance warning forces a handover, and so a mint, inside the window.
        let warned = w
            .fake_api
            .control(Method::POST, "socket-closing", json!({"close_after": "5s"}))
            .await;
        assert_eq!(warned.status, 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        w.secrets.write("a", "secret-a2");
    })
    .await;
    assert_invisible(&outcome, 3);
    let refused = outcome.stats["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["code"] == "invalid_client")
        .count();
    assert!(refused >= 1, "the window with the old secret was exercised");
}

#[tokio::test]
async fn hard_rotation_with_two_oauth_clients_and_a_drain_is_invisible() {
    let w = world(&[A, B]).await;
    let outcome = run_stream(&w, 3200, || async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let drained = w.admin.post("/admin/credentials/a/drain").await;
        assert_eq!(drained.status, 202, "{}", drained.body);
        assert_eq!(drained.body["state"], "draining");
        wait_for("every channel of credential a to move", || {
            let admin = w.admin.clone();
            async move {
                let list = admin.get("/admin/credentials").await;
                let a = list
                    .body
                    .as_array()?
                    .iter()
                    .find(|c| c["name"] == "a")?
                    .clone();
                (a["channels"] == 0).then_some(())
            }
        })
        .await;
        // Now A's secret can be regenerated, killing its old tokens at once.
        rotate(&w, "client-a", "revoke_tokens", "secret-a2").await;
        w.secrets.write("a", "secret-a2");
        let undrained = w.admin.post("/admin/credentials/a/undrain").await;
        assert_eq!(undrained.status, 200);
    })
    .await;
    assert_invisible(&outcome, 3);
    assert!(
        outcome.stats["clients"]["client-b"]["tokens_issued"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn draining_the_last_usable_credential_is_refused() {
    let w = world(&[A]).await;
    let refused = w.admin.post("/admin/credentials/a/drain").await;
    assert_eq!(refused.status, 409);
    let unknown = w.admin.post("/admin/credentials/zz/drain").await;
    assert_eq!(unknown.status, 404);
    drop(w.fake);
}

#[tokio::test]
async fn a_surprise_revocation_gives_a_gap_notice_and_events_again_within_2s() {
    let w = world(&[A]).await;
    let all = topics("v2.queue", 2);
    let desktop = desktop(&w.client, &all).await;
    let revoked = w
        .fake_api
        .control(Method::POST, "revoke", json!({"client_id": "client-a"}))
        .await;
    assert!(revoked.body["revoked"].as_u64().unwrap() >= 1);
    let revoked_at = Instant::now();
    let gap = wait_for("a gap notice", || {
        let log = desktop.log.clone();
        async move { log.lock().unwrap().gaps.first().cloned() }
    })
    .await;
    assert_eq!(gap["eventBody"]["topics"], json!(all));
    let from = humantime::parse_rfc3339(gap["eventBody"]["from"].as_str().unwrap()).unwrap();
    let to = humantime::parse_rfc3339(gap["eventBody"]["to"].as_str().unwrap()).unwrap();
    assert!(from <= to);
    // Events flow again: publish until one arrives.
    let delivered_again = wait_for("events again", || {
        let fake_api = w.fake_api.clone();
        let log = desktop.log.clone();
        let topic = all[0].clone();
        async move {
            if !log.lock().unwrap().events.is_empty() {
                return Some(Instant::now());
            }
            fake_api.publish(&topic).await;
            None
        }
    })
    .await;
    assert!(
        delivered_again - revoked_at <= Duration::from_secs(2),
        "took {:?}",
        delivered_again - revoked_at
    );
    assert!(
        desktop.log.lock().unwrap().closed.is_none(),
        "the client socket stays open"
    );
}
