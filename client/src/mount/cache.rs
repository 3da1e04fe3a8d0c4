//! The mount's chunk cache: plaintext chunks by id, least recently used dropped first, bounded
//! in bytes.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use coffer_proto::ChunkId;

/// Chunks kept for reads, at most `limit` bytes of them.
#[derive(Debug)]
pub(super) struct ChunkCache {
    limit: u64,
    bytes: u64,
    tick: u64,
    map: HashMap<ChunkId, (Bytes, u64)>,
    /// The same by last use, oldest first.
    order: BTreeMap<u64, ChunkId>,
}

impl ChunkCache {
    pub(super) fn new(limit: u64) -> Self {
        Self {
            limit,
            bytes: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub(super) fn contains(&self, id: &ChunkId) -> bool {
        self.map.contains_key(id)
    }

    /// The chunk, marked recently used.
    pub(super) fn get(&mut self, id: &ChunkId) -> Option<Bytes> {
        self.tick += 1;
        let (b, t) = self.map.get_mut(id)?;
        self.order.remove(t);
        *t = self.tick;
        self.order.insert(self.tick, *id);
        Some(b.clone())
    }

    /// Keeps `b` (a chunk larger than the whole cache is not kept), dropping the least recently
    /// used chunks beyond the limit.
    pub(super) fn put(&mut self, id: ChunkId, b: Bytes) {
        if b.len() as u64 > self.limit || self.map.contains_key(&id) {
            return;
        }
        self.tick += 1;
        self.bytes += b.len() as u64;
        self.map.insert(id, (b, self.tick));
        self.order.insert(self.tick, id);
        while self.bytes > self.limit {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((b, _)) = self.map.remove(&old) {
                self.bytes -= b.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::from_slice(&[n; 32]).unwrap()
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_bound_holds() {
        let mut c = ChunkCache::new(300);
        c.put(id(1), Bytes::from(vec![1; 100]));
        c.put(id(2), Bytes::from(vec![2; 100]));
        c.put(id(3), Bytes::from(vec![3; 100]));
        assert!(c.get(&id(1)).is_some());
        c.put(id(4), Bytes::from(vec![4; 100]));
        assert!(!c.contains(&id(2)), "2 was the least recently used");
        assert!(c.contains(&id(1)) && c.contains(&id(3)) && c.contains(&id(4)));
        c.put(id(5), Bytes::from(vec![5; 301]));
        assert!(!c.contains(&id(5)), "larger than the cache");
        assert_eq!(c.bytes, 300);
    }
}
