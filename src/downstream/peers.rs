//! The book of what each peer holds (client channels, sockets, its allowance of
//! subscription calls), against `[limits]`. The decisions are `front::limits`;
//! this keeps the counts, keyed by `front::peer::limit_key`.
//!
//! Channels are counted from the channels themselves: a channel the sessions no
//! longer hold (closed, idle) is dropped from its peer's list when the list is next
//! read, so nothing needs to tell the book when a channel goes.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::error::ClientError;
use super::sessions::{ClientChannel, Sessions};
use crate::front::limits::{CallBudget, PeerLimits, Refusal};
use crate::front::peer::limit_key;
use crate::metrics::{ByReason, Readings, Registry};
use crate::topic;

#[derive(Default)]
pub struct Peers {
    book: Mutex<Book>,
    refusals: ByReason,
}

#[derive(Default)]
struct Book {
    entries: HashMap<IpAddr, Entry>,
    /// Entries at the last sweep: the book is swept when it has doubled since.
    swept_at: usize,
    next_reservation: u64,
}

#[derive(Default)]
struct Entry {
    channels: Vec<Arc<ClientChannel>>,
    sockets: usize,
    calls: Option<CallBudget>,
    /// Topics that changes in flight may bring to a channel: (reservation, channel
    /// id, the channel's topics after the change).
    reserved: Vec<(u64, String, BTreeSet<String>)>,
}

impl Peers {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts what the front door refuses (`host`, `origin`), with the limits'
    /// refusals (by their Genesys code).
    pub fn refusals(&self) -> &ByReason {
        &self.refusals
    }

    /// Registers the refusals and the number of peers in the book.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        self.refusals.register(
            registry,
            "requests_refused",
            "Client requests and upgrades the front door refused, by reason: host, origin, or the per-peer limit's code.",
            &[
                "host",
                "origin",
                "too.many.channels",
                "too.many.sockets",
                "too.many.requests",
                "too.many.topics",
                "upstream.share.exceeded",
            ],
        );
        let peers = self.clone();
        Readings::new()
            .gauge(
                "peers",
                "Peers in the book of per-peer limits: holding channels or sockets, or remembered for their call allowance.",
                move || peers.book().entries.len() as i64,
            )
            .register(registry);
    }

    fn refused(&self, refusal: Refusal) -> ClientError {
        self.refusals.count(refusal.code);
        refusal.into()
    }

    /// Creates a client channel for `peer`, unless it holds as many as it may.
    pub fn create_channel(
        &self,
        peer: IpAddr,
        sessions: &Sessions,
        limits: &PeerLimits,
        client_idle: std::time::Duration,
    ) -> Result<Arc<ClientChannel>, ClientError> {
        let mut book = self.book();
        book.sweep(sessions);
        let entry = book.entries.entry(limit_key(peer)).or_default();
        entry.prune(sessions);
        if !limits.exempts(peer) {
            limits
                .admit_channel(entry.channels.len(), client_idle)
                .map_err(|refusal| self.refused(refusal))?;
        }
        let channel = sessions.create(peer);
        entry.channels.push(channel.clone());
        Ok(channel)
    }

    /// Takes over channel `id` from another replica for `peer`, unless it holds as
    /// many as it may; `None` if it is here already.
    pub fn take_over_channel(
        &self,
        id: &str,
        peer: IpAddr,
        sessions: &Sessions,
        limits: &PeerLimits,
        client_idle: std::time::Duration,
    ) -> Result<Option<Arc<ClientChannel>>, ClientError> {
        let mut book = self.book();
        book.sweep(sessions);
        let entry = book.entries.entry(limit_key(peer)).or_default();
        entry.prune(sessions);
        if sessions.get(id).is_some() {
            return Ok(None);
        }
        if !limits.exempts(peer) {
            limits
                .admit_channel(entry.channels.len(), client_idle)
                .map_err(|refusal| self.refused(refusal))?;
        }
        let channel = sessions.take_over(id, peer);
        entry.channels.push(channel.clone());
        Ok(Some(channel))
    }

    /// Takes one of `peer`'s socket slots for as long as the returned guard lives.
    pub fn open_socket(
        self: &Arc<Self>,
        peer: IpAddr,
        limits: &PeerLimits,
    ) -> Result<SocketSlot, ClientError> {
        let key = limit_key(peer);
        let mut book = self.book();
        let entry = book.entries.entry(key).or_default();
        if !limits.exempts(peer) {
            limits
                .admit_socket(entry.sockets)
                .map_err(|refusal| self.refused(refusal))?;
        }
        entry.sockets += 1;
        Ok(SocketSlot {
            peers: self.clone(),
            key,
        })
    }

    /// Charges one subscription call to `peer` (429 when its minute is spent).
    pub fn charge_call(&self, peer: IpAddr, limits: &PeerLimits) -> Result<(), ClientError> {
        if limits.exempts(peer) {
            return Ok(());
        }
        let per_minute = limits.calls_per_minute;
        let now = Instant::now();
        let mut book = self.book();
        let entry = book.entries.entry(limit_key(peer)).or_default();
        entry
            .calls
            .get_or_insert_with(|| CallBudget::new(per_minute, now))
            .take(per_minute, now)
            .map_err(|refusal| self.refused(refusal))
    }

    /// Judges a change that leaves the owner's `channel` with `next` against the
    /// owner's topic limits, counting what other changes in flight may bring, and
    /// reserves it until the returned guard is dropped (when the change is done).
    pub fn reserve_topics(
        self: &Arc<Self>,
        channel: &ClientChannel,
        next: BTreeSet<String>,
        sessions: &Sessions,
        limits: &PeerLimits,
        budget: usize,
    ) -> Result<Reservation, ClientError> {
        let key = limit_key(channel.peer);
        let mut book = self.book();
        let id = book.next_reservation;
        book.next_reservation += 1;
        let entry = book.entries.entry(key).or_default();
        entry.prune(sessions);
        // Each channel as it may end up: its topics and what changes in flight bring.
        let reserved_for = |id: &str| -> Vec<String> {
            entry
                .reserved
                .iter()
                .filter(|(_, channel, _)| channel == id)
                .flat_map(|(_, _, topics)| topics.iter().cloned())
                .collect()
        };
        let mut before: Vec<BTreeSet<String>> = entry
            .channels
            .iter()
            .map(|c| c.topics().into_iter().chain(reserved_for(&c.id)).collect())
            .collect();
        let mut after = before.clone();
        let mine: BTreeSet<String> = next
            .iter()
            .cloned()
            .chain(reserved_for(&channel.id))
            .collect();
        match entry.channels.iter().position(|c| c.id == channel.id) {
            Some(at) => after[at] = mine,
            None => {
                before.push(BTreeSet::new());
                after.push(mine);
            }
        }
        limits
            .admit_topics(usage(&before), usage(&after), budget)
            .map_err(|refusal| self.refused(refusal))?;
        entry.reserved.push((id, channel.id.clone(), next));
        Ok(Reservation {
            peers: self.clone(),
            key,
            id,
        })
    }
}

