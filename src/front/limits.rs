//! Fair use per peer (`[limits]`): how many client channels, sockets and
//! subscriptions one peer may hold, how many subscription calls it may make a
//! minute, and what share of the upstream topic budget its topics may take. Each
//! refusal is Genesys-shaped: 429 with `Retry-After` for what passes with time, 400
//! for what the peer must give back first.
//!
//! Without them one peer filled the shared upstream budget with three PUTs and
//! created 10,000 socketless channels in 3 s (issue 9).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use http::StatusCode;
use tokio::time::Instant;

/// Default of `limits.channels_per_peer`.
pub const DEFAULT_CHANNELS: usize = 50;
/// Default of `limits.sockets_per_peer`.
pub const DEFAULT_SOCKETS: usize = 50;
/// Default of `limits.topics_per_peer`.
pub const DEFAULT_TOPICS: usize = 2000;
/// Default of `limits.subscription_calls_per_minute`.
pub const DEFAULT_CALLS_PER_MINUTE: u32 = 120;
/// Default of `limits.upstream_share_percent`.
pub const DEFAULT_UPSTREAM_SHARE_PERCENT: u8 = 25;
/// What a refused socket is told to wait: sockets free up when another closes.
const SOCKET_RETRY: Duration = Duration::from_secs(5);

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLimits {
    /// Peers no limit applies to: by default loopback, this host itself (the tools,
    /// a health checker). Behind a proxy on this host, list it in
    /// `server.trusted_proxies`, so that the clients it reports are counted.
    pub exempt: Vec<IpNet>,
    /// Client channels one peer holds at once, with or without a socket.
    pub channels: usize,
    /// Client WebSockets one peer has open at once.
    pub sockets: usize,
    /// Topics summed over one peer's channels (each costs fan-out work).
    pub topics: usize,
    /// Subscription calls (REST changes and in-band subscribes) per minute.
    pub calls_per_minute: u32,
    /// The most of the upstream topic budget the distinct topics of one peer's
    /// channels may take, in percent.
    pub upstream_share_percent: u8,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            exempt: default_exempt(),
            channels: DEFAULT_CHANNELS,
            sockets: DEFAULT_SOCKETS,
            topics: DEFAULT_TOPICS,
            calls_per_minute: DEFAULT_CALLS_PER_MINUTE,
            upstream_share_percent: DEFAULT_UPSTREAM_SHARE_PERCENT,
        }
    }
}

/// A request refused for exceeding a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
}

/// Default of `limits.exempt`: the loopback networks.
pub fn default_exempt() -> Vec<IpNet> {
    vec![
        IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("a valid prefix"),
        IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]
}

impl PeerLimits {
    /// Whether no limit applies to `peer`.
    pub fn exempts(&self, peer: IpAddr) -> bool {
        super::peer::is_trusted(peer, &self.exempt)
    }

    /// A new client channel, for a peer holding `open`. Channels without a socket
    /// close after `client_idle`: that is when to try again.
    pub fn admit_channel(&self, open: usize, client_idle: Duration) -> Result<(), Refusal> {
        if open < self.channels {
            return Ok(());
        }
        Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "too.many.channels",
            message: format!(
                "This address holds {open} notification channels, the most it may (limits.channels_per_peer); \
                 reuse one, or wait until an unused one expires"
            ),
            retry_after: Some(client_idle.max(Duration::from_secs(1))),
        })
    }

    /// A new client socket, for a peer with `open` sockets.
    pub fn admit_socket(&self, open: usize) -> Result<(), Refusal> {
        if open < self.sockets {
            return Ok(());
        }
        Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "too.many.sockets",
            message: format!(
                "This address has {open} notification sockets open, the most it may (limits.sockets_per_peer)"
            ),
            retry_after: Some(SOCKET_RETRY),
        })
    }

    /// A subscription change that would leave the peer with `subscriptions` topics
    /// summed over its channels, `distinct` of them distinct (combined topics
    /// weighed expanded), against an upstream budget of `budget` topics. `before`
    /// is the same pair as it is now: a change that does not grow what is over a
    /// limit is admitted, so that a peer over a lowered limit can still shrink.
    pub fn admit_topics(
        &self,
        before: (usize, usize),
        after: (usize, usize),
        budget: usize,
    ) -> Result<(), Refusal> {
        let (subscriptions, distinct) = after;
        if subscriptions > self.topics && subscriptions > before.0 {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                code: "too.many.topics",
                message: format!(
                    "This change would give this address {subscriptions} subscriptions over its channels; \
                     it may hold {} (limits.topics_per_peer)",
                    self.topics
                ),
                retry_after: None,
            });
        }
        let share = self.share_of(budget);
        if distinct > share && distinct > before.1 {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                code: "upstream.share.exceeded",
                message: format!(
                    "This change would give this address {distinct} distinct topics; one address may take at most \
                     {share} of the proxy's {budget} upstream topics (limits.upstream_share_percent = {}%)",
                    self.upstream_share_percent
                ),
                retry_after: None,
            });
        }
        Ok(())
    }

    /// The topics one peer may take of an upstream budget of `budget`.
    pub fn share_of(&self, budget: usize) -> usize {
        budget.saturating_mul(usize::from(self.upstream_share_percent)) / 100
    }
}

