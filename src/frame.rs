//! Reading just enough of a notification frame to route it: its `topicName`, its
//! `metadata.CorrelationId`, and for `channel.metadata` frames the `message`.
//! Nothing else is decoded and the frame is forwarded as the bytes it arrived as.

use std::borrow::Cow;

use serde::Deserialize;

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "topicName", borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    metadata: Option<Metadata<'a>>,
    #[serde(rename = "eventBody", borrow)]
    event_body: Option<Body<'a>>,
    #[serde(borrow)]
    result: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(rename = "CorrelationId", borrow)]
    correlation_id: Option<Cow<'a, str>>,
}

/// Only `message` is read; other fields of the body are skipped without allocating.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

/// What an upstream frame is, as far as the proxy cares.
#[derive(Debug, PartialEq, Eq)]
pub enum UpstreamFrame<'a> {
    /// An event for clients subscribed to `topic`.
    Event {
        topic: Cow<'a, str>,
        correlation_id: Option<Cow<'a, str>>,
    },
    Heartbeat,
    Pong,
    /// `v2.system.socket_closing`: the server will close this socket soon.
    SocketClosing,
    /// `v2.system.token_revoked.*`, `v2.system.no_longer_subscribed.*`, or a
    /// `{"result":"404"}`: the channel is dead or about to be.
    ChannelLost,
    /// Any other `v2.system.*` or `channel.metadata` frame, or a `{"result"}` answer:
    /// never forwarded (system frames name upstream channel ids).
    Internal,
    /// Not JSON, or JSON without a topic.
    Unreadable,
}

pub fn classify(text: &str) -> UpstreamFrame<'_> {
    let Ok(head) = serde_json::from_str::<Head>(text) else {
        return UpstreamFrame::Unreadable;
    };
    let Some(topic) = head.topic else {
        return match head.result.as_deref() {
            Some("404") => UpstreamFrame::ChannelLost,
            Some(_) => UpstreamFrame::Internal,
            None => UpstreamFrame::Unreadable,
        };
    };
    if topic == "channel.metadata" {
        return match head.event_body.and_then(|b| b.message).as_deref() {
            Some("WebSocket Heartbeat") => UpstreamFrame::Heartbeat,
            Some("pong") => UpstreamFrame::Pong,
            _ => UpstreamFrame::Internal,
        };
    }
    if let Some(system) = topic.strip_prefix("v2.system.") {
        return if system == "socket_closing" {
            UpstreamFrame::SocketClosing
        } else if system.starts_with("token_revoked") || system.starts_with("no_longer_subscribed")
        {
            UpstreamFrame::ChannelLost
        } else {
            UpstreamFrame::Internal
        };
    }
    UpstreamFrame::Event {
        topic,
        correlation_id: head.metadata.and_then(|m| m.correlation_id),
    }
}

/// Frames the proxy writes itself, byte for byte what clients expect.
pub const HEARTBEAT: &str =
    r#"{"topicName":"channel.metadata","eventBody":{"message":"WebSocket Heartbeat"}}"#;
pub const PONG: &str = r#"{"topicName":"channel.metadata","eventBody":{"message":"pong"}}"#;
pub const PING: &str = r#"{"message":"ping"}"#;

/// Whether a client's text frame is the Genesys health check `{"message":"ping"}`.
pub fn is_ping(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Health<'a> {
        #[serde(borrow)]
        message: Option<Cow<'a, str>>,
    }
    serde_json::from_str::<Health>(text).is_ok_and(|h| h.message.as_deref() == Some("ping"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_yield_topic_and_correlation_id() {
        let frame = r#"{"topicName":"v2.users.1.presence","version":"2","eventBody":{"message":"x","n":[1,2]},"metadata":{"CorrelationId":"abc"}}"#;
        assert_eq!(
            classify(frame),
            UpstreamFrame::Event {
                topic: "v2.users.1.presence".into(),
                correlation_id: Some("abc".into())
            }
        );
        let escaped = r#"{"metadata":{},"topicName":"v2.a\u002eb"}"#;
        assert_eq!(
            classify(escaped),
            UpstreamFrame::Event {
                topic: "v2.a.b".into(),
                correlation_id: None
            }
        );
    }

    #[test]
    fn system_and_metadata_frames_are_recognised() {
        assert_eq!(classify(HEARTBEAT), UpstreamFrame::Heartbeat);
        assert_eq!(classify(PONG), UpstreamFrame::Pong);
        assert_eq!(
            classify(r#"{"topicName":"v2.system.socket_closing","eventBody":{"channelId":"c"}}"#),
            UpstreamFrame::SocketClosing
        );
        assert_eq!(
            classify(
                r#"{"topicName":"v2.system.token_revoked.c","eventBody":{"message":"token_revoked"}}"#
            ),
            UpstreamFrame::ChannelLost
        );
        assert_eq!(
            classify(r#"{"topicName":"v2.system.no_longer_subscribed.c"}"#),
            UpstreamFrame::ChannelLost
        );
        assert_eq!(classify(r#"{"result":"404"}"#), UpstreamFrame::ChannelLost);
        assert_eq!(
            classify(r#"{"result":"200","status":"subscribed"}"#),
            UpstreamFrame::Internal
        );
        assert_eq!(
            classify(r#"{"topicName":"v2.system.other"}"#),
            UpstreamFrame::Internal
        );
        assert_eq!(
            classify(r#"{"topicName":"channel.metadata","eventBody":{"message":"other"}}"#),
            UpstreamFrame::Internal
        );
        assert_eq!(classify("not json"), UpstreamFrame::Unreadable);
        assert_eq!(classify(r#"{"eventBody":{}}"#), UpstreamFrame::Unreadable);
    }

    #[test]
    fn only_the_exact_health_check_is_a_ping() {
        assert!(is_ping(PING));
        assert!(is_ping(r#"{ "message" : "ping", "extra": 1 }"#));
        assert!(!is_ping(r#"{"message":"subscribe"}"#));
        assert!(!is_ping("ping"));
    }
}
