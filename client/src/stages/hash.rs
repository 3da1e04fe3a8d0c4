//! The hash stage: the id of a chunk is keyed BLAKE3 of its bytes under the repository's dedup
//! key, so ids reveal nothing about content outside the repository and equal bytes dedup.
//!
//! [`super::chunk::cut`] calls [`id_of`] on the reader thread right after each cut, while the
//! bytes are still in the CPU cache; tree objects are hashed where they are built.

use coffer_proto::{ChunkId, DedupKey};

use super::chunk::zero_prefix;

/// The keyed id of a chunk. All-zero chunks (whole runs of a disk image's free space) are
/// hashed once per length and key and remembered.
#[must_use]
pub fn id_of(dedup_key: &DedupKey, data: &[u8]) -> ChunkId {
    const ZERO_IDS: usize = 8;
    thread_local! {
        static ZEROS: std::cell::RefCell<Vec<(DedupKey, usize, ChunkId)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    if data.len() < 4096 || data[0] != 0 || zero_prefix(data) != data.len() {
        return coffer_proto::chunk_id(dedup_key, data);
    }
    ZEROS.with(|z| {
        let mut z = z.borrow_mut();
        if let Some(hit) = z.iter().find(|e| e.0 == *dedup_key && e.1 == data.len()) {
            return hit.2;
        }
        let id = coffer_proto::chunk_id(dedup_key, data);
        if z.len() == ZERO_IDS {
            z.remove(0);
        }
        z.push((*dedup_key, data.len(), id));
        id
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: DedupKey = DedupKey::from_bytes([7; 32]);

    #[test]
    fn all_zero_chunks_get_the_id_hashing_gives_them() {
        // All-zero chunks get the same id as hashing them would give, whatever the length.
        let max = 4 * (128 << 10);
        let zeros = vec![0u8; max];
        for len in [4096, 4097, max, 4096] {
            assert_eq!(
                id_of(&KEY, &zeros[..len]),
                coffer_proto::chunk_id(&KEY, &zeros[..len])
            );
        }
        assert_ne!(
            id_of(&DedupKey::from_bytes([1; 32]), &zeros),
            id_of(&KEY, &zeros)
        );
    }
}
