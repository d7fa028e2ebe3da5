//! The topic policy: `[topics] allow` and `deny` patterns.
//!
//! A pattern is a topic name whose segments may be `*` (exactly one segment, such as
//! a user or queue id) or end in `**` (one or more segments): `v2.users.*.presence`,
//! `v2.routing.queues.*.conversations`, `v2.analytics.**`. A topic is admitted when
//! an `allow` pattern matches it (or no `allow` list is configured) and no `deny`
//! pattern does; deny wins. A combined topic (`v2.users.42?presence&routingStatus`) is
//! admitted only if each topic it expands to is.
//!
//! Genesys lists its topics as templates (`v2.users.{id}.presence`):
//! [`Policy::lists`] says whether a template can name an admitted topic, for the
//! filtered `availabletopics` answer.

use crate::topic;

/// One `allow` or `deny` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**` (last only): one or more segments.
    Rest,
}

impl Pattern {
    /// Parses a pattern; the error says what is wrong, without echoing the text.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let text = text.trim();
        if !text.starts_with("v2.") {
            return Err("a pattern starts with \"v2.\", as every topic does".into());
        }
        let parts: Vec<&str> = text.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return Err(format!("segment {} is empty", index + 1)),
                "*" => Segment::One,
                "**" if index + 1 == parts.len() => Segment::Rest,
                "**" => return Err("\"**\" may only be the last segment".into()),
                literal => {
                    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_');
                    if !literal.chars().all(valid) {
                        return Err(format!(
                            "segment {} may hold only letters, digits, '-' and '_', or be \"*\" / \"**\" whole",
                            index + 1
                        ));
                    }
                    Segment::Literal(literal.to_owned())
                }
            };
            segments.push(segment);
        }
        if text.chars().count() >= topic::MAX_LEN {
            return Err(format!(
                "a pattern must be shorter than {} characters",
                topic::MAX_LEN
            ));
        }
        Ok(Pattern {
            text: text.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the plain (not combined) topic `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        self.matches_segments(&name.split('.').collect::<Vec<_>>(), Reach::Literal)
    }

    fn matches_segments(&self, names: &[&str], reach: Reach) -> bool {
        let mut names = names.iter();
        for segment in &self.segments {
            if *segment == Segment::Rest {
                // One or more remaining segments, whatever they are.
                return names.next().is_some();
            }
            let Some(name) = names.next() else {
                return false;
            };
            let placeholder = name.starts_with('{') && name.ends_with('}');
            let matched = match (segment, placeholder) {
                (Segment::One, _) => true,
                (Segment::Literal(literal), false) => literal == name,
                // `{id}` stands for every id: a literal covers some of them, not all.
                (Segment::Literal(_), true) => reach == Reach::Some,
                (Segment::Rest, _) => unreachable!("handled above"),
            };
            if !matched {
                return false;
            }
        }
        names.next().is_none()
    }
}

/// Matching a template: may the pattern match some topic it stands for, or all?
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// A plain topic name: placeholders are never matched as such.
    Literal,
    Some,
    All,
}

/// `[topics]`: what desktops may subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None`: every topic (the OAuth client's own permissions are the only limit).
    pub allow: Option<Vec<Pattern>>,
    pub deny: Vec<Pattern>,
}

impl Policy {
    /// Whether `topic` (checked against Genesys' grammar beforehand; combined or not)
    /// may be subscribed.
    pub fn admits(&self, name: &str) -> bool {
        topic::expansion(name).iter().all(|part| {
            let allowed = self
                .allow
                .as_ref()
                .is_none_or(|allow| allow.iter().any(|p| p.matches(part)));
            allowed && !self.deny.iter().any(|p| p.matches(part))
        })
    }

    /// Whether the Genesys topic template `template` (`v2.users.{id}.presence`) names
    /// any topic this policy admits: some `allow` pattern can match one of its topics,
    /// and no `deny` pattern matches all of them.
    pub fn lists(&self, template: &str) -> bool {
        let segments: Vec<&str> = template.split('.').collect();
        let allowed = self.allow.as_ref().is_none_or(|allow| {
            allow
                .iter()
                .any(|p| p.matches_segments(&segments, Reach::Some))
        });
        allowed
            && !self
                .deny
                .iter()
                .any(|p| p.matches_segments(&segments, Reach::All))
    }

    /// Whether an `allow` list is configured.
    pub fn restricts(&self) -> bool {
        self.allow.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: Option<&[&str]>, deny: &[&str]) -> Policy {
        let parse = |list: &[&str]| {
            list.iter()
                .map(|p| Pattern::parse(p).unwrap())
                .collect::<Vec<_>>()
        };
        Policy {
            allow: allow.map(parse),
            deny: parse(deny),
        }
    }

    #[test]
    fn patterns_parse_or_say_why_not() {
        for good in [
            "v2.users.*.presence",
            "v2.routing.queues.*.conversations",
            "v2.analytics.**",
            "v2.users.42.presence",
        ] {
            assert_eq!(Pattern::parse(good).unwrap().as_str(), good);
        }
        for (bad, why) in [
            ("users.*.presence", "starts with"),
            ("v2..presence", "segment 2 is empty"),
            ("v2.**.presence", "last segment"),
            ("v2.users.4*2.presence", "segment 3"),
            ("v2.users.?.presence", "segment 3"),
        ] {
            let error = Pattern::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn allow_admits_only_what_it_names() {
        let p = policy(
            Some(&["v2.users.*.presence", "v2.routing.queues.*.conversations"]),
            &[],
        );
        assert!(p.admits("v2.users.42.presence"));
        assert!(p.admits("v2.routing.queues.q-1.conversations"));
        assert!(!p.admits("v2.users.42.conversations"));
        assert!(!p.admits("v2.users.42.presence.extra"));
        assert!(!p.admits("v2.users.presence"));
        assert!(!p.admits("v2.routing.queues.q-1.conversations.calls"));
    }

    #[test]
    fn deny_wins_and_no_allow_list_admits_everything_else() {
        let p = policy(None, &["v2.users.*.conversations", "v2.analytics.**"]);
        assert!(p.admits("v2.users.42.presence"));
        assert!(!p.admits("v2.users.42.conversations"));
        assert!(!p.admits("v2.analytics.queues.q.observations"));
        assert!(!p.admits("v2.analytics.x"));
        assert!(p.admits("v2.analyticsx.y"));
        let p = policy(Some(&["v2.users.*.*"]), &["v2.users.7.conversations"]);
        assert!(p.admits("v2.users.42.conversations"));
        assert!(!p.admits("v2.users.7.conversations"));
    }

    #[test]
    fn a_combined_topic_needs_every_part_admitted() {
        let p = policy(
            Some(&["v2.users.*.presence", "v2.users.*.routingStatus"]),
            &[],
        );
        assert!(p.admits("v2.users.42?presence&routingStatus"));
        assert!(!p.admits("v2.users.42?presence&conversations"));
    }

    #[test]
    fn templates_are_listed_when_some_admitted_topic_fits() {
        let p = policy(Some(&["v2.users.*.presence", "v2.users.7.station"]), &[]);
        assert!(p.lists("v2.users.{id}.presence"));
        assert!(
            p.lists("v2.users.{id}.station"),
            "user 7's station is admitted"
        );
        assert!(!p.lists("v2.users.{id}.conversations"));
        assert!(!p.lists("v2.routing.queues.{id}.conversations"));
        let p = policy(None, &["v2.users.7.presence", "v2.analytics.**"]);
        assert!(
            p.lists("v2.users.{id}.presence"),
            "only one user's presence is denied"
        );
        assert!(!p.lists("v2.analytics.queues.{id}.observations"));
        let p = policy(None, &["v2.users.*.presence"]);
        assert!(!p.lists("v2.users.{id}.presence"));
    }
}
