//! What one channel has subscribed upstream, what it should send next, and what to do
//! when Genesys refuses a change as a whole.
//!
//! Genesys' `PUT …/subscriptions` replaces the whole list, and a 4xx refuses all of
//! it. Topics already delivered (live on this channel, or on the channel it takes
//! over from) are never refused on such an answer: only new topics can have caused
//! it. New topics arrive in batches (one per subscription change); when a change
//! carrying several batches is refused, the channel isolates them, sending one batch
//! at a time, so only the batch that Genesys refuses on its own is refused to its
//! requesters. A refusal of a change that adds nothing is retried with back-off, and
//! after a few such refusals the channel asks for a handover: a fresh channel starts
//! from the wanted set.

use std::collections::{BTreeMap, BTreeSet};

use super::state::Batch;

/// Refusals in a row of changes that add nothing, before the channel asks to be
/// replaced.
const BARREN_REFUSALS_BEFORE_RESYNC: u32 = 3;

/// A channel's subscriptions as Genesys holds them.
#[derive(Debug, Default)]
pub struct Subscriptions {
    applied: BTreeSet<String>,
    isolating: bool,
    barren_refusals: u32,
}

/// The next subscription list to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: BTreeSet<String>,
    /// The batches of new topics it adds.
    batches: BTreeMap<Batch, BTreeSet<String>>,
    /// Whether every pending batch is in it.
    complete: bool,
}

/// What to do after a wholesale refusal of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// These new topics caused it: refuse them to their requesters.
    Refuse(BTreeSet<String>),
    /// Several batches were in it: send them one at a time.
    Isolate,
    /// Nothing new was in it: try again after a back-off.
    Retry,
    /// Nothing new was in it, again and again: hand over to a fresh channel.
    Resync,
}

impl Subscriptions {
    pub fn applied(&self) -> &BTreeSet<String> {
        &self.applied
    }

    /// The next list to send for `wanted` (topic → the batch that added it, `None` if
    /// it is delivered already), or `None` if Genesys holds it already.
    pub fn plan(&self, wanted: &BTreeMap<String, Option<Batch>>) -> Option<Plan> {
        let mut target = BTreeSet::new();
        let mut pending: BTreeMap<Batch, BTreeSet<String>> = BTreeMap::new();
        for (topic, batch) in wanted {
            match batch {
                Some(batch) if !self.applied.contains(topic) => {
                    pending.entry(*batch).or_default().insert(topic.clone());
                }
                _ => {
                    target.insert(topic.clone());
                }
            }
        }
        let complete = !self.isolating || pending.len() <= 1;
        let batches: BTreeMap<Batch, BTreeSet<String>> = if complete {
            pending
        } else {
            pending.into_iter().take(1).collect()
        };
        target.extend(batches.values().flatten().cloned());
        (target != self.applied).then_some(Plan {
            target,
            batches,
            complete,
        })
    }

    /// Whether every delivered topic of `wanted` is subscribed here (a successor may
    /// go live then).
    pub fn carries(&self, wanted: &BTreeMap<String, Option<Batch>>) -> bool {
        wanted
            .iter()
            .filter(|(_, batch)| batch.is_none())
            .all(|(topic, _)| self.applied.contains(topic))
    }

    /// Genesys accepted `plan`, rejecting `rejected` one by one (no permission).
    pub fn accepted(&mut self, plan: Plan, rejected: &BTreeSet<String>) {
        self.applied = plan.target.difference(rejected).cloned().collect();
        self.barren_refusals = 0;
        if plan.complete {
            self.isolating = false;
        }
    }

