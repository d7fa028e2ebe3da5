//! What a real edge throws at the proxy, and the promise holding through it:
//! requests abandoned at any point, refused subscription changes, combined topics
//! and odd topic names, a channel task that panics, an org that ends idle tokens,
//! and a flood of in-band subscribes.

mod common;

use std::time::Duration;

use common::proxy::*;
use common::*;
use futures_util::SinkExt;
use handover::mock::{ClientSpec, MockConfig, Settings};
use handover::upstream::state::Role;
use rand::{RngExt, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Polls `condition` for up to `limit`.
async fn within<T, F, Fut>(limit: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + limit;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates a client channel; returns (id, connectUri).
async fn channel(client: &Api) -> (String, String) {
    let created = client.post("/api/v2/notifications/channels").await;
    assert_eq!(created.status, 200, "{}", created.body);
    (
        created.body["id"].as_str().unwrap().to_owned(),
        created.body["connectUri"].as_str().unwrap().to_owned(),
    )
}

async fn put_topics(client: &Api, id: &str, topics: &[&str]) -> Reply {
    let body: Vec<Value> = topics.iter().map(|t| json!({"id": t})).collect();
    client
        .call(
            Method::PUT,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            "",
            Some(json!(body)),
        )
        .await
}

/// Writes the first `cut` bytes of `request` to the proxy, waits `linger`, and
/// hangs up: a desktop reloading mid-request.
async fn abandon(addr: std::net::SocketAddr, request: Vec<u8>, cut: usize, linger: Duration) {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let _ = stream.write_all(&request[..cut.min(request.len())]).await;
    tokio::time::sleep(linger).await;
    drop(stream);
}

#[tokio::test]
async fn abandoned_requests_leave_no_topic_channel_or_slot_behind() {
    let extra = "[server]\nlisten = \"127.0.0.1:0\"\nclient_idle = \"1s\"\n\
                 [upstream]\nmax_channels = 4\nmax_topics_per_channel = 100\nidle_channel_timeout = \"1s\"\n";
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), extra).await;
    let bystander = desktop(&w.client, &["v2.bystander".to_owned()]).await;
    let addr = w.proxy.client_addr;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    // 300 requests abandoned at random points, 30 at a time: REST PUTs before, in the
    // middle of and after their body, or while the proxy waits on Genesys; /stream
    // upgrades before and while they subscribe; in-band subscribes on a socket that
    // goes away.
    let mut abandoned = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        let linger = Duration::from_millis(rng.random_range(0..150));
        match i % 3 {
            0 => {
                let (id, _) = channel(&w.client).await;
                let body = format!(r#"[{{"id":"v2.abandon.{i}.a"}},{{"id":"v2.abandon.{i}.b"}}]"#);
                let head = format!(
                    "PUT /api/v2/notifications/channels/{id}/subscriptions HTTP/1.1\r\nHost: {addr}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let cut = match rng.random_range(0..4) {
                    0 => head.len(),
                    1 => head.len() + body.len() / 2,
                    _ => head.len() + body.len(),
                };
                abandoned.spawn(abandon(
                    addr,
                    format!("{head}{body}").into_bytes(),
                    cut,
                    linger,
                ));
            }
            1 => {
                let request = format!(
                    "GET /stream?topics=v2.abandon.{i}.s HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
                     Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                );
                let cut = if rng.random_bool(0.2) {
                    request.len() / 2
                } else {
                    request.len()
                };
                abandoned.spawn(abandon(addr, request.into_bytes(), cut, linger));
            }
            _ => {
                let (_, uri) = channel(&w.client).await;
                abandoned.spawn(async move {
                    let mut socket = connect(&uri).await;
                    let subscribe = format!(
                        r#"{{"message":"subscribe","topics":["v2.abandon.{i}.w"],"correlationId":"c{i}"}}"#
                    );
                    let _ = socket.send(Message::text(subscribe)).await;
                    tokio::time::sleep(linger).await;
                    drop(socket);
                });
            }
        }
        if abandoned.len() >= 30 {
            abandoned.join_next().await;
        }
    }
    abandoned.join_all().await;

    // Everything comes back to what the bystander alone holds: one topic, one
    // channel (one slot), one subscription upstream.
    within(
        Duration::from_secs(40),
        "topics, channels and slots back to the baseline",
        || {
            let (proxy, fake_api) = (&w.proxy, w.fake_api.clone());
            let topics = proxy.router.topic_count();
            let channels = proxy.pool.channels();
            async move {
                let stats = fake_api.stats().await;
                let settled = topics == 1
                    && channels.len() == 1
                    && channels[0].topics == 1
                    && stats["subscriptions"] == 1
                    && stats["clients"]["client-a"]["live_channels"] == 1;
                settled.then_some(())
            }
        },
    )
    .await;
    // A newcomer subscribes at once.
    let started = Instant::now();
    let newcomer = desktop(&w.client, &["v2.newcomer".to_owned()]).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(!bystander.disconnected() && !newcomer.disconnected());
}

