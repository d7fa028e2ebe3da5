//! Other users of the OAuth client: a foreign process holding channels of the same
//! client at the fake, before the proxy starts or after. The proxy counts them, runs
//! within what they leave of Genesys' 20, refuses what does not fit with a clear
//! error, and never makes the fake evict a channel.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::app::Proxy;
use handover::mock::{ClientSpec, MockConfig, MockGenesys, Settings};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long the conditions of these tests may take (they wait for token expiry).
const LONG: Duration = Duration::from_secs(30);

/// Polls `condition` for up to `LONG`.
async fn within<T, F, Fut>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + LONG;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fake with OAuth client `client-a` (1 h tokens).
async fn fake() -> (MockGenesys, Api) {
    start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "secret-a",
            Duration::from_secs(3600),
        )],
        settings: Settings::default(),
        socket_base: None,
    })
    .await
}

/// Another process with the same OAuth client: one token, `n` channels, no socket
/// (so that an eviction at the fake would take one of them first).
async fn foreign_channels(fake: &Api, token: &str, n: usize) {
    for _ in 0..n {
        fake.channel(token).await;
    }
}

async fn proxy(fake: &MockGenesys, secrets: &Secrets, extra: &str) -> (Proxy, Api, Api) {
    start_proxy(proxy_config(&fake.base_url(), secrets, &[A], extra)).await
}

fn client_stats(stats: &Value) -> &Value {
    &stats["clients"]["client-a"]
}

/// `PUT …/subscriptions` of `topics` on a new client channel.
async fn subscribe(client: &Api, topics: &[String]) -> Reply {
    let created = client.post("/api/v2/notifications/channels").await;
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.body["id"].as_str().unwrap();
    let body: Vec<Value> = topics.iter().map(|t| json!({"id": t})).collect();
    client
        .call(
            Method::PUT,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            Some(Value::Array(body)),
        )
        .await
}

/// The refusal a topic that needs a channel others leave no room for gets.
fn assert_refused_for_others(reply: &Reply, others: usize) {
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.body["code"], "notification.capacity.exceeded");
    assert_eq!(reply.body["status"], 400);
    let message = reply.body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("hold {others} of the 20 channels")),
        "{message}"
    );
}

async fn gauge(admin: &Api, name: &str) -> Option<f64> {
    metric(admin, name, &[]).await
}

#[tokio::test]
async fn seventeen_channels_held_elsewhere_leave_the_proxy_three_and_nothing_is_evicted() {
    let (fake, fake_api) = fake().await;
    // Before the proxy starts, another process holds 17 channels of client-a, on a
    // token that outlives the test.
    let foreign = fake_api.mint("client-a", "secret-a").await;
    foreign_channels(&fake_api, &foreign, 17).await;
    // From now on client-a's tokens live 8 s, so that the proxy's channels hand over
    // (tokens already minted keep their lifetime; registering again resets the
    // client's counters, before the proxy makes any).
    let registered = fake_api
        .control(
            Method::POST,
            "clients",
            json!({"id": "client-a", "secret": "secret-a", "token_ttl": "8s"}),
        )
        .await;
    assert_eq!(registered.status, 201, "{}", registered.body);

    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let extra = "[handover]\nlead = \"3s\"\noverlap = \"500ms\"\n\
                 [upstream]\nmax_channels = 6\nmax_topics_per_channel = 10\nforeign_check_interval = \"1s\"\n";
    let (proxy, client, admin) = proxy(&fake, &secrets, extra).await;

    // Ready with no desktop, and the count made at start.
    within("readiness", || async {
        (admin.get("/readyz").await.status == 200).then_some(())
    })
    .await;
    within("17 channels counted as others'", || async {
        (gauge(&admin, "handover_upstream_foreign_channels").await == Some(17.0)
            && gauge(&admin, "handover_budget_slots_allowed").await == Some(3.0))
        .then_some(())
    })
    .await;

    // 20 topics: two channels of 10 (the third slot is kept for handovers).
    let all = topics("v2.users.foreign", 20);
    let mut desktops = Vec::new();
    for mine in all.chunks(5) {
        desktops.push(desktop(&client, mine).await);
    }
    // One more topic needs a third serving channel, which the budget of 6 allows but
    // the 3 left by others do not.
    let refused = subscribe(&client, &["v2.users.foreign.extra".to_owned()]).await;
    assert_refused_for_others(&refused, 17);
    assert!(
        metric(&admin, "handover_upstream_evictions_avoided_total", &[])
            .await
            .unwrap()
            >= 1.0
    );

    // Events keep flowing across token-expiry handovers, within 17 + 3 channels.
    let stream = start_stream(&fake_api, &all, 50.0, 600).await;
    within("two handovers", || async {
        (proxy.pool.handovers() >= 2).then_some(())
    })
    .await;
    stream_done(&fake_api, stream, Instant::now() + LONG).await;
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &all, 600)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    assert!(desktops.iter().all(|d| !d.disconnected()));
    assert!(
        desktops
            .iter()
            .all(|d| d.log.lock().unwrap().gaps.is_empty()),
        "no gap notice"
    );
    let handovers = metric(&admin, "handover_handovers_total", &["reason=\"expiry\""])
        .await
        .unwrap();
    assert!(handovers >= 2.0, "{handovers} expiry handovers");

    let stats = fake_api.stats().await;
    let a = client_stats(&stats);
    assert_eq!(a["evictions"], 0, "nothing evicted: {a}");
    assert!(a["peak_channels"].as_u64().unwrap() <= 20, "{a}");
    let own = fake_api
        .call(
            Method::GET,
            "/api/v2/notifications/channels",
            &foreign,
            None,
        )
        .await;
    assert_eq!(
        own.body["entities"].as_array().unwrap().len(),
        17,
        "the other process still has its 17"
    );
}