    /// Genesys refused `plan` as a whole.
    pub fn refused(&mut self, plan: &Plan) -> Verdict {
        match plan.batches.len() {
            0 => {
                self.barren_refusals += 1;
                if self.barren_refusals >= BARREN_REFUSALS_BEFORE_RESYNC {
                    self.barren_refusals = 0;
                    Verdict::Resync
                } else {
                    Verdict::Retry
                }
            }
            1 => {
                self.barren_refusals = 0;
                Verdict::Refuse(plan.batches.values().flatten().cloned().collect())
            }
            _ => {
                self.isolating = true;
                Verdict::Isolate
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(items: &[(&str, Option<Batch>)]) -> BTreeMap<String, Option<Batch>> {
        items.iter().map(|(t, b)| (t.to_string(), *b)).collect()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nothing_to_send_when_genesys_holds_the_list() {
        let mut subs = Subscriptions::default();
        let want = wanted(&[("a", Some(1))]);
        let plan = subs.plan(&want).unwrap();
        assert_eq!(plan.target, set(&["a"]));
        subs.accepted(plan, &BTreeSet::new());
        assert_eq!(subs.plan(&want), None);
        assert_eq!(subs.plan(&wanted(&[("a", None)])), None, "now delivered");
        assert!(subs.carries(&wanted(&[("a", None)])));
    }

    #[test]
    fn a_refused_single_batch_is_refused_and_the_rest_kept() {
        let mut subs = Subscriptions::default();
        let first = subs.plan(&wanted(&[("old", Some(1))])).unwrap();
        subs.accepted(first, &BTreeSet::new());
        let plan = subs
            .plan(&wanted(&[("old", None), ("new", Some(2))]))
            .unwrap();
        assert_eq!(subs.refused(&plan), Verdict::Refuse(set(&["new"])));
        assert_eq!(subs.applied(), &set(&["old"]));
    }

    #[test]
    fn several_batches_are_isolated_one_at_a_time() {
        let mut subs = Subscriptions::default();
        let want = wanted(&[("carried", None), ("x", Some(3)), ("y", Some(4))]);
        let plan = subs.plan(&want).unwrap();
        assert_eq!(plan.target, set(&["carried", "x", "y"]));
        assert_eq!(subs.refused(&plan), Verdict::Isolate);
        let plan = subs.plan(&want).unwrap();
        assert_eq!(
            plan.target,
            set(&["carried", "x"]),
            "the oldest batch alone"
        );
        assert_eq!(subs.refused(&plan), Verdict::Refuse(set(&["x"])));
        // The pool drops x; y alone goes next and is accepted: isolation ends.
        let want = wanted(&[("carried", None), ("y", Some(4))]);
        let plan = subs.plan(&want).unwrap();
        assert_eq!(plan.target, set(&["carried", "y"]));
        subs.accepted(plan, &BTreeSet::new());
        let plan = subs
            .plan(&wanted(&[
                ("carried", None),
                ("y", None),
                ("p", Some(5)),
                ("q", Some(6)),
            ]))
            .unwrap();
        assert_eq!(
            plan.target,
            set(&["carried", "y", "p", "q"]),
            "not isolating any more"
        );
    }

    #[test]
    fn refusals_that_add_nothing_retry_then_resync() {
        let mut subs = Subscriptions::default();
        let plan = subs
            .plan(&wanted(&[("a", Some(1)), ("b", Some(1))]))
            .unwrap();
        subs.accepted(plan, &BTreeSet::new());
        let removal = subs.plan(&wanted(&[("a", None)])).unwrap();
        assert_eq!(subs.refused(&removal), Verdict::Retry);
        assert_eq!(subs.refused(&removal), Verdict::Retry);
        assert_eq!(subs.refused(&removal), Verdict::Resync);
        assert_eq!(subs.refused(&removal), Verdict::Retry, "counted afresh");
    }

    #[test]
    fn a_successor_carries_once_the_delivered_topics_are_in() {
        let mut subs = Subscriptions::default();
        let want = wanted(&[("live", None), ("new", Some(9))]);
        assert!(!subs.carries(&want));
        let plan = subs.plan(&want).unwrap();
        assert_eq!(subs.refused(&plan), Verdict::Refuse(set(&["new"])));
        let plan = subs.plan(&wanted(&[("live", None)])).unwrap();
        subs.accepted(plan, &BTreeSet::new());
        assert!(subs.carries(&wanted(&[("live", None)])));
    }
}
