//! Retention: which snapshots of one path a policy keeps.
//!
//! The rules are restic's and Kopia's `keep-*` rules, applied to the snapshots of one identity
//! and path, newest first:
//!
//! * `keep-last N`: the N newest;
//! * `keep-hourly|daily|weekly|monthly|yearly N`: the newest snapshot of each of the N most
//!   recent hours (days, ISO weeks, months, years) that have a snapshot, in UTC;
//! * `keep-within D`: every snapshot taken less than D before `now` (the injected clock).
//!
//! A snapshot is kept when any rule keeps it (the reasons are reported). Two safety rules hold
//! whatever the policy says:
//!
//! * R1: a policy that sets no rule keeps everything (an empty policy never deletes);
//! * R2: the newest snapshot is always kept, and so is the newest complete one (a policy never
//!   removes the latest backup);
//! * R3: partial snapshots never fill `keep-last` or a calendar bucket.
//!
//! This module decides; it never deletes (the maintenance run does, through the catalog).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How many snapshots of one path to keep. `None`: the rule is not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Microseconds.
    pub keep_within_us: Option<i64>,
}

impl Retention {
    /// Whether no rule is set (R1: then everything is kept).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Reason {
    /// R1: the policy sets no rule.
    NoRule,
    /// R2: the newest snapshot.
    Newest,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    Within,
}

/// What retention decided for one snapshot; `reasons` empty means forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index of the snapshot in the slice given to [`decide`].
    pub index: usize,
    pub reasons: Vec<Reason>,
}

impl Decision {
    #[must_use]
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// The calendar bucket of a time for each bucketed rule (UTC).
fn bucket(reason: Reason, time_us: i64) -> i64 {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_us) * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    match reason {
        Reason::Hourly => time_us.div_euclid(3_600_000_000),
        Reason::Daily => time_us.div_euclid(86_400_000_000),
        Reason::Weekly => {
            let (year, week, _) = t.to_iso_week_date();
            i64::from(year) * 100 + i64::from(week)
        }
        Reason::Monthly => i64::from(t.year()) * 100 + i64::from(u8::from(t.month())),
        Reason::Yearly => i64::from(t.year()),
        _ => unreachable!("only calendar rules have buckets"),
    }
}

/// Decides, for complete snapshots taken at `times_us` (one identity and path, any order),
/// which the policy keeps, at time `now_us`. One decision per snapshot, in the order given.
#[must_use]
pub fn decide(times_us: &[i64], policy: &Retention, now_us: i64) -> Vec<Decision> {
    decide_with_partial(times_us, &vec![true; times_us.len()], policy, now_us)
}

