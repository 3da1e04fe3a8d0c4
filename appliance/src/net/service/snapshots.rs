//! Snapshot calls: commit (with the reference check), open, list and get (delete, protect and
//! lock are in [`super::history`]).

use std::sync::Arc;

use bytes::Bytes;
use coffer_proto::{v1, ChunkId, SnapshotId};

use super::{catalog_call, Inner};
use crate::access::rules::{snapshot_access, Access};
use crate::access::Session;
use crate::catalog::{Catalog, Committed};
use crate::error::ApplianceError;

/// Largest sealed header a snapshot may carry (a real one is a few hundred bytes).
const MAX_SEALED_HEADER: usize = 64 << 10;

/// How far ahead of the appliance's clock a client may date a snapshot.
const MAX_CLOCK_SKEW_US: i64 = 5 * 60 * 1_000_000;

pub(super) fn snapshot_id(bytes: &[u8]) -> Result<SnapshotId, ApplianceError> {
    SnapshotId::from_slice(bytes)
        .map_err(|e| ApplianceError::InvalidArgument(format!("snapshot id: {e}")))
}

fn sealed_header_fits(snap: &v1::Snapshot) -> Result<(), ApplianceError> {
    if snap.sealed.len() > MAX_SEALED_HEADER {
        return Err(ApplianceError::InvalidArgument(format!(
            "a sealed snapshot header may be at most {MAX_SEALED_HEADER} bytes, not {}",
            snap.sealed.len()
        )));
    }
    Ok(())
}

/// A snapshot the caller may not read is reported exactly like a missing one.
pub(super) fn no_snapshot(id: &SnapshotId) -> ApplianceError {
    ApplianceError::NotFound(format!("no snapshot {id}"))
}

impl Inner {
    pub(super) async fn commit_snapshot(
        &self,
        session: &Session,
        req: v1::CommitSnapshotRequest,
    ) -> Result<v1::CommitSnapshotResponse, ApplianceError> {
        let mut snap = req
            .snapshot
            .ok_or_else(|| ApplianceError::InvalidArgument("commit without a snapshot".into()))?;
        if !req.commit_id.is_empty() && req.commit_id.len() != 16 {
            return Err(ApplianceError::InvalidArgument(format!(
                "a commit id is 16 bytes, not {}",
                req.commit_id.len()
            )));
        }
        sealed_header_fits(&snap)?;
        // Snapshots are never overwritten: the appliance chooses every new snapshot's id, and a
        // commit that names one is refused rather than silently given another.
        if !snap.id.is_empty() {
            let e = ApplianceError::PermissionDenied(
                "a commit may not name a snapshot id: snapshots are never replaced (send an \
                 empty id; the appliance chooses it)"
                    .into(),
            );
            let named = hex::encode(&snap.id);
            return Err(self
                .refused(&session.identity, "snapshot.replace", &named, e)
                .await);
        }
        // Set by the appliance only: a retry is recognised by the request's commit id, and
        // protections and locks come from the appliance's policies and calls.
        snap.commit_id = req.commit_id;
        snap.protected_until_us = 0;
        snap.lock_until_us = 0;
        let root = ChunkId::from_slice(&snap.root)
            .map_err(|e| ApplianceError::InvalidArgument(format!("snapshot root: {e}")))?;
        let id = SnapshotId::from_bytes(rand::random());
        snap.id = Bytes::copy_from_slice(id.as_bytes());
        // A snapshot always belongs to the identity that commits it.
        snap.identity.clone_from(&session.identity);
        snap.hostname = session
            .identity
            .split_once('@')
            .map_or("", |(_, h)| h)
            .to_string();
        if snapshot_access(&self.auth.rules(), &session.identity, &snap)
            .is_none_or(|a| a < Access::Append)
        {
            return Err(ApplianceError::PermissionDenied(format!(
                "{} may not add snapshots of {}",
                session.identity, snap.path
            )));
        }
        // Every tree and chunk the snapshot references must be known to this session: uploaded
        // (verified against its id), proved, or reachable from a snapshot it opened (S2: a chunk
        // id alone never lets anyone put someone else's data into their snapshot). The walk
        // checks each reference before reading it, and does not descend into subtrees
        // reachable from an opened snapshot. A root the session does not know is refused in
        // the same words whether or not it is stored.
        let generation = self.gate.generation();
        let walk = {
            let _turn = self.walker.permit(&session.identity).await?;
            session.state.check()?;
            let known: Arc<dyn crate::reach::Known> = session.state.clone();
            self.walker.walk(root, Some(known)).await.map_err(|e| {
                ApplianceError::FailedPrecondition(format!("snapshot not committed: {e}"))
            })?
        };
        session.state.check()?;
        let now = crate::clock::now_us();
        snap.committed_us = now;
        if snap.time_us == 0 {
            snap.time_us = now;
        } else if snap.time_us < 0 || snap.time_us > now + MAX_CLOCK_SKEW_US {
            // Retention ranks snapshots by time: a snapshot dated in the future would outrank
            // every real one and make retention forget them.
            return Err(ApplianceError::InvalidArgument(format!(
                "snapshot time {} µs is before 1970 or more than 5 minutes ahead of the \
                 appliance's clock; check the client's clock or send 0",
                snap.time_us
            )));
        }
        // G4: a garbage collection that removed chunks after the walk began may have removed
        // what the walk checked (a subtree of a snapshot forgotten since it was opened): check
        // again. The gate keeps the next one from starting until the record is written.
        // The policy's retention lock runs from the commit (the appliance's clock, not the
        // client's snapshot time).
        let (identity, path) = (snap.identity.clone(), snap.path.clone());
        let lock_secs = catalog_call(&self.catalog, move |c| {
            Ok(
                crate::catalog::policy::resolve(&c.policies()?, &identity, &path)
                    .policy
                    .lock_secs,
            )
        })
        .await?;
        if let Some(secs) = lock_secs.filter(|s| *s > 0) {
            let d = i64::try_from(secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000);
            snap.lock_until_us = now.saturating_add(d);
        }
        let _gate = self.gate.enter().await;
        if self.gate.generation() != generation {
            return Err(ApplianceError::Unavailable(
                "garbage collection ran while this snapshot was being checked; commit it again"
                    .into(),
            ));
        }
        let counted = Counted::of(&snap);
        let committed = catalog_call(&self.catalog, move |c| c.commit_snapshot(&snap)).await?;
        if let Committed::Earlier(id) = committed {
            tracing::info!(snapshot = %id, identity = %session.identity, "a retried commit answered with its earlier snapshot");
        } else {
            counted.count(&self.metrics);
            if !walk.skipped {
                // The walk saw everything: the new snapshot's reachable set, ready for restores.
                self.walker.remember(root, Arc::new(walk.reach));
            }
        }
        Ok(v1::CommitSnapshotResponse {
            id: Bytes::copy_from_slice(committed.id().as_bytes()),
        })
    }

