//! Notification topic names as Genesys Cloud defines them, checked before anything
//! goes upstream.
//!
//! Every topic Genesys lists (`GET /api/v2/notifications/availabletopics`) is `v2.`
//! followed by dot-separated segments of letters, digits, `-` and `_` (ids are UUIDs
//! or short tokens): `v2.users.{id}.presence`, `v2.routing.queues.{id}.conversations`.
//! Several topics under one prefix may be combined as `prefix?suffix&suffix`, where a
//! suffix is itself one or more segments (`v2.users.{id}?presence&conversations.calls`);
//! Genesys' own streaming client builds such names. A combined topic counts as its
//! expansion against a channel's 1000 topics (the stricter reading: Genesys does not
//! say), so [`weight`] is what placement counts.
//!
//! `v2.system.*` topics are sent by Genesys unasked and never forwarded by the proxy,
//! so subscribing to them is refused too.

/// Topic names must be shorter than this (Genesys: "Max length of 200 in topic names").
pub const MAX_LEN: usize = 200;

/// Why a topic name is refused. Messages never echo the raw name, which may carry
/// markup or bidirectional-override characters meant for a log viewer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("a topic name must not be empty")]
    Empty,
    #[error("a topic name must be shorter than {MAX_LEN} characters")]
    TooLong,
    #[error("a topic name starts with \"v2.\"")]
    NotV2,
    #[error("v2.system topics are sent by Genesys Cloud unasked and cannot be subscribed")]
    System,
    #[error("character {character} at position {position} is not allowed in a topic name")]
    Character { character: String, position: usize },
    #[error("a topic name has an empty segment at position {0}")]
    EmptySegment(usize),
    #[error("a combined topic (prefix?a&b) has an empty part at position {0}")]
    EmptyCombined(usize),
}

/// Checks `name` against Genesys' topic grammar.
pub fn check(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.chars().count() >= MAX_LEN {
        return Err(TopicError::TooLong);
    }
    if let Some((position, character)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '?' | '&')))
    {
        return Err(TopicError::Character {
            character: format!("U+{:04X}", u32::from(character)),
            position,
        });
    }
    // ASCII from here on: byte positions are character positions.
    if !name.starts_with("v2.") {
        return Err(TopicError::NotV2);
    }
    if name.starts_with("v2.system.") || name == "v2.system" {
        return Err(TopicError::System);
    }
    let (prefix, combined) = match name.split_once('?') {
        Some((prefix, suffixes)) => (prefix, Some((prefix.len() + 1, suffixes))),
        None => (name, None),
    };
    segments(prefix, 0, '&')?;
    if let Some((mut at, suffixes)) = combined {
        for suffix in suffixes.split('&') {
            if suffix.is_empty() {
                return Err(TopicError::EmptyCombined(at));
            }
            segments(suffix, at, '?')?;
            at += suffix.len() + 1;
        }
    }
    Ok(())
}

/// Checks that `part` (starting at `offset` in the name) is non-empty dot-separated
/// segments, without `forbidden` (a second `?`, or a `&` before the `?`).
fn segments(part: &str, offset: usize, forbidden: char) -> Result<(), TopicError> {
    if let Some(at) = part.find([forbidden, '?']) {
        return Err(TopicError::Character {
            character: format!("U+{:04X}", u32::from(part.as_bytes()[at])),
            position: offset + at,
        });
    }
    let mut at = offset;
    for segment in part.split('.') {
        if segment.is_empty() {
            return Err(TopicError::EmptySegment(at));
        }
        at += segment.len() + 1;
    }
    Ok(())
}

/// How many topics `name` counts for against a channel's limit: a combined topic
/// counts each of its parts.
pub fn weight(name: &str) -> usize {
    match name.split_once('?') {
        Some((_, suffixes)) => suffixes.split('&').filter(|s| !s.is_empty()).count().max(1),
        None => 1,
    }
}

/// The topics whose events a subscription receives: itself, or for a combined topic
/// (`prefix?a&b`) each of `prefix.a`, `prefix.b` (Genesys sends events under those).
pub fn expansion(name: &str) -> Vec<String> {
    match name.split_once('?') {
        Some((prefix, suffixes)) => suffixes
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|suffix| format!("{prefix}.{suffix}"))
            .collect(),
        None => vec![name.to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesys_topics_pass() {
        for name in [
            "v2.users.6f2c5d1e-8a3b-4c7d-9e0f-1a2b3c4d5e6f.presence",
            "v2.routing.queues.abc_1.conversations",
            "v2.users.1?presence&routingStatus&conversations.calls",
            "v2.a",
        ] {
            assert_eq!(check(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn odd_names_are_refused_without_echoing_them() {
        assert_eq!(check(""), Err(TopicError::Empty));
        assert!(matches!(
            check("../../../admin"),
            Err(TopicError::Character { position: 2, .. })
        ));
        assert!(matches!(
            check("v2.<script>alert(1)</script>"),
            Err(TopicError::Character { position: 3, .. })
        ));
        let rtl = "v2.users.\u{202e}1.presence";
        let error = check(rtl).unwrap_err();
        assert_eq!(
            error,
            TopicError::Character {
                character: "U+202E".into(),
                position: 9
            }
        );
        assert!(!error.to_string().contains('\u{202e}'));
        assert_eq!(check("users.1.presence"), Err(TopicError::NotV2));
        assert_eq!(check("v2..presence"), Err(TopicError::EmptySegment(3)));
        assert_eq!(check("v2.users."), Err(TopicError::EmptySegment(9)));
        assert_eq!(check("v2.users.1?"), Err(TopicError::EmptyCombined(11)));
        assert_eq!(check("v2.users.1?a&&b"), Err(TopicError::EmptyCombined(13)));
        assert!(matches!(
            check("v2.users.1?a?b"),
            Err(TopicError::Character { .. })
        ));
        assert!(matches!(
            check("v2.users&1"),
            Err(TopicError::Character { .. })
        ));
        assert_eq!(check("v2.system.socket_closing"), Err(TopicError::System));
        assert_eq!(
            check(&format!("v2.{}", "a".repeat(197))),
            Err(TopicError::TooLong)
        );
        assert_eq!(check(&format!("v2.{}", "a".repeat(196))), Ok(()));
    }

    #[test]
    fn combined_topics_weigh_their_expansion() {
        assert_eq!(weight("v2.users.1.presence"), 1);
        assert_eq!(weight("v2.users.1?presence&routingStatus&station"), 3);
        assert_eq!(
            expansion("v2.users.1?presence&conversations.calls"),
            ["v2.users.1.presence", "v2.users.1.conversations.calls"]
        );
        assert_eq!(expansion("v2.users.1.presence"), ["v2.users.1.presence"]);
    }
}
