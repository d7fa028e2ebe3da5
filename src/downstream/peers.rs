//! The book of what each peer holds (client channels, sockets, its allowance of
//! subscription calls), against `[limits]`. The decisions are `front::limits`;
//! this keeps the counts, keyed by `front::peer::limit_key`.
//!
//! Channels are counted from the channels themselves: a channel the sessions no
//! longer hold (closed, idle) is dropped from its peer's list when the list is next
//! read, so nothing needs to tell the book when a channel goes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::error::ClientError;
use super::sessions::{ClientChannel, Sessions};
use crate::front::limits::{CallBudget, PeerLimits};
use crate::front::peer::limit_key;

#[derive(Default)]
pub struct Peers {
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    entries: HashMap<IpAddr, Entry>,
    /// Entries at the last sweep: the book is swept when it has doubled since.
    swept_at: usize,
}

#[derive(Default)]
struct Entry {
    channels: Vec<Arc<ClientChannel>>,
    sockets: usize,
    calls: Option<CallBudget>,
    /// Held across a subscription change of any of this peer's channels, so that
    /// its limits are judged against the outcome of the change before it.
    changing: Arc<tokio::sync::Mutex<()>>,
}

impl Peers {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
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
        limits
            .admit_channel(entry.channels.len(), client_idle)
            .map_err(ClientError::from)?;
        let channel = sessions.create(peer);
        entry.channels.push(channel.clone());
        Ok(channel)
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
        limits
            .admit_socket(entry.sockets)
            .map_err(ClientError::from)?;
        entry.sockets += 1;
        Ok(SocketSlot {
            peers: self.clone(),
            key,
        })
    }

    /// Charges one subscription call to `peer` (429 when its minute is spent).
    pub fn charge_call(&self, peer: IpAddr, per_minute: u32) -> Result<(), ClientError> {
        let now = Instant::now();
        let mut book = self.book();
        let entry = book.entries.entry(limit_key(peer)).or_default();
        entry
            .calls
            .get_or_insert_with(|| CallBudget::new(per_minute, now))
            .take(per_minute, now)
            .map_err(ClientError::from)
    }

    /// The lock held across a change of `peer`'s channels.
    pub fn change_lock(&self, peer: IpAddr) -> Arc<tokio::sync::Mutex<()>> {
        self.book()
            .entries
            .entry(limit_key(peer))
            .or_default()
            .changing
            .clone()
    }

    /// `peer`'s open channels.
    pub fn channels_of(&self, peer: IpAddr, sessions: &Sessions) -> Vec<Arc<ClientChannel>> {
        let mut book = self.book();
        let Some(entry) = book.entries.get_mut(&limit_key(peer)) else {
            return Vec::new();
        };
        entry.prune(sessions);
        entry.channels.clone()
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
            && Arc::strong_count(&self.changing) == 1
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
