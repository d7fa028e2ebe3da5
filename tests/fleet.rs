//! Several replicas as one proxy, on a real `redis-server` (`[cluster]`).
//!
//! - They share one OAuth client's channel budget: the fake Genesys Cloud (which
//!   evicts the oldest channel of a client past its limit, as Genesys does) never sees
//!   more channels than the budget, through token-expiry handovers on every replica at
//!   once and a rollout's surge replica.
//! - `redis-server` is killed mid-stream and started again empty, as a crash without
//!   persistence would: connected desktops keep every event through it (handovers
//!   included), a new channel waits within the local share until Redis is back, the
//!   replicas put their leases back in the new Redis, and the fake never sees more
//!   channels than the budget.
//! - Redis over TLS, its certificate signed by a private CA.
//!
//! The tests run in parallel, each with its own Redis and fake.

mod common;

use std::time::Duration;

use common::certs::Ca;
use common::fleet::*;
use common::proxy::*;
use common::redis_server::RedisServer;
use common::*;
use handover::app::Proxy;
use handover::mock::{ClientSpec, MockConfig, Settings};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The OAuth client's channels at the fake (Genesys keeps 20; these tests' fake fewer),
/// and the fleet's `max_channels`.
const SURGE_BUDGET: usize = 4;
const TROUBLE_BUDGET: usize = 6;
const TOKEN_TTL: Duration = Duration::from_secs(8);

