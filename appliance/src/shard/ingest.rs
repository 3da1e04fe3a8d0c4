//! The ingest stage of a shard: verify every chunk of a request (size, decompression bound,
//! keyed BLAKE3 against its claimed id) before anything of it is queued, dedupe against the index
//! and against chunks in flight, then wait until the group commit that holds them is durable.

use std::rc::Rc;

use coffer_proto::v1::Compression;
use coffer_proto::{ChunkId, DedupKey};

use crate::error::IngestError;
use crate::pack::format::{flags_of, FLAG_SEALED};
use crate::pack::store::PackStore;
use crate::pack::writer::PendingChunk;

use super::{IncomingChunk, PutOutcome, ShardState};

/// Checks one chunk. Returns the form that will be stored.
///
/// # Errors
/// [`IngestError`] naming the chunk and what is wrong with it.
pub fn verify(
    dedup_key: &DedupKey,
    max_chunk: u32,
    c: IncomingChunk,
) -> Result<PendingChunk, IngestError> {
    let id = || c.id.to_hex();
    if c.raw_len > max_chunk {
        return Err(IngestError::TooLarge {
            id: id(),
            len: u64::from(c.raw_len),
            max: max_chunk,
        });
    }
    let bound = coffer_proto::codec::max_stored_len(max_chunk as usize) as u64;
    if c.data.len() as u64 > bound {
        return Err(IngestError::TooLarge {
            id: id(),
            len: c.data.len() as u64,
            max: max_chunk,
        });
    }
    let ok = if c.compression == Compression::None {
        if c.data.len() != c.raw_len as usize {
            return Err(IngestError::BadFrame {
                id: id(),
                why: format!("{} data bytes, raw_len says {}", c.data.len(), c.raw_len),
            });
        }
        coffer_proto::chunk_id(dedup_key, &c.data) == c.id
    } else {
        // Bounded by the declared length: a compression bomb fails here, never allocates more.
        let raw = coffer_proto::codec::decode(c.compression, &c.data, c.raw_len as usize).map_err(
            |e| IngestError::BadFrame {
                id: id(),
                why: e.to_string(),
            },
        )?;
        coffer_proto::chunk_id(dedup_key, &raw) == c.id
    };
    if !ok {
        return Err(IngestError::IdMismatch { id: id() });
    }
    Ok(PendingChunk {
        id: c.id,
        raw_len: c.raw_len,
        flags: flags_of(c.compression),
        data: c.data,
        owner: None,
    })
}

/// Checks one sealed-mode chunk: an envelope (`coffer_proto::sealed`) within the size bound,
/// sent as is. Its id cannot be checked here (it is keyed within the client's keyring, over a
/// plaintext the appliance never sees): readers check it, and a poisoned record is answered
/// missing to an honest client (`FindMissing` envelope hashes), whose upload replaces it.
///
/// # Errors
/// [`IngestError`] naming the chunk and what is wrong with it.
pub fn verify_envelope(max_chunk: u32, c: IncomingChunk) -> Result<PendingChunk, IngestError> {
    let id = || c.id.to_hex();
    let max = max_chunk as usize + coffer_proto::sealed::ENVELOPE_OVERHEAD;
    if c.data.len() > max {
        return Err(IngestError::TooLarge {
            id: id(),
            len: c.data.len() as u64,
            max: u32::try_from(max).unwrap_or(u32::MAX),
        });
    }
    if c.compression != Compression::None || c.data.len() != c.raw_len as usize {
        return Err(IngestError::BadFrame {
            id: id(),
            why: "a sealed repository takes envelopes as they are: compression NONE, raw_len \
                  the envelope's length"
                .into(),
        });
    }
    coffer_proto::sealed::decode_refs(&c.data).map_err(|e| IngestError::BadFrame {
        id: id(),
        why: e.to_string(),
    })?;
    Ok(PendingChunk {
        id: c.id,
        raw_len: c.raw_len,
        flags: FLAG_SEALED,
        data: c.data,
        owner: None,
    })
}

/// An index failure during ingest; a full disk (RocksDB's write-ahead log cannot grow) is told
/// as such, like a pack write that found no space.
fn index_error(e: &crate::error::RepoError) -> IngestError {
    let text = e.to_string();
    if text.contains("No space left") {
        IngestError::NoSpace(text)
    } else {
        IngestError::Storage(text)
    }
}

/// A share of the shard's ingest budget for `bytes` waiting for a group commit.
async fn budget(
    state: &ShardState,
    bytes: u64,
) -> Result<glommio::sync::StaticPermit, IngestError> {
    let kib = (bytes >> 10).clamp(1, state.budget_kib);
    state
        .budget
        .acquire_static_permit(kib)
        .await
        .map_err(|_| IngestError::ShuttingDown)
}

