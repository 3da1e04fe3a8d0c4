//! The dedup index of one shard: `ChunkId -> IndexEntry` (pack, offset, length, flags).
//!
//! The index is a cache of what pack files say: an entry is inserted only after the bytes it
//! points at are durable (fsynced), and `rebuild-index` can always recreate it from pack footers.
//! Two engines implement [`ChunkIndex`] and run the same conformance tests: RocksDB (the real one,
//! one instance per shard under `index/shard-N`) and an in-memory map.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use coffer_proto::{ChunkId, CHUNK_ID_LEN};

use crate::error::RepoError;
use crate::pack::format::IndexEntry;

/// Meta key under which a shard records its open (unsealed) pack.
pub const META_OPEN_PACK: &[u8] = b"!meta:open-pack";
/// Meta key written when the index is created; its absence means the index is not ours.
pub const META_CREATED: &[u8] = b"!meta:created";

/// Meta key listing packs abandoned after a failed write (16-byte pack ids, concatenated): the
/// next start seals each in place and indexes its records.
pub const META_POISONED: &[u8] = b"!meta:poisoned-packs";

/// Length of an ownership key: `o` + 16-byte account key + chunk id (never a chunk entry's 32).
const OWNED_KEY_LEN: usize = 1 + 16 + CHUNK_ID_LEN;

fn owned_key(owner: &[u8; 16], id: &ChunkId) -> [u8; OWNED_KEY_LEN] {
    let mut k = [0u8; OWNED_KEY_LEN];
    k[0] = b'o';
    k[1..17].copy_from_slice(owner);
    k[17..].copy_from_slice(id.as_bytes());
    k
}

/// One index entry, or why it could not be decoded.
pub type EntryResult = Result<(ChunkId, IndexEntry), String>;

/// A shard's index engine.
pub trait ChunkIndex: Send + Sync {
    /// Looks up many ids at once.
    ///
    /// # Errors
    /// Engine errors.
    fn get_many(&self, ids: &[ChunkId]) -> Result<Vec<Option<IndexEntry>>, RepoError>;
    /// Inserts entries atomically. `sync` forces them to stable storage before returning.
    ///
    /// # Errors
    /// Engine errors.
    fn insert_batch(&self, entries: &[(ChunkId, IndexEntry)], sync: bool) -> Result<(), RepoError>;
    /// Reads a meta value.
    ///
    /// # Errors
    /// Engine errors.
    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RepoError>;
    /// Writes (`Some`) or deletes (`None`) a meta value durably.
    ///
    /// # Errors
    /// Engine errors.
    fn put_meta(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), RepoError>;
    /// Every chunk entry, in id order. Undecodable entries are returned as errors.
    ///
    /// # Errors
    /// Engine errors.
    fn entries(&self) -> Result<Vec<EntryResult>, RepoError>;
    /// Makes every earlier write durable.
    ///
    /// # Errors
    /// Engine errors.
    fn sync(&self) -> Result<(), RepoError>;
    /// Records that the account with ownership key `owner` holds `ids` (one of its sessions
    /// uploaded them, verified, and they are durable). Not synced: a record lost in a crash only
    /// costs a re-upload.
    ///
    /// # Errors
    /// Engine errors.
    fn insert_owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<(), RepoError>;
    /// Which of `ids` the account with ownership key `owner` holds.
    ///
    /// # Errors
    /// Engine errors.
    fn owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<Vec<bool>, RepoError>;
}

fn ie(e: impl std::fmt::Display) -> RepoError {
    RepoError::Index(e.to_string())
}

/// The RocksDB engine.
pub struct RocksIndex {
    db: rocksdb::DB,
}

impl std::fmt::Debug for RocksIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RocksIndex({})", self.db.path().display())
    }
}

/// How a RocksDB index is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create a new, empty index (init, rebuild).
    Create,
    /// Open an existing index for serving; a missing one is an error.
    Existing,
    /// Read-only, beside a running appliance (verify).
    ReadOnly,
}

impl RocksIndex {
    /// Opens the index at `path`.
    ///
    /// # Errors
    /// [`RepoError::IndexMissing`] when `mode` is not `Create` and there is no index there.
    pub fn open(path: &Path, mode: OpenMode, cache_bytes: usize) -> Result<Self, RepoError> {
        if mode != OpenMode::Create && !path.join("CURRENT").exists() {
            return Err(RepoError::IndexMissing(path.to_path_buf()));
        }
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(mode == OpenMode::Create);
        opts.set_error_if_exists(mode == OpenMode::Create);
        // Whole-key bloom filters, a hash index inside data blocks and a block cache: most
        // FindMissing lookups are misses that the filter answers without touching a block.
        opts.optimize_for_point_lookup((cache_bytes >> 20).max(8) as u64);
        opts.set_memtable_whole_key_filtering(true);
        opts.set_memtable_prefix_bloom_ratio(0.1);
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.set_max_background_jobs(2);
        // Opening must need little free space (a full disk, `server::emergency_space`): a new
        // MANIFEST is written at every open, preallocated to 4 MiB by default.
        opts.set_manifest_preallocation_size(64 << 10);
        opts.set_write_buffer_size(8 << 20);
        let db = match mode {
            // Opened with the default column family named, so that `cf_handle` finds it for
            // `batched_multi_get_cf`.
            OpenMode::ReadOnly => rocksdb::DB::open_cf_for_read_only(
                &opts,
                path,
                [rocksdb::DEFAULT_COLUMN_FAMILY_NAME],
                false,
            ),
            _ => rocksdb::DB::open_cf(&opts, path, [rocksdb::DEFAULT_COLUMN_FAMILY_NAME]),
        }
        .map_err(ie)?;
        let idx = Self { db };
        if mode == OpenMode::Create {
            idx.put_meta(META_CREATED, Some(&coffer_proto::now_us().to_le_bytes()))?;
        }
        Ok(idx)
    }
}