#[tokio::test]
async fn channels_opened_elsewhere_after_start_are_counted_at_the_next_check() {
    let (fake, fake_api) = fake().await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let extra = "[upstream]\nmax_channels = 4\nmax_topics_per_channel = 10\nforeign_check_interval = \"1s\"\n";
    let (proxy, client, admin) = proxy(&fake, &secrets, extra).await;
    within("the first count", || async {
        (proxy.pool.capacity().foreign == Some(0)).then_some(())
    })
    .await;
    assert_eq!(
        gauge(&admin, "handover_budget_slots_allowed").await,
        Some(4.0)
    );
    let first = desktop(&client, &topics("v2.users.first", 10)).await;

    // Another process opens 17 channels of the same OAuth client.
    let foreign = fake_api.mint("client-a", "secret-a").await;
    foreign_channels(&fake_api, &foreign, 17).await;
    within("the 17 counted", || async {
        (gauge(&admin, "handover_upstream_foreign_channels").await == Some(17.0)).then_some(())
    })
    .await;
    assert_eq!(proxy.pool.capacity().slots, 3);
    assert_eq!(
        gauge(&admin, "handover_budget_slots_allowed").await,
        Some(3.0)
    );
    // The channel the proxy holds keeps serving; a second still fits (17 + 2 + the
    // spare for a handover = 20).
    let second = desktop(&client, &topics("v2.users.second", 5)).await;
    for (desktop, topic) in [(&first, "v2.users.first.3"), (&second, "v2.users.second.4")] {
        within("an event", || async {
            if !desktop.received().is_empty() {
                return Some(());
            }
            fake_api.publish(topic).await;
            None
        })
        .await;
    }

    // One more elsewhere: 18 leave the proxy 2. Its two channels are not cut, and
    // nothing new is created.
    foreign_channels(&fake_api, &foreign, 1).await;
    within("the 18 counted", || async {
        (proxy.pool.capacity().foreign == Some(18)).then_some(())
    })
    .await;
    let refused = subscribe(&client, &topics("v2.users.third", 6)).await;
    assert_refused_for_others(&refused, 18);
    assert_eq!(
        gauge(&admin, "handover_budget_slots_free").await,
        Some(0.0),
        "2 allowed, 2 held"
    );
    assert_eq!(proxy.pool.channels().len(), 2);

    let stats = fake_api.stats().await;
    let a = client_stats(&stats);
    assert_eq!(a["evictions"], 0, "nothing evicted: {a}");
    assert_eq!(a["live_channels"], 20, "{a}");
    assert!(!first.disconnected() && !second.disconnected());
}