pub(super) async fn put(
    state: &Rc<ShardState>,
    chunks: Vec<IncomingChunk>,
    owner: Option<[u8; 16]>,
) -> Result<PutOutcome, IngestError> {
    // Bound the bytes waiting for a group commit on this shard; the permit is held until this
    // request's chunks are durable.
    let bytes: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
    let _permit = budget(state, bytes).await?;

    let mut verified = Vec::with_capacity(chunks.len());
    for c in chunks {
        let mut v = if state.sealed {
            verify_envelope(state.max_chunk, c)?
        } else {
            verify(&state.dedup_key, state.max_chunk, c)?
        };
        v.owner = owner;
        verified.push(v);
        glommio::yield_if_needed().await;
    }
    // The space check covers the whole request, chunks already stored included: whether an
    // upload fails on a full disk must not tell whether someone else stored its chunks.
    state
        .store
        .check_space(bytes)
        .map_err(|e| IngestError::NoSpace(e.source.to_string()))?;
    let ids: Vec<_> = verified.iter().map(|c| c.id).collect();
    let present = state.index.get_many(&ids).map_err(|e| index_error(&e))?;
    let mut outcome = PutOutcome::default();
    let mut candidates = Vec::with_capacity(verified.len());
    let mut healing = Vec::new();
    let mut replaced = Vec::new();
    for (c, p) in verified.into_iter().zip(present) {
        // Sealed mode: a stored envelope other than this one is one of two uploads of the same
        // id, at most one honest (readers check the keyed id): the new one is written and the
        // index points at it, the old entry is recorded for `verify`. Never over a record the
        // same account wrote: a compromised client cannot destroy what it stored. A record
        // without a digest (rebuilt from footers) is replaced by any upload.
        let differs = state.sealed
            && p.as_ref().is_some_and(|e| {
                e.digest
                    .is_none_or(|d| d != crate::pack::format::envelope_digest(&c.data))
                    && (e.uploader.is_none() || e.uploader != owner)
            });
        if p.is_some() && !state.is_damaged(&c.id) && !differs {
            outcome.deduplicated += 1;
        } else {
            match p {
                // A record without a digest is written again, not reported: nothing known differs.
                Some(old) if differs && old.digest.is_some() => replaced.push((c.id, old)),
                // Written again; the index then points at the new record (C8).
                Some(_) => healing.push(c.id),
                None => {}
            }
            candidates.push(c);
        }
    }
    for rx in state.enqueue(candidates, &mut outcome) {
        rx.await.map_err(|_| IngestError::ShuttingDown)??;
    }
    if !healing.is_empty() {
        state.healed(&healing).map_err(|e| index_error(&e))?;
    }
    if !replaced.is_empty() {
        state.replaced(&replaced).map_err(|e| index_error(&e))?;
    }
    // Every chunk of the request is durable (written now or before): the account holds them,
    // so that a later session of it (a resumed backup) need not send them again.
    if let Some(owner) = owner {
        state
            .index
            .insert_owned(&owner, &ids)
            .map_err(|e| index_error(&e))?;
    }
    Ok(outcome)
}

/// Copies chunks' records as stored (compaction, see [`super::ShardRequest::Rewrite`]): read,
/// queued past the index's dedup (the index has them: that is the point) and written by the
/// next group commit, which points the index at the copies once they are durable.
pub(super) async fn rewrite(state: &Rc<ShardState>, ids: &[ChunkId]) -> Result<u64, IngestError> {
    let stored = super::read::get(state, ids)
        .await
        .map_err(|e| IngestError::Storage(format!("reading records to compact: {e}")))?;
    crate::faults::point("shard.rewrite.read");
    let bytes: u64 = stored.iter().map(|c| c.data.len() as u64).sum();
    let _permit = budget(state, bytes).await?;
    state
        .store
        .check_space(bytes)
        .map_err(|e| IngestError::NoSpace(e.source.to_string()))?;
    // A sealed record keeps who wrote it.
    let uploaders = state.index.get_many(ids).map_err(|e| index_error(&e))?;
    let candidates = stored
        .into_iter()
        .zip(uploaders)
        .map(|(c, e)| PendingChunk {
            id: c.id,
            raw_len: c.raw_len,
            // A sealed envelope stays one: its flag decides how every reader takes it.
            flags: flags_of(c.compression) | if c.sealed { FLAG_SEALED } else { 0 },
            data: c.data,
            owner: e.and_then(|e| e.uploader),
        })
        .collect();
    let mut outcome = PutOutcome::default();
    for rx in state.enqueue(candidates, &mut outcome) {
        rx.await.map_err(|_| IngestError::ShuttingDown)??;
    }
    Ok(bytes)
}