/// A peer's allowance of subscription calls: a token bucket holding up to a
/// minute's worth, refilled continuously, so that a desktop's burst at login
/// passes and a steady flood does not.
#[derive(Debug, Clone)]
pub struct CallBudget {
    tokens: f64,
    updated: Instant,
}

impl CallBudget {
    pub fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(per_minute),
            updated: now,
        }
    }

    /// Takes one call, or says how long until one is available.
    pub fn take(&mut self, per_minute: u32, now: Instant) -> Result<(), Refusal> {
        let capacity = f64::from(per_minute);
        let per_second = capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = if per_second > 0.0 {
            ((1.0 - self.tokens) / per_second).ceil().max(1.0)
        } else {
            60.0
        };
        Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "too.many.requests",
            message: format!(
                "This address made more than {per_minute} subscription calls in a minute (limits.subscription_calls_per_minute)"
            ),
            retry_after: Some(Duration::from_secs_f64(wait)),
        })
    }

    /// Whether the bucket is full again, whatever the rate (it refills in a minute),
    /// i.e. forgetting it loses nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.updated) >= Duration::from_secs(60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_admitted_up_to_the_limit() {
        let limits = PeerLimits {
            channels: 2,
            sockets: 1,
            ..PeerLimits::default()
        };
        let idle = Duration::from_secs(60);
        assert!(limits.admit_channel(0, idle).is_ok());
        assert!(limits.admit_channel(1, idle).is_ok());
        let refused = limits.admit_channel(2, idle).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, "too.many.channels");
        assert_eq!(refused.retry_after, Some(idle));
        assert!(limits.admit_socket(0).is_ok());
        let refused = limits.admit_socket(1).unwrap_err();
        assert_eq!(refused.code, "too.many.sockets");
        assert!(refused.retry_after.is_some());
    }

    #[test]
    fn loopback_is_exempt_by_default() {
        let limits = PeerLimits::default();
        assert!(limits.exempts("127.0.0.1".parse().unwrap()));
        assert!(limits.exempts("127.9.9.9".parse().unwrap()));
        assert!(limits.exempts("::1".parse().unwrap()));
        assert!(limits.exempts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!limits.exempts("10.0.0.1".parse().unwrap()));
        let none = PeerLimits {
            exempt: Vec::new(),
            ..PeerLimits::default()
        };
        assert!(!none.exempts("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn topics_and_the_upstream_share_are_capped() {
        let limits = PeerLimits {
            topics: 10,
            upstream_share_percent: 25,
            ..PeerLimits::default()
        };
        // A budget of 3 channels of 10 topics: a quarter is 7.
        assert_eq!(limits.share_of(30), 7);
        assert!(limits.admit_topics((0, 0), (10, 7), 30).is_ok());
        let refused = limits.admit_topics((0, 0), (11, 5), 30).unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::BAD_REQUEST, "too.many.topics")
        );
        let refused = limits.admit_topics((0, 0), (8, 8), 30).unwrap_err();
        assert_eq!(refused.code, "upstream.share.exceeded");
        assert!(refused.message.contains("25%"), "{}", refused.message);
        // Over a limit (it was lowered): shrinking, or staying, is still admitted.
        assert!(limits.admit_topics((20, 9), (15, 8), 30).is_ok());
        assert!(limits.admit_topics((20, 9), (20, 9), 30).is_ok());
        assert!(limits.admit_topics((20, 9), (21, 9), 30).is_err());
    }

    #[test]
    fn calls_are_a_refilling_minute() {
        let start = Instant::now();
        let mut budget = CallBudget::new(60, start);
        for _ in 0..60 {
            assert!(budget.take(60, start).is_ok());
        }
        let refused = budget.take(60, start).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, "too.many.requests");
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        // One a second comes back.
        assert!(budget.take(60, start + Duration::from_secs(1)).is_ok());
        assert!(budget.take(60, start + Duration::from_secs(1)).is_err());
        assert!(!budget.is_full(start + Duration::from_secs(30)));
        assert!(budget.is_full(start + Duration::from_secs(61)));
        // Never more than a minute's worth saved up.
        let later = start + Duration::from_secs(3600);
        for _ in 0..60 {
            assert!(budget.take(60, later).is_ok());
        }
        assert!(budget.take(60, later).is_err());
        let mut slow = CallBudget::new(1, start);
        assert!(slow.take(1, start).is_ok());
        assert_eq!(
            slow.take(1, start).unwrap_err().retry_after,
            Some(Duration::from_secs(60))
        );
    }
}