async fn fake_with_budget(budget: usize) -> (handover::mock::MockGenesys, Api) {
    start(MockConfig {
        clients: vec![ClientSpec::new("client-a", "secret-a", TOKEN_TTL)],
        settings: Settings {
            max_channels_per_client: budget,
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

/// A short stream on `topics` reaches `desktop` whole, once.
async fn receives_every_event(fake: &Api, desktop: &Desktop, topics: &[String]) {
    let stream = start_stream(fake, topics, 20.0, 20).await;
    stream_done(fake, stream, Instant::now() + DEADLINE).await;
    let (lost, duplicated, _) = settle(std::slice::from_ref(desktop), &|d| {
        d.expected(stream, topics, 20)
    })
    .await;
    assert_eq!((lost, duplicated), (0, 0));
}

/// The next frame on `socket` (heartbeats aside) is the event the fake `published`.
async fn expect_event(socket: &mut Socket, published: &Value) {
    match next_non_heartbeat(socket).await {
        Next::Text(frame) if frame["eventBody"]["seq"] == published["seq"] => {}
        other => panic!("expected event {published}, got {other:?}"),
    }
}

/// Waits until Genesys (the fake) holds `topics` subscriptions in all: each topic
/// once. A token-expiry handover has a topic on two channels for its overlap.
async fn each_topic_subscribed_once(fake: &Api, topics: usize) {
    wait_for("each topic subscribed once at Genesys", || async {
        let stats: Value = fake.get("/__mock/stats").await.body;
        (stats["subscriptions"] == json!(topics)).then_some(())
    })
    .await;
}

/// Where most fleet tests begin: a `redis-server`, the fake keeping
/// [`TROUBLE_BUDGET`] channels for `client-a`, and that client's secret on file.
struct Fleet {
    redis: RedisServer,
    fake: handover::mock::MockGenesys,
    fake_api: Api,
    secrets: Secrets,
}

impl Fleet {
    async fn start() -> Self {
        let redis = RedisServer::start().await;
        let (fake, fake_api) = fake_with_budget(TROUBLE_BUDGET).await;
        let secrets = Secrets::new();
        secrets.write("a", "secret-a");
        Self {
            redis,
            fake,
            fake_api,
            secrets,
        }
    }

    /// Starts a replica of the fleet and waits until it is ready.
    async fn replica(&self) -> (Proxy, Api, Api) {
        let cluster = format!("redis_url = \"{}\"", self.redis.url());
        let config = replica_config(
            &self.fake.base_url(),
            &self.secrets,
            TROUBLE_BUDGET,
            &cluster,
        );
        start_replica(config).await
    }
}

async fn replica(fake: &str, secrets: &Secrets, redis: &RedisServer) -> (Proxy, Api, Api) {
    let cluster = format!("redis_url = \"{}\"", redis.url());
    start_replica(replica_config(fake, secrets, SURGE_BUDGET, &cluster)).await
}

#[tokio::test]
async fn replicas_share_one_budget_through_handovers_and_a_rollout_surge() {
    let redis = RedisServer::start().await;
    let (fake, fake_api) = fake_with_budget(SURGE_BUDGET).await;
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
    receives_every_event(&fake_api, &surge_desktop, &surge_topics).await;

    let ClientCount {
        peak,
        live,
        evictions,
    } = client_count(&fake_api).await;
    assert!(
        peak <= SURGE_BUDGET as u64,
        "the fake saw {peak} channels of the client at once; the budget is {SURGE_BUDGET}"
    );
    assert_eq!(evictions, 0, "Genesys evicted nothing");

    // The ledger in Redis holds one lease per live channel, no more.
    let leases = leases_in(&redis).await;
    assert!(
        leases as u64 >= live && leases <= SURGE_BUDGET,
        "{leases} leases for {live} live channels"
    );
    for proxy in replicas {
        proxy.stop().await;
    }
    surge.stop().await;
}

#[tokio::test]
async fn redis_killed_and_restarted_empty_mid_stream_loses_no_event_and_no_lease() {
    let mut redis = RedisServer::start().await;
    let (fake, fake_api) = fake_with_budget(TROUBLE_BUDGET).await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let cluster = format!("redis_url = \"{}\"\nlocal_share = 2", redis.url());
    let mut replicas = Vec::new();
    let mut desktops = Vec::new();
    let mut watched = Vec::new();
    for r in 0..2 {
        let (proxy, client, admin) = start_proxy(replica_config(
            &fake.base_url(),
            &secrets,
            TROUBLE_BUDGET,
            &cluster,
        ))
        .await;
        // One topic each, so that each channel has room for one more.
        let topics = topics(&format!("v2.redis.r{r}"), 1);
        desktops.push(desktop(&client, &topics).await);
        watched.extend(topics);
        replicas.push((proxy, client, admin));
    }
    // A desktop on the second replica wants the first one's topic, which the first
    // replica carries for both.
    let followed = vec![watched[0].clone()];
    let follower = desktop(&replicas[1].1, &followed).await;
    let events = 300;
    let rate = 15.0;
    let stream_start = std::time::SystemTime::now();
    let stream = start_stream(&fake_api, &watched, rate, events).await;

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
    // The follower's events stopped when Redis died (they came through it); its
    // replica then carried the topic itself. What it missed in between lies inside
    // the gap notice it got (give or take the fake's pacing).
    let expected = follower.expected(stream, &watched, events);
    {
        let log = follower.log.lock().unwrap();
        let missed: Vec<u64> = expected
            .iter()
            .filter(|key| !log.events.contains_key(key))
            .map(|(_, seq)| *seq)
            .collect();
        let spans: Vec<(std::time::SystemTime, std::time::SystemTime)> = log
            .gaps
            .iter()
            .filter(|gap| gap["eventBody"]["topics"] == json!(followed))
            .map(|gap| {
                let at = |field: &str| {
                    humantime::parse_rfc3339(gap["eventBody"][field].as_str().unwrap()).unwrap()
                };
                (at("from"), at("to"))
            })
            .collect();
        assert!(!spans.is_empty(), "the follower heard of a gap");
        let pacing = Duration::from_secs(1);
        for seq in &missed {
            let sent = stream_start + Duration::from_secs_f64(*seq as f64 / rate);
            assert!(
                spans
                    .iter()
                    .any(|(from, to)| *from <= sent + pacing && sent <= *to + pacing),
                "event {seq} (sent about {}) missed outside the gaps {spans:?}",
                humantime::format_rfc3339_millis(sent)
            );
        }
        assert!(log.events.values().all(|&n| n == 1), "no event twice");
        println!(
            "follower: {} of {} events missed, inside gap notices {spans:?}",
            missed.len(),
            expected.len()
        );
    }
    receives_every_event(&fake_api, &late_desktop, &late_topics).await;

    let count = client_count(&fake_api).await;
    assert!(count.peak <= TROUBLE_BUDGET as u64, "peak {}", count.peak);
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
    let (fake, fake_api) = fake_with_budget(TROUBLE_BUDGET).await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let cluster = format!(
        "redis_url = \"{}\"\nca_file = \"{}\"",
        redis.tls_url(),
        ca_file.display()
    );
    let (proxy, client, admin) = start_proxy(replica_config(
        &fake.base_url(),
        &secrets,
        TROUBLE_BUDGET,
        &cluster,
    ))
    .await;
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
    receives_every_event(&fake_api, &desktop, &watched).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_topic_on_two_replicas_enters_redis_once_and_reaches_every_desktop_once() {
    let fleet = Fleet::start().await;
    let fake_api = &fleet.fake_api;
    // An event from long ago (1970): the stream keeps none older than client_idle
    // and a minute.
    let mut connection = fleet.redis.connection().await;
    let _: String = redis::cmd("XADD")
        .arg("handover:events")
        .arg("1-1")
        .arg(&["t", "v2.bus.0", "c", "ancient", "f", "{}"])
        .query_async(&mut connection)
        .await
        .unwrap();
    let watched = topics("v2.bus", 2);
    let mut replicas = Vec::new();
    let mut desktops = Vec::new();
    for _ in 0..2 {
        let (proxy, client, admin) = fleet.replica().await;
        desktops.push(desktop(&client, &watched).await);
        replicas.push((proxy, admin));
    }
    let events = 120;
    let stream = start_stream(fake_api, &watched, 30.0, events).await;
    stream_done(fake_api, stream, Instant::now() + DEADLINE).await;
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &watched, events)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));

    // One replica carried the topics upstream (each is subscribed once at Genesys);
    // each event entered the stream once, and the one from long ago is gone.
    let entries: u64 = redis::cmd("XLEN")
        .arg("handover:events")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(entries, events);
    let mut published = 0.0;
    for (_, admin) in &replicas {
        published += metric(admin, "handover_cluster_events_published_total", &[])
            .await
            .unwrap_or(0.0);
        assert_eq!(
            metric(
                admin,
                "handover_cluster_events_delivered_directly_total",
                &[]
            )
            .await,
            Some(0.0)
        );
    }
    assert_eq!(published, events as f64);
    each_topic_subscribed_once(fake_api, watched.len()).await;
    async fn carried(admin: &Api) -> Option<f64> {
        metric(admin, "handover_cluster_topics_carried", &[]).await
    }
    assert_eq!(
        (carried(&replicas[0].1).await, carried(&replicas[1].1).await),
        (Some(2.0), Some(0.0)),
        "the replica whose desktop came first carries them"
    );

    // The carrier drains while events flow: the other replica carries the topics
    // before it lets go, and its desktop misses nothing and hears of no gap.
    let second = start_stream(fake_api, &watched, 40.0, events).await;
    wait_for("the stream to flow", || async {
        let progress = fake_api.get(&format!("/__mock/streams/{second}")).await;
        (progress.body["sent"].as_u64() > Some(events / 4)).then_some(())
    })
    .await;
    let (carrier, _) = replicas.remove(0);
    carrier.stop().await;
    stream_done(fake_api, second, Instant::now() + DEADLINE).await;
    let staying = &desktops[1..];
    let (lost, duplicated, unexpected) = settle(staying, &|d| {
        let mut expected = d.expected(stream, &watched, events);
        expected.extend(d.expected(second, &watched, events));
        expected
    })
    .await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    assert!(staying[0].log.lock().unwrap().gaps.is_empty());
    assert_eq!(carried(&replicas[0].1).await, Some(2.0));
    assert_eq!(
        metric(
            &replicas[0].1,
            "handover_cluster_topics_taken_over_total",
            &[]
        )
        .await,
        Some(2.0)
    );
    each_topic_subscribed_once(fake_api, watched.len()).await;
    for (proxy, _) in replicas {
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_desktop_moved_by_a_drain_misses_nothing_and_one_whose_replica_is_gone_hears_of_the_gap()
{
    // The replicas' grace is short: a drain waits that long at most for a desktop
    // to come back.
    let fleet = Fleet::start().await;
    let fake_api = &fleet.fake_api;
    let (leaving, leaving_client, _) = fleet.replica().await;
    let (staying, staying_client, staying_admin) = fleet.replica().await;

    // Two desktops make their channels on one replica, as the SDK does; the second
    // also wants a topic nobody else wants.
    let watched = topics("v2.moved", 2);
    let lonely = "v2.lonely.0".to_owned();
    let mut desktops = Vec::new();
    for n in 0..2 {
        let created = leaving_client.post("/api/v2/notifications/channels").await;
        let id = created.body["id"].as_str().unwrap().to_owned();
        let wanted = watched.iter().chain((n == 1).then_some(&lonely));
        let body: Vec<Value> = wanted.map(|t| json!({ "id": t })).collect();
        let reply = leaving_client
            .send(
                leaving_client
                    .http
                    .put(format!(
                        "{}/api/v2/notifications/channels/{id}/subscriptions",
                        leaving_client.base
                    ))
                    .json(&body),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let socket = connect(created.body["connectUri"].as_str().unwrap()).await;
        desktops.push((id, socket));
    }
    let first = fake_api.publish(&watched[0]).await;
    for (_, socket) in &mut desktops {
        expect_event(socket, &first).await;
    }

    // Its replica drains (a rollout): the desktops are told to reconnect...
    let stopping = tokio::spawn(leaving.stop());
    for (_, socket) in &mut desktops {
        let (code, _) = until_closed(socket).await;
        assert_eq!(code, Some(1012));
    }
    // ...an event comes while they are between sockets...
    let between = fake_api.publish(&watched[1]).await;
    // ...and the first reconnects at once, with the same channel id, to the replica
    // the balancer picks: it gets that event, once, and no gap notice.
    let uri = |id: &str| {
        format!(
            "ws://{}/channels/{id}",
            staying_client.base.trim_start_matches("http://")
        )
    };
    let mut moved = connect(&uri(&desktops[0].0)).await;
    expect_event(&mut moved, &between).await;
    // The drain ends once the channel is served elsewhere; the second desktop never
    // came back, so its wait is bounded by the grace.
    let drained = Instant::now();
    stopping.await.unwrap();
    assert!(drained.elapsed() < Duration::from_secs(5));
    let gone = std::time::SystemTime::now();
    let after = fake_api.publish(&watched[0]).await;
    expect_event(&mut moved, &after).await;

    // The second comes back only after its replica is gone: what was published in
    // between on its lonely topic never reached the stream (nobody carried it), and
    // it hears of that span.
    let mut late = connect(&uri(&desktops[1].0)).await;
    let notice = loop {
        match next_non_heartbeat(&mut late).await {
            Next::Text(frame) if frame["topicName"] == "handover.gap" => break frame,
            Next::Text(_) => {}
            other => panic!("expected a gap notice, got {other:?}"),
        }
    };
    let from = humantime::parse_rfc3339(notice["eventBody"]["from"].as_str().unwrap()).unwrap();
    let to = humantime::parse_rfc3339(notice["eventBody"]["to"].as_str().unwrap()).unwrap();
    assert!(
        from <= gone && to >= gone,
        "the span covers the replica's end: {notice}"
    );
    let mut named: Vec<String> =
        serde_json::from_value(notice["eventBody"]["topics"].clone()).unwrap();
    named.sort();
    let mut all = watched.clone();
    all.push(lonely.clone());
    all.sort();
    assert_eq!(named, all);
    // Both channels were taken over, and the late one was replayed what the stream
    // held for it.
    let counted = |name| metric(&staying_admin, name, &[]);
    assert_eq!(
        counted("handover_cluster_channels_taken_over_total").await,
        Some(2.0)
    );
    assert!(counted("handover_cluster_events_replayed_total").await >= Some(1.0));
    let id = desktops[0].0.clone();
    // The other replica answers its REST calls, and still 404 for unknown channels.
    let listed = staying_client
        .get(&format!(
            "/api/v2/notifications/channels/{id}/subscriptions"
        ))
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["entities"].as_array().unwrap().len(), 2);
    // Each topic is carried upstream once, by the replica left.
    each_topic_subscribed_once(fake_api, 3).await;
    let unknown = staying_client
        .send(staying_client.http.head(format!(
            "{}/api/v2/notifications/channels/nosuchchannel",
            staying_client.base
        )))
        .await;
    assert_eq!(unknown.status, 404);
    staying.stop().await;
}

#[tokio::test]
async fn a_subscription_call_that_lands_on_another_replica_is_carried_out_where_the_socket_is() {
    let fleet = Fleet::start().await;
    let fake_api = &fleet.fake_api;
    let (first, first_client, first_admin) = fleet.replica().await;
    let (second, second_client, _) = fleet.replica().await;

    // A balancer spreads the desktop's connections: its channel is made on one
    // replica, its socket lands on the other...
    let created = first_client.post("/api/v2/notifications/channels").await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let mut socket = connect(&format!(
        "ws://{}/channels/{id}",
        second_client.base.trim_start_matches("http://")
    ))
    .await;
    // ...and its subscription call on the first again.
    let watched = topics("v2.split", 2);
    let subscriptions = |client: &Api| {
        format!(
            "{}/api/v2/notifications/channels/{id}/subscriptions",
            client.base
        )
    };
    let body: Vec<Value> = watched.iter().map(|t| json!({ "id": t })).collect();
    let reply = first_client
        .send(
            first_client
                .http
                .put(subscriptions(&first_client))
                .json(&body),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body["entities"].as_array().unwrap().len(), 2);
    // The socket gets what the call subscribed.
    for topic in &watched {
        let published = fake_api.publish(topic).await;
        expect_event(&mut socket, &published).await;
    }
    let listed = first_client
        .get(&format!(
            "/api/v2/notifications/channels/{id}/subscriptions"
        ))
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["entities"].as_array().unwrap().len(), 2);
    // Each topic is carried upstream once.
    each_topic_subscribed_once(fake_api, 2).await;
    // A refusal (Genesys denies the topic) reads the same wherever the call landed.
    fake_api
        .patch_settings(json!({ "deny_topics": ["v2.secret.*"] }))
        .await;
    let bad = json!([{ "id": "v2.secret.x" }]);
    let direct = second_client
        .send(
            second_client
                .http
                .post(subscriptions(&second_client))
                .json(&bad),
        )
        .await;
    let forwarded = first_client
        .send(
            first_client
                .http
                .post(subscriptions(&first_client))
                .json(&bad),
        )
        .await;
    assert!(direct.status >= 400, "{}", direct.body);
    assert_eq!(
        (forwarded.status, forwarded.body),
        (direct.status, direct.body)
    );
    assert_eq!(
        metric(&first_admin, "handover_cluster_calls_forwarded_total", &[]).await,
        Some(3.0),
        "the PUT, the GET and the refused POST"
    );
    first.stop().await;
    second.stop().await;
}
