//! The catalog: users and snapshots (policies and ACLs will live here too). Small and
//! transactional: one RocksDB instance under `catalog/`, every write synced, a snapshot committed
//! by exactly one write (its single commit point).
//!
//! Keys: `user/<identity>` -> JSON [`UserRecord`]; `snap/<id hex>` -> protobuf `coffer.v1.Snapshot`;
//! `acl/<rule id>` -> JSON [`crate::access::rules::Rule`]; `setting/<name>` -> UTF-8 value.

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
    /// Hex of the account's 16-byte ownership key: chunks its sessions uploaded are recorded
    /// under it in the shard indexes, so that a resumed backup need not send them again. Random
    /// per account (a deleted and re-created account does not inherit); absent in records
    /// written before format 2 of the record (see `auth::owner_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
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
    RepoError::Catalog(e.to_string())
}

impl Catalog {
    /// Opens (or with `create`, creates) the catalog.
    ///
    /// # Errors
    /// A clear message when the catalog is locked by a running appliance.
    pub fn open(path: &Path, create: bool) -> Result<Self, RepoError> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(create);
        // Opening must need little free space (a full disk, `server::emergency_space`): a new
        // MANIFEST is written at every open, preallocated to 4 MiB by default.
        opts.set_manifest_preallocation_size(64 << 10);
        let db = rocksdb::DB::open(&opts, path).map_err(|e| {
            if e.to_string().contains("lock") {
                RepoError::Catalog(format!(
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

    /// Replaces an existing user's record (password change).
    ///
    /// # Errors
    /// [`RepoError::Invalid`] when the user does not exist.
    pub fn set_user(&self, rec: &UserRecord) -> Result<(), RepoError> {
        if self.user(&rec.identity)?.is_none() {
            return Err(RepoError::Invalid(format!("no user {}", rec.identity)));
        }
        self.put(
            format!("user/{}", rec.identity).as_bytes(),
            &serde_json::to_vec(rec).map_err(ce)?,
        )
    }

    /// Deletes a user (their snapshots stay, owned by the identity).
    ///
    /// # Errors
    /// [`RepoError::Invalid`] when the user does not exist.
    pub fn delete_user(&self, identity: &str) -> Result<(), RepoError> {
        if self.user(identity)?.is_none() {
            return Err(RepoError::Invalid(format!("no user {identity}")));
        }
        self.delete(format!("user/{identity}").as_bytes())
    }

    fn delete(&self, key: &[u8]) -> Result<(), RepoError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.delete_opt(key, &wo).map_err(ce)
    }

    fn prefixed<T>(
        &self,
        prefix: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, RepoError>,
    ) -> Result<Vec<T>, RepoError> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(prefix) {
            let (k, v) = item.map_err(ce)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Stored access rules (none: the defaults apply).
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn acl_rules(&self) -> Result<Vec<crate::access::rules::Rule>, RepoError> {
        self.prefixed(b"acl/", |v| serde_json::from_slice(v).map_err(ce))
    }

    /// Stores a rule.
    ///
    /// # Errors
    /// Engine errors; [`RepoError::Invalid`] when the id exists.
    pub fn put_rule(&self, rule: &crate::access::rules::Rule) -> Result<(), RepoError> {
        let key = format!("acl/{}", rule.id);
        if self.db.get(&key).map_err(ce)?.is_some() {
            return Err(RepoError::Invalid(format!("rule {} exists", rule.id)));
        }
        self.put(key.as_bytes(), &serde_json::to_vec(rule).map_err(ce)?)
    }

    /// Deletes a rule.
    ///
    /// # Errors
    /// [`RepoError::Invalid`] when there is no such rule.
    pub fn delete_rule(&self, id: &str) -> Result<(), RepoError> {
        let key = format!("acl/{id}");
        if self.db.get(&key).map_err(ce)?.is_none() {
            return Err(RepoError::Invalid(format!("no rule {id}")));
        }
        self.delete(key.as_bytes())
    }

    /// A repository setting (`setting/<name>`).
    ///
    /// # Errors
    /// Engine errors.
    pub fn setting(&self, name: &str) -> Result<Option<String>, RepoError> {
        Ok(self
            .db
            .get(format!("setting/{name}"))
            .map_err(ce)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores a repository setting.
    ///
    /// # Errors
    /// Engine errors.
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), RepoError> {
        self.put(format!("setting/{name}").as_bytes(), value.as_bytes())
    }

    /// Every user, sorted.
    ///
    /// # Errors
    /// Engine errors.
    pub fn users(&self) -> Result<Vec<UserRecord>, RepoError> {
        self.prefixed(b"user/", |v| serde_json::from_slice(v).map_err(ce))
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
        self.delete(format!("snap/{id}").as_bytes())
    }

    /// Every snapshot.
    ///
    /// # Errors
    /// Engine or decoding errors.
    pub fn snapshots(&self) -> Result<Vec<v1::Snapshot>, RepoError> {
        self.prefixed(b"snap/", |v| v1::Snapshot::decode(v).map_err(ce))
    }
}
