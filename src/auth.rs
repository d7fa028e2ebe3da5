//! Minting tokens: the credential sets in their configured order, the secret re-read
//! at every mint, one mint in flight per set, rejected secrets set aside until their
//! file changes, drain state, and back-off.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::genesys::{Genesys, UpstreamError};
use crate::metrics::Registry;
use crate::secret::Secret;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A rejected secret is tried again after this long even if its file did not change
/// (a rejection can be a transient fault on Genesys' side).
const REJECTION_RECHECK: Duration = Duration::from_secs(60);
/// How often secret files are re-read while every secret is known to be refused.
const SECRET_POLL: Duration = Duration::from_millis(200);

/// A minted token, pinned to the one upstream channel it creates.
#[derive(Clone)]
pub struct Token {
    pub value: Secret,
    /// The credential set that minted it.
    pub credential: Arc<str>,
    pub expires_at: Instant,
    pub lifetime: Duration,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("credential", &self.credential)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    Active,
    Draining,
    Rejected,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential set could mint a token (last error: {last})")]
    NoToken {
        last: String,
        retry_after: Option<Duration>,
        /// Whether Genesys was asked at all (not when every secret is known to be
        /// refused and unchanged): only then does the back-off grow.
        asked_genesys: bool,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("no credential set named {0:?}")]
    Unknown(String),
    #[error(
        "{0:?} is the last usable credential set: draining it would leave nothing to mint with"
    )]
    LastUsable(String),
}

#[derive(Default)]
struct SetState {
    draining: bool,
    /// Hash of the secret Genesys refused, and when.
    rejected: Option<(u64, Instant)>,
    /// Held for the duration of a mint: one mint in flight per credential set.
    in_flight: Arc<tokio::sync::Mutex<()>>,
}

