//! The in-memory engine: tests and benchmarks of the layers above.

use std::collections::BTreeMap;
use std::sync::Mutex;

use coffer_proto::ChunkId;

use coffer_proto::CHUNK_ID_LEN;

use super::{ie, owned_key, BadEntry, ChunkIndex, EntryResult};
use crate::error::RepoError;
use crate::pack::format::IndexEntry;

/// The in-memory engine (tests, benchmarks of the layers above).
#[derive(Debug, Default)]
pub struct MemIndex {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemIndex {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ChunkIndex for MemIndex {
    fn get_many(&self, ids: &[ChunkId]) -> Result<Vec<Option<IndexEntry>>, RepoError> {
        let m = self.map();
        ids.iter()
            .map(|id| match m.get(&id.as_bytes()[..]) {
                None => Ok(None),
                Some(v) => IndexEntry::decode(v).map(Some).map_err(ie),
            })
            .collect()
    }

    fn insert_batch(
        &self,
        entries: &[(ChunkId, IndexEntry)],
        _sync: bool,
    ) -> Result<(), RepoError> {
        let mut m = self.map();
        for (id, e) in entries {
            m.insert(id.as_bytes().to_vec(), e.encode());
        }
        Ok(())
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RepoError> {
        Ok(self.map().get(key).cloned())
    }

    fn put_meta(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), RepoError> {
        let mut m = self.map();
        match value {
            Some(v) => m.insert(key.to_vec(), v.to_vec()),
            None => m.remove(key),
        };
        Ok(())
    }

    fn entries(&self) -> Result<Vec<EntryResult>, RepoError> {
        Ok(self
            .map()
            .iter()
            .filter(|(k, _)| k.len() == CHUNK_ID_LEN)
            .map(|(k, v)| {
                let id = ChunkId::from_slice(k).map_err(|e| BadEntry::Key(hex::encode(k), e))?;
                IndexEntry::decode(v)
                    .map(|e| (id, e))
                    .map_err(|e| BadEntry::Value(id, e))
            })
            .collect())
    }

    fn scan(
        &self,
        f: &mut dyn FnMut(&ChunkId, &IndexEntry) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        // A copy, so that `f` may call back into this index.
        for item in self.entries()? {
            let (id, e) = item.map_err(ie)?;
            f(&id, &e)?;
        }
        Ok(())
    }

    fn approximate_len(&self) -> Result<u64, RepoError> {
        Ok(self.map().len() as u64)
    }

    fn delete_batch(&self, ids: &[ChunkId], _sync: bool) -> Result<(), RepoError> {
        let mut m = self.map();
        for id in ids {
            m.remove(&id.as_bytes()[..]);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), RepoError> {
        Ok(())
    }

    fn insert_owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<(), RepoError> {
        let mut m = self.map();
        for id in ids {
            m.insert(owned_key(owner, id).to_vec(), Vec::new());
        }
        Ok(())
    }

    fn owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<Vec<bool>, RepoError> {
        let m = self.map();
        Ok(ids
            .iter()
            .map(|id| m.contains_key(&owned_key(owner, id)[..]))
            .collect())
    }
}
