//! Client channels (the proxy's own notification channels, one per desktop) and
//! their subscriptions. A subscription change goes to the router (who wants what)
//! and, on a topic's first or last subscriber, to the upstream pool; the answer
//! waits until the new topics are live upstream.
//!
//! A change runs to completion as a task of its own, whoever waits for it: a desktop
//! that reloads mid-request drops only the wait, and the topics the change added are
//! owned by the client channel, which gives them back when it closes. Nothing a
//! change takes from the router or the pool can be stranded by a dropped future.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::error::ClientError;
use crate::metrics::{Readings, Registry};
use crate::router::{Outbox, Router, SessionId};
use crate::topic;
use crate::upstream::Demand;
use crate::upstream::state::{Capacity, TopicOutcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Genesys' limit for one channel (combined topics count their expansion), applied to
/// client channels too.
pub const MAX_TOPICS_PER_CLIENT: usize = 1000;
/// How long a client's subscription call may wait for its topics to go live.
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(60);
/// A client channel's advertised lifetime (Genesys channels live 24 h).
const ADVERTISED_LIFETIME: Duration = Duration::from_secs(24 * 3600);

pub struct ClientChannel {
    /// The client-facing id: random, URL-safe, unrelated to any upstream id.
    pub id: String,
    pub session: SessionId,
    /// The peer that created it (see `front::peer`): its limits are charged.
    pub peer: IpAddr,
    pub outbox: Arc<Outbox>,
    pub expires: SystemTime,
    topics: Mutex<BTreeSet<String>>,
    /// Held for the whole of a subscription change.
    changing: tokio::sync::Mutex<()>,
    /// When its last socket closed (`None` while one is open).
    detached_since: Mutex<Option<Instant>>,
}

impl ClientChannel {
    pub fn topics(&self) -> BTreeSet<String> {
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn socket_opened(&self) {
        *self
            .detached_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn socket_closed(&self) {
        if !self.outbox.is_attached() {
            *self
                .detached_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    by: &'static str,
    code: String,
}

fn close_labels(by: &'static str, code: Option<u16>) -> CloseLabels {
    let code = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
    CloseLabels { by, code }
}

/// How a subscription call changes a channel's topics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Change {
    Add(Vec<String>),
    Replace(Vec<String>),
    RemoveAll,
}

/// One topic of a subscription answer.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopicAnswer {
    pub id: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejection_reason: Option<&'static str>,
}

pub struct Sessions {
    channels: DashMap<String, Arc<ClientChannel>>,
    router: Arc<Router>,
    /// Where topics go upstream: the pool, or the fleet's carriers.
    upstream: Arc<dyn Demand>,
    /// Subscription changes run here, so that they finish even if nobody waits.
    tasks: TaskTracker,
    /// `handover_client_closes_total{by, code}`: client sockets ended, by who ended
    /// them and with which close code (`none`: the connection just went away).
    closes: Family<CloseLabels, Counter>,
    /// Serialises router and pool transitions, so that a topic's last unsubscribe and
    /// another client's first subscribe reach the pool in the order they happened.
    transitions: Mutex<()>,
    next_session: AtomicU64,
}

impl Sessions {
    pub fn new(router: Arc<Router>, upstream: Arc<dyn Demand>, tasks: TaskTracker) -> Self {
        Self {
            channels: DashMap::new(),
            router,
            upstream,
            tasks,
            closes: Family::default(),
            transitions: Mutex::new(()),
            next_session: AtomicU64::new(1),
        }
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        // The usual ends from zero, so that dashboards see the series.
        for (by, code) in [
            ("client", Some(1000)),
            ("client", None),
            ("proxy", Some(1000)),
            ("proxy", Some(1001)),
            ("proxy", Some(1012)),
            ("proxy", Some(1013)),
        ] {
            let _ = self.closes.get_or_create(&close_labels(by, code));
        }
        registry.register(
            "client_closes",
            "Client sockets ended, by who ended them (client, proxy) and close code (none: the connection went away).",
            self.closes.clone(),
        );
        let (channels, sockets) = (self.clone(), self.clone());
        Readings::new()
            .gauge(
                "client_channels",
                "Client channels open (with or without a socket).",
                move || channels.count() as i64,
            )
            .gauge("client_sockets", "Client WebSockets open.", move || {
                sockets.connected() as i64
            })
            .register(registry);
    }

    /// Counts a client socket's end.
    pub fn count_close(&self, by: &'static str, code: Option<u16>) {
        self.closes.get_or_create(&close_labels(by, code)).inc();
    }

    pub fn create(&self, peer: IpAddr) -> Arc<ClientChannel> {
        self.insert(new_channel_id(), peer)
    }

    /// Channel `id` from another replica, for `peer` (the caller checked that it is
    /// not here, under the peers' book lock).
    pub fn take_over(&self, id: &str, peer: IpAddr) -> Arc<ClientChannel> {
        self.insert(id.to_owned(), peer)
    }

    fn insert(&self, id: String, peer: IpAddr) -> Arc<ClientChannel> {
        let channel = Arc::new(ClientChannel {
            id,
            session: self.next_session.fetch_add(1, Ordering::Relaxed),
            peer,
            outbox: Arc::new(Outbox::default()),
            expires: SystemTime::now() + ADVERTISED_LIFETIME,
            topics: Mutex::default(),
            changing: tokio::sync::Mutex::new(()),
            detached_since: Mutex::new(Some(Instant::now())),
        });
        self.channels.insert(channel.id.clone(), channel.clone());
        channel
    }

    pub fn get(&self, id: &str) -> Option<Arc<ClientChannel>> {
        self.channels.get(id).map(|c| c.clone())
    }

    pub fn count(&self) -> usize {
        self.channels.len()
    }

    /// The ids of the client channels with a socket open.
    pub fn connected_ids(&self) -> Vec<String> {
        self.channels
            .iter()
            .filter(|c| c.outbox.is_attached())
            .map(|c| c.id.clone())
            .collect()
    }

    /// The client channels with a socket open, with how far in the fleet's stream
    /// each was served.
    pub fn connected_positions(&self) -> Vec<(String, crate::router::Offset)> {
        self.channels
            .iter()
            .filter(|c| c.outbox.is_attached())
            .map(|c| (c.id.clone(), c.outbox.served_to()))
            .collect()
    }

    /// Client channels with a socket open.
    pub fn connected(&self) -> usize {
        self.channels
            .iter()
            .filter(|c| c.outbox.is_attached())
            .count()
    }

    /// Drops a channel and its subscriptions (after any change in flight on it). If
    /// this future is dropped while it waits for that change, nothing has happened yet.
    pub async fn close(&self, id: &str) {
        let Some(channel) = self.get(id) else {
            return;
        };
        let _one_change = channel.changing.lock().await;
        if self.channels.remove(id).is_none() {
            return;
        }
        let topics: Vec<String> =
            std::mem::take(&mut *channel.topics.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        if !topics.is_empty() {
            tracing::info!(
                target: crate::downstream::AUDIT,
                peer = %channel.peer,
                session = channel.session,
                removed = ?topics,
                "client channel closed: its topics are unsubscribed"
            );
        }
        self.unsubscribe(&channel, &topics);
    }

    /// Closes channels whose socket has been gone for longer than `idle`.
    pub async fn close_idle(&self, idle: Duration) {
        let idle_ids: Vec<String> = self
            .channels
            .iter()
            .filter(|c| {
                let since = *c.detached_since.lock().unwrap_or_else(|p| p.into_inner());
                since.is_some_and(|s| s.elapsed() >= idle)
            })
            .map(|c| c.id.clone())
            .collect();
        for id in idle_ids {
            self.close(&id).await;
        }
    }

    /// Applies a subscription change and answers once the new topics are live. A
    /// change that fails leaves the channel's topics as they were (as at Genesys):
    /// topics leave only once the new ones are live. The change completes even if this
    /// future is dropped.
    /// `requester` (the peer that asked) is named in the audit line.
    pub async fn change(
        self: &Arc<Self>,
        channel: &Arc<ClientChannel>,
        change: Change,
        ignore_errors: bool,
        requester: IpAddr,
    ) -> Result<Vec<TopicAnswer>, ClientError> {
        let (sessions, channel) = (self.clone(), channel.clone());
        let task = self.tasks.spawn(async move {
            sessions
                .apply(&channel, change, ignore_errors, requester)
                .await
        });
        task.await.unwrap_or_else(|_| {
            Err(ClientError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal.server.error",
                "The subscription change failed",
            ))
        })
    }

    async fn apply(
        &self,
        channel: &Arc<ClientChannel>,
        change: Change,
        ignore_errors: bool,
        requester: IpAddr,
    ) -> Result<Vec<TopicAnswer>, ClientError> {
        // One change at a time per channel: each is computed against the last.
        let _one_change = channel.changing.lock().await;
        if self.get(&channel.id).is_none() {
            return Err(ClientError::not_found(format!(
                "Channel {} not found",
                channel.id
            )));
        }
        let current = channel.topics();
        let mut next: BTreeSet<String> = match change {
            Change::Add(new) => current.iter().cloned().chain(new).collect(),
            Change::Replace(new) => new.into_iter().collect(),
            Change::RemoveAll => BTreeSet::new(),
        };
        let added: Vec<String> = next.difference(&current).cloned().collect();
        validate(&next, &added)?;
        let removed: Vec<String> = current.difference(&next).cloned().collect();
        let mut rejected = Vec::new();
        if !added.is_empty() {
            {
                let _serial = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
                let first = self.router.add(channel.session, &channel.outbox, &added);
                if !first.is_empty() {
                    self.upstream.want(&first);
                }
            }
            let outcomes = self
                .upstream
                .wait(&added, Instant::now() + SUBSCRIBE_DEADLINE)
                .await;
            if let Some(error) = self.judge(&outcomes, ignore_errors) {
                self.unsubscribe(channel, &added);
                return Err(error);
            }
            rejected = outcomes
                .into_iter()
                .filter(|(_, o)| *o == TopicOutcome::Rejected)
                .map(|(t, _)| t)
                .collect();
            self.unsubscribe(channel, &rejected);
            next.retain(|t| !rejected.contains(t));
        }
        let added: Vec<&String> = next.difference(&current).collect();
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                target: crate::downstream::AUDIT,
                peer = %requester,
                owner = %channel.peer,
                session = channel.session,
                ?added,
                ?removed,
                "subscriptions changed"
            );
        }
        *channel.topics.lock().unwrap_or_else(|p| p.into_inner()) = next;
        self.unsubscribe(channel, &removed);
        let mut answer = permitted(channel);
        answer.extend(rejected.into_iter().map(|id| TopicAnswer {
            id,
            state: "Rejected",
            rejection_reason: Some("MissingPermissions"),
        }));
        Ok(answer)
    }

    /// The error for the whole request, if any topic failed in a way that fails it.
    fn judge(
        &self,
        outcomes: &[(String, TopicOutcome)],
        ignore_errors: bool,
    ) -> Option<ClientError> {
        let failed =
            |want: &dyn Fn(&TopicOutcome) -> bool| outcomes.iter().filter(|(_, o)| want(o)).count();
        let no_capacity = failed(&|o| *o == TopicOutcome::NoCapacity);
        if no_capacity > 0 {
            return Some(ClientError::new(
                StatusCode::BAD_REQUEST,
                "notification.capacity.exceeded",
                capacity_message(no_capacity, &self.upstream.capacity()),
            ));
        }
        if let Some((topic, TopicOutcome::Refused(refusal))) = outcomes
            .iter()
            .find(|(_, o)| matches!(o, TopicOutcome::Refused(_)))
        {
            let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
            return Some(ClientError::new(
                status,
                refusal.code.clone(),
                format!(
                    "Genesys Cloud refused the subscription change that adds {topic} ({} {})",
                    refusal.status, refusal.code
                ),
            ));
        }
        let rejected: Vec<&str> = outcomes
            .iter()
            .filter(|(_, o)| *o == TopicOutcome::Rejected)
            .map(|(t, _)| t.as_str())
            .collect();
        if !rejected.is_empty() && !ignore_errors {
            return Some(ClientError::new(
                StatusCode::FORBIDDEN,
                "missing.permissions",
                format!("Missing permission to subscribe to topic {}", rejected[0]),
            ));
        }
        if let Some((topic, TopicOutcome::Failed(why))) = outcomes
            .iter()
            .find(|(_, o)| matches!(o, TopicOutcome::Failed(_)))
        {
            return Some(ClientError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service.unavailable",
                format!("Topic {topic} could not be subscribed upstream: {why}"),
            ));
        }
        None
    }

    fn unsubscribe(&self, channel: &ClientChannel, topics: &[String]) {
        if topics.is_empty() {
            return;
        }
        let _serial = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let last = self.router.remove(channel.session, topics);
        self.upstream.release(&last);
    }
}

