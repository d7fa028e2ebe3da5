//! The end of a proxy's client sockets when it stops: once the drain begins, each
//! socket gets a turn to close, and the turns are spaced evenly over `drain_spread`,
//! so that the desktops reconnect (to another replica) as a trickle rather than a
//! herd. The proxy waits until the last socket is gone before it lets go of its
//! upstream channels: a desktop still connected keeps getting its events.
//!
//! The plan (who closes when) is [`close_offset`], apart from the waiting.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// When the `turn`-th socket (from 0) of the `sockets` open at the start of the drain
/// closes, counted from that start: the first at once, the others evenly spaced, the
/// last at `spread × (sockets − 1) / sockets`. A socket that opened after the start
/// (an upgrade that was already in flight) closes at the end of the window.
pub fn close_offset(turn: usize, sockets: usize, spread: Duration) -> Duration {
    if turn >= sockets {
        return spread;
    }
    // u128 arithmetic: no overflow for any count of sockets or length of window, and
    // the quotient is at most `spread`, so its seconds fit in a u64.
    let nanos = spread.as_nanos() * turn as u128 / sockets as u128;
    Duration::new(
        u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
        (nanos % 1_000_000_000) as u32,
    )
}

#[derive(Clone, Copy)]
struct Plan {
    start: Instant,
    spread: Duration,
    sockets: usize,
}

/// Shared by the proxy (which begins the drain and waits for its end) and every client
/// socket (which holds a [`SocketGuard`] and awaits its [`Drain::turn`]).
pub struct Drain {
    begun: CancellationToken,
    plan: OnceLock<Plan>,
    turns: AtomicUsize,
    open: watch::Sender<usize>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            begun: CancellationToken::new(),
            plan: OnceLock::new(),
            turns: AtomicUsize::new(0),
            open: watch::Sender::new(0),
        }
    }
}

/// Counts a client socket as open until dropped.
pub struct SocketGuard<'a> {
    drain: &'a Drain,
}

impl Drop for SocketGuard<'_> {
    fn drop(&mut self) {
        self.drain.open.send_modify(|open| *open -= 1);
    }
}

impl Drain {
    /// Marks a client socket open for as long as the guard lives.
    pub fn open_socket(&self) -> SocketGuard<'_> {
        self.open.send_modify(|open| *open += 1);
        SocketGuard { drain: self }
    }

    /// Client sockets open now.
    pub fn open_sockets(&self) -> usize {
        *self.open.borrow()
    }

    /// Starts closing the client sockets open now, spread over `spread`. Only the
    /// first call counts.
    pub fn begin(&self, spread: Duration) {
        let plan = Plan {
            start: Instant::now(),
            spread,
            sockets: self.open_sockets(),
        };
        if self.plan.set(plan).is_ok() {
            self.begun.cancel();
        }
    }

    /// Resolves when it is this socket's turn to close. Each call takes a turn once
    /// the drain has begun, so a socket creates this future once and keeps it.
    pub async fn turn(&self) {
        self.begun.cancelled().await;
        let Some(plan) = self.plan.get().copied() else {
            return;
        };
        let turn = self.turns.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep_until(plan.start + close_offset(turn, plan.sockets, plan.spread)).await;
    }

    /// Resolves once no client socket is open.
    pub async fn all_closed(&self) {
        let mut open = self.open.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = open.wait_for(|open| *open == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_evenly_spaced_and_latecomers_close_last() {
        let spread = Duration::from_secs(10);
        let offsets: Vec<_> = (0..5).map(|k| close_offset(k, 4, spread)).collect();
        assert_eq!(
            offsets,
            [0, 2500, 5000, 7500, 10_000].map(Duration::from_millis)
        );
        assert_eq!(close_offset(0, 0, spread), spread);
        assert_eq!(close_offset(3, 4, Duration::ZERO), Duration::ZERO);
        assert_eq!(close_offset(1, 2, Duration::MAX), Duration::MAX / 2);
        assert_eq!(
            close_offset(2, 3, Duration::from_secs(3)),
            Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sockets_close_in_turn_over_the_spread_and_the_end_is_seen() {
        let drain = std::sync::Arc::new(Drain::default());
        let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut sockets = Vec::new();
        for _ in 0..4 {
            let (drain, closed_tx) = (drain.clone(), closed_tx.clone());
            let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
            sockets.push(tokio::spawn(async move {
                let _open = drain.open_socket();
                let turn = drain.turn();
                let _ = opened_tx.send(());
                turn.await;
                let _ = closed_tx.send(Instant::now());
            }));
            opened_rx.await.unwrap();
        }
        assert_eq!(drain.open_sockets(), 4);
        let start = Instant::now();
        drain.begin(Duration::from_secs(8));
        drain.all_closed().await;
        let mut offsets = Vec::new();
        while let Ok(at) = closed_rx.try_recv() {
            offsets.push(at - start);
        }
        assert_eq!(offsets, [0, 2, 4, 6].map(Duration::from_secs));
        assert_eq!(drain.open_sockets(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_without_sockets_is_over_at_once() {
        let drain = Drain::default();
        drain.begin(Duration::from_secs(10));
        drain.begin(Duration::from_secs(99));
        let start = Instant::now();
        drain.all_closed().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