pub struct TokenSource {
    genesys: Arc<Genesys>,
    config: Arc<ArcSwap<Config>>,
    sets: Mutex<HashMap<String, SetState>>,
    minted_once: AtomicBool,
    /// `handover_token_mints_total{credential, outcome}`: `minted`; `rejected` (400
    /// `invalid_client`: the secret was refused); `failed` (throttled, 5xx,
    /// unreachable).
    mints: Family<MintLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MintLabels {
    credential: String,
    outcome: &'static str,
}

impl TokenSource {
    pub fn new(genesys: Arc<Genesys>, config: Arc<ArcSwap<Config>>) -> Self {
        Self {
            genesys,
            config,
            sets: Mutex::default(),
            minted_once: AtomicBool::new(false),
            mints: Family::default(),
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        // Every configured credential set and outcome from zero.
        for credential in &self.config.load().credentials {
            for outcome in ["minted", "rejected", "failed"] {
                let _ = self.mints.get_or_create(&MintLabels {
                    credential: credential.name.clone(),
                    outcome,
                });
            }
        }
        registry.register(
            "token_mints",
            "Token mints by credential set and outcome (minted, rejected: the secret was refused, failed: throttled, 5xx or unreachable).",
            self.mints.clone(),
        );
    }

    fn count_mint(&self, credential: &str, outcome: &'static str) {
        self.mints
            .get_or_create(&MintLabels {
                credential: credential.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Whether any token was ever minted (readiness).
    pub fn has_minted(&self) -> bool {
        self.minted_once.load(Ordering::Acquire)
    }

    fn sets(&self) -> std::sync::MutexGuard<'_, HashMap<String, SetState>> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt: the first credential set, in configured order, that is not
    /// draining and whose current secret is not known to be refused.
    pub async fn mint(&self) -> Result<Token, AuthError> {
        let config = self.config.load_full();
        let mut last = String::from("every credential set is draining");
        let mut retry_after = None;
        let mut asked_genesys = false;
        for credential in &config.credentials {
            let name = credential.name.as_str();
            let secret = match credential.secret.read() {
                Ok(secret) => secret,
                Err(error) => {
                    tracing::warn!(credential = name, %error, "cannot read the client secret");
                    last = error.to_string();
                    continue;
                }
            };
            let fingerprint = fingerprint(&secret);
            let in_flight = {
                let mut sets = self.sets();
                let set = sets.entry(name.to_owned()).or_default();
                if set.draining {
                    continue;
                }
                if let Some((refused, at)) = set.rejected
                    && refused == fingerprint
                    && at.elapsed() < REJECTION_RECHECK
                {
                    last = format!("the secret of {name:?} was rejected and has not changed");
                    continue;
                }
                set.in_flight.clone()
            };
            let _one_at_a_time = in_flight.lock().await;
            asked_genesys = true;
            match self.genesys.mint(&credential.client_id, &secret).await {
                Ok(minted) => {
                    if let Some(set) = self.sets().get_mut(name)
                        && set.rejected.take().is_some()
                    {
                        tracing::info!(credential = name, "the client secret is accepted again");
                    }
                    self.minted_once.store(true, Ordering::Release);
                    self.count_mint(name, "minted");
                    return Ok(Token {
                        value: minted.token,
                        credential: Arc::from(name),
                        expires_at: crate::bounds::after(minted.lifetime),
                        lifetime: minted.lifetime,
                    });
                }
                Err(UpstreamError::CredentialsRejected(reason)) => {
                    self.count_mint(name, "rejected");
                    let first_time = self
                        .sets()
                        .get_mut(name)
                        .map(|set| {
                            set.rejected
                                .replace((fingerprint, Instant::now()))
                                .is_none()
                        })
                        .unwrap_or(true);
                    if first_time {
                        tracing::error!(
                            credential = name,
                            %reason,
                            "Genesys Cloud rejected this client secret: minting with the next credential set \
                             until the secret file changes"
                        );
                    }
                    last = format!("{name:?}: {reason}");
                }
                Err(error) => {
                    self.count_mint(name, "failed");
                    tracing::warn!(credential = name, %error, "token mint failed");
                    retry_after = retry_after.max(error.retry_after());
                    last = format!("{name:?}: {error}");
                }
            }
        }
        Err(AuthError::NoToken {
            last,
            retry_after,
            asked_genesys,
        })
    }

    /// Mints, retrying with jittered exponential back-off (honouring `Retry-After`)
    /// until it succeeds or `cancel` fires.
    pub async fn mint_until_success(&self, cancel: &CancellationToken) -> Option<Token> {
        let mut backoff = Backoff::new();
        loop {
            match self.mint().await {
                Ok(token) => return Some(token),
                Err(AuthError::NoToken {
                    retry_after,
                    asked_genesys,
                    ..
                }) => {
                    // Nothing was sent: poll the secret files at a steady pace, so a
                    // rotated secret is used as soon as it is written.
                    let wait = if asked_genesys {
                        retry_after.unwrap_or_default().max(backoff.next_wait())
                    } else {
                        SECRET_POLL
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return None,
                    }
                }
            }
        }
    }

    pub fn state(&self, name: &str) -> Option<CredentialState> {
        let config = self.config.load();
        config.credentials.iter().find(|c| c.name == name)?;
        let sets = self.sets();
        Some(match sets.get(name) {
            Some(set) if set.draining => CredentialState::Draining,
            Some(set) if set.rejected.is_some() => CredentialState::Rejected,
            _ => CredentialState::Active,
        })
    }

    pub fn is_draining(&self, name: &str) -> bool {
        self.sets().get(name).is_some_and(|s| s.draining)
    }

    /// Marks a credential set as draining: it mints no more tokens. Refused for an
    /// unknown name and for the last set that is neither draining nor rejected.
    pub fn drain(&self, name: &str) -> Result<(), DrainError> {
        let config = self.config.load();
        if !config.credentials.iter().any(|c| c.name == name) {
            return Err(DrainError::Unknown(name.to_owned()));
        }
        let mut sets = self.sets();
        let usable_others = config
            .credentials
            .iter()
            .filter(|c| c.name != name)
            .any(|c| {
                sets.get(&c.name)
                    .is_none_or(|s| !s.draining && s.rejected.is_none())
            });
        let set = sets.entry(name.to_owned()).or_default();
        if set.draining {
            return Ok(());
        }
        if !usable_others {
            return Err(DrainError::LastUsable(name.to_owned()));
        }
        set.draining = true;
        tracing::info!(credential = name, "credential set draining");
        Ok(())
    }

    pub fn undrain(&self, name: &str) -> Result<(), DrainError> {
        let config = self.config.load();
        if !config.credentials.iter().any(|c| c.name == name) {
            return Err(DrainError::Unknown(name.to_owned()));
        }
        self.sets().entry(name.to_owned()).or_default().draining = false;
        tracing::info!(credential = name, "credential set back in service");
        Ok(())
    }
}

fn fingerprint(secret: &Secret) -> u64 {
    let mut hasher = DefaultHasher::new();
    secret.expose().hash(&mut hasher);
    hasher.finish()
}
