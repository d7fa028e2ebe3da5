//! The fake Genesys Cloud, tested over real sockets on loopback: every behaviour the
//! proxy's tests rely on, including the unpleasant ones.

mod common;

use std::time::Duration;

use common::*;
use handover::mock::{ClientSpec, MockConfig, ServiceTimes, Settings};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;

const CHANNELS: &str = "/api/v2/notifications/channels";

fn subs(channel: &str) -> String {
    format!("{CHANNELS}/{channel}/subscriptions")
}

fn rejected_codes(stats: &Value) -> Vec<String> {
    stats["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_owned())
        .collect()
}

// ---- OAuth ---------------------------------------------------------------------

#[tokio::test]
async fn client_credentials_grant_mints_a_bearer_token_with_the_clients_lifetime() {
    let mut config = fast_config();
    config
        .clients
        .push(ClientSpec::new("short", "s", Duration::from_secs(300)));
    let (_fake, api) = start(config).await;

    let reply = api
        .token_request(CLIENT, SECRET, "client_credentials")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["token_type"], "bearer");
    assert_eq!(reply.body["expires_in"], 3600);
    assert!(reply.body["access_token"].as_str().unwrap().len() >= 40);

    let reply = api.token_request("short", "s", "client_credentials").await;
    assert_eq!(reply.body["expires_in"], 300);

    // Credentials in the form body are accepted too (RFC 6749 §2.3.1).
    let reply = api
        .send(api.http.post(format!("{}/oauth/token", api.base)).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
        ]))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(api.stats().await["clients"][CLIENT]["tokens_issued"], 2);
}

#[tokio::test]
async fn bad_credentials_and_grants_get_400_in_the_oauth_shape() {
    let (_fake, api) = start(fast_config()).await;

    let wrong_secret = api
        .token_request(CLIENT, "nope", "client_credentials")
        .await;
    assert_eq!(wrong_secret.status, 400);
    assert_eq!(
        wrong_secret.body,
        json!({"error": "invalid_client", "description": "authentication failed", "error_description": "authentication failed"})
    );

    let unknown = api
        .token_request("ghost", SECRET, "client_credentials")
        .await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.body["error"], "invalid_client");
    assert_eq!(unknown.body["description"], "client not found");

    let grant = api.token_request(CLIENT, SECRET, "password").await;
    assert_eq!(grant.status, 400);
    assert_eq!(grant.body["error"], "unsupported_grant_type");

    let stats = api.stats().await;
    assert_eq!(stats["counters"]["rejected_total"], 3);
    assert_eq!(
        rejected_codes(&stats),
        ["invalid_client", "invalid_client", "unsupported_grant_type"]
    );
}

#[tokio::test]
async fn token_endpoint_faults_throttle_and_outage_then_recover() {
    let (_fake, api) = start(fast_config()).await;

    let set = api
        .control(
            Method::POST,
            "faults/token",
            json!({"mode": "throttle", "count": 2}),
        )
        .await;
    assert_eq!(set.status, 204);
    for _ in 0..2 {
        let reply = api
            .token_request(CLIENT, SECRET, "client_credentials")
            .await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.body["error"], "invalid_request");
        assert!(
            reply.body["description"]
                .as_str()
                .unwrap()
                .starts_with("rate limit exceeded;")
        );
    }
    api.mint(CLIENT, SECRET).await;

    api.control(
        Method::POST,
        "faults/token",
        json!({"mode": "outage", "status": 503}),
    )
    .await;
    for _ in 0..3 {
        let reply = api
            .token_request(CLIENT, SECRET, "client_credentials")
            .await;
        assert_eq!(reply.status, 503);
    }
    api.control(Method::POST, "faults/token", json!({"mode": "none"}))
        .await;
    api.mint(CLIENT, SECRET).await;
}

// ---- channels and subscriptions ---------------------------------------------------

