//! The appliance's clock: what decides whether a retention lock or a protection has expired,
//! the time a snapshot is committed at, and audit entries' times.
//!
//! Wall-clock time. Only `serve` may shift it, by `COFFER_CLOCK_OFFSET_SECS` read once at start
//! ([`shift_from_env`]): tests start an appliance "later" to see locks expire without waiting.
//! Every other process — the admin CLI working on the catalog directly included — ignores the
//! variable, so no command, admin-socket call or request moves this clock. A shifted appliance
//! says so in its log and in the audit log. Whoever sets the environment `serve` runs in is root
//! on the box and could delete pack files anyway (see `docs/security.md`).

use std::sync::OnceLock;

/// The environment variable `serve` reads to shift its clock (seconds, may be negative).
pub const OFFSET_ENV: &str = "COFFER_CLOCK_OFFSET_SECS";

static OFFSET_US: OnceLock<i64> = OnceLock::new();

/// Reads [`OFFSET_ENV`] (for `serve` only); returns the shift in seconds (0 when unset). Later
/// calls change nothing.
#[must_use]
pub fn shift_from_env() -> i64 {
    let secs = std::env::var(OFFSET_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    *OFFSET_US.get_or_init(|| secs.saturating_mul(1_000_000)) / 1_000_000
}

/// Now, in Unix microseconds.
#[must_use]
pub fn now_us() -> i64 {
    coffer_proto::now_us().saturating_add(OFFSET_US.get().copied().unwrap_or(0))
}
