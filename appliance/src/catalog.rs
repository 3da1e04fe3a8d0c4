//! The catalog: users and snapshots (policies and ACLs will live here too). Small and
//! transactional: one RocksDB instance under `catalog/`, every write synced, a snapshot committed
//! by exactly one write (its single commit point).
//!
//! Keys: `user/<identity>` -> JSON [`UserRecord`]; `snap/<id hex>` -> protobuf `coffer.v1.Snapshot`.

use std::path::Path;

use coffer_proto::{v1, SnapshotId};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::error::RepoError;

/// An account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserRecord {
    pub identity: String,
    /// argon2id PHC string; never anything else.
    pub password_hash: String,
    pub created_unix: i64,
}

/// The catalog database.
pub struct Catalog {
    db: rocksdb::DB,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

fn ce(e: impl std::fmt::Display) -> RepoError {
    RepoError::Index(format!("catalog: {e}"))
}

impl Catalog {
    /// Opens (or with `create`, creates) the catalog.
    ///
    /// # Errors
    /// A clear message when the catalog is locked by a running appliance.
    pub fn open(path: &Path, create: bool) -> Result<Self, RepoError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(create);
        let db = rocksdb::DB::open(&opts, path).map_err(|e| {
            if e.to_string().contains("lock") {
                RepoError::Index(format!(
                    "the catalog at {} is in use (is the appliance running? stop it first): {e}",
                    path.display()
                ))
            } else {
                ce(e)
            }
        })?;
        Ok(Self { db })
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), RepoError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.put_opt(key, value, &wo).map_err(ce)
    }

    /// Looks up a user.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn user(&self, identity: &str) -> Result<Option<UserRecord>, RepoError> {
        match self.db.get(format!("user/{identity}")).map_err(ce)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(ce),
        }
    }

    /// Creates a user; fails if it exists.
    ///
    /// # Errors
    /// [`RepoError::Invalid`] when the user exists.
    pub fn add_user(&self, rec: &UserRecord) -> Result<(), RepoError> {
        if self.user(&rec.identity)?.is_some() {
            return Err(RepoError::Invalid(format!(
                "user {} already exists",
                rec.identity
            )));
        }
        self.put(
            format!("user/{}", rec.identity).as_bytes(),
            &serde_json::to_vec(rec).map_err(ce)?,
        )
    }

    /// Every user, sorted.
    ///
    /// # Errors
    /// Engine errors.
    pub fn users(&self) -> Result<Vec<UserRecord>, RepoError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"user/") {
            let (k, v) = item.map_err(ce)?;
            if !k.starts_with(b"user/") {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(ce)?);
        }
        Ok(out)
    }

    /// Commits a snapshot: one synced write is the commit point.
    ///
    /// # Errors
    /// Engine errors.
    pub fn commit_snapshot(&self, snap: &v1::Snapshot) -> Result<(), RepoError> {
        let id = SnapshotId::from_slice(&snap.id).map_err(ce)?;
        self.put(format!("snap/{id}").as_bytes(), &snap.encode_to_vec())
    }

    /// One snapshot.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn snapshot(&self, id: &SnapshotId) -> Result<Option<v1::Snapshot>, RepoError> {
        match self.db.get(format!("snap/{id}")).map_err(ce)? {
            None => Ok(None),
            Some(v) => v1::Snapshot::decode(&v[..]).map(Some).map_err(ce),
        }
    }

    /// Deletes a snapshot (one synced write).
    ///
    /// # Errors
    /// Engine errors.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), RepoError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.delete_opt(format!("snap/{id}"), &wo).map_err(ce)
    }

    /// Every snapshot.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn snapshots(&self) -> Result<Vec<v1::Snapshot>, RepoError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"snap/") {
            let (k, v) = item.map_err(ce)?;
            if !k.starts_with(b"snap/") {
                break;
            }
            out.push(v1::Snapshot::decode(&v[..]).map_err(ce)?);
        }
        Ok(out)
    }
}