#[tokio::test]
async fn a_channel_has_a_connect_uri_on_the_fake_and_an_iso_expiry() {
    let (fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let reply = api.call(Method::POST, CHANNELS, &token, None).await;
    assert_eq!(reply.status, 200);
    let id = reply.body["id"].as_str().unwrap();
    assert_eq!(
        reply.body["connectUri"],
        format!("ws://{}/channels/{id}", fake.addr())
    );
    let expires = reply.body["expires"].as_str().unwrap();
    assert!(expires.ends_with('Z'), "{expires}");
    let expires = humantime::parse_rfc3339(expires).unwrap();
    let in_a_day = std::time::SystemTime::now() + Duration::from_secs(24 * 3600);
    assert!(
        expires
            .duration_since(in_a_day)
            .unwrap_or_else(|e| e.duration())
            < Duration::from_secs(60)
    );

    let listed = api.call(Method::GET, CHANNELS, &token, None).await;
    assert_eq!(listed.body["entities"][0]["id"], id);
    let other_token = api.mint(CLIENT, SECRET).await;
    let listed = api.call(Method::GET, CHANNELS, &other_token, None).await;
    assert_eq!(
        listed.body["entities"],
        json!([]),
        "channels are listed per token"
    );
}

#[tokio::test]
async fn the_21st_channel_silently_evicts_the_oldest_idle_one_first() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(api.channel(&token).await);
    }
    // The oldest channel has a socket; the second oldest is the oldest idle one.
    let mut oldest_socket = connect(&ids[0].1).await;

    let (_, _) = api.channel(&token).await;
    let head = |id: String| {
        let api = api.clone();
        let token = token.clone();
        async move {
            api.call(Method::HEAD, &format!("{CHANNELS}/{id}"), &token, None)
                .await
                .status
        }
    };
    assert_eq!(
        head(ids[1].0.clone()).await,
        404,
        "oldest idle channel evicted"
    );
    assert_eq!(head(ids[0].0.clone()).await, 200, "connected channel kept");
    let stats = api.stats().await;
    assert_eq!(stats["clients"][CLIENT]["live_channels"], 20);
    assert_eq!(stats["clients"][CLIENT]["peak_channels"], 20);
    assert_eq!(stats["counters"]["peak_live_channels"], 20);
    assert_eq!(stats["counters"]["evictions"], 1);

    // Once every channel has a socket, the least recently used one goes, socket and all.
    let mut sockets = Vec::new();
    for (id, uri) in ids.iter().skip(2) {
        let socket = connect(uri).await;
        wait_for("socket registered", || {
            let api = api.clone();
            let id = id.clone();
            async move {
                let stats = api.stats().await;
                let found = stats["channels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["id"] == id && c["socket"] == true);
                found.then_some(())
            }
        })
        .await;
        sockets.push(socket);
    }
    let newest = api.channel(&token).await;
    let _newest_socket = connect(&newest.1).await;
    api.channel(&token).await;
    let (code, _) = until_closed(&mut oldest_socket).await;
    assert_eq!(code, Some(1000), "the evicted channel's socket is closed");
    assert_eq!(head(ids[0].0.clone()).await, 404);
    assert_eq!(api.stats().await["clients"][CLIENT]["peak_channels"], 20);
}

