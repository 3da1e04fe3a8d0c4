//! The lock pass: where the bucket has S3 Object Lock, every object a locked snapshot needs gets
//! compliance retention until the snapshot's lock ends, so that nobody holding the bucket's
//! credentials can delete it earlier (`docs/object-storage.md`).
//!
//! A pass walks each locked snapshot whose current lock was not applied yet, maps every chunk
//! it reaches to its pack through the index, and asks the tier to retain those packs (a pack's
//! retention is only ever moved later). A snapshot with a pack not uploaded yet is tried again
//! at the next pass. Once any snapshot was done, the repository file, the keys and the catalog
//! journal as mirrored then are retained until the latest lock too: the bucket alone then holds
//! what `attach` needs to serve every locked snapshot.
//!
//! Invariants kept with the collector:
//! * A pass and a collection never run at once (the collector's `running` lock), and a
//!   collection neither deletes nor compacts a pack the bucket retains
//!   ([`Tier::retained`](crate::pack::store::s3::Tier::retained)). So the records of a snapshot
//!   marked done stay in the packs that were retained for it: a done snapshot never needs
//!   walking again until its lock is extended.
//!
//! Owns: which objects are retained, and until when. Must never delete nor shorten anything.

use std::collections::HashSet;
use std::sync::PoisonError;

use coffer_proto::{ChunkId, PackId, SnapshotId};
use serde::{Deserialize, Serialize};

use super::{internal, Collector};
use crate::error::ApplianceError;
use crate::pack::store::s3::Bucket;
use crate::reach::Marker;

/// What one lock pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReport {
    /// Locked snapshots whose objects are now retained until their lock's end.
    pub snapshots: u64,
    /// Objects whose retention was set or moved later.
    pub objects: u64,
    /// Locked snapshots with packs not in the bucket yet (tried again at the next pass).
    pub pending: u64,
    /// Locked snapshots that could not be walked or retained (logged; tried again).
    pub failed: u64,
}

impl Collector {
    /// Applies the snapshot locks to the bucket (nothing without an object store with Object
    /// Lock); `None` at once while a collection runs (it makes its own pass).
    ///
    /// # Errors
    /// (In the answer.) The catalog's; failures of single snapshots are counted in the report
    /// and logged.
    pub fn try_apply_locks(
        &self,
        rt: &tokio::runtime::Handle,
    ) -> Option<Result<LockReport, ApplianceError>> {
        let _one = match self.running.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.lock_pass(rt))
    }

    /// The pass itself; the caller holds `running`.
    pub(super) fn lock_pass(
        &self,
        rt: &tokio::runtime::Handle,
    ) -> Result<LockReport, ApplianceError> {
        let mut report = LockReport::default();
        let Some(tier) = self.tier.as_ref().filter(|t| t.object_lock()) else {
            return Ok(report);
        };
        let now = coffer_proto::now_us();
        let mut locked = Vec::new();
        let mut latest = 0;
        for s in self.catalog.snapshots()? {
            if s.lock_until_us <= now {
                continue;
            }
            latest = latest.max(s.lock_until_us);
            let id = SnapshotId::from_slice(&s.id)
                .map_err(|e| ApplianceError::Internal(format!("a stored snapshot's id: {e}")))?;
            let applied = self
                .locks_done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&id)
                .copied();
            if applied.is_some_and(|u| u >= s.lock_until_us) {
                continue;
            }
            let root = ChunkId::from_slice(&s.root).map_err(|e| {
                ApplianceError::Internal(format!("snapshot {id}: its root is not an id: {e}"))
            })?;
            locked.push((id, root, s.lock_until_us));
        }
        let busy = tier.busy();
        // One snapshot that fails (damaged, or refused by the store) does not hold up the others.
        for (id, root, until) in locked {
            let packs = match self.packs_of(rt, root) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e,
                        "object lock: the snapshot cannot be walked; run `coffer-appliance verify`");
                    report.failed += 1;
                    continue;
                }
            };
            if packs.iter().any(|p| busy.contains(p)) {
                report.pending += 1;
                continue;
            }
            let names = packs.iter().map(Bucket::pack_name).collect();
            let n = match tier.retain(names, until) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e,
                        "object lock: retention not set on the snapshot's packs");
                    report.failed += 1;
                    continue;
                }
            };
            report.objects += n as u64;
            report.snapshots += 1;
            self.locks_done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, until);
            tracing::info!(snapshot = %id, packs = packs.len(), changed = n,
                until = %coffer_proto::when::format_us(until),
                "object lock: the snapshot's packs are retained in the bucket");
        }
        // Retried at every pass until it succeeds: without the keys and the journal, retained
        // packs could not be read.
        let mut repo = self
            .repo_retained
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        repo.1 |= report.snapshots > 0;
        if repo.1 || latest > repo.0 {
            match tier.retain_repository(latest) {
                Ok(n) => {
                    report.objects += n as u64;
                    *repo = (latest, false);
                }
                Err(e) => {
                    tracing::warn!(error = %e,
                        "object lock: retention not set on the repository files (tried again)");
                    report.failed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Every pack holding a record reachable from `root`.
    fn packs_of(
        &self,
        rt: &tokio::runtime::Handle,
        root: ChunkId,
    ) -> Result<HashSet<PackId>, ApplianceError> {
        let count = self.shards.count();
        let mut ids: Vec<HashSet<ChunkId>> = vec![HashSet::new(); usize::from(count)];
        let mut marker = Marker::new(self.shards.clone());
        rt.block_on(marker.mark_from(root, &mut |c| {
            ids[coffer_proto::ShardId::for_chunk(c, count).index()].insert(*c);
        }))?;
        let mut packs = HashSet::new();
        for (idx, ids) in self.indexes().iter().zip(ids) {
            let ids: Vec<ChunkId> = ids.into_iter().collect();
            for part in ids.chunks(4096) {
                let found = idx
                    .get_many(part)
                    .map_err(internal("object lock, reading the index"))?;
                for (id, e) in part.iter().zip(found) {
                    // A chunk the index lacks cannot be retained: the snapshot is not done.
                    let e = e.ok_or_else(|| {
                        ApplianceError::FailedPrecondition(format!(
                            "chunk {id} is not in the index"
                        ))
                    })?;
                    packs.insert(e.pack);
                }
            }
        }
        Ok(packs)
    }
}
