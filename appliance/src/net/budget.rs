//! Byte budgets, per account and appliance-wide, admitted *before* the bytes are held:
//! chunk bytes read from packs and not yet sent (`GetChunks`: the index says how big each
//! record is), and upload bytes received and not yet stored (`PutChunks`: a stream is not read
//! further until its last message is admitted).
//!
//! A request waits while the budget it needs makes progress (someone's bytes are released): a
//! slow but working client is slow, never refused. It is refused (`RESOURCE_EXHAUSTED`, naming
//! the budget) only after the admission wait (`serve --admission-wait`) in which nothing was
//! released. One account holds at most its share of the shared budget however many sessions and
//! streams it opens.
//!
//! Known limit: a `GetChunks` stream whose client stops reading keeps what it was admitted (at
//! most two pieces) until its connection closes (`serve --idle-timeout` does not apply while a
//! call is open); the account's share bounds it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApplianceError;

/// Budget unit: KiB (a `u32` of permits then covers 4 TiB).
const UNIT: u64 = 1024;
/// Accounts whose budgets are remembered at most (idle ones are forgotten first).
const ACCOUNTS_MAX: usize = 100_000;

/// An appliance-wide byte budget and each account's share of it.
#[derive(Debug, Clone)]
pub struct Budget {
    /// What the budget counts, for messages ("read": chunk data read and not yet sent).
    what: &'static str,
    all: Arc<Semaphore>,
    units: u32,
    account_units: u32,
    wait: Duration,
    accounts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    /// Releases so far: a waiter that sees this move keeps waiting.
    released: Arc<AtomicU64>,
}

/// Bytes admitted: released when dropped.
#[derive(Debug)]
pub struct Admitted {
    _account: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
    released: Arc<AtomicU64>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }
}

fn units_of(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX)
}

impl Budget {
    /// A budget of `all` bytes of which one account holds at most `account` (the whole is at
    /// least one account's share); a request waits at most `wait` without progress.
    #[must_use]
    pub fn new(what: &'static str, all: u64, account: u64, wait: Duration) -> Self {
        let account_units = units_of(account);
        let units = units_of(all).max(account_units);
        Self {
            what,
            all: Arc::new(Semaphore::new(units as usize)),
            units,
            account_units,
            wait,
            accounts: Arc::new(Mutex::new(HashMap::new())),
            released: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes admitted and not yet released (to the budget's 1 KiB unit).
    #[must_use]
    pub fn in_use_bytes(&self) -> u64 {
        let free = u32::try_from(self.all.available_permits()).unwrap_or(u32::MAX);
        u64::from(self.units.saturating_sub(free)) * UNIT
    }

    fn account(&self, identity: &str) -> Arc<Semaphore> {
        let mut accounts = self
            .accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let full = self.account_units as usize;
        if accounts.len() >= ACCOUNTS_MAX && !accounts.contains_key(identity) {
            accounts.retain(|_, s| s.available_permits() < full);
        }
        accounts
            .entry(identity.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(full)))
            .clone()
    }

    /// Waits for `units` of `sem` while releases keep happening; refuses after the admission
    /// wait without one.
    async fn wait(
        &self,
        sem: &Arc<Semaphore>,
        units: u32,
        whose: &str,
        limit_units: u32,
    ) -> Result<OwnedSemaphorePermit, ApplianceError> {
        loop {
            let seen = self.released.load(Ordering::Relaxed);
            match tokio::time::timeout(self.wait, sem.clone().acquire_many_owned(units)).await {
                Ok(Ok(p)) => return Ok(p),
                Err(_) if self.released.load(Ordering::Relaxed) != seen => {}
                _ => {
                    return Err(ApplianceError::ResourceExhausted(format!(
                        "{whose} {} budget ({} MiB) was held without progress for {} s; {}",
                        self.what,
                        (u64::from(limit_units) * UNIT) >> 20,
                        self.wait.as_secs(),
                        if self.what == "read" {
                            "read the answers already sent, or try again later"
                        } else {
                            "wait for the answers to the uploads already sent, or try again later"
                        }
                    )))
                }
            }
        }
    }

    /// Admits `bytes` for `identity`: its account's share first, then the shared budget. A
    /// request larger than a budget is admitted for the whole budget.
    ///
    /// # Errors
    /// [`ApplianceError::ResourceExhausted`] when not admitted (see the module).
    pub async fn admit(&self, identity: &str, bytes: u64) -> Result<Admitted, ApplianceError> {
        let want = units_of(bytes);
        let account = self
            .wait(
                &self.account(identity),
                want.min(self.account_units),
                "this account's",
                self.account_units,
            )
            .await?;
        let all = self
            .wait(
                &self.all,
                want.min(self.units),
                "the appliance's",
                self.units,
            )
            .await?;
        Ok(Admitted {
            _account: account,
            _all: all,
            released: self.released.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(all: u64) -> Budget {
        Budget::new("read", all, 256 << 20, Duration::from_secs(30))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_account_is_refused_and_others_read() {
        let budget = read(1 << 30);
        let held = budget.admit("hog@x", 256 << 20).await.unwrap();
        // The hog's next read waits, then is refused (nothing released); the shared budget is
        // not all taken, and another account reads.
        let e = budget.admit("hog@x", 1 << 20).await.unwrap_err();
        assert!(matches!(e, ApplianceError::ResourceExhausted(m) if m.contains("this account")));
        budget.admit("alice@y", 64 << 20).await.unwrap();
        drop(held);
        budget.admit("hog@x", 1 << 20).await.unwrap();
        // A request larger than the whole budget is admitted for the budget, not refused.
        read(0).admit("big@z", 10 << 30).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_sees_progress_keeps_waiting() {
        let budget = read(1 << 30);
        let mut held = vec![budget.admit("reader@x", 200 << 20).await.unwrap()];
        let waiter = {
            let b = budget.clone();
            tokio::spawn(async move { b.admit("reader@x", 100 << 20).await })
        };
        // Every 20 s some other piece of the budget is released and taken again: progress, but
        // not enough for the waiter until the big piece goes, after 80 s.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            drop(budget.admit("other@y", 1 << 20).await.unwrap());
        }
        held.clear();
        assert!(
            waiter.await.unwrap().is_ok(),
            "a reading client is slow, not refused"
        );
    }
}