#[tokio::test]
async fn a_wholesale_refusal_refuses_only_its_newcomer_and_a_handover_still_happens() {
    // 8 s tokens: a handover every 4 to 6 s.
    let extra = "[handover]\nlead = \"3s\"\noverlap = \"500ms\"\n";
    let w = World::start(&[A], Duration::from_secs(8), Settings::default(), extra).await;
    let served = topics("v2.served", 3);
    let mut desktops = vec![desktop(&w.client, &served).await];
    let stream = start_stream(&w.fake_api, &served, 200.0, 2400).await;

    // Genesys refuses the next subscription change as a whole.
    let reply = w
        .fake_api
        .control(Method::POST, "faults/subscriptions", json!({"count": 1}))
        .await;
    assert_eq!(reply.status, 204);
    let (id, _) = channel(&w.client).await;
    let started = Instant::now();
    let refused = put_topics(&w.client, &id, &["v2.newcomer.refused"]).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["code"], "bad.request");
    assert_eq!(refused.body["status"], 400);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        started.elapsed()
    );

    // The served desktop's channel hands over (token expiry) after the refusal.
    let handed_over = within(Duration::from_secs(15), "a handover", || {
        let done = w.proxy.pool.handovers();
        async move { (done >= 1).then_some(done) }
    })
    .await;
    assert!(handed_over >= 1);
    // A newcomer after it is answered within a bound, and subscribed.
    let started = Instant::now();
    desktops.push(desktop(&w.client, &["v2.newcomer.later".to_owned()]).await);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        started.elapsed()
    );

    stream_done(
        &w.fake_api,
        stream,
        Instant::now() + Duration::from_secs(20),
    )
    .await;
    let (lost, duplicated, unexpected) =
        settle(&desktops[..1], &|d| d.expected(stream, &served, 2400)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    let log = desktops[0].log.lock().unwrap();
    assert!(log.gaps.is_empty(), "no gap notice: {:?}", log.gaps);
    assert!(log.closed.is_none());
}

#[tokio::test]
async fn combined_topics_count_as_their_expansion_and_deliver_each_topic() {
    // The fake counts combined topics expanded, five to a channel; so does the proxy.
    let settings = Settings {
        max_topics_per_channel: 5,
        ..Settings::default()
    };
    let extra = "[upstream]\nmax_channels = 3\nmax_topics_per_channel = 5\n";
    let w = World::start(&[A], Duration::from_secs(3600), settings, extra).await;
    let plain = desktop(&w.client, &topics("v2.users.p", 4)).await;
    let combined = desktop(
        &w.client,
        &["v2.users.c?presence&routingStatus&station".to_owned()],
    )
    .await;
    // 4 + 3 > 5: the combined topic went to a second channel, and Genesys refused
    // nothing.
    let mut loads: Vec<usize> = w
        .proxy
        .pool
        .channels()
        .iter()
        .filter(|c| c.role == Role::Serving)
        .map(|c| c.topics)
        .collect();
    loads.sort();
    assert_eq!(loads, [1, 4]);
    let stats = w.fake_api.stats().await;
    assert_eq!(
        stats["counters"]["rejected_total"], 0,
        "{}",
        stats["rejected"]
    );
    // Events on each named topic reach the combined subscriber (under their own names).
    for topic in ["v2.users.c.presence", "v2.users.c.station"] {
        w.fake_api.publish(topic).await;
    }
    within(Duration::from_secs(5), "both events", || {
        let log = combined.log.clone();
        async move { (log.lock().unwrap().events.len() == 2).then_some(()) }
    })
    .await;
    assert!(plain.received().is_empty());
}

