//! The RocksDB engine: one database per shard, bloom filters and a block cache for lookups.

use std::path::Path;

use coffer_proto::{ChunkId, CHUNK_ID_LEN};

use super::{ie, owned_key, BadEntry, ChunkIndex, EntryResult, META_CREATED, OWNED_KEY_LEN};
use crate::error::RepoError;
use crate::pack::format::IndexEntry;

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
        if mode == OpenMode::Create {
            // RocksDB syncs the files and names inside its directory, not the directory's own
            // name (`index/shard-N` in `index/`).
            crate::repo::create_dir_durable(path)
                .map_err(|e| RepoError::Io(format!("creating {}", path.display()), e))?;
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
                    .map_err(|e| BadEntry::Value(id, e)),
            );
        }
        Ok(out)
    }

    fn scan(
        &self,
        f: &mut dyn FnMut(&ChunkId, &IndexEntry) -> Result<(), RepoError>,
    ) -> Result<(), RepoError> {
        // A full scan (need-set load at start, GC): read ahead, and leave the block cache to
        // the point lookups that serve requests.
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro.set_readahead_size(4 << 20);
        for item in self.db.iterator_opt(rocksdb::IteratorMode::Start, ro) {
            let (k, v) = item.map_err(ie)?;
            if k.len() != CHUNK_ID_LEN {
                continue; // meta keys, ownership records
            }
            let id = ChunkId::from_slice(&k).map_err(ie)?;
            let e = IndexEntry::decode(&v).map_err(|e| ie(BadEntry::Value(id, e)))?;
            f(&id, &e)?;
        }
        Ok(())
    }

    fn approximate_len(&self) -> Result<u64, RepoError> {
        Ok(self
            .db
            .property_int_value("rocksdb.estimate-num-keys")
            .map_err(ie)?
            .unwrap_or(0))
    }

    fn delete_batch(&self, ids: &[ChunkId], sync: bool) -> Result<(), RepoError> {
        let mut batch = rocksdb::WriteBatch::default();
        for id in ids {
            batch.delete(id.as_bytes());
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(ie)
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
