//! FindMissing, PutChunks and GetChunks: what a session may learn of, add and read back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use coffer_proto::{bitmap_len, bitmap_set, unpack_ids, v1, ChunkId};
use futures::{Stream, StreamExt, TryStreamExt};

use super::Inner;
use crate::access::Session;
use crate::error::ApplianceError;
use crate::reach::plaintext;
use crate::shard::{IncomingChunk, PutOutcome, StoredChunk};

/// Ids one `GetChunks` message may ask for (the client sends 256). What the answer holds in
/// memory is bounded by the read budgets, not by this (see [`Inner::get`]).
const GET_IDS_PER_MESSAGE: usize = 256;

impl Inner {
    /// Sealed mode: a stored chunk whose envelope digest differs from the one the client
    /// declared (`hashes`, 32 bytes per id; empty: no check) counts as not stored, so that the
    /// client uploads its envelope and that upload replaces the stored record (see
    /// `shard::ingest::put`). Never adopted, proved or reported present.
    async fn check_envelopes(
        &self,
        ids: &[ChunkId],
        hashes: &[u8],
        present: &mut [crate::shard::Presence],
    ) -> Result<(), ApplianceError> {
        if hashes.is_empty() || self.hello.mode != crate::repo::Mode::Sealed {
            return Ok(());
        }
        if hashes.len() != ids.len() * 32 {
            return Err(ApplianceError::InvalidArgument(format!(
                "{} envelope hash bytes for {} ids: one 32-byte hash per id",
                hashes.len(),
                ids.len()
            )));
        }
        let stored: Vec<usize> = (0..ids.len()).filter(|&i| present[i].stored).collect();
        if stored.is_empty() {
            return Ok(());
        }
        let digests = self
            .shards
            .digests(stored.iter().map(|&i| ids[i]).collect())
            .await?;
        for (&i, d) in stored.iter().zip(digests) {
            // No digest (an entry rebuilt from footers): unknown, so uploaded again.
            if d.is_none_or(|d| d[..] != hashes[i * 32..i * 32 + d.len()]) {
                present[i] = crate::shard::Presence::default();
            }
        }
        Ok(())
    }

