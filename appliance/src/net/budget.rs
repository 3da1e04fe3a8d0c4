//! Read admission: chunk bytes read from packs and not yet handed to the network are bounded
//! per account and appliance-wide, and admitted *before* they are read (the index says how big
//! each record is).
//!
//! A request waits while the budget it needs makes progress (someone's piece is taken and its
//! budget released): a slow but reading client is slow, never refused. It is refused
//! (`RESOURCE_EXHAUSTED`, naming the budget) only after [`ADMISSION_WAIT`] in which nothing was
//! released. One account holds at most [`ACCOUNT_READ_UNITS`] of the shared budget however many
//! sessions and streams it opens.
//!
//! Known limit (issue 14, rest): a stream whose client stops reading keeps what it was admitted
//! (at most two pieces) until its connection closes; there is no deadline on holders yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApplianceError;

/// Budget unit: KiB (a `u32` of permits then covers 4 TiB).
const UNIT: u64 = 1024;
/// What one account may have read and not yet sent: 256 MiB.
pub const ACCOUNT_READ_UNITS: usize = 256 << 10;
/// How long a read waits for admission without any budget being released before it is refused.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(30);
/// Accounts whose budgets are remembered at most (idle ones are forgotten first).
const ACCOUNTS_MAX: usize = 100_000;

/// The appliance-wide read budget and each account's share.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    all: Arc<Semaphore>,
    units: u32,
    accounts: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    /// Releases so far: a waiter that sees this move keeps waiting.
    released: Arc<AtomicU64>,
}

/// Budget held for one piece of an answer: released when the piece's messages are handed on.
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

impl ReadBudget {
    /// A budget of `bytes` (at least one account's share).
    #[must_use]
    pub fn new(bytes: u64) -> Self {
        let units =
            u32::try_from((bytes / UNIT).max(ACCOUNT_READ_UNITS as u64)).unwrap_or(u32::MAX);
        Self {
            all: Arc::new(Semaphore::new(units as usize)),
            units,
            accounts: Arc::new(Mutex::new(HashMap::new())),
            released: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The default: an eighth of the machine's memory, between 256 MiB and 4 GiB.
    #[must_use]
    pub fn for_memory(memory_bytes: u64) -> Self {
        Self::new((memory_bytes / 8).clamp(256 << 20, 4 << 30))
    }

    fn account(&self, identity: &str) -> Arc<Semaphore> {
        let mut accounts = self
            .accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if accounts.len() >= ACCOUNTS_MAX && !accounts.contains_key(identity) {
            accounts.retain(|_, s| s.available_permits() < ACCOUNT_READ_UNITS);
        }
        accounts
            .entry(identity.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(ACCOUNT_READ_UNITS)))
            .clone()
    }

    /// Waits for `units` of `sem` while releases keep happening; refuses after
    /// [`ADMISSION_WAIT`] without one.
    async fn wait(
        &self,
        sem: &Arc<Semaphore>,
        units: u32,
        whose: &str,
        limit_units: u64,
    ) -> Result<OwnedSemaphorePermit, ApplianceError> {
        loop {
            let seen = self.released.load(Ordering::Relaxed);
            match tokio::time::timeout(ADMISSION_WAIT, sem.clone().acquire_many_owned(units)).await
            {
                Ok(Ok(p)) => return Ok(p),
                Err(_) if self.released.load(Ordering::Relaxed) != seen => {}
                _ => {
                    return Err(ApplianceError::ResourceExhausted(format!(
                        "{whose} read budget ({} MiB of chunk data read and not yet sent) was \
                         held without progress for {} s; read the answers already sent, or try \
                         again later",
                        (limit_units * UNIT) >> 20,
                        ADMISSION_WAIT.as_secs()
                    )))
                }
            }
        }
    }

    /// Admits reading `bytes` for `identity`: its account's share first, then the shared
    /// budget.
    ///
    /// # Errors
    /// [`ApplianceError::ResourceExhausted`] when not admitted (see the module).
    pub async fn admit(&self, identity: &str, bytes: u64) -> Result<Admitted, ApplianceError> {
        let want = bytes.div_ceil(UNIT).max(1);
        let mine = u32::try_from(want.min(ACCOUNT_READ_UNITS as u64)).unwrap_or(u32::MAX);
        let all = u32::try_from(want.min(u64::from(self.units))).unwrap_or(u32::MAX);
        let account = self
            .wait(
                &self.account(identity),
                mine,
                "this account's",
                ACCOUNT_READ_UNITS as u64,
            )
            .await?;
        let all = self
            .wait(&self.all, all, "the appliance's", u64::from(self.units))
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

    #[tokio::test(start_paused = true)]
    async fn a_stalled_account_is_refused_and_others_read() {
        let budget = ReadBudget::new(1 << 30);
        let held = budget.admit("hog@x", 256 << 20).await.unwrap();
        // The hog's next read waits, then is refused (nothing released); the shared budget is
        // not all taken, and another account reads.
        let e = budget.admit("hog@x", 1 << 20).await.unwrap_err();
        assert!(matches!(e, ApplianceError::ResourceExhausted(m) if m.contains("this account")));
        budget.admit("alice@y", 64 << 20).await.unwrap();
        drop(held);
        budget.admit("hog@x", 1 << 20).await.unwrap();
        // A request larger than the whole budget is admitted for the budget, not refused.
        ReadBudget::new(0).admit("big@z", 10 << 30).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_sees_progress_keeps_waiting() {
        let budget = ReadBudget::new(1 << 30);
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
