//! The read path of a shard: index lookup, one O_DIRECT read per record, authenticated
//! decryption on the shard's core.

use std::rc::Rc;

use bytes::Bytes;
use coffer_proto::ChunkId;

use crate::error::ApplianceError;
use crate::pack::format::{compression_of, IndexEntry};
use crate::pack::read::open_record;
use crate::pack::store::PackStore;

use super::{ShardState, StoredChunk};

/// Records of one pack closer than this are read with one I/O.
const COALESCE_GAP: u64 = 64 << 10;
/// Largest single read.
const MAX_RUN: u64 = 8 << 20;

/// One read covering adjacent records of a pack: (pack entry of the first, end offset, members).
struct Run {
    first: IndexEntry,
    end: u64,
    members: Vec<(usize, IndexEntry)>,
}

/// Reads one run and opens each member's record.
async fn read_run(
    state: &ShardState,
    ids: &[ChunkId],
    run: Run,
) -> Result<Vec<(usize, StoredChunk)>, ApplianceError> {
    let pack = run.first.pack;
    let start = run.first.offset;
    let len = usize::try_from(run.end - start).expect("runs are at most MAX_RUN");
    let r = state.store.read_at(&pack, start, len).await.map_err(|x| {
        if x.source.kind() == std::io::ErrorKind::NotFound {
            ApplianceError::DataLoss(format!(
                "pack {pack} is missing on the appliance (run `coffer-appliance verify`): {x}"
            ))
        } else {
            ApplianceError::Internal(format!("pack {pack} at {start}: {x}"))
        }
    })?;
    if r.len() != len {
        return Err(ApplianceError::DataLoss(format!(
            "pack {pack} is shorter than the index says (run `coffer-appliance verify`)"
        )));
    }
    let key = state.encryption.pack_cipher(&pack);
    let mut out = Vec::with_capacity(run.members.len());
    for (i, e) in run.members {
        let id = &ids[i];
        let at = usize::try_from(e.offset - start).expect("inside the run");
        // Decrypting a run of large records takes milliseconds: let the shard's group commits
        // and other requests run in between.
        glommio::yield_if_needed().await;
        let mut rec = r[at..at + e.len as usize].to_vec();
        let (h, stored) = match open_record(key.as_ref(), &mut rec) {
            Ok((h, stored)) if h.id == *id => (h, stored),
            other => {
                // Bytes were read but are not this chunk's authentic record: bit rot (C8).
                state.mark_damaged(*id);
                let why = other.map_or_else(
                    |x| x.to_string(),
                    |(h, _)| format!("the record there is chunk {}", h.id),
                );
                return Err(ApplianceError::DataLoss(format!(
                    "chunk {id} is damaged in pack {pack} ({why}); the next backup holding its \
                     data stores it again"
                )));
            }
        };
        out.push((
            i,
            StoredChunk {
                id: *id,
                raw_len: h.raw_len,
                compression: compression_of(h.flags).map_err(|x| {
                    ApplianceError::Internal(format!("chunk {id} in pack {pack}: {x}"))
                })?,
                data: Bytes::copy_from_slice(stored),
                sealed: h.flags & crate::pack::format::FLAG_SEALED != 0,
            },
        ));
    }
    Ok(out)
}

/// Reads chunks. Records are sorted by pack and offset and neighbours are read together (a
/// restore asks for chunks in backup order, which is pack order), and all reads of a request are
/// in flight at once so that io_uring sees queue depth.
pub(super) async fn get(
    state: &Rc<ShardState>,
    ids: &[ChunkId],
) -> Result<Vec<StoredChunk>, ApplianceError> {
    let entries = state
        .index
        .get_many(ids)
        .map_err(|e| ApplianceError::Internal(e.to_string()))?;
    let mut located = Vec::with_capacity(ids.len());
    for (i, (id, e)) in ids.iter().zip(entries).enumerate() {
        if state.is_damaged(id) {
            return Err(ApplianceError::DataLoss(format!(
                "chunk {id} is damaged on the appliance (found by verify or an earlier read); \
                 the next backup holding its data stores it again"
            )));
        }
        located.push((
            i,
            e.ok_or_else(|| ApplianceError::NotFound(format!("chunk {id} is not stored")))?,
        ));
    }
    located.sort_by_key(|(_, e)| (e.pack, e.offset));
    let mut runs: Vec<Run> = Vec::new();
    for (i, e) in located {
        let end = e.offset + u64::from(e.len);
        match runs.last_mut() {
            Some(r)
                if r.first.pack == e.pack
                    && e.offset <= r.end + COALESCE_GAP
                    && end.max(r.end) - r.first.offset <= MAX_RUN =>
            {
                r.end = r.end.max(end);
                r.members.push((i, e));
            }
            _ => runs.push(Run {
                first: e,
                end,
                members: vec![(i, e)],
            }),
        }
    }
    let parts =
        futures::future::try_join_all(runs.into_iter().map(|r| read_run(state, ids, r))).await?;
    let mut out: Vec<Option<StoredChunk>> = vec![None; ids.len()];
    for (i, c) in parts.into_iter().flatten() {
        out[i] = Some(c);
    }
    Ok(out
        .into_iter()
        .map(|c| c.expect("every id was located"))
        .collect())
}