#[tokio::test]
async fn odd_topic_names_are_refused_with_400_before_anything_goes_upstream() {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await;
    let odd = [
        "../../../admin",
        "v2.users.<script>alert(1)</script>.presence",
        "v2.users.\u{202e}1.presence",
        "v2.system.socket_closing",
        "v2..presence",
        "",
    ];
    let (id, uri) = channel(&w.client).await;
    for name in odd {
        let reply = put_topics(&w.client, &id, &[name]).await;
        assert_eq!(reply.status, 400, "{name:?}: {}", reply.body);
        assert_eq!(reply.body["code"], "bad.request");
        assert!(!reply.body["message"].as_str().unwrap().contains('<'));
        assert!(!reply.body["message"].as_str().unwrap().contains('\u{202e}'));
        let query: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let stream = w
            .client
            .send(
                w.client
                    .http
                    .get(format!("{}/stream?topics={query}", w.client.base))
                    .header("Connection", "Upgrade")
                    .header("Upgrade", "websocket")
                    .header("Sec-WebSocket-Version", "13")
                    .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            )
            .await;
        assert!(
            stream.status == 400,
            "/stream?topics={name:?}: {} {}",
            stream.status,
            stream.body
        );
    }
    let mut socket = connect(&uri).await;
    send_text(
        &mut socket,
        r#"{"message":"subscribe","topics":["../../../admin"],"correlationId":"odd"}"#,
    )
    .await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(answer) => {
            assert_eq!(answer["result"], "400", "{answer}");
            assert_eq!(answer["correlationId"], "odd");
        }
        other => panic!("expected an answer, got {other:?}"),
    }
    // Nothing reached Genesys.
    let stats = w.fake_api.stats().await;
    assert_eq!(stats["subscriptions"], 0);
    assert_eq!(stats["counters"]["rejected_total"], 0);
}

#[tokio::test]
async fn a_panicking_channel_task_moves_its_topics_and_gives_its_slot_back() {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await;
    let watched = desktop(&w.client, &["v2.crash".to_owned()]).await;
    let channels = w.proxy.pool.channels();
    assert_eq!(channels.len(), 1);
    w.proxy.pool.inject_panic(channels[0].key);
    // The desktop hears of the gap, then gets events again from a new channel.
    within(Duration::from_secs(10), "a gap notice", || {
        let log = watched.log.clone();
        async move { (!log.lock().unwrap().gaps.is_empty()).then_some(()) }
    })
    .await;
    within(Duration::from_secs(10), "events again", || {
        let (log, fake_api) = (watched.log.clone(), w.fake_api.clone());
        async move {
            if !log.lock().unwrap().events.is_empty() {
                return Some(());
            }
            fake_api.publish("v2.crash").await;
            None
        }
    })
    .await;
    // The dead task's token was retired (its channel is gone upstream) and its slot
    // freed: one channel at Genesys, one in the pool.
    within(Duration::from_secs(10), "the old channel gone", || {
        let (fake_api, pool) = (w.fake_api.clone(), w.proxy.pool.clone());
        async move {
            let stats = fake_api.stats().await;
            let ours = pool.channels();
            (stats["clients"]["client-a"]["live_channels"] == 1
                && stats["clients"]["client-a"]["live_tokens"] == 1
                && ours.len() == 1
                && ours[0].holds_slot)
                .then_some(())
        }
    })
    .await;
    assert!(!watched.disconnected());
}

