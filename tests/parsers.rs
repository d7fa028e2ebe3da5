//! Every parser of outside input, fed arbitrary bytes and structured mutations:
//! client WebSocket messages, REST bodies and query strings, topic names, upstream
//! frames, token answers, channel listings and the config file. None may panic, and each classifies
//! or round-trips what it should. (No nightly toolchain here, so no cargo-fuzz:
//! proptest, 256 cases a property by default; `PROPTEST_CASES` raises it.)

use std::time::Duration;

use bytes::Bytes;
use handover::config::Config;
use handover::downstream::parse_topics;
use handover::downstream::socket::{InBand, in_band};
use handover::frame::{UpstreamFrame, classify};
use handover::genesys::{UpstreamError, channel_count, token_answer};
use handover::http_server::query_param;
use handover::topic;
use http::StatusCode;
use proptest::prelude::*;
use serde_json::json;

/// Strings that look like what a peer sends: JSON-ish punctuation, escapes and
/// non-ASCII, often enough to reach past the first branch of a parser.
fn jsonish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\[\\]{}\":,.?&a-z0-9\\\\ \u{202e}é-]{0,80}",
        any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// A segment of a topic name.
fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,12}"
}

/// A well-formed topic: `v2.` and segments, sometimes combined.
fn topic_name() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(segment(), 1..4),
        prop::option::of(prop::collection::vec(
            prop::collection::vec(segment(), 1..3).prop_map(|s| s.join(".")),
            1..4,
        )),
    )
        .prop_filter_map("not a system topic", |(segments, combined)| {
            let mut name = format!("v2.{}", segments.join("."));
            if let Some(parts) = combined {
                name.push('?');
                name.push_str(&parts.join("&"));
            }
            (!name.starts_with("v2.system") && name.len() < topic::MAX_LEN).then_some(name)
        })
}