#[tokio::test]
async fn subscriptions_can_be_listed_added_replaced_and_removed() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, _) = api.channel(&token).await;

    let put = api.subscribe(&token, &id, &["a.1", "a.2"]).await;
    assert_eq!(put.status, 200);
    assert_eq!(
        put.body["entities"],
        json!([{"id": "a.1", "state": "Permitted"}, {"id": "a.2", "state": "Permitted"}])
    );

    let post = api
        .call(
            Method::POST,
            &subs(&id),
            &token,
            Some(json!([{"id": "a.3"}])),
        )
        .await;
    assert_eq!(post.status, 200);
    assert_eq!(post.body["entities"].as_array().unwrap().len(), 3);

    let put = api.subscribe(&token, &id, &["b.1"]).await;
    assert_eq!(
        put.body["entities"],
        json!([{"id": "b.1", "state": "Permitted"}])
    );

    let get = api.call(Method::GET, &subs(&id), &token, None).await;
    assert_eq!(
        get.body["entities"],
        json!([{"id": "b.1", "state": "Permitted"}])
    );

    let delete = api.call(Method::DELETE, &subs(&id), &token, None).await;
    assert_eq!(delete.status, 204);
    let get = api.call(Method::GET, &subs(&id), &token, None).await;
    assert_eq!(get.body["entities"], json!([]));

    assert_eq!(
        api.call(Method::HEAD, &format!("{CHANNELS}/{id}"), &token, None)
            .await
            .status,
        200
    );
    assert_eq!(
        api.call(
            Method::HEAD,
            &format!("{CHANNELS}/streaming-0-nothere"),
            &token,
            None
        )
        .await
        .status,
        404
    );
    assert_eq!(
        api.call(Method::GET, &subs("streaming-0-nothere"), &token, None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn more_than_1000_topics_or_overlong_names_get_400() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, _) = api.channel(&token).await;

    let topics: Vec<String> = (0..1000)
        .map(|i| format!("v2.users.{i}.presence"))
        .collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    assert_eq!(api.subscribe(&token, &id, &refs).await.status, 200);

    let one_more = api
        .call(
            Method::POST,
            &subs(&id),
            &token,
            Some(json!([{"id": "v2.extra"}])),
        )
        .await;
    assert_eq!(one_more.status, 400);
    assert_eq!(one_more.body["code"], "bad.request");
    assert_eq!(one_more.body["status"], 400);
    let get = api.call(Method::GET, &subs(&id), &token, None).await;
    assert_eq!(
        get.body["entities"].as_array().unwrap().len(),
        1000,
        "a refused request changes nothing"
    );

    let long = "t".repeat(200);
    assert_eq!(api.subscribe(&token, &id, &[&long]).await.status, 400);
}

#[tokio::test]
async fn denied_topics_fail_the_whole_request_or_come_back_rejected_with_ignore_errors() {
    let mut config = fast_config();
    config.settings.deny_topics = vec!["v2.secret.*".into()];
    let (_fake, api) = start(config).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, _) = api.channel(&token).await;

    let refused = api.subscribe(&token, &id, &["v2.ok", "v2.secret.x"]).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.body["status"], 403);
    let get = api.call(Method::GET, &subs(&id), &token, None).await;
    assert_eq!(
        get.body["entities"],
        json!([]),
        "nothing subscribed after a 403"
    );

    let body = json!([{"id": "v2.ok"}, {"id": "v2.secret.x"}]);
    let lenient = api
        .call(
            Method::PUT,
            &format!("{}?ignoreErrors=true", subs(&id)),
            &token,
            Some(body),
        )
        .await;
    assert_eq!(lenient.status, 200);
    let entities = lenient.body["entities"].as_array().unwrap();
    assert_eq!(entities[0], json!({"id": "v2.ok", "state": "Permitted"}));
    assert_eq!(entities[1]["id"], "v2.secret.x");
    assert_eq!(entities[1]["state"], "Rejected");
    let get = api.call(Method::GET, &subs(&id), &token, None).await;
    assert_eq!(
        get.body["entities"],
        json!([{"id": "v2.ok", "state": "Permitted"}])
    );
}

// ---- tokens on the API -------------------------------------------------------------

#[tokio::test]
async fn missing_unknown_expired_and_revoked_tokens_get_401() {
    let mut config = fast_config();
    config
        .clients
        .push(ClientSpec::new("brief", "s", Duration::from_secs(1)));
    let (_fake, api) = start(config).await;

    let missing = api
        .send(api.http.post(format!("{}{CHANNELS}", api.base)))
        .await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.body["code"], "authentication.required");
    // Genesys' SDKs send "Bearer " with nothing after it when not logged in.
    let empty = api
        .send(
            api.http
                .post(format!("{}{CHANNELS}", api.base))
                .header("Authorization", "Bearer "),
        )
        .await;
    assert_eq!(empty.status, 401);

    let unknown = api.call(Method::POST, CHANNELS, "not-a-token", None).await;
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.body["code"], "bad.credentials");

    let brief = api.mint("brief", "s").await;
    assert_eq!(
        api.call(Method::POST, CHANNELS, &brief, None).await.status,
        200
    );
    wait_for("the 1 s token to expire", || {
        let api = api.clone();
        let brief = brief.clone();
        async move { (api.call(Method::POST, CHANNELS, &brief, None).await.status == 401).then_some(()) }
    })
    .await;

    let token = api.mint(CLIENT, SECRET).await;
    let revoked = api
        .control(Method::POST, "revoke", json!({ "token": token }))
        .await;
    assert_eq!(revoked.body["revoked"], 1);
    assert_eq!(
        api.call(Method::POST, CHANNELS, &token, None).await.status,
        401
    );

    // DELETE /api/v2/tokens/me retires the calling token.
    let token = api.mint(CLIENT, SECRET).await;
    assert_eq!(
        api.call(Method::DELETE, "/api/v2/tokens/me", &token, None)
            .await
            .status,
        204
    );
    assert_eq!(
        api.call(Method::POST, CHANNELS, &token, None).await.status,
        401
    );
}