#[tokio::test]
async fn a_token_the_org_would_idle_is_kept_active_without_a_gap() {
    let idle = Duration::from_millis(1500);
    let (fake, fake_api) = start(MockConfig {
        clients: vec![
            ClientSpec::new("client-a", "secret-a", Duration::from_secs(3600)).idling_after(idle),
        ],
        settings: Settings::default(),
        socket_base: None,
    })
    .await;
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let (_proxy, client, _admin) =
        start_proxy(proxy_config(&fake.base_url(), &secrets, &[A], "")).await;
    let quiet = topics("v2.quiet", 2);
    let desktops = vec![desktop(&client, &quiet).await];
    // Five idle periods of events, and no subscription change.
    let stream = start_stream(&fake_api, &quiet, 100.0, 750).await;
    stream_done(&fake_api, stream, Instant::now() + Duration::from_secs(20)).await;
    let (lost, duplicated, unexpected) =
        settle(&desktops, &|d| d.expected(stream, &quiet, 750)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    assert!(desktops[0].log.lock().unwrap().gaps.is_empty());
    let stats = fake_api.stats().await;
    assert_eq!(stats["counters"]["tokens_idled"], 0, "no token idled");
    assert_eq!(
        stats["clients"]["client-a"]["channels_created"], 1,
        "no handover was needed"
    );
}

#[tokio::test]
async fn in_band_subscribes_are_answered_one_at_a_time_in_order() {
    let w = World::start(&[A], Duration::from_secs(3600), Settings::default(), "").await;
    let (_, uri) = channel(&w.client).await;
    let mut socket = connect(&uri).await;
    for i in 0..40 {
        send_text(
            &mut socket,
            &format!(
                r#"{{"message":"subscribe","topics":["v2.inband.{i}"],"correlationId":"{i}"}}"#
            ),
        )
        .await;
    }
    send_text(&mut socket, r#"{"message":"ping"}"#).await;
    let mut answered = Vec::new();
    let mut ponged = false;
    while answered.len() < 40 || !ponged {
        match next_non_heartbeat(&mut socket).await {
            Next::Text(frame) if frame["eventBody"]["message"] == "pong" => ponged = true,
            Next::Text(frame) => {
                assert_eq!(frame["result"], "200", "{frame}");
                answered.push(
                    frame["correlationId"]
                        .as_str()
                        .unwrap()
                        .parse::<u32>()
                        .unwrap(),
                );
            }
            other => panic!("socket closed: {other:?}"),
        }
    }
    assert_eq!(answered, (0..40).collect::<Vec<_>>(), "in order");
    assert_eq!(w.proxy.router.topic_count(), 40);
}

/// The proxy behind a relay that can hold back its upstream sockets' bytes, with a
/// desktop on two topics and a stream of 1000 events at 100/s.
struct Relayed {
    relay: handover::soak::relay::Relay,
    proxy: handover::app::Proxy,
    fake_api: Api,
    desktops: Vec<Desktop>,
    stream: u64,
    topics: Vec<String>,
    _fake: handover::mock::MockGenesys,
    _secrets: Secrets,
    shutdown: tokio_util::sync::CancellationToken,
}

async fn relayed(heartbeat: &str) -> Relayed {
    use handover::soak::relay::Relay;
    let (tasks, shutdown) = (
        tokio_util::task::TaskTracker::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap();
    let (fake, fake_api) = start(MockConfig {
        clients: vec![ClientSpec::new(
            "client-a",
            "secret-a",
            Duration::from_secs(8),
        )],
        settings: Settings::default(),
        socket_base: Some(format!("ws://{relay_addr}")),
    })
    .await;
    let relay = Relay::start(listener, fake.addr(), &tasks, shutdown.clone()).unwrap();
    let secrets = Secrets::new();
    secrets.write("a", "secret-a");
    let extra = format!(
        "[handover]\nlead = \"3s\"\noverlap = \"200ms\"\n[upstream]\nheartbeat = \"{heartbeat}\"\n"
    );
    let config = proxy_config(&format!("http://{relay_addr}"), &secrets, &[A], &extra);
    let (proxy, client, _admin) = start_proxy(config).await;
    let topics = topics("v2.relayed", 2);
    let desktops = vec![desktop(&client, &topics).await];
    let stream = start_stream(&fake_api, &topics, 100.0, 1000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Relayed {
        relay,
        proxy,
        fake_api,
        desktops,
        stream,
        topics,
        _fake: fake,
        _secrets: secrets,
        shutdown,
    }
}

impl Relayed {
    async fn handover(&self) {
        within(Duration::from_secs(15), "a handover", || {
            let done = self.proxy.pool.handovers();
            async move { (done >= 1).then_some(()) }
        })
        .await;
        stream_done(
            &self.fake_api,
            self.stream,
            Instant::now() + Duration::from_secs(20),
        )
        .await;
    }
}

#[tokio::test]
async fn a_lagging_old_socket_delivers_everything_across_a_handover() {
    use handover::soak::relay::{Condition, Kind};
    let r = relayed("30s").await;
    // The serving channel's socket falls 1.5 s behind, far more than the overlap,
    // until its handover (token expiry) has come and gone.
    let held = r.relay.apply(
        Kind::Socket,
        Condition::Delayed(Duration::from_millis(1500)),
        &mut |_| true,
    );
    assert_eq!(held.len(), 1);
    r.handover().await;
    let (lost, duplicated, unexpected) =
        settle(&r.desktops, &|d| d.expected(r.stream, &r.topics, 1000)).await;
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
    assert!(r.desktops[0].log.lock().unwrap().gaps.is_empty());
    r.shutdown.cancel();
}

#[tokio::test]
async fn an_old_socket_gone_silent_before_its_handover_is_announced_as_a_gap() {
    use handover::soak::relay::{Condition, Kind};
    let r = relayed("3s").await;
    // When the serving channel's handover begins, its socket goes black (the oldest
    // socket link is its own); the old socket never catches up.
    within(Duration::from_secs(15), "a handover to begin", || {
        let building = r
            .proxy
            .pool
            .channels()
            .iter()
            .any(|c| matches!(c.role, Role::Successor { .. }));
        async move { building.then_some(()) }
    })
    .await;
    let held = r
        .relay
        .apply(Kind::Socket, Condition::Stalled, &mut |i| i == 0);
    assert_eq!(held.len(), 1);
    r.handover().await;
    let desktop = &r.desktops[0];
    let gap = within(Duration::from_secs(10), "a gap notice", || {
        let log = desktop.log.clone();
        async move { log.lock().unwrap().gaps.first().cloned() }
    })
    .await;
    assert_eq!(
        gap["eventBody"]["topics"].as_array().unwrap().len(),
        2,
        "{gap}"
    );
    // Every event is either received or was sent inside the announced gap.
    let from = humantime::parse_rfc3339(gap["eventBody"]["from"].as_str().unwrap()).unwrap();
    let to = humantime::parse_rfc3339(gap["eventBody"]["to"].as_str().unwrap()).unwrap();
    let received = desktop.received();
    let missing: Vec<u64> = (0..1000)
        .filter(|seq| !received.contains_key(&(r.stream, *seq)))
        .collect();
    assert!(!missing.is_empty(), "the black hole swallowed something");
    // The stream runs at 100/s from about `started`: event i left about i/100 s later.
    let first_missing = missing[0];
    let last_missing = missing[missing.len() - 1];
    let span = Duration::from_millis((last_missing - first_missing) * 10);
    assert!(
        to.duration_since(from).unwrap() + Duration::from_secs(1) >= span,
        "the gap {from:?}..{to:?} spans the {} missing events",
        missing.len()
    );
    r.shutdown.cancel();
}