    pub(super) async fn find_missing(
        &self,
        session: &Session,
        ids: Bytes,
        hashes: Bytes,
    ) -> Result<v1::FindMissingResponse, ApplianceError> {
        let max = self.hello.limits.max_ids_per_batch as usize;
        let ids =
            unpack_ids(&ids, max).map_err(|e| ApplianceError::InvalidArgument(e.to_string()))?;
        let n = ids.len();
        session.state.room_for(n)?;
        // G3: an answer "present" and the session's record of it happen with no GC barrier
        // in between.
        let _gate = self.gate.enter().await;
        let mut present = self.shards.need(ids.clone(), session.state.owner).await?;
        self.check_envelopes(&ids, &hashes, &mut present).await?;
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
        self.metrics.find_missing_ids.inc_by(n as u64);
        self.metrics
            .find_missing_missing
            .inc_by(missing.iter().map(|b| u64::from(b.count_ones())).sum());
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
        session.state.room_for(chunks.len() + proofs.len())?;
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
        let raw: u64 = chunks.iter().map(|c| u64::from(c.raw_len)).sum();
        let received: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
        let mut total = self.shards.put(chunks, session.state.owner).await?;
        let m = &self.metrics;
        m.chunk_raw_bytes.inc_by(raw);
        m.chunk_received_bytes.inc_by(received);
        m.chunk_stored_bytes.inc_by(total.stored_bytes);
        m.chunks_stored.inc_by(u64::from(total.stored));
        m.chunks_deduplicated.inc_by(u64::from(total.deduplicated));
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
    ///
    /// The answer is a stream, read piece by piece as the client takes it: each id is read
    /// once however often the message repeats it, a piece holds at most [`GET_PIECE_BYTES`]
    /// of stored data, and each piece is admitted by the account's and the appliance's read
    /// budgets before it is read (`net::budget`). At most two pieces of a stream are read
    /// ahead of what the client has taken.
    pub(super) async fn get(
        self: &Arc<Self>,
        session: &Session,
        ids: Bytes,
    ) -> Result<GetAnswer, ApplianceError> {
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
        // Each id once.
        let mut unique: Vec<ChunkId> = Vec::new();
        let mut slot: HashMap<ChunkId, usize> = HashMap::new();
        let order: Vec<usize> = ids
            .iter()
            .map(|id| {
                *slot.entry(*id).or_insert_with(|| {
                    unique.push(*id);
                    unique.len() - 1
                })
            })
            .collect();
        let sizes = self.shards.sizes(unique.clone()).await?;
        let sizes = sizes
            .into_iter()
            .zip(&unique)
            .map(|(s, id)| {
                s.map(u64::from)
                    .ok_or_else(|| ApplianceError::NotFound(format!("chunk {id} is not stored")))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        if ids.is_empty() {
            // An empty message gets one empty answer, as it always did.
            return Ok(Box::pin(futures::stream::iter([Ok(
                v1::GetChunksResponse::default(),
            )])));
        }
        let pieces = pieces(&order, &sizes);
        let unique = Arc::new(unique);
        let inner = self.clone();
        let state = session.state.clone();
        let identity = Arc::new(session.identity.clone());
        let per_message = (self.hello.limits.max_message_size / 2) as usize;
        let answer = futures::stream::iter(pieces)
            .map(move |p| {
                let (inner, state, unique) = (inner.clone(), state.clone(), unique.clone());
                let identity = identity.clone();
                async move {
                    state.check()?;
                    let admitted = inner.read_budget.admit(&identity, p.bytes).await?;
                    let wanted: Vec<ChunkId> = p.members.iter().map(|u| unique[*u]).collect();
                    let read = inner.shards.get(wanted).await?;
                    let by: HashMap<usize, StoredChunk> =
                        p.members.iter().copied().zip(read).collect();
                    let msgs = messages(&p.positions, &by, per_message);
                    // The budget is held until the piece's last message is taken.
                    Ok::<_, ApplianceError>(futures::stream::iter(msgs).map(move |m| {
                        let _held = &admitted;
                        Ok(m)
                    }))
                }
            })
            .buffered(2)
            .try_flatten();
        Ok(Box::pin(answer))
    }
}

/// The answer to one `GetChunks` message.
pub(super) type GetAnswer =
    std::pin::Pin<Box<dyn Stream<Item = Result<v1::GetChunksResponse, ApplianceError>> + Send>>;

/// Stored bytes read for one piece of a `GetChunks` answer at most (one chunk more when a
/// single chunk is larger).
const GET_PIECE_BYTES: u64 = 32 << 20;

/// A piece of an answer: the unique chunks it reads (`members`, indexes into the unique ids),
/// their stored bytes, and the positions it answers, in request order.
#[derive(Debug, PartialEq, Eq)]
struct Piece {
    members: Vec<usize>,
    bytes: u64,
    positions: Vec<usize>,
}

/// Cuts the positions of a request (`order`: the unique chunk each asks for) into pieces of at
/// most [`GET_PIECE_BYTES`]: a chunk asked again within a piece is read once; asked again in a
/// later piece, it is read again (bounded memory over fewer reads).
fn pieces(order: &[usize], sizes: &[u64]) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut in_piece: Vec<Option<usize>> = vec![None; sizes.len()];
    for &u in order {
        let current = out.len().checked_sub(1);
        if current.is_some() && in_piece[u] == current {
            out.last_mut().expect("current").positions.push(u);
            continue;
        }
        let fits = out
            .last()
            .is_some_and(|p| p.bytes + sizes[u] <= GET_PIECE_BYTES);
        if !fits {
            out.push(Piece {
                members: Vec::new(),
                bytes: 0,
                positions: Vec::new(),
            });
        }
        let p = out.last_mut().expect("a piece");
        p.members.push(u);
        p.bytes += sizes[u];
        p.positions.push(u);
        in_piece[u] = Some(out.len() - 1);
    }
    out
}

/// The frames of `positions` in order, in messages of at most `per_message` bytes of data.
fn messages(
    positions: &[usize],
    by: &HashMap<usize, StoredChunk>,
    per_message: usize,
) -> Vec<v1::GetChunksResponse> {
    let mut out = Vec::new();
    let mut cur = v1::GetChunksResponse::default();
    let mut cur_bytes = 0;
    for u in positions {
        let c = &by[u];
        if !cur.chunks.is_empty() && cur_bytes + c.data.len() > per_message {
            out.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur_bytes += c.data.len();
        cur.chunks.push(v1::ChunkFrame {
            id: Bytes::copy_from_slice(c.id.as_bytes()),
            raw_len: c.raw_len,
            compression: c.compression.into(),
            data: c.data.clone(),
        });
    }
    if !cur.chunks.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_read_once_per_piece_and_pieces_are_bounded() {
        // One 4 MiB chunk asked 256 times: one piece, one read.
        let p = pieces(&[0; 256], &[4 << 20]);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].members, vec![0]);
        assert_eq!(p[0].positions.len(), 256);
        // 64 distinct 1 MiB chunks: two pieces of 32 MiB.
        let order: Vec<usize> = (0..64).collect();
        let p = pieces(&order, &[1 << 20; 64]);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.bytes == 32 << 20));
        // A chunk larger than a piece is a piece of its own.
        let p = pieces(&[0, 1, 0], &[40 << 20, 1]);
        assert_eq!(
            p.iter().map(|p| p.members.len()).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        // Positions come back in request order.
        let all: Vec<usize> = pieces(&[2, 0, 2, 1], &[1, 1, 1])
            .into_iter()
            .flat_map(|p| p.positions)
            .collect();
        assert_eq!(all, [2, 0, 2, 1]);
    }
}
