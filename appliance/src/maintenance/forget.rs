//! Forget: the snapshots each path's retention no longer keeps, decided with the effective
//! policy of that identity and path (see `docs/maintenance.md`). Forgetting removes the catalog
//! records only; the space their chunks hold is reclaimed by garbage collection.

use std::collections::BTreeMap;

use coffer_proto::{v1, SnapshotId};
use serde::{Deserialize, Serialize};

use super::retention::{decide_with_partial, Reason};
use crate::catalog::policy::resolve;
use crate::catalog::{Catalog, CatalogError};

/// What retention decided for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Hex snapshot id.
    pub snapshot: String,
    pub identity: String,
    pub path: String,
    pub time_us: i64,
    /// Why it is kept; empty: forgotten.
    pub kept_because: Vec<String>,
}

impl Verdict {
    #[must_use]
    pub fn kept(&self) -> bool {
        !self.kept_because.is_empty()
    }
}

/// Every snapshot with what its path's retention decides at `now_us`, grouped by identity and
/// path, oldest first within a group.
///
/// # Errors
/// Catalog errors.
pub fn plan(catalog: &Catalog, now_us: i64) -> Result<Vec<Verdict>, CatalogError> {
    let policies = catalog.policies()?;
    // Locks and protections expire by the appliance's clock, whatever time retention is asked
    // to decide at (a run "in the future" must not forget a locked snapshot).
    let clock = crate::clock::now_us();
    let mut groups: BTreeMap<(String, String), Vec<v1::Snapshot>> = BTreeMap::new();
    for s in catalog.snapshots()? {
        groups
            .entry((s.identity.clone(), s.path.clone()))
            .or_default()
            .push(s);
    }
    let mut out = Vec::new();
    for ((identity, path), mut snaps) in groups {
        snaps.sort_by_key(|s| s.time_us);
        let retention = resolve(&policies, &identity, &path).retention();
        let times: Vec<i64> = snaps.iter().map(|s| s.time_us).collect();
        let complete: Vec<bool> = snaps.iter().map(|s| !s.partial).collect();
        for (s, d) in snaps
            .iter()
            .zip(decide_with_partial(&times, &complete, &retention, now_us))
        {
            let mut kept_because: Vec<String> =
                d.reasons.iter().map(|r| reason(*r).to_string()).collect();
            if s.lock_until_us > clock {
                kept_because.push("locked".into());
            }
            if s.protected_until_us > clock {
                kept_because.push("protected".into());
            }
            out.push(Verdict {
                snapshot: hex::encode(&s.id),
                identity: identity.clone(),
                path: path.clone(),
                time_us: s.time_us,
                kept_because,
            });
        }
    }
    Ok(out)
}

fn reason(r: Reason) -> &'static str {
    match r {
        Reason::NoRule => "no retention rule",
        Reason::Newest => "newest",
        Reason::Last => "last",
        Reason::Hourly => "hourly",
        Reason::Daily => "daily",
        Reason::Weekly => "weekly",
        Reason::Monthly => "monthly",
        Reason::Yearly => "yearly",
        Reason::Within => "within",
    }
}

/// Forgets (deletes from the catalog) every snapshot `verdicts` does not keep, each with its
/// audit entry. Returns how many. A snapshot protected or locked since the plan was made is kept
/// (the catalog refuses, and records the refusal).
///
/// # Errors
/// Catalog errors; what was forgotten before one stays forgotten.
pub fn apply(catalog: &Catalog, verdicts: &[Verdict]) -> Result<usize, CatalogError> {
    let mut n = 0;
    for v in verdicts.iter().filter(|v| !v.kept()) {
        let id = SnapshotId::from_hex(&v.snapshot).map_err(|e| CatalogError::Decode {
            key: format!("snap/{}", v.snapshot),
            why: e.to_string(),
        })?;
        let event =
            crate::catalog::audit::Event::done("maintenance", "snapshot.forget", &v.snapshot)
                .with_detail(format!("{}:{}", v.identity, v.path));
        match catalog.delete_snapshot(&id, &event) {
            Ok(()) => n += 1,
            Err(CatalogError::Held(why)) => tracing::info!(%why, "retention keeps a held snapshot"),
            // Deleted meanwhile (by its owner or an admin): nothing left to forget.
            Err(CatalogError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        crate::faults::point("forget.deleted");
    }
    Ok(n)
}
