//! The login throttle (S4): failures counted per account, per source and per trusted pair.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

// tokio's clock: real time in production, pausable and advanced by hand in tests (no sleeps).
use tokio::time::Instant;

/// Login attempts counted against one key (an account, a source address, or an account from a
/// source it logged in from before).
#[derive(Debug, Clone, Copy)]
struct Attempts {
    /// Attempts that did not succeed, counted when they start (before hashing).
    count: u32,
    /// The time the latest attempt was allowed to check its password.
    next: Instant,
    last: Instant,
}

/// Failures after which each further attempt waits, doubling from [`BASE_DELAY`].
pub const FREE_FAILURES: u32 = 5;
pub(super) const BASE_DELAY: Duration = Duration::from_millis(250);
pub(super) const MAX_DELAY: Duration = Duration::from_secs(16);
/// An attempt that would have to wait longer than this for its turn is refused at once (without
/// hashing): concurrent attempts never queue up without limit.
pub(super) const MAX_WAIT: Duration = MAX_DELAY;
/// Failures are forgotten this long after the last one.
pub(super) const FAILURE_MEMORY: Duration = Duration::from_mins(15);
/// A source an account logged in from is trusted for it this long after the last success.
pub(super) const TRUSTED_MEMORY: Duration = Duration::from_hours(24 * 30);
/// Most (account, source) pairs remembered as trusted.
pub(super) const TRUSTED_MAX: usize = 100_000;

/// The wait before checking a password after `failures` failed attempts.
#[must_use]
pub fn login_delay(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (BASE_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

/// The login throttle (S4). Every attempt takes a turn *before* its password is hashed: after
/// [`FREE_FAILURES`] failures of a key, turns are spaced by [`login_delay`], so concurrent
/// attempts cannot share one wait; an attempt whose turn is more than [`MAX_WAIT`] away is
/// refused at once. A source address an account logged in from before is counted on its own key
/// for that account, so an attacker elsewhere cannot lock the real user out.
#[derive(Debug, Default)]
pub struct Throttle {
    keys: HashMap<String, Attempts>,
    trusted: HashMap<(String, IpAddr), Instant>,
}

/// The key of a source address: the address itself, or its /64 for IPv6 (one host usually holds
/// a whole /64, so rotating addresses inside it must not reset the count).
fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The keys an attempt is counted on; the first is the account's key.
fn throttle_keys(trusted: bool, identity: &str, source: Option<IpAddr>) -> Vec<String> {
    match source {
        Some(ip) if trusted => vec![format!("id:{identity}/{ip}"), source_key(ip)],
        Some(ip) => vec![format!("id:{identity}"), source_key(ip)],
        None => vec![format!("id:{identity}")],
    }
}

/// Most keys the throttle remembers; past it, keys that slow nobody down are forgotten first,
/// and if that is not enough, attempts are refused until old failures expire.
pub(super) const THROTTLE_KEYS_MAX: usize = 200_000;
/// At most so many events a minute (audit entries of refusals and bursts): the rest are counted,
/// and the count is told with the next event admitted.
#[derive(Debug, Clone, Copy)]
pub struct RateWindow {
    start: Instant,
    used: u32,
    left_out: u64,
}

impl RateWindow {
    #[must_use]
    pub fn new(now: Instant) -> Self {
        Self {
            start: now,
            used: 0,
            left_out: 0,
        }
    }

    /// Whether one more event is admitted at `now` (`per_minute` at most), and how many were
    /// left out before it.
    pub fn admit(&mut self, now: Instant, per_minute: u32) -> Option<u64> {
        if !self.current(now) {
            self.start = now;
            self.used = 0;
        }
        if self.used >= per_minute {
            self.left_out += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.left_out))
    }

    /// Whether the window that began at its start is still running at `now`.
    #[must_use]
    pub fn current(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.start) < Duration::from_mins(1)
    }
}

/// Attempts waiting for a hashing slot at most; more are refused at once.
pub(super) const HASH_QUEUE_MAX: usize = 64;

impl Throttle {
    /// Takes a turn for an attempt at `now`: returns when it may check its password, or how long
    /// until it could try again when the queue is full.
    ///
    /// # Errors
    /// The wait that was refused.
    pub fn reserve(
        &mut self,
        identity: &str,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<(Instant, Vec<String>), Duration> {
        self.keys
            .retain(|_, a| now.saturating_duration_since(a.last) < FAILURE_MEMORY);
        if self.keys.len() >= THROTTLE_KEYS_MAX {
            self.keys.retain(|_, a| a.count >= FREE_FAILURES);
            if self.keys.len() >= THROTTLE_KEYS_MAX {
                return Err(MAX_WAIT);
            }
        }
        let trusted = source.is_some_and(|ip| {
            self.trusted
                .get(&(identity.to_string(), ip))
                .is_some_and(|t| now.saturating_duration_since(*t) < TRUSTED_MEMORY)
        });
        let keys = throttle_keys(trusted, identity, source);
        let slot = keys
            .iter()
            .filter_map(|k| self.keys.get(k))
            .map(|a| {
                let d = login_delay(a.count);
                if d.is_zero() {
                    now
                } else {
                    (now + d).max(a.next + d)
                }
            })
            .max()
            .unwrap_or(now);
        if slot.saturating_duration_since(now) > MAX_WAIT {
            return Err(slot.saturating_duration_since(now));
        }
        for k in &keys {
            let a = self.keys.entry(k.clone()).or_insert(Attempts {
                count: 0,
                next: now,
                last: now,
            });
            a.count = a.count.saturating_add(1);
            a.next = a.next.max(slot);
            a.last = now;
        }
        Ok((slot, keys))
    }

    /// Attempts counted on `key` that have not succeeded (0 when forgotten).
    #[must_use]
    pub fn failures(&self, key: &str) -> u32 {
        self.keys.get(key).map_or(0, |a| a.count)
    }

    /// The attempt counted on `keys` succeeded: the account's key is cleared, the source's count
    /// gives back this attempt, and the source becomes trusted for the account.
    pub fn succeeded(
        &mut self,
        identity: &str,
        source: Option<IpAddr>,
        keys: &[String],
        now: Instant,
    ) {
        if let Some(k) = keys.first() {
            self.keys.remove(k);
        }
        for k in keys.iter().skip(1) {
            if let Some(a) = self.keys.get_mut(k) {
                a.count = a.count.saturating_sub(1);
            }
        }
        if let Some(ip) = source {
            if self.trusted.len() >= TRUSTED_MAX {
                self.trusted
                    .retain(|_, t| now.saturating_duration_since(*t) < TRUSTED_MEMORY);
            }
            if self.trusted.len() < TRUSTED_MAX {
                self.trusted.insert((identity.to_string(), ip), now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_five_failures() {
        for n in 0..FREE_FAILURES {
            assert_eq!(login_delay(n), Duration::ZERO);
        }
        assert_eq!(login_delay(5), Duration::from_millis(250));
        assert_eq!(login_delay(6), Duration::from_millis(500));
        assert!(login_delay(7) > login_delay(6));
        assert_eq!(login_delay(100), MAX_DELAY);
    }
}
