//! Several replicas share one OAuth client's channel budget through a real
//! `redis-server`: the fake Genesys Cloud (which evicts the oldest channel of a client
//! past its limit, as Genesys does) never sees more channels than the budget, through
//! token-expiry handovers on every replica at once and a rollout's surge replica.

mod common;

use std::time::Duration;

use common::fleet::*;
use common::proxy::*;
use common::redis_server::RedisServer;
use common::*;
use handover::app::Proxy;
use handover::mock::{ClientSpec, MockConfig, Settings};
use tokio::time::Instant;

/// The OAuth client's channels at the fake (Genesys keeps 20; this test's fake 4), and
/// the fleet's `max_channels`.
const BUDGET: usize = 4;
const TOKEN_TTL: Duration = Duration::from_secs(8);

async fn replica(fake: &str, secrets: &Secrets, redis: &RedisServer) -> (Proxy, Api, Api) {
    let cluster = format!("redis_url = \"{}\"", redis.url());
    start_proxy(replica_config(fake, secrets, BUDGET, &cluster)).await
}

#[tokio::test]
async fn replicas_share_one_budget_through_handovers_and_a_rollout_surge() {
    let redis = RedisServer::start().await;
    let (fake, fake_api) = start(MockConfig {
        clients: vec![ClientSpec::new("client-a", "secret-a", TOKEN_TTL)],
        settings: Settings {
            max_channels_per_client: BUDGET,
            ..Settings::default()
        },
        socket_base: None,
    })
    .await;
    let fake_url = fake.base_url();
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");

    // Three replicas, a desktop on each wanting a channel of its own: the fleet
    // serves 3 channels, one less than the budget, which keeps a slot for handovers.
    let mut replicas = Vec::new();
    let mut desktops = Vec::new();
    let mut watched = Vec::new();
    for r in 0..3 {
        let (proxy, client, _) = replica(&fake_url, &secrets, &redis).await;
        let topics = topics(&format!("v2.fleet.r{r}"), 2);
        desktops.push(desktop(&client, &topics).await);
        watched.extend(topics);
        replicas.push(proxy);
    }

    // Events throughout, across two token lifetimes: every channel of every replica
    // hands over at about the same time, one spare slot for the whole fleet.
    let events = 240;
    let stream = start_stream(&fake_api, &watched, 12.0, events).await;

    // The surge: a fourth replica comes up before an old one goes, and a desktop on it
    // wants a channel the fleet has no room for. It waits for a lease...
    wait_for("a first round of handovers", || {
        let pool = replicas[0].pool.clone();
        async move { (pool.handovers() >= 1).then_some(()) }
    })
    .await;
    let (surge, surge_client, surge_admin) = replica(&fake_url, &secrets, &redis).await;
    let surge_topics = topics("v2.fleet.surge", 2);
    let waiting = tokio::spawn({
        let (client, topics) = (surge_client.clone(), surge_topics.clone());
        async move { desktop(&client, &topics).await }
    });
    wait_for("the surge replica to be refused a lease", || {
        let admin = surge_admin.clone();
        async move {
            (metric(&admin, "handover_cluster_lease_refusals_total", &[]).await >= Some(1.0))
                .then_some(())
        }
    })
    .await;
    assert!(
        !waiting.is_finished(),
        "the surge replica's channel waits for a lease while the fleet's budget is used"
    );
    // ...until an old replica drains and its channel is gone upstream.
    let leaving = replicas.remove(0);
    let leaving_desktop = desktops.remove(0);
    leaving.stop().await;
    drop(leaving_desktop);
    let surge_desktop = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the surge replica's desktop is served once the old replica is gone")
        .expect("desktop task");

    stream_done(&fake_api, stream, Instant::now() + Duration::from_secs(60)).await;
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &watched, events)).await;
    assert_eq!(
        (lost, duplicated, unexpected),
        (0, 0, 0),
        "the replicas that stayed lost nothing across their handovers"
    );

    // The surge replica's desktop receives too.
    let late = start_stream(&fake_api, &surge_topics, 20.0, 20).await;
    stream_done(&fake_api, late, Instant::now() + DEADLINE).await;
    let (lost, duplicated, _) = settle(std::slice::from_ref(&surge_desktop), &|d| {
        d.expected(late, &surge_topics, 20)
    })
    .await;
    assert_eq!((lost, duplicated), (0, 0));

    let ClientCount {
        peak,
        live,
        evictions,
    } = client_count(&fake_api).await;
    assert!(
        peak <= BUDGET as u64,
        "the fake saw {peak} channels of the client at once; the budget is {BUDGET}"
    );
    assert_eq!(evictions, 0, "Genesys evicted nothing");

    // The ledger in Redis holds one lease per live channel, no more.
    let mut redis_connection = redis.connection().await;
    let leases: usize = redis::cmd("ZCARD")
        .arg("handover:leases")
        .query_async(&mut redis_connection)
        .await
        .unwrap();
    assert!(
        leases as u64 >= live && leases <= BUDGET,
        "{leases} leases for {live} live channels"
    );
    for proxy in replicas {
        proxy.stop().await;
    }
    surge.stop().await;
}