#[tokio::test]
async fn a_channel_is_managed_only_with_the_token_that_created_it() {
    let mut config = fast_config();
    config.clients.push(ClientSpec::new(
        "client-b",
        "secret-b",
        Duration::from_secs(3600),
    ));
    let (_fake, api) = start(config).await;
    let creator = api.mint(CLIENT, SECRET).await;
    let sibling = api.mint(CLIENT, SECRET).await;
    let stranger = api.mint("client-b", "secret-b").await;
    let (id, _) = api.channel(&creator).await;

    assert_eq!(api.subscribe(&creator, &id, &["t.1"]).await.status, 200);
    let foreign = api.subscribe(&sibling, &id, &["t.2"]).await;
    assert_eq!(foreign.status, 403);
    assert_eq!(foreign.body["status"], 403);
    assert_eq!(
        api.call(Method::HEAD, &format!("{CHANNELS}/{id}"), &sibling, None)
            .await
            .status,
        403
    );

    api.patch_settings(json!({"strict_channel_owner": false}))
        .await;
    assert_eq!(
        api.subscribe(&sibling, &id, &["t.2"]).await.status,
        200,
        "lenient: same OAuth client"
    );
    assert_eq!(
        api.subscribe(&stranger, &id, &["t.3"]).await.status,
        403,
        "never another OAuth client"
    );
}

#[tokio::test]
async fn the_per_token_rate_limit_answers_429_with_retry_after() {
    let mut config = fast_config();
    config.settings.rate_limit_per_min = 5;
    let (_fake, api) = start(config).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, _) = api.channel(&token).await;
    for _ in 0..4 {
        assert_eq!(
            api.call(Method::GET, &subs(&id), &token, None).await.status,
            200
        );
    }
    let limited = api.call(Method::GET, &subs(&id), &token, None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["code"], "too.many.requests.retry.after");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");

    // The limit is per token: a fresh token is not limited.
    let fresh = api.mint(CLIENT, SECRET).await;
    assert_eq!(
        api.call(Method::GET, CHANNELS, &fresh, None).await.status,
        200
    );
}

// ---- the WebSocket ---------------------------------------------------------------

#[tokio::test]
async fn heartbeats_arrive_on_schedule_and_ping_gets_pong() {
    let mut config = fast_config();
    config.settings.heartbeat = Duration::from_millis(200);
    let (_fake, api) = start(config).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (_, uri) = api.channel(&token).await;
    let mut socket = connect(&uri).await;

    let started = Instant::now();
    for _ in 0..2 {
        match next_frame(&mut socket).await {
            Next::Text(frame) => assert_eq!(
                frame,
                json!({"topicName": "channel.metadata", "eventBody": {"message": "WebSocket Heartbeat"}})
            ),
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "two heartbeats 200 ms apart"
    );

    send_text(&mut socket, r#"{"message":"ping"}"#).await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(
            frame,
            json!({"topicName": "channel.metadata", "eventBody": {"message": "pong"}})
        ),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[tokio::test]
async fn a_second_socket_on_a_channel_disconnects_the_first() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&token).await;
    api.subscribe(&token, &id, &["t.1"]).await;
    let mut first = connect(&uri).await;
    let mut second = connect(&uri).await;
    let (code, _) = until_closed(&mut first).await;
    assert!(
        code.is_some(),
        "the first socket is closed with a close frame"
    );

    api.publish("t.1").await;
    match next_non_heartbeat(&mut second).await {
        Next::Text(frame) => assert_eq!(frame["topicName"], "t.1"),
        other => panic!("expected the event on the second socket, got {other:?}"),
    }
    assert_eq!(api.stats().await["sockets"], 1);
}

