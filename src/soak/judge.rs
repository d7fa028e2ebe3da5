//! The soak's verdict on what the desktops saw, from the logs alone.
//!
//! - Every event published on a topic a desktop held, while it held it, reached it
//!   exactly once, unless it was sent inside a gap that desktop was told of. Events
//!   sent in the last moments before a desktop left (in flight as it hung up) are not
//!   counted; a gap notice covers events sent from [`GAP_SLACK`] before its `from`
//!   (events on their way when the loss began) to its `to`.
//! - No gap opens without an unplanned cause: every gap notice follows an unplanned
//!   upstream fault (revocation, a cut or black-holed socket), or something the
//!   desktop itself did (its socket closed under it, it stopped reading), within
//!   [`CAUSE_WINDOW`] before the gap's `from` and its receipt.
//! - Recovery: for each fault, how long until every desktop that was steadily
//!   subscribed received an event sent after the fault.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use super::desktop::Log;

/// Events sent this long before a gap's `from` may have been on their way when the
/// loss began (the proxy dates a loss from the last frame it saw).
pub const GAP_SLACK: Duration = Duration::from_secs(1);
/// How long before a gap's `from` its cause may lie (a black hole is noticed only
/// after two heartbeats of silence, and the gap dates from the last frame before it).
pub const CAUSE_WINDOW: Duration = Duration::from_secs(5);
/// Events sent this long before a desktop left may still have been in flight.
pub const IN_FLIGHT: Duration = Duration::from_secs(1);
/// How long the proxy may take to notice a loss and tell the clients (a black hole is
/// noticed after two heartbeats of silence, then a channel is rebuilt): a desktop
/// that left sooner after an unplanned fault could not have been told.
pub const NOTICE_DELAY: Duration = Duration::from_secs(5);
/// How long after a fault its recovery is looked for (a desktop that got nothing
/// by then counts as recovering in this long).
pub const HORIZON: Duration = Duration::from_secs(15);

/// One published event.
#[derive(Clone, Debug)]
pub struct Published {
    pub seq: u64,
    pub topic: String,
    pub sent: SystemTime,
}

/// A fault the soak injected.
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: &'static str,
    pub at: SystemTime,
    /// Whether it may lose events upstream (which clients must be told of).
    pub unplanned: bool,
}

/// One desktop's record, as the judge needs it.
pub struct Seen<'a> {
    pub topics: &'a [String],
    pub log: &'a Log,
}

/// The verdict.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub expected: usize,
    pub delivered: usize,
    pub lost: usize,
    pub covered_by_gaps: usize,
    /// Missing for a desktop that left within [`NOTICE_DELAY`] of an unplanned fault,
    /// before the proxy could have told it.
    pub left_before_told: usize,
    pub duplicated: usize,
    /// The longest a duplicated event was sent before the unplanned fault that
    /// followed it (a crash replays from a position refreshed every second).
    pub duplicated_before_fault: Option<Duration>,
    /// Duplicated events that no unplanned fault followed.
    pub duplicated_without_cause: usize,
    pub gaps: usize,
    pub gaps_without_cause: usize,
    pub recoveries: Vec<Duration>,
    /// A few examples of what went wrong, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn holds(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.gaps_without_cause == 0
    }

    pub fn recovery_percentile(&self, p: f64) -> Option<Duration> {
        let mut sorted = self.recoveries.clone();
        sorted.sort();
        let last = sorted.len().checked_sub(1)?;
        Some(sorted[((last as f64) * p).round() as usize])
    }
}

