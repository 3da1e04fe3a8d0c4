//! The need set of a shard: which chunk ids are durably stored.
//!
//! Answered from an in-memory set of the first 128 bits of every indexed id (`NeedSet`),
//! loaded from the RocksDB index when the shard starts and extended after every successful group
//! commit. RocksDB point lookups cost ~2 µs per id here (measured in `benches/stages.rs`,
//! `index/lookup_*`); the set answers in well under 100 ns, which is what lets `FindMissing`
//! run at millions of ids per second.
//!
//! Why 128 bits is enough: a "present" answer for an id that is not stored would make a client
//! skip an upload. Ids are keyed BLAKE3 outputs; two distinct ids sharing 128 bits is a
//! 2^-128-per-pair event (and a targeted match needs a 2^128 search), far below the
//! probability of undetected disk corruption. Ingest does not rely on the set: it deduplicates
//! with exact index lookups. Memory: ~18 bytes per chunk (1 GiB per 60 M chunks).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use coffer_proto::ChunkId;

use crate::error::RepoError;
use crate::index::ChunkIndex;

/// The ids are uniformly random already: hashing them again would only cost time. But which
/// bits: the shard of an id is its first 8 bytes (little-endian) modulo the shard count, so on
/// one shard those bits are far from uniform — with 16 shards their low 4 bits are all equal,
/// and a table indexed by them would use 1/16 of its home slots. The hash is therefore bytes
/// 8..16 of the id, which the shard choice never looks at (`docs/format.md`, sharding).
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        // The key is the id's first 16 bytes, little-endian: bytes 8..16 are its high half.
        #[allow(clippy::cast_possible_truncation)]
        {
            self.0 = (v >> 64) as u64;
        }
    }
}

/// The set of stored ids (128-bit prefixes) of one shard.
#[derive(Default)]
pub struct NeedSet(HashSet<u128, BuildHasherDefault<IdHasher>>);

fn key(id: &ChunkId) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&id.as_bytes()[..16]);
    u128::from_le_bytes(b)
}

impl NeedSet {
    /// Loads every id of `index`.
    ///
    /// # Errors
    /// Index read errors, and the first entry that does not decode.
    pub fn load(index: &dyn ChunkIndex) -> Result<Self, RepoError> {
        let mut set = Self::default();
        // Sized once (an estimate: the set still grows if it is short), filled by a streaming
        // scan: no copy of the whole index in between.
        let estimate = usize::try_from(index.approximate_len()?).unwrap_or(0);
        set.0.reserve(estimate);
        index.scan(&mut |id, _| {
            set.insert(id);
            Ok(())
        })?;
        Ok(set)
    }

    pub fn insert(&mut self, id: &ChunkId) {
        self.0.insert(key(id));
    }

    /// Forgets `id` (the GC removed it): from now on it is answered as missing.
    pub fn remove(&mut self, id: &ChunkId) {
        self.0.remove(&key(id));
    }

    #[must_use]
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.0.contains(&key(id))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// On one shard of 16, the hash's low bits (what the table indexes by) are still uniform.
    #[test]
    fn one_shards_ids_spread_over_the_whole_table() {
        let shards = 16u64;
        let mut seen = HashSet::new();
        let mut n = 0u64;
        let mut ids = 0;
        while ids < 20_000 {
            n += 1;
            let id = ChunkId::from_bytes(*blake3::hash(&n.to_le_bytes()).as_bytes());
            let shard = u64::from_le_bytes(id.as_bytes()[..8].try_into().unwrap()) % shards;
            if shard != 0 {
                continue;
            }
            ids += 1;
            let h = BuildHasherDefault::<IdHasher>::default().hash_one(key(&id));
            seen.insert(h & 0xfff);
        }
        // 20,000 uniform draws from 4,096 slots leave almost none empty; the first 8 bytes of
        // these ids would have hit 256 slots at most.
        assert!(seen.len() > 4_000, "{} of 4096 slots used", seen.len());
    }
    use crate::index::MemIndex;
    use crate::pack::format::IndexEntry;
    use coffer_proto::PackId;

    #[test]
    fn loads_and_answers_exactly_for_distinct_prefixes() {
        let idx = MemIndex::default();
        let a = ChunkId::from_bytes([1; 32]);
        let e = IndexEntry {
            flags: 0,
            pack: PackId::from_bytes([0; 16]),
            offset: 64,
            len: 80,
            raw_len: 0,
            digest: None,
            uploader: None,
        };
        idx.insert_batch(&[(a, e)], false).unwrap();
        let mut s = NeedSet::load(&idx).unwrap();
        assert!(s.contains(&a));
        let b = ChunkId::from_bytes([2; 32]);
        assert!(!s.contains(&b));
        s.insert(&b);
        assert!(s.contains(&b) && s.len() == 2);
        s.remove(&a);
        assert!(!s.contains(&a) && s.contains(&b));
    }
}