#[tokio::test]
async fn a_socket_to_an_unknown_channel_is_refused() {
    let (fake, _api) = start(fast_config()).await;
    let result = tokio_tungstenite::connect_async(format!(
        "ws://{}/channels/streaming-0-unknown",
        fake.addr()
    ))
    .await;
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected a 404, got {other:?}"),
    }
}

#[tokio::test]
async fn events_share_a_correlation_id_across_channels_and_are_not_buffered() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (a, uri_a) = api.channel(&token).await;
    let (b, uri_b) = api.channel(&token).await;
    api.subscribe(&token, &a, &["v2.users.1.presence"]).await;
    api.subscribe(&token, &b, &["v2.users.1?presence&routingStatus"])
        .await;

    // Published while nobody listens: lost for good, as at Genesys.
    let lost = api.publish("v2.users.1.presence").await;
    assert_eq!(lost["delivered"], 0);

    let mut socket_a = connect(&uri_a).await;
    let mut socket_b = connect(&uri_b).await;
    wait_for_sockets(&api, 2).await;
    let published = api.publish("v2.users.1.presence").await;
    assert_eq!(published["delivered"], 2);

    let mut frames = Vec::new();
    for socket in [&mut socket_a, &mut socket_b] {
        match next_non_heartbeat(socket).await {
            Next::Text(frame) => frames.push(frame),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    for frame in &frames {
        assert_eq!(frame["topicName"], "v2.users.1.presence");
        assert_eq!(frame["version"], "2");
        assert_eq!(
            frame["eventBody"]["seq"], published["seq"],
            "the event published first was never delivered"
        );
        assert!(frame["eventBody"]["sentAtUs"].as_u64().unwrap() > 0);
    }
    let correlation = frames[0]["metadata"]["CorrelationId"].as_str().unwrap();
    assert_eq!(correlation.len(), 36);
    assert_eq!(frames[1]["metadata"]["CorrelationId"], correlation);

    // Combined topics (`prefix?a&b`) match each suffix.
    assert_eq!(
        api.publish("v2.users.1.routingStatus").await["delivered"],
        1
    );
    let stats = api.stats().await;
    assert_eq!(
        stats["counters"]["events_dropped"], 2,
        "the first event missed both channels"
    );
}

#[tokio::test]
async fn a_socket_closes_when_its_token_expires_and_its_channel_is_gone() {
    let mut config = fast_config();
    config
        .clients
        .push(ClientSpec::new("brief", "s", Duration::from_secs(1)));
    let (_fake, api) = start(config).await;
    let token = api.mint("brief", "s").await;
    let (_, uri) = api.channel(&token).await;
    let mut socket = connect(&uri).await;
    let (code, frames) = until_closed(&mut socket).await;
    assert_eq!(code, Some(1000));
    assert!(frames.is_empty(), "no notice by default: {frames:?}");
    assert_eq!(
        api.stats().await["clients"]["brief"]["live_channels"],
        0,
        "the channel died with its token"
    );
}

#[tokio::test]
async fn the_result_404_notice_can_precede_a_channel_death() {
    let mut config = fast_config();
    config.settings.channel_ttl = Duration::from_secs(1);
    config.settings.death_notice = handover::mock::DeathNotice::Result404;
    let (_fake, api) = start(config).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (_, uri) = api.channel(&token).await;
    let mut socket = connect(&uri).await;
    let (code, frames) = until_closed(&mut socket).await;
    assert_eq!(code, Some(1000));
    assert_eq!(
        frames,
        vec![json!({"result": "404"})],
        "channel expiry announces itself"
    );
}

// ---- secret rotation ------------------------------------------------------------

#[tokio::test]
async fn keep_tokens_rotation_leaves_old_tokens_and_channels_alive() {
    let (_fake, api) = start(fast_config()).await;
    let old = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&old).await;
    api.subscribe(&old, &id, &["t.1"]).await;
    let mut socket = connect(&uri).await;

    let rotated = api
        .control(
            Method::POST,
            &format!("clients/{CLIENT}/rotate"),
            json!({"mode": "keep_tokens"}),
        )
        .await;
    assert_eq!(rotated.status, 200);
    let new_secret = rotated.body["secret"].as_str().unwrap().to_owned();

    assert_eq!(
        api.token_request(CLIENT, SECRET, "client_credentials")
            .await
            .status,
        400
    );
    api.mint(CLIENT, &new_secret).await;
    assert_eq!(
        api.subscribe(&old, &id, &["t.1", "t.2"]).await.status,
        200,
        "old token still valid"
    );
    api.publish("t.2").await;
    match next_non_heartbeat(&mut socket).await {
        Next::Text(frame) => assert_eq!(frame["topicName"], "t.2"),
        other => panic!("old channel should still stream, got {other:?}"),
    }
}

