//! What the fake Genesys Cloud is configured with, at start and at run time
//! (`PATCH /__mock/settings`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One OAuth client registered at the fake.
#[derive(Clone, Deserialize)]
pub struct ClientSpec {
    pub id: String,
    pub secret: String,
    /// Lifetime of the tokens this client mints (`expires_in`). The real range is
    /// 300 s to 48 h; the fake accepts 1 s upward so that tests can watch expiry.
    #[serde(with = "humantime_serde", default = "default_token_ttl")]
    pub token_ttl: Duration,
    /// The org's idle-token timeout (`PUT /api/v2/tokens/timeout`, 5 minutes and up;
    /// 15 minutes in HIPAA orgs), if it applies to this client's tokens: a token that
    /// makes no API call for this long dies, with its channels. Genesys does not say
    /// whether client-credentials tokens idle, so the fake can do both.
    #[serde(with = "humantime_serde", default)]
    pub idle_timeout: Option<Duration>,
}

impl std::fmt::Debug for ClientSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSpec")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("token_ttl", &self.token_ttl)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl ClientSpec {
    pub fn new(id: impl Into<String>, secret: impl Into<String>, token_ttl: Duration) -> Self {
        Self {
            id: id.into(),
            secret: secret.into(),
            token_ttl,
            idle_timeout: None,
        }
    }

    /// The same client, whose tokens die after `idle` without an API call.
    pub fn idling_after(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(86_400)
}

/// How long each kind of call takes to answer. On bare loopback everything answers
/// in microseconds, which hides the window in which a badly ordered handover loses
/// events; real service times make that window as wide as it is in production.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceTimes {
    #[serde(with = "humantime_serde")]
    pub token: Duration,
    #[serde(with = "humantime_serde")]
    pub api: Duration,
    #[serde(with = "humantime_serde")]
    pub ws_upgrade: Duration,
    /// Each delay is drawn uniformly from `base × (1 ± jitter)`.
    pub jitter: f64,
}

impl ServiceTimes {
    /// Roughly what a client in the same region sees from Genesys Cloud.
    pub const REALISTIC: Self = Self {
        token: Duration::from_millis(150),
        api: Duration::from_millis(50),
        ws_upgrade: Duration::from_millis(50),
        jitter: 0.2,
    };

    pub const NONE: Self = Self {
        token: Duration::ZERO,
        api: Duration::ZERO,
        ws_upgrade: Duration::ZERO,
        jitter: 0.0,
    };

    /// A delay drawn around `base`.
    pub fn draw(&self, base: Duration) -> Duration {
        if base.is_zero() || self.jitter <= 0.0 {
            return base;
        }
        let jitter = self.jitter.min(1.0);
        base.mul_f64(rand::random_range((1.0 - jitter)..=(1.0 + jitter)))
    }
}

/// What a socket is sent just before the fake closes it because its channel died
/// (token expiry, eviction, channel expiry). Genesys' behaviour here is not
/// documented; one third-party library reports a `{"result":"404"}` frame, so the
/// fake can do either and the proxy must survive both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathNotice {
    /// Just a close frame.
    #[default]
    None,
    /// `{"result":"404"}`, then a close frame.
    Result404,
}

/// How `GET /api/v2/notifications/channels?includechannels=oauthclient` shows the
/// channels of the OAuth client's other tokens. Genesys: "Channel Ids for other access
/// tokens will not be shown, but will be presented to show their existence"; the shape
/// of such an entry is not documented (every field of its `Channel` model is optional),
/// so the fake can answer each plausible one and the proxy must count them all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherChannels {
    /// `{"expires": …}`: `id` and `connectUri` left out, as a serializer that omits
    /// empty fields writes it.
    #[default]
    Omitted,
    /// `{"id": null, "connectUri": null, "expires": …}`.
    Null,
    /// `{"id": "********", "expires": …}`: every such entry has the same placeholder
    /// id, so a reader that tells channels apart by id sees one.
    Redacted,
}

/// Everything about the fake's behaviour that can change while it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Channels per OAuth client; creating one more silently evicts the oldest.
    pub max_channels_per_client: usize,
    #[serde(with = "humantime_serde")]
    pub channel_ttl: Duration,
    pub max_topics_per_channel: usize,
    /// Topic names must be shorter than this.
    pub max_topic_len: usize,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// API requests per token per `rate_window` (0 turns the limit off).
    pub rate_limit_per_min: u32,
    /// The rate limit's sliding window: a minute at Genesys; shorter in tests that
    /// want to see a 429 and its recovery quickly.
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
    /// A channel may only be managed with the token that created it (403 otherwise).
    /// When off, any token of the same OAuth client may manage it.
    pub strict_channel_owner: bool,
    /// Topics the OAuth clients may not see; `*` matches any run of characters.
    pub deny_topics: Vec<String>,
    pub service_times: ServiceTimes,
    pub death_notice: DeathNotice,
    /// How the listing across the OAuth client shows other tokens' channels.
    #[serde(default)]
    pub other_channels: OtherChannels,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_channels_per_client: 20,
            channel_ttl: Duration::from_secs(24 * 3600),
            max_topics_per_channel: 1000,
            max_topic_len: 200,
            heartbeat: Duration::from_secs(30),
            rate_limit_per_min: 300,
            rate_window: Duration::from_secs(60),
            strict_channel_owner: true,
            deny_topics: Vec::new(),
            service_times: ServiceTimes::REALISTIC,
            death_notice: DeathNotice::None,
            other_channels: OtherChannels::Omitted,
        }
    }
}

impl Settings {
    pub fn is_denied(&self, topic: &str) -> bool {
        self.deny_topics
            .iter()
            .any(|pattern| glob_match(pattern, topic))
    }
}

/// The fake's whole start-up configuration.
#[derive(Clone, Debug, Default)]
pub struct MockConfig {
    pub clients: Vec<ClientSpec>,
    pub settings: Settings,
    /// Base of every `connectUri` (`ws://host:port`), when sockets must be reached
    /// through something in front of the fake (a chaos relay); its own address
    /// otherwise.
    pub socket_base: Option<String>,
}

/// `*` matches any (possibly empty) run of characters; everything else literally.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn glob_matches_stars_anywhere() {
        assert!(glob_match("v2.users.*.presence", "v2.users.42.presence"));
        assert!(glob_match("*.secret", "v2.secret"));
        assert!(glob_match("v2.*", "v2."));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("v2.users.*.presence", "v2.users.42.routing"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("a*b*c", "axbxc"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