/// (subscriptions summed over the channels, distinct topics), combined topics
/// weighed expanded.
fn usage(channels: &[BTreeSet<String>]) -> (usize, usize) {
    let subscriptions = channels.iter().flatten().map(|t| topic::weight(t)).sum();
    let distinct: BTreeSet<String> = channels
        .iter()
        .flatten()
        .flat_map(|t| topic::expansion(t))
        .collect();
    (subscriptions, distinct.len())
}

/// A change's topics, counted against its owner's limits until it is dropped.
pub struct Reservation {
    peers: Arc<Peers>,
    key: IpAddr,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut book = self.peers.book();
        if let Some(entry) = book.entries.get_mut(&self.key) {
            entry.reserved.retain(|(id, _, _)| *id != self.id);
        }
    }
}

impl Book {
    /// Forgets peers that hold nothing and whose allowance is whole again, once the
    /// book has doubled since the last sweep (so sweeping costs O(1) per insert).
    fn sweep(&mut self, sessions: &Sessions) {
        if self.entries.len() < (self.swept_at * 2).max(1024) {
            return;
        }
        let now = Instant::now();
        self.entries.retain(|_, entry| {
            entry.prune(sessions);
            !entry.is_forgettable(now)
        });
        self.swept_at = self.entries.len();
    }
}

impl Entry {
    fn prune(&mut self, sessions: &Sessions) {
        self.channels
            .retain(|channel| sessions.get(&channel.id).is_some());
    }

    fn is_forgettable(&self, now: Instant) -> bool {
        self.channels.is_empty()
            && self.sockets == 0
            && self.reserved.is_empty()
            && self.calls.as_ref().is_none_or(|calls| calls.is_full(now))
    }
}

/// One of a peer's socket slots; given back when dropped.
pub struct SocketSlot {
    peers: Arc<Peers>,
    key: IpAddr,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut book = self.peers.book();
        if let Some(entry) = book.entries.get_mut(&self.key) {
            entry.sockets = entry.sockets.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(topics: &[&str]) -> BTreeSet<String> {
        topics.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn usage_counts_subscriptions_and_distinct_topics() {
        let channels = [
            set(&["v2.users.1.presence", "v2.users.2.presence"]),
            set(&["v2.users.1.presence", "v2.users.3?presence&station"]),
        ];
        assert_eq!(usage(&channels), (5, 4));
        assert_eq!(usage(&[]), (0, 0));
    }
}
