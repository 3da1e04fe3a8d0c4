//! The read path of a shard: index lookup, one O_DIRECT read per record, authenticated
//! decryption on the shard's core.

use std::rc::Rc;

use bytes::Bytes;
use coffer_proto::ChunkId;
use glommio::io::DmaFile;

use crate::error::ApplianceError;
use crate::pack::format::{IndexEntry, FLAG_ZSTD};
use crate::pack::read::open_record;

use super::{ShardState, StoredChunk};

const MAX_OPEN_READERS: usize = 256;

async fn reader(state: &ShardState, e: &IndexEntry) -> Result<Rc<DmaFile>, ApplianceError> {
    if let Some(f) = state.readers.borrow().get(&e.pack) {
        return Ok(f.clone());
    }
    let path = state.paths.pack(&e.pack);
    let f =
        Rc::new(DmaFile::open(&path).await.map_err(|x| {
            ApplianceError::Internal(format!("pack {} cannot be opened: {x}", e.pack))
        })?);
    let mut r = state.readers.borrow_mut();
    if r.len() >= MAX_OPEN_READERS {
        r.clear();
    }
    r.insert(e.pack, f.clone());
    Ok(f)
}

pub(super) async fn get(
    state: &Rc<ShardState>,
    ids: &[ChunkId],
) -> Result<Vec<StoredChunk>, ApplianceError> {
    let entries = state
        .index
        .get_many(ids)
        .map_err(|e| ApplianceError::Internal(e.to_string()))?;
    let mut out = Vec::with_capacity(ids.len());
    for (id, e) in ids.iter().zip(entries) {
        let e = e.ok_or_else(|| ApplianceError::NotFound(format!("chunk {id} is not stored")))?;
        let f = reader(state, &e).await?;
        let r = f.read_at(e.offset, e.len as usize).await.map_err(|x| {
            ApplianceError::Internal(format!("reading chunk {id} from pack {}: {x}", e.pack))
        })?;
        if r.len() != e.len as usize {
            return Err(ApplianceError::Internal(format!(
                "chunk {id}: pack {} is shorter than the index says",
                e.pack
            )));
        }
        let mut rec = r.to_vec();
        let key = state.master.pack_key(&e.pack);
        let (h, stored) = open_record(&key, &mut rec)
            .map_err(|x| ApplianceError::Internal(format!("chunk {id} in pack {}: {x}", e.pack)))?;
        if h.id != *id {
            return Err(ApplianceError::Internal(format!(
                "index points chunk {id} at a record of {} in pack {}",
                h.id, e.pack
            )));
        }
        out.push(StoredChunk {
            id: *id,
            raw_len: h.raw_len,
            zstd: h.flags & FLAG_ZSTD != 0,
            data: Bytes::copy_from_slice(stored),
        });
        glommio::yield_if_needed().await;
    }
    Ok(out)
}