/// Why `topics` topics found no channel: the channels the proxy may hold are full,
/// and, when others hold channels of the OAuth client, how many.
fn capacity_message(topics: usize, capacity: &Capacity) -> String {
    let serving = capacity.slots.saturating_sub(1);
    let channels = format!(
        "at most {serving} channel(s) of {} topics, one more kept free for handovers",
        capacity.max_topics
    );
    match capacity.foreign.filter(|&n| n > 0) {
        Some(others) => format!(
            "The proxy has no upstream capacity for {topics} more topic(s): other users of its OAuth client \
             hold {others} of the {} channels Genesys Cloud keeps for it, which leaves the proxy {} \
             ({channels}); it creates no channel that would make Genesys evict one of theirs",
            capacity.client_channels, capacity.slots
        ),
        None => {
            format!("The proxy has no upstream capacity for {topics} more topic(s): {channels}")
        }
    }
}

/// The channel's topics, as a subscription answer lists them.
pub fn permitted(channel: &ClientChannel) -> Vec<TopicAnswer> {
    channel
        .topics()
        .into_iter()
        .map(|id| TopicAnswer {
            id,
            state: "Permitted",
            rejection_reason: None,
        })
        .collect()
}

/// Genesys' rules for one channel's subscriptions: at most 1000 topics (combined
/// topics counted expanded), each a well-formed topic name.
fn validate(topics: &BTreeSet<String>, added: &[String]) -> Result<(), ClientError> {
    for name in added {
        topic::check(name)
            .map_err(|error| ClientError::bad_request(format!("Invalid topic: {error}")))?;
    }
    let weight: usize = topics.iter().map(|t| topic::weight(t)).sum();
    if weight > MAX_TOPICS_PER_CLIENT {
        return Err(ClientError::bad_request(format!(
            "A channel may subscribe to at most {MAX_TOPICS_PER_CLIENT} topics ({weight} requested)"
        )));
    }
    Ok(())
}

fn new_channel_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..26)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("handover-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capacity_refusal_names_the_channels_others_hold() {
        let mut capacity = Capacity {
            slots: 3,
            max_topics: 1000,
            foreign: Some(17),
            client_channels: 20,
        };
        let message = capacity_message(2, &capacity);
        assert!(
            message.contains("2 more topic(s)")
                && message.contains("hold 17 of the 20 channels")
                && message.contains("leaves the proxy 3")
                && message.contains("at most 2 channel(s) of 1000 topics"),
            "{message}"
        );
        for foreign in [None, Some(0)] {
            capacity = Capacity {
                slots: 4,
                foreign,
                ..capacity
            };
            let message = capacity_message(1, &capacity);
            assert!(!message.contains("other users"), "{message}");
            assert!(message.contains("at most 3 channel(s)"), "{message}");
        }
    }
}