#[tokio::test]
async fn revoke_tokens_rotation_kills_old_tokens_channels_and_sockets_at_once() {
    let mut config = fast_config();
    config.clients.push(ClientSpec::new(
        "client-b",
        "secret-b",
        Duration::from_secs(3600),
    ));
    let (_fake, api) = start(config).await;
    let old = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&old).await;
    let mut socket = connect(&uri).await;
    let other = api.mint("client-b", "secret-b").await;
    let (_, other_uri) = api.channel(&other).await;
    let mut other_socket = connect(&other_uri).await;

    let rotated = api
        .control(
            Method::POST,
            &format!("clients/{CLIENT}/rotate"),
            json!({"mode": "revoke_tokens", "secret": "secret-a2"}),
        )
        .await;
    assert_eq!(rotated.body, json!({"secret": "secret-a2", "revoked": 1}));

    let (code, frames) = until_closed(&mut socket).await;
    assert!(code.is_some());
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(
        frames[0]["topicName"],
        format!("v2.system.token_revoked.{id}")
    );
    assert_eq!(frames[0]["eventBody"]["systemTopicType"], "token_revoked");
    assert_eq!(
        api.call(Method::GET, CHANNELS, &old, None).await.status,
        401
    );
    api.mint(CLIENT, "secret-a2").await;

    // The other OAuth client is untouched.
    send_text(&mut other_socket, r#"{"message":"ping"}"#).await;
    match next_non_heartbeat(&mut other_socket).await {
        Next::Text(frame) => assert_eq!(frame["eventBody"]["message"], "pong"),
        other => panic!("client-b's socket should live, got {other:?}"),
    }
}

#[tokio::test]
async fn socket_closing_warns_then_closes_the_socket_but_keeps_the_channel() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&token).await;
    let mut socket = connect(&uri).await;
    wait_for_sockets(&api, 1).await;

    let warned = api
        .control(
            Method::POST,
            "socket-closing",
            json!({"close_after": "300ms"}),
        )
        .await;
    assert_eq!(warned.body["channels"], json!([id]));
    let started = Instant::now();
    let (code, frames) = until_closed(&mut socket).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(code, Some(1001));
    assert_eq!(frames[0]["topicName"], "v2.system.socket_closing");
    assert_eq!(
        api.call(Method::HEAD, &format!("{CHANNELS}/{id}"), &token, None)
            .await
            .status,
        200
    );
    let _reconnected = connect(&uri).await;
}

// ---- publishing streams and statistics ----------------------------------------------

#[tokio::test]
async fn a_paced_stream_delivers_every_sequence_number_in_order() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&token).await;
    api.subscribe(&token, &id, &["s.a", "s.b"]).await;
    let mut socket = connect(&uri).await;
    wait_for_sockets(&api, 1).await;

    let started = api
        .control(
            Method::POST,
            "streams",
            json!({"topics": ["s.a", "s.b", "s.none"], "rate": 2000.0, "count": 300}),
        )
        .await;
    assert_eq!(started.status, 202);
    let stream = started.body["stream"].as_u64().unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 200 {
        match next_non_heartbeat(&mut socket).await {
            Next::Text(frame) => {
                assert_eq!(frame["eventBody"]["stream"], stream);
                seqs.push(frame["eventBody"]["seq"].as_u64().unwrap());
            }
            other => panic!("stream interrupted: {other:?}"),
        }
    }
    let expected: Vec<u64> = (0..300).filter(|i| i % 3 != 2).collect();
    assert_eq!(seqs, expected);
    let status = wait_for("the stream to finish", || {
        let api = api.clone();
        async move {
            let reply = api
                .send(
                    api.http
                        .get(format!("{}/__mock/streams/{stream}", api.base)),
                )
                .await;
            (reply.body["done"] == true).then_some(reply)
        }
    })
    .await;
    assert_eq!(status.body["sent"], 300);
    assert_eq!(status.body["delivered"], 200);
    assert_eq!(status.body["done"], true);
    let stats = api.stats().await;
    assert_eq!(stats["channels"][0]["delivered"], 200);
}