    pub(super) async fn open_snapshot(
        &self,
        session: &Session,
        req: v1::OpenSnapshotRequest,
    ) -> Result<v1::OpenSnapshotResponse, ApplianceError> {
        let id = snapshot_id(&req.id)?;
        let generation = self.gate.generation();
        let snap = catalog_call(&self.catalog, move |c| c.snapshot(&id)).await?;
        let snap = match snap {
            Some(s) if snapshot_access(&self.auth.rules(), &session.identity, &s).is_some() => s,
            _ => return Err(no_snapshot(&id)),
        };
        let reach = {
            let _turn = self.walker.permit(&session.identity).await?;
            self.walker.snapshot(&snap).await?
        };
        let reachable = reach.len() as u64;
        let damaged: Vec<ChunkId> = self
            .shards
            .damaged()
            .await?
            .into_iter()
            .filter(|id| reach.contains(id))
            .take(1 << 16)
            .collect();
        session.state.check()?;
        // G4: a snapshot forgotten and collected while it was walked (or answered from the
        // cache) must not be opened: a commit could then reference what is gone. Under the gate,
        // a snapshot that still exists is one the last collection kept.
        let _gate = self.gate.enter().await;
        if self.gate.generation() != generation
            && catalog_call(&self.catalog, move |c| c.snapshot(&id))
                .await?
                .is_none()
        {
            return Err(no_snapshot(&id));
        }
        session.state.add_opened(snap, reach);
        // Rules may have changed while the trees were walked: what a reload revoked in the
        // meantime stays revoked.
        let rules = self.auth.rules();
        session
            .state
            .retain_opened(|s| snapshot_access(&rules, &session.identity, s).is_some());
        Ok(v1::OpenSnapshotResponse {
            reachable,
            damaged: coffer_proto::pack_ids(&damaged).into(),
        })
    }

    pub(super) async fn list_snapshots(
        &self,
        session: &Session,
        req: v1::ListSnapshotsRequest,
    ) -> Result<v1::ListSnapshotsResponse, ApplianceError> {
        let v1::ListSnapshotsRequest { path, all } = req;
        let every = catalog_call(&self.catalog, Catalog::snapshots).await?;
        let rules = self.auth.rules();
        let mut snapshots: Vec<_> = every
            .into_iter()
            .filter(|s| path.is_empty() || s.path == path)
            .filter(|s| all || s.identity == session.identity)
            .filter(|s| snapshot_access(&rules, &session.identity, s).is_some())
            .collect();
        snapshots.sort_by_key(|s| s.time_us);
        Ok(v1::ListSnapshotsResponse { snapshots })
    }

    pub(super) async fn get_snapshot(
        &self,
        session: &Session,
        req: v1::GetSnapshotRequest,
    ) -> Result<v1::GetSnapshotResponse, ApplianceError> {
        let id = snapshot_id(&req.id)?;
        let snap = catalog_call(&self.catalog, move |c| c.snapshot(&id)).await?;
        match snap {
            Some(s) if snapshot_access(&self.auth.rules(), &session.identity, &s).is_some() => {
                Ok(v1::GetSnapshotResponse { snapshot: Some(s) })
            }
            _ => Err(no_snapshot(&id)),
        }
    }
}

/// What a new snapshot adds to the metrics, taken before the commit consumes it.
struct Counted {
    identity: String,
    path: String,
    time_us: i64,
    partial: bool,
    bytes: u64,
}

impl Counted {
    fn of(s: &v1::Snapshot) -> Self {
        Self {
            identity: s.identity.clone(),
            path: s.path.clone(),
            time_us: s.time_us,
            partial: s.partial,
            bytes: s.stats.as_ref().map_or(0, |st| st.bytes),
        }
    }

    fn count(&self, m: &crate::metrics::Metrics) {
        m.snapshots_committed.inc();
        m.logical_bytes.inc_by(self.bytes);
        if !self.partial {
            m.backed_up(&self.identity, &self.path, self.time_us);
        }
    }
}
