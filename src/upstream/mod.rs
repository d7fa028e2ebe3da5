//! The upstream side: the pool's decisions as plain state (`state`), the pool that
//! applies them within the budget (`pool`), a channel's subscription bookkeeping
//! (`sync`), the task that drives one channel through its life, handovers included
//! (`channel`), and the count of the OAuth client's channels held by others
//! (`foreign`). Genesys calls themselves are in `crate::genesys`.

pub mod channel;
pub mod foreign;
pub mod pool;
pub mod state;
pub mod sync;

use std::time::SystemTime;

use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Where upstream events go: the router, seen from below. The upstream side names
/// no client-side type.
pub trait Delivery: Send + Sync {
    /// An upstream event frame for `topic`, forwarded as the same bytes.
    fn event(&self, topic: &str, correlation_id: Option<&str>, frame: &Utf8Bytes);
    /// Events on `topics` between `from` and `to` may have been lost.
    fn gap(&self, topics: &[String], from: SystemTime, to: SystemTime);
}