/// [`decide`] where `complete[i]` says whether snapshot `i` is complete. Only complete
/// snapshots fill `keep-last` and the calendar buckets (R3: a partial snapshot never takes a
/// complete one's place); R2 keeps the newest complete snapshot and, when newer still, the
/// newest partial one; `keep-within` keeps either kind.
///
/// # Panics
/// When `complete` and `times_us` differ in length.
#[must_use]
pub fn decide_with_partial(
    times_us: &[i64],
    complete: &[bool],
    policy: &Retention,
    now_us: i64,
) -> Vec<Decision> {
    assert_eq!(times_us.len(), complete.len(), "one flag per snapshot");
    let mut out: Vec<Decision> = (0..times_us.len())
        .map(|index| Decision {
            index,
            reasons: Vec::new(),
        })
        .collect();
    // Newest first; equal times keep their given order.
    let mut order: Vec<usize> = (0..times_us.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(times_us[i]));
    if policy.is_empty() {
        for d in &mut out {
            d.reasons.push(Reason::NoRule);
        }
        return out;
    }
    if let Some(&newest) = order.first() {
        out[newest].reasons.push(Reason::Newest);
    }
    let all = order.clone();
    order.retain(|&i| complete[i]);
    if let Some(&newest) = order.first() {
        if !out[newest].reasons.contains(&Reason::Newest) {
            out[newest].reasons.push(Reason::Newest);
        }
    }
    if let Some(n) = policy.keep_last {
        for &i in order.iter().take(n as usize) {
            out[i].reasons.push(Reason::Last);
        }
    }
    for (reason, count) in [
        (Reason::Hourly, policy.keep_hourly),
        (Reason::Daily, policy.keep_daily),
        (Reason::Weekly, policy.keep_weekly),
        (Reason::Monthly, policy.keep_monthly),
        (Reason::Yearly, policy.keep_yearly),
    ] {
        let Some(mut left) = count else { continue };
        let mut last = None;
        for &i in &order {
            if left == 0 {
                break;
            }
            let b = bucket(reason, times_us[i]);
            if last != Some(b) {
                // The newest snapshot of a bucket not seen yet.
                out[i].reasons.push(reason);
                last = Some(b);
                left -= 1;
            }
        }
    }
    if let Some(d) = policy.keep_within_us {
        for &i in &all {
            if times_us[i] > now_us.saturating_sub(d) {
                out[i].reasons.push(Reason::Within);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3_600_000_000;
    const DAY: i64 = 24 * HOUR;

    fn kept(times: &[i64], p: &Retention, now: i64) -> Vec<i64> {
        let mut k: Vec<i64> = decide(times, p, now)
            .iter()
            .filter(|d| d.keep())
            .map(|d| times[d.index])
            .collect();
        k.sort_unstable();
        k
    }

    /// 2026-01-05 00:00 UTC, a Monday.
    const MONDAY: i64 = 1_767_571_200_000_000;

    #[test]
    fn daily_keeps_the_newest_of_each_recent_day() {
        // Two snapshots a day for ten days, at 02:00 and 14:00.
        let times: Vec<i64> = (0..10)
            .flat_map(|d| [MONDAY + d * DAY + 2 * HOUR, MONDAY + d * DAY + 14 * HOUR])
            .collect();
        let p = Retention {
            keep_daily: Some(3),
            ..Retention::default()
        };
        let now = MONDAY + 10 * DAY;
        assert_eq!(
            kept(&times, &p, now),
            vec![
                MONDAY + 7 * DAY + 14 * HOUR,
                MONDAY + 8 * DAY + 14 * HOUR,
                MONDAY + 9 * DAY + 14 * HOUR
            ]
        );
    }

    #[test]
    fn rules_combine_and_name_their_reasons() {
        let times: Vec<i64> = (0..30).map(|d| MONDAY + d * DAY).collect();
        let p = Retention {
            keep_last: Some(2),
            keep_weekly: Some(2),
            keep_within_us: Some(4 * DAY),
            ..Retention::default()
        };
        let now = MONDAY + 29 * DAY + HOUR;
        let d = decide(&times, &p, now);
        let newest = &d[29].reasons;
        assert_eq!(
            newest,
            &vec![Reason::Newest, Reason::Last, Reason::Weekly, Reason::Within]
        );
        // Weeks start on Monday: day 29 is a Tuesday, so the week before ends on day 27 (Sunday).
        assert_eq!(d[27].reasons, vec![Reason::Weekly, Reason::Within]);
        assert_eq!(d[26].reasons, vec![Reason::Within]);
        assert!(d[25].reasons.is_empty());
        // Days 26 to 29: last (28, 29), weekly (27, 29), within (26 to 29).
        assert_eq!(kept(&times, &p, now).len(), 4);
    }

    #[test]
    fn months_and_years_follow_the_calendar() {
        // 2025-12-31 23:00 and 2026-01-01 01:00 UTC: two months, two years.
        let times = [MONDAY - 4 * DAY - HOUR, MONDAY - 4 * DAY + HOUR];
        for p in [
            Retention {
                keep_monthly: Some(2),
                ..Retention::default()
            },
            Retention {
                keep_yearly: Some(2),
                ..Retention::default()
            },
        ] {
            assert_eq!(kept(&times, &p, MONDAY).len(), 2, "{p:?}");
        }
        let one = Retention {
            keep_monthly: Some(1),
            ..Retention::default()
        };
        assert_eq!(kept(&times, &one, MONDAY), vec![times[1]]);
    }

    #[test]
    fn partial_snapshots_never_take_a_complete_ones_place() {
        // Each day: a complete backup at 02:00, a partial one at 14:00.
        let times: Vec<i64> = (0..5)
            .flat_map(|d| [MONDAY + d * DAY + 2 * HOUR, MONDAY + d * DAY + 14 * HOUR])
            .collect();
        let complete: Vec<bool> = (0..10).map(|i| i % 2 == 0).collect();
        let p = Retention {
            keep_daily: Some(2),
            ..Retention::default()
        };
        let d = decide_with_partial(&times, &complete, &p, MONDAY + 5 * DAY);
        let kept: Vec<usize> = d.iter().filter(|x| x.keep()).map(|x| x.index).collect();
        // The complete ones of days 3 and 4, and the newest (a partial one).
        assert_eq!(kept, vec![6, 8, 9]);
        assert_eq!(d[9].reasons, vec![Reason::Newest]);
        assert_eq!(d[8].reasons, vec![Reason::Newest, Reason::Daily]);
    }

    #[test]
    fn an_empty_policy_keeps_everything() {
        let times = [1, 2, 3];
        assert_eq!(kept(&times, &Retention::default(), 10), vec![1, 2, 3]);
        assert!(decide(&[], &Retention::default(), 0).is_empty());
    }

    proptest! {
        /// R2 and monotony: the newest is always kept, and raising any count of a policy that
        /// sets some rule never forgets a snapshot that was kept.
        #[test]
        fn newest_kept_and_more_keeps_more(
            times in proptest::collection::vec(0i64..400 * DAY, 1..60),
            counts in proptest::collection::vec(proptest::option::of(0u32..5), 6),
            within in proptest::option::of(0i64..30 * DAY),
            which in 0usize..6,
        ) {
            let p = Retention {
                keep_last: counts[0],
                keep_hourly: counts[1],
                keep_daily: counts[2],
                keep_weekly: counts[3],
                keep_monthly: counts[4],
                keep_yearly: counts[5],
                keep_within_us: within,
            };
            let now = 400 * DAY;
            let d = decide(&times, &p, now);
            let newest = times.iter().copied().max().unwrap();
            prop_assert!(d.iter().any(|x| x.keep() && times[x.index] == newest));
            prop_assume!(!p.is_empty());
            let mut more = p;
            let slot = [
                &mut more.keep_last,
                &mut more.keep_hourly,
                &mut more.keep_daily,
                &mut more.keep_weekly,
                &mut more.keep_monthly,
                &mut more.keep_yearly,
            ];
            let s = slot.into_iter().nth(which).unwrap();
            *s = Some(s.unwrap_or(0) + 1);
            let d2 = decide(&times, &more, now);
            for (a, b) in d.iter().zip(&d2) {
                prop_assert!(!a.keep() || b.keep(), "raising a count forgot a snapshot");
            }
        }
    }
}
