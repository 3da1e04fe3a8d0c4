//! The appliance's clock: what decides whether a retention lock or a protection has expired,
//! the time a snapshot is committed at, and audit entries' times.
//!
//! Wall-clock time, shifted by `COFFER_CLOCK_OFFSET_SECS` (read once, at first use) when that is
//! set: tests start an appliance "later" to see locks expire without waiting. It is not a way
//! around a lock: whoever sets the appliance's environment is root on it, and root can delete
//! pack files anyway (see `docs/security.md`). No request, admin-socket call or CLI flag moves
//! this clock.

use std::sync::OnceLock;

/// The environment variable that shifts the clock (seconds, may be negative).
pub const OFFSET_ENV: &str = "COFFER_CLOCK_OFFSET_SECS";

fn offset_us() -> i64 {
    static OFFSET: OnceLock<i64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var(OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |s| s.saturating_mul(1_000_000))
    })
}

/// Now, in Unix microseconds.
#[must_use]
pub fn now_us() -> i64 {
    coffer_proto::now_us().saturating_add(offset_us())
}
