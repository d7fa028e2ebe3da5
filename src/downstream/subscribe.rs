//! Every subscription change from a client, REST or in-band, passes here: the
//! caller's allowance of calls, the topic policy (`[topics]`), the owner's topic
//! limits, then `Sessions::change` (which writes the audit line of what changed).
//!
//! A denied topic is refused in Genesys' shape: the whole request with 403
//! `missing.permissions`, or with `ignoreErrors=true` that topic alone, answered
//! `"state":"Rejected"`. Nothing denied goes upstream.
//!
//! Limits are charged to the channel's owner (the peer that created it): the topics
//! a change may bring are reserved while it runs (`Peers::reserve_topics`), so
//! that two concurrent changes cannot both pass against the same count, without
//! making one wait for the other. The change runs as a task of its own, as
//! `Sessions::change` does: a client that goes away mid-change strands nothing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::StatusCode;
use tokio_util::task::TaskTracker;

use super::error::ClientError;
use super::peers::Peers;
use super::sessions::{Change, ClientChannel, Sessions, TopicAnswer};
use crate::config::Config;
use crate::front::topics::Policy;
use crate::topic;

pub struct Subscriptions {
    pub sessions: Arc<Sessions>,
    pub peers: Arc<Peers>,
    pub config: Arc<ArcSwap<Config>>,
    pub tasks: TaskTracker,
}

impl Subscriptions {
    /// Applies `change` to `channel` for `requester` (see the module's doc).
    pub async fn change(
        self: &Arc<Self>,
        requester: IpAddr,
        channel: &Arc<ClientChannel>,
        change: Change,
        ignore_errors: bool,
    ) -> Result<Vec<TopicAnswer>, ClientError> {
        let config = self.config.load_full();
        self.peers.charge_call(requester, &config.limits)?;
        let (change, denied) = without_denied(change, &config.topics);
        if let Some(first) = denied.first()
            && !ignore_errors
        {
            return Err(ClientError::new(
                StatusCode::FORBIDDEN,
                "missing.permissions",
                format!("Topic {first} is not allowed by this proxy's topic policy"),
            ));
        }
        let (this, owned) = (self.clone(), channel.clone());
        let task = self.tasks.spawn(async move {
            this.apply(requester, &owned, change, ignore_errors, &config)
                .await
        });
        let mut answer = task.await.unwrap_or_else(|_| {
            Err(ClientError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal.server.error",
                "The subscription change failed",
            ))
        })?;
        answer.extend(denied.into_iter().map(|id| TopicAnswer {
            id,
            state: "Rejected",
            rejection_reason: Some("MissingPermissions"),
        }));
        Ok(answer)
    }

    async fn apply(
        &self,
        requester: IpAddr,
        channel: &Arc<ClientChannel>,
        change: Change,
        ignore_errors: bool,
        config: &Config,
    ) -> Result<Vec<TopicAnswer>, ClientError> {
        // Held until the change is done, so that concurrent changes of the owner's
        // channels are judged against each other's outcome.
        let _reserved = if config.limits.exempts(channel.peer) {
            None
        } else {
            let next: BTreeSet<String> = match &change {
                Change::Add(new) => channel
                    .topics()
                    .into_iter()
                    .chain(new.iter().cloned())
                    .collect(),
                Change::Replace(new) => new.iter().cloned().collect(),
                Change::RemoveAll => BTreeSet::new(),
            };
            let upstream = &config.upstream;
            let budget = upstream
                .max_channels
                .saturating_sub(1)
                .saturating_mul(upstream.max_topics_per_channel);
            Some(self.peers.reserve_topics(
                channel,
                next,
                &self.sessions,
                &config.limits,
                budget,
            )?)
        };
        self.sessions
            .change(channel, change, ignore_errors, requester)
            .await
    }
}

/// The change without the topics `policy` denies, and those. Names that are not
/// topics at all are left in, for `Sessions` to refuse as such (400).
fn without_denied(change: Change, policy: &Policy) -> (Change, Vec<String>) {
    let split = |topics: Vec<String>| -> (Vec<String>, Vec<String>) {
        topics
            .into_iter()
            .partition(|t| topic::check(t).is_err() || policy.admits(t))
    };
    match change {
        Change::Add(topics) => {
            let (admitted, denied) = split(topics);
            (Change::Add(admitted), denied)
        }
        Change::Replace(topics) => {
            let (admitted, denied) = split(topics);
            (Change::Replace(admitted), denied)
        }
        Change::RemoveAll => (Change::RemoveAll, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::topics::Pattern;

    #[test]
    fn denied_topics_are_taken_out_of_a_change() {
        let policy = Policy {
            allow: Some(vec![Pattern::parse("v2.users.*.presence").unwrap()]),
            deny: Vec::new(),
        };
        let (change, denied) = without_denied(
            Change::Replace(vec![
                "v2.users.1.presence".into(),
                "v2.users.1.conversations".into(),
                "not a topic".into(),
            ]),
            &policy,
        );
        assert_eq!(denied, ["v2.users.1.conversations"]);
        let Change::Replace(kept) = change else {
            panic!("still a replace")
        };
        assert_eq!(kept, ["v2.users.1.presence", "not a topic"]);
    }
}