/// Judges `desktops` against `published` and the `faults` injected, for a run that
/// ended at `end`.
pub fn judge(
    published: &[Published],
    desktops: &[Seen<'_>],
    faults: &[Fault],
    end: SystemTime,
) -> Verdict {
    let mut verdict = Verdict::default();
    let by_topic: BTreeMap<&str, Vec<&Published>> =
        published.iter().fold(BTreeMap::new(), |mut map, p| {
            map.entry(p.topic.as_str()).or_insert_with(Vec::new).push(p);
            map
        });
    for (n, desktop) in desktops.iter().enumerate() {
        let log = desktop.log;
        let Some(from) = log.subscribed_at else {
            continue;
        };
        let until = log
            .left_at
            .unwrap_or(end)
            .checked_sub(IN_FLIGHT)
            .unwrap_or(from);
        let mine: HashSet<&str> = desktop.topics.iter().map(String::as_str).collect();
        for topic in &mine {
            for event in by_topic.get(topic).into_iter().flatten() {
                if event.sent < from || event.sent >= until {
                    continue;
                }
                verdict.expected += 1;
                match log.events.get(&(0, event.seq)).map(|r| r.count) {
                    Some(1) => verdict.delivered += 1,
                    Some(count) => {
                        verdict.delivered += 1;
                        verdict.duplicated += (count - 1) as usize;
                        let lead = faults
                            .iter()
                            .filter(|f| f.unplanned)
                            .filter_map(|f| f.at.duration_since(event.sent).ok())
                            .min();
                        match lead {
                            Some(lead) => {
                                verdict.duplicated_before_fault =
                                    verdict.duplicated_before_fault.max(Some(lead));
                            }
                            None => verdict.duplicated_without_cause += 1,
                        }
                        example(
                            &mut verdict,
                            format!(
                                "desktop {n}: event {} on {topic} received {count} times",
                                event.seq
                            ),
                        );
                    }
                    None if covered(log, topic, event.sent) => verdict.covered_by_gaps += 1,
                    None if left_before_told(log, faults, event.sent) => {
                        verdict.left_before_told += 1;
                    }
                    None => {
                        verdict.lost += 1;
                        example(
                            &mut verdict,
                            format!(
                                "desktop {n}: event {} on {topic} sent at {} lost outside any gap notice{}",
                                event.seq,
                                humantime::format_rfc3339_millis(event.sent),
                                log.left_at.map_or(String::new(), |l| format!(
                                    " (it left at {})",
                                    humantime::format_rfc3339_millis(l)
                                ))
                            ),
                        );
                    }
                }
            }
        }
        for gap in &log.gaps {
            verdict.gaps += 1;
            let window_start = gap.from.checked_sub(CAUSE_WINDOW).unwrap_or(gap.from);
            let caused = |at: SystemTime| at >= window_start && at <= gap.received;
            let upstream = faults.iter().any(|f| f.unplanned && caused(f.at));
            let own = log.closes.iter().any(|(_, at)| caused(*at))
                || log.stalls.iter().any(|(at, _)| caused(*at));
            if !upstream && !own {
                verdict.gaps_without_cause += 1;
                example(
                    &mut verdict,
                    format!(
                        "desktop {n}: gap {}..{} on {:?} with no unplanned cause",
                        humantime::format_rfc3339_millis(gap.from),
                        humantime::format_rfc3339_millis(gap.to),
                        gap.topics
                    ),
                );
            }
        }
    }
    verdict.recoveries = recoveries(desktops, faults, end);
    verdict
}

fn example(verdict: &mut Verdict, what: String) {
    if verdict.examples.len() < 10 {
        verdict.examples.push(what);
    }
}

/// Whether the desktop left so soon after an unplanned fault (no earlier than
/// [`CAUSE_WINDOW`] before `sent`) that it could not have been told of the gap.
fn left_before_told(log: &Log, faults: &[Fault], sent: SystemTime) -> bool {
    let Some(left) = log.left_at else {
        return false;
    };
    let earliest = sent.checked_sub(CAUSE_WINDOW).unwrap_or(sent);
    faults.iter().any(|f| {
        f.unplanned
            && f.at >= earliest
            && f.at <= left
            && left.duration_since(f.at).unwrap_or_default() < NOTICE_DELAY
    })
}

/// Whether a gap notice `log` received covers `topic` at `sent`.
fn covered(log: &Log, topic: &str, sent: SystemTime) -> bool {
    log.gaps.iter().any(|gap| {
        gap.topics.iter().any(|t| t == topic)
            && sent >= gap.from.checked_sub(GAP_SLACK).unwrap_or(gap.from)
            && sent <= gap.to
    })
}

/// For each fault, the time until every desktop that was subscribed before it, and
/// neither left nor stalled in the [`HORIZON`] after it, received an event sent
/// after it.
fn recoveries(desktops: &[Seen<'_>], faults: &[Fault], end: SystemTime) -> Vec<Duration> {
    let mut out = Vec::new();
    for fault in faults {
        let horizon = fault.at + HORIZON;
        if horizon > end {
            continue;
        }
        let steady = desktops.iter().filter(|d| {
            let log = d.log;
            log.subscribed_at.is_some_and(|s| s < fault.at)
                && log.left_at.is_none_or(|l| l > horizon)
                && !log
                    .stalls
                    .iter()
                    .any(|(at, _)| *at <= horizon && *at + HORIZON >= fault.at)
        });
        let mut worst = Duration::ZERO;
        for desktop in steady {
            // The first event it received that was sent after the fault.
            let first = desktop
                .log
                .events
                .values()
                .filter(|r| r.sent >= fault.at)
                .map(|r| r.received)
                .min();
            match first {
                Some(received) => {
                    worst = worst.max(received.duration_since(fault.at).unwrap_or_default());
                }
                None => worst = HORIZON,
            }
        }
        out.push(worst);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::desktop::{GapNotice, Receipt};
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + secs)
    }

    fn published(events: &[(u64, &str, u64)]) -> Vec<Published> {
        events
            .iter()
            .map(|(seq, topic, sent)| Published {
                seq: *seq,
                topic: topic.to_string(),
                sent: at(*sent),
            })
            .collect()
    }

    fn log(received: &[(u64, u32)]) -> Log {
        Log {
            subscribed_at: Some(at(0)),
            events: received
                .iter()
                .map(|(seq, count)| {
                    (
                        (0, *seq),
                        Receipt {
                            count: *count,
                            sent: at(*seq),
                            received: at(*seq),
                        },
                    )
                })
                .collect(),
            ..Log::default()
        }
    }

    #[test]
    fn a_missing_event_is_lost_unless_a_gap_notice_covers_it() {
        let events = published(&[
            (1, "v2.a", 1),
            (2, "v2.a", 5),
            (3, "v2.b", 6),
            (4, "v2.a", 20),
        ]);
        let topics = vec!["v2.a".to_string()];
        let mut seen = log(&[(1, 1), (4, 2)]);
        let verdict = judge(
            &events,
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            &[],
            at(60),
        );
        assert_eq!(
            (verdict.expected, verdict.lost, verdict.duplicated),
            (3, 1, 1)
        );
        seen.gaps.push(GapNotice {
            from: at(5),
            to: at(7),
            topics: topics.clone(),
            received: at(8),
        });
        let fault = Fault {
            kind: "cut",
            at: at(4),
            unplanned: true,
        };
        let verdict = judge(
            &events,
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            &[fault],
            at(60),
        );
        assert_eq!(
            (
                verdict.lost,
                verdict.covered_by_gaps,
                verdict.gaps_without_cause
            ),
            (0, 1, 0)
        );
    }

    #[test]
    fn a_gap_after_only_planned_faults_is_a_violation() {
        let topics = vec!["v2.a".to_string()];
        let mut seen = log(&[]);
        seen.gaps.push(GapNotice {
            from: at(10),
            to: at(11),
            topics: topics.clone(),
            received: at(11),
        });
        let planned = Fault {
            kind: "soft rotation",
            at: at(9),
            unplanned: false,
        };
        let verdict = judge(
            &[],
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            &[planned],
            at(60),
        );
        assert_eq!(verdict.gaps_without_cause, 1);
        seen.closes.push((Some(1013), at(9)));
        let verdict = judge(
            &[],
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            &[],
            at(60),
        );
        assert_eq!(verdict.gaps_without_cause, 0, "its own socket closed");
    }

    #[test]
    fn a_desktop_that_left_before_it_could_be_told_is_not_counted_as_lost() {
        let events = published(&[(1, "v2.a", 10)]);
        let topics = vec!["v2.a".to_string()];
        let mut seen = log(&[]);
        seen.left_at = Some(at(13));
        let black_hole = Fault {
            kind: "black hole",
            at: at(10),
            unplanned: true,
        };
        let verdict = judge(
            &events,
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            std::slice::from_ref(&black_hole),
            at(60),
        );
        assert_eq!((verdict.lost, verdict.left_before_told), (0, 1));
        seen.left_at = Some(at(30));
        let verdict = judge(
            &events,
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            &[black_hole],
            at(60),
        );
        assert_eq!(verdict.lost, 1, "it had time to be told");
    }

    #[test]
    fn events_in_flight_when_a_desktop_leaves_are_not_counted() {
        let events = published(&[(1, "v2.a", 10), (2, "v2.a", 30)]);
        let topics = vec!["v2.a".to_string()];
        let mut seen = log(&[(1, 1)]);
        seen.left_at = Some(at(30));
        let verdict = judge(
            &events,
            &[Seen {
                topics: &topics,
                log: &seen,
            }],
            &[],
            at(60),
        );
        assert_eq!((verdict.expected, verdict.lost), (1, 0));
    }
}
