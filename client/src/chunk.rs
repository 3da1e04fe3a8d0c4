//! The chunk and hash stages: FastCDC v2020 (normalized, level 1) over a file's bytes, keyed
//! BLAKE3 of each chunk. Runs on a pool of worker threads, one file per worker at a time.

use std::fs::File;
use std::path::Path;

use bytes::Bytes;
use coffer_proto::ChunkId;

/// FastCDC sizes, as the appliance announced them.
#[derive(Debug, Clone, Copy)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// One chunk of a file.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub id: ChunkId,
    pub data: Bytes,
}

/// Reads `path` and calls `emit` for each chunk, in order. Returns the bytes read.
///
/// # Errors
/// I/O errors (the file vanished, is unreadable), as text.
pub fn chunk_file(
    path: &Path,
    params: ChunkerParams,
    dedup_key: &[u8; 32],
    mut emit: impl FnMut(Chunk),
) -> Result<u64, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut total = 0u64;
    let cdc = fastcdc::v2020::StreamCDC::new(f, params.min, params.avg, params.max);
    for c in cdc {
        let c = c.map_err(|e| e.to_string())?;
        total += c.data.len() as u64;
        let id = coffer_proto::chunk_id(dedup_key, &c.data);
        emit(Chunk {
            id,
            data: Bytes::from(c.data),
        });
    }
    Ok(total)
}
