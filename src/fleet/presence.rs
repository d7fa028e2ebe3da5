//! Which replicas are alive, so that a replica taking a desktop's channel over knows
//! whether the one that served it kept carrying its topics until now.
//!
//! Each replica beats every [`BEAT`]: it writes its clock into `r:<replica>`, which
//! is kept for [`KEPT`] (so that others can read when a gone replica beat last); no
//! beat for [`DEAD_AFTER`] means gone. A draining replica stops beating only once its
//! channels have other owners and its topics other carriers, just before it lets go
//! of its upstream channels, saying it retired. A replica that takes a channel over from `owner` waits, once its own
//! subscriptions are live, for one more beat of the owner: a beat after that moment
//! means the owner was still carrying the topics when this replica began to, so no
//! event fell between them. No beat means the owner died (or stopped): its events
//! from its last beat until now may never have reached the stream, and the desktop
//! hears of that span as a gap.
//!
//! Replicas that take desktops (ready, not draining) are also in the sorted set
//! `replicas`, scored by their last beat: a draining replica waits for its channels to
//! move only while some other replica can take them, so that stopping a whole fleet
//! does not wait out its grace period.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::store::Store;

/// How often a replica beats.
pub const BEAT: Duration = Duration::from_millis(250);
/// How long a replica that beat stays in `replicas` (taking desktops).
const LAPSE: Duration = Duration::from_secs(3);
/// How long a beat stays readable.
pub const KEPT: Duration = Duration::from_secs(60);
/// A retired replica's last word.
const RETIRED: &str = "retired";
/// No beat for this long means a replica is gone: a few beats, so that one slow
/// write does not make a live replica look dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(1500);

pub struct Presence {
    store: Arc<Store>,
    /// Whether this replica takes desktops (it stops at the start of its drain).
    accepting: AtomicBool,
    /// Cancelled when this replica stops beating (retired, or shutting down).
    stopped: CancellationToken,
}

impl Presence {
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            accepting: AtomicBool::new(true),
            stopped: CancellationToken::new(),
        })
    }

    /// Beats until retired or `shutdown`.
    pub async fn beat(self: Arc<Self>, shutdown: CancellationToken) {
        let key = self.store.keys.alive(&self.store.replica);
        loop {
            let now = ms(SystemTime::now());
            let mut beat = redis::pipe();
            beat.cmd("SET")
                .arg(&key)
                .arg(now)
                .arg("PX")
                .arg(KEPT.as_millis() as u64)
                .ignore();
            if self.accepting.load(Ordering::Acquire) {
                beat.zadd(self.store.keys.replicas(), &self.store.replica, now)
                    .ignore();
            }
            beat.zrembyscore(
                self.store.keys.replicas(),
                "-inf",
                now.saturating_sub(LAPSE.as_millis() as u64),
            )
            .ignore();
            let _ = self.store.pipe::<()>(&beat).await;
            tokio::select! {
                _ = tokio::time::sleep(BEAT) => {}
                _ = self.stopped.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// This replica takes no more desktops (its drain began).
    pub async fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
        let mut leave = redis::cmd("ZREM");
        leave
            .arg(self.store.keys.replicas())
            .arg(&self.store.replica);
        let _ = self.store.command::<()>(&leave).await;
    }

    /// Whether another replica takes desktops (it beat within [`LAPSE`]). Unknown
    /// (Redis failing) counts as yes.
    pub async fn others_accepting(&self) -> bool {
        let since = ms(SystemTime::now()).saturating_sub(LAPSE.as_millis() as u64);
        let mut count = redis::cmd("ZCOUNT");
        count.arg(self.store.keys.replicas()).arg(since).arg("+inf");
        self.store
            .command::<u64>(&count)
            .await
            .is_ok_and(|others| others > 0)
            || !self.store.is_up()
    }

    /// Stops beating for good: this replica is about to let go of its topics, which
    /// other replicas carry now. Its last word says so (a replica that dies leaves
    /// its last beat, which lapses).
    pub async fn retire(&self) {
        self.stopped.cancel();
        let mut last = redis::cmd("SET");
        last.arg(self.store.keys.alive(&self.store.replica))
            .arg(RETIRED)
            .arg("PX")
            .arg(KEPT.as_millis() as u64);
        let _ = self.store.command::<()>(&last).await;
    }

    /// Whether `replica` beat within [`DEAD_AFTER`].
    pub async fn is_alive(&self, replica: &str) -> bool {
        let beat = self
            .store
            .command::<Option<String>>(redis::cmd("GET").arg(self.store.keys.alive(replica)))
            .await;
        let last = beat
            .ok()
            .flatten()
            .and_then(|beat| beat.parse::<u64>().ok());
        last.is_some_and(|last| {
            ms(SystemTime::now()).saturating_sub(last) <= DEAD_AFTER.as_millis() as u64
        })
    }

    /// Whether `owner` beat (or retired, having handed its channels over) after now,
    /// within [`DEAD_AFTER`]; if not, when it beat last (`None` if it has no beat to
    /// read).
    pub async fn outlived(&self, owner: &str) -> Result<(), Option<SystemTime>> {
        let key = self.store.keys.alive(owner);
        let read = || async {
            self.store
                .command::<Option<String>>(redis::cmd("GET").arg(&key))
                .await
                .ok()
                .flatten()
        };
        let Some(first) = read().await else {
            return Err(None);
        };
        if first == RETIRED {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + DEAD_AFTER;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(BEAT / 2).await;
            match read().await {
                Some(beat) if beat != first => return Ok(()),
                Some(_) => {}
                None => break,
            }
        }
        let last = first.parse().unwrap_or(0);
        Err(Some(SystemTime::UNIX_EPOCH + Duration::from_millis(last)))
    }
}

fn ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
