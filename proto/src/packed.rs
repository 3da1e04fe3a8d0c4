//! Packed id lists (N * 32 bytes) and the missing-bitmap of `FindMissing`.

use crate::{ChunkId, CHUNK_ID_LEN};

/// A packed id list whose length is not a multiple of 32, or that is too long.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackedIdsError {
    #[error("packed ids must be a multiple of 32 bytes, got {0} bytes")]
    Ragged(usize),
    #[error("too many ids in one batch: {got} (at most {max})")]
    TooMany { got: usize, max: usize },
}

/// Concatenates ids.
#[must_use]
pub fn pack_ids(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * CHUNK_ID_LEN);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// Splits a packed id list, refusing ragged input and more than `max` ids.
///
/// # Errors
/// [`PackedIdsError`] on a ragged or oversized list.
pub fn unpack_ids(bytes: &[u8], max: usize) -> Result<Vec<ChunkId>, PackedIdsError> {
    if !bytes.len().is_multiple_of(CHUNK_ID_LEN) {
        return Err(PackedIdsError::Ragged(bytes.len()));
    }
    let n = bytes.len() / CHUNK_ID_LEN;
    if n > max {
        return Err(PackedIdsError::TooMany { got: n, max });
    }
    Ok(bytes
        .chunks_exact(CHUNK_ID_LEN)
        .map(|c| ChunkId::from_slice(c).expect("chunks_exact yields 32-byte slices"))
        .collect())
}

/// Bytes needed for a bitmap of `n` bits.
#[must_use]
pub fn bitmap_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// Sets bit `i` (least significant bit first).
pub fn bitmap_set(bitmap: &mut [u8], i: usize) {
    bitmap[i / 8] |= 1 << (i % 8);
}

/// Reads bit `i`; bits past the end read as unset.
#[must_use]
pub fn bitmap_get(bitmap: &[u8], i: usize) -> bool {
    bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip() {
        let ids: Vec<ChunkId> = (0..5u8).map(|i| ChunkId::from_bytes([i; 32])).collect();
        let packed = pack_ids(&ids);
        assert_eq!(unpack_ids(&packed, 5).unwrap(), ids);
        assert_eq!(
            unpack_ids(&packed, 4),
            Err(PackedIdsError::TooMany { got: 5, max: 4 })
        );
        assert_eq!(
            unpack_ids(&packed[1..], 9),
            Err(PackedIdsError::Ragged(159))
        );
    }

    #[test]
    fn bitmap_bits() {
        let mut bm = vec![0u8; bitmap_len(10)];
        assert_eq!(bm.len(), 2);
        bitmap_set(&mut bm, 9);
        bitmap_set(&mut bm, 0);
        assert!(bitmap_get(&bm, 9) && bitmap_get(&bm, 0));
        assert!(!bitmap_get(&bm, 1) && !bitmap_get(&bm, 100));
    }
}
