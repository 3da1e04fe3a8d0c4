//! Read admission: chunk bytes read from packs and not yet handed to the network are bounded
//! per session and appliance-wide, and admitted *before* they are read (the index says how big
//! each record is). A reader that does not drain its stream holds its budget, never more; a
//! request that cannot be admitted within [`ADMISSION_WAIT`] is answered `RESOURCE_EXHAUSTED`
//! naming the budget, and other sessions keep reading (S6).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApplianceError;

/// Budget unit: KiB (a `u32` of permits then covers 4 TiB).
const UNIT: u64 = 1024;
/// What one session may have read and not yet sent: 256 MiB.
pub const SESSION_READ_UNITS: usize = 256 << 10;
/// How long a read waits for admission before it is refused.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(30);

/// The appliance-wide read budget.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    all: Arc<Semaphore>,
    units: u32,
}

/// Budget held for one piece of an answer: released when the piece's messages are handed on.
#[derive(Debug)]
pub struct Admitted {
    _session: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

impl ReadBudget {
    /// A budget of `bytes` (at least one session's worth).
    #[must_use]
    pub fn new(bytes: u64) -> Self {
        let units =
            u32::try_from((bytes / UNIT).max(SESSION_READ_UNITS as u64)).unwrap_or(u32::MAX);
        Self {
            all: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// The default: an eighth of the machine's memory, between 256 MiB and 4 GiB.
    #[must_use]
    pub fn for_memory(memory_bytes: u64) -> Self {
        Self::new((memory_bytes / 8).clamp(256 << 20, 4 << 30))
    }

    /// Admits reading `bytes` for a session whose own budget is `session`: waits for both
    /// (the session's first, so that one session's backlog never holds the shared budget),
    /// at most [`ADMISSION_WAIT`].
    ///
    /// # Errors
    /// [`ApplianceError::ResourceExhausted`] when not admitted in time.
    pub async fn admit(
        &self,
        session: &Arc<Semaphore>,
        bytes: u64,
    ) -> Result<Admitted, ApplianceError> {
        let want = bytes.div_ceil(UNIT).max(1);
        let mine = u32::try_from(want.min(SESSION_READ_UNITS as u64)).unwrap_or(u32::MAX);
        let all = u32::try_from(want.min(u64::from(self.units))).unwrap_or(u32::MAX);
        let busy = |whose: &str, limit: u64| {
            ApplianceError::ResourceExhausted(format!(
                "{whose} read budget ({} MiB of chunk data read and not yet sent) stayed in use \
                 for {} s; read the answers already sent, or try again later",
                (limit * UNIT) >> 20,
                ADMISSION_WAIT.as_secs()
            ))
        };
        let session =
            tokio::time::timeout(ADMISSION_WAIT, session.clone().acquire_many_owned(mine))
                .await
                .map_err(|_| busy("this session's", SESSION_READ_UNITS as u64))?
                .map_err(|_| busy("this session's", SESSION_READ_UNITS as u64))?;
        let all = tokio::time::timeout(ADMISSION_WAIT, self.all.clone().acquire_many_owned(all))
            .await
            .map_err(|_| busy("the appliance's", u64::from(self.units)))?
            .map_err(|_| busy("the appliance's", u64::from(self.units)))?;
        Ok(Admitted {
            _session: session,
            _all: all,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_session_that_does_not_drain_is_refused_and_others_read() {
        let budget = ReadBudget::new(1 << 30);
        let hog = Arc::new(Semaphore::new(SESSION_READ_UNITS));
        let held = budget.admit(&hog, 256 << 20).await.unwrap();
        // The hog's next read waits, then is refused; the shared budget is not all taken.
        let e = budget.admit(&hog, 1 << 20).await.unwrap_err();
        assert!(matches!(e, ApplianceError::ResourceExhausted(m) if m.contains("this session")));
        let other = Arc::new(Semaphore::new(SESSION_READ_UNITS));
        budget.admit(&other, 64 << 20).await.unwrap();
        drop(held);
        budget.admit(&hog, 1 << 20).await.unwrap();
        // A request larger than the whole budget is admitted for the budget, not refused.
        let small = ReadBudget::new(0);
        let s = Arc::new(Semaphore::new(SESSION_READ_UNITS));
        small.admit(&s, 10 << 30).await.unwrap();
    }
}