proptest! {
    #[test]
    fn client_messages_never_panic(text in jsonish()) {
        let _ = in_band(&text);
    }

    #[test]
    fn subscribe_messages_keep_their_topics_and_id(
        topics in prop::collection::vec(jsonish(), 0..5),
        id in jsonish(),
    ) {
        let text = json!({"message": "subscribe", "topics": topics, "correlationId": id}).to_string();
        prop_assert_eq!(
            in_band(&text),
            InBand::Subscribe { topics: Some(topics), correlation_id: json!(id) }
        );
    }

    #[test]
    fn rest_bodies_never_panic_and_round_trip(
        body in any::<Vec<u8>>(),
        topics in prop::collection::vec(jsonish(), 0..5),
    ) {
        let _ = parse_topics(&Bytes::from(body));
        let encoded: Vec<_> = topics.iter().map(|t| json!({"id": t})).collect();
        let parsed = parse_topics(&Bytes::from(serde_json::to_vec(&encoded).unwrap()));
        prop_assert_eq!(parsed.unwrap(), topics);
    }

    #[test]
    fn query_strings_never_panic_and_round_trip(raw in "[ -~]{0,60}", value in jsonish()) {
        if let Ok(uri) = format!("/stream?{raw}").parse::<http::Uri>() {
            let _ = query_param(&uri, "topics");
        }
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("other", "x")
            .append_pair("topics", &value)
            .finish();
        let uri: http::Uri = format!("/stream?{encoded}").parse().unwrap();
        prop_assert_eq!(query_param(&uri, "topics"), Some(value));
    }

    #[test]
    fn topic_names_never_panic(name in jsonish()) {
        if topic::check(&name).is_ok() {
            prop_assert!(name.starts_with("v2.") && name.is_ascii());
            prop_assert_eq!(topic::weight(&name), topic::expansion(&name).len());
        }
    }

    #[test]
    fn well_formed_topics_pass_and_any_foreign_character_fails(
        name in topic_name(),
        at in any::<prop::sample::Index>(),
        foreign in "[^A-Za-z0-9_.?&-]",
    ) {
        prop_assert_eq!(topic::check(&name), Ok(()));
        prop_assert!(topic::expansion(&name).iter().all(|t| topic::check(t).is_ok()));
        let mut broken = name.clone();
        broken.insert_str(at.index(name.len()), &foreign);
        prop_assert!(topic::check(&broken).is_err());
    }

    #[test]
    fn upstream_frames_never_panic(text in jsonish()) {
        let _ = classify(&text);
    }

    #[test]
    fn events_yield_their_topic_and_correlation_id(topic in jsonish(), id in jsonish(), body in jsonish()) {
        prop_assume!(topic != "channel.metadata" && !topic.starts_with("v2.system."));
        let frame = json!({"topicName": topic, "version": "2", "eventBody": {"x": body}, "metadata": {"CorrelationId": id}}).to_string();
        prop_assert_eq!(
            classify(&frame),
            UpstreamFrame::Event { topic: topic.as_str().into(), correlation_id: Some(id.as_str().into()) }
        );
    }

    #[test]
    fn token_answers_never_panic(status in 100u16..600, body in any::<Vec<u8>>(), retry in prop::option::of(0u64..1_000_000)) {
        let status = StatusCode::from_u16(status).unwrap();
        let _ = token_answer(status, retry.map(Duration::from_secs), &body);
    }

    #[test]
    fn token_lifetimes_are_usable_or_refused(token in "[A-Za-z0-9]{0,20}", expires_in in prop_oneof![
        any::<f64>().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
        any::<u64>().prop_map(|v| json!(v)),
        jsonish().prop_map(|v| json!(v)),
    ]) {
        let body = json!({"access_token": token, "token_type": "bearer", "expires_in": expires_in}).to_string();
        let seconds = expires_in.as_f64().filter(|s| s.is_finite());
        match token_answer(StatusCode::OK, None, body.as_bytes()) {
            Ok(minted) => {
                prop_assert!(!token.is_empty());
                prop_assert!(seconds.unwrap() >= 1.0);
                prop_assert!(minted.lifetime <= handover::bounds::MAX_TOKEN_LIFETIME);
                prop_assert!(minted.lifetime >= Duration::from_secs(1));
            }
            Err(UpstreamError::Protocol(_)) => {
                prop_assert!(token.is_empty() || seconds.is_none_or(|s| s < 1.0));
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn channel_listings_never_panic(body in prop_oneof![any::<Vec<u8>>(), jsonish().prop_map(String::into_bytes)]) {
        let _ = channel_count(&body);
    }

    /// Every entry counts, whatever it shows of the channel (its id left out, `null`,
    /// the same placeholder on each, or anything else).
    #[test]
    fn every_listed_entry_counts(entries in prop::collection::vec(prop_oneof![
        Just(json!({"expires": "2026-01-01T00:00:00.000Z"})),
        Just(json!({"id": null, "connectUri": null})),
        Just(json!({"id": "********"})),
        jsonish().prop_map(|id| json!({"id": id, "connectUri": "wss://streaming.example/channels/x"})),
        Just(json!({})),
        Just(json!(null)),
    ], 0..30)) {
        let body = json!({"entities": entries}).to_string();
        prop_assert_eq!(channel_count(body.as_bytes()).ok(), Some(entries.len()));
    }

    #[test]
    fn config_text_never_panics(text in jsonish()) {
        let _ = Config::from_toml(&text, "fuzz.toml");
    }

    /// The example config with lines dropped, doubled or given other values: an
    /// error names the file, and never shows an inline secret.
    #[test]
    fn mutated_configs_never_panic_nor_leak_the_secret(
        mutations in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, jsonish()), 1..6),
    ) {
        let example = include_str!("../config/handover.toml")
            .replace("client_secret_file = \"/run/secrets/genesys/primary\"", "client_secret = \"hunter2-secret\"");
        let mut lines: Vec<String> = example.lines().map(str::to_owned).collect();
        for (at, kind, text) in mutations {
            let i = at.index(lines.len());
            match kind {
                0 => { lines.remove(i); }
                1 => { let line = lines[i].clone(); lines.insert(i, line); }
                _ => {
                    if let Some((key, _)) = lines[i].split_once('=') {
                        lines[i] = format!("{key}= {}", toml_value(&text));
                    }
                }
            }
            if lines.is_empty() { break; }
        }
        if let Err(error) = Config::from_toml(&lines.join("\n"), "fuzz.toml") {
            let message = error.to_string();
            prop_assert!(message.starts_with("fuzz.toml"), "{}", message);
            prop_assert!(!message.contains("hunter2"), "{}", message);
        }
    }
}

/// `text` as some TOML value: a string, a number, or itself raw.
fn toml_value(text: &str) -> String {
    match text.len() % 3 {
        0 => format!("{text:?}"),
        1 => text.len().to_string(),
        _ => text.to_owned(),
    }
}

/// Genesys' OAuth `error_description` (or `description`) is repeated in logs and
/// errors only when it is one of the texts Genesys is known to send: an endpoint (or
/// something in front of it) may echo what it was sent, a secret included.
#[test]
fn an_oauth_error_description_is_repeated_only_when_known() {
    for field in ["error_description", "description"] {
        let echoed =
            format!(r#"{{"error":"invalid_client","{field}":"bad secret hunter2-secret"}}"#);
        let error = token_answer(StatusCode::BAD_REQUEST, None, echoed.as_bytes())
            .err()
            .expect("refused")
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("description withheld"), "{error}");
    }
    let known = br#"{"error":"invalid_client","error_description":"authentication failed"}"#;
    let error = token_answer(StatusCode::BAD_REQUEST, None, known)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("invalid_client: authentication failed"),
        "{error}"
    );
    let odd = br#"{"error":"secret=hunter2","error_description":"x"}"#;
    let error = token_answer(StatusCode::BAD_REQUEST, None, odd)
        .err()
        .expect("refused")
        .to_string();
    assert!(!error.contains("hunter2"), "{error}");
}
