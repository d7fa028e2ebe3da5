//! The fake's channel listing across an OAuth client
//! (`GET /api/v2/notifications/channels?includechannels=oauthclient`), each shape it
//! can give other tokens' channels, and its per-client peak and eviction counts.

mod common;

use std::time::Duration;

use common::*;
use handover::mock::ClientSpec;
use reqwest::Method;
use serde_json::{Value, json};

const CHANNELS: &str = "/api/v2/notifications/channels";
const ACROSS: &str = "/api/v2/notifications/channels?includechannels=oauthclient";

/// The fake with a second OAuth client, `client-b`.
async fn two_clients() -> (handover::mock::MockGenesys, Api) {
    let mut config = fast_config();
    config.clients.push(ClientSpec::new(
        "client-b",
        "secret-b",
        Duration::from_secs(3600),
    ));
    start(config).await
}

fn entities(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body["entities"].as_array().expect("entities").clone()
}

#[tokio::test]
async fn the_listing_across_the_client_shows_other_tokens_channels_without_their_ids() {
    let (_fake, api) = two_clients().await;
    let mine = api.mint(CLIENT, SECRET).await;
    let other = api.mint(CLIENT, SECRET).await;
    let observer = api.mint(CLIENT, SECRET).await;
    let elsewhere = api.mint("client-b", "secret-b").await;
    let (first, _) = api.channel(&mine).await;
    let (hidden, hidden_uri) = api.channel(&other).await;
    let (second, _) = api.channel(&mine).await;
    api.channel(&elsewhere).await;

    // The default, and `token`: the token's own channels only.
    let own = entities(&api.call(Method::GET, CHANNELS, &mine, None).await);
    let ids: Vec<&Value> = own.iter().map(|c| &c["id"]).collect();
    assert_eq!(ids, [&json!(first), &json!(second)]);
    let explicit = api
        .call(
            Method::GET,
            &format!("{CHANNELS}?includechannels=token"),
            &mine,
            None,
        )
        .await;
    assert_eq!(entities(&explicit), own);

    // Across the OAuth client: every channel of it, in creation order; the other
    // token's without id or connectUri, but with its expiry.
    let across = entities(&api.call(Method::GET, ACROSS, &mine, None).await);
    assert_eq!(across.len(), 3, "{across:?}");
    assert_eq!(across[0]["id"], first);
    assert!(across[0]["connectUri"].as_str().unwrap().ends_with(&first));
    assert_eq!(
        across[1].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["expires"]
    );
    assert_eq!(across[2]["id"], second);
    let text = across.iter().map(Value::to_string).collect::<String>();
    assert!(!text.contains(&hidden) && !text.contains(&hidden_uri));

    // A token with no channel of its own sees that the three exist, and no id.
    let seen = entities(&api.call(Method::GET, ACROSS, &observer, None).await);
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|c| c.get("id").is_none()), "{seen:?}");
    assert!(
        seen.iter()
            .all(|c| c["expires"].as_str().unwrap().ends_with('Z'))
    );
}

#[tokio::test]
async fn other_tokens_channels_can_be_shown_with_null_or_redacted_ids() {
    let (_fake, api) = start(fast_config()).await;
    let observer = api.mint(CLIENT, SECRET).await;
    for _ in 0..2 {
        let token = api.mint(CLIENT, SECRET).await;
        api.channel(&token).await;
    }
    api.patch_settings(json!({"other_channels": "null"})).await;
    let nulls = entities(&api.call(Method::GET, ACROSS, &observer, None).await);
    assert_eq!(nulls.len(), 2);
    for entry in &nulls {
        assert_eq!(entry["id"], Value::Null);
        assert_eq!(entry["connectUri"], Value::Null);
        assert!(entry.as_object().unwrap().contains_key("id"));
    }
    api.patch_settings(json!({"other_channels": "redacted"}))
        .await;
    let redacted = entities(&api.call(Method::GET, ACROSS, &observer, None).await);
    assert_eq!(
        redacted.len(),
        2,
        "one entry per channel, the same placeholder id"
    );
    assert!(redacted.iter().all(|c| c["id"] == "********"));
    api.patch_settings(json!({"other_channels": "omitted"}))
        .await;
    let omitted = entities(&api.call(Method::GET, ACROSS, &observer, None).await);
    assert!(omitted.iter().all(|c| c.get("id").is_none()));

    let refused = api
        .control(
            Method::PATCH,
            "settings",
            json!({"other_channels": "shown"}),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
}

#[tokio::test]
async fn the_listing_refuses_an_unknown_scope_and_a_missing_token() {
    let (_fake, api) = start(fast_config()).await;
    let token = api.mint(CLIENT, SECRET).await;
    let unknown = api
        .call(
            Method::GET,
            &format!("{CHANNELS}?includechannels=everyone"),
            &token,
            None,
        )
        .await;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert_eq!(api.get(ACROSS).await.status, 401);
}

#[tokio::test]
async fn stats_count_each_clients_peak_and_evictions() {
    let (_fake, api) = two_clients().await;
    let a1 = api.mint(CLIENT, SECRET).await;
    let a2 = api.mint(CLIENT, SECRET).await;
    let b = api.mint("client-b", "secret-b").await;
    for n in 0..21 {
        api.channel(if n % 2 == 0 { &a1 } else { &a2 }).await;
    }
    api.channel(&b).await;
    let stats = api.stats().await;
    let a = &stats["clients"][CLIENT];
    assert_eq!(a["live_channels"], 20);
    assert_eq!(a["peak_channels"], 20, "the peak never passes the limit");
    assert_eq!(a["evictions"], 1, "the 21st evicted one of this client's");
    assert_eq!(stats["clients"]["client-b"]["evictions"], 0);
    assert_eq!(stats["clients"]["client-b"]["peak_channels"], 1);
    assert_eq!(stats["counters"]["evictions"], 1);
    let listed = entities(&api.call(Method::GET, ACROSS, &b, None).await);
    assert_eq!(listed.len(), 1, "another client's channels are not listed");
}