#[tokio::test]
async fn stats_count_tokens_channels_sockets_subscriptions_and_rejections() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&token).await;
    api.channel(&token).await;
    api.subscribe(&token, &id, &["x", "y"]).await;
    let _socket = connect(&uri).await;
    api.call(Method::POST, CHANNELS, "bogus", None).await;
    let stats = wait_for("socket registered", || {
        let api = api.clone();
        async move {
            let stats = api.stats().await;
            (stats["sockets"] == 1).then_some(stats)
        }
    })
    .await;
    let client = &stats["clients"][CLIENT];
    assert_eq!(client["tokens_issued"], 1);
    assert_eq!(client["live_tokens"], 1);
    assert_eq!(client["channels_created"], 2);
    assert_eq!(client["live_channels"], 2);
    assert_eq!(stats["subscriptions"], 2);
    assert_eq!(stats["counters"]["socket_connects"], 1);
    let rejected = &stats["rejected"][0];
    assert_eq!(rejected["status"], 401);
    assert_eq!(rejected["method"], "POST");
    assert_eq!(rejected["path"], CHANNELS);
}

// ---- bad input and service times --------------------------------------------------

#[tokio::test]
async fn bad_requests_get_clear_4xx_answers() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, _) = api.channel(&token).await;

    let malformed = api
        .send(
            api.http
                .put(format!("{}{}", api.base, subs(&id)))
                .bearer_auth(&token)
                .body("[{\"id\":"),
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.body["code"], "bad.request");

    let wrong_shape = api
        .call(Method::PUT, &subs(&id), &token, Some(json!({"id": "x"})))
        .await;
    assert_eq!(wrong_shape.status, 400);

    let wrong_method = api.call(Method::PATCH, &subs(&id), &token, None).await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.body["status"], 405);
    assert_eq!(api.get("/oauth/token").await.status, 405);

    let nowhere = api.call(Method::GET, "/api/v2/nothing", &token, None).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.body["code"], "not.found");

    let plain_get = api
        .send(api.http.get(format!("{}/channels/{id}", api.base)))
        .await;
    assert_eq!(plain_get.status, 426, "a plain GET on a socket URL");

    let typo = api
        .control(Method::PATCH, "settings", json!({"heartbeet": "1s"}))
        .await;
    assert_eq!(typo.status, 400);
    assert!(typo.body["message"].as_str().unwrap().contains("heartbeet"));
    let bad_control = api
        .control(Method::POST, "publish", json!({"topic": 5}))
        .await;
    assert_eq!(bad_control.status, 400);

    let huge = "x".repeat(2 * 1024 * 1024);
    let too_big = api
        .send(
            api.http
                .put(format!("{}{}", api.base, subs(&id)))
                .bearer_auth(&token)
                .body(huge),
        )
        .await;
    assert_eq!(too_big.status, 400);

    // The fake is still fine after all that.
    assert_eq!(api.subscribe(&token, &id, &["ok"]).await.status, 200);
}

