//! Per-account quotas (issue 12, item 6): an upload that would take an account past its quota
//! of stored bytes is refused with `RESOURCE_EXHAUSTED`, naming the quota and the usage.
//!
//! Usage is the last count's stored bytes (`maintenance::usage`, run at start, after every
//! maintenance run and by `coffer-appliance usage`) plus the bytes the account's uploads sent
//! since that were new to their sessions (never whether they were new to the repository: that
//! would tell whether someone else stored them). Retention and GC never consult it: they run
//! whatever the quotas say.
//!
//! Owns: the quotas in force and the running totals. Must never count by itself (it is told).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::ApplianceError;

#[derive(Debug, Default, Clone, Copy)]
struct Account {
    quota: Option<u64>,
    /// Stored bytes at the last count (`None`: not counted yet).
    counted: Option<u64>,
    /// New stored bytes uploaded since that count, or before it by sessions still live (their
    /// uploads may not be in a snapshot yet: the count could not see them).
    since: u64,
}

/// Quotas and usage of every account.
#[derive(Debug, Default)]
pub struct Quotas {
    accounts: Mutex<HashMap<String, Account>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `n` bytes for people: `512 B`, `1.5 MiB`.
#[allow(clippy::cast_precision_loss)] // a display figure
#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `n` bytes for people, exact figure beside (error messages).
fn human(n: u64) -> String {
    if n < 1024 {
        human_bytes(n)
    } else {
        format!("{} ({n} bytes)", human_bytes(n))
    }
}

impl Quotas {
    /// Sets the quotas in force (from the catalog, at every reload).
    pub fn set_quotas(&self, quotas: impl IntoIterator<Item = (String, Option<u64>)>) {
        let mut a = lock(&self.accounts);
        for v in a.values_mut() {
            v.quota = None;
        }
        for (id, q) in quotas {
            a.entry(id).or_default().quota = q;
        }
    }

    /// Whether any account has a quota (a count is only needed then).
    #[must_use]
    pub fn any(&self) -> bool {
        lock(&self.accounts).values().any(|a| a.quota.is_some())
    }

    /// Refuses an upload of up to `incoming` new bytes that would take `identity` past its
    /// quota.
    ///
    /// # Errors
    /// `ResourceExhausted` naming the quota and the usage.
    pub fn check(&self, identity: &str, incoming: u64) -> Result<(), ApplianceError> {
        let a = lock(&self.accounts)
            .get(identity)
            .copied()
            .unwrap_or_default();
        let Some(quota) = a.quota else {
            return Ok(());
        };
        let used = a.counted.unwrap_or(0) + a.since;
        if used.saturating_add(incoming) > quota {
            return Err(ApplianceError::ResourceExhausted(format!(
                "quota exceeded: {identity} may store {} and stores {} (as of the last count, plus \
                 uploads since); this upload needs up to {} more. Delete snapshots (space returns \
                 after the next maintenance run) or ask the operator to raise the quota",
                human(quota),
                human(used),
                human(incoming)
            )));
        }
        Ok(())
    }

    /// Adds bytes an upload of `identity` stored.
    pub fn uploaded(&self, identity: &str, bytes: u64) {
        if bytes > 0 {
            lock(&self.accounts)
                .entry(identity.to_string())
                .or_default()
                .since += bytes;
        }
    }

    /// Records a finished count: each account's stored bytes (its snapshots), and what its
    /// live sessions uploaded (`live`, read when the count ended), which stays counted on top
    /// until those sessions end — an upload not committed yet is in no snapshot the count saw.
    pub fn counted(&self, stored: &HashMap<String, u64>, live: &HashMap<String, u64>) {
        let mut a = lock(&self.accounts);
        for (id, acc) in a.iter_mut() {
            acc.counted = Some(stored.get(id).copied().unwrap_or(0));
            acc.since = live.get(id).copied().unwrap_or(0);
        }
        for (id, s) in stored {
            let acc = a.entry(id.clone()).or_default();
            acc.counted = Some(*s);
            acc.since = live.get(id).copied().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_quota_and_counts_uploads_during_a_count() {
        let q = Quotas::default();
        q.set_quotas([("a@h".to_string(), Some(1000))]);
        assert!(q.check("b@h", u64::MAX).is_ok(), "no quota, no limit");
        q.check("a@h", 1000).unwrap();
        q.uploaded("a@h", 600);
        let e = q.check("a@h", 500).unwrap_err().to_string();
        assert!(e.contains("1000 B") && e.contains("600 B"), "{e}");
        // A count says 700 are in snapshots; a live session uploaded 100 that no snapshot holds
        // yet: they stay counted.
        q.uploaded("a@h", 100);
        q.counted(
            &HashMap::from([("a@h".to_string(), 700)]),
            &HashMap::from([("a@h".to_string(), 100)]),
        );
        q.check("a@h", 200).unwrap();
        assert!(
            q.check("a@h", 201).is_err(),
            "700 counted + 100 live + 201 > 1000"
        );
        // The session ended; the next count sees its snapshot.
        q.counted(&HashMap::from([("a@h".to_string(), 800)]), &HashMap::new());
        q.check("a@h", 200).unwrap();
        assert!(q.check("a@h", 201).is_err());
        // Lifting the quota lifts the limit.
        q.set_quotas([("a@h".to_string(), None)]);
        assert!(q.check("a@h", u64::MAX).is_ok() && !q.any());
    }
}
