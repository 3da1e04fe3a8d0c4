//! The one fan-out/gather over all shards: a batch is split by [`ShardId::for_chunk`], each part
//! goes to its shard at once, and the answers come back in the batch's order.

use std::future::Future;

use coffer_proto::{ChunkId, ShardId};

use super::{IncomingChunk, Presence, PutOutcome, ShardHandle, StoredChunk};
use crate::error::ApplianceError;

/// Every shard of the running appliance, addressed by chunk id.
#[derive(Debug, Clone)]
pub struct Shards {
    handles: Vec<ShardHandle>,
    count: u16,
}

impl Shards {
    /// # Panics
    /// With no shard or more than `u16::MAX` (a repository file holds 1..=`u16::MAX`).
    #[must_use]
    pub fn new(handles: Vec<ShardHandle>) -> Self {
        let count = u16::try_from(handles.len()).expect("shard count comes from a u16");
        assert!(count > 0, "an appliance runs at least one shard");
        Self { handles, count }
    }

    /// Number of shards.
    #[must_use]
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Every shard's handle, in shard order (maintenance addresses shards one by one).
    #[must_use]
    pub(crate) fn handles(&self) -> &[ShardHandle] {
        &self.handles
    }

    /// Every chunk any shard lists as damaged.
    ///
    /// # Errors
    /// Shutdown.
    pub async fn damaged(&self) -> Result<Vec<ChunkId>, ApplianceError> {
        let lists =
            futures::future::try_join_all(self.handles.iter().map(ShardHandle::damaged)).await?;
        Ok(lists.into_iter().flatten().collect())
    }

    /// Splits `items` by shard, remembering each item's position in `items`.
    fn split<T>(&self, items: Vec<T>, id: impl Fn(&T) -> ChunkId) -> Vec<(Vec<usize>, Vec<T>)> {
        let mut out: Vec<(Vec<usize>, Vec<T>)> =
            (0..self.count).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, item) in items.into_iter().enumerate() {
            let s = ShardId::for_chunk(&id(&item), self.count).index();
            out[s].0.push(i);
            out[s].1.push(item);
        }
        out
    }

    /// Sends each shard its part of `items` at once; answers each part with the positions (in
    /// `items`) of the items it held.
    async fn each<T, A, F, Fut>(
        &self,
        items: Vec<T>,
        id: impl Fn(&T) -> ChunkId,
        call: F,
    ) -> Result<Vec<(Vec<usize>, A)>, ApplianceError>
    where
        F: Fn(ShardHandle, Vec<T>) -> Fut,
        Fut: Future<Output = Result<A, ApplianceError>>,
    {
        let parts = self.split(items, id);
        futures::future::try_join_all(
            parts
                .into_iter()
                .zip(&self.handles)
                .filter(|((pos, _), _)| !pos.is_empty())
                .map(|((pos, part), shard)| {
                    let answer = call(shard.clone(), part);
                    async move { Ok::<_, ApplianceError>((pos, answer.await?)) }
                }),
        )
        .await
    }

    /// [`Self::each`], with the per-item answers put back in `items`' order. `call` answers one
    /// `R` per item it was given, in that order.
    async fn gather<T, R, F, Fut>(
        &self,
        items: Vec<T>,
        id: impl Fn(&T) -> ChunkId,
        call: F,
    ) -> Result<Vec<R>, ApplianceError>
    where
        F: Fn(ShardHandle, Vec<T>) -> Fut,
        Fut: Future<Output = Result<Vec<R>, ApplianceError>>,
    {
        let n = items.len();
        let mut ordered: Vec<Option<R>> = (0..n).map(|_| None).collect();
        for (pos, rs) in self.each(items, id, call).await? {
            if rs.len() != pos.len() {
                return Err(ApplianceError::Internal(format!(
                    "a shard answered {} of {} items",
                    rs.len(),
                    pos.len()
                )));
            }
            for (i, r) in pos.into_iter().zip(rs) {
                ordered[i] = Some(r);
            }
        }
        Ok(ordered.into_iter().flatten().collect())
    }

    /// What each shard knows of `ids`, in `ids`' order (see [`ShardHandle::need`]).
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn need(
        &self,
        ids: Vec<ChunkId>,
        owner: Option<[u8; 16]>,
    ) -> Result<Vec<Presence>, ApplianceError> {
        self.gather(
            ids,
            |id| *id,
            |s, ids| async move { s.need(ids, owner).await },
        )
        .await
    }

    /// Stored chunks in `ids`' order; any id not stored fails the whole call.
    ///
    /// # Errors
    /// Not found, corruption, shutdown.
    pub async fn get(&self, ids: Vec<ChunkId>) -> Result<Vec<StoredChunk>, ApplianceError> {
        self.gather(ids, |id| *id, |s, ids| async move { s.get(ids).await })
            .await
    }

    /// The stored size of each of `ids` (`None`: not stored), in `ids`' order.
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn sizes(&self, ids: Vec<ChunkId>) -> Result<Vec<Option<u32>>, ApplianceError> {
        self.gather(ids, |id| *id, |s, ids| async move { s.sizes(ids).await })
            .await
    }

    /// Sealed mode: the envelope digest of each of `ids` (see [`ShardHandle::digests`]).
    ///
    /// # Errors
    /// Index errors, shutdown.
    pub async fn digests(
        &self,
        ids: Vec<ChunkId>,
    ) -> Result<Vec<Option<crate::pack::format::EnvelopeDigest>>, ApplianceError> {
        self.gather(ids, |id| *id, |s, ids| async move { s.digests(ids).await })
            .await
    }

    /// Verifies, stores and indexes `chunks` on their shards; answers once all are durable.
    ///
    /// # Errors
    /// [`crate::IngestError`]s, shutdown.
    pub async fn put(
        &self,
        chunks: Vec<IncomingChunk>,
        owner: Option<[u8; 16]>,
    ) -> Result<PutOutcome, ApplianceError> {
        let outcomes = self
            .each(
                chunks,
                |c| c.id,
                |s, part| async move { s.put(part, owner).await },
            )
            .await?;
        let mut total = PutOutcome::default();
        for (_, o) in outcomes {
            total += o;
        }
        Ok(total)
    }
}
