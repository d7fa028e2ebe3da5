//! Bounds on what an upstream may tell the proxy, and time arithmetic that cannot
//! overflow. A broken or hostile upstream can answer `expires_in: 18446744073709551615`
//! or `Retry-After: 99999999999`; taken at its word, `Instant + Duration` panics, and a
//! large finite value parks a channel for years. Every duration that comes from outside
//! goes through these clamps, and every deadline through [`after`].

use std::time::Duration;

use tokio::time::Instant;

/// Genesys tokens live 300 s to 48 h ("between 5mins and 48hrs"); a longer lifetime
/// is taken as 48 h (handing over earlier than needed is harmless).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// A token that expires sooner than this cannot carry a channel: the mint counts as
/// failed (and is retried with back-off) rather than starting a hand-over loop.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(1);
/// Longest `Retry-After` honoured. Genesys' SDKs give up beyond 180 s; the proxy
/// never gives up, so it asks again after this long at the latest.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Largest upstream answer read. A subscription answer for 1000 topics of 200
/// characters, with rejection details, is well under 1 MiB.
pub const MAX_UPSTREAM_BODY: usize = 2 * 1024 * 1024;
/// Largest `availabletopics` answer read: with `expand=schema`, every topic's JSON
/// schema is in it (several MiB for a few hundred topics).
pub const MAX_TOPIC_LIST_BODY: usize = 32 * 1024 * 1024;

/// The instant `delay` from now, or about a century from now if that overflows.
pub fn after(delay: Duration) -> Instant {
    later(Instant::now(), delay)
}

/// `at + delay` without overflow: saturates at about a century past `at`.
pub fn later(at: Instant, delay: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(delay.min(CENTURY))
        .or_else(|| at.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(at)
}

/// A token lifetime from `expires_in` seconds, if it is usable at all.
pub fn token_lifetime(expires_in_secs: f64) -> Option<Duration> {
    if !expires_in_secs.is_finite() || expires_in_secs < MIN_TOKEN_LIFETIME.as_secs_f64() {
        return None;
    }
    Some(Duration::from_secs_f64(
        expires_in_secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()),
    ))
}

/// A `Retry-After` in seconds, clamped.
pub fn retry_after(secs: u64) -> Duration {
    Duration::from_secs(secs).min(MAX_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_lifetimes_are_refused_or_clamped() {
        assert_eq!(token_lifetime(u64::MAX as f64), Some(MAX_TOKEN_LIFETIME));
        assert_eq!(token_lifetime(f64::INFINITY), None);
        assert_eq!(token_lifetime(f64::NAN), None);
        assert_eq!(token_lifetime(0.0), None);
        assert_eq!(token_lifetime(-5.0), None);
        assert_eq!(token_lifetime(86399.0), Some(Duration::from_secs(86399)));
        assert_eq!(retry_after(u64::MAX), MAX_RETRY_AFTER);
        assert_eq!(retry_after(59), Duration::from_secs(59));
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_never_overflow() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert!(after(Duration::from_secs(u64::MAX)) > now);
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