#[tokio::test]
async fn realistic_service_times_delay_each_kind_of_call() {
    let config = MockConfig {
        clients: vec![ClientSpec::new(CLIENT, SECRET, Duration::from_secs(3600))],
        settings: Settings {
            service_times: ServiceTimes {
                jitter: 0.0,
                ..ServiceTimes::REALISTIC
            },
            ..Settings::default()
        },
        socket_base: None,
    };
    let (_fake, api) = start(config).await;
    let started = Instant::now();
    let token = api.mint(CLIENT, SECRET).await;
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "token endpoint: {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let (_, uri) = api.channel(&token).await;
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "API: {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let _socket = connect(&uri).await;
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "upgrade: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_stalled_socket_goes_silent_without_closing() {
    let mut config = fast_config();
    config.settings.heartbeat = Duration::from_millis(100);
    let (_fake, api) = start(config).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, uri) = api.channel(&token).await;
    api.subscribe(&token, &id, &["t.1"]).await;
    let mut socket = connect(&uri).await;
    assert!(
        matches!(next_frame(&mut socket).await, Next::Text(_)),
        "a heartbeat first"
    );
    let stalled = api.control(Method::POST, "stall", json!({})).await;
    assert_eq!(stalled.body["channels"], json!([id]));
    api.publish("t.1").await;
    send_text(&mut socket, r#"{"message":"ping"}"#).await;
    // Nothing at all for many heartbeat intervals, and no close either.
    let silence = tokio::time::timeout(
        Duration::from_millis(600),
        futures_util::StreamExt::next(&mut socket),
    )
    .await;
    assert!(silence.is_err(), "expected silence, got {silence:?}");
}

#[tokio::test]
async fn an_oauth_client_can_be_added_at_run_time() {
    let (_fake, api) = start(fast_config()).await;
    assert_eq!(
        api.token_request("late", "s3", "client_credentials")
            .await
            .status,
        400
    );
    let added = api
        .control(
            Method::POST,
            "clients",
            json!({"id": "late", "secret": "s3", "token_ttl": "90s"}),
        )
        .await;
    assert_eq!(added.status, 201);
    let reply = api.token_request("late", "s3", "client_credentials").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["expires_in"], 90);
}

#[tokio::test]
async fn an_idle_timeout_ends_tokens_that_make_no_call_and_tokens_me_tells_when() {
    let mut config = fast_config();
    config.clients.push(
        ClientSpec::new("idler", "s", Duration::from_secs(3600))
            .idling_after(Duration::from_secs(1)),
    );
    let (_fake, api) = start(config).await;
    let token = api.mint("idler", "s").await;
    let info = |preserve: bool| {
        let (api, token) = (api.clone(), token.clone());
        async move {
            let path = format!("/api/v2/tokens/me?preserveIdleTTL={preserve}");
            let reply = api.call(Method::GET, &path, &token, None).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            assert_eq!(reply.body["OAuthClient"]["id"], "idler");
            humantime::parse_rfc3339(reply.body["dateTokenIdles"].as_str().unwrap()).unwrap()
        }
    };
    let first = info(true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        info(true).await,
        first,
        "preserveIdleTTL leaves the idle clock alone"
    );
    let touched = info(false).await;
    assert!(touched > first, "a call is activity: the token idles later");

    let (_, uri) = api.channel(&token).await;
    let mut socket = connect(&uri).await;
    // A socket is not activity: without API calls the token idles, and its channel
    // and socket die with it.
    let (_, _) = until_closed(&mut socket).await;
    let reply = api
        .call(Method::GET, "/api/v2/tokens/me", &token, None)
        .await;
    assert_eq!(reply.status, 401);
    let stats = api.stats().await;
    assert_eq!(stats["counters"]["tokens_idled"], 1);

    // Tokens of clients without an idle timeout say nothing of it.
    let plain = api.mint(CLIENT, SECRET).await;
    let reply = api
        .call(Method::GET, "/api/v2/tokens/me", &plain, None)
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.get("dateTokenIdles").is_none(), "{}", reply.body);
}

#[tokio::test]
async fn subscription_changes_can_be_refused_wholesale_on_demand() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let (id, _) = api.channel(&token).await;
    assert_eq!(api.subscribe(&token, &id, &["v2.a"]).await.status, 200);
    let set = api
        .control(Method::POST, "faults/subscriptions", json!({"count": 1}))
        .await;
    assert_eq!(set.status, 204);
    let refused = api.subscribe(&token, &id, &["v2.a", "v2.b"]).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.body["code"], "bad.request");
    let listed = api
        .call(
            Method::GET,
            &format!("/api/v2/notifications/channels/{id}/subscriptions"),
            &token,
            None,
        )
        .await;
    assert_eq!(
        listed.body["entities"],
        json!([{"id": "v2.a", "state": "Permitted"}]),
        "kept as it was"
    );
    assert_eq!(
        api.subscribe(&token, &id, &["v2.a", "v2.b"]).await.status,
        200
    );
}
