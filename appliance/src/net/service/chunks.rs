//! FindMissing, PutChunks and GetChunks: what a session may learn of, add and read back.

use std::collections::HashSet;

use bytes::Bytes;
use coffer_proto::{bitmap_len, bitmap_set, unpack_ids, v1, ChunkId};

use super::Inner;
use crate::access::Session;
use crate::error::ApplianceError;
use crate::reach::plaintext;
use crate::shard::{IncomingChunk, PutOutcome};

/// Ids one `GetChunks` message may ask for (the client sends 256): with
/// [`super::PIPELINE_DEPTH`] messages in flight, a stream holds at most 4 × 256 × the maximum
/// chunk size.
const GET_IDS_PER_MESSAGE: usize = 256;

impl Inner {
    pub(super) async fn find_missing(
        &self,
        session: &Session,
        ids: Bytes,
    ) -> Result<v1::FindMissingResponse, ApplianceError> {
        let max = self.hello.limits.max_ids_per_batch as usize;
        let ids =
            unpack_ids(&ids, max).map_err(|e| ApplianceError::InvalidArgument(e.to_string()))?;
        let n = ids.len();
        // G3: an answer "present" and the session's record of it happen with no GC barrier
        // in between.
        let _gate = self.gate.enter().await;
        let present = self.shards.need(ids.clone(), session.state.owner).await?;
        let disclosure = self.auth.disclosure();
        let mut missing = vec![0u8; bitmap_len(n)];
        let mut prove = vec![0u8; bitmap_len(n)];
        let mut adopted = Vec::new();
        let mut answered = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let p = present[i];
            if p.stored && session.state.knows(id) {
                continue;
            }
            if p.owned {
                // Uploaded by an earlier session of this account (an interrupted backup): the
                // account's own data, so this session knows it without sending it again.
                adopted.push(*id);
                continue;
            }
            if p.stored && disclosure == v1::Disclosure::Repository {
                bitmap_set(&mut prove, i);
                answered.push(*id);
            } else {
                // Stored by someone else but unknown to this session: answered exactly like a
                // chunk nobody holds (user disclosure).
                bitmap_set(&mut missing, i);
            }
        }
        session.state.add_uploaded(adopted);
        session.state.add_pinned(answered);
        Ok(v1::FindMissingResponse {
            missing: missing.into(),
            count: u32::try_from(n).unwrap_or(u32::MAX),
            prove: prove.into(),
        })
    }

    /// Checks possession proofs: keyed BLAKE3 of each chunk's plaintext under the session's key.
    /// Only in `repository` disclosure (in `user` disclosure a proof would tell whether someone
    /// stored the chunk); a proof for a chunk that is not stored and a wrong proof get the same
    /// answer.
    async fn check_proofs(
        &self,
        session: &Session,
        proofs: Vec<(ChunkId, Bytes)>,
    ) -> Result<(), ApplianceError> {
        if self.auth.disclosure() != v1::Disclosure::Repository {
            return Err(ApplianceError::InvalidArgument(
                "possession proofs are accepted only in `repository` disclosure; send the \
                 chunks' data instead"
                    .into(),
            ));
        }
        let rejected = || {
            ApplianceError::InvalidArgument(format!(
                "possession proofs rejected: one of the {} proofs in this batch does not match a \
                 stored chunk; send the data instead",
                proofs.len()
            ))
        };
        let ids: Vec<ChunkId> = proofs.iter().map(|p| p.0).collect();
        let stored = self.shards.get(ids.clone()).await.map_err(|e| match e {
            ApplianceError::NotFound(_) => rejected(),
            e => e,
        })?;
        for ((_, proof), c) in proofs.iter().zip(stored) {
            let want = blake3::keyed_hash(&session.state.possession_key, &plaintext(&c)?);
            if want.as_bytes()[..] != proof[..] {
                return Err(rejected());
            }
        }
        session.state.add_uploaded(ids);
        Ok(())
    }

    pub(super) async fn put(
        &self,
        session: &Session,
        req: v1::PutChunksRequest,
    ) -> Result<v1::PutChunksResponse, ApplianceError> {
        let max = self.hello.limits.max_chunks_per_batch as usize;
        if req.chunks.len() > max {
            return Err(ApplianceError::InvalidArgument(format!(
                "{} chunks in one batch; at most {max}",
                req.chunks.len()
            )));
        }
        let mut chunks = Vec::with_capacity(req.chunks.len());
        let mut proofs = Vec::new();
        for f in req.chunks {
            let id = ChunkId::from_slice(&f.id)
                .map_err(|e| ApplianceError::InvalidArgument(format!("chunk id: {e}")))?;
            let compression = match v1::Compression::try_from(f.compression) {
                Ok(c @ (v1::Compression::None | v1::Compression::Zstd | v1::Compression::Lz4)) => c,
                Ok(v1::Compression::Proof) => {
                    proofs.push((id, f.data));
                    continue;
                }
                Err(_) => {
                    return Err(ApplianceError::InvalidArgument(format!(
                        "chunk {id}: unknown compression {}",
                        f.compression
                    )))
                }
            };
            chunks.push(IncomingChunk {
                id,
                raw_len: f.raw_len,
                compression,
                data: f.data,
            });
        }
        // G3: a deduplicated chunk is recorded as the session's before any GC barrier.
        let _gate = self.gate.enter().await;
        if !proofs.is_empty() {
            self.check_proofs(session, proofs).await?;
        }
        // What an upload of data nobody holds would be answered: new to this session means
        // stored (user disclosure hides whether someone else had it).
        let mut masked = PutOutcome::default();
        let mut seen = HashSet::new();
        for c in &chunks {
            if session.state.knows(&c.id) || !seen.insert(c.id) {
                masked.deduplicated += 1;
            } else {
                masked.stored += 1;
                masked.stored_bytes += c.data.len() as u64;
            }
        }
        // Quota: what is new to this session (the masked answer's bytes) may be new to the
        // repository.
        self.auth
            .quotas
            .check(&session.identity, masked.stored_bytes)?;
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let mut total = self.shards.put(chunks, session.state.owner).await?;
        // Counted as what is new to this session, not what was new to the repository: usage
        // counts shared chunks too, and the figure a quota refusal shows must not tell whether
        // someone else stored these chunks (user disclosure).
        self.auth
            .quotas
            .uploaded(&session.identity, masked.stored_bytes);
        session
            .state
            .stored_bytes
            .fetch_add(masked.stored_bytes, std::sync::atomic::Ordering::Relaxed);
        // Verified against their ids and durable: the session holds these chunks.
        session.state.add_uploaded(ids);
        if self.auth.disclosure() == v1::Disclosure::User {
            total = masked;
        }
        Ok(v1::PutChunksResponse {
            batch: req.batch,
            stored: total.stored,
            deduplicated: total.deduplicated,
            stored_bytes: total.stored_bytes,
        })
    }

    /// `GetChunks` for one message: only chunks the session knows (uploaded, proved, or
    /// reachable from a snapshot it opened); any other id is answered exactly like a chunk
    /// that is not stored.
    pub(super) async fn get(
        &self,
        session: &Session,
        ids: Bytes,
    ) -> Result<Vec<v1::GetChunksResponse>, ApplianceError> {
        // Each message is answered from memory: its size is bounded by ids, not by the request.
        let ids = unpack_ids(&ids, GET_IDS_PER_MESSAGE).map_err(|e| {
            ApplianceError::InvalidArgument(format!(
                "GetChunks: {e} (at most {GET_IDS_PER_MESSAGE} ids per message)"
            ))
        })?;
        if let Some(id) = ids.iter().find(|id| !session.state.knows(id)) {
            let e = ApplianceError::NotFound(format!(
                "chunk {id} is not stored (or not reachable from a snapshot this session opened)"
            ));
            // A chunk id alone never reads a chunk; asking is recorded (within the budget).
            return Err(self
                .refused(&session.identity, "chunk.read", &id.to_string(), e)
                .await);
        }
        let ordered = self.shards.get(ids).await?;
        // Split the answer so that no message exceeds half the message limit.
        let budget = (self.hello.limits.max_message_size / 2) as usize;
        let mut out = Vec::new();
        let mut cur = v1::GetChunksResponse::default();
        let mut cur_bytes = 0;
        for c in ordered {
            if !cur.chunks.is_empty() && cur_bytes + c.data.len() > budget {
                out.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            cur_bytes += c.data.len();
            cur.chunks.push(v1::ChunkFrame {
                id: Bytes::copy_from_slice(c.id.as_bytes()),
                raw_len: c.raw_len,
                compression: c.compression.into(),
                data: c.data,
            });
        }
        if !cur.chunks.is_empty() || out.is_empty() {
            out.push(cur);
        }
        Ok(out)
    }
}
