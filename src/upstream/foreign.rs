//! Other users of the OAuth client: another replica, a reporting script, a forgotten
//! desktop holding the secret. Genesys keeps 20 channels per OAuth client and
//! silently evicts the oldest when one more is created, so the proxy counts them: at
//! start, then every `upstream.foreign_check_interval`, it lists the OAuth client's
//! channels (`GET …/channels?includechannels=oauthclient`, which shows other tokens'
//! channels without their ids), and those it did not create count against its budget
//! ([`Pool::foreign_counted`]).
//!
//! Each count uses a token minted for it and retired at once, as `availabletopics`
//! does: no channel's token is lent out, and the count is of the OAuth client the
//! next channel would be minted with (the first usable credential set). That is a
//! mint, a listing and a retirement a minute by default, two calls on each token of
//! Genesys' 300 a minute. The first of these mints, at start, is also the one that
//! makes the proxy ready: no desktop has to connect first.
//!
//! A listing that fails (Genesys unreachable, 403 without the permission, 404 where
//! the call does not exist) keeps the last count, or counts none if there was none
//! yet, as the proxy did before it counted; it is logged as a warning (once per kind
//! of failure) and tried again with back-off, at the latest after the interval.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pool::Pool;
use crate::auth::TokenSource;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::genesys::{Genesys, UpstreamError};

/// A listing that takes longer is a failure: channels wait for the first count.
const LISTING_TIMEOUT: Duration = Duration::from_secs(5);
/// After a count that may include channels of the proxy being created or retired
/// while Genesys listed them, the next comes this soon, then twice as late each time
/// (up to the interval) while counts stay unsure.
const RECOUNT_FIRST: Duration = Duration::from_secs(2);

/// Counts the OAuth client's channels held by others until `shutdown`.
pub async fn watch(
    genesys: Arc<Genesys>,
    tokens: Arc<TokenSource>,
    pool: Arc<Pool>,
    config: Arc<ArcSwap<Config>>,
    shutdown: CancellationToken,
) {
    let mut pacing = Pacing::new();
    let mut ready = false;
    let mut failing: Option<String> = None;
    loop {
        let Some(token) = tokens.mint_until_success(&shutdown).await else {
            return;
        };
        if !ready {
            ready = true;
            tracing::info!(credential = %token.credential, "a token was minted: ready");
        }
        let sent = Instant::now();
        let listed = tokio::select! {
            listed = tokio::time::timeout(LISTING_TIMEOUT, genesys.count_client_channels(&token.value)) => {
                listed.unwrap_or_else(|_| Err(UpstreamError::Unavailable("the listing timed out".into())))
            }
            _ = shutdown.cancelled() => {
                retire(&genesys, &token.value).await;
                return;
            }
        };
        let config = config.load_full();
        let interval = config.upstream.foreign_check_interval;
        let wait = match listed {
            Ok(listed) => {
                let client_of = |credential: &str| {
                    config
                        .credentials
                        .iter()
                        .find(|c| c.name == credential)
                        .map(|c| c.client_id.as_str())
                };
                let listing_client = client_of(&token.credential);
                let same_client = |credential: &str| {
                    listing_client.is_some() && client_of(credential) == listing_client
                };
                let count = pool.foreign_counted(listed, sent, &same_client);
                if failing.take().is_some() {
                    tracing::info!("the OAuth client's channels are counted again");
                }
                if count.unsure > 0 {
                    tracing::debug!(
                        others = count.foreign,
                        unsure = count.unsure,
                        "some of the proxy's channels were being created or retired during the count: counting again soon"
                    );
                }
                pacing.after_count(count.unsure, interval)
            }
            Err(error) => {
                pool.foreign_uncounted();
                let kind = error.to_string();
                if failing.as_ref() != Some(&kind) {
                    tracing::warn!(
                        %error,
                        "the OAuth client's channels could not be counted: others' channels keep their last count (none if never counted) until a count succeeds"
                    );
                } else {
                    tracing::debug!(%error, "the OAuth client's channels could not be counted");
                }
                failing = Some(kind);
                pacing.after_failure(error.retry_after(), interval)
            }
        };
        retire(&genesys, &token.value).await;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Retires a token that holds no channel; one that cannot be retired expires by
/// itself.
async fn retire(genesys: &Genesys, token: &crate::secret::Secret) {
    if let Err(error) = genesys.retire_token(token).await {
        tracing::debug!(%error, "could not retire the token of a channel count");
    }
}

/// When the next count comes.
struct Pacing {
    failures: Backoff,
    recount: Duration,
}

impl Pacing {
    fn new() -> Self {
        Self {
            failures: Backoff::new(),
            recount: RECOUNT_FIRST,
        }
    }

    /// After a count, `unsure` of whose channels may have been the proxy's own: the
    /// interval, or sooner while counts are unsure.
    fn after_count(&mut self, unsure: usize, interval: Duration) -> Duration {
        self.failures = Backoff::new();
        if unsure == 0 {
            self.recount = RECOUNT_FIRST;
            return interval;
        }
        let wait = self.recount.min(interval);
        self.recount = self.recount.saturating_mul(2).min(interval);
        wait
    }

    /// After a failed listing: back-off, at most the interval, at least what Genesys
    /// asked for.
    fn after_failure(&mut self, retry_after: Option<Duration>, interval: Duration) -> Duration {
        self.failures
            .next_wait()
            .min(interval)
            .max(retry_after.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn counts_come_at_the_interval_sooner_while_unsure_and_backed_off_after_failures() {
        let mut pacing = Pacing::new();
        assert_eq!(pacing.after_count(0, MINUTE), MINUTE);
        let unsure: Vec<Duration> = (0..7).map(|_| pacing.after_count(1, MINUTE)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            unsure,
            [s(2), s(4), s(8), s(16), s(32), s(60), s(60)],
            "twice as late each time, up to the interval"
        );
        assert_eq!(pacing.after_count(0, MINUTE), MINUTE);
        assert_eq!(pacing.after_count(3, MINUTE), s(2), "sure again: reset");
        assert_eq!(
            pacing.after_count(1, s(1)),
            s(1),
            "never beyond the interval"
        );

        let failures: Vec<Duration> = (0..12)
            .map(|_| pacing.after_failure(None, MINUTE))
            .collect();
        assert!(failures[0] <= Duration::from_millis(250), "{failures:?}");
        assert!(failures.iter().all(|w| *w <= MINUTE), "{failures:?}");
        assert!(failures[11] >= s(15), "backed off: {failures:?}");
        assert_eq!(
            pacing.after_failure(Some(s(90)), MINUTE),
            s(90),
            "Genesys' Retry-After wins"
        );
        pacing.after_count(0, MINUTE);
        assert!(pacing.after_failure(None, MINUTE) <= Duration::from_millis(250));
    }
}
