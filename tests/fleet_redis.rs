//! The fleet's Redis in trouble, and Redis over TLS.
//!
//! `redis-server` is killed mid-stream and started again empty, as a crash without
//! persistence would: connected desktops keep every event through it (handovers
//! included), a new channel waits within the local share until Redis is back, the
//! replicas put their leases back in the new Redis, and the fake never sees more
//! channels than the budget.

mod common;

use std::time::Duration;

use common::certs::Ca;
use common::fleet::*;
use common::proxy::*;
use common::redis_server::RedisServer;
use common::*;
use handover::mock::{ClientSpec, MockConfig, Settings};
use tokio::time::Instant;

const BUDGET: usize = 6;

async fn fake_with_budget() -> (handover::mock::MockGenesys, Api) {
    start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "secret-a",
            Duration::from_secs(8),
        )],
        settings: Settings {
            max_channels_per_client: BUDGET,
            ..Settings::default()
        },
        socket_base: None,
    })
    .await
}

async fn leases_in(redis: &RedisServer) -> usize {
    let mut connection = redis.connection().await;
    redis::cmd("ZCARD")
        .arg("handover:leases")
        .query_async(&mut connection)
        .await
        .expect("ZCARD")
}

#[tokio::test]
async fn redis_killed_and_restarted_empty_mid_stream_loses_no_event_and_no_lease() {
    let mut redis = RedisServer::start().await;
    let (fake, fake_api) = fake_with_budget().await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let cluster = format!("redis_url = \"{}\"\nlocal_share = 2", redis.url());
    let mut replicas = Vec::new();
    let mut desktops = Vec::new();
    let mut watched = Vec::new();
    for r in 0..2 {
        let (proxy, client, admin) =
            start_proxy(replica_config(&fake.base_url(), &secrets, BUDGET, &cluster)).await;
        let topics = topics(&format!("v2.redis.r{r}"), 2);
        desktops.push(desktop(&client, &topics).await);
        watched.extend(topics);
        replicas.push((proxy, client, admin));
    }
    let events = 300;
    let stream = start_stream(&fake_api, &watched, 15.0, events).await;

    // Redis dies. Both replicas notice (their leases are asserted every second).
    redis.stop().await;
    for (_, _, admin) in &replicas {
        wait_for("the replica to see Redis down", || {
            let admin = admin.clone();
            async move {
                (metric(&admin, "handover_cluster_redis_up", &[]).await == Some(0.0)).then_some(())
            }
        })
        .await;
    }
    // A new channel on a replica that already holds one is beyond its local share of
    // 2 (one serving channel and the slot for its handover): it waits for Redis.
    let late_topics = topics("v2.redis.late", 2);
    let late = tokio::spawn({
        let (client, topics) = (replicas[0].1.clone(), late_topics.clone());
        async move { desktop(&client, &topics).await }
    });
    // Through at least one token-expiry handover on each replica (8 s tokens, 3 s
    // lead) while Redis is down.
    for (proxy, _, _) in &replicas {
        wait_for("a handover while Redis is down", || {
            let pool = proxy.pool.clone();
            async move { (pool.handovers() >= 1).then_some(()) }
        })
        .await;
    }
    assert!(!late.is_finished(), "no new channel beyond the local share");
    for (_, _, admin) in &replicas {
        assert!(
            metric(admin, "handover_cluster_leases_taken_locally_total", &[]).await >= Some(1.0),
            "the successor took its lease on the local share"
        );
    }

    // Redis comes back empty: the leases are put back, then the waiting channel
    // takes one.
    redis.restart().await;
    let late_desktop = tokio::time::timeout(DEADLINE, late)
        .await
        .expect("the waiting channel is built once Redis is back")
        .expect("desktop task");
    stream_done(&fake_api, stream, Instant::now() + Duration::from_secs(60)).await;
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &watched, events)).await;
    assert_eq!(
        (lost, duplicated, unexpected),
        (0, 0, 0),
        "the desktops kept their live events through Redis' death and return"
    );
    let after = start_stream(&fake_api, &late_topics, 20.0, 20).await;
    stream_done(&fake_api, after, Instant::now() + DEADLINE).await;
    let (lost, duplicated, _) = settle(std::slice::from_ref(&late_desktop), &|d| {
        d.expected(after, &late_topics, 20)
    })
    .await;
    assert_eq!((lost, duplicated), (0, 0));

    let count = client_count(&fake_api).await;
    assert!(count.peak <= BUDGET as u64, "peak {}", count.peak);
    assert_eq!(count.evictions, 0);
    // Every live channel has its lease in the new Redis.
    let live = count.live as usize;
    wait_for("every live channel's lease back in Redis", || {
        let redis = &redis;
        async move { (leases_in(redis).await >= live).then_some(()) }
    })
    .await;
    for (proxy, _, _) in replicas {
        proxy.stop().await;
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let ca = Ca::new("redis test CA");
    let redis = RedisServer::start_tls(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "redis-ca.pem");
    let (fake, fake_api) = fake_with_budget().await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let cluster = format!(
        "redis_url = \"{}\"\nca_file = \"{}\"",
        redis.tls_url(),
        ca_file.display()
    );
    let (proxy, client, admin) =
        start_proxy(replica_config(&fake.base_url(), &secrets, BUDGET, &cluster)).await;
    let watched = topics("v2.rediss", 2);
    let desktop = desktop(&client, &watched).await;
    assert_eq!(
        metric(&admin, "handover_cluster_leases_held", &[]).await,
        Some(1.0),
        "the channel's lease was taken over TLS"
    );
    assert_eq!(leases_in(&redis).await, 1);
    assert_eq!(
        metric(&admin, "handover_cluster_redis_up", &[]).await,
        Some(1.0)
    );
    let stream = start_stream(&fake_api, &watched, 20.0, 20).await;
    stream_done(&fake_api, stream, Instant::now() + DEADLINE).await;
    let (lost, duplicated, _) = settle(std::slice::from_ref(&desktop), &|d| {
        d.expected(stream, &watched, 20)
    })
    .await;
    assert_eq!((lost, duplicated), (0, 0));
    proxy.stop().await;
}