impl ChunkIndex for RocksIndex {
    fn get_many(&self, ids: &[ChunkId]) -> Result<Vec<Option<IndexEntry>>, RepoError> {
        let cf = self
            .db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .ok_or_else(|| ie("no default column family"))?;
        let keys: Vec<&[u8]> = ids.iter().map(|i| &i.as_bytes()[..]).collect();
        self.db
            .batched_multi_get_cf(cf, keys, false)
            .into_iter()
            .map(|r| match r.map_err(ie)? {
                None => Ok(None),
                Some(v) => IndexEntry::decode(&v).map(Some).map_err(ie),
            })
            .collect()
    }

    fn insert_batch(&self, entries: &[(ChunkId, IndexEntry)], sync: bool) -> Result<(), RepoError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (id, e) in entries {
            batch.put(id.as_bytes(), e.encode());
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(ie)
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RepoError> {
        self.db.get(key).map_err(ie)
    }

    fn put_meta(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), RepoError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        match value {
            Some(v) => self.db.put_opt(key, v, &wo),
            None => self.db.delete_opt(key, &wo),
        }
        .map_err(ie)
    }

    fn entries(&self) -> Result<Vec<EntryResult>, RepoError> {
        let mut out = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(ie)?;
            if k.len() != CHUNK_ID_LEN {
                continue; // meta keys
            }
            let id = ChunkId::from_slice(&k).map_err(ie)?;
            out.push(
                IndexEntry::decode(&v)
                    .map(|e| (id, e))
                    .map_err(|e| format!("{id}: {e}")),
            );
        }
        Ok(out)
    }

    fn sync(&self) -> Result<(), RepoError> {
        self.db.flush_wal(true).map_err(ie)
    }

    fn insert_owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<(), RepoError> {
        let mut batch = rocksdb::WriteBatch::default();
        for id in ids {
            batch.put(owned_key(owner, id), []);
        }
        self.db.write(batch).map_err(ie)
    }

    fn owned(&self, owner: &[u8; 16], ids: &[ChunkId]) -> Result<Vec<bool>, RepoError> {
        let cf = self
            .db
            .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .ok_or_else(|| ie("no default column family"))?;
        let keys: Vec<[u8; OWNED_KEY_LEN]> = ids.iter().map(|i| owned_key(owner, i)).collect();
        self.db
            .batched_multi_get_cf(cf, keys.iter().map(|k| &k[..]), false)
            .into_iter()
            .map(|r| r.map(|v| v.is_some()).map_err(ie))
            .collect()
    }
}

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
            m.insert(id.as_bytes().to_vec(), e.encode().to_vec());
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
                let id = ChunkId::from_slice(k).map_err(|e| e.to_string())?;
                IndexEntry::decode(v)
                    .map(|e| (id, e))
                    .map_err(|e| format!("{id}: {e}"))
            })
            .collect())
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

#[cfg(test)]
mod conformance {
    //! One suite, run against every engine.
    use super::*;
    use coffer_proto::PackId;

    fn entry(i: u8) -> IndexEntry {
        IndexEntry {
            flags: 0,
            pack: PackId::from_bytes([i; 16]),
            offset: u64::from(i) * 10,
            len: 5,
            raw_len: 3,
        }
    }

    fn suite(idx: &dyn ChunkIndex) {
        let a = ChunkId::from_bytes([1; 32]);
        let b = ChunkId::from_bytes([2; 32]);
        assert_eq!(idx.get_many(&[a, b]).unwrap(), vec![None, None]);
        idx.insert_batch(&[(a, entry(1))], false).unwrap();
        assert_eq!(idx.get_many(&[b, a]).unwrap(), vec![None, Some(entry(1))]);
        idx.insert_batch(&[(a, entry(1)), (b, entry(2))], true)
            .unwrap();
        idx.put_meta(META_OPEN_PACK, Some(b"x")).unwrap();
        assert_eq!(
            idx.get_meta(META_OPEN_PACK).unwrap().as_deref(),
            Some(&b"x"[..])
        );
        let all: Vec<_> = idx
            .entries()
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            all,
            vec![(a, entry(1)), (b, entry(2))],
            "meta keys are not chunk entries"
        );
        idx.put_meta(META_OPEN_PACK, None).unwrap();
        assert_eq!(idx.get_meta(META_OPEN_PACK).unwrap(), None);
        // Ownership records are per account and never chunk entries.
        let (alice, bob) = ([7u8; 16], [8u8; 16]);
        idx.insert_owned(&alice, &[a]).unwrap();
        assert_eq!(idx.owned(&alice, &[a, b]).unwrap(), vec![true, false]);
        assert_eq!(idx.owned(&bob, &[a, b]).unwrap(), vec![false, false]);
        assert_eq!(
            idx.entries().unwrap().len(),
            2,
            "ownership rows are not entries"
        );
        idx.sync().unwrap();
    }

    #[test]
    fn memory_engine() {
        suite(&MemIndex::default());
    }

    #[test]
    fn rocksdb_engine() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shard-0");
        assert!(matches!(
            RocksIndex::open(&p, OpenMode::Existing, 8 << 20),
            Err(RepoError::IndexMissing(_))
        ));
        suite(&RocksIndex::open(&p, OpenMode::Create, 8 << 20).unwrap());
        let reopened = RocksIndex::open(&p, OpenMode::Existing, 8 << 20).unwrap();
        assert_eq!(reopened.entries().unwrap().len(), 2);
    }
}
