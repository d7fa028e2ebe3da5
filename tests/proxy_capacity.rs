//! The budget and the limits: packing topics onto few channels, a clear error when
//! nothing fits, releasing topics, throttling and rate limits, and a login storm.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use handover::app::Proxy;
use handover::mock::{ClientSpec, MockConfig, MockGenesys, Settings};
use handover::upstream::state::Role;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

async fn world(
    token_ttl: Duration,
    settings: Settings,
    extra: &str,
) -> (MockGenesys, Api, Proxy, Api, Secrets) {
    let w = World::start(&[A], token_ttl, settings, extra).await;
    (w.fake, w.fake_api, w.proxy, w.client, w.secrets)
}

fn count_status(stats: &Value, status: u64) -> usize {
    stats["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == status)
        .count()
}

#[tokio::test]
async fn topics_pack_onto_two_channels_keeping_the_third_free_and_overflow_is_refused() {
    let extra = "[handover]\nlead = \"2s\"\noverlap = \"500ms\"\n[upstream]\nmax_channels = 3\nmax_topics_per_channel = 1000\n";
    let (_fake, fake_api, proxy, client, _secrets) =
        world(Duration::from_secs(6), Settings::default(), extra).await;

    // 30 desktops with 40 topics each: 1200 distinct topics.
    let mut desktops = Vec::new();
    for d in 0..30 {
        let mine: Vec<String> = (0..40).map(|t| format!("v2.users.{d}.t{t}")).collect();
        desktops.push(desktop(&client, &mine).await);
    }
    let serving = |proxy: &handover::app::Proxy| {
        proxy
            .pool
            .channels()
            .into_iter()
            .filter(|c| c.role == Role::Serving)
            .map(|c| c.topics)
            .collect::<Vec<_>>()
    };
    // With 6-second tokens a channel may be between roles (handing over) at any given
    // moment: wait until both serve.
    let proxy_ref = &proxy;
    wait_for("1200 topics on two serving channels", || async move {
        let mut topics_per_channel = serving(proxy_ref);
        topics_per_channel.sort();
        (topics_per_channel == [200, 1000]).then_some(())
    })
    .await;

    // A desktop whose topics do not fit gets a clear error, and nothing of it stays.
    let created = client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let big: Vec<Value> = (0..1000)
        .map(|t| json!({"id": format!("v2.big.{t}")}))
        .collect();
    let refused = client
        .call(
            Method::PUT,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            Some(Value::Array(big)),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["code"], "notification.capacity.exceeded");
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .contains("capacity")
    );
    let listed = client
        .call(
            Method::GET,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            None,
        )
        .await;
    assert_eq!(listed.body["entities"], json!([]));

    // Handovers still happen with the third slot, and the budget holds.
    wait_for("two handovers", || {
        let handovers = proxy.pool.handovers();
        async move { (handovers >= 2).then_some(()) }
    })
    .await;
    let stats = fake_api.stats().await;
    assert!(
        stats["clients"]["client-a"]["peak_channels"]
            .as_u64()
            .unwrap()
            <= 3
    );
    assert_eq!(count_status(&stats, 401) + count_status(&stats, 403), 0);

    // Unsubscribing releases the topics upstream.
    let gone = client
        .call(
            Method::DELETE,
            &format!(
                "/api/v2/notifications/channels/{}/subscriptions",
                desktops[0].channel
            ),
            "",
            None,
        )
        .await;
    assert_eq!(gone.status, 200);
    assert_eq!(gone.body["entities"], json!([]));
    wait_for("the 40 topics to be unsubscribed upstream", || {
        let proxy = &proxy;
        async move {
            let total: usize = serving(proxy).iter().sum();
            (total == 1160).then_some(())
        }
    })
    .await;
    wait_for("the fake to carry 1160 topics", || {
        let fake_api = fake_api.clone();
        async move { (fake_api.stats().await["subscriptions"] == 1160).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_throttled_token_endpoint_is_backed_off_without_a_busy_loop_and_recovers() {
    let settings = Settings::default();
    let (fake, fake_api) = start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "secret-a",
            Duration::from_secs(3600),
        )],
        settings,
        socket_base: None,
    })
    .await;
    fake_api
        .control(Method::POST, "faults/token", json!({"mode": "throttle"}))
        .await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let (_proxy, client, admin) =
        start_proxy(proxy_config(&fake.base_url(), &secrets, &[A], "")).await;

    // A desktop subscribes while the token endpoint throttles.
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { desktop(&client, &["v2.t".to_owned()]).await }
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let throttled = fake_api.stats().await["counters"]["rejected_total"]
        .as_u64()
        .unwrap();
    // Back-off from 250 ms doubling: a handful of attempts in 4 s, not hundreds, for
    // each of the two minters (the proxy's first mint at start, the channel's).
    assert!(
        (2..=16).contains(&throttled),
        "{throttled} token requests in 4 s"
    );
    let not_ready = admin.get("/readyz").await;
    assert_eq!(not_ready.status, 503, "no token yet");

    fake_api
        .control(Method::POST, "faults/token", json!({"mode": "none"}))
        .await;
    let started = Instant::now();
    let desktop = subscribing.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "recovered in {:?}",
        started.elapsed()
    );
    assert_eq!(fake_api.publish("v2.t").await["delivered"], 1);
    wait_for("the event", || {
        let log = desktop.log.clone();
        async move { (!log.lock().unwrap().events.is_empty()).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn api_429s_are_honoured_and_recovered_from() {
    let settings = Settings {
        rate_limit_per_min: 4,
        rate_window: Duration::from_secs(2),
        ..Settings::default()
    };
    let (_fake, fake_api, _proxy, client, _secrets) =
        world(Duration::from_secs(3600), settings, "").await;
    // Subscriptions arriving one by one: more calls than the limit allows.
    let mut desktops = Vec::new();
    for d in 0..8 {
        desktops.push(desktop(&client, &[format!("v2.rate.{d}")]).await);
    }
    let stats = fake_api.stats().await;
    let limited = count_status(&stats, 429);
    assert!(limited >= 1, "the limit was hit");
    assert!(limited <= 4, "no 429 spiral: {limited}");
    assert_eq!(stats["subscriptions"], 8);
}

#[tokio::test]
async fn a_login_storm_of_500_desktops_stays_inside_the_rate_limit() {
    let settings = Settings::default(); // 300 requests per minute per token
    let (_fake, fake_api, _proxy, client, _secrets) =
        world(Duration::from_secs(3600), settings, "").await;
    let started = Instant::now();
    let mut joins = Vec::new();
    for d in 0..500u64 {
        let client = client.clone();
        joins.push(tokio::spawn(async move {
            // Spread over 10 s, as a shift start would.
            tokio::time::sleep(Duration::from_millis(d * 20)).await;
            let mine = vec![
                format!("v2.users.{}.presence", d % 300),
                format!("v2.queues.{}", d % 40),
            ];
            desktop(&client, &mine).await
        }));
    }
    let mut desktops = Vec::new();
    for join in joins {
        desktops.push(join.await.expect("every desktop subscribes"));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "all subscribed after {took:?}"
    );
    let stats = fake_api.stats().await;
    assert_eq!(count_status(&stats, 429), 0, "no 429 at all");
    assert_eq!(stats["subscriptions"], 340);
}

#[tokio::test]
async fn a_channel_left_without_topics_is_retired_and_its_slot_freed() {
    let extra = "[upstream]\nheartbeat = \"400ms\"\nidle_channel_timeout = \"1s\"\n";
    let (_fake, fake_api, proxy, client, _secrets) =
        world(Duration::from_secs(3600), Settings::default(), extra).await;
    let first = desktop(&client, &["v2.brief".to_owned()]).await;
    assert_eq!(
        fake_api.stats().await["clients"]["client-a"]["live_channels"],
        1
    );
    let gone = client
        .call(
            Method::DELETE,
            &format!(
                "/api/v2/notifications/channels/{}/subscriptions",
                first.channel
            ),
            "",
            None,
        )
        .await;
    assert_eq!(gone.status, 200);
    wait_for("the idle channel to be retired upstream", || {
        let fake_api = fake_api.clone();
        async move {
            (fake_api.stats().await["clients"]["client-a"]["live_channels"] == 0).then_some(())
        }
    })
    .await;
    assert!(
        proxy.pool.channels().is_empty(),
        "{:?}",
        proxy.pool.channels()
    );

    // The next subscriber gets a fresh channel.
    let next = desktop(&client, &["v2.next".to_owned()]).await;
    assert_eq!(fake_api.publish("v2.next").await["delivered"], 1);
    wait_for("the event", || {
        let received = next.received();
        async move { (!received.is_empty()).then_some(()) }
    })
    .await;
}
