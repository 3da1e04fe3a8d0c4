//! The mount's chunk caches: an index of chunks by id, least recently used dropped first,
//! bounded in bytes. In memory it holds the plaintext chunks ([`ChunkCache`]); for the disk
//! cache (`disk.rs`) it holds the size of each chunk's file.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use coffer_proto::ChunkId;

/// Values by chunk id, at most `limit` bytes of them (each value's size given when it is put).
#[derive(Debug)]
pub(super) struct Lru<V> {
    limit: u64,
    bytes: u64,
    tick: u64,
    map: HashMap<ChunkId, (V, u64, u64)>,
    /// The same by last use, oldest first.
    order: BTreeMap<u64, ChunkId>,
}

/// Plaintext chunks kept in memory for reads.
pub(super) type ChunkCache = Lru<Bytes>;

impl<V: Clone> Lru<V> {
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

    /// The value, marked recently used.
    pub(super) fn get(&mut self, id: &ChunkId) -> Option<V> {
        self.tick += 1;
        let (v, _, t) = self.map.get_mut(id)?;
        self.order.remove(t);
        *t = self.tick;
        self.order.insert(self.tick, *id);
        Some(v.clone())
    }

    /// Forgets `id`.
    pub(super) fn remove(&mut self, id: &ChunkId) {
        if let Some((_, size, t)) = self.map.remove(id) {
            self.order.remove(&t);
            self.bytes -= size;
        }
    }

    /// Keeps `v` of `size` bytes (nothing larger than the whole cache is kept, nor an id
    /// already held), dropping the least recently used beyond the limit; answers the ids
    /// dropped.
    pub(super) fn put(&mut self, id: ChunkId, v: V, size: u64) -> Vec<ChunkId> {
        if size > self.limit || self.map.contains_key(&id) {
            return Vec::new();
        }
        self.tick += 1;
        self.bytes += size;
        self.map.insert(id, (v, size, self.tick));
        self.order.insert(self.tick, id);
        let mut dropped = Vec::new();
        while self.bytes > self.limit {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, size, _)) = self.map.remove(&old) {
                self.bytes -= size;
                dropped.push(old);
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::from_slice(&[n; 32]).unwrap()
    }

    fn put(c: &mut ChunkCache, n: u8, len: usize) -> Vec<ChunkId> {
        c.put(id(n), Bytes::from(vec![n; len]), len as u64)
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_bound_holds() {
        let mut c = ChunkCache::new(300);
        put(&mut c, 1, 100);
        put(&mut c, 2, 100);
        put(&mut c, 3, 100);
        assert!(c.get(&id(1)).is_some());
        assert_eq!(
            put(&mut c, 4, 100),
            vec![id(2)],
            "2 was the least recently used"
        );
        assert!(c.contains(&id(1)) && c.contains(&id(3)) && c.contains(&id(4)));
        assert!(put(&mut c, 5, 301).is_empty());
        assert!(!c.contains(&id(5)), "larger than the cache");
        assert_eq!(c.bytes, 300);
        c.remove(&id(3));
        assert_eq!(c.bytes, 200);
        assert!(put(&mut c, 6, 100).is_empty(), "room again");
        assert_eq!(put(&mut c, 7, 150), vec![id(1), id(4)]);
    }
}
